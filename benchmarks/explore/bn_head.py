"""Exploration (explore/README.md, tenth round): a LeNet-5 teacher with BatchNorm in its
fully connected head too (`lenet5_bn_head`: BatchNorm1d after fc 84), so that model
inversion can match the statistics of the features the classifier reads, not only of the
convolutions'. Research only: importing this module registers the architecture (zipit and
the product's configs do not know it).

    python benchmarks/explore/bn_head.py fit --config configs/fashion_mnist/teacher_lenet5_bn.yaml \\
        --model.arch lenet5_bn_head ...     # trains the teacher through `python -m dafl`
    python benchmarks/explore/pool_distill.py --teacher T.safetensors ...   # imports this file itself
"""
import runpy
import sys

from torch import nn

from dafl.models import LeNet5, register


@register("lenet5_bn_head")
def lenet5_bn_head(in_channels: int = 1, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    net = LeNet5(in_channels, num_classes, image_size, batch_norm=True)
    fc1, relu, out = net.classifier
    net.classifier = nn.Sequential(fc1, nn.BatchNorm1d(fc1.out_features), relu, out)
    return net


if __name__ == "__main__":
    sys.argv = ["dafl", *sys.argv[1:]]
    runpy.run_module("dafl", run_name="__main__", alter_sys=True)
