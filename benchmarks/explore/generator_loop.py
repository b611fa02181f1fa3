"""Exploration (benchmarks/explore/README.md): the alternating data-free loop in plain
PyTorch with every lever tried as a flag. Research code, not the product: the product is
DataFreeDistillation. Prints test accuracy along the way (never used to select).

    python benchmarks/explore/generator_loop.py --gen small --width 64 --mixup 1 --adv 0.1 --s_steps 10 --div 1
"""
import argparse, time, json, math, torch, torch.nn as nn, torch.nn.functional as F
from dafl.weights import load_classifier
from dafl.models import build_model
from dafl.datasets import load_split, InputAdapter
from dafl.procedural import dead_leaves, invert_toward_classes
from dafl.losses import balanced_targets, BatchNormStatistics, batchnorm_statistics_loss, kd_loss, information_entropy_loss
p = argparse.ArgumentParser()
p.add_argument("--teacher", default="checkpoints/fashion_mnist_lenet5_bn.safetensors")
p.add_argument("--iters", type=int, default=400)
p.add_argument("--bs", type=int, default=256)
p.add_argument("--width", type=int, default=32)
p.add_argument("--gen", default="official")
p.add_argument("--g_lr", type=float, default=1e-3)
p.add_argument("--g_steps", type=int, default=1)
p.add_argument("--s_steps", type=int, default=5)
p.add_argument("--oh", type=float, default=1.0)
p.add_argument("--ie", type=float, default=5.0)
p.add_argument("--act", type=float, default=0.0)
p.add_argument("--bn", type=float, default=1.0)
p.add_argument("--adv", type=float, default=0.0)
p.add_argument("--tv", type=float, default=0.0)
p.add_argument("--div", type=float, default=0.0)
p.add_argument("--bss", type=int, default=0)       # adversarial refinement steps on student batches
p.add_argument("--bss_eps", type=float, default=0.1)
p.add_argument("--bss_frac", type=float, default=0.5)
p.add_argument("--noise", type=float, default=0.0)
p.add_argument("--feat", type=float, default=0.0)
p.add_argument("--bright", type=float, default=0.0)
p.add_argument("--init_student", default="")
p.add_argument("--at", type=float, default=0.0)
p.add_argument("--bn_first", type=float, default=1.0)
p.add_argument("--replay", type=int, default=8192)
p.add_argument("--s_lr", type=float, default=0.1)
p.add_argument("--s_loss", default="kl")
p.add_argument("--T", type=float, default=1.0)
p.add_argument("--mixup", type=float, default=0.0)
p.add_argument("--s_shift", type=int, default=0)
p.add_argument("--s_flip", type=int, default=0)
p.add_argument("--native", type=int, default=0)
p.add_argument("--reinit", type=int, default=0)  # re-initialise generator every N iters
p.add_argument("--cond", type=int, default=0)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--eval_every", type=int, default=100)
p.add_argument("--save", default="")
p.add_argument("--ema", type=float, default=0.0)    # EMA of student weights, evaluated at the end
p.add_argument("--cutmix", type=float, default=0.0)  # probability a student batch uses CutMix instead of mixup
p.add_argument("--g_shift", type=int, default=0)   # random shift of generated images before the teacher (generator step)
p.add_argument("--s_bs", type=int, default=0)      # student batch size (default: bs)
p.add_argument("--n_gen", type=int, default=1)
p.add_argument("--balance", type=int, default=0)
p.add_argument("--clip", type=float, default=0.0)     # student gradient-norm clipping
p.add_argument("--s_warmup", type=int, default=0)     # student lr: linear warm-up over this many student steps
p.add_argument("--in_stat", type=float, default=0.0)  # generator: batch pixel mean/std match the dataset's normalisation constants
p.add_argument("--rrc", type=float, default=0.0)      # student: random resized crop, area scale in [rrc, 1] (0 = off)
p.add_argument("--mix3", type=int, default=0)         # student: mixup on top of a CutMix batch (three images per input)
p.add_argument("--jac", type=float, default=0.0)      # Jacobian matching (Srinivas & Fleuret 2018): student input gradient of the teacher's class
p.add_argument("--threads", type=int, default=2)
p.add_argument("--save_memory", default="")  # save the replay memory (teacher inputs) at the end, e.g. for zip_teacher_to_half.py
p.add_argument("--quota", type=int, default=0)        # one-hot targets by balanced assignment (each class n/10 of the batch)
p.add_argument("--proc", type=float, default=0.0)     # fraction of each student batch drawn from procedural "dead leaves" shape images
p.add_argument("--proc_pool", type=int, default=16384)
p.add_argument("--proc_shapes", type=int, default=6)
p.add_argument("--proc_sym", type=int, default=0)  # mirror-symmetric procedural images (left half mirrored onto the right)
p.add_argument("--proc_scale", type=float, default=1.0)  # size of the procedural shapes (radii 0.1-0.7 of the half-frame times this)
p.add_argument("--fdiv", type=float, default=0.0)     # generator: penalise cosine similarity between teacher features of different images
p.add_argument("--bn_groups", type=int, default=1)    # BN-statistics loss on this many sub-batches, each matched separately
p.add_argument("--gpad", default="zeros")  # generator conv padding mode: zeros leaves a faint frame near the image edge; reflect / replicate do not
p.add_argument("--wd", type=float, default=5e-4)  # student weight decay
p.add_argument("--prio", type=float, default=0.0)  # prioritised replay: sample stored images with probability ~ (student-teacher KL)^prio
p.add_argument("--g_cos", type=int, default=0)     # cosine decay of the generator's learning rate over the run
p.add_argument("--proc_inv", type=int, default=0)  # shapes as a starting point: this many Adam steps of DeepInversion (CE to a balanced class + BN statistics) on the procedural pool
p.add_argument("--proc_inv_lr", type=float, default=0.02)
p.add_argument("--dir", type=float, default=0.0)   # ZSKD-style soft targets: Dirichlet(dir x class similarity row of the teacher's class)
p.add_argument("--dir_frac", type=float, default=0.5)  # share of each generator batch that gets the soft targets
p.add_argument("--proc_refresh", type=int, default=0)  # every this many iterations, the oldest --proc_refresh_n pool images are replaced by freshly inverted shapes
p.add_argument("--proc_refresh_n", type=int, default=256)
p.add_argument("--proc_jitter", type=int, default=0)  # inversion: random shift by up to this many px and a random horizontal flip at every step (DeepInversion's jitter)
p.add_argument("--proc_adi", type=float, default=0.0)  # refresh inversion: also maximise the student-teacher Jensen-Shannon divergence (DeepInversion's ADI competition)
p.add_argument("--proc_evolve", type=int, default=0)  # every iteration, this many pool images get one more inversion step (Adam state kept per image): the pool keeps evolving
p.add_argument("--proc_evolve_lr", type=float, default=0.01)
p.add_argument("--proc_load", default="")  # procedural pool from a file (pool_distill.py --save_pool), instead of building one
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(a.seed)
torch.set_default_device(a.device)
T, meta = load_classifier(a.teacher); T.eval().requires_grad_(False); T.to(a.device)
adapter = InputAdapter(meta["native_size"], meta["image_size"], meta["mean"], meta["std"])
test = load_split(meta.get("dataset") or "fashion-mnist", "test")
test_x = adapter(test.images.to(a.device)); test_y = test.labels.to(a.device)
def acc(net):
    net.eval()
    with torch.no_grad():
        r = sum((net(x).argmax(1) == y).sum().item() for x, y in zip(test_x.split(2000), test_y.split(2000))) / len(test_y)
    net.train(); return r
hooks = BatchNormStatistics(T) if a.bn else None
mean, std = meta["mean"][0], meta["std"][0]
# ZSKD (Nayak et al. 2019): class similarity = cosine of the teacher's last-layer weight rows, min-max scaled per row
_w = F.normalize(T.classifier[-1].weight.detach(), dim=1); class_sim = _w @ _w.T
class_sim = (class_sim - class_sim.min(1, keepdim=True).values) / (class_sim.max(1, keepdim=True).values - class_sim.min(1, keepdim=True).values)
border = (meta["image_size"] - meta["native_size"]) // 2

def procedural_images(n):
    """dafl.procedural's dead-leaves shapes at the native size, padded and normalised like
    real inputs. --proc_sym mirrors the left half after the blur (the fifth round's runs
    mirrored before it, which differs only in the two columns at the seam)."""
    img = dead_leaves(n, meta["native_size"], 1, a.proc_shapes, a.proc_scale)
    if a.proc_sym:
        half = img.shape[-1] // 2
        img = torch.cat([img[..., :half], img[..., :half].flip(-1)], -1)
    return adapter(img)

class SmallGen(nn.Module):
    """native-size generator: 7x7 -> 14 -> 28, then pad to 32 with black."""
    def __init__(s, latent=100, w=64, deep=False):
        super().__init__()
        s.w = w; s.fc = nn.Linear(latent, w * 49); s.bn0 = nn.BatchNorm2d(w)
        s.c1 = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, padding_mode=a.gpad), nn.BatchNorm2d(w), nn.LeakyReLU(0.2))
        s.c2 = nn.Sequential(nn.Conv2d(w, w // 2, 3, padding=1, padding_mode=a.gpad), nn.BatchNorm2d(w // 2), nn.LeakyReLU(0.2))
        if deep:
            s.c2 = nn.Sequential(*s.c2, nn.Conv2d(w // 2, w // 2, 3, padding=1, padding_mode=a.gpad), nn.BatchNorm2d(w // 2), nn.LeakyReLU(0.2))
        s.out = nn.Conv2d(w // 2, 1, 3, padding=1, padding_mode=a.gpad)
    def forward(s, z):
        x = s.bn0(s.fc(z).view(-1, s.w, 7, 7))
        x = s.c1(F.interpolate(x, scale_factor=2))
        x = s.c2(F.interpolate(x, scale_factor=2))
        pix = torch.sigmoid(s.out(x))  # [0,1] pixels, native size
        return (F.pad(pix, [border] * 4) - mean) / std

def make_gen():
    if a.gen == "official":
        g = build_model("generator", latent_dim=100, image_size=32, channels=1, width=a.width)
    else:
        g = SmallGen(100, a.width, deep=(a.gen == "deep"))
    return g, torch.optim.Adam(g.parameters(), lr=a.g_lr, betas=(0.5, 0.999))
gens = [make_gen() for _ in range(a.n_gen)]
G, opt_g = gens[0]
S = build_model("lenet5_half", in_channels=1, num_classes=10, image_size=32)
if a.init_student:
    S.load_state_dict(torch.load(a.init_student)); print("init student acc", acc(S))
proj = nn.Linear(60, 120)
import copy
S_ema = copy.deepcopy(S).requires_grad_(False)
opt_s = torch.optim.SGD(list(S.parameters()) + list(proj.parameters()), lr=a.s_lr, momentum=0.9, weight_decay=a.wd)
acts = {}
def keep(name):
    def hook(m, i, o): acts[name] = o
    return hook
T.features[2].register_forward_hook(keep("t1")); T.features[6].register_forward_hook(keep("t2"))
S.features[2].register_forward_hook(keep("s1")); S.features[6].register_forward_hook(keep("s2"))
def att(f):
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)
total_s = a.iters * a.s_steps
if a.s_warmup:
    sched = torch.optim.lr_scheduler.LambdaLR(opt_s, lambda k: min(1.0, (k + 1) / a.s_warmup) * 0.5 * (1 + math.cos(math.pi * k / total_s)))
else:
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, total_s)
mem = torch.zeros(a.replay, 1, 32, 32); count = 0
prio = torch.zeros(a.replay)  # last seen student-teacher KL of each stored image (--prio)
sched_g = torch.optim.lr_scheduler.CosineAnnealingLR(opt_g, a.iters) if a.g_cos else None
def invert_shapes(n):
    """--proc_inv: dead-leaves shapes moved by a few Adam steps until the teacher sees each as
    its assigned class with real-data BatchNorm statistics (the product's invert_toward_classes)."""
    x = invert_toward_classes(dead_leaves(n, meta["native_size"], 1, a.proc_shapes, a.proc_scale), T, adapter, 10,
                              a.proc_inv, a.proc_inv_lr, hooks)
    with torch.no_grad():
        print(f"inverted shapes: teacher agrees with the assigned class on {(T(x).argmax(1) == torch.arange(n) % 10).float().mean():.3f}", flush=True)
    return x
def invert_shapes_ext(n, student=None):
    """--proc_jitter / --proc_adi variant of invert_toward_classes (same CE + BN-statistics
    loss, same Adam lr): the teacher sees each step's batch shifted and flipped at random,
    and with a student the pixels also move toward student-teacher disagreement."""
    pixels = dead_leaves(n, meta["native_size"], 1, a.proc_shapes, a.proc_scale).requires_grad_()
    targets = torch.arange(n) % 10
    opt = torch.optim.Adam([pixels], lr=a.proc_inv_lr)
    for _ in range(a.proc_inv):
        x = adapter(pixels)
        if a.proc_jitter:
            dx, dy = torch.randint(-a.proc_jitter, a.proc_jitter + 1, (2,)).tolist()
            x = torch.roll(x, (dy, dx), (2, 3))
            if torch.rand(()) < 0.5: x = x.flip(3)
        if hooks: hooks.recording = True
        tl = T(x)
        if hooks: hooks.recording = False
        loss = F.cross_entropy(tl, targets)
        if hooks: loss = loss + batchnorm_statistics_loss(hooks.pop())
        if student is not None and a.proc_adi:
            pt, ps = F.softmax(tl, 1), F.softmax(student(x), 1); m = 0.5 * (pt + ps)
            js = 0.5 * ((pt * (pt.clamp_min(1e-8) / m.clamp_min(1e-8)).log()).sum(1) + (ps * (ps.clamp_min(1e-8) / m.clamp_min(1e-8)).log()).sum(1)).mean()
            loss = loss + a.proc_adi * (1 - js)
        g, = torch.autograd.grad(loss, pixels)
        pixels.grad = g; opt.step(); pixels.grad = None
        with torch.no_grad(): pixels.clamp_(0, 1)
    return adapter(pixels.detach())
proc_next = 0  # ring position of the next refreshed pool image
t_pool = time.time()
if a.proc and a.proc_load:
    proc_pool = torch.load(a.proc_load)
elif a.proc and a.proc_inv and a.proc_jitter:
    proc_pool = torch.cat([invert_shapes_ext(1024) for _ in range(a.proc_pool // 1024)])
elif a.proc and a.proc_inv:
    proc_pool = torch.cat([invert_shapes(1024) for _ in range(a.proc_pool // 1024)])
else:
    proc_pool = torch.cat([procedural_images(1024) for _ in range(a.proc_pool // 1024)]) if a.proc else None
if a.proc: print(f"procedural pool: {time.time() - t_pool:.0f}s", flush=True)
if a.proc_evolve:  # pixels of the pool (native size) and a per-image Adam state
    proc_pix = (proc_pool * std + mean)[..., border:32 - border, border:32 - border].clamp(0, 1).contiguous()
    proc_cls = torch.arange(len(proc_pool)) % 10
    evo_m, evo_v, evo_t = torch.zeros_like(proc_pix), torch.zeros_like(proc_pix), torch.zeros(len(proc_pix))
def js_divergence(tl, sl):
    pt, ps = F.softmax(tl, 1), F.softmax(sl, 1); m = 0.5 * (pt + ps)
    return 0.5 * ((pt * (pt.clamp_min(1e-8) / m.clamp_min(1e-8)).log()).sum(1) + (ps * (ps.clamp_min(1e-8) / m.clamp_min(1e-8)).log()).sum(1)).mean()
def evolve_pool():
    """--proc_evolve: one more Adam step of inversion (CE to the image's class + BN statistics,
    + --proc_adi x (1 - JS(student, teacher))) on a random subset of the pool."""
    idx = torch.randperm(len(proc_pix))[:a.proc_evolve]
    pix = proc_pix[idx].clone().requires_grad_()
    x = adapter(pix)
    if hooks: hooks.recording = True
    tl = T(x)
    if hooks: hooks.recording = False
    loss = F.cross_entropy(tl, proc_cls[idx])
    if hooks: loss = loss + batchnorm_statistics_loss(hooks.pop())
    if a.proc_adi:
        loss = loss + a.proc_adi * (1 - js_divergence(tl, S(x)))
    g, = torch.autograd.grad(loss, pix)
    S.zero_grad(set_to_none=True)
    with torch.no_grad():
        b1, b2 = 0.9, 0.999
        evo_t[idx] += 1; t = evo_t[idx].view(-1, 1, 1, 1)
        evo_m[idx] = b1 * evo_m[idx] + (1 - b1) * g; evo_v[idx] = b2 * evo_v[idx] + (1 - b2) * g * g
        step = a.proc_evolve_lr * (evo_m[idx] / (1 - b1 ** t)) / ((evo_v[idx] / (1 - b2 ** t)).sqrt() + 1e-8)
        proc_pix[idx] = (pix - step).clamp(0, 1); proc_pool[idx] = adapter(proc_pix[idx])
frame = torch.zeros(1, 1, 32, 32); frame[..., border:32 - border, border:32 - border] = 1
def latents(n):
    z = torch.randn(n, 100)
    y = None
    if a.cond:
        y = torch.arange(n) % 10; z[:, :10] = F.one_hot(y, 10).float()
    return z, y
def gen(z):
    x = G(z)
    if a.native and a.gen == "official":
        x = x * frame + (-mean / std) * (1 - frame)
    return x
def aug(x):
    if a.rrc:
        n = x.shape[0]
        scale = a.rrc + (1 - a.rrc) * torch.rand(n)
        ratio = torch.exp((torch.rand(n) - 0.5) * math.log(4 / 3) * 2)
        sx = (scale * ratio).sqrt().clamp(max=1); sy = (scale / ratio).sqrt().clamp(max=1)
        tx = (torch.rand(n) * 2 - 1) * (1 - sx); ty = (torch.rand(n) * 2 - 1) * (1 - sy)
        theta = torch.zeros(n, 2, 3); theta[:, 0, 0] = sx; theta[:, 0, 2] = tx; theta[:, 1, 1] = sy; theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, x.shape, align_corners=False)
        x = F.grid_sample(x - (-mean / std), grid, align_corners=False) + (-mean / std)  # pad with black
    if a.s_shift:
        xp = F.pad(x, [a.s_shift] * 4, value=-mean / std)
        dx, dy = torch.randint(0, 2 * a.s_shift + 1, (2,)).tolist(); x = xp[:, :, dy:dy + 32, dx:dx + 32]
    if a.s_flip:
        m = torch.rand(x.shape[0]) < 0.5; x = torch.where(m.view(-1, 1, 1, 1), x.flip(3), x)
    if a.bright:
        pix = x * std + mean
        f = 1 - a.bright * torch.rand(x.shape[0], 1, 1, 1)
        x = ((pix * f).clamp(0, 1) - mean) / std
    if a.cutmix and torch.rand(()) < a.cutmix:
        n = x.shape[0]; perm = torch.randperm(n)
        lam = torch.distributions.Beta(1.0, 1.0).sample().item()
        cut = int(round(28 * math.sqrt(1 - lam))); cy, cx = torch.randint(border, 32 - border - cut + 1, (2,)).tolist() if cut < 28 else (border, border)
        x = x.clone(); x[:, :, cy:cy + cut, cx:cx + cut] = x[perm][:, :, cy:cy + cut, cx:cx + cut]
        if not a.mix3:
            return x
    if a.mixup:
        lam = torch.distributions.Beta(a.mixup, a.mixup).sample((x.shape[0], 1, 1, 1))
        x = lam * x + (1 - lam) * x[torch.randperm(x.shape[0])]
    return x
def s_loss(sl, tl):
    if a.s_loss == "kl": return kd_loss(sl, tl, a.T)
    if a.s_loss == "l1": return (sl - tl).abs().mean()
    if a.s_loss == "mse": return F.mse_loss(sl, tl)
t0 = time.time(); log = []
for it in range(a.iters):
    if a.reinit and it and it % a.reinit == 0:
        G, opt_g = make_gen()
    if a.n_gen > 1:
        G, opt_g = gens[it % a.n_gen]
    for _ in range(a.g_steps):
        z, y = latents(a.bs)
        x = gen(z)
        xt = x
        if a.g_shift:
            xp = F.pad(x, [a.g_shift] * 4, value=-mean / std)
            dx, dy = torch.randint(0, 2 * a.g_shift + 1, (2,)).tolist(); xt = xp[:, :, dy:dy + 32, dx:dx + 32]
        if hooks: hooks.recording = True
        if a.bn_groups > 1:
            outs = [T(c, return_features=True) for c in xt.chunk(a.bn_groups)]
            tl, feat = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        else:
            tl, feat = T(xt, return_features=True)
        if hooks: hooks.recording = False
        if a.quota and y is None:
            ce = F.cross_entropy(tl, balanced_targets(tl))
        else:
            ce = F.cross_entropy(tl, tl.argmax(1) if y is None else y)
        if a.dir:  # a share of the batch is pulled to soft targets near the classes the teacher finds similar
            k = int(a.dir_frac * len(tl)); cls = tl[:k].argmax(1)
            target = torch.distributions.Dirichlet(a.dir * class_sim[cls] + 1e-3).sample()
            soft = -(target * F.log_softmax(tl[:k], 1)).sum(1).mean()
            ce = (k * soft + (len(tl) - k) * F.cross_entropy(tl[k:], tl[k:].argmax(1))) / len(tl)
        loss = a.oh * ce + a.ie * information_entropy_loss(tl) - a.act * feat.abs().mean()
        if hooks:
            recs = hooks.pop()
            if a.bn_groups > 1:
                k = len(recs) // a.bn_groups
                bnl = sum(batchnorm_statistics_loss(recs[i * k:(i + 1) * k]) for i in range(a.bn_groups)) / a.bn_groups
            else:
                bnl = batchnorm_statistics_loss(recs) + (a.bn_first - 1) * batchnorm_statistics_loss(recs[:1])
            loss = loss + a.bn * bnl
        if a.div:
            h = len(x) // 2
            dz = (z[:h] - z[h:2*h]).abs().mean(1); dx = (x[:h] - x[h:2*h]).abs().flatten(1).mean(1)
            loss = loss + a.div * (dz / (dx + 1e-5)).mean() * 0.1
        if a.adv:
            loss = loss - a.adv * (S(x) - tl).abs().mean()
        if a.fdiv:
            fn = F.normalize(feat, dim=1); sim = fn @ fn.T
            loss = loss + a.fdiv * (sim.pow(2).sum() - sim.diagonal().pow(2).sum()) / (len(fn) * (len(fn) - 1))
        if a.in_stat:
            pix = (x * std + mean)[..., border:32 - border, border:32 - border]
            loss = loss + a.in_stat * ((pix.mean() - mean) ** 2 + (pix.std() - std) ** 2) / std ** 2
        if a.tv:
            loss = loss + a.tv * ((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())
        opt_g.zero_grad(); loss.backward(); opt_g.step()
        xd = x.detach(); n = len(xd)
        idx = (torch.arange(n) + count) % a.replay; mem[idx] = xd
        if a.prio:  # new images get the highest priority so that each is seen soon
            prio[idx] = prio[:min(count, a.replay)].max() if count else 1.0
        count += n
    if sched_g: sched_g.step()
    if a.proc_refresh and it and it % a.proc_refresh == 0:
        S.eval(); fresh = invert_shapes_ext(a.proc_refresh_n, S); S.train()
        ring = (torch.arange(a.proc_refresh_n) + proc_next) % len(proc_pool); proc_pool[ring] = fresh
        proc_next += a.proc_refresh_n
    if a.proc_evolve: evolve_pool()
    for _ in range(a.s_steps):
        if a.replay and a.balance:
            filled = min(count, a.replay)
            with torch.no_grad():
                if it % 10 == 0 or it < 2:  # teacher's class of each stored image, refreshed every 10 iterations
                    mem_cls = torch.cat([T(c).argmax(1) for c in mem[:filled].split(2048)])
                w = 1.0 / torch.bincount(mem_cls, minlength=10).float().clamp(min=1)[mem_cls]
            xb = mem[torch.multinomial(w, a.s_bs or a.bs, replacement=True)]
        elif a.replay and a.prio:
            ix = torch.multinomial((prio[:min(count, a.replay)] + 1e-4) ** a.prio, a.s_bs or a.bs, replacement=True)
            xb = mem[ix]
        elif a.replay:
            xb = mem[torch.randint(0, min(count, a.replay), (a.s_bs or a.bs,))]
        else:
            with torch.no_grad(): xb = gen(latents(a.bs)[0])
        if a.proc:
            k = int(a.proc * len(xb)); xb = torch.cat([xb[k:], proc_pool[torch.randint(0, len(proc_pool), (k,))]])
        xb = aug(xb)
        if a.bss:
            k = int(a.bss_frac * len(xb))
            xa = xb[:k].clone().requires_grad_()
            for _ in range(a.bss):
                gap = F.kl_div(F.log_softmax(S(xa), 1), F.log_softmax(T(xa), 1), reduction="batchmean", log_target=True)
                g, = torch.autograd.grad(gap, xa)
                xa = (xa + a.bss_eps * g.sign()).detach().requires_grad_()
            xb = torch.cat([xa.detach(), xb[k:]])
        if a.noise:
            xb = xb + a.noise * torch.randn_like(xb)
        if a.jac:
            xb = xb.detach().requires_grad_()
            tl, tf = T(xb, return_features=True)
            cls = tl.argmax(1, keepdim=True)
            g_t, = torch.autograd.grad(tl.gather(1, cls).sum(), xb)
            tl, tf = tl.detach(), tf.detach()
        else:
            with torch.no_grad(): tl, tf = T(xb, return_features=True)
        t1, t2 = acts["t1"], acts["t2"]
        sl, sf = S(xb, return_features=True)
        l = s_loss(sl, tl)
        if a.prio and a.replay:  # a mixed input's KL is credited to its first image
            with torch.no_grad():
                kl = (F.softmax(tl, 1) * (F.log_softmax(tl, 1) - F.log_softmax(sl, 1))).sum(1)
            prio[ix] = kl[:len(ix)]
        if a.jac:
            g_s, = torch.autograd.grad(sl.gather(1, cls).sum(), xb, create_graph=True)
            l = l + a.jac * (F.normalize(g_s.flatten(1), dim=1) - F.normalize(g_t.flatten(1), dim=1)).pow(2).sum(1).mean()
        if a.feat: l = l + a.feat * F.mse_loss(proj(sf), tf)
        if a.at: l = l + a.at * ((att(acts["s1"]) - att(t1)).pow(2).sum(1).mean() + (att(acts["s2"]) - att(t2)).pow(2).sum(1).mean())
        opt_s.zero_grad(); l.backward()
        if a.clip: torch.nn.utils.clip_grad_norm_(S.parameters(), a.clip)
        opt_s.step(); sched.step()
        if a.ema:
            with torch.no_grad():
                for pe, ps in zip(S_ema.parameters(), S.parameters()): pe.lerp_(ps, 1 - a.ema)
    if (it + 1) % a.eval_every == 0 or it + 1 == a.iters:
        r = acc(S); log.append((it + 1, round(time.time() - t0), r))
        pm = (mem[:min(count, a.replay), :, border:32 - border, border:32 - border] * std + mean)
        print(f"it {it+1} {time.time()-t0:.0f}s pix mean {pm.mean():.3f} std {pm.std():.3f} acc {r:.4f} ce {ce.item():.3f} bn {bnl.item() if hooks else 0:.2f} kd {l.item():.3f}", flush=True)
if a.ema:
    print("raw student final", acc(S)); S = S_ema
S.eval()
with torch.no_grad():
    pred = torch.cat([S(x).argmax(1) for x in test_x.split(2000)]); tp = torch.cat([T(x).argmax(1) for x in test_x.split(2000)])
print("per-class student", [round((pred[test_y == c] == c).float().mean().item(), 2) for c in range(10)])
print("per-class teacher", [round((tp[test_y == c] == c).float().mean().item(), 2) for c in range(10)])
print("agreement with teacher", (pred == tp).float().mean().item())
with torch.no_grad():
    mc = torch.cat([T(c).argmax(1) for c in mem[:min(count, a.replay)].split(2048)])
print("teacher classes of the replay memory", torch.bincount(mc, minlength=10).tolist())
print(json.dumps({"final": acc(S), "secs": round(time.time() - t0), "log": log, **{k: v for k, v in vars(a).items() if k != "teacher"}}))
if a.save:
    with torch.no_grad(): torch.save(gen(latents(64)[0]), a.save)
if a.save_memory:
    torch.save(mem[:min(count, a.replay)].clone(), a.save_memory)
