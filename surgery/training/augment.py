"""Training augmentation, fresh every epoch: torchvision ``transforms.v2`` applied to
each image with torch's random generator seeded by (seed, epoch, row id), so every epoch
sees new crops and flips, and a rerun with the same seed sees the same ones.

Where it runs: the image decoders (Ray Data tasks) resize each training image so its
shorter side is the model's ``resize_size`` and cut the centre square (256 px for a
224-px model), the same for every epoch; the training function applies the transforms to
those squares batch by batch, then resizes and centre-crops the result to the model's
input size if the transforms did not end there. The default is torchvision's standard
recipe: ``RandomResizedCrop(crop size)`` then ``RandomHorizontalFlip()``.

Transforms are given as ``transforms.v2`` objects, or as plain data (the YAML form):
a class name, or a one-key mapping of a class name to its keyword arguments::

    ["RandomResizedCrop", {"RandomHorizontalFlip": {"p": 0.5}}, {"ColorJitter": {"brightness": 0.2}}]
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence

import torch

__all__ = ["DEFAULT_AUGMENT", "Augmentation", "transforms_from", "check_augment"]

DEFAULT_AUGMENT: tuple[Any, ...] = ("RandomResizedCrop", "RandomHorizontalFlip")  # torchvision's standard recipe

_NEEDS_SIZE = {"RandomResizedCrop", "RandomCrop", "CenterCrop", "Resize", "RandomResize"}  # size defaults to the crop size


def _spec(item: Any) -> tuple[str, dict[str, Any]] | None:
    """(class name, keyword arguments) of a plain-data transform; None for an object."""
    if isinstance(item, str):
        return item, {}
    if isinstance(item, dict):
        if len(item) != 1:
            raise ValueError(f"a transform is a class name or a one-key mapping of a class name to its arguments, got {item!r}")
        (name, kwargs), = item.items()
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"the arguments of transform {name!r} must be a mapping, got {kwargs!r}")
        return str(name), dict(kwargs or {})
    return None


def transforms_from(items: Sequence[Any], size: tuple[int, int]) -> list[Any]:
    """``transforms.v2`` objects from objects or plain data; crop/resize transforms given
    by name without a ``size`` get the model's input ``size`` (H, W).

    Raises:
        ValueError: naming a transform ``torchvision.transforms.v2`` lacks, or bad arguments.
    """
    from torchvision.transforms import v2

    out = []
    for item in items:
        spec = _spec(item)
        if spec is None:
            if not callable(item):
                raise ValueError(f"augment items must be transforms.v2 objects or names, got {item!r}")
            out.append(item)
            continue
        name, kwargs = spec
        cls = getattr(v2, name, None)
        if not isinstance(cls, type):
            known = sorted(n for n in dir(v2) if n[:1].isupper() and isinstance(getattr(v2, n), type))
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            raise ValueError(f"transform {name!r} is not in torchvision.transforms.v2"
                             + (f". Closest: {', '.join(close)}" if close else "") + ". Hint: use a class name such as "
                             "RandomResizedCrop, RandomHorizontalFlip, ColorJitter, RandAugment")
        if name in _NEEDS_SIZE and "size" not in kwargs:
            kwargs["size"] = list(size)
        try:
            out.append(cls(**kwargs))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"transform {name} with arguments {kwargs}: {exc}") from None
    return out


def check_augment(augment: Any) -> tuple[Any, ...] | None:
    """``augment`` as a tuple of transforms (``True``: the default recipe), or None (off).

    Raises:
        ValueError: for anything else, or an unknown transform name.
    """
    if augment is False or augment is None:
        return None
    if augment is True:
        return DEFAULT_AUGMENT
    if isinstance(augment, (str, dict)) or not isinstance(augment, Sequence):
        augment = [augment]
    items = tuple(augment)
    transforms_from(items, (8, 8))  # every name and argument checked now, not in a worker
    return items


def _row_seed(seed: int, epoch: int, row: int) -> int:
    # a fixed mix (Python's hash of ints is not salted, but spell it out): distinct for nearby rows and epochs
    return (seed * 1_000_003 + epoch * 998_244_353 + row * 2_654_435_761) % (2**63 - 1)


class Augmentation:
    """Applies the transforms to a batch of uint8 images, each with its own seeded draw.

    Example:
        >>> aug = Augmentation(("RandomResizedCrop", "RandomHorizontalFlip"), size=(224, 224))
        >>> out = aug(pixels, row_ids, seed=0, epoch=3)  # (B, 256, 256, 3) uint8 -> (B, 3, 224, 224) uint8
    """

    def __init__(self, items: Sequence[Any], size: Sequence[int]) -> None:
        from torchvision.transforms import v2

        h, w = size
        self.size = (int(h), int(w))
        self.transform = v2.Compose(transforms_from(items, self.size))

    def __call__(self, pixels: torch.Tensor, row_ids: Sequence[int], *, seed: int, epoch: int) -> torch.Tensor:
        """(B, H, W, C) uint8 -> (B, C, h, w) uint8, ``size`` = (h, w)."""
        from torchvision.transforms.v2 import functional as F

        images = pixels.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        out = []
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            for image, row in zip(images, row_ids):
                torch.manual_seed(_row_seed(int(seed), int(epoch), int(row)))
                y = self.transform(image.contiguous())
                if tuple(y.shape[-2:]) != self.size:
                    y = F.center_crop(F.resize(y, list(self.size), antialias=True), list(self.size))
                out.append(y)
        return torch.stack(out)
