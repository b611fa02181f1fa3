"""Networks as a user would write them, outside dafl's registry: their own class and key
names (for tests that bring their own teacher by class path)."""
import torch
from torch import nn


class SmallNet(nn.Module):
    """A LeNet-like classifier with BatchNorm for 1 x 32 x 32 inputs, keys `f.*` and `head.*`."""

    def __init__(self, classes: int = 10, width: int = 8):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, width, 5), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(width, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 5 * 5, 32), nn.ReLU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.f(x))


class NotAClassifier(nn.Module):
    """Returns feature maps, not (N, classes) logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return self.conv(x)


def trained_small_net(seed: int = 0, steps: int = 60) -> SmallNet:
    """A SmallNet fitted briefly on scikit-learn digits (padded to 32 px), so that it is a
    teacher with something to teach."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x - 0.3) / 0.4
    y = torch.tensor(digits.target)
    net = SmallNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(steps):
        batch = torch.randint(len(y), (128,))
        loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()
