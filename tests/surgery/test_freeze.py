"""Frozen means frozen: no gradients, no optimizer state, no decay or L1/L2, BatchNorm
statistics and dropout fixed, even in training mode."""

import pytest
import torch

import surgery
from surgery import FineTuneConfiguration, TransferLearning
from surgery.layers import Output, emit_logits


def _frozen_state(model):
    frozen_modules = {n.target for n in model.graph.nodes if n.op == "call_module" and n.name in set(surgery.get_info(model).frozen)}
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] in frozen_modules}


def test_frozen_tensors_are_bitwise_unchanged_after_training_steps():
    torch.manual_seed(0)
    base = surgery.zoo.load("resnet18")
    cfg = FineTuneConfiguration(updater="sgd", lr=0.5, momentum=0.9, weight_decay=0.1, l1=1e-3, l2=1e-2, seed=1)
    model = (TransferLearning(base).fine_tune_configuration(cfg).set_feature_extractor("layer3")
             .remove_vertex_keep_connections("fc").add_layer("fc", Output(4, loss="cross_entropy")).build())
    before = _frozen_state(model)
    assert any(k.endswith("running_mean") for k in before) and any(k.endswith("num_batches_tracked") for k in before)
    trainable_before = {k: v.clone() for k, v in model.state_dict().items() if k not in before}
    optimizer = cfg.build_optimizer(model)
    specs = surgery.loss_specs(model)
    model.train()
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
        with emit_logits(model):
            loss = surgery.objective(specs, model(x), y) + cfg.penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    changed = [k for k, v in trainable_before.items() if not torch.equal(after[k], v)]
    assert "layer4.0.bn1.running_mean" in changed and "fc.linear.weight" in changed
    frozen_params = {id(p) for p in model.parameters() if not p.requires_grad}
    assert frozen_params and not any(id(p) in frozen_params for p in optimizer.state)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert model.get_submodule("layer3.0.bn1").training is False and model.get_submodule("layer4.0.bn1").training is True


def test_frozen_dropout_is_off_in_training_mode(tiny_name):
    base = surgery.zoo.load(tiny_name)
    model = TransferLearning(base).set_feature_extractor("drop1").build()
    model.train()
    x = torch.randn(4, 3, 16, 16)
    feats = [torch.nn.Sequential(model.conv1, model.bn1)(x) for _ in range(2)]
    assert torch.equal(model.drop1(torch.relu(feats[0])), torch.relu(feats[1]))


def test_set_feature_extractor_freezes_ancestors_only(tiny_name):
    model = TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("bn2").build()
    assert all(surgery.is_frozen(model, v) for v in ("conv1", "bn1", "drop1", "conv2", "bn2"))
    assert not any(surgery.is_frozen(model, v) for v in ("pool", "fc1", "fc2"))
    again = TransferLearning(model).set_feature_extractor("bn1").build()  # becomes exactly that: unfreezes conv2
    assert surgery.is_frozen(again, "bn1") and not surgery.is_frozen(again, "conv2")
    assert again.conv2.weight.requires_grad and not again.conv1.weight.requires_grad


def test_freeze_and_unfreeze_by_vertex(tiny_name):
    model = surgery.zoo.load(tiny_name)
    surgery.freeze_(model, "fc1")
    assert not model.fc1.weight.requires_grad and model.conv1.weight.requires_grad
    surgery.unfreeze_(model, "fc1")
    assert model.fc1.weight.requires_grad
    built = TransferLearning(model).set_feature_extractor("bn2").unfreeze("bn1").freeze("fc2").build()
    assert surgery.is_frozen(built, "conv1") and not surgery.is_frozen(built, "bn1")
    assert surgery.is_frozen(built, "fc2") and not surgery.is_frozen(built, "fc1")


def test_optimizer_honours_layer_lr_and_skips_decay_on_biases(tiny_name):
    cfg = FineTuneConfiguration(updater="adamw", lr=1e-3, weight_decay=0.05)
    model = (TransferLearning(surgery.zoo.load(tiny_name)).fine_tune_configuration(cfg).set_feature_extractor("fc1")
             .remove_vertex_keep_connections("fc2").add_layer("fc2", Output(3, lr=0.1)).build())
    opt = cfg.build_optimizer(model)
    groups = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert groups == {(0.1, 0.05): 32 * 3, (0.1, 0.0): 3}
    with pytest.raises(ValueError, match="everything is frozen"):
        cfg.build_optimizer(TransferLearning(model).set_feature_extractor("fc2").build())
    with pytest.raises(ValueError, match="updater: must be one of sgd, nesterov, adam, adamw, adamax"):
        FineTuneConfiguration(updater="lamb")
