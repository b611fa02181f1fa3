"""Exploration (benchmarks/explore/README.md): a LeNet-5-half made from the teacher by
folding BatchNorm and zipping each layer to half width within the one model.

    python benchmarks/explore/zip_teacher_to_half.py [real | PATH_TO_SAVED_IMAGES.pt]

The product version is `dafl.student_init` (`student_init: zip_teacher`), tested to give the same weights.
"""
import torch, torch.nn as nn, sys
from dafl.weights import load_classifier
from dafl.models import build_model
from dafl.datasets import load_split, InputAdapter
from dafl.zipit import feature_correlations, zip_match, groups_to_matrices, merge_tensor, merge_spec
torch.manual_seed(0)
T, meta = load_classifier("checkpoints/fashion_mnist_lenet5_bn.safetensors"); T.eval()
ad = InputAdapter(meta["native_size"], 32, meta["mean"], meta["std"])
test = load_split("fashion-mnist", "test"); tx = ad(test.images); ty = test.labels
src = sys.argv[1] if len(sys.argv) > 1 else "real"
if src == "real":
    imgs = ad(load_split("fashion-mnist", "train").images[torch.randperm(60000)[:2048]])
else:
    imgs = torch.load(src)
def acc(n):
    with torch.no_grad(): return (torch.cat([n(x) for x in tx.split(2000)]).argmax(1) == ty).float().mean().item()
print("teacher", acc(T))
# fold BN into conv (eval)
F = build_model("lenet5", num_classes=10)
sd = T.state_dict(); fsd = {}
for conv, bn in ((0, 1), (4, 5), (8, 9)):
    g = sd[f"features.{bn}.weight"] / (sd[f"features.{bn}.running_var"] + 1e-5).sqrt()
    fsd[f"features.{conv}.weight"] = sd[f"features.{conv}.weight"] * g.view(-1, 1, 1, 1)
    fsd[f"features.{conv}.bias"] = (sd[f"features.{conv}.bias"] - sd[f"features.{bn}.running_mean"]) * g + sd[f"features.{bn}.bias"]
for k in ("classifier.0.weight", "classifier.0.bias", "classifier.2.weight", "classifier.2.bias"): fsd[k] = sd[k]
F.load_state_dict(fsd); F.eval(); print("folded", acc(F))
corr = feature_correlations([F], imgs.split(256))
def halve(c, alpha):
    n = c.shape[0]
    return zip_match(c, 1, alpha=alpha, beta=10.0, target=n // 2)  # within-model merges only
for alpha in (0.3, 1.0):
    matches = {s: halve(c, alpha) for s, c in corr.items()}
    spec = merge_spec(F); S = build_model("lenet5_half", num_classes=10); st = {}
    for key, (o, i, r) in spec.params.items():
        if key not in fsd: continue
        Mo = matches[o][0] if o else torch.eye(fsd[key].shape[0])
        Ui = matches[i][1] if i else None
        st[key] = merge_tensor([fsd[key]], Mo, Ui, r)
    S.load_state_dict(st); S.eval(); print("halved alpha", alpha, acc(S))
    torch.save(S.state_dict(), f"halved_{alpha}.pt")  # for generator_loop.py / pool_distill.py --init_student
