"""The report's baselines, without Ray: the random backbone is the run's model with its
frozen part re-drawn from the architecture's own seeded initialisation (the head as
built), the pixel model is a linear model on the averaged-down input, large sources are
sampled, and ``report.baselines`` is a checked config key."""

import pytest
import torch
from torch import nn

import surgery
from jobs.baselines import PIXEL_SIDE, pixel_model, random_backbone, sample
from jobs.config import ConfigError, parse_config
from surgery import TransferLearning
from surgery.layers import Output


@pytest.fixture(scope="module")
def transfer_model(lite0_imagenet):
    return (TransferLearning(lite0_imagenet).set_feature_extractor("global_pool")
            .remove_vertex_keep_connections("classifier").add_layer("classifier", Output(10, loss="cross_entropy"))
            .build())


def test_the_random_backbone_redraws_the_frozen_part_and_keeps_the_head(transfer_model):
    before = {k: v.clone() for k, v in transfer_model.state_dict().items()}
    twin = random_backbone(transfer_model, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fresh = surgery.zoo.load("efficientnet_lite0").state_dict()
    state = twin.state_dict()
    head = {k for k in state if k.startswith("classifier.")}
    assert head and all(torch.equal(state[k], before[k]) for k in head)  # the head as the run builds it (zeros)
    frozen = [k for k in state if k not in head]
    assert len(frozen) > 200 and all(torch.equal(state[k], fresh[k]) for k in frozen)
    assert not torch.equal(state["conv_stem.weight"], before["conv_stem.weight"])
    assert all(torch.equal(v, before[k]) for k, v in transfer_model.state_dict().items())  # the input is untouched
    assert all(not p.requires_grad for k, p in twin.named_parameters() if k not in head)  # still frozen
    # seeded: the same weights, hence the same fingerprint (its features are reused), every time
    assert surgery.frozen_fingerprint(random_backbone(transfer_model, seed=0)) == surgery.frozen_fingerprint(twin)
    assert surgery.frozen_fingerprint(random_backbone(transfer_model, seed=1)) != surgery.frozen_fingerprint(twin)
    assert surgery.frozen_fingerprint(twin) != surgery.frozen_fingerprint(transfer_model)


def test_a_model_without_a_random_initialisation_of_its_own_is_named():
    net = surgery.from_module(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), preprocessing={"input_size": (3, 8, 8)})
    net = TransferLearning(net).set_feature_extractor("1").add_layer(Output(2)).build()
    with pytest.raises(ValueError, match="'Sequential' is not a zoo architecture"):
        random_backbone(net)


def test_the_pixel_model_is_a_linear_model_on_the_averaged_down_input(transfer_model):
    model = pixel_model(transfer_model, 10)
    summary = surgery.summary(model)
    assert summary.trainable_params == 3 * PIXEL_SIDE ** 2 * 10 + 10 and summary.frozen_params == 0
    assert surgery.get_info(model).preprocessing == surgery.get_info(transfer_model).preprocessing
    x = torch.randn(2, 3, 96, 96)
    features = surgery.TransferLearningHelper(model).featurize(x)
    expected = nn.functional.adaptive_avg_pool2d(x, PIXEL_SIDE).flatten(1)  # (B, 3 * 32 * 32)
    assert torch.allclose(features, expected)


def test_large_sources_are_sampled_seeded_and_in_order(tmp_path):
    from PIL import Image

    import pipeline

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(15):
            Image.new("RGB", (4, 4), (i, 0, 0)).save(tmp_path / c / f"{i:02d}.png")
    src = pipeline.read_images(str(tmp_path))
    assert sample(src, 30) is src
    picked = sample(src, 10, seed=3)
    assert len(picked) == 10 and picked.paths == sorted(picked.paths) and set(picked.paths) < set(src.paths)
    assert sample(src, 10, seed=3).paths == picked.paths and sample(src, 10, seed=4).paths != picked.paths


def test_report_baselines_is_a_checked_config_key():
    base = {"model": {"base": "efficientnet_lite0"}}
    assert parse_config(base).report.baselines is True and parse_config(base).report.baseline_rows == 2000
    assert parse_config({**base, "report": {"baselines": False}}).report.baselines is False
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "report": {"baseline": False, "baseline_rows": 0}})
    problems = "\n".join(err.value.problems)
    assert "report.baseline" in problems and "report.baseline_rows" in problems
