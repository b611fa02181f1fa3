"""Exploration (benchmarks/explore/README.md, round 17): are students that start from the same
weights (the zipped teacher) and differ only in their batches still in one basin, so that
averaging their weights (a model soup) keeps what averaging their predictions gains?

    python benchmarks/explore/soup.py STUDENT_A.pt STUDENT_B.pt [...]

Each file is a LeNet-5-half state dict saved by `pool_distill.py --save_student`. Prints each
student's test accuracy, their prediction ensemble, the uniform weight average, and the
accuracy along the straight line between the first two (the loss-barrier check).
"""
import sys

import torch

from dafl.datasets import InputAdapter, load_split
from dafl.models import build_model
from dafl.weights import load_classifier

_, meta = load_classifier("checkpoints/fashion_mnist_lenet5_bn.safetensors")
adapt = InputAdapter(meta["native_size"], meta["image_size"], meta["mean"], meta["std"])
test = load_split("fashion-mnist", "test")
test_x, test_y = adapt(test.images), test.labels


def probabilities(state):
    net = build_model("lenet5_half", num_classes=10)
    net.load_state_dict(state)
    net.eval()
    with torch.no_grad():
        return torch.cat([net(x).softmax(1) for x in test_x.split(2000)])


def accuracy(probs):
    return (probs.argmax(1) == test_y).float().mean().item()


def per_class(probs):
    right = probs.argmax(1) == test_y
    return [round(right[test_y == c].float().mean().item(), 2) for c in range(10)]


states = [torch.load(path, weights_only=True) for path in sys.argv[1:]]
probs = [probabilities(s) for s in states]
for path, p in zip(sys.argv[1:], probs):
    print(f"{path}: {accuracy(p):.4f} {per_class(p)}")
ensemble = sum(probs) / len(probs)
soup = probabilities({k: sum(s[k] for s in states) / len(states) for k in states[0]})
print(f"mean of the students: {sum(accuracy(p) for p in probs) / len(probs):.4f}")
print(f"prediction ensemble: {accuracy(ensemble):.4f} {per_class(ensemble)}")
print(f"weight average (soup): {accuracy(soup):.4f} {per_class(soup)}")
line = [round(accuracy(probabilities({k: (1 - t) * states[0][k] + t * states[1][k] for k in states[0]})), 4)
        for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
print(f"line from the first to the second at 0, 0.25, 0.5, 0.75, 1: {line}")
