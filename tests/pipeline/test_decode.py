"""Decoding in the model actors (``decode="gpu"``): the shared tensor path, run here on the
CPU device (and on CUDA where a GPU is present), matches the PIL path within the stated
tolerance, falls back to PIL for other formats and refused files with the same error
rows, and featurize gives the same rows either way."""

import io

import numpy as np
import pytest
import torch
from imagesets import bad_files, draw, encode, write_folder
from PIL import Image

from freezeray.images import preprocess_bytes
from pipeline import Resources, featurize
from pipeline.decode import PIXEL_TOLERANCE, decode_batch, is_jpeg, mean_difference
from surgery import PreprocessConfig


def _photos() -> dict[str, bytes]:
    """JPEGs of several shapes (landscape, portrait, smaller than the crop, grayscale),
    a PNG and a WebP, and the bad files."""
    rng = np.random.default_rng(3)
    out = {}
    sizes = {"wide": (320, 200), "tall": (180, 300), "small": (40, 30), "square": (256, 256), "large": (1600, 1200)}
    for name, (w, h) in sizes.items():
        img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        out[f"{name}.jpg"] = encode(img, "JPEG")
    out["gray.jpg"] = encode(draw("red_disc", rng, 120).convert("L"), "JPEG")
    out["shape.png"] = encode(draw("blue_bar", rng, 90), "PNG")
    out["shape.webp"] = encode(draw("green_square", rng, 90), "WEBP")
    out.update({k.rsplit("/", 1)[1]: v for k, v in bad_files().items()})
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
def test_the_tensor_path_matches_pil_within_the_tolerance(device):
    config = PreprocessConfig(input_size=(3, 96, 96), crop_pct=0.875, interpolation="bicubic")
    files = _photos()
    names = list(files)
    pixels, errors = decode_batch([files[n] for n in names], [""] * len(names), config, torch.device(device))
    assert pixels.device.type == device and pixels.shape == (len(names), 96, 96, 3) and pixels.dtype == torch.uint8
    for i, name in enumerate(names):
        try:
            reference = preprocess_bytes(files[name], config)
        except ValueError as exc:
            assert errors[i] == str(exc), name  # the same error row as the CPU path
            continue
        assert errors[i] == "", (name, errors[i])
        got = pixels[i].cpu().numpy()
        if not is_jpeg(files[name]):
            assert np.array_equal(got, reference), name  # other formats take the PIL path itself
            continue
        mean, p99 = mean_difference(got, reference)
        assert mean <= PIXEL_TOLERANCE["mean"] and p99 <= PIXEL_TOLERANCE["p99"], (name, mean, p99)
    assert sum(1 for e in errors if e) == 3


@pytest.mark.parametrize("crop_mode", ["squash", "border"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])])
def test_every_crop_mode_takes_the_same_geometry_on_both_paths(device, crop_mode):
    """Issue 21, defect 7: timm's squash and border crop modes on the GPU (tensor) path,
    against the PIL path (which matches timm's own transform, tests/surgery/test_zoo.py)."""
    config = PreprocessConfig(input_size=(3, 96, 96), crop_pct=0.9, interpolation="bicubic", crop_mode=crop_mode,
                              mean=(0.5, 0.25, 0.75), std=(0.5, 0.5, 0.5))
    files = {k: v for k, v in _photos().items() if k in ("wide.jpg", "tall.jpg", "small.jpg", "square.jpg", "gray.jpg")}
    names = list(files)
    pixels, errors = decode_batch([files[n] for n in names], [""] * len(names), config, torch.device(device))
    assert errors == [""] * len(names)
    for i, name in enumerate(names):
        reference = preprocess_bytes(files[name], config)
        mean, p99 = mean_difference(pixels[i].cpu().numpy(), reference)
        assert mean <= PIXEL_TOLERANCE["mean"] and p99 <= PIXEL_TOLERANCE["p99"], (name, mean, p99)
        if crop_mode == "border" and name in ("wide.jpg", "tall.jpg"):  # the padding is the mean colour, on both paths
            corner = (0, 48) if name == "wide.jpg" else (48, 0)
            assert pixels[i, corner[0], corner[1]].tolist() == reference[corner].tolist() == [128, 64, 191]


def test_the_batched_decoder_warns_nothing():
    """torchvision 0.29's deprecation warning for its image decoding is silenced around the call."""
    import warnings

    config = PreprocessConfig(input_size=(3, 32, 32))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, errors = decode_batch([_photos()["wide.jpg"]], [""], config, torch.device("cpu"))
    assert errors == [""] and [str(w.message) for w in caught if "TorchVision" in str(w.message)] == []


def test_decompression_bombs_and_unread_files_are_error_rows_before_decoding():
    config = PreprocessConfig(input_size=(3, 32, 32))
    big = io.BytesIO()
    Image.new("RGB", (300, 300)).save(big, "JPEG")
    pixels, errors = decode_batch([big.getvalue(), None], ["", "cannot read: FileNotFoundError: x"], config,
                                  torch.device("cpu"), max_pixels=300 * 300 - 1)
    assert errors[0].startswith("image too large: 300x300 = 90,000 pixels") and errors[1] == "cannot read: FileNotFoundError: x"
    assert int(pixels.sum()) == 0


def test_featurize_decoding_in_the_actors_gives_the_same_rows(ray_session, tmp_path, tiny_name):
    import surgery
    from surgery import TransferLearning

    root = tmp_path / "imgs"
    write_folder(root, per_class=10, size=40, seed=4, odd_modes=True)
    for p, b in bad_files().items():
        (root / p).write_bytes(b)
    torch.manual_seed(0)
    model = TransferLearning(surgery.zoo.load(tiny_name)).set_feature_extractor("flatten").build()
    kw = dict(dtype="float32", resources=Resources(cpus_per_worker=0.5))
    on_cpu = featurize(model, str(root), str(tmp_path / "cpu"), decode="cpu", **kw)
    in_actor = featurize(model, str(root), str(tmp_path / "gpu-path"), decode="gpu", **kw)
    assert on_cpu.fingerprint == in_actor.fingerprint  # how images are decoded is not part of what they are
    assert (in_actor.rows, in_actor.errors) == (on_cpu.rows, on_cpu.errors) == (30, 3)
    assert in_actor.errors_table().to_pydict() == on_cpu.errors_table().to_pydict()
    a, _ = on_cpu.to_tensors()
    b, _ = in_actor.to_tensors()
    assert (a - b).abs().mean() < 0.05 * a.abs().mean()  # features of near-identical pixels
    with pytest.raises(ValueError, match="decode must be 'auto', 'cpu' or 'gpu', got 'nvjpeg'"):
        featurize(model, str(root), str(tmp_path / "x"), decode="nvjpeg")
