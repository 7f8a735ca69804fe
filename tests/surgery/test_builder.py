"""TransferLearning: DL4J's three VGG16 scenarios, width propagation, vertices, order
independence, and clear errors that leave the input model unchanged."""


import pytest
import torch
from torch import nn

import surgery
from surgery import FineTuneConfiguration, TransferLearning
from surgery.layers import Dense, Output
from surgery.vertices import ElementWise, Merge, Subset

FTC = FineTuneConfiguration(updater="nesterov", lr=5e-5, momentum=0.9, seed=123)


def _snapshot(model):
    return model.code, {k: v.clone() for k, v in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_unchanged(model, snap):
    code, state, grads = snap
    assert model.code == code
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scenario_a(vgg):
    """DL4J EditLastLayerOthersFrozen: freeze to fc2, new 5-class NLL output."""
    return (TransferLearning(vgg).fine_tune_configuration(FTC).set_feature_extractor("fc2")
            .remove_vertex_keep_connections("predictions")
            .add_layer("predictions", Output(5, loss="nll", activation="softmax", weight_init="xavier"), "fc2")
            .build())


def scenario_b(vgg):
    """DL4J EditAtBottleneckOthersFrozen."""
    return (TransferLearning(vgg).fine_tune_configuration(FTC).set_feature_extractor("block5_pool")
            .n_out_replace("fc2", 1024, weight_init="xavier")
            .remove_vertex_and_connections("predictions")
            .add_layer("fc3", Dense(256, activation="tanh", weight_init="xavier"), "fc2")
            .add_layer("newpredictions", Output(5, loss="nll", activation="softmax", weight_init="xavier"), "fc3")
            .set_outputs("newpredictions")
            .build())


def test_scenario_a_edit_last_layer_others_frozen(vgg16_random):
    snap = _snapshot(vgg16_random)
    model = scenario_a(vgg16_random)
    _assert_unchanged(vgg16_random, snap)
    assert _trainable(model) == 4096 * 5 + 5
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    torch.testing.assert_close(out.sum(1), torch.ones(2))
    assert surgery.get_info(model).losses == {"predictions": "nll"}
    assert surgery.is_frozen(model, "fc2") and not surgery.is_frozen(model, "predictions")


def test_scenarios_b_and_c_bottleneck_then_fine_tune_from_block4(vgg16_random, s3_bucket, storage_options):
    model = scenario_b(vgg16_random)
    fc = 25088 * 4096 + 4096 + 4096 * 1024 + 1024 + 1024 * 256 + 256 + 256 * 5 + 5
    assert _trainable(model) == fc
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert "predictions" not in surgery.vertex_names(model)

    uri = f"s3://{s3_bucket}/models/vgg16-bottleneck"
    surgery.save(model, uri, storage_options=storage_options)
    loaded = surgery.load(uri, storage_options=storage_options)
    assert _trainable(loaded) == fc

    # (C) fine-tune from block 4: block5 becomes trainable too
    c = TransferLearning(loaded).set_feature_extractor("block4_pool").build()
    block5 = 3 * (512 * 512 * 9 + 512)
    assert _trainable(c) == fc + block5
    assert not surgery.is_frozen(c, "block5_conv1") and surgery.is_frozen(c, "block4_conv3")
    assert surgery.get_info(c).fine_tune == FTC


def test_result_does_not_depend_on_call_order(vgg16_random):
    def ops():
        return [
            lambda b: b.fine_tune_configuration(FTC),
            lambda b: b.set_feature_extractor("block5_pool"),
            lambda b: b.n_out_replace("fc2", 64, weight_init="xavier"),
            lambda b: b.remove_vertex_and_connections("predictions"),
            lambda b: b.add_layer("fc3", Dense(16, activation="tanh"), "fc2"),
            lambda b: b.add_layer("newpredictions", Output(5), "fc3"),
            lambda b: b.set_outputs("newpredictions"),
        ]

    forward = TransferLearning(vgg16_random)
    for op in ops():
        op(forward)
    backward = TransferLearning(vgg16_random)
    for op in reversed(ops()):
        op(backward)
    a, b = forward.build(), backward.build()
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert surgery.get_info(a).frozen == surgery.get_info(b).frozen


def test_n_out_replace_conv_followed_by_batchnorm(tiny_name):
    base = surgery.zoo.load(tiny_name)
    model = TransferLearning(base).n_out_replace("conv1", 5, weight_init="relu").build()
    assert model.conv1.out_channels == 5 and model.bn1.num_features == 5 and model.conv2.in_channels == 5
    assert model.conv2.out_channels == 16 and model.fc1.in_features == 64  # widths after conv2 untouched
    x = torch.randn(4, 3, 16, 16)
    model.train()
    model(x).sum().backward()
    assert model.conv1.weight.grad is not None and model.bn1.weight.grad.shape == (5,)
    # conv2 -> BN -> pool -> flatten -> fc1: the flattened width follows
    wide = TransferLearning(base).n_out_replace("conv2", 6).build()
    assert wide.bn2.num_features == 6 and wide.fc1.in_features == 6 * 4
    wide(x).sum().backward()


def test_n_out_replace_linear_feeding_two_consumers(tiny_name):
    base = surgery.zoo.load(tiny_name)
    two_heads = (TransferLearning(base)
                 .add_layer("aux", Output(3, loss="cross_entropy", activation="identity"), "fc1")
                 .set_outputs("fc2", "aux").build())
    model = TransferLearning(two_heads).n_out_replace("fc1", 7, fan_out_init="normal(0, 0.01)").build()
    assert model.fc1.out_features == 7 and model.fc2.in_features == 7 and model.aux.linear.in_features == 7
    out, aux = model(torch.randn(3, 3, 16, 16))
    assert out.shape == (3, 10) and aux.shape == (3, 3)
    (out.sum() + aux.sum()).backward()
    assert model.fc2.weight.grad.shape == (10, 7) and model.aux.linear.weight.grad.shape == (3, 7)


def test_remove_vertex_and_connections_removes_what_it_fed(tiny_name):
    base = surgery.zoo.load(tiny_name)
    model = (TransferLearning(base).remove_vertex_and_connections("fc1")
             .add_layer("head", Output(4), "flatten").set_outputs("head").build())
    names = surgery.vertex_names(model)
    assert "fc1" not in names and "fc2" not in names and "head" in names
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)


def test_keep_connections_gives_the_new_layer_the_old_inputs(tiny_name):
    base = surgery.zoo.load(tiny_name)
    model = (TransferLearning(base).remove_vertex_keep_connections("fc2")
             .add_layer("fc2", Output(6, loss="cross_entropy")).build())
    assert model.fc2.n_in == 32 and model(torch.randn(2, 3, 16, 16)).shape == (2, 6)


def test_keep_connections_without_a_replacement_is_an_error(tiny_name):
    base = surgery.zoo.load(tiny_name)
    with pytest.raises(surgery.VertexError, match="removed with remove_vertex_keep_connections and nothing took its place"):
        TransferLearning(base).remove_vertex_keep_connections("fc1").build()


def test_add_vertex_merge_elementwise_and_subset(tiny_name):
    base = surgery.zoo.load(tiny_name)
    model = (TransferLearning(base)
             .add_layer("left", Dense(8, activation="relu"), "flatten")
             .add_layer("right", Dense(8, activation="tanh"), "flatten")
             .add_vertex("sum", ElementWise("add"), "left", "right")
             .add_vertex("avg", ElementWise("mean"), "left", "right", "sum")
             .add_vertex("both", Merge(), "sum", "avg")
             .add_vertex("first", Subset(0, 5), "both", "left")
             .add_layer("head", Output(3), "first", "avg")  # two inputs: merged first (5 + 8)
             .set_outputs("head").build())
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out.shape == (2, 3) and model.head.n_in == 13
    left, _ = model.left(model.flatten(model.pool(torch.relu(model.bn2(model.conv2(
        model.drop1(torch.relu(model.bn1(model.conv1(x)))))))))), None
    assert left.shape == (2, 8)
    assert "head_merge" in surgery.vertex_names(model)


def test_shape_errors_name_both_vertices_and_shapes(vgg16_random, tiny_name):
    snap = _snapshot(vgg16_random)
    with pytest.raises(surgery.ShapeError, match=r"'fc2'.*expects 100 inputs.*'fc1' shaped \(2, 4096\)"):
        TransferLearning(vgg16_random).n_in_replace("fc2", 100).build()
    _assert_unchanged(vgg16_random, snap)

    base = surgery.zoo.load(tiny_name)
    with pytest.raises(surgery.ShapeError, match=r"'fc1'.*expects \(\*, 64\).*'flatten' shaped \(2, 12\)"):
        TransferLearning(base).add_layer("squeeze", nn.Conv2d(16, 3, 1), "bn2").remove_vertex_keep_connections("pool") \
            .add_vertex("pool", nn.AdaptiveAvgPool2d(2), "squeeze").build()


def test_width_that_breaks_a_residual_add_is_refused():
    resnet = surgery.zoo.load("resnet18")
    snap = _snapshot(resnet)
    with pytest.raises(surgery.ShapeError, match=r"'add_7'.*'layer4.1.bn2' shaped \(2, 100, 7, 7\).*'layer4.0.relu_1' shaped \(2, 512, 7, 7\)"):
        TransferLearning(resnet).n_out_replace("layer4.1.conv2", 100).build()
    _assert_unchanged(resnet, snap)


def test_unknown_vertex_lists_close_names(vgg16_random):
    with pytest.raises(surgery.VertexError, match=r"vertex 'fc_2' is not in the graph of vgg16\. Closest: fc2.*surgery.summary"):
        TransferLearning(vgg16_random).set_feature_extractor("fc_2").build()
    with pytest.raises(surgery.VertexError, match="n_out_replace needs a layer with weights"):
        TransferLearning(vgg16_random).n_out_replace("block1_pool", 3).build()


def test_bad_layer_settings_are_refused_when_made():
    with pytest.raises(ValueError, match=r"unknown loss 'hinge'; valid losses: nll, cross_entropy"):
        Output(3, loss="hinge")
    with pytest.raises(ValueError, match="loss 'bce' does not fit activation 'softmax'"):
        Output(3, loss="bce", activation="softmax")
    with pytest.raises(ValueError, match="unknown activation 'relu2'"):
        Dense(3, activation="relu2")
    with pytest.raises(ValueError, match="unknown weight_init 'glorot'"):
        Dense(3, weight_init="glorot")
    with pytest.raises(ValueError, match="n_out must be a positive integer"):
        Dense(0)


def test_new_names_must_be_free_and_plain(tiny_name):
    base = surgery.zoo.load(tiny_name)
    with pytest.raises(surgery.VertexError, match="'fc1' already exists"):
        TransferLearning(base).add_layer("fc1", Dense(3), "flatten").build()
    with pytest.raises(surgery.VertexError, match="not valid"):
        TransferLearning(base).add_layer("head.out", Dense(3), "flatten").build()
    with pytest.raises(ValueError, match="already called"):
        TransferLearning(base).set_outputs("fc1").set_outputs("fc2")


def test_weight_init_schemes_are_deterministic_with_a_seed(tiny_name):
    base = surgery.zoo.load(tiny_name)
    cfg = FineTuneConfiguration(seed=7)

    def build():
        return (TransferLearning(base).fine_tune_configuration(cfg)
                .add_layer("head", Dense(50, weight_init="normal(0, 0.5)"), "flatten").set_outputs("head").build())

    a, b = build(), build()
    assert torch.equal(a.head.linear.weight, b.head.linear.weight)
    assert abs(a.head.linear.weight.std().item() - 0.5) < 0.05


def test_repeated_removals_and_conflicting_edits(tiny_name):
    """Issue 21: a removal called twice is one removal (DL4J's tests do it); on a chain, each
    remove_output_layer() removes one more layer, as DL4J counts; edits that truly conflict
    fail naming both."""
    base = surgery.zoo.load(tiny_name)
    once = TransferLearning(base).remove_vertex_and_connections("fc2").add_layer("out", Output(3), "fc1").set_outputs("out")
    twice = (TransferLearning(base).remove_vertex_and_connections("fc2").remove_vertex_and_connections("fc2")
             .add_layer("out", Output(3), "fc1").set_outputs("out"))
    assert once.ops == twice.ops and surgery.vertex_names(once.build()) == surgery.vertex_names(twice.build())
    chain = surgery.from_module(nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 6), nn.Linear(6, 4)),
                                preprocessing={"input_size": (3, 4, 4), "crop_pct": 1.0})
    two_off = TransferLearning(chain).remove_output_layer().remove_output_layer().add_layer(Output(3)).build()
    assert surgery.vertex_names(two_off) == ["input_1", "0", "1", "2", "3"] and two_off.get_submodule("3").n_in == 8
    with pytest.raises(ValueError, match=r"n_out_replace\('fc1'\) was already called on this builder: "
                                         r"n_out_replace\('fc1', 5\) and n_out_replace\('fc1', 6\) conflict"):
        TransferLearning(base).n_out_replace("fc1", 5).n_out_replace("fc1", 6)
    with pytest.raises(surgery.VertexError, match=r"n_out_replace\('fc2', 4\) names vertex 'fc2', which "
                                                  r"remove_vertex_and_connections\('fc1'\) removes \(it is computed from 'fc1'\)"):
        TransferLearning(base).remove_vertex_and_connections("fc1").n_out_replace("fc2", 4).build()
    with pytest.raises(surgery.VertexError, match=r"vertex 'fc2' is removed twice: remove_vertex_keep_connections\('fc2'\) "
                                                  r"and remove_vertex_and_connections\('fc2'\) conflict"):
        TransferLearning(base).remove_vertex_keep_connections("fc2").remove_vertex_and_connections("fc2").build()
