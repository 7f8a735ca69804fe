"""Images without torch: the preprocessing a backbone expects, as data that travels with
the model (:class:`PreprocessConfig`), and the decoding, resizing and cropping to uint8
pixels that the read tasks run (PIL, with libjpeg's DCT scaling for large JPEGs). What
happens on the model's side, normalising a batch on its device, is
:func:`pipeline.decode.normalize`; a model's own config is :func:`surgery.recipe.model_preprocessing`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

__all__ = ["PreprocessConfig", "decode_image", "resize_crop", "preprocess_bytes",
           "Geometry", "geometry", "MAX_IMAGE_PIXELS", "CROP_MODES", "DCT_MARGIN", "JPEG_TOLERANCE", "dct_scale"]

# Images with more pixels are refused before their pixels are decoded (Pillow's own
# decompression-bomb threshold): a 20,000 x 20,000 PNG is a few hundred KB on disk and
# 1.2 GB decoded.
MAX_IMAGE_PIXELS = 89_478_485

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")
CropMode = Literal["center", "squash", "border"]
CROP_MODES = ("center", "squash", "border")  # timm's crop modes (timm.data.transforms_imagenet_eval)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images become the model's input tensor (timm's ``pretrained_cfg`` in small).

    Eval-time recipe, as torchvision's and timm's (``transforms_imagenet_eval``), by
    ``crop_mode``:

    * ``"center"``: resize the shorter side to ``resize_size``, centre-crop to ``input_size``;
    * ``"squash"``: resize each side to ``floor(side / crop_pct)`` (the aspect ratio is not
      kept), centre-crop to ``input_size``;
    * ``"border"``: resize the longer side to ``floor(side / crop_pct)`` keeping the aspect
      ratio, pad to ``input_size`` with the mean colour (``round(255 * mean)``), centre-crop;

    then scale to [0, 1] and normalize.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)  # (C, H, W) the model is fed
    crop_pct: float = 0.875  # crop side / resized shorter side; resize = floor(H / crop_pct)
    interpolation: Interpolation = "bilinear"  # PIL resampling filter used for the resize
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, ...] = (0.229, 0.224, 0.225)  # per-channel std divided after the mean
    crop_mode: CropMode = "center"  # how the resize keeps the image's aspect ratio (see above)

    def __post_init__(self) -> None:
        problems = []
        if self.crop_mode not in CROP_MODES:
            problems.append(f"crop_mode must be one of {', '.join(CROP_MODES)}, got {self.crop_mode!r}")
        if len(self.input_size) != 3 or any(int(v) <= 0 for v in self.input_size):
            problems.append(f"input_size must be (C, H, W) with positive sizes, got {self.input_size}")
        elif self.input_size[0] not in (1, 3):
            problems.append(f"input_size must have 1 or 3 channels, got {self.input_size[0]}")
        if not 0.0 < self.crop_pct <= 1.0:
            problems.append(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _INTERPOLATIONS:
            problems.append(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {self.interpolation!r}")
        channels = self.input_size[0] if len(self.input_size) == 3 else 3
        if len(self.mean) != channels or len(self.std) != channels:
            problems.append(f"mean and std need {channels} values each, got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            problems.append(f"std values must be positive, got {self.std}")
        if problems:
            raise ValueError("invalid preprocessing: " + "; ".join(problems))
        # normalise types so equal configs compare and hash equal whatever the input types
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    @property
    def resize_size(self) -> int:
        """Shorter side after the resize (timm: ``floor(crop / crop_pct)``)."""
        return int(math.floor(max(self.input_size[1:]) / self.crop_pct + 1e-6))

    def with_size(self, size: int | tuple[int, int]) -> "PreprocessConfig":
        """The same recipe at another input size (e.g. smaller images for a quick run)."""
        h, w = (size, size) if isinstance(size, int) else size
        return replace(self, input_size=(self.input_size[0], int(h), int(w)))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data; ``crop_mode`` only when it is not ``"center"``,
        so configs (and the fingerprints of feature sets made with them) from before crop
        modes existed are unchanged."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.crop_mode == "center":
            del d["crop_mode"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessConfig":
        known = {"input_size", "crop_pct", "interpolation", "mean", "std", "crop_mode"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; valid keys: {sorted(known)}")
        d = dict(d)
        for key in ("input_size", "mean", "std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


# ---------------------------------------------------------------------------------------
# applying it: decode -> resize -> centre crop (uint8, on CPU workers) -> normalize (on the
# model's device). Splitting it this way keeps what travels between processes 4x smaller.

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values


def decode_image(data: bytes, channels: int = 3, max_pixels: int | None = MAX_IMAGE_PIXELS) -> "Image.Image":
    """Decode image bytes (JPEG, PNG, WebP, GIF, BMP, TIFF, ...) to an RGB (or, for 1
    channel, L) image, as torchvision's ``read_image(..., ImageReadMode.RGB)`` would:

    * grayscale, palette, CMYK and RGBA images are converted; alpha is dropped;
    * 16-bit and 32-bit integer images are scaled to 8 bits (Pillow would clip them);
      floating-point images in [0, 1] are scaled by 255, others clipped to [0, 255];
    * animated GIF/WebP and multi-page TIFF: the first frame.

    Args:
        data: the file's bytes.
        channels: 3 (RGB) or 1 (L).
        max_pixels: refuse images with more pixels than this, from the header alone,
            before decoding (None: no limit of ours; Pillow still refuses above twice
            its own ``Image.MAX_IMAGE_PIXELS``).

    Raises:
        ValueError: empty, truncated, unreadable or too large data, with the reason.
    """
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with our reason
            img_cm = Image.open(io.BytesIO(data))
        with img_cm as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(f"image too large: {width}x{height} = {width * height:,} pixels is over the limit "
                                 f"of {max_pixels:,} (a possible decompression bomb); not decoded")
            img.load()  # decode now: truncated files fail here, not later
            return _to_8bit(img).convert("RGB" if channels == 3 else "L")
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image too large: {exc}") from None
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can identify") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"cannot decode image: {exc}") from None


def _to_8bit(img: "Image.Image") -> "Image.Image":
    """High-bit-depth single-band images as 8-bit L (Pillow's ``convert`` clips them at 255)."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr: Any = np.asarray(img).astype(np.int64)
        top = int(arr.max(initial=0))
        if img.mode.startswith("I;16") or 255 < top <= 65535:
            arr = arr >> 8  # 16-bit range
        elif top > 65535:
            arr = arr * 255 // top
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        floats: Any = np.asarray(img, dtype=np.float64)
        arr = np.nan_to_num(floats, nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return img


@dataclass(frozen=True)
class Geometry:
    """Where an image of a given size goes: resized to ``size``, padded by ``pad`` with
    ``fill``, and the input-sized window at ``crop`` cut out. The CPU (PIL) and GPU
    (tensor) paths both follow it."""

    size: tuple[int, int]  # (width, height) after the resize
    pad: tuple[int, int, int, int]  # (left, top, right, bottom) added after the resize
    crop: tuple[int, int]  # (left, top) of the output window in the padded image
    fill: tuple[int, ...]  # the padding's value per channel


def geometry(width: int, height: int, config: PreprocessConfig) -> Geometry:
    """The resize, padding and crop of ``config.crop_mode`` for a ``width`` x ``height``
    image, as timm's ``transforms_imagenet_eval`` (``center``: torchvision's ``Resize`` of
    the shorter side + ``CenterCrop``; ``squash``: ``Resize((h, w))`` + ``CenterCrop``;
    ``border``: ``ResizeKeepRatio(longest=1)`` + ``CenterCropOrPad`` with the mean colour)."""
    channels, out_h, out_w = config.input_size
    fill: tuple[int, ...] = (0,) * channels
    if config.crop_mode == "center":
        short, long = (width, height) if width <= height else (height, width)
        new_short = config.resize_size
        new_long = int(new_short * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        scale_h, scale_w = math.floor(out_h / config.crop_pct), math.floor(out_w / config.crop_pct)
        if config.crop_mode == "squash":
            new_w, new_h = scale_w, scale_h
        else:  # border: the longer side (relative to the target) fits, the rest is padded
            ratio = max(height / scale_h, width / scale_w)
            new_w, new_h = round(width / ratio), round(height / ratio)
            fill = tuple(round(255 * m) for m in config.mean)
    pad = (0, 0, 0, 0)
    if out_w > new_w or out_h > new_h:  # smaller than the crop: pad around the centre, as timm and torchvision do
        dw, dh = max(0, out_w - new_w), max(0, out_h - new_h)
        pad = (dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2)
    padded_w, padded_h = new_w + pad[0] + pad[2], new_h + pad[1] + pad[3]
    crop = (int(round((padded_w - out_w) / 2.0)), int(round((padded_h - out_h) / 2.0)))
    return Geometry((int(new_w), int(new_h)), pad, crop, fill)


def resize_crop(img: "Image.Image", config: PreprocessConfig) -> "np.ndarray":
    """Resize, pad and crop ``img`` to the input size as ``config.crop_mode`` says (see
    :func:`geometry`). Returns uint8 (H, W, C).

    The whole image is resized, then cropped: exactly torchvision's and timm's eval
    transforms on a PIL image (``tests/surgery/test_zoo.py``). The JPEG fast path resizes
    only the output window instead (:func:`_window`)."""
    return _window(img, config, img.size, 1, whole=True)


def _window(img: "Image.Image", config: PreprocessConfig, size: tuple[int, int], scale: int,
            whole: bool = False) -> "np.ndarray":
    """The output window of :func:`geometry` for an image of ``size`` (width, height), cut
    from ``img``: that image decoded at ``1/scale`` of its size (DCT scaling: pixel ``i``
    covers original pixels ``[scale*i, scale*(i+1))``). uint8 (H, W, C).

    Unless ``whole``, only the part of the resized image that the window shows is computed
    (PIL's ``resize(box=...)``, with the whole-image resize's filter scale and centres),
    in the original image's coordinates: against resizing the whole image and cropping,
    bilinear differs by rounding (at most 1 level), bicubic and lanczos at a few pixels by
    up to about 10 levels (Pillow takes the box as float32 and rounds and clips the row
    pass's output; mean up to 0.15 on photos), at a fraction of the cost."""
    import numpy as np

    _, out_h, out_w = config.input_size
    g = geometry(size[0], size[1], config)
    new_w, new_h = g.size
    resample = _RESAMPLE[config.interpolation]
    if scale == 1 and (whole or config.interpolation == "nearest" or g.size == img.size):
        # nearest: PIL picks other pixels at exact ties when given a box; the same size: a crop only
        if g.size != img.size:
            img = img.resize(g.size, resample=resample)
        full: Any = _pad(np.asarray(img, dtype=np.uint8).reshape(new_h, new_w, -1), g)
        left, top = g.crop
        return full[top:top + out_h, left:left + out_w].copy()
    # the output window in the resized image's coordinates, and the part of it the image covers
    x0, y0 = g.crop[0] - g.pad[0], g.crop[1] - g.pad[1]
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(new_w, x0 + out_w), min(new_h, y0 + out_h)
    sx, sy = size[0] / new_w / scale, size[1] / new_h / scale  # decoded pixels per resized pixel
    box = (ix0 * sx, iy0 * sy, min(ix1 * sx, img.size[0]), min(iy1 * sy, img.size[1]))
    part = np.array(img.resize((ix1 - ix0, iy1 - iy0), resample=resample, box=box), dtype=np.uint8)
    part = part.reshape(iy1 - iy0, ix1 - ix0, -1)
    if (ix0, iy0, ix1, iy1) == (x0, y0, x0 + out_w, y0 + out_h):
        return part
    out = np.empty((out_h, out_w, part.shape[2]), dtype=np.uint8)
    out[:] = np.asarray(g.fill[:part.shape[2]], dtype=np.uint8)
    out[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = part
    return out


def _pad(arr: "np.ndarray", g: Geometry) -> "np.ndarray":
    """``arr`` (H, W, C) inside a canvas of ``g.fill`` grown by ``g.pad``."""
    import numpy as np

    if not any(g.pad):
        return arr
    h, w, c = arr.shape
    canvas = np.empty((h + g.pad[1] + g.pad[3], w + g.pad[0] + g.pad[2], c), dtype=np.uint8)
    canvas[:] = np.asarray(g.fill[:c], dtype=np.uint8)
    canvas[g.pad[1]:g.pad[1] + h, g.pad[0]:g.pad[0] + w] = arr
    return canvas


def preprocess_bytes(data: bytes, config: PreprocessConfig, max_pixels: int | None = MAX_IMAGE_PIXELS) -> "np.ndarray":
    """Decode + resize + crop: image bytes -> uint8 (H, W, C), the way every step decodes
    (featurize, evaluate, predict, fine-tuning, and the GPU path's fallback).

    JPEGs take the fast path (:func:`_preprocess_jpeg`): a large one is decoded at a
    reduced size in the DCT domain, then only the output window is resized; its pixels are
    within :data:`JPEG_TOLERANCE` of :func:`decode_image` + :func:`resize_crop`. Every
    other format, and every JPEG the fast path does not take (CMYK, a damaged or truncated
    file, one over ``max_pixels``), goes through :func:`decode_image` + :func:`resize_crop`,
    which give the pixels and the error messages they gave before the fast path existed
    (timm's and torchvision's eval transforms of the same image, exactly).

    Raises:
        ValueError: the file cannot be decoded, with the reason (see :func:`decode_image`).
    """
    fast = _preprocess_jpeg(data, config, max_pixels)
    if fast is not None:
        return fast
    return resize_crop(decode_image(data, config.input_size[0], max_pixels), config)


# ---------------------------------------------------------------------------------------
# the fast path for JPEGs
#
# A JPEG that Pillow opens as RGB or L is decoded by libjpeg-turbo (Pillow's own) at 1/2,
# 1/4 or 1/8 of its size when that leaves at least DCT_MARGIN times the resize target on
# both sides (Pillow's draft(): the inverse DCT computes fewer pixels, as its thumbnail()
# does with reducing_gap), and only the output window is resized (_window), in the
# original image's coordinates, so every crop mode keeps the PIL path's geometry.
#
# Measured on one core of this project's machine (shared: ratios of runs side by side),
# 224 px output: 256-500 px JPEGs 1.5x (bilinear) and 1.7x (bicubic) the images per
# core-second of the old path (decode, resize the whole image, crop); 2,000-4,000 px
# JPEGs 5.4x and 6.5x. What was tried and not kept:
# * simplejpeg (libjpeg-turbo in a 1 MB wheel, with the same DCT scaling): it decodes a
#   small JPEG in 0.38 ms against Pillow's 0.61, but copying its NumPy array into a PIL
#   image costs 0.3 ms (RGB is unpacked to Pillow's 4-byte pixels), so the whole path was
#   no faster (within the noise, small and large), with identical pixels: not worth a
#   dependency.
# * torchvision.io.decode_jpeg + v2.functional.resize on uint8 (AVX2, about twice as
#   fast as Pillow's resampler on small images: 2.4-2.9x the old path there): torch in
#   every read task costs 1.3 s to import (4-6 s on a loaded machine) and 275 MB of
#   private memory per worker process (psutil's USS), against ~0.45 ms saved per small
#   image, so it pays only after ~3,000 images per process; decode_jpeg has no DCT
#   scaling (large JPEGs decode 2.3x slower than here), and torchvision 0.29 deprecates
#   its image decoding in favour of TorchCodec. The read tasks stay torch-free.
# * PyTurboJPEG: needs the system's libturbojpeg, which no wheel ships.

# A JPEG is decoded at 1/s of its size (s = 2, 4 or 8) only while that leaves at least
# DCT_MARGIN times the resized size on both sides. Measured against the PIL path on
# photos and mosaics of photos of 2,000-4,000 px (bicubic, 224 px): 1.5 gives mean
# differences of 0.25-0.8 levels; 1.0 would be ~1.2x faster again with mean 0.6-1.0 and
# a 99th percentile up to 19; 2.0 ~1.2x slower with mean 0.27 and 99th percentile <= 4.
DCT_MARGIN = 1.5

# The fast path's pixels against the PIL path's, per image, in 8-bit levels: the mean
# absolute difference and its 99th percentile, for JPEGs decoded at full size ("full":
# the same decoder and filter, only the window resized: rounding) and at a reduced size ("scaled": a box
# over the DCT block, then the resize filter, against the resize filter alone). Measured
# on real photos well inside these (tests/surgery/test_preprocess.py).
JPEG_TOLERANCE = {"full": {"mean": 0.25, "p99": 1}, "scaled": {"mean": 1.5, "p99": 10}}


def dct_scale(width: int, height: int, config: PreprocessConfig) -> int:
    """The reduction (1, 2, 4 or 8) the fast path decodes a ``width`` x ``height`` JPEG at
    for ``config``: the largest that leaves at least :data:`DCT_MARGIN` times the resized
    size on both sides (1 for ``nearest``, which would pick from block averages)."""
    if config.interpolation == "nearest":
        return 1
    new_w, new_h = geometry(width, height, config).size
    for s in (8, 4, 2):
        if width / s >= DCT_MARGIN * new_w and height / s >= DCT_MARGIN * new_h:
            return s
    return 1


def _preprocess_jpeg(data: bytes, config: PreprocessConfig, max_pixels: int | None) -> "np.ndarray | None":
    """``data`` decoded, resized and cropped as :func:`preprocess_bytes` says, uint8 (H, W,
    C); None when the fast path does not take it (not a JPEG, not RGB or L, over
    ``max_pixels`` or Pillow's own limit, or anything failing): the PIL path then decides,
    with its own error message if it fails too."""
    import io
    import warnings

    from PIL import Image

    if not isinstance(data, (bytes, bytearray)) or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header
        with img:
            width, height = img.size
            limit = min(max_pixels if max_pixels is not None else math.inf, Image.MAX_IMAGE_PIXELS or math.inf)
            if img.format not in ("JPEG", "MPO") or img.mode not in ("RGB", "L") or width * height > limit:
                return None
            scale = dct_scale(width, height, config)
            if scale > 1:
                img.draft(img.mode, (width // scale, height // scale))
                if img.size != (-(-width // scale), -(-height // scale)):
                    return None  # a reduction draft() chose otherwise: the PIL path
            img.load()
            mode = "RGB" if config.input_size[0] == 3 else "L"
            decoded = img if img.mode == mode else img.convert(mode)
            return _window(decoded, config, (width, height), scale)  # before ``img`` is closed
    except Exception:  # the PIL path decodes it again and names what is wrong
        return None
