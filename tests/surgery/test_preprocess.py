"""The CPU preprocessing's JPEG fast path (issue 24): its pixels within the stated
tolerance of the PIL path on real photos, small and large, in every crop mode; the same
rows and the same error messages as the PIL path for every odd and bad file of the
reliability suite; EXIF orientation ignored on both paths; no torch in the read tasks."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from imagesets import bad_files, draw, encode
from PIL import Image

import freezeray.images as prep
from freezeray.images import JPEG_TOLERANCE, PreprocessConfig, dct_scale, decode_image, preprocess_bytes, resize_crop

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
import badfiles  # noqa: E402  (tests/reliability/badfiles.py: the odd and bad files of the reliability suite)


def _real_photos() -> list[Image.Image]:
    """scikit-learn's two sample photos (JPEGs), and scikit-image's bundled photos when
    scikit-image is installed (read as files, without importing it)."""
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "images"
    photos = [Image.open(folder / name).convert("RGB") for name in ("china.jpg", "flower.jpg")]
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.submodule_search_locations:
        data = Path(list(spec.submodule_search_locations)[0]) / "data"
        for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "retina.jpg", "motorcycle_left.png"):
            if (data / name).exists():
                photos.append(Image.open(data / name).convert("RGB"))
    return photos


def _jpeg(img: Image.Image, quality: int = 90, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_jpegs() -> dict[str, bytes]:
    """Real photos as JPEGs: resized so the longer side is 256-500 px; resized up to
    2,000-4,000 px; and mosaics of the photos at their own resolution of 2,000-3,000 px
    (the detail of a real large photo, where DCT scaling differs most)."""
    rng = np.random.default_rng(24)
    photos = _real_photos()
    out = {}
    for i, photo in enumerate(photos):
        for kind, (lo, hi) in (("small", (256, 500)), ("large", (2000, 4000))):
            side = int(rng.integers(lo, hi + 1))
            scale = side / max(photo.size)
            img = photo.resize((round(photo.size[0] * scale), round(photo.size[1] * scale)), Image.BICUBIC)
            if i % 2:
                img = img.transpose(Image.Transpose.ROTATE_90)  # portrait too
            out[f"{kind}-{i}.jpg"] = _jpeg(img, quality=int(rng.integers(80, 96)))
    for j, (w, h) in enumerate(((2400, 1600), (1700, 2600))):
        canvas, x, y, k = Image.new("RGB", (w, h)), 0, 0, j
        while y < h:
            row = 0
            while x < w:
                p = photos[k % len(photos)]
                canvas.paste(p, (x, y))
                x, row, k = x + p.size[0], max(row, p.size[1]), k + 1
            x, y = 0, y + row
        out[f"mosaic-{j}.jpg"] = _jpeg(canvas)
    return out


def _difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float(np.percentile(d, 99))


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("interpolation,channels", [("bilinear", 3), ("bicubic", 3), ("bicubic", 1)])
def test_the_fast_path_is_within_the_tolerance_of_pil_on_real_photos(photo_jpegs, crop_mode, interpolation, channels):
    config = PreprocessConfig(input_size=(channels, 224, 224), interpolation=interpolation, crop_mode=crop_mode,
                              mean=(0.5,) * channels, std=(0.5,) * channels)
    scales = {}
    for name, data in photo_jpegs.items():
        reference = resize_crop(decode_image(data, channels), config)
        got = preprocess_bytes(data, config)
        assert got.shape == reference.shape == (224, 224, channels) and got.dtype == np.uint8 and got.flags.writeable
        width, height = Image.open(io.BytesIO(data)).size
        scales[name] = dct_scale(width, height, config)
        limit = JPEG_TOLERANCE["full" if scales[name] == 1 else "scaled"]
        mean, p99 = _difference(got, reference)
        assert mean <= limit["mean"] and p99 <= limit["p99"], (name, scales[name], mean, p99)
    assert all(scales[n] == 1 for n in scales if n.startswith("small"))
    assert all(scales[n] > 1 for n in scales if not n.startswith("small"))  # the DCT-scaled branch ran


def test_jpegs_take_the_fast_path_and_the_rest_the_pil_path(photo_jpegs, monkeypatch):
    """With PIL's full decoding made to fail, JPEGs still preprocess (the fast path served
    them) and a PNG fails (the PIL path served it)."""
    config = PreprocessConfig(input_size=(3, 64, 64))

    def refuse(*args, **kwargs):
        raise AssertionError("the PIL path was taken")

    monkeypatch.setattr(prep, "decode_image", refuse)
    for data in (photo_jpegs["small-0.jpg"], photo_jpegs["large-1.jpg"]):
        assert preprocess_bytes(data, config).shape == (64, 64, 3)
    with pytest.raises(AssertionError, match="the PIL path was taken"):
        preprocess_bytes(encode(draw("red_disc", np.random.default_rng(0), 40), "PNG"), config)


def test_the_window_resize_is_the_whole_image_resize_within_rounding(photo_jpegs):
    """Resizing only the output window (the fast path) against resizing the whole image
    and cropping (the PIL path), on the same decoded pixels."""
    for interpolation, max_allowed, mean_allowed in (("bilinear", 1, 0.25), ("bicubic", 12, 0.25)):
        config = PreprocessConfig(interpolation=interpolation)
        for name in [n for n in photo_jpegs if n.startswith("small")]:
            img = decode_image(photo_jpegs[name])
            whole, window = resize_crop(img, config), prep._window(img, config, img.size, 1)
            d = np.abs(whole.astype(np.int16) - window)
            assert d.max() <= max_allowed and d.mean() <= mean_allowed, (interpolation, name, d.max(), d.mean())


def test_dct_scaling_is_chosen_from_the_target_size():
    config = PreprocessConfig()  # 224 px, resized shorter side 256
    assert dct_scale(4000, 3000, config) == 4  # 750 x 1000 >= 1.5 x (256 x 341); 1/8 would leave 375 < 384
    assert dct_scale(6144, 6144, config) == 8
    assert dct_scale(767, 767, config) == 1 and dct_scale(768, 768, config) == 2
    assert dct_scale(4000, 3000, PreprocessConfig(interpolation="nearest")) == 1  # nearest picks pixels, not averages
    assert dct_scale(4000, 3000, PreprocessConfig(input_size=(3, 32, 32))) == 8


def _odd_jpegs() -> dict[str, bytes]:
    """JPEGs the fast path must hand to the PIL path, or take with the same result."""
    rng = np.random.default_rng(7)
    photo = draw("green_square", rng, 900)
    good = _jpeg(photo)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display (ignored: EXIF-free decoding)
    return {
        "cmyk.jpg": badfiles.cmyk_jpeg(900),
        "grey.jpg": _jpeg(photo.convert("L")),
        "progressive.jpg": _jpeg(photo, progressive=True),
        "exif-rotated.jpg": _jpeg(photo, exif=exif.tobytes()),
        "subsampling-444.jpg": _jpeg(photo, subsampling=0),
        "large-truncated.jpg": good[: len(good) * 2 // 3],
        "large-cut-header.jpg": good[:400],
        "extraneous-bytes.jpg": good[:2] + b"\x00\x00\x00" + good[2:],  # libjpeg warns; Pillow refuses or decodes
        "mpo-like-two-images.jpg": good + _jpeg(draw("red_disc", rng, 300)),  # the first image, as Pillow reads MPO
        "only-soi.jpg": b"\xff\xd8\xff",
    }


@pytest.mark.parametrize("channels", [3, 1])
def test_odd_and_bad_files_give_the_same_rows_and_errors_as_the_pil_path(channels):
    files = {**badfiles.odd_but_good(), **{k: v for k, (v, _) in badfiles.bad().items()},
             **{f"imagesets/{k}": v for k, v in bad_files().items()}, **_odd_jpegs()}
    config = PreprocessConfig(input_size=(channels, 96, 96), mean=(0.5,) * channels, std=(0.5,) * channels)
    outcomes = {}
    for name, data in files.items():
        try:
            reference: np.ndarray | str = resize_crop(decode_image(data, channels), config)
        except ValueError as exc:
            reference = str(exc)
        try:
            got: np.ndarray | str = preprocess_bytes(data, config)
        except ValueError as exc:
            got = str(exc)
        outcomes[name] = "error" if isinstance(reference, str) else "rows"
        if isinstance(reference, str) or prep._preprocess_jpeg(data, config, prep.MAX_IMAGE_PIXELS) is None:
            assert isinstance(got, type(reference)) and np.array_equal(got, reference), name  # the PIL path's own result
            continue
        mean, p99 = _difference(got, reference)  # taken by the fast path: within its tolerance
        assert mean <= JPEG_TOLERANCE["scaled"]["mean"] and p99 <= JPEG_TOLERANCE["scaled"]["p99"], (name, mean, p99)
    assert {n for n, o in outcomes.items() if o == "error"} >= {
        "red_disc/truncated.jpg", "red_disc/empty.jpg", "green_square/notes.jpg", "large-truncated.jpg",
        "large-cut-header.jpg", "only-soi.jpg", "imagesets/red_disc/truncated.jpg"}
    assert outcomes["red_disc/cmyk.jpg"] == outcomes["cmyk.jpg"] == outcomes["exif-rotated.jpg"] == "rows"
    # what the fast path hands over: CMYK (Pillow's own conversion), damaged files (Pillow's message)
    for name in ("cmyk.jpg", "large-truncated.jpg", "large-cut-header.jpg", "only-soi.jpg"):
        assert prep._preprocess_jpeg(files[name], config, prep.MAX_IMAGE_PIXELS) is None, name
    for name in ("grey.jpg", "progressive.jpg", "exif-rotated.jpg", "subsampling-444.jpg"):
        assert prep._preprocess_jpeg(files[name], config, prep.MAX_IMAGE_PIXELS) is not None, name


def test_exif_orientation_is_ignored_by_both_paths():
    photo = draw("blue_bar", np.random.default_rng(8), 1200).resize((1200, 800))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(photo, exif=exif.tobytes())
    config = PreprocessConfig(input_size=(3, 64, 96), crop_pct=1.0)
    assert prep._preprocess_jpeg(data, config, None) is not None
    got, reference = preprocess_bytes(data, config), resize_crop(decode_image(data), config)
    assert _difference(got, reference)[0] <= JPEG_TOLERANCE["scaled"]["mean"]
    # the bar is horizontal in the stored pixels; rotated it would be vertical: rows differ, not columns
    assert got.std(axis=0).mean() > 2 * got.std(axis=1).mean()


def test_over_max_pixels_is_refused_from_the_header_with_the_pil_message(monkeypatch):
    data = _jpeg(draw("red_disc", np.random.default_rng(9), 300))
    config = PreprocessConfig(input_size=(3, 32, 32))
    with pytest.raises(ValueError, match=r"^image too large: 300x300 = 90,000 pixels is over the limit of 89,999"):
        preprocess_bytes(data, config, max_pixels=89_999)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # Pillow's own limit, with max_pixels=None
    with pytest.raises(ValueError) as fast:
        preprocess_bytes(data, config, max_pixels=None)
    with pytest.raises(ValueError) as pil:
        decode_image(data, 3, None)
    assert str(fast.value) == str(pil.value) and str(fast.value).startswith("image too large")


def test_the_read_tasks_stay_torch_free():
    """A read task imports pipeline.readers and preprocesses JPEGs: no torch (1.3 s and
    275 MB more per worker process)."""
    code = ("import sys, io; import pipeline.readers; from PIL import Image; "
            "from freezeray.images import PreprocessConfig, preprocess_bytes; b = io.BytesIO(); "
            "Image.new('RGB', (1200, 900), 'red').save(b, 'JPEG'); preprocess_bytes(b.getvalue(), PreprocessConfig()); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"
