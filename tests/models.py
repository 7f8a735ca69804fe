"""Small models registered in the zoo for tests (real layers, small inputs)."""

import torch
from torch import nn

from surgery import PreprocessConfig
from surgery.zoo import register_model


class TinyCNN(nn.Module):
    """conv-BN-ReLU-dropout, conv-BN-ReLU, pool, flatten, fc-ReLU, fc: BatchNorm and
    dropout in the part that gets frozen, so freezing has something to prove."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.drop1 = nn.Dropout2d(0.2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.flatten(self.pool(x))
        return self.fc2(torch.relu(self.fc1(x)))


@register_model("tiny_cnn_test", preprocessing=PreprocessConfig(input_size=(3, 16, 16), crop_pct=1.0))
def tiny_cnn_test(num_classes: int = 10) -> nn.Module:
    return TinyCNN(num_classes)


def tiny_head(tiny_name: str, ftc, n_out: int = 3):
    """The tiny model frozen to ``flatten`` with a new ``n_out``-class output (seeded)."""
    import surgery
    from surgery import TransferLearning
    from surgery.layers import Output

    torch.manual_seed(0)
    return (TransferLearning(surgery.zoo.load(tiny_name)).fine_tune_configuration(ftc).set_feature_extractor("flatten")
            .remove_vertex_keep_connections("fc2").add_layer("fc2", Output(n_out, loss="cross_entropy")).build())


class WideCNN(nn.Module):
    """A model whose pooled-free features are very wide (1,024 channels at the input's
    resolution): featurized at 32 px, a row holds 1,048,576 values (2 MiB in float16)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 1024, 1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(1024 * 32 * 32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.expand(torch.relu(self.conv1(x)))))


@register_model("wide_cnn_test", preprocessing=PreprocessConfig(input_size=(3, 32, 32), crop_pct=1.0))
def wide_cnn_test(num_classes: int = 10) -> nn.Module:
    return WideCNN(num_classes)


class BusyCNN(nn.Module):
    """A model whose forward pass costs more than decoding its (64 px) input: three
    64-channel 3x3 convolutions at full resolution, ~0.5 GFLOP an image. Where a test needs
    the model actors to be the bottleneck (work spreading over several nodes' actors), the
    tiny model is not: its actors wait for the decode tasks and one of them can take every
    block as it comes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.fc(self.flatten(self.pool(x)))


@register_model("busy_cnn_test", preprocessing=PreprocessConfig(input_size=(3, 64, 64), crop_pct=1.0))
def busy_cnn_test(num_classes: int = 10) -> nn.Module:
    return BusyCNN(num_classes)
