"""VGG16 with DL4J/Keras vertex names, accepting torchvision's VGG16 weights.

Vertices: ``block1_conv1`` ... ``block5_conv3`` (3x3 convolutions with their ReLU),
``block1_pool`` ... ``block5_pool``, then ``avgpool``, ``flatten``, ``fc1``, ``fc2`` and
``predictions`` (softmax, NLL loss), as in DL4J's zoo VGG16. ``avgpool`` is torchvision's
adaptive 7x7 pool, kept so the ImageNet head works at any input size (at 224 px it is
the identity). torchvision's two classifier dropouts (p=0.5) become the input dropout
of ``fc2`` and ``predictions``.
"""

from __future__ import annotations

from torch import nn

from .layers import Convolution, Dense, Output

__all__ = ["VGG16", "torchvision_keys"]

_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))


class VGG16(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        in_ch = 3
        for block, convs, width in _BLOCKS:
            for i in range(1, convs + 1):
                setattr(self, f"block{block}_conv{i}", Convolution(width, 3, padding=1, activation="relu", n_in=in_ch))
                in_ch = width
            setattr(self, f"block{block}_pool", nn.MaxPool2d(2, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.flatten = nn.Flatten(1)
        self.fc1 = Dense(4096, activation="relu", n_in=512 * 7 * 7)
        self.fc2 = Dense(4096, activation="relu", dropout=0.5, n_in=4096)
        self.predictions = Output(num_classes, loss="nll", activation="softmax", dropout=0.5, n_in=4096)

    def forward(self, x):
        for block, convs, _ in _BLOCKS:
            for i in range(1, convs + 1):
                x = getattr(self, f"block{block}_conv{i}")(x)
            x = getattr(self, f"block{block}_pool")(x)
        x = self.flatten(self.avgpool(x))
        return self.predictions(self.fc2(self.fc1(x)))


def torchvision_keys() -> dict[str, str]:
    """torchvision ``vgg16`` state-dict key -> freezeray key."""
    mapping: dict[str, str] = {}
    index = 0
    for block, convs, _ in _BLOCKS:
        for i in range(1, convs + 1):
            for p in ("weight", "bias"):
                mapping[f"features.{index}.{p}"] = f"block{block}_conv{i}.conv.{p}"
            index += 2  # conv, relu
        index += 1  # pool
    for tv, ours in (("0", "fc1"), ("3", "fc2"), ("6", "predictions")):
        for p in ("weight", "bias"):
            mapping[f"classifier.{tv}.{p}"] = f"{ours}.linear.{p}"
    return mapping
