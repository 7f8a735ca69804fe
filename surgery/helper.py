"""DL4J's ``TransferLearningHelper``: split a model at its frozen boundary, featurize
inputs once with the frozen part, train the rest on those features.

The split is the frozen prefix (frozen vertices whose inputs are all frozen). Its
boundary is every prefix vertex that the rest of the graph reads. With one boundary
vertex, features are one tensor; with several, a tuple ordered as the vertices appear
in the graph (``helper.boundary`` names them), and the unfrozen graph takes them as
separate arguments in that order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .builder import layer_chain
from .freeze import apply_frozen_, feature_extractor_nodes, frozen_nodes, frozen_prefix
from .graph import VertexError, vertex_of
from .recipe import get_info
from .training import loop as training
from .training.config import FineTuneConfiguration
from .training.objective import loss_specs

__all__ = ["TransferLearningHelper", "Split", "split"]

Features = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Split:
    """A model cut at its frozen boundary. Both graphs share the model's modules."""

    frozen: fx.GraphModule  # input -> boundary values
    unfrozen: fx.GraphModule  # boundary values, as separate arguments -> outputs
    boundary: tuple[str, ...]  # vertex names of the boundary, in graph order


def split(model: fx.GraphModule) -> Split:
    """Cut ``model`` into its frozen prefix and the rest (see the module docstring)."""
    prefix = frozen_prefix(model)
    nodes = list(model.graph.nodes)
    out_node = nodes[-1]
    boundary = [n for n in nodes if n in prefix and any(u not in prefix for u in n.users)]
    calls = Counter(n.target for n in nodes if n.op == "call_module")

    g1 = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in prefix:
            env[n] = g1.node_copy(n, lambda a: env[a])
    g1.output(env[boundary[0]] if len(boundary) == 1 else tuple(env[b] for b in boundary))
    frozen_gm = fx.GraphModule(model, g1, f"{type(model).__name__}_frozen")

    g2 = fx.Graph()
    env2: dict[fx.Node, fx.Node] = {}
    for b in boundary:
        env2[b] = g2.placeholder(b.name)
        env2[b].meta = dict(b.meta)
    for n in nodes:
        if n not in prefix:
            env2[n] = g2.node_copy(n, lambda a: env2[a])
    assert out_node.op == "output"
    unfrozen_gm = fx.GraphModule(model, g2, f"{type(model).__name__}_unfrozen")
    return Split(frozen_gm, unfrozen_gm, tuple(vertex_of(b, calls) for b in boundary))


def _vertex(model: fx.GraphModule, vertex: str | int) -> str:
    """A vertex name, or a layer index resolved on the model's chain (as the builder does)."""
    if isinstance(vertex, bool) or not isinstance(vertex, (str, int)):
        raise TypeError(f"a vertex is a name or (on a chain) a layer index, got {vertex!r}")
    if isinstance(vertex, str):
        return vertex
    chain = layer_chain(model)
    if not -len(chain) <= vertex < len(chain):
        raise VertexError(f"layer index {vertex} is out of range: the chain has {len(chain)} layers "
                          f"(0-{len(chain) - 1}); surgery.summary(model) numbers them")
    return chain[vertex]


class TransferLearningHelper:
    """Featurize with the frozen part of a model and train the rest on the features.

    ``TransferLearningHelper(model, *frozen_till)`` freezes ``frozen_till`` and all their
    ancestors in place (DL4J does the same); with no vertices, ``model`` must already
    have a frozen part. On a chain, a layer may be given by its index (DL4J's
    ``TransferLearningHelper(net, 1)`` freezes layers 0-1). Training updates ``model``'s
    own parameters.

    Example:
        >>> helper = TransferLearningHelper(model, "fc2")
        >>> feats = helper.featurize(images)
        >>> for _ in range(10):
        ...     helper.fit_featurized(feats, labels)
    """

    def __init__(self, model: fx.GraphModule, *frozen_till: str | int) -> None:
        get_info(model)
        if frozen_till:
            apply_frozen_(model, feature_extractor_nodes(model, [_vertex(model, v) for v in frozen_till]))
        elif not frozen_nodes(model):
            raise ValueError("the model has no frozen vertices; name the vertices to freeze: TransferLearningHelper(model, 'fc2')")
        self.model = model
        self._split = split(model)
        self._specs = loss_specs(model)
        self._optimizer: torch.optim.Optimizer | None = None

    @property
    def boundary(self) -> tuple[str, ...]:
        """Vertex names whose values are the features, in order."""
        return self._split.boundary

    def frozen_graph(self) -> fx.GraphModule:
        """Input -> features (the frozen prefix)."""
        return self._split.frozen

    def unfrozen_graph(self) -> fx.GraphModule:
        """Features -> outputs (everything after the boundary); shares the model's parameters."""
        return self._split.unfrozen

    def featurize(self, x: torch.Tensor) -> Features:
        """The frozen part's output for a batch ``x`` (one tensor, or a tuple in ``boundary`` order)."""
        with torch.no_grad():
            return self._split.frozen(x)

    def _config(self) -> FineTuneConfiguration:
        return get_info(self.model).fine_tune or FineTuneConfiguration()

    def fit_featurized(self, features: Features, labels: Any) -> float:
        """One optimizer step of the unfrozen part on ``features`` (DL4J's ``fitFeaturized``),
        the same step every freezeray trainer takes (:func:`surgery.training.train_step`).

        Args:
            features: what :meth:`featurize` returned.
            labels: one target per output (a tuple in output order, as DL4J's
                ``MultiDataSet`` labels), or one tensor every output is scored against.

        Returns:
            the batch loss before the step (the weighted sum over outputs).

        Raises:
            ValueError: targets that do not fit the outputs; nothing has changed then.
        """
        head = self._split.unfrozen
        config = self._config()
        optimizer = self._optimizer if self._optimizer is not None else config.build_optimizer(head)
        was = head.training
        head.train()
        args = features if isinstance(features, tuple) else (features,)
        try:
            loss = training.train_step(head, args, labels, optimizer, config, self._specs).loss
        except BaseException:
            head.train(was)
            raise
        self._optimizer = optimizer  # kept only once a step succeeded
        return loss

    def output_from_featurized(self, features: Features) -> Any:
        """The model's output (after activations) from features, in eval mode."""
        head = self._split.unfrozen
        was = head.training
        head.eval()
        try:
            with torch.no_grad():
                return head(*(features if isinstance(features, tuple) else (features,)))
        finally:
            head.train(was)
