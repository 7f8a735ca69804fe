"""Decoding images in the model actors, in batches, on their device (``decode="gpu"``).

With GPU actors the CPUs are the bottleneck of a featurization: decoding a JPEG costs
more CPU than the GPU spends on its forward pass. So with ``decode="gpu"`` the read tasks
only fetch the files' bytes, compressed bytes (about a tenth of the decoded pixels) travel
through the object store, and each model actor decodes its batch where it runs:

* JPEGs (recognised by their magic bytes) go through ``torchvision.io.decode_jpeg`` on a
  list of tensors with ``device`` set (nvJPEG on CUDA, batched), then are resized
  (antialiased), padded and centre-cropped as the model's ``crop_mode`` says (see
  :func:`freezeray.images.geometry`), as tensors on the same device;
* other formats, and any JPEG the batched decoder refuses, take the CPU path of
  :mod:`freezeray.images` (PIL), one file at a time, which gives the same error rows
  as CPU decoding does (the same messages, the same decompression-bomb check, made from
  the header before decoding).

torchvision's nvJPEG decoding was chosen over NVIDIA DALI and nvImageCodec: it needs no
other package (DALI and nvImageCodec are CUDA-version-specific wheels), decodes a list in
one call, and the resize/crop stay in torch on the same device. The CPU device runs the
same code (libjpeg-turbo), which is how it is tested on machines without a GPU; there its
pixels match PIL's within the tolerance :data:`PIXEL_TOLERANCE` states.

torchvision 0.29 deprecates its image decoding (a ``DeprecationWarning`` on every call) in
favour of TorchCodec. It is kept, with that one warning silenced around the call, because
it ships with the pinned torchvision and has run here, while TorchCodec (``torchcodec``
0.17 works with torch 2.14.1) would be one more CUDA-specific wheel whose batched GPU JPEG
decoding has not been measured on this project's GPU machines; ``benchmarks/gpu.py``
measures this path, and is where a switch would be checked. The CPU read tasks do not use
torchvision at all (:func:`freezeray.images.preprocess_bytes`, torch-free).
"""

from __future__ import annotations

import io
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from freezeray.images import MAX_IMAGE_PIXELS, PreprocessConfig, geometry, preprocess_bytes

__all__ = ["decode_batch", "is_jpeg", "resize_crop_tensor", "PIXEL_TOLERANCE"]

# GPU (tensor) path against the PIL path, on the same JPEG, in 8-bit levels: the mean
# absolute difference over all pixels, and the largest difference of 99% of them.
# libjpeg-turbo and PIL's libjpeg agree; the resize filters differ slightly.
PIXEL_TOLERANCE = {"mean": 2.0, "p99": 16}

_INTERPOLATION = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "BICUBIC"}


def is_jpeg(data: bytes | None) -> bool:
    return bool(data) and data[:3] == b"\xff\xd8\xff"  # type: ignore[index]


def _header_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        return img.size


def resize_crop_tensor(img: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """(C, H, W) uint8 -> (H', W', C) uint8: resized (antialiased), padded and cropped to
    the input size as ``config.crop_mode`` says, the same geometry as
    :func:`freezeray.images.resize_crop` (:func:`freezeray.images.geometry`)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    _, out_h, out_w = config.input_size
    _, h, w = img.shape
    g = geometry(w, h, config)
    new_w, new_h = g.size
    if (new_w, new_h) != (w, h):
        mode = getattr(InterpolationMode, _INTERPOLATION[config.interpolation])
        img = TF.resize(img, [new_h, new_w], interpolation=mode, antialias=True)
    if any(g.pad):  # smaller than the crop: pad with the mode's fill, as timm and torchvision do
        left_pad, top_pad, right_pad, bottom_pad = g.pad
        fill = torch.tensor(g.fill[:img.shape[0]], dtype=img.dtype, device=img.device).view(-1, 1, 1)
        canvas = fill.expand(img.shape[0], new_h + top_pad + bottom_pad, new_w + left_pad + right_pad).clone()
        canvas[:, top_pad:top_pad + new_h, left_pad:left_pad + new_w] = img
        img = canvas
    left, top = g.crop
    return img[:, top:top + out_h, left:left + out_w].permute(1, 2, 0)  # (C, H, W) -> (H, W, C)


def _decode_jpeg(data: Any, **kwargs: Any) -> Any:
    """``torchvision.io.decode_jpeg`` without its deprecation warning (see the module docstring)."""
    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        return decode_jpeg(data, **kwargs)


def _cpu(data: bytes, config: PreprocessConfig, max_pixels: int | None, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(preprocess_bytes(data, config, max_pixels)).to(device)


def decode_batch(blobs: Sequence[bytes | None], errors: Sequence[str], config: PreprocessConfig,
                 device: torch.device, max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, list[str]]:
    """Decode and preprocess a batch of image files on ``device``.

    Args:
        blobs: each file's bytes (None where reading failed).
        errors: "" for the files that were read, else the reason (kept as it is).

    Returns:
        (B, H, W, C) uint8 pixels on ``device`` (zeros for error rows) and the error of each row.
    """
    from torchvision.io import ImageReadMode

    c, h, w = config.input_size
    errors = list(errors)
    out = torch.zeros((len(blobs), h, w, c), dtype=torch.uint8, device=device)
    jpegs = []
    for i, data in enumerate(blobs):
        if errors[i] or data is None:
            errors[i] = errors[i] or "cannot read: no bytes"
            continue
        if not is_jpeg(data):
            continue
        try:
            width, height = _header_size(data)
        except Exception:
            continue  # the CPU path names what is wrong with it
        if max_pixels is not None and width * height > max_pixels:
            continue  # refused by the CPU path, with its message, before decoding
        jpegs.append(i)
    mode = ImageReadMode.RGB if c == 3 else ImageReadMode.GRAY
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs]  # type: ignore[arg-type]
        try:
            decoded = dict(zip(jpegs, _decode_jpeg(tensors, mode=mode, device=device)))
        except Exception:  # one bad file fails the batched call: decode them one by one
            for i, t in zip(jpegs, tensors):
                try:
                    decoded[i] = _decode_jpeg(t, mode=mode, device=device)
                except Exception:
                    pass  # the CPU path decides
    for i, data in enumerate(blobs):
        if errors[i]:
            continue
        try:
            if i in decoded:
                out[i] = resize_crop_tensor(decoded[i], config)
            else:
                out[i] = _cpu(data, config, max_pixels, device)  # type: ignore[arg-type]
        except Exception as exc:  # a bad file is an error row, never a failed job
            errors[i] = str(exc) or type(exc).__name__
    return out, errors


def mean_difference(a: np.ndarray | Any, b: np.ndarray | Any) -> tuple[float, float]:
    """(mean, 99th percentile) of the absolute difference of two uint8 images."""
    d = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return float(d.mean()), float(np.percentile(d, 99))


def normalize(batch: torch.Tensor, config: PreprocessConfig, dtype: torch.dtype | None = None) -> torch.Tensor:
    """uint8 (B, H, W, C) -> normalised float (B, C, H, W)."""
    dtype = dtype or torch.float32
    mean = torch.tensor(config.mean, dtype=dtype, device=batch.device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, dtype=dtype, device=batch.device).view(1, -1, 1, 1)
    x = batch.permute(0, 3, 1, 2).to(dtype).div_(255.0)  # (B, H, W, C) -> (B, C, H, W)
    return x.sub_(mean).div_(std)
