"""A model's identity: fingerprints of what the user chose and the weights, and a probe
of what the model computes.

Identity comes from what does not change when a library only changes how it prints
code (``GraphModule.code``, a module's ``extra_repr``):

* the recipe: the base model (zoo name, its arguments, where the graph comes from), the
  graph in freezeray's own vocabulary (every vertex's name, kind and inputs, the module
  path it calls, and the spec of every module the surgery added), the frozen set, the
  losses, the preprocessing and the fine-tune configuration;
* the weights: every parameter and buffer, hashed by name, dtype, shape and bytes.

``frozen_fingerprint`` covers what featurization depends on: the base model, the frozen
prefix's graph and weights, and its boundary. ``fingerprint`` covers the whole model.
Two models built by different calls into the same graph with the same weights have the
same fingerprint.

A fingerprint cannot see a change of computation that keeps names and weights (a new
library version whose convolution rounds differently, a module class whose code
changed). The **probe** can: the outputs of a fixed seeded input, and the values that
feed them (a new output layer starts at zero weights, which would hide everything
before it), stored with a saved model (:func:`surgery.save`) and compared when it is
loaded, within
:data:`PROBE_TOLERANCE`: ``max|new - saved| <= atol + rtol * max|saved|`` for every
output. Float32 on the CPU, in eval mode, so the device or mode a model was in does not
matter.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any, Literal, Sequence

import torch
import torch.fx as fx

from .graph import example_input, output_node
from .recipe import ModelInfo, get_info
from .weights import WeightsError

__all__ = ["fingerprint", "frozen_fingerprint", "hash_tensors", "weights_hash", "probe", "probe_input",
           "probe_difference", "ProbeMismatch", "PROBE_TOLERANCE", "IDENTITY_SCHEME"]

IDENTITY_SCHEME = "freezeray.identity/2"  # recipe + weights + probe; /1 hashed the printed code
# a probe passes when, for every output, max|new - saved| <= atol + rtol * max|saved|
PROBE_TOLERANCE: dict[str, float] = {"rtol": 1e-3, "atol": 1e-5}

Part = Literal["model", "frozen"]


class ProbeMismatch(WeightsError):
    """A rebuilt model whose outputs on the probe input differ from the saved ones by
    more than :data:`PROBE_TOLERANCE`: it computes something else."""


def hash_tensors(h: "hashlib._Hash", state: dict[str, torch.Tensor]) -> None:
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict: every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(b"freezeray.weights/1\n")
    hash_tensors(h, state)
    return h.hexdigest()[:32]


def _base(info: ModelInfo) -> dict[str, Any]:
    """The base model as the user chose it (not where its weights were read from: the
    weights themselves are hashed)."""
    return {"name": info.name, "kwargs": info.base_kwargs, "origin": info.origin}


def _added_specs(info: ModelInfo) -> dict[str, Any]:
    """Module path -> the spec of the module the surgery added there (the last one wins)."""
    specs: dict[str, Any] = {}
    for stage in info.stages:
        for op in stage:
            if op.op in ("add_layer", "add_vertex"):
                specs[op.name] = op.spec() if op.spec() is not None else {"class": op.layer_class}
                if op.op == "add_layer" and len(op.inputs) > 1:
                    specs[f"{op.name}_merge"] = {"type": "Merge", "dim": 1}
    return specs


def _graph(gm: fx.GraphModule, info: ModelInfo) -> list[list[Any]]:
    """The graph in freezeray's vocabulary: each node's kind, name and inputs, the module
    path it calls and, for modules the surgery added, their spec."""
    specs = _added_specs(info)
    out: list[list[Any]] = []
    for n in gm.graph.nodes:
        entry: list[Any] = [n.op, n.name, [a.name for a in n.all_input_nodes]]
        if n.op in ("call_module", "get_attr"):
            target = str(n.target)
            entry.append(target)
            if target in specs:
                entry.append(specs[target])
        out.append(entry)
    return out


def _digest(tag: bytes, payload: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(tag)
    h.update(json.dumps(payload, sort_keys=True, default=str).encode())
    hash_tensors(h, state)
    return h.hexdigest()[:32]


def frozen_fingerprint(model: fx.GraphModule) -> str:
    """Hash of the frozen prefix: the base model, the prefix's graph (names, inputs,
    added modules' specs), its weights and buffers, and its boundary. Unchanged by how a
    library prints code, by the head, and by training the head."""
    from .helper import split

    info = get_info(model)
    parts = split(model)
    payload = {"base": _base(info), "graph": _graph(parts.frozen, info), "boundary": list(parts.boundary)}
    return _digest(b"freezeray.frozen/2\n", payload, parts.frozen.state_dict())


def fingerprint(model: fx.GraphModule) -> str:
    """Hash of the whole model: the base model, the graph, the frozen set, losses,
    preprocessing, fine-tune configuration, and every weight and buffer."""
    info = get_info(model)
    payload = {
        "base": _base(info),
        "graph": _graph(model, info),
        "frozen": sorted(info.frozen),
        "losses": info.losses,
        "preprocessing": info.preprocessing.to_dict(),
        "fine_tune": info.fine_tune.to_dict() if info.fine_tune else None,
    }
    return _digest(b"freezeray.model/2\n", payload, model.state_dict())


# ---------------------------------------------------------------------------------------
# the probe


def probe_input(model: fx.GraphModule) -> torch.Tensor:
    """The fixed seeded input of the probe: one image-shaped tensor of the model's input size."""
    return example_input(get_info(model).preprocessing.input_size, batch=1)


def _with_feeders(model: fx.GraphModule) -> fx.GraphModule:
    """``model`` (sharing its modules) returning its outputs, then the values that feed them."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(model.graph, env)
    out = output_node(model)
    outputs = [env[n] for n in out.all_input_nodes]
    feeders = list(dict.fromkeys(env[a] for n in out.all_input_nodes for a in n.all_input_nodes))
    graph.output(tuple(outputs + feeders))
    return fx.GraphModule(model, graph)


def probe(model: fx.GraphModule, x: torch.Tensor | None = None, part: Part = "model") -> tuple[torch.Tensor, ...]:
    """The outputs of ``model`` and the values that feed them (``part="model"``), or the
    outputs of its frozen prefix (``"frozen"``: the features), on ``x`` (default:
    :func:`probe_input`), in float32 on the CPU in eval mode, as a tuple. The model
    itself is left as it was."""
    from .helper import split

    x = probe_input(model) if x is None else x
    on_cpu = all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32)
                 for t in list(model.parameters()) + list(model.buffers()))
    runner = model if on_cpu else copy.deepcopy(model).to("cpu", torch.float32)
    runner = split(runner).frozen if part == "frozen" else _with_feeders(runner)
    was = runner.training
    runner.eval()
    try:
        with torch.no_grad():
            out = runner(x.to("cpu", torch.float32))
    finally:
        runner.train(was)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(o.detach().float().clone() for o in outs if isinstance(o, torch.Tensor))


def probe_difference(actual: Sequence[torch.Tensor], saved: Sequence[torch.Tensor],
                     tolerance: dict[str, float] | None = None) -> tuple[bool, float, float]:
    """``(within tolerance, largest difference, the largest allowed)`` of two probes."""
    tol = {**PROBE_TOLERANCE, **(tolerance or {})}
    if len(actual) != len(saved) or any(a.shape != s.shape for a, s in zip(actual, saved)):
        return False, float("inf"), 0.0
    ok, worst = True, (0.0, 0.0)
    for i, (a, s) in enumerate(zip(actual, saved)):
        diff = float((a - s).abs().max()) if a.numel() else 0.0
        allowed = tol["atol"] + tol["rtol"] * (float(s.abs().max()) if s.numel() else 0.0)
        ok = ok and diff <= allowed
        if i == 0 or diff - allowed > worst[0] - worst[1]:
            worst = (diff, allowed)
    return ok, worst[0], worst[1]
