"""Exploration (benchmarks/explore/README.md): DeepInversion-style direct optimisation of a
pool of images against the teacher, then KD of a student on the pool. Research code.

    python benchmarks/explore/pixel_inversion.py --n_batches 10 --steps 100 --init dark --tv 1
"""
import argparse, time, math, json, torch, torch.nn.functional as F
from dafl.weights import load_classifier
from dafl.models import build_model
from dafl.datasets import load_split, InputAdapter, dataset_info
from dafl.losses import BatchNormStatistics, batchnorm_statistics_loss, kd_loss
p = argparse.ArgumentParser()
p.add_argument("--teacher", default="checkpoints/fashion_mnist_lenet5_bn.safetensors")
p.add_argument("--n_batches", type=int, default=40)
p.add_argument("--bs", type=int, default=256)
p.add_argument("--steps", type=int, default=100)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--bn", type=float, default=1.0)
p.add_argument("--tv", type=float, default=0.0)
p.add_argument("--l2", type=float, default=0.0)
p.add_argument("--adv", type=float, default=0.0)
p.add_argument("--jitter", type=int, default=0)
p.add_argument("--flip", type=int, default=0)
p.add_argument("--init", default="rand")
p.add_argument("--space", default="pixel")  # pixel (clamped [0,1], native border) or norm
p.add_argument("--s_epochs", type=int, default=30)
p.add_argument("--s_steps_per_batch", type=int, default=0)  # interleaved student steps after each synth batch
p.add_argument("--s_lr", type=float, default=0.05)
p.add_argument("--s_opt", default="sgd")
p.add_argument("--s_shift", type=int, default=0)
p.add_argument("--s_flip", type=int, default=0)
p.add_argument("--mixup", type=float, default=0.0)
p.add_argument("--T", type=float, default=1.0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--save", default="")
a = p.parse_args()
torch.set_num_threads(2); torch.manual_seed(a.seed)
T, meta = load_classifier(a.teacher); T.eval().requires_grad_(False)
info = dataset_info(meta.get("dataset") or "fashion-mnist")
adapter = InputAdapter(meta["native_size"], meta["image_size"], meta["mean"], meta["std"])
test = load_split(info.name, "test")
test_x = adapter(test.images); test_y = test.labels
def acc(net):
    net.eval()
    with torch.no_grad():
        r = sum((net(x).argmax(1) == y).sum().item() for x, y in zip(test_x.split(1000), test_y.split(1000))) / len(test_y)
    net.train(); return r
print("teacher acc", acc(T)); T.eval()
hooks = BatchNormStatistics(T)
S = build_model("lenet5_half", in_channels=1, num_classes=10, image_size=32)
opt_s = torch.optim.SGD(S.parameters(), lr=a.s_lr, momentum=0.9, weight_decay=5e-4, nesterov=True) if a.s_opt == "sgd" else torch.optim.Adam(S.parameters(), lr=a.s_lr)
ns, border = meta["native_size"], (meta["image_size"] - meta["native_size"]) // 2
mean, std = meta["mean"][0], meta["std"][0]
def to_net(pix):
    return (F.pad(pix, [border]*4) - mean) / std
def aug(x, shift, flip):
    if shift:
        n = x.shape[0]; xp = F.pad(x, [shift]*4, value=(0 - mean) / std)
        dx, dy = torch.randint(0, 2*shift+1, (2,)).tolist(); x = xp[:, :, dy:dy+32, dx:dx+32]
    if flip:
        m = torch.rand(x.shape[0]) < 0.5; x = torch.where(m.view(-1,1,1,1), x.flip(3), x)
    return x
pool = []
t0 = time.time(); synth_time = 0; stud_time = 0
def student_steps(k):
    X = torch.cat(pool)
    for _ in range(k):
        idx = torch.randint(0, len(X), (a.bs,))
        x = aug(X[idx], a.s_shift, a.s_flip)
        if a.mixup > 0:
            lam = torch.distributions.Beta(a.mixup, a.mixup).sample((a.bs,1,1,1))
            x = lam * x + (1 - lam) * x[torch.randperm(a.bs)]
        with torch.no_grad(): tl = T(x)
        loss = kd_loss(S(x), tl, a.T)
        opt_s.zero_grad(); loss.backward(); opt_s.step()
for b in range(a.n_batches):
    ts = time.time()
    y = torch.arange(a.bs) % 10
    if a.space == "pixel":
        if a.init == "rand": v0 = torch.rand(a.bs, 1, ns, ns)
        elif a.init == "dark": v0 = (0.1 * torch.rand(a.bs, 1, ns, ns))
        else: v0 = (mean + 0.2 * torch.randn(a.bs, 1, ns, ns)).clamp(0, 1)
        v = v0.requires_grad_()
    else:
        v = torch.randn(a.bs, 1, 32, 32).requires_grad_()
    opt = torch.optim.Adam([v], lr=a.lr, betas=(0.5, 0.99))
    for it in range(a.steps):
        x = to_net(v) if a.space == "pixel" else v
        xa = aug(x, a.jitter, a.flip)
        hooks.recording = True
        logits = T(xa)
        hooks.recording = False
        loss = F.cross_entropy(logits, y) + a.bn * batchnorm_statistics_loss(hooks.pop())
        if a.tv:
            loss = loss + a.tv * ((v[..., 1:, :] - v[..., :-1, :]).pow(2).mean() + (v[..., :, 1:] - v[..., :, :-1]).pow(2).mean())
        if a.l2:
            loss = loss + a.l2 * v.pow(2).mean()
        if a.adv and pool:
            ps = F.softmax(S(xa), 1); pt = F.softmax(logits, 1); m = 0.5 * (ps + pt)
            js = 0.5 * (F.kl_div(m.log(), pt, reduction="batchmean") + F.kl_div(m.log(), ps, reduction="batchmean"))
            loss = loss - a.adv * js
        opt.zero_grad(); loss.backward(); opt.step()
        if a.space == "pixel":
            with torch.no_grad(): v.clamp_(0, 1)
    with torch.no_grad():
        x = to_net(v) if a.space == "pixel" else v
        tp = F.softmax(T(x), 1)
    pool.append(x.detach())
    synth_time += time.time() - ts
    if a.s_steps_per_batch:
        ts = time.time(); student_steps(a.s_steps_per_batch); stud_time += time.time() - ts
    if b % 10 == 9 or b == a.n_batches - 1:
        print(f"batch {b+1}: synth {synth_time:.0f}s conf {tp.max(1)[0].mean():.3f} hit {(tp.argmax(1)==y).float().mean():.3f} loss {loss.item():.3f} student acc {acc(S):.4f}", flush=True)
X = torch.cat(pool)
steps_per_epoch = len(X) // a.bs
total = a.s_epochs * steps_per_epoch
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, total)
ts = time.time()
for e in range(a.s_epochs):
    for _ in range(steps_per_epoch):
        student_steps(1); sched.step()
    if e % 10 == 9 or e == a.s_epochs - 1:
        print(f"epoch {e+1} student acc {acc(S):.4f} ({time.time()-ts:.0f}s)", flush=True)
stud_time += time.time() - ts
print(json.dumps({"final": acc(S), "synth_s": round(synth_time), "stud_s": round(stud_time), "n": len(X), **vars(a)}))
if a.save: torch.save(X, a.save)
