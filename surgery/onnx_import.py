"""``surgery.import_onnx``: an ONNX file (from PyTorch, Keras via tf2onnx, TensorFlow, ...)
as a freezeray model, DL4J's model import through ONNX.

The conversion is onnx2torch's (maintained, pure Python, and it builds a ``torch.fx``
graph directly, so the ONNX graph's structure is what surgery edits); it was chosen over
onnx-pytorch (code generation, unmaintained) and onnx2pytorch (``nn.Module`` without a
graph). Before converting, the graph is normalised so that files exported with
``torch.onnx.export``'s defaults convert:

* ``Constant`` nodes become initializers, and ``Identity`` nodes are removed (their users
  read the identity's input): constant folding leaves weights and biases behind both,
  which onnx2torch's converters do not look through;
* omitted optional inputs written as ``''`` at the end of a node's inputs are left out;
* operators whose later opset revisions only added tensor types (``Cast``, ``Shape``,
  ``Reshape``, ``Identity``, ... up to the opset 20 that ``torch.onnx.export`` writes) use
  the converter of the last revision onnx2torch knows;
* nodes without a name get ``<OpType>_<n>``.

Vertices keep the ONNX node names without the leading ``/`` and with ``.`` written ``/``
(torch module names cannot hold dots): node ``/conv_head/Conv`` is vertex
``conv_head/Conv``, ``/blocks/blocks.0/conv/Conv`` is ``blocks/blocks/0/conv/Conv``;
``surgery.summary`` lists them. The input vertex is ``input_1``. An operator onnx2torch
cannot convert is named in the error, with its opset.

The preprocessing is the one given, else the file's ``freezeray.preprocessing`` metadata
(JSON of :class:`~surgery.PreprocessConfig`), else the input's size with ImageNet's mean
and std (with a warning). ``surgery.save`` copies the ONNX file into the saved folder, so
the saved model loads without the original.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import torch
import torch.fx as fx

from freezeray import storage
from freezeray.errors import InvalidInput
from freezeray.images import PreprocessConfig

from .graph import example_input, output_vertices, propagate_
from .recipe import ModelInfo, set_info_

__all__ = ["import_onnx", "UnsupportedOnnx", "PREPROCESSING_KEY"]

log = logging.getLogger(__name__)

PREPROCESSING_KEY = "freezeray.preprocessing"

# onnx2torch 1.5.15's Slice indexes with a list, which torch >= 2.9 warns about on every
# first call in a process (the result is the same); nothing a user can act on.
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                        module=r"onnx2torch\.")


class UnsupportedOnnx(InvalidInput, ValueError):
    """An ONNX graph with operators the converter has no conversion for."""


def _normalise(model: Any) -> Any:
    """Constants as initializers, Identity nodes bypassed, trailing empty inputs left out,
    every node named. In place."""
    from onnx import numpy_helper

    graph = model.graph
    constants = [n for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")]
    for node in constants:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if value is None:
            continue  # value_float etc.: left to the converter
        tensor = numpy_helper.to_array(value.t)
        graph.initializer.append(numpy_helper.from_array(tensor, name=node.output[0]))
        graph.node.remove(node)
    outputs = {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity" and n.domain in ("", "ai.onnx")]:
        source, target = node.input[0], node.output[0]
        if target in outputs:
            continue  # a graph output keeps its name: keep the node
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == target:
                    other.input[i] = source
        graph.node.remove(node)
    for node in graph.node:  # an omitted optional input written as '' at the end: left out
        while node.input and not node.input[-1]:
            node.input.pop()
    seen: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
        if node.name in seen:
            seen[node.name] += 1
            node.name = f"{node.name}_{seen[node.name]}"
        else:
            seen[node.name] = 0
    return model


# Operators whose ONNX revisions after the converter's version only added tensor types
# (bfloat16, float8, int4, ...): the converter of that version converts them unchanged.
_TYPES_ONLY_SINCE = {"Identity": 16, "Cast": 13, "Shape": 15, "ConstantOfShape": 9, "Reshape": 14, "Flatten": 13,
                     "Squeeze": 21, "Unsqueeze": 13, "Transpose": 13, "Conv": 11, "GlobalAveragePool": 1,
                     "MaxPool": 12, "Equal": 13}
# Revisions that added a feature the older converter lacks: converted only without it.
_GUARDED_SINCE = {
    "Pad": (13, lambda node: len(node.input_values) <= 3 and node.attributes.get("mode", "constant") != "wrap",
            "an axes input or mode='wrap'"),
    "AveragePool": (11, lambda node: all(d == 1 for d in node.attributes.get("dilations", [1])), "dilations"),
}


def _register_revisions() -> None:
    """Converters for the later opset revisions of ``_TYPES_ONLY_SINCE`` and
    ``_GUARDED_SINCE`` (``torch.onnx.export`` writes opset 20 by default; onnx2torch
    1.5.15 registers e.g. ``Cast`` only up to 13). Registered once per process."""
    from onnx import defs
    from onnx2torch.node_converters import get_converter
    from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription, add_converter

    def guarded(convert, accepts, feature, op):
        def converter(node, graph):
            if not accepts(node):
                raise NotImplementedError(f"{op} with {feature} has no converter")
            return convert(node, graph)
        return converter

    plain = {op: (base, None, "") for op, base in _TYPES_ONLY_SINCE.items()}
    for op, (base, accepts, feature) in {**plain, **_GUARDED_SINCE}.items():
        convert = get_converter(operation_type=op, version=base)
        revisions = set()
        for version in range(base + 1, defs.onnx_opset_version() + 1):
            try:
                revisions.add(defs.get_schema(op, max_inclusive_version=version).since_version)
            except defs.SchemaError:
                pass
        for since in sorted(v for v in revisions if v > base):
            if OperationDescription("", op, since) not in _CONVERTER_REGISTRY:
                add_converter(operation_type=op, version=since)(
                    convert if accepts is None else guarded(convert, accepts, feature, op))


def _unsupported(model: Any) -> list[str]:
    from onnx2torch.node_converters import get_converter

    opsets = {o.domain: o.version for o in model.opset_import}
    missing = []
    for node in model.graph.node:
        try:
            get_converter(domain=node.domain, operation_type=node.op_type, version=opsets.get(node.domain, 1))
        except NotImplementedError:
            label = f"{node.op_type} (opset {opsets.get(node.domain, '?')}{', domain ' + node.domain if node.domain else ''})"
            if label not in missing:
                missing.append(label)
    return missing


def _preprocessing(model: Any, given: PreprocessConfig | dict[str, Any] | None) -> PreprocessConfig:
    if isinstance(given, PreprocessConfig):
        return given
    if isinstance(given, dict):
        return PreprocessConfig.from_dict(given)
    meta = {p.key: p.value for p in model.metadata_props}
    if PREPROCESSING_KEY in meta:
        return PreprocessConfig.from_dict(json.loads(meta[PREPROCESSING_KEY]))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    size = tuple(dims[1:4]) if len(dims) == 4 and all(d > 0 for d in dims[1:4]) else (3, 224, 224)
    warnings.warn(f"the ONNX file names no preprocessing: using its input size {size} with ImageNet's mean and std; "
                  "pass preprocessing=... (or store it in the file's 'freezeray.preprocessing' metadata)", stacklevel=3)
    return PreprocessConfig(input_size=size)


def import_onnx(uri: str, *, preprocessing: PreprocessConfig | dict[str, Any] | None = None,
                storage_options: dict[str, Any] | None = None, name: str | None = None,
                losses: dict[str, str] | None = None) -> fx.GraphModule:
    """An ONNX file as a freezeray model (see the module docstring).

    Args:
        uri: a local path or object-storage URI of the ``.onnx`` file.
        preprocessing: how images become its input (default: the file's metadata).
        storage_options: fsspec options for ``uri``.
        name: the model's name (default: the file's graph name).
        losses: output vertex -> loss (default: ``cross_entropy``).

    Raises:
        UnsupportedOnnx: naming the operators that have no conversion.
        FileNotFoundError: nothing at ``uri``.

    Example:
        >>> model = surgery.import_onnx("s3://bucket/keras/resnet.onnx", storage_options=opts)
        >>> print(surgery.summary(model))   # ONNX node names as vertices
    """
    import onnx
    from onnx2torch import convert

    data = storage.read_bytes(uri, storage_options)
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:
        raise ValueError(f"{uri!r} is not an ONNX model: {exc}") from None
    _normalise(model)
    _register_revisions()
    missing = _unsupported(model)
    if missing:
        raise UnsupportedOnnx(f"{uri!r} uses ONNX operators that freezeray's importer (onnx2torch) cannot convert: "
                              f"{', '.join(missing)}. Export with other operators (another opset_version), or "
                              "register a converter with onnx2torch.node_converters.add_converter")
    config = _preprocessing(model, preprocessing)
    gm = convert(model)
    label = name or model.graph.name or "onnx"
    outputs = output_vertices(gm)
    info = ModelInfo(name=label, weights=uri, origin="onnx", preprocessing=config,
                     losses={v: (losses or {}).get(v, "cross_entropy") for v in outputs})
    set_info_(gm, info)
    gm.meta["freezeray_onnx"] = data  # saved with the model (surgery.save)
    gm.eval()
    with torch.no_grad():
        propagate_(gm, example_input(config.input_size))
    return gm
