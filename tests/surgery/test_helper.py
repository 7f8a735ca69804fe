"""TransferLearningHelper: featurize once, train the head on features; the same
computation as training the frozen model end to end."""

import copy

import torch

import surgery
from surgery import FineTuneConfiguration, TransferLearning, TransferLearningHelper
from surgery.layers import Dense, Output, emit_logits


def _model(tiny_name, cfg):
    base = surgery.zoo.load(tiny_name)
    return (TransferLearning(base).fine_tune_configuration(cfg).set_feature_extractor("flatten")
            .remove_vertex_and_connections("fc1")
            .add_layer("hidden", Dense(12, activation="tanh"), "flatten")
            .add_layer("out", Output(4, loss="nll"), "hidden").set_outputs("out").build())


def test_fit_featurized_equals_end_to_end_training(tiny_name):
    cfg = FineTuneConfiguration(updater="nesterov", lr=0.1, momentum=0.9, weight_decay=1e-3, l2=1e-3, seed=5)
    torch.manual_seed(0)
    xs = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    ys = [torch.randint(0, 4, (8,)) for _ in range(4)]
    model = _model(tiny_name, cfg)
    end_to_end = copy.deepcopy(model)

    helper = TransferLearningHelper(model)
    assert helper.boundary == ("flatten",)
    feats = [helper.featurize(x) for x in xs]
    for f, y in zip(feats, ys):
        helper.fit_featurized(f, y)

    opt = cfg.build_optimizer(end_to_end)
    specs = surgery.loss_specs(end_to_end)
    end_to_end.train()  # frozen BatchNorm and dropout must still behave as in inference
    for x, y in zip(xs, ys):
        with emit_logits(end_to_end):
            loss = surgery.objective(specs, end_to_end(x), y) + cfg.penalty(end_to_end)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name in ("hidden.linear.weight", "hidden.linear.bias", "out.linear.weight", "out.linear.bias"):
        torch.testing.assert_close(model.state_dict()[name], end_to_end.state_dict()[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.state_dict()["out.linear.weight"], _model(tiny_name, cfg).state_dict()["out.linear.weight"])
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(helper.output_from_featurized(helper.featurize(x)), model.eval()(x))


def test_several_frozen_vertices_feed_the_head_in_graph_order(tiny_name):
    base = surgery.zoo.load(tiny_name)
    model = (TransferLearning(base).set_feature_extractor("flatten", "bn1")
             .add_vertex("pool1", torch.nn.AdaptiveAvgPool2d(1), "bn1")
             .add_vertex("flat1", torch.nn.Flatten(), "pool1")
             .add_layer("head", Output(3), "flat1", "flatten").set_outputs("head").build())
    helper = TransferLearningHelper(model)
    assert helper.boundary == ("bn1", "flatten")
    x = torch.randn(2, 3, 16, 16)
    feats = helper.featurize(x)
    assert isinstance(feats, tuple) and feats[0].shape == (2, 8, 16, 16) and feats[1].shape == (2, 64)
    torch.testing.assert_close(helper.output_from_featurized(feats), model.eval()(x))
    assert helper.unfrozen_graph()(*feats).shape == (2, 3)


def test_helper_freezes_in_place_when_given_vertices(tiny_name):
    model = surgery.zoo.load(tiny_name)
    helper = TransferLearningHelper(model, "fc1")
    assert surgery.is_frozen(model, "fc1") and not model.fc1.weight.requires_grad
    assert helper.featurize(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    assert helper.frozen_graph().fc1 is model.fc1 and helper.unfrozen_graph().fc2 is model.fc2
