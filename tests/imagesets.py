"""Generated image sets for tests: classes that differ in colour and shape, written as
real JPEG/PNG/WebP files (plus grayscale, palette and RGBA ones) into an ImageFolder tree."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red_disc": (220, 40, 40), "green_square": (40, 200, 60), "blue_bar": (50, 80, 230)}


def draw(cls: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """One image of class ``cls``: its shape in its colour on a noisy background."""
    bg = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    d = ImageDraw.Draw(img)
    colour = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLOURS[cls])
    cx, cy = rng.integers(size // 3, 2 * size // 3, 2)
    r = int(rng.integers(size // 6, size // 3))
    if cls == "red_disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif cls == "green_square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.rectangle([2, cy - r // 3, size - 3, cy + r // 3], fill=colour)
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_image_folder(put, per_class: int = 20, size: int = 48, seed: int = 0, odd_modes: bool = True) -> dict[str, int]:
    """Write ``<class>/<n>.<ext>`` files through ``put(relative_path, bytes)``.

    Every fifth image is PNG and every seventh WebP, the rest JPEG; with ``odd_modes``,
    the first image of the first class is grayscale, the second RGBA and the third a
    palette PNG. Returns {relative path: label index}.
    """
    rng = np.random.default_rng(seed)
    labels = {}
    for label, cls in enumerate(sorted(COLOURS)):
        for i in range(per_class):
            img = draw(cls, rng, size)
            fmt, ext = ("PNG", "png") if i % 5 == 4 else (("WEBP", "webp") if i % 7 == 6 else ("JPEG", "jpg"))
            if odd_modes and label == 0 and i in (0, 1, 2):
                img, fmt, ext = [(img.convert("L"), "JPEG", "jpg"), (img.convert("RGBA"), "PNG", "png"),
                                 (img.convert("P"), "PNG", "png")][i]
            path = f"{cls}/{i:04d}.{ext}"
            put(path, encode(img, fmt))
            labels[path] = label
    return labels


def bad_files() -> dict[str, bytes]:
    """A truncated JPEG, a zero-byte file and a text file named .jpg."""
    good = encode(draw("red_disc", np.random.default_rng(1)), "JPEG")
    return {"red_disc/truncated.jpg": good[: len(good) // 3], "red_disc/empty.jpg": b"",
            "green_square/notes.jpg": b"this is not an image\n"}


def write_folder(root, **kw) -> dict[str, int]:
    """:func:`write_image_folder` into a local folder ``root`` (a ``pathlib.Path``)."""
    def put(p, b):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(b)

    return write_image_folder(put, **kw)
