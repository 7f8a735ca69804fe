"""DL4J's own transfer-learning tests, ported: the builders (``TransferLearning.GraphBuilder``
and ``TransferLearning.Builder``) and model serialization.

Ported from deeplearning4j/deeplearning4j, ``deeplearning4j-core/src/test/java/org/
deeplearning4j/nn/transferlearning/``: ``TransferLearningCompGraphTest`` (10 of 10),
``TransferLearningMLNTest`` (11 of 11) and ``TestTransferLearningModelSerializer`` (2 of 2).
The helper, ``TransferLearningComplex``, ``TestFrozenLayers``, ``FrozenLayerTest`` and
``FrozenLayerWithBackpropTest`` are in ``test_dl4j_frozen.py``. Each test names its DL4J
method; they check what DL4J checks (configurations, parameter shapes, frozen sets,
parameters after training equal to a reference model's), as freezeray states it.

How they differ from DL4J's, and why:

* DL4J's ``assertEquals(conf.toJson(), ...)`` becomes equality of the fine-tune
  configurations, of each layer's spec (``surgery.specs.describe``), of vertex names and
  parameter shapes: freezeray's configuration is the recipe, not a JSON per layer.
* ``model.fit(data)`` is one step of :func:`surgery.training.train_step` with the
  model's fine-tune configuration (``dl4j.Trainer``); one-hot labels are class indices.
* Layers DL4J has and freezeray does not are replaced by stand-ins that keep what the
  test is about: ``GravesBidirectionalLSTM`` by a convolution (testTransferGlobalPool),
  ``GravesLSTM``/``LSTM`` by ``Dense`` (testRemoveAndProcessing, the SameDiff tests),
  SameDiff attention layers and ``AttentionVertex`` by ``Dense`` and an element-wise
  vertex (the SameDiff tests). Inputs have 1 or 3 channels (a freezeray model's input
  is an image): DL4J's 2- and 6-channel inputs become 3 channels.
* DL4J's per-layer updaters (``.updater(new AdaGrad(0.5))`` on a layer) become a layer's
  own ``lr``; its per-layer gradient normalization, weight noise, constraints and
  ``BackpropType`` have no freezeray equivalent and are left out of the comparisons. In
  testRemoveAndProcessing DL4J's fine-tune configuration overrides an existing layer's
  own updater; in freezeray a layer's own ``lr`` always wins, so that layer has none.
* DL4J's invalid starting widths (testNoutChanges' ``layer1`` has ``nIn(3)`` after a
  layer with ``nOut(5)``) are made valid: freezeray builds and checks every model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from dl4j import Trainer, assert_same, classes, frozen_layers, net, rows, shapes, state
from torch import nn

import surgery
from surgery import FineTuneConfiguration, TransferLearning, TransferLearningHelper
from surgery.builder import layer_chain
from surgery.layers import Convolution, Dense, Output
from surgery.specs import describe
from surgery.vertices import ElementWise

FTC = FineTuneConfiguration


def _config(model):
    return surgery.get_info(model).fine_tune


def _train_both(a, b, x, y, steps):
    ta, tb = Trainer(a), Trainer(b)
    for _ in range(steps):
        assert ta.fit(x, y) == tb.fit(x, y)


def _feedforward(n_out0=5, n_in1=5, n_out3=3, **named):
    """DL4J's 4-layer test net: Dense(4->n_out0), Dense(->2), Dense(2->3), Output(3->n_out3), identity activations."""
    torch.manual_seed(3)
    layers = dict(layer0=Dense(n_out0, "identity", n_in=4), layer1=Dense(2, "identity", n_in=n_in1),
                  layer2=Dense(3, "identity", n_in=2), layer3=Output(n_out3, loss="mcxent", activation="softmax", n_in=3))
    layers.update(named)
    return net(n_in=4, **layers)


def _lenet(named: bool, seed: int = 123):
    """testAllWithCNN's net: conv5x5(20) - maxpool - conv5x5(50) - maxpool - dense 500 - dense 250 - output 100."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2), Dense(500, "relu"),
              Dense(250, "relu"), Output(100, loss="nll", activation="softmax", weight_init="xavier")]
    if named:
        return net(image=(3, 28), **{f"layer{i}": m for i, m in enumerate(layers)})
    return net(*layers, image=(3, 28))


# ---------------------------------------------------------------------------------------
# TransferLearningCompGraphTest


@pytest.mark.parametrize("flavour", ["graph", "chain"])
def test_simple_fine_tune_replaces_the_updater_whole(flavour):
    """TransferLearningCompGraphTest.simpleFineTune and TransferLearningMLNTest.simpleFineTune:
    a model made with Nesterovs(0.01, 0.99), given RmsProp(lr) (and l2 0.4 in the MLN test),
    trains exactly as a model made with RmsProp(lr) from the start: no momentum 0.99 left."""
    torch.manual_seed(0)
    layers = [Dense(3, "identity", n_in=4), Output(3, loss="mcxent", activation="softmax", weight_init="xavier", n_in=3)]
    base = net(n_in=4, layer0=layers[0], layer1=layers[1]) if flavour == "graph" else net(*layers, n_in=4)
    new = FTC(updater="RmsProp", lr=0.2, seed=12345) if flavour == "graph" else FTC(updater="RmsProp", lr=0.5, l2=0.4, seed=12345)
    old = TransferLearning(base).fine_tune_configuration(FTC(updater="Nesterovs", lr=0.01, momentum=0.99, seed=12345)).build()
    now = TransferLearning(old).fine_tune_configuration(new).build()
    expected = TransferLearning(base).fine_tune_configuration(new).build()
    assert _config(now).to_dict() == _config(expected).to_dict() == new.to_dict()  # DL4J: the JSON is the expected one
    optimizer = _config(now).build_optimizer(now)
    assert type(optimizer) is torch.optim.RMSprop and optimizer.param_groups[0]["momentum"] == 0.0
    assert_same(state(now), state(expected))
    x, y = rows(10, 4), classes(10, 3)
    _train_both(now, expected, x, y, 3)
    assert_same(state(now), state(expected))
    assert not torch.equal(state(now)["layer1.linear.weight" if flavour == "graph" else "1.linear.weight"],
                           state(base)["layer1.linear.weight" if flavour == "graph" else "1.linear.weight"])
    leaky = TransferLearning(base).fine_tune_configuration(new.merged(FTC(updater="rmsprop", lr=new.lr, l2=new.l2,
                                                                         momentum=0.99))).build()
    Trainer(leaky).fit(x, y), Trainer(leaky).fit(x, y)
    assert not torch.equal(state(leaky)["layer0.linear.weight" if flavour == "graph" else "0.linear.weight"],
                           state(now)["layer0.linear.weight" if flavour == "graph" else "0.linear.weight"])


def test_cg_nout_changes():
    """TransferLearningCompGraphTest.testNoutChanges: nOutReplace on the output and the first layer."""
    base = _feedforward()
    sgd = FTC(updater="sgd", lr=0.1)
    now = (TransferLearning(base).fine_tune_configuration(sgd).n_out_replace("layer3", 2, weight_init="xavier")
           .n_out_replace("layer0", 3, weight_init="normal(1, 0.1)", fan_out_init="xavier").build())
    assert (now.layer0.weight_init, now.layer1.weight_init, now.layer3.weight_init) == ("normal(1, 0.1)", "xavier", "xavier")
    assert 0.85 < float(now.layer0.linear.weight.detach().mean()) < 1.15  # drawn from N(1, 0.1)
    expected = TransferLearning(_feedforward(n_out0=3, n_in1=3, n_out3=2)).fine_tune_configuration(sgd).build()
    assert shapes(now) == shapes(expected)
    now.load_state_dict(expected.state_dict())
    _train_both(now, expected, rows(10, 4), classes(10, 2), 1)
    assert_same(state(now), state(expected))


def test_cg_remove_and_add():
    """TransferLearningCompGraphTest.testRemoveAndAdd: two width changes, then the output
    layer removed with its connections kept and added again (the width reaches the removed
    vertex's place and stops there)."""
    sgd = FTC(updater="sgd", lr=0.1)
    now = (TransferLearning(_feedforward()).fine_tune_configuration(sgd)
           .n_out_replace("layer0", 7, weight_init="xavier", fan_out_init="xavier").n_out_replace("layer2", 5, weight_init="xavier")
           .remove_vertex_keep_connections("layer3")
           .add_layer("layer3", Output(3, loss="mcxent", activation="softmax"), "layer2").build())
    expected = TransferLearning(_feedforward(n_out0=7, n_in1=7, layer2=Dense(5, "identity", n_in=2),
                                             layer3=Output(3, loss="mcxent", activation="softmax", n_in=5))).fine_tune_configuration(sgd).build()
    assert surgery.vertex_names(now) == surgery.vertex_names(expected) and shapes(now) == shapes(expected)
    now.load_state_dict(expected.state_dict())
    _train_both(now, expected, rows(10, 4), classes(10, 3), 1)
    assert_same(state(now), state(expected))


@pytest.mark.parametrize("order", ["layer5 first", "layer6 first"])
def test_cg_all_with_cnn(order):
    """TransferLearningCompGraphTest.testAllWithCNN: freeze to layer1, widen layer4, remove
    layer5 and then its consumer layer6 (issue 21, defect 1: both orders), add four layers;
    5 steps equal those of the expected architecture with layer0-1 frozen."""
    sgd = FTC(updater="sgd", lr=0.001, seed=456)
    base = _lenet(named=True)
    first, second = ("layer5", "layer6") if order == "layer5 first" else ("layer6", "layer5")
    now = (TransferLearning(base).fine_tune_configuration(sgd).set_feature_extractor("layer1")
           .n_out_replace("layer4", 600, weight_init="xavier")
           .remove_vertex_and_connections(first).remove_vertex_and_connections(second)
           .add_layer("layer5", Dense(300, "relu"), "layer4").add_layer("layer6", Dense(150, "relu"), "layer5")
           .add_layer("layer7", Dense(50, "relu"), "layer6")
           .add_layer("layer8", Output(10, loss="nll", activation="softmax"), "layer7").set_outputs("layer8").build())
    torch.manual_seed(9)
    layers = [nn.Conv2d(3, 20, 5), nn.MaxPool2d(2, 2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2, 2), Dense(600, "relu"),
              Dense(300, "relu"), Dense(150, "relu"), Dense(50, "relu"), Output(10, loss="nll", activation="softmax")]
    expected = (TransferLearning(net(image=(3, 28), **{f"layer{i}": m for i, m in enumerate(layers)}))
                .fine_tune_configuration(sgd).set_feature_extractor("layer1").build())
    assert surgery.vertex_names(now) == surgery.vertex_names(expected) and shapes(now) == shapes(expected)
    assert frozen_layers(now, [f"layer{i}" for i in range(9)]) == ["layer0", "layer1"]
    now.load_state_dict(expected.state_dict())
    start = state(now)
    x, y = torch.rand(10, 3, 28, 28, generator=torch.Generator().manual_seed(0)), classes(10, 10)
    _train_both(now, expected, x, y, 5)
    assert_same(state(now), state(expected))
    assert torch.equal(now.layer0.weight, start["layer0.weight"])  # frozen: unchanged by training
    assert not torch.equal(now.layer2.weight, start["layer2.weight"])


def test_cg_transfer_global_pool():
    """TransferLearningCompGraphTest.testTransferGlobalPool (a convolution stands in for the
    bidirectional LSTM): the output removed with its connections kept, frozen to "dense",
    a new output with its own learning rate."""
    torch.manual_seed(12345)
    g = TransferLearning(net(image=(3, 8), blstm1=nn.Conv2d(3, 10, 3), pool=nn.AdaptiveAvgPool2d(1),
                             dense=Dense(10, "identity"), out=Output(10, loss="mse", activation="identity"))) \
        .fine_tune_configuration(FTC(updater="adam", lr=0.1)).build()
    graph = (TransferLearning(g).fine_tune_configuration(FTC(updater="sgd", lr=0.01, seed=12345))
             .remove_vertex_keep_connections("out").set_feature_extractor("dense")
             .add_layer("out", Output(5, loss="mcxent", activation="softmax", weight_init="xavier", lr=0.1), "dense").build())
    assert frozen_layers(graph, ["blstm1", "dense", "out"]) == ["blstm1", "dense"] and surgery.is_frozen(graph, "pool")
    assert (graph.out.n_in, graph.out.n_out, graph.out.loss) == (10, 5, "cross_entropy")
    assert _config(graph).to_dict() == {"updater": "sgd", "lr": 0.01, "seed": 12345}  # Adam(0.1) replaced whole
    groups = _config(graph).param_groups(graph)
    assert [(g["lr"], sorted(map(id, g["params"]))) for g in groups] == [(0.1, sorted(map(id, graph.out.parameters())))]


@pytest.mark.parametrize("flavour", ["graph", "chain"])
def test_object_overrides(flavour):
    """TransferLearningCompGraphTest.testObjectOverrides and TransferLearningMLNTest.testObjectOverrides
    (DL4J issue 4368): dropout 0 and l2 0 given in the fine-tune configuration override the
    model's dropout 0.5 and l2 0.5 (weight noise and constraints have no freezeray equivalent)."""
    base = net(n_in=10, layer=Dense(10, n_in=10)) if flavour == "graph" else net(Dense(10, n_in=10), n_in=10)
    orig = TransferLearning(base).fine_tune_configuration(FTC(dropout=0.5, l2=0.5)).build()
    transfer = TransferLearning(orig).fine_tune_configuration(FTC(dropout=0.0, l2=0.0)).build()
    layer = transfer.get_submodule("layer" if flavour == "graph" else "0")
    assert (_config(transfer).dropout, _config(transfer).l2, layer.default_dropout) == (0.0, 0.0, 0.0)
    assert _config(transfer).penalty(transfer) is None
    assert orig.get_submodule("layer" if flavour == "graph" else "0").default_dropout == 0.5  # the input model is untouched
    transfer.train()
    x = rows(4, 10)
    assert torch.equal(transfer(x), transfer(x))  # no dropout left


def _subsequent(named: bool):
    layers = [nn.Conv2d(3, 10, 3), nn.Conv2d(10, 3, 1), Output(2, loss="mse", n_in=48)]
    for m in layers[:2]:
        nn.init.constant_(m.weight, 666.0)  # DL4J: ConstantDistribution(666)
    if named:
        return net(image=(3, 6), firstConv=layers[0], secondConv=layers[1], out=layers[2])
    return net(*layers, image=(3, 6))


@pytest.mark.parametrize("reverse", [False, True], ids=["in_order", "reversed"])
def test_cg_transfer_learning_subsequent(reverse):
    """TransferLearningCompGraphTest.testTransferLearningSubsequent (issue 21, defect 2):
    nOutReplace of a layer and then of its consumer; the consumer gets 7 inputs and its own
    weight init, in either call order."""
    graph = _subsequent(named=True)
    calls = [lambda b: b.n_out_replace("firstConv", 7, weight_init="constant(333)"),
             lambda b: b.n_out_replace("secondConv", 3, weight_init="constant(111)"),
             lambda b: b.remove_vertex_and_connections("out"),
             lambda b: b.add_layer("out", Output(2, loss="mse", n_in=48), "secondConv"),
             lambda b: b.set_outputs("out")]
    builder = TransferLearning(graph)
    for call in (reversed(calls) if reverse else calls):
        call(builder)
    new = builder.build()
    assert new.secondConv.in_channels == 7 and new.firstConv.out_channels == 7 and new.secondConv.out_channels == 3
    assert set(new.firstConv.weight.unique().tolist()) == {333.0} and set(new.secondConv.weight.unique().tolist()) == {111.0}
    assert new(torch.zeros(6, 3, 6, 6)).shape == (6, 2)
    assert graph.firstConv.out_channels == 10  # the input model is untouched


def test_cg_change_nout_nin():
    """TransferLearningCompGraphTest.testChangeNOutNIn (issue 21, defect 3): nOutReplace of a
    layer and nInReplace of the layer after the pooling; a width that does not arrive names
    both edits."""
    graph = net(image=(3, 4), changeNout=nn.Conv2d(3, 10, 1), pool=nn.MaxPool2d(1, 1), afterPool=nn.Conv2d(10, 7, 1),
                output=Output(2, loss="mcxent", activation="softmax"))
    new = TransferLearning(graph).n_out_replace("changeNout", 5, weight_init="xavier").n_in_replace("afterPool", 5, weight_init="xavier").build()
    assert new.changeNout.out_channels == 5 and new.afterPool.in_channels == 5 and new.afterPool.out_channels == 7
    assert new(torch.rand(1, 3, 4, 4)).shape == (1, 2)
    with pytest.raises(surgery.ShapeError, match=r"'afterPool'.*n_out_replace\('changeNout', 5\).*n_in_replace\('afterPool', 4\)"):
        TransferLearning(graph).n_out_replace("changeNout", 5).n_in_replace("afterPool", 4).build()


def _same_diff_base(vertex: bool):
    torch.manual_seed(1)
    if not vertex:
        return net(n_in=5, l0=Dense(5, "tanh", n_in=5), l1=Dense(5, "tanh", n_in=5),
                   out=Output(5, loss="mcxent", activation="softmax", weight_init="xavier", n_in=5))
    inner = net(n_in=5, l0=Dense(5, "tanh", n_in=5))
    return (TransferLearning(inner).add_vertex("l1", ElementWise("add"), "l0", "l0", "l0")
            .add_layer("out", Output(5, loss="mcxent", activation="softmax", weight_init="xavier"), "l1")
            .set_outputs("out").fine_tune_configuration(FTC(seed=2)).build())


@pytest.mark.parametrize("vertex", [False, True], ids=["layers", "vertex"])
def test_cg_same_diff_layers_graph(vertex):
    """TransferLearningCompGraphTest.testTransferLearningSameDiffLayersGraph and ...GraphVertex
    (Dense and an element-wise vertex stand in for the SameDiff attention layer and vertex):
    removeVertexAndConnections("out") called twice is one removal; the renamed output
    with the old output's parameters gives the same outputs."""
    cg = _same_diff_base(vertex)
    x = rows(2, 5)
    out = cg(x)
    cg2 = (TransferLearning(cg).remove_vertex_and_connections("out").fine_tune_configuration(FTC(updater="adam", lr=0.01))
           .remove_vertex_and_connections("out")
           .add_layer("newOut", Output(5, loss="mcxent", activation="softmax"), "l1").set_outputs("newOut").build())
    params = {k.replace("out.", "newOut.", 1) if k.startswith("out.") else k: v for k, v in state(cg).items()}
    cg2.load_state_dict(params)
    assert_same(state(cg2), params)
    assert torch.equal(cg2(x), out)


# ---------------------------------------------------------------------------------------
# TransferLearningMLNTest (layers by index)


def _chain4(n_out0=5, n_in1=5, n_out2=3, n_in3=3, n_out3=3, lr3=None):
    torch.manual_seed(5)
    return net(Dense(n_out0, "identity", n_in=4), Dense(2, "identity", n_in=n_in1), Dense(n_out2, "identity", n_in=2),
               Output(n_out3, loss="mcxent", activation="softmax", n_in=n_in3, lr=lr3), n_in=4)


def test_mln_nout_changes():
    """TransferLearningMLNTest.testNoutChanges: by index; layer 0's fan-out init reaches layer 1."""
    sgd = FTC(updater="sgd", lr=0.1)
    now = (TransferLearning(_chain4()).fine_tune_configuration(sgd).n_out_replace(3, 2, "xavier", "xavier")
           .n_out_replace(0, 3, "xavier", "normal(1, 0.1)").build())
    assert (now.get_submodule("0").weight_init, now.get_submodule("1").weight_init, now.get_submodule("3").weight_init) \
        == ("xavier", "normal(1, 0.1)", "xavier")
    expected = TransferLearning(_chain4(n_out0=3, n_in1=3, n_out3=2)).fine_tune_configuration(sgd).build()
    assert shapes(now) == shapes(expected)
    now.load_state_dict(expected.state_dict())
    _train_both(now, expected, rows(10, 4), classes(10, 2), 1)
    assert_same(state(now), state(expected))


def test_mln_remove_and_add():
    """TransferLearningMLNTest.testRemoveAndAdd: two width changes, removeOutputLayer, addLayer
    of an output with its own learning rate (DL4J: its own Sgd(0.5))."""
    sgd = FTC(updater="sgd", lr=0.1)
    now = (TransferLearning(_chain4()).fine_tune_configuration(sgd).n_out_replace(0, 7, "xavier", "xavier")
           .n_out_replace(2, 5, "xavier").remove_output_layer()
           .add_layer(Output(3, loss="mcxent", activation="softmax", lr=0.5)).build())
    expected = TransferLearning(_chain4(n_out0=7, n_in1=7, n_out2=5, n_in3=5, lr3=0.5)).fine_tune_configuration(sgd).build()
    assert surgery.vertex_names(now) == surgery.vertex_names(expected) and shapes(now) == shapes(expected)
    assert describe(now.get_submodule("3")) == describe(expected.get_submodule("3"))
    now.load_state_dict(expected.state_dict())
    _train_both(now, expected, rows(10, 4), classes(10, 3), 1)
    assert_same(state(now), state(expected))


def test_mln_remove_and_processing():
    """TransferLearningMLNTest.testRemoveAndProcessing (Dense layers stand in for the LSTMs; no
    preprocessors are needed, Dense flattens): removeLayersFromOutput(5) and five new layers
    give the expected architecture, layer by layer."""
    def layers(pool, conv_k, n3, lr3, n4, lr4):
        return [Convolution(30, kernel_size=10, stride=4, activation="relu", weight_init="relu", n_in=3),
                nn.MaxPool2d(pool, 2), Convolution(10, kernel_size=conv_k, stride=2, activation="relu", weight_init="relu"),
                Dense(50, "relu", weight_init="relu", lr=lr3), Dense(n4, "tanh", weight_init="xavier", lr=lr4),
                Output(4, loss="mcxent", activation="softmax", weight_init="xavier")]

    torch.manual_seed(1)
    expected = net(*layers(3, 3, 490, 0.5, 50, 0.6), image=(3, 130))
    torch.manual_seed(2)
    to_tweak = TransferLearning(net(*layers(5, 6, 250, 0.01, 25, None), image=(3, 130))) \
        .fine_tune_configuration(FTC(updater="rmsprop", lr=0.1, seed=12345)).build()
    now = (TransferLearning(to_tweak).fine_tune_configuration(FTC(updater="adagrad", lr=0.4, l2=0.001, seed=12345))
           .remove_layers_from_output(5).add_layer(nn.MaxPool2d(3, 2))
           .add_layer(Convolution(10, kernel_size=3, stride=2, activation="relu", weight_init="relu"))
           .add_layer(Dense(50, "relu", weight_init="relu", lr=0.5)).add_layer(Dense(50, "tanh", weight_init="xavier", lr=0.6))
           .add_layer(Output(4, loss="mcxent", activation="softmax", weight_init="xavier")).build())
    assert layer_chain(now) == [str(i) for i in range(6)]
    for i in range(6):
        assert describe(now.get_submodule(str(i))) == describe(expected.get_submodule(str(i))), i
    assert shapes(now) == shapes(expected) and now.get_submodule("3").n_in == 490
    assert _config(now).to_dict() == {"updater": "adagrad", "lr": 0.4, "l2": 0.001, "seed": 12345}


def _helper_equals_end_to_end(now, x, y, steps):
    """DL4J trains a copy of the unfrozen layers on the frozen layers' activations and
    compares: here the helper trains a copy of ``now`` on its features."""
    twin = copy.deepcopy(now)
    helper = TransferLearningHelper(twin)
    features = helper.featurize(x)
    trainer = Trainer(now)
    for _ in range(steps):
        helper.fit_featurized(features, y)
        trainer.fit(x, y)
    assert_same(state(now), state(twin), exact=False)
    return features


def test_mln_all_with_cnn():
    """TransferLearningMLNTest.testAllWithCNN: setFeatureExtractor(1), nOutReplace(4, 600),
    removeLayersFromOutput(2), four layers added; training equals training the new layers
    on the frozen layers' activations, and the frozen layer 0 keeps its parameters."""
    base = _lenet(named=False)
    now = (TransferLearning(base).fine_tune_configuration(FTC(updater="sgd", lr=0.2)).set_feature_extractor(1)
           .n_out_replace(4, 600, weight_init="xavier").remove_layers_from_output(2)
           .add_layer(Dense(300, "relu")).add_layer(Dense(150, "relu")).add_layer(Dense(50, "relu"))
           .add_layer(Output(10, loss="nll", activation="softmax")).build())
    assert layer_chain(now) == [str(i) for i in range(9)]
    assert frozen_layers(now, ["0", "2", "4", "8"]) == ["0"] and surgery.is_frozen(now, "1")
    assert shapes(now)["2.weight"] == shapes(base)["2.weight"] and shapes(now)["4.linear.weight"] == (600, 800)
    assert shapes(now)["5.linear.weight"] == (300, 600) and shapes(now)["8.linear.weight"] == (10, 50)
    x, y = torch.rand(10, 3, 28, 28, generator=torch.Generator().manual_seed(1)), classes(10, 10)
    features = _helper_equals_end_to_end(now, x, y, 3)
    with torch.no_grad():
        assert torch.equal(features, base.get_submodule("1")(base.get_submodule("0")(x)))  # DL4J's feedForwardToLayer
    assert torch.equal(now.get_submodule("0").weight, base.get_submodule("0").weight)


def test_mln_fine_tune_override():
    """TransferLearningMLNTest.testFineTuneOverride: a new Adam(2e-2) changes only the
    updater; l1, l2, activations and weight inits stay; the original model is untouched."""
    net0 = TransferLearning(net(Dense(5, "tanh", weight_init="relu", n_in=10),
                                Output(4, loss="mse", activation="sigmoid", weight_init="relu", n_in=5), n_in=10)) \
        .fine_tune_configuration(FTC(updater="adam", lr=1e-4, l1=0.1, l2=0.2)).build()
    net2 = TransferLearning(net0).fine_tune_configuration(FTC(updater="adam", lr=2e-2)).build()
    assert _config(net0).to_dict() == {"updater": "adam", "lr": 1e-4, "l1": 0.1, "l2": 0.2}
    assert _config(net2).to_dict() == {"updater": "adam", "lr": 2e-2, "l1": 0.1, "l2": 0.2}
    for model in (net0, net2):
        assert [model.get_submodule(i).activation for i in "01"] == ["tanh", "sigmoid"]
        assert [model.get_submodule(i).weight_init for i in "01"] == ["relu", "relu"]
    opt = _config(net2).build_optimizer(net2)
    assert type(opt) is torch.optim.Adam and [g["lr"] for g in opt.param_groups] == [2e-2]


def test_mln_all_with_cnn_new():
    """TransferLearningMLNTest.testAllWithCNNNew: setFeatureExtractor(1), removeLayersFromOutput(5),
    four layers appended (the first takes the 12x12x20 activations flattened)."""
    base = _lenet(named=False)
    now = (TransferLearning(base).fine_tune_configuration(FTC(updater="sgd", lr=0.2)).set_feature_extractor(1)
           .remove_layers_from_output(5).add_layer(Dense(300, "relu")).add_layer(Dense(150, "relu"))
           .add_layer(Dense(50, "relu")).add_layer(Output(10, loss="nll", activation="softmax")).build())
    assert layer_chain(now) == [str(i) for i in range(6)] and now.get_submodule("2").n_in == 12 * 12 * 20
    assert frozen_layers(now, ["0", "2", "5"]) == ["0"]
    _helper_equals_end_to_end(now, torch.rand(10, 3, 28, 28, generator=torch.Generator().manual_seed(2)), classes(10, 10), 3)
    assert torch.equal(now.get_submodule("0").weight, base.get_submodule("0").weight)


def test_mln_transfer_learning_subsequent():
    """TransferLearningMLNTest.testTransferLearningSubsequent (issue 21, defect 2): by index."""
    new = (TransferLearning(_subsequent(named=False)).fine_tune_configuration(FTC())
           .n_out_replace(0, 7, "constant(333)").n_out_replace(1, 3, "constant(111)").remove_layers_from_output(1)
           .add_layer(Output(2, loss="mse", n_in=48)).build())
    assert new.get_submodule("1").in_channels == 7 and set(new.get_submodule("1").weight.unique().tolist()) == {111.0}
    assert new(torch.zeros(6, 3, 6, 6)).shape == (6, 2)


def test_mln_change_nout_nin():
    """TransferLearningMLNTest.testChangeNOutNIn (issue 21, defect 3): by index."""
    base = net(nn.Conv2d(3, 10, 1), nn.MaxPool2d(1, 1), nn.Conv2d(10, 7, 1), Output(2, activation="softmax"), image=(3, 4))
    new = TransferLearning(base).n_out_replace(0, 5, "xavier").n_in_replace(2, 5, "xavier").build()
    assert new.get_submodule("0").out_channels == 5 and new.get_submodule("2").in_channels == 5
    assert new(torch.rand(1, 3, 4, 4)).shape == (1, 2)


def test_mln_same_diff_layers():
    """TransferLearningMLNTest.testTransferLearningSameDiffLayers (Dense layers stand in for
    the LSTM, self-attention and global pooling): the output layer replaced and given the
    old one's parameters gives the same outputs."""
    torch.manual_seed(4)
    base = TransferLearning(net(Dense(8, "tanh", n_in=4), Dense(4, "tanh"), Output(2, loss="mcxent", weight_init="xavier"),
                                n_in=4)).fine_tune_configuration(FTC(updater="adam", lr=0.01)).build()
    x = rows(3, 4)
    out = base(x)
    net2 = (TransferLearning(base).fine_tune_configuration(FTC(updater="adam", lr=0.01)).remove_layers_from_output(1)
            .add_layer(Output(2, loss="mcxent", activation="softmax")).build())
    net2.load_state_dict({**state(net2), "2.linear.weight": state(base)["2.linear.weight"],
                          "2.linear.bias": state(base)["2.linear.bias"]})
    assert_same(state(net2), state(base))
    assert torch.equal(net2(x), out)


# ---------------------------------------------------------------------------------------
# TestTransferLearningModelSerializer


@pytest.mark.parametrize("flavour", ["chain", "graph"])
def test_model_serializer_frozen_layers(flavour, tmp_path):
    """TestTransferLearningModelSerializer.testModelSerializerFrozenLayers (chain, by index)
    and ...CompGraph (by name): the frozen set survives save and load, and so do the outputs."""
    torch.manual_seed(6)
    orig = TransferLearning(net(Dense(5, "tanh", n_in=6), Dense(4, "tanh"), Dense(3, "tanh"),
                                Output(3, loss="mcxent", activation="softmax", weight_init="xavier"), n_in=6)) \
        .fine_tune_configuration(FTC(updater="sgd", lr=0.1, dropout=0.5)).build()
    builder = TransferLearning(orig).fine_tune_configuration(FTC(updater="sgd", lr=0.1))
    with_frozen = (builder.set_feature_extractor(1) if flavour == "chain" else builder.set_feature_extractor("1")).build()
    assert frozen_layers(with_frozen, "0123") == ["0", "1"]
    surgery.save(with_frozen, str(tmp_path / "m"))
    restored = surgery.load(str(tmp_path / "m"))
    assert frozen_layers(restored, "0123") == ["0", "1"]
    x = rows(3, 6)
    with torch.no_grad():
        assert torch.equal(with_frozen.eval()(x), restored.eval()(x))
        restored.train()  # train mode: dropout only where the model trains; the frozen part runs as in inference
        frozen = surgery.split(restored).frozen
        assert torch.equal(frozen(x), surgery.split(with_frozen.eval()).frozen(x)) and restored(x).shape == (3, 3)
    assert restored.get_submodule("2").default_dropout == 0.5 and restored.get_submodule("0").default_dropout == 0.0
