"""Odd and bad image files made in memory: the corner cases a bucket of user images holds."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from imagesets import draw, encode
from PIL import Image


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def png_bomb(side: int = 12_000) -> bytes:
    """A valid grayscale PNG of ``side`` x ``side`` zeros: ~100 KB on disk, side² bytes
    decoded (and three times that as RGB)."""
    return _png(side, side, 8, 0, (b"\x00" * (side + 1)) * side)


def rgb48_png(size: int = 24) -> bytes:
    """A 16-bit-per-channel RGB PNG (a ramp), which Pillow reads as 8-bit RGB."""
    ramp = np.linspace(0, 65535, size * size * 3).astype(">u2").reshape(size, size * 3)
    return _png(size, size, 16, 2, b"".join(b"\x00" + row.tobytes() for row in ramp))


def gray16_png(size: int = 24) -> bytes:
    ramp = np.linspace(0, 65535, size * size).astype(np.uint16).reshape(size, size)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "PNG")  # mode I;16
    return buf.getvalue()


def cmyk_jpeg(size: int = 24) -> bytes:
    buf = io.BytesIO()
    draw("red_disc", np.random.default_rng(3), size).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def animated_gif(size: int = 24) -> bytes:
    frames = [draw(c, np.random.default_rng(4), size) for c in ("green_square", "blue_bar", "red_disc")]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def float_tiff(size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 1, size * size, dtype=np.float32).reshape(size, size), mode="F").save(buf, "TIFF")
    return buf.getvalue()


def odd_but_good() -> dict[str, bytes]:
    """Files that must be featurized: unusual modes and depths, and unusual names."""
    jpeg = encode(draw("blue_bar", np.random.default_rng(5), 24), "JPEG")
    return {
        "red_disc/cmyk.jpg": cmyk_jpeg(),
        "red_disc/gray16.png": gray16_png(),
        "green_square/rgb48.png": rgb48_png(),
        "green_square/animated.gif": animated_gif(),
        "blue_bar/float.tiff": float_tiff(),
        "blue_bar/é 日本 #1 %20 +x.jpg": jpeg,
        "blue_bar/" + "n" * 240 + ".jpg": jpeg,  # 244 bytes: near the 255-byte name limit
    }


def bad() -> dict[str, tuple[bytes, str]]:
    """Files that must become error rows: {relative path: (bytes, expected reason part)}."""
    good_jpeg = encode(draw("red_disc", np.random.default_rng(1), 32), "JPEG")
    good_png = encode(draw("green_square", np.random.default_rng(2), 32), "PNG")
    return {
        "red_disc/truncated.jpg": (good_jpeg[: len(good_jpeg) // 3], "cannot decode image"),
        "green_square/truncated.png": (good_png[: len(good_png) // 2], "cannot decode image"),
        "red_disc/empty.jpg": (b"", "empty file"),
        "green_square/notes.jpg": (b"these are my notes, not a picture\n", "not an image file"),
        "blue_bar/page.png": (b"<!doctype html><html><body>403 Forbidden</body></html>", "not an image file"),
        "blue_bar/bomb.png": (png_bomb(), "image too large"),
    }
