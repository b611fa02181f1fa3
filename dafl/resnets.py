"""The ResNet classifiers of the registry (`dafl.models`): torchvision's ResNet with a CIFAR
stem, and the thin CIFAR ResNets of He et al. Each forward accepts `return_features=True`
(the pooled vector) like every registered classifier."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class CifarResNet(ResNet):
    """torchvision's ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool)."""

    def __init__(self, layers: list[int], in_channels: int, num_classes: int):
        super().__init__(BasicBlock, layers, num_classes=num_classes)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        self.feature_dim = 512

    def forward(self, x: torch.Tensor, return_features: bool = False):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        features = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(features)
        return (logits, features) if return_features else logits


class ThinResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, section 4.2): a 3x3 stem and three stages of
    `blocks` basic blocks at 16, 32 and 64 channels (depth 6 * blocks + 2), 1x1-conv
    shortcuts where the shape changes. Forward FLOPs per 32x32 image: ResNet-8 24M, ResNet-20
    81M, against 1.1G for ResNet-18, so small enough to distil on a CPU."""

    def __init__(self, blocks: int, in_channels: int, num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(inplace=True))
        stages, width = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks):
                step = stride if i == 0 else 1
                shortcut = None
                if step != 1 or width != planes:
                    shortcut = nn.Sequential(nn.Conv2d(width, planes, 1, stride=step, bias=False),
                                             nn.BatchNorm2d(planes))
                stages.append(BasicBlock(width, planes, step, shortcut))
                width = planes
        self.blocks = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)
        self.feature_dim = 64

    def forward(self, x: torch.Tensor, return_features: bool = False):
        features = self.blocks(self.stem(x)).mean(dim=(2, 3))
        logits = self.fc(features)
        return (logits, features) if return_features else logits
