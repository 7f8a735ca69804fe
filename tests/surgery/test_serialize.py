"""save -> load round trips (local and S3), recipes, and the summary."""

import json

import pytest
import torch
from torch import nn

import surgery
from surgery import FineTuneConfiguration, TransferLearning
from surgery.layers import Output
from surgery.specs import register_layer


@register_layer("test_head")
def _test_head(width: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(width))


def _edited(tiny_name):
    return (TransferLearning(surgery.zoo.load(tiny_name))
            .fine_tune_configuration(FineTuneConfiguration(updater="adam", lr=3e-4, dropout=0.1, seed=3))
            .set_feature_extractor("bn2")
            .n_out_replace("fc1", 20)
            .add_layer("extra", _test_head(width=6), "pool")
            .add_layer("out", Output(6, loss="cross_entropy", lr=0.01), "fc2", "extra")
            .set_outputs("out").build())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_save_load_round_trip(where, tiny_name, tmp_path, s3_bucket, storage_options):
    model = _edited(tiny_name).eval()
    uri, opts = (str(tmp_path / "m"), None) if where == "local" else (f"s3://{s3_bucket}/m", storage_options)
    surgery.save(model, uri, storage_options=opts)
    back = surgery.load(uri, storage_options=opts)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    a, b = surgery.get_info(model), surgery.get_info(back)
    assert a.frozen == b.frozen and a.fine_tune == b.fine_tune and a.losses == b.losses == {"out": "cross_entropy"}
    assert [n for n, p in back.named_parameters() if not p.requires_grad] == [n for n, p in model.named_parameters() if not p.requires_grad]
    assert surgery.fingerprint(back) == surgery.fingerprint(model)
    assert back.out.lr == 0.01 and back.out.default_dropout == 0.1 and back.conv1.weight.requires_grad is False


def test_recipe_is_plain_json_and_loading_checks_weights(tiny_name, tmp_path):
    model = _edited(tiny_name)
    surgery.save(model, str(tmp_path / "m"))
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    ops = [op["op"] for op in recipe["stages"][0]]
    assert ops[:1] == ["n_out_replace"] and "set_outputs" in ops and recipe["base"]["name"] == tiny_name
    assert recipe["stages"][0][1]["layer"] == {"type": "registered", "name": "test_head", "kwargs": {"width": 6}}
    # a tampered weights file is caught by the fingerprint
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "m" / "model.safetensors")
    state["fc2.weight"] += 1
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(surgery.WeightsError, match="fingerprint"):
        surgery.load(str(tmp_path / "m"))


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(64, 2)

    def forward(self, x):
        return self.w(x) * 2


def test_module_a_recipe_cannot_describe_is_refused_on_save(tiny_name, tmp_path):
    model = (TransferLearning(surgery.zoo.load(tiny_name)).add_layer("custom", _Custom(), "flatten")
             .set_outputs("custom").build())
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"add_layer\('custom'\) used a .*_Custom, which a recipe cannot describe"):
        surgery.save(model, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_summary_lists_vertices_shapes_and_totals(tiny_name):
    model = _edited(tiny_name)
    s = surgery.summary(model)
    rows = {r.vertex: r for r in s.rows}
    assert rows["fc1"].output_shape == (2, 20) and rows["fc1"].params == 64 * 20 + 20 and not rows["fc1"].frozen
    assert rows["conv1"].frozen and rows["out_merge"].inputs == ("fc2", "extra")
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert s.trainable_params + s.frozen_params == s.total_params
    text = str(s)
    assert "Trainable params:" in text and "out_merge" in text


def test_a_cosmetic_upgrade_still_loads_and_a_changed_computation_is_refused(tiny_name, tmp_path, monkeypatch):
    """Issue 21, defect 6: identity comes from the recipe, the weights and a probe, not from
    how torch prints code. A load after a release that prints FX code and every module
    differently works; changed weights and a changed computation are refused."""
    import torch.fx as fx
    from safetensors.torch import load_file, save_file

    model = _edited(tiny_name).eval()
    fp, frozen_fp = surgery.fingerprint(model), surgery.frozen_fingerprint(model)
    surgery.save(model, str(tmp_path / "m"))
    recipe = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert recipe["identity"]["scheme"] == "freezeray.identity/2" and recipe["fingerprint"] == fp
    assert (tmp_path / "m" / "probe.safetensors").exists()

    printed = fx.GraphModule.code
    monkeypatch.setattr(fx.GraphModule, "code", property(lambda self: "# printed by a newer torch\n" + printed.fget(self)))
    monkeypatch.setattr(nn.Module, "extra_repr", lambda self: f"printed differently ({type(self).__name__})")
    monkeypatch.setattr(nn.Conv2d, "extra_repr", lambda self: "printed differently")
    assert surgery.fingerprint(model) == fp and surgery.frozen_fingerprint(model) == frozen_fp
    back = surgery.load(str(tmp_path / "m"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    assert surgery.fingerprint(back) == fp and surgery.frozen_fingerprint(back) == frozen_fp

    # a real change of what a layer computes (a release whose BatchNorm differs): refused, with the largest difference
    real_bn = nn.BatchNorm2d.forward
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, inp: real_bn(self, inp) * 1.01)
    with pytest.raises(surgery.ProbeMismatch, match=r"computes something else.*differ by up to [0-9.e-]+ \(allowed: .*probe_check='warn'"):
        surgery.load(str(tmp_path / "m"))
    with pytest.warns(UserWarning, match="computes something else"):
        surgery.load(str(tmp_path / "m"), probe_check="warn")
    monkeypatch.setattr(nn.BatchNorm2d, "forward", real_bn)

    state = load_file(tmp_path / "m" / "model.safetensors")  # a changed weight: refused
    state["conv1.weight"] = state["conv1.weight"] * 1.001
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(surgery.WeightsError, match=r"the weights in model.safetensors are not the ones saved"):
        surgery.load(str(tmp_path / "m"))


def test_the_same_model_built_two_ways_has_one_fingerprint_and_a_retrained_head_keeps_the_frozen_one(tiny_name):
    """Fingerprints describe the result (graph in freezeray's names, weights), not the calls
    that made it; the frozen fingerprint ignores the head."""
    base = surgery.zoo.load(tiny_name)
    torch.manual_seed(0)
    one = TransferLearning(base).set_feature_extractor("flatten").n_out_replace("fc2", 4).build()
    torch.manual_seed(0)
    two = TransferLearning(TransferLearning(base).set_feature_extractor("flatten").build()).n_out_replace("fc2", 4).build()
    assert surgery.get_info(one).stages != surgery.get_info(two).stages
    assert surgery.fingerprint(one) == surgery.fingerprint(two)
    other_head = TransferLearning(one).remove_vertex_and_connections("fc2").add_layer("out", Output(7), "fc1") \
        .set_outputs("out").build()
    assert surgery.frozen_fingerprint(other_head) == surgery.frozen_fingerprint(one)
    assert surgery.fingerprint(other_head) != surgery.fingerprint(one)
    with torch.no_grad():
        one.fc2.weight.add_(1.0)
    assert surgery.frozen_fingerprint(one) == surgery.frozen_fingerprint(two) and surgery.fingerprint(one) != surgery.fingerprint(two)
    with torch.no_grad():
        one.conv1.weight.add_(1.0)
    assert surgery.frozen_fingerprint(one) != surgery.frozen_fingerprint(two)
    swapped = TransferLearning(two).remove_vertex_keep_connections("pool").add_vertex("pool", nn.AdaptiveMaxPool2d(2)) \
        .set_feature_extractor("flatten").build()  # same names and weights, another computation in the frozen part
    assert surgery.frozen_fingerprint(swapped) != surgery.frozen_fingerprint(two)
