"""tiny_wgan.py: a Wasserstein GAN in one file (Arjovsky, Chintala & Bottou, "Wasserstein GAN", ICML 2017).

A critic f, kept K-Lipschitz by clipping every weight to [-c, c], maximises W ~ E_x~data[f(x)] - E_z~N(0,I)[f(G(z))]
(the Kantorovich-Rubinstein dual of the Wasserstein-1 distance, eq. 3 of arXiv:1701.07875); the generator G minimises
-E_z[f(G(z))], after n_critic critic steps with RMSprop (algorithm 1). --gp LAMBDA trades the clipping for the gradient
penalty of Gulrajani et al., "Improved Training of Wasserstein GANs", NeurIPS 2017 (algorithm 1, with Adam):
    L_critic = E[f(G(z))] - E[f(x)] + LAMBDA * E[(||grad_x^ f(x^)||_2 - 1)^2],  x^ = a x + (1 - a) G(z), a ~ U[0, 1].

    python tiny_wgan.py --gp 10                                   # WGAN-GP on MNIST (downloaded)
    python tiny_wgan.py                                           # weight clipping, as in the paper
    python tiny_wgan.py --dataset shapes                          # procedural images, no network
    python tiny_wgan.py --dataset cifar10 --gp 10                 # CIFAR-10, official binary archive
    python tiny_wgan.py --dataset folder --datadir my_images --image_size 64
    python tiny_wgan.py --preset paper                            # the paper's widths, lr and n_critic
    python tiny_wgan.py --gp 10 --sample_only 64                  # samples from the checkpoint
Sections: arguments, model, loss, training, evaluation & outputs, data, harness (shared by the four scripts), main.
Outputs go to logs/<expname>/: args.json, ckpt.pt, metrics.jsonl, samples_<step>.png, final.json."""
import argparse
import difflib
import fnmatch
import gzip
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import signal
import sys
import tarfile
import threading
import time
import urllib.request

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

SCRIPT = "tiny_wgan"


# ---------------------------------------------------------------- arguments
# Defaults sized for a CPU budget of minutes: widths 32, n_critic 2, lr 5e-4 (benchmarks/results.md); --preset paper
# puts the papers' settings back (DCGAN widths, WGAN and WGAN-GP algorithm 1), before the flags given explicitly.
PRESETS = {"paper": dict(nz=100, ngf=64, ndf=64, n_critic=5)}
ALIASES = {"--Diters": "--n_critic", "--critic_iters": "--n_critic", "--lrD": "--lr (one for both nets)",
           "--lrG": "--lr (one for both nets)", "--clamp_lower": "--clip_value", "--clamp_upper": "--clip_value",
           "--niter": "--iters", "--n_epochs": "--iters (generator steps)", "--dataroot": "--datadir",
           "--experiment": "--expname", "--cuda": "--device cuda", "--no-cuda": "--device cpu", "--ngpu": "--gpus",
           "--netG": "--ckpt", "--netD": "--ckpt", "--adam": "--gp LAMBDA (Adam comes with the penalty)",
           "--noBN": "--critic_norm none", "--LAMBDA": "--gp", "--latent_dim": "--nz"}


def get_parser():
    p = Parser(description="Wasserstein GAN in one file.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pint = positive(int)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=["mnist", "fashion", "cifar10", "folder", "shapes"],
                   help="mnist/fashion: idx files, cifar10: binary archive (downloaded); folder: your images; shapes")
    g.add_argument("--datadir", default="data", help="root of mnist/, fashion/ or cifar10/; for folder, the images")
    g.add_argument("--data_url", default=None, help="where to download from (default: the official mirrors)")
    g.add_argument("--image_size", type=pint, default=32, help="4 x a power of two; MNIST's 28x28 is padded to 32")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help=f"defaults under the given flags: {PRESETS}")
    g.add_argument("--nz", type=pint, default=64, help="size of the noise z")
    g.add_argument("--ngf", type=pint, default=32, help="generator channels before the output layer")
    g.add_argument("--ndf", type=pint, default=32, help="critic channels after the first layer")
    g.add_argument("--critic_norm", choices=["batch", "layer", "none"], help="default: batch, or layer with --gp")
    g = p.add_argument_group("training")
    g.add_argument("--gp", type=positive(float), metavar="LAMBDA", help="WGAN-GP with this penalty weight (paper: 10)")
    g.add_argument("--clip_value", type=positive(float), default=0.01, help="c: critic weights are clipped to [-c, c]")
    g.add_argument("--n_critic", type=pint, default=2, help="critic steps per generator step (papers: 5)")
    g.add_argument("--paper_schedule", action="store_true",
                   help="100 critic steps for the first 25 generator steps and every 500th (WGAN reference code)")
    g.add_argument("--iters", type=pint, default=20000, help="generator steps")
    g.add_argument("--batch_size", type=pint, default=64, help="images per critic step (split over --gpus)")
    g.add_argument("--lr", type=positive(float), default=5e-4,
                   help="lr of both nets: RMSprop, or Adam with --gp (papers, --preset paper: 5e-5, 1e-4)")
    g.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 under --gp (WGAN-GP paper: 0)")
    g.add_argument("--beta2", type=float, default=0.9, help="Adam beta2 under --gp (WGAN-GP paper: 0.9)")
    g.add_argument("--max_minutes", type=positive(float), default=None, help="training budget, then outputs as usual")
    g.add_argument("--freeze", nargs="+", default=[], metavar="PATTERN", help="freeze parameters by name: 'critic.*'")
    g = p.add_argument_group("outputs")
    g.add_argument("--i_print", type=pint, default=50, help="generator steps per metrics.jsonl line and checkpoint")
    g.add_argument("--i_sample", type=pint, default=500, help="generator steps per samples_<step>.png grid")
    g.add_argument("--sample_only", type=pint, default=None, metavar="N", help="write N samples and exit")
    g.add_argument("--tensorboard", action="store_true", help="log to TensorBoard too (pip install tensorboard)")
    g = p.add_argument_group("run")
    g.add_argument("--basedir", default="logs", help="where experiment folders go")
    g.add_argument("--expname", default=None, help="experiment folder (default: wgan[_gp]_<dataset>)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--gpus", default=None, help="comma-separated GPU ids for DataParallel (default: --device only)")
    g.add_argument("--no_reload", action="store_true", help="start afresh instead of resuming ckpt.pt")
    g.add_argument("--ckpt", default=None, help="checkpoint to load instead of logs/<expname>/ckpt.pt")
    return p


def preset_defaults(args):                                              # --preset paper, with its mode's learning rate
    return {**PRESETS[args.preset], "lr": 1e-4 if args.gp else 5e-5} if args.preset else {}


def check_args(args):
    args.critic_norm = args.critic_norm or ("layer" if args.gp else "batch")
    if args.gp and args.critic_norm == "batch":
        fail("batch norm makes each critic output depend on the whole batch, so the per-sample gradient penalty "
             "is wrong", "--critic_norm", "use layer or none with --gp (Gulrajani et al. sec. 4)")
    if args.image_size < 8 or args.image_size & (args.image_size - 1):  # a power of two from 8 is 4 x one
        fail(f"must be 4 x a power of two (8, 16, 32, 64, ...), got {args.image_size}", "--image_size", "e.g. 32")
    args.expname = args.expname or f"wgan{'_gp' if args.gp else ''}_{args.dataset}"
    return args


# ---------------------------------------------------------------- model
def up_block(a, b, first=False):
    """Transposed conv doubling the size (4x4 from 1x1 for the first), batch norm, ReLU (DCGAN)."""
    conv = nn.ConvTranspose2d(a, b, 4, 1, 0, bias=False) if first else nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)
    return [conv, nn.BatchNorm2d(b, track_running_stats=False), nn.ReLU(True)]


def down_block(a, b, norm):
    """Strided conv halving the size, normalisation, LeakyReLU(0.2) (DCGAN's critic block)."""
    layers = [nn.Conv2d(a, b, 4, 2, 1, bias=norm == "none")]
    if norm != "none":  # layer: per sample over (C, H, W), so the critic stays a function of each image alone
        layers.append(nn.BatchNorm2d(b, track_running_stats=False) if norm == "batch" else nn.GroupNorm(1, b))
    return layers + [nn.LeakyReLU(0.2, True)]


class WGAN(nn.Module):
    """DCGAN generator G: z (B, nz) -> image (B, C, S, S) in [-1, 1]; critic f: image -> one unbounded score (B,)."""
    # G: transposed convs 1 -> 4 -> 8 ... -> S; f: strided convs S -> ... -> 4 -> 1, no sigmoid. Batch norm keeps no
    # running averages: the nets always use the batch's statistics, as in training. forward() returns this replica's
    # loss terms, so DataParallel sends a few numbers to GPU 0.

    def __init__(self, channels, image_size, nz, ngf, ndf, critic_norm):
        super().__init__()
        self.config = dict(channels=channels, image_size=image_size, nz=nz, ngf=ngf, ndf=ndf, critic_norm=critic_norm)
        self.nz, n = nz, int(math.log2(image_size // 4))               # n doublings from 4x4
        widths = [ngf * 2 ** i for i in range(n - 1, -1, -1)]          # e.g. 128, 64, 32 for 32x32
        g = up_block(nz, widths[0], first=True) + [m for a, b in zip(widths, widths[1:]) for m in up_block(a, b)]
        self.generator = nn.Sequential(nn.Unflatten(1, (nz, 1, 1)), *g,
                                       nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1, bias=False), nn.Tanh())
        widths = [ndf * 2 ** i for i in range(n)]                      # e.g. 32, 64, 128
        d = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]  # no norm on the input layer (DCGAN)
        d += [m for a, b in zip(widths, widths[1:]) for m in down_block(a, b, critic_norm)]
        self.critic = nn.Sequential(*d, nn.Conv2d(widths[-1], 1, 4, 1, 0), nn.Flatten(0))

    def forward(self, z=None, real=None, fake=None, alpha=None, lam=None):
        """Generator terms from z (B, nz): (1, 1) sum of f(G(z)). Critic terms from real and fake (B, C, S, S): (1, 2)
        sums of f(real), f(fake); with lam, (1, 4): also of the penalty and gradient norm at x^ (alpha (B, 1, 1, 1))."""
        # x^ is made inside the replica, so the double backward never crosses DataParallel's scatter
        if z is not None:
            return self.critic(self.generator(z)).sum().view(1, 1)
        terms = [self.critic(real).sum(), self.critic(fake).sum()]     # separate passes, as the reference code
        if lam is not None:                                             # penalty (B,), gradient norm (B,)
            terms += [t.sum() for t in gradient_penalty(self.critic, real, fake, alpha, lam)]
        return torch.stack(terms).unsqueeze(0)


# ---------------------------------------------------------------- loss
def gradient_penalty(critic, real, fake, alpha, lam):
    """LAMBDA (||grad_x^ f(x^)||_2 - 1)^2 at x^ = alpha real + (1 - alpha) fake (Gulrajani et al. alg. 1), with one
    alpha per sample (B, 1, 1, 1) and the norm over all non-batch dimensions. -> penalty (B,), gradient norm (B,)."""
    x_hat = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    # create_graph, so that the penalty trains the critic
    grad, = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)  # row b: d f(x^_b) / d x^_b
    norm = grad.flatten(1).norm(2, dim=1)                              # (B,)
    return lam * (norm - 1) ** 2, norm


# ---------------------------------------------------------------- training
def critic_step(model, opt, real, lam=None, clip=None):
    """One critic step on real images (B, C, S, S): minimise E[f(G(z))] - E[f(x)] (+ penalty), then clip."""
    raw = getattr(model, "module", model)
    with torch.no_grad():                                              # fakes made here: the split does not matter
        fake = raw.generator(torch.randn(len(real), raw.nz, device=real.device))
    alpha = torch.rand(len(real), 1, 1, 1, device=real.device)        # one weight per sample, not per pixel
    sums = model(real=real, fake=fake, alpha=alpha, lam=lam).sum(0) / len(real)  # sum over replicas / global count
    w = sums[0] - sums[1]                                              # E[f(x)] - E[f(G(z))]   (WGAN eq. 3)
    loss = -w + (sums[2] if lam is not None else 0)
    if not torch.isfinite(loss):
        fail(f"the critic loss became {loss.item()}", "--lr", "lower it; ckpt.pt still holds the last good state")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if clip is not None:                                                # after the step (WGAN algorithm 1, line 7)
        with torch.no_grad():
            for p in raw.critic.parameters():
                p.clamp_(-clip, clip)                                  # w <- clip(w, -c, c)
    norm = sums[3] if lam is not None else torch.full_like(w, math.nan)  # on the device of the loss
    return torch.stack([w.detach(), loss.detach(), norm.detach()])     # -> per image: W estimate, loss, gradient norm


def generator_step(model, opt, b, device):
    """One generator step on b noise vectors: minimise -E[f(G(z))], the critic held fixed. -> the loss, a tensor."""
    raw = getattr(model, "module", model)
    loss = -model(z=torch.randn(b, raw.nz, device=device)).sum() / b   # -E[f(G(z))]   (WGAN alg. 1, line 10)
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=[p for p in raw.generator.parameters() if p.requires_grad])  # none for the critic's weights
    opt.step()
    return loss.detach()


def n_critic_at(step, n_critic, paper_schedule):
    """Critic steps before generator step `step`: n_critic, or 100 for the first 25 and every 500th (WGAN code)."""
    return 100 if paper_schedule and (step < 25 or step % 500 == 0) else n_critic  # keeps the critic near optimal


def make_optimizer(params, args):
    # RMSprop as in the WGAN paper (momentum made clipping unstable there, sec. 3). Under --gp, Adam with the WGAN-GP
    # paper's betas (0, 0.9) rather than DCGAN's (0.5, 0.9): no momentum lets the critic follow a moving generator,
    # and on MNIST it scored FD 18 against 40 after 2 minutes (benchmarks/results.md).
    if args.gp:
        return torch.optim.Adam(params, lr=args.lr, betas=(args.beta1, args.beta2))
    return torch.optim.RMSprop(params, lr=args.lr)


# ---------------------------------------------------------------- evaluation & outputs
@torch.no_grad()
def generate(model, z, batch_size):  # G(z) in [0, 1], in batches of the training size (batch norm: batch statistics)
    return torch.cat([model.generator(z[i:i + batch_size]) for i in range(0, len(z), batch_size)]) * 0.5 + 0.5


@torch.no_grad()
def wasserstein_estimate(model, images, batch_size, device, seed=0):
    """E[f(x)] - E[f(G(z))] over held-out images and as many fixed-seed fakes: ~ K W(P_data, P_G) (WGAN fig. 3)."""
    # the critic's estimate of the Wasserstein distance, up to its Lipschitz constant K
    z = torch.randn(len(images), model.nz, generator=torch.Generator().manual_seed(seed)).to(device)
    total = 0.0
    for x, zb in zip(images.split(batch_size), z.split(batch_size)):
        total += (model.critic(to_float(x).to(device)).sum() - model.critic(model.generator(zb)).sum()).item()
    return total / len(images)


def sample_only(args, device, expdir):  # --sample_only N: G(z) for N draws z ~ N(0, I), from --ckpt (default ckpt.pt)
    path = args.ckpt or os.path.join(expdir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    model = WGAN(**ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    z = torch.randn(args.sample_only, model.nz, generator=torch.Generator().manual_seed(args.seed)).to(device)
    write_samples(expdir, generate(model, z, ckpt["args"]["batch_size"]))
    print(f"wrote {args.sample_only} samples from {path} to {expdir}/samples.png and samples.npy")
    return {"samples": args.sample_only, "ckpt": path}


# ---------------------------------------------------------------- data
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR_MD5 = {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}  # the published checksum
CIFAR_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue bytes, row-major


def load_cifar(folder, base_url=None):  # -> (train, test) uint8 (N, 3, 32, 32) from the binary CIFAR-10 files
    # fixed-size records of one label byte and 3072 pixel bytes (CIFAR_RECORD): no pickle involved
    if not all(os.path.exists(os.path.join(folder, name)) for name in CIFAR_FILES):
        fetch(folder, CIFAR_MD5, base_url or CIFAR_URL)
        archive = os.path.join(folder, "cifar-10-binary.tar.gz")
        try:
            with tarfile.open(archive, "r:gz") as tar:
                # the six .bin members, matched by base name and written under that name only: no path in the
                # archive can escape folder
                members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
                for name in CIFAR_FILES:
                    with tar.extractfile(members[name]) as src:
                        atomic(os.path.join(folder, name), lambda p: pathlib.Path(p).write_bytes(src.read()))
        except (tarfile.TarError, OSError, EOFError, KeyError) as e:
            fail(f"unreadable archive ({type(e).__name__}: {e})", archive, "delete it to download it again")
    parts = []
    for name in CIFAR_FILES:
        data = np.fromfile(os.path.join(folder, name), np.uint8)
        if len(data) == 0 or len(data) % CIFAR_RECORD:
            fail(f"{len(data)} bytes is not a whole number of {CIFAR_RECORD}-byte records", os.path.join(folder, name),
                 "delete the .bin files to extract them again")
        parts.append(torch.from_numpy(data.reshape(-1, CIFAR_RECORD)[:, 1:].reshape(-1, 3, 32, 32).copy()))
    return torch.cat(parts[:5]), parts[5]                               # data_batch_1 to 5; test_batch


def load_dataset(args):                                                 # -> (train, test) uint8 (N, C, size, size)
    if args.dataset in ("mnist", "fashion"):
        train, test = load_idx_images(args.dataset, os.path.join(args.datadir, args.dataset), args.data_url)
    elif args.dataset == "cifar10":
        train, test = load_cifar(os.path.join(args.datadir, "cifar10"), args.data_url)
    else:                                                               # folder, shapes: a fixed 10% held out
        images = make_shapes(10000, args.image_size) if args.dataset == "shapes" else \
            load_folder(args.datadir, args.image_size)
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
        train, test = images[max(1, len(images) // 10):], images[:max(1, len(images) // 10)]
    if train.shape[-1] == 28 and args.image_size == 32:                 # MNIST: padded with black (DCGAN needs 4 x 2^k)
        train, test = F.pad(train, (2, 2, 2, 2)), F.pad(test, (2, 2, 2, 2))
    elif train.shape[-1] != args.image_size:
        resize = lambda x: F.interpolate(x.float(), size=args.image_size, mode="bilinear", antialias=True)  # noqa: E731
        train, test = (resize(x).round().clamp(0, 255).to(torch.uint8) for x in (train, test))
    return train, test


def to_float(x):
    return x.float() / 127.5 - 1                                        # uint8 -> [-1, 1], the range of G's tanh


IDX_URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "fashion": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
IDX_FILES = [f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
IDX_MD5 = {"mnist": dict(zip(IDX_FILES, ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                         "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"])),
           "fashion": dict(zip(IDX_FILES, ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                           "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]))}
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fetch(folder, files, url):  # download from url/<name> each of files ({name: md5}) that folder lacks
    for name in [name for name in files if not os.path.exists(os.path.join(folder, name))]:
        try:
            os.makedirs(folder, exist_ok=True)
            download(url.rstrip("/") + "/" + name, os.path.join(folder, name), files[name])
        except Exception as e:  # OSError, HTTP errors, a wrong md5
            fail(f"cannot download ({e})", f"{url.rstrip('/')}/{name}", f"no network? put {', '.join(files)} in "
                 f"{folder} by hand, point --datadir at a data root that has them, or use --dataset shapes (generated)")


def read_idx(path):  # an idx file, gzipped or not -> numpy: 0, 0, dtype code, ndim, big-endian uint32 dims, values
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_DTYPES:
            raise ValueError("bad magic number")
        dims = np.frombuffer(data, ">u4", count=data[3], offset=4)
        return np.frombuffer(data, IDX_DTYPES[data[2]], offset=4 + 4 * len(dims)).reshape(dims)
    except (OSError, EOFError, ValueError) as e:                        # not gzip, cut short, or a foreign file
        fail(f"not a readable idx file ({e})", path, "delete it to download it again, or replace it")


def load_idx_images(dataset, folder, base_url=None):  # -> (train, test) uint8 (N, 1, 28, 28), downloaded if missing
    fetch(folder, IDX_MD5[dataset], base_url or IDX_URLS[dataset])
    out = []
    for split in ("train", "t10k"):
        path = os.path.join(folder, f"{split}-images-idx3-ubyte.gz")
        images = read_idx(path)
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
            fail(f"expected uint8 images of 28x28, got {images.dtype} {images.shape}", path, "replace the file")
        out.append(torch.from_numpy(images.copy()).unsqueeze(1))
    return out


def make_shapes(n, size, seed=0):  # -> uint8 (n, 1, size, size): one white disc, ring, square or diamond per image
    g, s, out = torch.Generator().manual_seed(seed), 4 * size, []      # drawn at 4x the size, then box-filtered
    u = (torch.arange(s) + 0.5) / s * 2 - 1                           # pixel centres in [-1, 1]
    yy, xx = torch.meshgrid(u, u, indexing="ij")
    for start in range(0, n, 500):
        m = min(500, n - start)
        kind = torch.randint(0, 4, (m, 1, 1), generator=g)
        r = 0.3 + 0.4 * torch.rand(m, 1, 1, generator=g)              # radius, in half image widths
        th = torch.rand(m, 1, 1, generator=g) * math.pi / 2           # rotation
        cx, cy = (torch.rand(2, m, 1, 1, generator=g) * 2 - 1) * (0.95 - r)  # keep the shape inside
        dx, dy = xx - cx, yy - cy
        rx, ry = dx * th.cos() + dy * th.sin(), dy * th.cos() - dx * th.sin()  # rotated coordinates
        dist = (dx ** 2 + dy ** 2).sqrt()
        inside = torch.where(kind == 0, dist < r, torch.where(kind == 1, (dist - 0.7 * r).abs() < 0.3 * r,
                 torch.where(kind == 2, torch.maximum(rx.abs(), ry.abs()) < 0.8 * r, rx.abs() + ry.abs() < r)))
        out.append((F.avg_pool2d(inside.float().unsqueeze(1), 4) * 255).round().to(torch.uint8))
    return torch.cat(out)


def load_folder(root, size):  # every PNG/JPG/BMP under root -> uint8 (N, C, size, size): centre squares, resized
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
    if len(files) < 3:
        fail(f"found {len(files)} PNG/JPG/BMP images, need at least 3", root, "point --datadir at a folder of images")
    images = []
    for path in tqdm(files, desc="images", leave=False):
        try:
            a = np.asarray(iio.imread(path))
        except Exception as e:                                          # imageio raises many types for a broken file
            fail(f"cannot read image ({type(e).__name__})", path, "remove or replace the file")
        a = a[..., None] if a.ndim == 2 else a[..., :3] if a.shape[-1] >= 3 else a[..., :1]  # drop alpha
        x = torch.from_numpy(a.astype(np.float32) / (np.iinfo(a.dtype).max if a.dtype.kind in "ui" else 1.0))
        h, w, k = *x.shape[:2], min(x.shape[:2])
        x = x[(h - k) // 2:(h - k) // 2 + k, (w - k) // 2:(w - k) // 2 + k].permute(2, 0, 1)  # the centre square
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        images.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
    c = max(im.shape[0] for im in images)                               # 3 if any file is RGB(A), else 1
    return torch.stack([im.expand(c, -1, -1) for im in images])         # grey ones repeated


def grid(images, nrow):  # images (N, C, H, W) in [0, 1] -> uint8 (H', W'[, C]): nrow a row, 2-pixel grey gaps
    n, c, h, w = images.shape
    canvas = torch.full((c, math.ceil(n / nrow) * (h + 2) + 2, nrow * (w + 2) + 2), 0.5)
    for i, im in enumerate(images.cpu()):
        r, q = divmod(i, nrow)
        canvas[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = im
    return to_uint8(canvas.permute(1, 2, 0).squeeze(-1))               # (H', W') for grey images


def write_samples(expdir, images):  # --sample_only: images (N, C, H, W) in [0, 1] -> samples.npy (uint8), samples.png
    pixels = to_uint8(images.permute(0, 2, 3, 1).squeeze(-1))           # (N, H, W) for grey images, else (N, H, W, C)
    atomic(os.path.join(expdir, "samples.npy"), lambda p: np.save(p, pixels))
    save_png(os.path.join(expdir, "samples.png"), grid(images, math.ceil(math.sqrt(len(images)))))


# ---------------------------------------------------------------- harness (identical in all four scripts)
# Errors, flags, devices, files, downloads, checkpoints, the metrics log, the progress bar and Ctrl-C: the same text
# in tiny_nerf.py, tiny_tensorf.py, tiny_wgan.py and tiny_vae.py (tests/test_shared.py checks it). SCRIPT, ALIASES,
# get_parser, preset_defaults and check_args are each script's own.
def fail(what, where, fix):                                             # a user error: one line, exit status 1
    raise SystemExit(f"error: {what} ({where}): {fix}")


class Parser(argparse.ArgumentParser):                                  # argparse, with one-line errors
    def error(self, message):                                           # unknown flags: ALIASES, or the closest
        hints = []
        for flag in re.findall(r"(?<!\S)--?[A-Za-z][-\w]*", message.partition("unrecognized arguments:")[2]):
            close = difflib.get_close_matches(flag, self._option_string_actions, 2, 0.7)
            hints.append(f"{flag} is {ALIASES[flag]} here" if flag in ALIASES else
                         f"did you mean {' or '.join(close)}?" if close else f"{flag} has no equivalent here")
        fail(message, "command line", "; ".join(hints + [f"see python {SCRIPT}.py --help"]))


def positive(kind, zero=False):                                         # an argparse type: > 0, or >= 0
    def check(text):
        value = kind(text)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'>=' if zero else '>'} 0, got {text}")
        return value
    return check


def parse_args(argv=None):                                              # a preset sets defaults: given flags win
    parser = get_parser()
    parser.set_defaults(**preset_defaults(parser.parse_args(argv)))
    args = check_args(parser.parse_args(argv))
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        fail("the tensorboard package is not installed", "--tensorboard", "pip install tensorboard, or drop the flag")
    return args


def pick_devices(args):                                                 # -> device, DataParallel ids (--gpus)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        fail(f"unknown device {args.device!r}", "--device", "use auto, cpu, cuda or cuda:N")
    if name == "cpu" and args.gpus:
        fail(f"--gpus {args.gpus} needs CUDA, and this run is on the CPU", "--gpus", "drop it, or run on a CUDA GPU")
    if name == "cpu":
        return torch.device("cpu"), []
    n, gpus = torch.cuda.device_count(), (args.gpus or name.partition(":")[2] or "0").split(",")
    if not all(i.isdigit() and int(i) < n for i in gpus):            # one GPU unless --gpus lists more
        fail(f"{n} CUDA GPUs visible, asked for {args.gpus or name}", "--gpus" if args.gpus else "--device",
             "list GPUs that exist, or use --device cpu")
    torch.cuda.set_device(int(gpus[0]))                                 # the model sits on the first
    torch.backends.cuda.matmul.allow_tf32 = True                        # TF32 matmuls (Ampere+), cuDNN's fastest
    torch.backends.cudnn.benchmark = True                               # convolutions: results vary in the last bits
    return torch.device("cuda", int(gpus[0])), [int(i) for i in gpus]


def freeze(model, patterns):                                            # --freeze: no gradient to matching names
    names = [n for n, _ in model.named_parameters()]
    if unmatched := [pattern for pattern in patterns if not fnmatch.filter(names, pattern)]:
        fail(f"pattern {unmatched[0]!r} matches no parameter", "--freeze", f"names look like {names[0]}, {names[-1]}")
    for name, p in model.named_parameters():
        p.requires_grad_(not any(fnmatch.fnmatch(name, pattern) for pattern in patterns))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) - n_train:,} frozen, {n_train:,} trainable")
    if n_train == 0:
        fail("every parameter is frozen", "--freeze", "match fewer parameters")


def atomic(path, write):                                                # write(tmp), rename: never half a file
    root, ext = os.path.splitext(path)
    write(f"{root}.tmp{ext}")
    os.replace(f"{root}.tmp{ext}", path)


def write_text(path, text):
    atomic(path, lambda p: pathlib.Path(p).write_text(text))


def save_png(path, pixels):
    atomic(path, lambda p: iio.imwrite(p, pixels))


def to_uint8(x):                                                        # [0, 1] -> uint8 numpy: pictures, video
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def make_expdir(args):                                                  # <basedir>/<expname>/, made if need be
    expdir = os.path.join(args.basedir, args.expname)
    try:
        os.makedirs(expdir, exist_ok=True)
        if not os.access(expdir, os.W_OK):
            raise OSError(0, "not writable")
    except OSError as e:
        fail(f"cannot write to the run folder ({e.strerror})", expdir, "choose another --basedir or --expname")
    return expdir


def download(url, path, md5=None):                                      # via path.part: only a whole, checked file
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f, tqdm.wrapattr(
                r, "read", int(r.headers.get("Content-Length") or 0) or None) as source:  # a progress bar in bytes
            shutil.copyfileobj(source, f, 1 << 20)
        if md5 and (digest := hashlib.md5(pathlib.Path(tmp).read_bytes()).hexdigest()) != md5:
            raise ValueError(f"md5 {digest} is not the published {md5}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fingerprint(name, *tensors):                                        # what a run trains on, for its checkpoint
    return {"name": name, "sha1": hashlib.sha1(b"".join(t.cpu().numpy().tobytes() for t in tensors)).hexdigest()}


def save_checkpoint(path, model, optimizers, step, state, args, data):  # one layout in the four scripts
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None}
    atomic(path, lambda p: torch.save({
        "script": SCRIPT, "model_args": model.config, "model": model.state_dict(), "step": step, "state": state,
        "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()}, "rng": rng, "args": vars(args),
        "data": data}, p))


def load_checkpoint(path):  # a checkpoint this script wrote, or an error; on the CPU (optimizers move their state)
    if not os.path.isfile(path):
        fail("no such checkpoint", path, "train first, or pass --ckpt PATH, or the --expname (or --preset) it had")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:                                              # many types for a foreign or damaged file
        fail(f"not a readable checkpoint ({type(e).__name__})", path, f"pass a checkpoint written by {SCRIPT}.py")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT or "optimizers" not in ckpt:
        fail(f"not a {SCRIPT} checkpoint, or an old one", path, f"pass one written by this {SCRIPT}.py, or --no_reload")
    return ckpt


def resume(args, expdir, model, optimizers, state, data, device):
    # Unless --no_reload, go on from <expdir>/ckpt.pt (or --ckpt) if it fits this run (architecture, data, optimizer
    # kinds): weights, optimizer and RNG states, the counters (into state). -> the step to go on from.
    path = args.ckpt or os.path.join(expdir, "ckpt.pt")
    if not args.ckpt and (args.no_reload or not os.path.exists(path)):
        return 0
    ckpt, fix = load_checkpoint(path), "use its flags, --no_reload to start afresh, or another --expname"
    if other := [(k, ckpt["model_args"].get(k), v) for k, v in model.config.items() if ckpt["model_args"].get(k) != v]:
        fail("checkpoint has {}={}, this run {}".format(*other[0]), path, fix)
    if ckpt["data"]["sha1"] != data["sha1"]:
        fail(f"checkpoint trained on other data ({ckpt['data']['name']}; now {data['name']})", path, fix)
    if any(torch.is_tensor(v) and v.shape != getattr(ckpt["state"].get(k, v), "shape", 0) for k, v in state.items()):
        fail("checkpoint written by an older version of this script", path, "--no_reload, or another --expname")
    for key, opt in optimizers.items():
        if ckpt["optimizers"][key]["param_groups"][0].keys() != opt.state_dict()["param_groups"][0].keys():
            fail(f"checkpoint trained with another optimizer than this run's {type(opt).__name__}", path, fix)
        opt.load_state_dict(ckpt["optimizers"][key])
    model.load_state_dict(ckpt["model"])
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    state.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in ckpt["state"].items()})  # sums: device
    print(f"resumed {path} at step {ckpt['step']}")
    return ckpt["step"]


class Run:
    # A training run's metrics.jsonl (cut back to the checkpoint's step on resume) and TensorBoard; its progress bar,
    # whose total under --max_minutes is the step the budget ends at; within `with`, Ctrl-C and SIGTERM set `stopped`.
    def __init__(self, args, expdir, step, steps, seconds, flag):
        self.path, self.stopped, self.old = os.path.join(expdir, "metrics.jsonl"), False, {}
        old = pathlib.Path(self.path).read_text().splitlines() if step and os.path.exists(self.path) else []
        write_text(self.path, "".join(f"{line}\n" for line in old if line.endswith("}") and json.loads(line)["step"]
                                      <= step))                         # ("}": not a line cut short by a crash)
        self.board = (importlib.import_module("torch.utils.tensorboard").SummaryWriter(expdir, purge_step=step)
                      if args.tensorboard else None)                    # an optional package: imported when asked for
        self.bar = tqdm(total=steps, initial=step, desc="train", dynamic_ncols=True)
        self.steps, self.budget = steps, (args.max_minutes or math.inf) * 60
        if step >= steps or seconds >= self.budget:
            why = f"its {steps} steps are done: raise {flag}" if step >= steps else "--max_minutes is spent: raise it"
            self.bar.write(f"nothing left to train at step {step}, evaluating; {why} to train on, or --no_reload")

    def over(self, seconds):                                            # Ctrl-C, or the time budget is spent
        return self.stopped or seconds >= self.budget

    def advance(self, step, seconds, **postfix):
        if self.budget < math.inf and step > self.bar.initial:          # steps per second in this session so far
            rate = (step - self.bar.initial) / max(time.time() - self.bar.start_t, 1e-9)
            self.bar.total = min(self.steps, step + round(rate * max(self.budget - seconds, 0)))
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def log(self, record, image=None):                                  # image: uint8 (H, W) or (H, W, C), or a PNG
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.board:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])
            if image is not None:
                image = iio.imread(image) if isinstance(image, str) else image
                self.board.add_image("picture", image, record["step"], dataformats="HWC"[:image.ndim])
            self.board.flush()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():      # only it can catch signals
            self.old = {s: signal.signal(s, self.catch) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def catch(self, signum, frame):
        self.stopped = True
        signal.signal(signal.SIGINT, self.old[signal.SIGINT])           # a second Ctrl-C: as before the run

    def __exit__(self, *exc):
        self.bar.close()
        for s, handler in self.old.items():
            signal.signal(s, handler)


def interrupted(run, step, path):                                       # after Ctrl-C: one line, exit status 130
    if run.stopped:
        print(f"interrupted at step {step}: saved {path}; run the same command to resume", file=sys.stderr)
        raise SystemExit(130)


def main(argv=None):
    args = parse_args(argv)
    device, gpus = pick_devices(args)
    expdir = make_expdir(args)
    torch.manual_seed(args.seed)
    if args.sample_only:
        return sample_only(args, device, expdir)

    # data, model and optimizers, resumed from the run's checkpoint if it has one
    train, test = load_dataset(args)
    data = fingerprint(f"{args.dataset}, {len(train)} training images of {args.image_size}", train)
    raw = WGAN(train.shape[1], args.image_size, args.nz, args.ngf, args.ndf, args.critic_norm).to(device)
    opt_d, opt_g = make_optimizer(raw.critic.parameters(), args), make_optimizer(raw.generator.parameters(), args)
    # sums since the last log line: W, critic loss, gradient norm, generator loss, critic steps, generator steps
    state = {"critic_steps": 0, "in_step": 0, "seconds": 0.0, "sums": torch.zeros(6, device=device)}
    step = resume(args, expdir, raw, {"critic": opt_d, "generator": opt_g}, state, data, device)
    freeze(raw, args.freeze)
    if not any(p.requires_grad for p in raw.generator.parameters()):
        fail("every generator parameter is frozen", "--freeze", "match fewer parameters")
    critic_trains = any(p.requires_grad for p in raw.critic.parameters())
    model = nn.DataParallel(raw, device_ids=gpus) if len(gpus) > 1 else raw  # the losses are computed per replica
    write_text(os.path.join(expdir, "args.json"), json.dumps(vars(args), indent=1))
    sizes = [sum(p.numel() for p in net.parameters()) for net in (raw.generator, raw.critic)]
    mode = f"WGAN-GP lambda={args.gp:g}" if args.gp else f"clipping c={args.clip_value:g}"
    print(f"{len(train)} train / {len(test)} held-out images of {tuple(train.shape[1:])}, generator {sizes[0]:,} / "
          f"critic {sizes[1]:,} parameters, {mode}, {device}")

    # train: n_critic critic steps (WGAN algorithm 1, lines 2-8), then a generator step (lines 9-10); batches drawn
    # on the device, no step waits for it but to check the critic's loss
    fixed_z = torch.randn(64, args.nz, generator=torch.Generator().manual_seed(1234)).to(device)  # the grids' noise
    train, e = train.to(device), torch.eye(6, device=device)           # e[k]: adds 1 to sums[k]
    ckpt_path, start = os.path.join(expdir, "ckpt.pt"), time.time() - state["seconds"]
    with Run(args, expdir, step, args.iters, state["seconds"], "--iters") as run:
        while step < args.iters and not run.over(state["seconds"]):
            while critic_trains and state["in_step"] < n_critic_at(step, args.n_critic, args.paper_schedule) \
                    and not run.stopped:
                epoch, i = divmod(state["critic_steps"], max(1, len(train) // args.batch_size))  # order: seed, epoch
                g = torch.Generator(device).manual_seed(args.seed * 100003 + epoch)
                order = torch.randperm(len(train), generator=g, device=device)
                real = to_float(train[order[i * args.batch_size:(i + 1) * args.batch_size]])
                terms = critic_step(model, opt_d, real, args.gp, None if args.gp else args.clip_value)
                state["sums"] += F.pad(terms, (0, 3)) + e[4]                   # W, loss, gradient norm; a step
                state["in_step"], state["critic_steps"] = state["in_step"] + 1, state["critic_steps"] + 1
            if run.stopped:                                             # between critic steps: resumes there
                break
            state["sums"] += generator_step(model, opt_g, args.batch_size, device) * e[3] + e[5]  # the loss; a step
            step, state["in_step"], state["seconds"] = step + 1, 0, time.time() - start
            run.advance(step, state["seconds"])
            samples = os.path.join(expdir, f"samples_{step}.png")
            if step % args.i_sample == 0:
                save_png(samples, grid(generate(raw, fixed_z, args.batch_size), 8))
            if step % args.i_print == 0 or step == args.iters or run.over(state["seconds"]):
                w, loss_d, norm, loss_g = (state["sums"][:4] / state["sums"][[4, 4, 4, 5]].clamp(min=1)).tolist()
                run.log({"step": step, "critic_steps": state["critic_steps"], "wasserstein": w, "loss_d": loss_d,
                         "loss_g": loss_g, "grad_norm": norm if args.gp else None, "lr": args.lr,
                         "seconds": round(state["seconds"], 2)}, samples if step % args.i_sample == 0 else None)
                run.advance(step, state["seconds"], W=f"{w:.4f}", loss_g=f"{loss_g:.4f}")
                state["sums"].zero_()
                save_checkpoint(ckpt_path, raw, {"critic": opt_d, "generator": opt_g}, step, state, args, data)
    save_checkpoint(ckpt_path, raw, {"critic": opt_d, "generator": opt_g}, step, state, args, data)
    interrupted(run, step, ckpt_path)

    # the final samples and the critic's estimate on held-out images
    save_png(os.path.join(expdir, f"samples_{step}.png"), grid(generate(raw, fixed_z, args.batch_size), 8))
    w = wasserstein_estimate(raw, test, args.batch_size, device)
    final = {"step": step, "critic_steps": state["critic_steps"], "wasserstein_test": w,
             "train_seconds": round(state["seconds"], 2), "held_out_images": len(test)}
    write_text(os.path.join(expdir, "final.json"), json.dumps(final, indent=1))
    print(f"final Wasserstein estimate {w:.4f} (E[f(x)] - E[f(G(z))] on {len(test)} held-out images) "
          f"after {step} generator steps")
    return final


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C outside the training loop: nothing to save, stop (status 130)
    main()
