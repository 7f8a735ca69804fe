"""DL4J's own tests of frozen layers and the transfer-learning helper, ported.

Ported from deeplearning4j/deeplearning4j, ``deeplearning4j-core/src/test/java/org/
deeplearning4j/nn/``: ``transferlearning/TransferLearningHelperTest`` (3 of 3),
``transferlearning/TransferLearningComplex`` (4 of 4), ``transferlearning/TestFrozenLayers``
(2 of 2), ``layers/FrozenLayerTest`` (6 of 6) and ``layers/FrozenLayerWithBackpropTest``
(6 of 6). The builder tests are in ``test_dl4j.py``, whose docstring says how the ports
differ from DL4J's in general. Here also:

* DL4J's graphs with two inputs (``inCentre``, ``inRight``) take one row whose first and
  last values are the two inputs (a freezeray model has one input). The helper's
  unfrozen graph then reads the input row where DL4J's reads ``inRight``: its boundary
  is ``(flatten, denseCentre1, denseCentre2)`` where DL4J's inputs are
  ``(denseCentre1, denseCentre2, inRight)``.
* ``FrozenLayer`` is ``set_feature_extractor`` (a vertex and everything before it) and
  ``FrozenLayerWithBackprop`` is ``freeze`` (just those vertices; gradients still flow
  through them). ``setLayerAsFrozen`` is ``surgery.freeze_``. DL4J's frozen-layer JSON
  is freezeray's recipe (``surgery.recipe_of``, ``surgery.save``/``load``).
* ``ConvolutionMode.Same`` pooling with a 2x2 kernel and stride 1 (TestFrozenLayers) is
  a plain 2x2 max pooling: what is tested is which parameters training changes.
* Vertex names with ``-`` (``B1-0``) become ``B1_0``: vertex names are identifiers.
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from dl4j import Trainer, assert_same, classes, frozen_layers, graph, net, rows, rows_config, state, values
from torch import nn

import surgery
from surgery import FineTuneConfiguration, TransferLearning, TransferLearningHelper
from surgery.builder import layer_chain
from surgery.layers import Dense, Output
from surgery.training.objective import loss_specs
from surgery.vertices import Merge, Subset

FTC = FineTuneConfiguration


def _identity(n_out: int, n_in: int) -> Dense:
    return Dense(n_out, "identity", n_in=n_in)


def _mse(n_out: int, n_in: int, activation: str = "identity") -> Output:
    return Output(n_out, loss="mse", activation=activation, weight_init="xavier", n_in=n_in)


# ---------------------------------------------------------------------------------------
# TransferLearningHelperTest


class CentreRight(nn.Module):
    """TransferLearningHelperTest's graph: inCentre (values 0-9) and inRight (10-11)."""

    def __init__(self) -> None:
        super().__init__()
        self.denseCentre0, self.denseCentre1 = _identity(9, 10), _identity(8, 9)
        self.denseCentre2, self.denseCentre3 = _identity(7, 8), _identity(7, 7)
        self.outCentre = _mse(4, 7)
        self.subsetLeft = Subset(0, 4)  # DL4J's SubsetVertex(0, 3) is inclusive
        self.denseLeft0, self.outLeft = _identity(5, 4), _mse(6, 5)
        self.denseRight, self.denseRight0 = _identity(7, 7), _identity(3, 2)
        self.mergeRight = Merge()
        self.denseRight1, self.outRight = _identity(5, 10), _mse(5, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.flatten(1)
        in_centre, in_right = x[:, :10], x[:, 10:]
        c1 = self.denseCentre1(self.denseCentre0(in_centre))
        c2 = self.denseCentre2(c1)
        out_left = self.outLeft(self.denseLeft0(self.subsetLeft(c1)))
        out_centre = self.outCentre(self.denseCentre3(c2))
        out_right = self.outRight(self.denseRight1(self.mergeRight(self.denseRight(c2), self.denseRight0(in_right))))
        return out_left, out_centre, out_right


def _centre_right(lr: float):
    torch.manual_seed(124)
    return TransferLearning(graph(CentreRight(), 12, losses=None)).fine_tune_configuration(FTC(updater="sgd", lr=lr)).build()


def test_helper_unfrozen_subset():
    """TransferLearningHelperTest.tesUnfrozenSubset: the unfrozen graph of a three-output
    graph frozen to denseCentre2 takes the boundary values and holds exactly the rest."""
    model = _centre_right(0.1)
    helper = TransferLearningHelper(model, "denseCentre2")
    assert helper.boundary == ("flatten", "denseCentre1", "denseCentre2")
    unfrozen = helper.unfrozen_graph()
    assert len([n for n in unfrozen.graph.nodes if n.op == "placeholder"]) == 3  # DL4J: three inputs, in this order
    assert {str(n.target) for n in unfrozen.graph.nodes if n.op == "call_module"} == {
        "denseCentre3", "outCentre", "subsetLeft", "denseLeft0", "outLeft", "denseRight", "denseRight0", "mergeRight",
        "denseRight1", "outRight"}
    x = rows(10, 12)
    for a, b in zip(helper.output_from_featurized(helper.featurize(x)), model.eval()(x)):
        assert torch.equal(a, b)


def test_helper_fit_unfrozen_three_outputs():
    """TransferLearningHelperTest.testFitUnFrozen (issue 21, defect 4): a graph with three
    outputs; a step on its features with a target per output equals a step of the frozen
    model end to end, layer by layer. A step whose targets do not fit changes nothing."""
    model = _centre_right(0.9)
    identical = surgery.freeze_(copy.deepcopy(model), "denseCentre0", "denseCentre1", "denseCentre2")
    helper = TransferLearningHelper(model, "denseCentre2")
    x = rows(10, 12)
    targets = (values(10, 6), values(10, 4), values(10, 5))  # outLeft, outCentre, outRight
    features = helper.featurize(x)
    assert_same(state(identical), state(model))
    before = state(model)
    with pytest.raises(ValueError, match=r"3 outputs \(outLeft, outCentre, outRight\); got 2 targets"):
        helper.fit_featurized(features, targets[:2])
    with pytest.raises(ValueError, match=r"output 'outLeft' \(mse\) is shaped \(10, 6\), but its target is shaped \(10, 5\)"):
        helper.fit_featurized(features, targets[::-1])
    assert_same(state(model), before)
    loss = helper.fit_featurized(features, targets)
    reference = Trainer(identical)
    assert reference.fit(x, targets) == pytest.approx(loss, rel=1e-6)
    assert_same(state(identical), state(model), exact=False)
    for name in ("denseCentre0", "denseCentre1", "denseCentre2"):
        assert torch.equal(model.get_submodule(name).linear.weight, before[f"{name}.linear.weight"])
    for name in ("denseCentre3", "outCentre", "denseRight", "denseRight0", "denseRight1", "outRight", "denseLeft0", "outLeft"):
        assert not torch.equal(model.get_submodule(name).linear.weight, before[f"{name}.linear.weight"]), name


def test_helper_mln():
    """TransferLearningHelperTest.testMLN: the helper on a chain by index (TransferLearningHelper(net, 1));
    its features are layers 0-1's activations; training on them equals training the last
    two layers alone on those activations, and the model frozen by the builder end to end."""
    sgd = FTC(updater="sgd", lr=0.1)
    torch.manual_seed(7)
    base = TransferLearning(net(_identity(3, 4), _identity(2, 3), _identity(3, 2),
                                Output(3, loss="mcxent", activation="softmax", weight_init="xavier", n_in=3), n_in=4)) \
        .fine_tune_configuration(sgd).build()
    model_now = TransferLearning(base).set_feature_extractor(1).build()
    tuned = copy.deepcopy(base)
    helper = TransferLearningHelper(tuned, 1)
    assert helper.boundary == ("1",) and frozen_layers(tuned, "0123") == ["0", "1"]
    not_frozen = TransferLearning(net(_identity(3, 2), Output(3, loss="mcxent", activation="softmax", n_in=3), n_in=2)) \
        .fine_tune_configuration(sgd).build()
    not_frozen.load_state_dict({k.replace("2.", "0.", 1).replace("3.", "1.", 1): v for k, v in state(base).items()
                                if k[0] in "23"})
    x, y = rows(10, 4), classes(10, 3)
    with torch.no_grad():
        as_frozen = base.get_submodule("1")(base.get_submodule("0")(x))
    assert torch.equal(helper.featurize(x), as_frozen)
    t_not_frozen, t_now = Trainer(not_frozen), Trainer(model_now)
    for _ in range(5):
        t_not_frozen.fit(as_frozen.reshape(10, 1, 1, 2), y)
        helper.fit_featurized(helper.featurize(x), y)
        t_now.fit(x, y)
    expected = {**{k: v for k, v in state(base).items() if k[0] in "01"},
                **{k.replace("0.", "2.", 1).replace("1.", "3.", 1): v for k, v in state(not_frozen).items()}}
    assert_same(state(model_now), expected, exact=False)
    assert_same(state(tuned), expected, exact=False)


# ---------------------------------------------------------------------------------------
# TransferLearningComplex


class MergeAndFreeze(nn.Module):
    """in1 (values 0-9) -> A -> B -> merge; in2 (10-16) -> C -> merge -> D -> out."""

    def __init__(self) -> None:
        super().__init__()
        self.A, self.B, self.C = Dense(9, "leaky_relu", n_in=10), Dense(8, "leaky_relu", n_in=9), Dense(6, "leaky_relu", n_in=7)
        self.merge = Merge()
        self.D = Dense(5, "leaky_relu", n_in=14)  # DL4J writes nIn(8 + 7) for C's 6 outputs; 8 + 6 arrive
        self.out = Output(4, loss="mse", activation="leaky_relu", n_in=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        in1, in2 = x[:, :10], x[:, 10:]
        return self.out(self.D(self.merge(self.B(self.A(in1)), self.C(in2))))


def test_complex_merge_and_freeze():
    """TransferLearningComplex.testMergeAndFreeze: freezing C (on the second input) freezes
    nothing on the first input's path; the new updater reaches every layer, activations stay."""
    base = TransferLearning(graph(MergeAndFreeze(), 17)).fine_tune_configuration(FTC(updater="adam", lr=1e-4)).build()
    graph2 = TransferLearning(base).fine_tune_configuration(FTC(updater="adam", lr=2e-2)).set_feature_extractor("C").build()
    assert frozen_layers(graph2, ["A", "B", "C", "D", "out"]) == ["C"]
    assert surgery.get_info(graph2).fine_tune.to_dict() == {"updater": "adam", "lr": 2e-2}
    assert all(graph2.get_submodule(v).activation == "leaky_relu" for v in ("A", "B", "C", "D", "out"))
    opt = surgery.get_info(graph2).fine_tune.build_optimizer(graph2)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for v in ("A", "B", "D", "out") for p in graph2.get_submodule(v).parameters()}


class CentreRightMerge(nn.Module):
    """inCentre (values 0-1) -> denseCentre0 -> merge <- denseRight0 <- inRight (the rest);
    merge -> outRight, and (``centre_output``) denseCentre0 -> outCentre."""

    def __init__(self, right: int, centre_output: bool) -> None:
        super().__init__()
        self.denseCentre0, self.denseRight0 = _identity(2, 2), _identity(2, right)
        self.mergeRight = Merge()
        self.outRight = _mse(2, 4)
        self.outCentre = _mse(2, 2) if centre_output else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        centre = self.denseCentre0(x[:, :2])
        out_right = self.outRight(self.mergeRight(centre, self.denseRight0(x[:, 2:])))
        if self.outCentre is None:
            return out_right
        return self.outCentre(centre), out_right


def _merge_graph(right: int, centre_output: bool):
    torch.manual_seed(11)
    return TransferLearning(graph(CentreRightMerge(right, centre_output), 2 + right)) \
        .fine_tune_configuration(FTC(updater="sgd", lr=0.9)).build()


def test_complex_simpler_merge_back_prop():
    """TransferLearningComplex.testSimplerMergeBackProp: denseCentre0 frozen in place
    (setLayerAsFrozen) and by the builder (setFeatureExtractor) train alike, and alike to
    the unfrozen graph on denseCentre0's activations; the frozen activations never change."""
    model_to_tune = _merge_graph(2, centre_output=False)
    other = TransferLearningHelper(copy.deepcopy(model_to_tune), "denseCentre0")  # DL4J's modelOther
    surgery.freeze_(model_to_tune, "denseCentre0")
    model_now = TransferLearning(model_to_tune).set_feature_extractor("denseCentre0").build()
    x, y = rows(2, 4), values(2, 2)
    features = other.featurize(x)
    with torch.no_grad():
        assert torch.equal(other.output_from_featurized(features), model_now.eval()(x))
        frozen_out = model_now.denseCentre0(x.flatten(1)[:, :2])
    t_tune, t_now = Trainer(model_to_tune), Trainer(model_now)
    for _ in range(5):
        other.fit_featurized(features, y)
        t_tune.fit(x, y)
        t_now.fit(x, y)
        with torch.no_grad():
            assert torch.equal(model_now.denseCentre0(x.flatten(1)[:, :2]), frozen_out)
            assert torch.equal(model_to_tune.denseCentre0(x.flatten(1)[:, :2]), frozen_out)
        for name in ("denseRight0", "outRight"):
            for k in ("linear.weight", "linear.bias"):
                key = f"{name}.{k}"
                torch.testing.assert_close(state(model_now)[key], state(other.model)[key], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(state(model_to_tune)[key], state(other.model)[key], rtol=1e-5, atol=1e-6)


def test_complex_less_simple_merge_back_prop():
    """TransferLearningComplex.testLessSimpleMergeBackProp (issue 21, defect 4): two outputs,
    one on the frozen vertex; frozen in place and by the builder, both train alike with a
    target per output, and the frozen activations never change."""
    model_to_tune = _merge_graph(3, centre_output=True)
    surgery.freeze_(model_to_tune, "denseCentre0")
    model_now = TransferLearning(model_to_tune).set_feature_extractor("denseCentre0").build()
    assert frozen_layers(model_now, ["denseCentre0", "denseRight0", "outRight", "outCentre"]) == ["denseCentre0"]
    x, y = rows(2, 5), (values(2, 2), values(2, 2))
    with torch.no_grad():
        frozen_out = model_now.denseCentre0(x.flatten(1)[:, :2])
    start = state(model_now)
    t_tune, t_now = Trainer(model_to_tune), Trainer(model_now)
    for _ in range(5):
        assert t_tune.fit(x, y) == t_now.fit(x, y)
        with torch.no_grad():
            assert torch.equal(model_now.denseCentre0(x.flatten(1)[:, :2]), frozen_out)
        assert_same(state(model_to_tune), state(model_now))
    for name in ("denseRight0", "outRight", "outCentre"):
        assert not torch.equal(state(model_now)[f"{name}.linear.weight"], start[f"{name}.linear.weight"]), name


def test_complex_add_output():
    """TransferLearningComplex.testAddOutput (issue 21, defect 4): a second output added and
    both set as outputs; the model trains on a target per output, a step with the targets
    in the wrong order fails and changes nothing, and the summary lists both outputs."""
    model_to_tune = _merge_graph(2, centre_output=False)
    model_now = (TransferLearning(model_to_tune)
                 .add_layer("outCentre", Output(3, loss="mse", weight_init="xavier"), "denseCentre0")
                 .set_outputs("outRight", "outCentre").build())
    assert [s.vertex for s in loss_specs(model_now)] == ["outRight", "outCentre"]
    x = rows(2, 4)
    out_right, out_centre = model_now(x)
    assert out_right.shape == (2, 2) and out_centre.shape == (2, 3)
    trainer = Trainer(model_now)
    before = state(model_now)
    with pytest.raises(ValueError, match=r"output 'outRight' \(mse\) is shaped \(2, 2\), but its target is shaped \(2, 3\)"):
        trainer.fit(x, (values(2, 3), values(2, 2)))
    assert_same(state(model_now), before)
    trainer.fit(x, (values(2, 2), values(2, 3)))
    changed = {k for k, v in state(model_now).items() if not torch.equal(v, before[k])}
    assert changed == set(before)  # nothing is frozen: every parameter moved
    rows_ = {r.vertex for r in surgery.summary(model_now).rows}
    assert {"outRight", "outCentre"} <= rows_


# ---------------------------------------------------------------------------------------
# TestFrozenLayers


def _original(named: bool):
    torch.manual_seed(12345)
    layers = [nn.Conv2d(1, 3, 2, padding="same"), nn.MaxPool2d(2, 1), nn.Conv2d(3, 3, 2, padding="same"), Dense(64, "tanh"),
              Dense(64, "tanh", n_in=64), Output(10, loss="mse", activation="tanh", weight_init="xavier", n_in=64)]
    if named:
        return net(image=(1, 28), **{str(i): m for i, m in enumerate(layers)})
    return net(*layers, image=(1, 28))


@pytest.mark.parametrize("flavour", ["chain", "graph"])
@pytest.mark.parametrize("l1,l2", [(0.0, 0.0), (0.0, 0.4), (0.3, 0.0), (0.3, 0.4)])
def test_frozen_layers_keep_their_parameters(flavour, l1, l2):
    """TestFrozenLayers.testFrozenMLN (chain, by index) and testFrozenCG (by name): frozen to
    layer 4, a new MAE output; 20 steps with every l1/l2 change only the new output."""
    orig = _original(named=flavour == "graph")
    builder = TransferLearning(orig).fine_tune_configuration(FTC(updater="sgd", lr=0.5, l1=l1, l2=l2))
    new_output = Output(10, loss="mae", weight_init="xavier", n_in=64)
    if flavour == "chain":
        transfer = builder.set_feature_extractor(4).remove_output_layer().add_layer(new_output).build()
    else:
        transfer = (builder.set_feature_extractor("4").remove_vertex_and_connections("5").add_layer("5", new_output, "4")
                    .set_outputs("5").build())
    assert len(layer_chain(transfer)) == 6
    assert frozen_layers(transfer, [str(i) for i in range(6)]) == ["0", "1", "2", "3", "4"]
    before = state(transfer)
    trainer = Trainer(transfer)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        trainer.fit(torch.rand(16, 1, 28, 28, generator=g), torch.rand(16, 10, generator=g))
    for key, value in state(transfer).items():
        if key.startswith("5."):
            assert not torch.equal(value, before[key]), key
        else:
            assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------------------------------
# FrozenLayerTest


def _four(named: bool, seed: int = 13):
    torch.manual_seed(seed)
    layers = [_identity(3, 4), _identity(2, 3), _identity(3, 2), Output(3, loss="mcxent", activation="softmax", weight_init="xavier", n_in=3)]
    base = net(n_in=4, **{f"layer{i}": m for i, m in enumerate(layers)}) if named else net(*layers, n_in=4)
    return TransferLearning(base).fine_tune_configuration(FTC(updater="sgd", lr=0.1)).build()


def _names(named: bool) -> list[str]:
    return [f"layer{i}" if named else str(i) for i in range(4)]


@pytest.mark.parametrize("clone", [False, True], ids=["frozen", "clone"])
@pytest.mark.parametrize("named", [False, True], ids=["mln", "comp_graph"])
def test_frozen_equals_training_the_rest_on_features(named, clone):
    """FrozenLayerTest.testFrozen, cloneMLNFrozen, testFrozenCompGraph, cloneCompGraphFrozen:
    a model frozen to layer 1 computes and trains as the last two layers alone on layer 1's
    activations; a copy of it (DL4J's clone) has the same recipe, parameters and training."""
    base = _four(named)
    names = _names(named)
    model_now = TransferLearning(base).set_feature_extractor(names[1]).build()
    models = [model_now]
    if clone:
        cloned = copy.deepcopy(model_now)
        assert surgery.recipe_of(cloned) == surgery.recipe_of(model_now)  # DL4J: the JSON
        assert_same(state(cloned), state(model_now))
        assert frozen_layers(cloned, names) == names[:2]
        models.append(cloned)
    not_frozen = TransferLearning(net(_identity(3, 2), Output(3, loss="mcxent", activation="softmax", n_in=3), n_in=2)) \
        .fine_tune_configuration(FTC(updater="sgd", lr=0.1)).build()
    rename = {names[2]: "0", names[3]: "1"}
    not_frozen.load_state_dict({rename[k.split(".")[0]] + k[k.index("."):]: v for k, v in state(base).items()
                                if k.split(".")[0] in rename})
    x, y = rows(10, 4), classes(10, 3)
    with torch.no_grad():
        features = base.get_submodule(names[1])(base.get_submodule(names[0])(x)).reshape(10, 1, 1, 2)
        assert torch.equal(model_now.eval()(x), not_frozen.eval()(features))
    trainers = [Trainer(m) for m in [not_frozen, *models]]
    for _ in range(5):
        for t, data in zip(trainers, [features] + [x] * len(models)):
            t.fit(data, y)
    back = {v: k for k, v in rename.items()}
    expected = {**{k: v for k, v in state(base).items() if k.split(".")[0] in names[:2]},
                **{back[k.split(".")[0]] + k[k.index("."):]: v for k, v in state(not_frozen).items()}}
    for m in models:
        assert_same(state(m), expected, exact=False)


@pytest.mark.parametrize("freezing", ["feature_extractor", "with_backprop"])
@pytest.mark.parametrize("named", [False, True], ids=["mln", "comp_graph"])
def test_frozen_layer_instantiation(named, freezing, tmp_path):
    """FrozenLayerTest.testFrozenLayerInstantiation / ...CompGraph and FrozenLayerWithBackpropTest.
    testFrozenWithBackpropLayerInstantiation / testFrozenLayerInstantiationCompGraph: a model
    with frozen layers 0-1 (FrozenLayer: set_feature_extractor; FrozenLayerWithBackprop:
    freeze) starts from the same parameters as the unfrozen one, and its recipe (DL4J's
    JSON) round-trips: the model rebuilt from it gives the same outputs and frozen set."""
    names = [f"l{i}" if named else str(i) for i in range(3)]

    def layers():
        return [Dense(10, "tanh", weight_init="xavier", n_in=10), Dense(10, "tanh", weight_init="xavier", n_in=10),
                Output(10, loss="mcxent", activation="softmax", n_in=10)]

    def module():
        torch.manual_seed(12345)
        return nn.Sequential(OrderedDict(zip(names, layers()))) if named else nn.Sequential(*layers())

    def build():
        return surgery.from_module(module(), preprocessing=rows_config(10))

    net1 = build()
    b = TransferLearning(build())
    by = names[1] if named else 1
    net2 = (b.set_feature_extractor(by) if freezing == "feature_extractor" else b.freeze(by, names[0] if named else 0)).build()
    assert_same(state(net1), state(net2))
    assert frozen_layers(net2, names) == names[:2]
    recipe = surgery.recipe_of(net2)
    assert json.loads(json.dumps(recipe)) == recipe
    surgery.save(net2, str(tmp_path / "net"))
    net3 = surgery.load(str(tmp_path / "net"), base=module() if named else None)  # named: code, rebuilt from base=
    assert surgery.recipe_of(net3) == recipe and frozen_layers(net3, names) == names[:2]
    x = rows(10, 10)
    with torch.no_grad():
        assert torch.equal(net2.eval()(x), net3.eval()(x))


# ---------------------------------------------------------------------------------------
# FrozenLayerWithBackpropTest


def _backprop_chain(frozen: bool):
    """Layer 0 trains; layers 1-3 are frozen with backprop (or, ``frozen=False``, have learning rate 0)."""
    lr = None if frozen else 0.0
    torch.manual_seed(12345)
    layers = [Dense(3, "sigmoid", n_in=4), Dense(4, "sigmoid", n_in=3, lr=lr), Dense(2, "sigmoid", n_in=4, lr=lr),
              Output(1, loss="mse", activation="tanh", weight_init="xavier", n_in=2, lr=lr)]
    builder = TransferLearning(net(*layers, n_in=4)).fine_tune_configuration(FTC(updater="sgd", lr=2.0))
    return (builder.freeze(1, 2, 3) if frozen else builder).build()


class Branches(nn.Module):
    """FrozenLayerWithBackpropTest's graph: initial -> B1_0 -> B1_1 -> B1_2 -> merge;
    initial -> B2_0 -> B2_1 -> B2_Output -> merge; merge -> B1_Output."""

    def __init__(self, lr: float | None) -> None:
        super().__init__()
        self.initial, self.B1_0 = Dense(4, "sigmoid", n_in=4), Dense(3, "sigmoid", n_in=4)
        self.B1_1, self.B1_2 = Dense(4, "sigmoid", n_in=3, lr=lr), Dense(2, "sigmoid", n_in=4, lr=lr)
        self.B2_0, self.B2_1, self.B2_Output = Dense(4, "sigmoid", n_in=4), Dense(2, "sigmoid", n_in=4), Dense(1, "sigmoid", n_in=2)
        self.merge = Merge()
        self.B1_Output = Output(1, loss="mse", activation="tanh", weight_init="xavier", n_in=3, lr=lr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.initial(x)
        b1 = self.B1_2(self.B1_1(self.B1_0(i)))
        b2 = self.B2_Output(self.B2_1(self.B2_0(i)))
        return self.B1_Output(self.merge(b1, b2))


def _backprop_graph(frozen: bool):
    torch.manual_seed(12345)
    builder = TransferLearning(graph(Branches(None if frozen else 0.0), 4)).fine_tune_configuration(FTC(updater="sgd", lr=2.0))
    return (builder.freeze("B1_1", "B1_2", "B1_Output") if frozen else builder).build()


_FROZEN_WITH_BACKPROP = {"chain": (["1", "2", "3"], "0"), "graph": (["B1_1", "B1_2", "B1_Output"], "B1_0")}


@pytest.mark.parametrize("flavour", ["chain", "graph"])
def test_frozen_with_backprop_params_after_backprop(flavour):
    """FrozenLayerWithBackpropTest.testMultiLayerNetworkFrozenLayerParamsAfterBackprop and
    testComputationGraphFrozenLayerParamsAfterBackprop: layers frozen after a trainable
    one (``freeze``, not their ancestors) keep their parameters through 100 steps, while
    the gradient still reaches the trainable layer before them."""
    model = _backprop_chain(frozen=True) if flavour == "chain" else _backprop_graph(frozen=True)
    frozen, trainable = _FROZEN_WITH_BACKPROP[flavour]
    assert frozen_layers(model, frozen + [trainable]) == frozen
    before = state(model)
    trainer = Trainer(model)
    x, y = rows(100, 4), values(100, 1)
    for _ in range(100):
        trainer.fit(x, y)
    assert not torch.equal(model.get_submodule(trainable).linear.weight, before[f"{trainable}.linear.weight"])
    for name in frozen:
        assert torch.equal(model.get_submodule(name).linear.weight, before[f"{name}.linear.weight"]), name
        assert torch.equal(model.get_submodule(name).linear.bias, before[f"{name}.linear.bias"]), name


@pytest.mark.parametrize("flavour", ["chain", "graph"])
def test_frozen_with_backprop_equals_learning_rate_zero(flavour):
    """FrozenLayerWithBackpropTest.testFrozenLayerVsSgd and testComputationGraphVsSgd: layers
    frozen with backprop train exactly as the same layers with learning rate 0."""
    build = _backprop_chain if flavour == "chain" else _backprop_graph
    frozen, sgd0 = build(frozen=True), build(frozen=False)
    assert_same(state(frozen), state(sgd0))
    x, y = rows(100, 4), values(100, 1)
    t_frozen, t_sgd = Trainer(frozen), Trainer(sgd0)
    for _ in range(100):
        t_frozen.fit(x, y)
        t_sgd.fit(x, y)
    assert_same(state(frozen), state(sgd0))
    trainable = _FROZEN_WITH_BACKPROP[flavour][1]
    assert not torch.equal(state(frozen)[f"{trainable}.linear.weight"], state(build(frozen=True))[f"{trainable}.linear.weight"])
