"""Exploration (benchmarks/explore/README.md, ninth round): how good is a pool of images
inverted through the teacher *on its own*, without a generator? Builds a pool of
dead-leaves shapes moved by Adam steps on their pixels until the teacher sees each as an
assigned class (CE + BatchNorm statistics, `dafl.procedural.invert_toward_classes`'s
loss, with optional extra priors), then trains the student by KD on the pool with mixup /
CutMix (the product's functions). With --rounds R the pool is built in R parts and the
student trains between them, so that later parts can be pushed toward student-teacher
disagreement (--adi, DeepInversion's adaptive competition). Research code; test accuracy
is printed along the way and never used to select.

    python benchmarks/explore/pool_distill.py --pool 8192 --inv_steps 40 --steps 4000
"""
import argparse, json, math, time
import torch, torch.nn.functional as F
from dafl.weights import load_classifier
from dafl.models import build_model
from dafl.datasets import load_split, InputAdapter
from dafl.procedural import class_cycle, dead_leaves, mirror_left_half, mirror_symmetric
from dafl.losses import BatchNormStatistics, batchnorm_statistics_loss, kd_loss
from lightning_modules.student import mixup, cutmix
import bn_head  # noqa: F401  registers lenet5_bn_head (tenth round), for --teacher files of that architecture

p = argparse.ArgumentParser()
p.add_argument("--teacher", default="checkpoints/fashion_mnist_lenet5_bn.safetensors")
p.add_argument("--pool", type=int, default=8192)
p.add_argument("--chunk", type=int, default=512)       # images inverted together (one BN-statistics batch)
p.add_argument("--inv_steps", type=int, default=40)
p.add_argument("--inv_lr", type=float, default=0.02)
p.add_argument("--shapes", type=int, default=3)
p.add_argument("--scale", type=float, default=1.5)
p.add_argument("--bn", type=float, default=1.0)
p.add_argument("--bn_conv_only", type=int, default=0)  # 1: BatchNorm statistics of the conv layers only (a head BatchNorm1d is left out)
p.add_argument("--tv", type=float, default=0.0)         # total-variation prior on the pixels
p.add_argument("--l1", type=float, default=0.0)         # L1 prior on the [0, 1] pixels: black backgrounds, like real inputs
p.add_argument("--jitter", type=int, default=0)         # random shift (px) of each inversion step's batch
p.add_argument("--flip", type=int, default=0)           # random horizontal flip of each inversion step's batch
p.add_argument("--blur", type=float, default=0.0)       # probability that an inversion step's batch is blurred (3x3 box)
p.add_argument("--noise", type=float, default=0.0)      # Gaussian noise (normalised units) added to each inversion step's batch
p.add_argument("--eot", type=int, default=1)            # augmented views per inversion step (losses averaged: expectation over transformations)
p.add_argument("--init", default="shapes")              # shapes | noise | black
p.add_argument("--soft", type=float, default=0.0)       # share of each chunk inverted toward a soft target: lam x its class + (1 - lam) x a similar class
p.add_argument("--soft_min", type=float, default=0.4)   # lam ~ U(soft_min, 1)
p.add_argument("--vary", type=int, default=0)           # shapes per image uniform in 1..2*shapes-1, scale uniform in [0.7, 1.3] x scale
p.add_argument("--inv_conf", type=float, default=0.0)  # per image, drop the cross-entropy once the teacher gives its target class this probability (BN statistics still apply)
p.add_argument("--rounds", type=int, default=1)
p.add_argument("--adi", type=float, default=0.0)        # later rounds: also maximise JS(student, teacher)
p.add_argument("--steps", type=int, default=4000)       # student steps in all
p.add_argument("--bs", type=int, default=256)
p.add_argument("--lr", type=float, default=0.1)
p.add_argument("--wd", type=float, default=5e-4)
p.add_argument("--warmup", type=int, default=500)
p.add_argument("--mixup", type=float, default=1.0)
p.add_argument("--cutmix", type=float, default=0.5)
p.add_argument("--T", type=float, default=1.0)
p.add_argument("--swa_start", type=float, default=0.0)  # from this fraction of the steps on, keep a uniform average of the student's weights (SWA / SWAD)
p.add_argument("--swa_lr", type=float, default=0.0)     # constant lr from swa_start on (0: keep the cosine schedule)
p.add_argument("--swa_every", type=int, default=10)
p.add_argument("--save_student", default="")
p.add_argument("--filter", type=float, default=0.0)    # at --filter_at of the steps, drop this share of the pool: the images the student fits worst (KD loss, no mixing)
p.add_argument("--filter_at", type=float, default=0.5)
p.add_argument("--branches", type=int, default=0)      # at --branch_at of the steps, fork the student K times (own batches each), average the K weights at the end (model soup)
p.add_argument("--branch_at", type=float, default=0.5)
p.add_argument("--s_shift", type=int, default=0)     # student batches: per-image random shift up to this many px (background padding)
p.add_argument("--s_flip", type=int, default=0)      # student batches: per-image random horizontal flip
p.add_argument("--targets", default="teacher")       # teacher: the teacher labels every (augmented, mixed) batch | fixed: each pool image keeps the
                                                     # teacher's soft label computed once (class-preserving augmentations, mixing blends the labels)
p.add_argument("--tta", type=int, default=0)         # soft labels averaged over the teacher's views shifted by up to this many px (and flipped, with --tta_flip)
p.add_argument("--tta_flip", type=int, default=0)
p.add_argument("--feat", type=float, default=0.0)    # FitNets on the pool: + feat x relative MSE between a linear map of the student's conv features and the teacher's
p.add_argument("--cons", type=float, default=0.0)    # student self-consistency: + cons x soft CE between the student's own (detached) answer on a batch and on its shifted copy
p.add_argument("--cons_shift", type=int, default=1)  # per-image shift (px) of that copy; no teacher label is asked for it
p.add_argument("--probes", default="")               # optional held-out probe images (probe.py) for the agreement line
p.add_argument("--s_arch", default="lenet5_half")     # lenet5_half_bn: BatchNorm after each conv while training (foldable into lenet5_half's convs)
p.add_argument("--mutual", type=float, default=0.0)  # deep mutual learning: a second student, each also pulled (this weight) toward the other's answer
p.add_argument("--raw", type=float, default=0.0)      # share of each student batch replaced by fresh, un-inverted dead-leaves shapes (before mixing)
p.add_argument("--snap", default="")                 # inversion steps whose intermediate images also join the pool, e.g. "10,20": the path from shape to class image
p.add_argument("--texture", type=float, default=0.0) # each shape filled with a random sinusoidal grating of this amplitude instead of one flat grey
p.add_argument("--pair_similar", type=float, default=0.0)  # share of each batch mixed with a pool image of a similar class (teacher's last-layer cosine) instead of a random one
p.add_argument("--zkd", type=float, default=0.0)     # logit-standardised KD (Sun et al. 2024): both logits z-scored per image, divided by this temperature
p.add_argument("--twin", type=int, default=0)      # 1: half of each chunk are copies of the other half's starting shapes, inverted toward a similar class: counterfactual pairs
p.add_argument("--mix_off", type=float, default=0.0)  # the last this fraction of the steps without mixup / CutMix (timm's mixup_off_epoch)
p.add_argument("--logit_mse", type=int, default=0)  # 1: the student regresses the teacher's logits (MSE, Kim et al. 2021) instead of KL on its softmax
p.add_argument("--opt", default="sgd", choices=["sgd", "adamw"])  # sgd (momentum 0.9) | adamw (betas 0.9, 0.999; --wd is decoupled)
p.add_argument("--upweight", default="")           # e.g. "0,2,4,6": these classes appear --upweight_factor times as often among the inversion targets
p.add_argument("--upweight_factor", type=int, default=2)
p.add_argument("--sym_classes", default="")      # e.g. "0,1,2,3,4,6,8": images inverted toward these classes stay left-right mirror symmetric (start and every step)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--eval_every", type=int, default=1000)
p.add_argument("--save_pool", default="")
p.add_argument("--load_pool", default="")     # train on a saved pool (rounds 1); the student's seed is --student_seed
p.add_argument("--student_seed", type=int, default=-1)  # reseed and rebuild the student once the pool is built or loaded
p.add_argument("--stream_seed", type=int, default=-1)  # with --student_seed: the student's init from --student_seed, its batches and blends from this seed
p.add_argument("--init_student", default="")  # start the student from these weights (e.g. zip_teacher_to_half.py's LeNet-5-half made from the teacher)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
T, meta = load_classifier(a.teacher); T.eval().requires_grad_(False)
adapter = InputAdapter(meta["native_size"], meta["image_size"], meta["mean"], meta["std"])
n_cls, size = meta["num_classes"], meta["native_size"]
test = load_split(meta.get("dataset") or "fashion-mnist", "test")
test_x, test_y = adapter(test.images), test.labels
hooks = BatchNormStatistics(T) if a.bn and BatchNormStatistics(T).layers else None
if hooks and a.bn_conv_only:  # match the convolutions' BatchNorm only, not a BatchNorm1d in the head
    for layer, handle in zip(list(hooks.layers), list(hooks.handles)):
        if isinstance(layer, torch.nn.BatchNorm1d):
            handle.remove(); hooks.layers.remove(layer); hooks.handles.remove(handle)


def accuracy(net):
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x).argmax(1) for x in test_x.split(2000)])
    net.train()
    return (pred == test_y).float().mean().item(), [round((pred[test_y == c] == c).float().mean().item(), 2) for c in range(n_cls)]


bg = -meta["mean"][0] / meta["std"][0]  # the black background in normalised units


def shift(x, dx, dy, pad=2):
    h, w = x.shape[-2:]
    xp = F.pad(x, [pad] * 4, value=bg); return xp[:, :, pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def shift_flip_per_image(x, k, flip):
    """Each image its own shift in [-k, k]^2 (background padding) and, with flip, a coin-flip mirror."""
    if k:
        offsets = torch.randint(-k, k + 1, (len(x), 2)); out = torch.empty_like(x)
        for dx in range(-k, k + 1):
            for dy in range(-k, k + 1):
                m = (offsets[:, 0] == dx) & (offsets[:, 1] == dy)
                if m.any(): out[m] = shift(x[m], dx, dy, k)
        x = out
    if flip:
        m = torch.rand(len(x)) < 0.5
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(3), x)
    return x


def teacher_probs(x):
    """The teacher's softmax, averaged over its shifted (and flipped) views with --tta."""
    views = [(dx, dy) for dx in range(-a.tta, a.tta + 1) for dy in range(-a.tta, a.tta + 1)]
    flips = [False, True] if a.tta_flip else [False]
    with torch.no_grad():
        if a.zkd or a.logit_mse: return T(x)
        return sum(F.softmax(T(shift(x, dx, dy, max(a.tta, 1)).flip(3) if f else shift(x, dx, dy, max(a.tta, 1))) / a.T, 1)
                   for dx, dy in views for f in flips) / (len(views) * len(flips))


def blend(x, y):
    """CutMix (prob --cutmix) of y's box into x, or mixup, as the product's functions but with
    explicit partners y; returns the blend and the share of x in it."""
    if a.cutmix and torch.rand(()) < a.cutmix:
        h, w = x.shape[-2:]; side = math.sqrt(torch.rand(()).item()); bh, bw = round(h * side), round(w * side)
        top, left = int(torch.randint(0, h - bh + 1, ())), int(torch.randint(0, w - bw + 1, ()))
        x = x.clone(); x[..., top:top + bh, left:left + bw] = y[..., top:top + bh, left:left + bw]
        return x, torch.full((len(x), 1), 1 - bh * bw / (h * w))
    lam = torch.distributions.Beta(a.mixup, a.mixup).sample((len(x), 1))
    return lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * y, lam


def mix_with_targets(x, t):
    """Blend with random partners, returning the blended labels too (for --targets fixed)."""
    perm = torch.randperm(len(x))
    x, lam = blend(x, x[perm])
    return x, lam * t + (1 - lam) * t[perm]


def mix_similar(x, idx):
    """mixup / CutMix as the product's, but a share of the partners are pool images whose
    (teacher-labelled) class is similar to the image's own: blends between confusable classes."""
    partner = idx[torch.randperm(len(idx))]
    k = int(round(a.pair_similar * len(idx)))
    if k:
        want = torch.multinomial(partner_probs[pool_cls[idx[:k]]], 1).squeeze(1)
        partner[:k] = torch.stack([by_class[c][torch.randint(0, len(by_class[c]), ())] for c in want.tolist()])
    return blend(x, pool[partner])[0]


def zscore(l):
    return (l - l.mean(1, keepdim=True)) / (l.std(1, keepdim=True) + 1e-6)


def soft_ce(student_logits, target_probs):
    if a.logit_mse:  # target_probs are the teacher's logits here
        return F.mse_loss(student_logits, target_probs)
    if a.zkd:  # target_probs are the teacher's logits here (teacher_probs returns them with --zkd)
        return -(F.softmax(zscore(target_probs) / a.zkd, 1) * F.log_softmax(zscore(student_logits) / a.zkd, 1)).sum(1).mean() * a.zkd ** 2
    return -(target_probs * F.log_softmax(student_logits / a.T, 1)).sum(1).mean() * a.T ** 2


def student_batch():
    """One student batch and its loss target: (images, teacher logits) or, with soft labels, (images, probabilities)."""
    idx = torch.randint(0, len(pool), (a.bs,))
    x = shift_flip_per_image(pool[idx], a.s_shift, a.s_flip)
    if a.raw:  # fresh shapes, never inverted: the teacher's answer on plain silhouettes
        k = int(round(a.raw * a.bs)); x = x.clone(); x[:k] = adapter(dead_leaves(k, size, 1, a.shapes, a.scale))
    if a.targets == "fixed":
        return mix_with_targets(x, pool_targets[idx])
    if a.mix_off and step >= (1 - a.mix_off) * a.steps:
        return x, teacher_probs(x)
    if a.pair_similar:
        x = mix_similar(x, idx)
        return x, teacher_probs(x)
    x = cutmix(x) if a.cutmix and torch.rand(()) < a.cutmix else mixup(x, a.mixup)
    return x, teacher_probs(x)


def js_divergence(tl, sl):
    pt, ps = F.softmax(tl, 1), F.softmax(sl, 1); m = 0.5 * (pt + ps)
    kl = lambda p_: (p_ * (p_.clamp_min(1e-8).log() - m.clamp_min(1e-8).log())).sum(1)
    return 0.5 * (kl(pt) + kl(ps)).mean()


# class similarity (ZSKD): cosine between rows of the teacher's last layer; partner classes drawn ~ exp(5 x cosine)
_w = F.normalize([m for m in T.modules() if isinstance(m, torch.nn.Linear)][-1].weight.detach(), dim=1)
partner_probs = torch.softmax(5 * (_w @ _w.T) - 1e9 * torch.eye(n_cls), 1)


upweighted = {int(c) for c in a.upweight.split(",") if c}
# the product's deal (every class once, then the upweighted ones again): the same order as round 17 used
target_cycle = class_cycle(n_cls, [a.upweight_factor if c in upweighted else 1 for c in range(n_cls)])


symmetric_classes = {int(c) for c in a.sym_classes.split(",") if c}


def soft_targets(n):
    hard = target_cycle[torch.arange(n) % len(target_cycle)]
    targets = F.one_hot(hard, n_cls).float()
    k = int(round(a.soft * n))
    if k:
        partner = torch.multinomial(partner_probs[hard[:k]], 1).squeeze(1)
        lam = a.soft_min + (1 - a.soft_min) * torch.rand(k, 1)
        targets[:k] = lam * targets[:k] + (1 - lam) * F.one_hot(partner, n_cls).float()
    return targets


def textured_leaves(n):
    """dead_leaves with each shape filled by grey + a random grating (frequency 2-8 cycles per frame, any direction)."""
    coords = torch.linspace(-1, 1, size); rows, cols = coords.view(1, -1, 1), coords.view(1, 1, -1)
    images = torch.zeros(n, 1, size, size)
    for _ in range(a.shapes):
        cx, cy = torch.randn(2, n, 1, 1) * 0.35
        hx, hy = (0.1 + 0.6 * torch.rand(2, n, 1, 1)) * a.scale
        ang = torch.rand(n, 1, 1) * math.pi
        u = (cols - cx) * ang.cos() + (rows - cy) * ang.sin(); v = (rows - cy) * ang.cos() - (cols - cx) * ang.sin()
        inside = torch.where(torch.rand(n, 1, 1) < 0.5, (u / hx) ** 2 + (v / hy) ** 2 < 1, (u.abs() < hx) & (v.abs() < hy))
        freq, theta, phase = math.pi * (2 + 6 * torch.rand(n, 1, 1)), torch.rand(n, 1, 1) * math.pi, torch.rand(n, 1, 1) * 2 * math.pi
        fill = torch.rand(n, 1, 1) + a.texture * torch.rand(n, 1, 1) * torch.sin(freq * (cols * theta.cos() + rows * theta.sin()) + phase)
        images = torch.where(inside.unsqueeze(1), fill.clamp(0, 1).unsqueeze(1), images)
    return F.avg_pool2d(images, 3, stride=1, padding=1)


def initial_pixels(n):
    if a.texture:
        return textured_leaves(n)
    if not a.vary:
        return dead_leaves(n, size, 1, a.shapes, a.scale)
    out = torch.empty(n, 1, size, size)
    count = torch.randint(1, 2 * a.shapes, (n,)); scale = a.scale * (0.7 + 0.6 * torch.rand(n))
    for i in range(n):  # per-image shape count and scale
        out[i] = dead_leaves(1, size, 1, int(count[i]), float(scale[i]))[0]
    return out


def invert(n, student=None):
    if a.init == "shapes":
        pixels = initial_pixels(n)
    elif a.init == "noise":
        pixels = torch.rand(n, 1, size, size) * 0.5
    else:
        pixels = torch.zeros(n, 1, size, size)
    targets = soft_targets(n)
    if a.twin and n >= 2:  # second half: the first half's shapes, each pushed toward a class similar to its twin's
        h = n // 2
        pixels[n - h:] = pixels[:h]
        twin_cls = torch.multinomial(partner_probs[targets[:h].argmax(1)], 1).squeeze(1)
        targets[n - h:] = F.one_hot(twin_cls, n_cls).float()
    sym = torch.tensor([int(c) in symmetric_classes for c in targets.argmax(1).tolist()])
    pixels = mirror_left_half(pixels, sym)  # the product's helpers: a symmetric start, kept symmetric by every step
    pixels.requires_grad_()
    symmetric = lambda p_: mirror_symmetric(p_, sym)
    opt = torch.optim.Adam([pixels], lr=a.inv_lr)
    snap_at, snaps = {int(k) for k in a.snap.split(",") if k}, []
    for k in range(a.inv_steps):
        if k in snap_at: snaps.append(adapter(pixels.detach().clone()))
        loss = 0.0
        for _view in range(a.eot):
            x = adapter(symmetric(pixels))
            if a.jitter:
                dx, dy = torch.randint(-a.jitter, a.jitter + 1, (2,)).tolist()
                x = torch.roll(x, (dy, dx), (2, 3))
            if a.flip and torch.rand(()) < 0.5:
                x = x.flip(3)
            if a.blur and torch.rand(()) < a.blur:
                x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
            if a.noise:
                x = x + a.noise * torch.randn_like(x)
            if hooks: hooks.recording = True
            tl = T(x)
            if hooks: hooks.recording = False
            if a.inv_conf:  # images the teacher already finds this confident stop moving toward their class
                ce = -(targets * F.log_softmax(tl, 1)).sum(1)
                ce = (ce * ((F.softmax(tl, 1) * targets).sum(1) < a.inv_conf).float().detach()).mean()
            else:
                ce = F.cross_entropy(tl, targets)
            loss = loss + ce / a.eot
            if hooks: loss = loss + a.bn * batchnorm_statistics_loss(hooks.pop()) / a.eot
            if student is not None and a.adi:
                loss = loss + a.adi * (1 - js_divergence(tl, student(x))) / a.eot
        if a.tv:
            loss = loss + a.tv * ((pixels[..., 1:, :] - pixels[..., :-1, :]).abs().mean() + (pixels[..., :, 1:] - pixels[..., :, :-1]).abs().mean())
        if a.l1:
            loss = loss + a.l1 * pixels.mean()
        opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad(): pixels.clamp_(0, 1)
    return torch.cat(snaps + [adapter(symmetric(pixels.detach()))])


S = build_model(a.s_arch, in_channels=1, num_classes=n_cls, image_size=meta["image_size"])
proj = torch.nn.Linear(S.feature_dim, T.feature_dim) if a.feat else None
S2 = build_model(a.s_arch, in_channels=1, num_classes=n_cls, image_size=meta["image_size"]) if a.mutual else None
params = list(S.parameters()) + (list(proj.parameters()) if proj else []) + (list(S2.parameters()) if S2 else [])
opt = (torch.optim.AdamW(params, lr=a.lr, weight_decay=a.wd) if a.opt == "adamw"
       else torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=a.wd))


def consistency(logits, x):
    """The student's answer on a shifted copy pulled toward its own (detached) answer on x:
    shift invariance that real images have, without the teacher's fragile labels of shifted inversions."""
    shifted = S(shift_flip_per_image(x, a.cons_shift, 0))
    return -(F.softmax(logits.detach(), 1) * F.log_softmax(shifted, 1)).sum(1).mean()


def student_loss(x, target):
    if a.mutual:  # both students learn from the teacher and from each other's (detached) answer
        l1, l2 = S(x), S2(x)
        peer = lambda own, other: -(F.softmax(other.detach(), 1) * F.log_softmax(own, 1)).sum(1).mean()
        return soft_ce(l1, target) + soft_ce(l2, target) + a.mutual * (peer(l1, l2) + peer(l2, l1))
    if a.cons:
        logits = S(x)
        return soft_ce(logits, target) + a.cons * consistency(logits, x)
    if not a.feat:
        return soft_ce(S(x), target)
    logits, sf = S(x, return_features=True)
    with torch.no_grad(): _, tf = T(x, return_features=True)
    return soft_ce(logits, target) + a.feat * F.mse_loss(proj(sf), tf) / tf.pow(2).mean()
swa_from = int(a.swa_start * a.steps) if a.swa_start else a.steps + 1
def lr_factor(k):
    if k >= swa_from and a.swa_lr:
        return a.swa_lr / a.lr
    return min(1.0, (k + 1) / a.warmup) * 0.5 * (1 + math.cos(math.pi * k / a.steps))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
S_avg = torch.optim.swa_utils.AveragedModel(S) if a.swa_start else None
pool = torch.zeros(0, 1, meta["image_size"], meta["image_size"])
t0, t_inv, step, log = time.time(), 0.0, 0, []
per_round = a.pool // a.rounds
for r in range(a.rounds):
    t1 = time.time()
    S.eval()
    if a.load_pool:
        pool = torch.load(a.load_pool)
        if a.student_seed >= 0: torch.manual_seed(a.student_seed); S.load_state_dict(build_model("lenet5_half", in_channels=1, num_classes=n_cls, image_size=meta["image_size"]).state_dict())
    else:
        pool = torch.cat([pool] + [invert(min(a.chunk, per_round - i), S if r else None) for i in range(0, per_round, a.chunk)])
        if a.student_seed >= 0 and a.rounds == 1:  # the reload path's reseed, in process: the two paths compared on one pool
            torch.manual_seed(a.student_seed); S.load_state_dict(build_model("lenet5_half", in_channels=1, num_classes=n_cls, image_size=meta["image_size"]).state_dict())
    pool_targets = torch.cat([teacher_probs(c) for c in pool.split(1024)]) if a.targets == "fixed" else None
    if a.pair_similar:
        with torch.no_grad(): pool_cls = torch.cat([T(c).argmax(1) for c in pool.split(1024)])
        by_class = [torch.nonzero(pool_cls == c).squeeze(1) for c in range(n_cls)]
    if a.init_student: S.load_state_dict(torch.load(a.init_student))
    if a.stream_seed >= 0: torch.manual_seed(a.stream_seed)
    S.train(); t_inv += time.time() - t1
    for _ in range(a.steps * (r + 1) // a.rounds - step):
        if a.filter and step == int(a.filter_at * a.steps):
            with torch.no_grad():
                per_image = torch.cat([F.kl_div(F.log_softmax(S(c), 1), F.log_softmax(T(c), 1), reduction="none", log_target=True).sum(1) for c in pool.split(1024)])
            keep = per_image.argsort()[:int(len(pool) * (1 - a.filter))]
            print(f"filter: kept {len(keep)} images, KD loss of the dropped ones {per_image.sort().values[len(keep):].mean():.3f} vs kept {per_image[keep].mean():.3f}", flush=True)
            pool = pool[keep]
        if a.branches and step == int(a.branch_at * a.steps):
            import copy
            base_state, base_opt, base_sched = copy.deepcopy(S.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
        x, target = student_batch()
        loss = student_loss(x, target)
        opt.zero_grad(); loss.backward(); opt.step(); sched.step(); step += 1
        if S_avg is not None and step >= swa_from and step % a.swa_every == 0:
            S_avg.update_parameters(S)
        if step % a.eval_every == 0 or step == a.steps:
            acc, _ = accuracy(S); log.append((step, round(time.time() - t0), round(acc, 4)))
            print(f"step {step} pool {len(pool)} {time.time() - t0:.0f}s (inversion {t_inv:.0f}s) acc {acc:.4f} kd {loss.item():.3f}", flush=True)
if S_avg is not None:
    raw, _ = accuracy(S); print(f"raw student (no averaging) {raw:.4f}"); S = S_avg.module
if a.branches:
    import copy
    finals = [copy.deepcopy(S.state_dict())]  # branch 0 = the run above
    for b in range(1, a.branches):
        torch.manual_seed(1000 + b); S.load_state_dict(base_state); opt.load_state_dict(base_opt); sched.load_state_dict(base_sched)
        for k in range(int(a.branch_at * a.steps), a.steps):
            x, target = student_batch()
            loss = student_loss(x, target); opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        finals.append(copy.deepcopy(S.state_dict()))
    probs = []
    for b, st in enumerate(finals):
        S.load_state_dict(st); acc_b, _ = accuracy(S); print(f"branch {b}: {acc_b:.4f}")
        S.eval()
        with torch.no_grad(): probs.append(torch.cat([S(x).softmax(1) for x in test_x.split(2000)]))
    print(f"ensemble of branches: {(sum(probs).argmax(1) == test_y).float().mean():.4f}")
    S.load_state_dict({k: sum(st[k] for st in finals) / len(finals) for k in finals[0]})
acc, per_class = accuracy(S)
print("per-class student", per_class)
with torch.no_grad():
    def label_robustness(xs):
        """How often the teacher keeps its label under a 1-px / (2, 1)-px shift and a 3x3 blur."""
        y = T(xs).argmax(1)
        return {"conf": T(xs).softmax(1).max(1).values.mean().item(),
                "shift1": (T(shift(xs, 1, 0)).argmax(1) == y).float().mean().item(),
                "shift21": (T(shift(xs, 2, 1)).argmax(1) == y).float().mean().item(),
                "blur": (T(F.avg_pool2d(xs, 3, 1, 1)).argmax(1) == y).float().mean().item()}
    robust = label_robustness(pool[:2048])
    print("real test images' label robustness (reference)", {k: round(v, 3) for k, v in label_robustness(test_x[:2048]).items()})
    if a.probes:
        probes = torch.load(a.probes)
        robust["heldout_inverted_agree"] = (S(probes["inverted"]).argmax(1) == T(probes["inverted"]).argmax(1)).float().mean().item()
print("pool label robustness", {k: round(v, 3) for k, v in robust.items()})
if a.save_student: torch.save(S.state_dict(), a.save_student)
if a.save_pool: torch.save(pool, a.save_pool)
print(json.dumps({"final": acc, "robust": robust, "secs": round(time.time() - t0), "inv_secs": round(t_inv), "log": log,
                  **{k: v for k, v in vars(a).items() if k != "teacher"}}))
