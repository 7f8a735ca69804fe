"""The demo shows why transfer learning: on a small version of its task (the surfaces, 20
training and 10 test patches a class), ``freezeray demo`` computes the three numbers in
one run — ImageNet features with the default head, a linear model on 32x32 pixels, and
the same head on a randomly initialised efficientnet_lite0, on the same split — and the
first is at least 15 points above each of the others. The report's first table shows
them; ``report.baselines: false`` leaves them out. The patches themselves are fixed by
the seed, and train and test come from different parts of each picture."""

import json

import numpy as np
import pytest

from jobs.cli import main
from jobs.demo import SURFACES, _patches, _picture, demo_config, write_surfaces
from jobs.steps import run_all

MARGIN = 0.15


def test_the_surfaces_demo_beats_both_baselines_by_15_points(ray_session, tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--per-class", "20"]) == 0
    out = capsys.readouterr()
    printed = (out.out + out.err).splitlines()
    assert printed[0] == f"surfaces: 200 train and 100 test images in {tmp_path / 'surfaces-20'}"
    assert len(printed) <= 15, printed
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    transfer = metrics["evaluation"]["accuracy"]
    baselines = {b["name"]: b for b in metrics["baselines"]}
    pixels, random = baselines["pixels"]["accuracy"], baselines["random backbone"]["accuracy"]
    assert transfer - pixels >= MARGIN and transfer - random >= MARGIN, (transfer, pixels, random)
    for b in baselines.values():  # the same split: every train image, the same 100 test images
        assert (b["train_rows"], b["test_rows"], b["of_test"], b["skipped"]) == (200, 100, 100, None)
    line = next(ln for ln in printed if ln.startswith("baselines: "))
    assert f"pixels {pixels:.4f} ({100 * (transfer - pixels):+.1f} points)" in line
    assert f"random backbone {random:.4f}" in line

    page = (tmp_path / "report" / "report.md").read_text()
    first = page.index("## Result and baselines")
    assert first < page.index("## Evaluation") and page.index("|") > first  # the page's first table
    table = [ln for ln in page[first:].splitlines() if ln.startswith("| ") and "---" not in ln][:4]
    assert table[1].startswith("| this run: efficientnet_lite0, imagenet weights") and f"**{transfer:.4f}**" in table[1]
    assert "32x32 pixels" in table[2] and f"{pixels:.4f}" in table[2]
    assert "random" in table[3] and f"{random:.4f}" in table[3]
    assert (tmp_path / "report" / "baselines.png").read_bytes()[:4] == b"\x89PNG"

    # a second run reuses every feature set, the baselines' too, and trains nothing for them
    assert main(["demo", "--workdir", str(tmp_path), "--per-class", "20", "--epochs", "1"]) == 0
    again = capsys.readouterr()
    assert "reused the cached features" in again.out and "baselines: reused the cached features" in again.err

    # report.baselines: false skips them
    cfg, _, _ = demo_config(str(tmp_path), per_class=20, epochs=1)
    cfg = cfg.with_(report=cfg.report.model_copy(update={"baselines": False}))
    outcome = run_all(cfg)
    assert outcome.baselines == [] and "baselines" not in outcome.timings
    page = (tmp_path / "report" / "report.md").read_text()
    assert "Baselines were not computed (`report.baselines: false`)." in page


def test_the_surfaces_are_fixed_by_the_seed_and_split_by_picture_part(tmp_path):
    small, large = write_surfaces(str(tmp_path / "a"), 2, 1), write_surfaces(str(tmp_path / "b"), 3, 2)
    assert small == {"train": 20, "test": 10} and large == {"train": 30, "test": 20}
    for split in ("train", "test"):
        for name in SURFACES:
            first = f"{split}/{name}/{name}-000.jpg"
            assert (tmp_path / "a" / first).read_bytes() == (tmp_path / "b" / first).read_bytes()
    # a test patch is never cut from the part of the picture training patches come from: the
    # patches of a picture whose left 60% is black and right 40% white are black for train, white for test
    picture = np.zeros((200, 300, 3), np.uint8)
    picture[:, 180:] = 255
    picture[::2, ::2] = 40  # texture, so patches are not uniform
    train, test = _patches(picture, 0, 5, seed=0, cls=0), _patches(picture, 1, 5, seed=0, cls=0)
    assert all(p.mean() < 60 for p in train) and all(p.mean() > 100 for p in test)


def test_the_surfaces_name_their_missing_package(monkeypatch):
    from importlib import resources

    from jobs.errors import CliError

    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(resources, "files", missing)
    with pytest.raises(CliError, match="pip install scikit-image"):
        _picture("brick.png")
