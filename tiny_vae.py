"""tiny_vae.py: a variational autoencoder in one file (Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014).

The encoder maps an image x to q(z|x) = N(mu, diag(sigma^2)); z = mu + sigma * eps with eps ~ N(0, I) (the
reparameterisation trick, sec. 2.4 of arXiv:1312.6114); the decoder maps z to p(x|z). Training minimises
    -ELBO(x) = E_q[-log p(x|z)] + KL(q(z|x) || N(0, I))   (the negative evidence lower bound, nats per image),
and at the end an importance-weighted estimate of -log p(x) (Burda et al. 2016) tightens it.

    python tiny_vae.py                                        # MNIST, downloaded to data/mnist/
    python tiny_vae.py --dataset shapes                       # procedural images, no network
    python tiny_vae.py --dataset folder --datadir my_images --image_size 32 --likelihood gaussian
    python tiny_vae.py --arch mlp                             # the classic 784-400-20 VAE
    python tiny_vae.py --sample_only 64                       # prior samples from the best checkpoint
Sections: arguments, model, loss, training, evaluation & outputs, data, harness (the same in the four scripts), main.
Outputs in logs/<expname>/: args.json, ckpt.pt, best.pt, metrics.jsonl, final.json, PNG grids."""
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
import threading
import time
import urllib.request

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

SCRIPT = "tiny_vae"
LOG_2PI = math.log(2 * math.pi)


# ---------------------------------------------------------------- arguments
ARCH_DEFAULTS = {"conv": {}, "mlp": dict(latent_dim=20, hidden=400, lr=1e-3, lr_decay=1.0)}  # mlp: the PyTorch example
ALIASES = {"--no-cuda": "--device cpu", "--no-mps": "--device cpu", "--log-interval": "a metrics.jsonl line per epoch",
           "--z_dim": "--latent_dim", "--nz": "--latent_dim", "--dataroot": "--datadir", "--learning_rate": "--lr"}


def get_parser():
    p = Parser(description="A variational autoencoder.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pint = positive(int)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=["mnist", "fashion", "folder", "shapes"],
                   help="mnist/fashion: idx files (downloaded); folder: any PNG/JPG images; shapes: procedural")
    g.add_argument("--datadir", default="data", help="data root holding mnist/ or fashion/; for folder, the images")
    g.add_argument("--data_url", default=None, help="base URL of the idx .gz files (default: the official mirrors)")
    g.add_argument("--image_size", type=pint, default=28, help="folder images are resized to this")
    g.add_argument("--val_frac", type=positive(float), default=0.1, help="share of training images that choose best.pt")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="conv", choices=sorted(ARCH_DEFAULTS), help="conv, or the classic MLP")
    g.add_argument("--latent_dim", type=pint, default=16, help="size of z (mlp: 20)")
    g.add_argument("--hidden", type=pint, default=32, help="conv: channels of layer 1, doubled per stride; mlp: 400")
    g.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"],
                   help="p(x|z): Bernoulli logits for [0, 1] pixels, or Gaussian with a learned scale (photographs)")
    g.add_argument("--beta", type=positive(float, zero=True), default=1.0, help="weight of the KL term (beta-VAE)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=pint, default=50, help="passes over the training images")
    g.add_argument("--batch_size", type=pint, default=128, help="images per step (split over --gpus)")
    g.add_argument("--lr", type=positive(float), default=3e-3, help="Adam learning rate of the first epoch (mlp: 1e-3)")
    g.add_argument("--lr_decay", type=positive(float), default=0.94, help="lr x lr_decay^epoch (mlp: 1)")
    g.add_argument("--amp", action="store_true", help="bfloat16 autocast (AVX512-BF16/AMX CPUs, Ampere+ GPUs)")
    g.add_argument("--max_minutes", type=positive(float), default=None, help="training budget, then evaluate as usual")
    g.add_argument("--freeze", nargs="+", default=[], metavar="PATTERN", help="freeze parameters by name: 'encoder.*'")
    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--iw_samples", type=pint, default=100, help="K, importance samples per test image for -log p(x)")
    g.add_argument("--sample_only", type=pint, default=None, metavar="N", help="write N prior samples and exit")
    g.add_argument("--samples", default="mode", choices=["mode", "mean"], help="prior samples show the likeliest image "
                   "under p(x|z) (Bernoulli: the pixels with p > 0.5; Gaussian: the mean) or the mean of p(x|z)")
    g.add_argument("--tensorboard", action="store_true", help="log to TensorBoard too (pip install tensorboard)")
    g = p.add_argument_group("run")
    g.add_argument("--basedir", default="logs", help="where experiment folders go")
    g.add_argument("--expname", default=None, help="experiment folder (default: vae_<dataset>_<arch>)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--gpus", default=None, help="comma-separated GPU ids for DataParallel (default: --device only)")
    g.add_argument("--no_reload", action="store_true", help="start afresh instead of resuming ckpt.pt")
    g.add_argument("--ckpt", default=None, help="checkpoint to load instead of logs/<expname>/ckpt.pt")
    return p


def preset_defaults(args):                                              # the defaults that follow --arch
    return ARCH_DEFAULTS[args.arch]


def check_args(args):
    if args.image_size < 4:
        fail(f"must be at least 4, got {args.image_size}", "--image_size", "e.g. --image_size 32")
    args.expname = args.expname or f"vae_{args.dataset}_{args.arch}"
    return args


# ---------------------------------------------------------------- model
class VAE(nn.Module):
    """Encoder: x -> q(z|x) = N(mu, diag(exp(logvar))); decoder: z -> p(x|z), Bernoulli logits or Gaussian means."""
    # Gaussian: one learned scale for all pixels. forward() returns this replica's loss terms (for DataParallel).

    def __init__(self, arch, shape, latent_dim, hidden, likelihood):
        super().__init__()
        self.config = dict(arch=arch, shape=list(shape), latent_dim=latent_dim, hidden=hidden, likelihood=likelihood)
        self.latent_dim, self.likelihood = latent_dim, likelihood
        c, size, n_out = shape[0], shape[1], 2 * latent_dim             # the encoder outputs mu and logvar
        if arch == "mlp":  # the PyTorch example: 784-400-(20 mu, 20 logvar); 20-400-784
            d = c * size * size
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, n_out))
            self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, d),
                                         nn.Unflatten(1, tuple(shape)))
        else:  # stride-2 4x4 convs halve the size down to <= 8 (28 -> 14 -> 7); the decoder mirrors them
            chans = [c]
            while size % 2 == 0 and size > 8:
                chans.append(hidden * 2 ** (len(chans) - 1))
                size //= 2
            flat, fc = chans[-1] * size * size, 8 * hidden
            down = [m for a, b in zip(chans, chans[1:]) for m in (nn.Conv2d(a, b, 4, 2, 1), nn.ELU())]
            up = [m for a, b in zip(chans[:0:-1], chans[-2::-1]) for m in (nn.ConvTranspose2d(a, b, 4, 2, 1), nn.ELU())]
            self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(flat, fc), nn.ELU(), nn.Linear(fc, n_out))
            self.decoder = nn.Sequential(nn.Linear(latent_dim, fc), nn.ELU(), nn.Linear(fc, flat), nn.ELU(),
                                         nn.Unflatten(1, (chans[-1], size, size)), *up[:-1])  # no ELU on the output
        if likelihood == "gaussian":
            self.log_sigma = nn.Parameter(torch.tensor(math.log(0.1)))  # a typical pixel error to start from

    def encode(self, x):
        """(B, C, H, W) -> mu, logvar, each (B, latent_dim), in float32 also under autocast."""
        return self.encoder(x).float().chunk(2, dim=1)

    def decode(self, z):
        """(B, latent_dim) -> decoder output (B, C, H, W): logits or Gaussian means, float32."""
        return self.decoder(z).float()

    def nll(self, x, out):
        """-log p(x|z) summed over pixels, (B,), from the decoder output for x."""
        # Bernoulli on grey pixels x_i in [0, 1]: the cross-entropy of the PyTorch example, whose figures we compare to
        if self.likelihood == "bernoulli":  # -sum_i [x_i log p_i + (1 - x_i) log(1 - p_i)], p = sigmoid(out)
            nll = F.binary_cross_entropy_with_logits(out, x, reduction="none")
        else:  # -log N(x_i; out_i, sigma^2) = (x_i - out_i)^2 / (2 sigma^2) + log sigma + log(2 pi) / 2
            nll = 0.5 * ((x - out) / self.log_sigma.exp()) ** 2 + self.log_sigma + 0.5 * LOG_2PI
        return nll.flatten(1).sum(1)

    def mean_image(self, out):
        """Decoder output -> the mean of p(x|z) in [0, 1], what reconstructions and interpolations show."""
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out.clamp(0, 1)

    def forward(self, x, eps, amp=False):
        """x (B, C, H, W) in [0, 1], eps (B, latent_dim) ~ N(0, I) -> (1, 2): summed -log p(x|z) and KL."""
        # eps is drawn by the caller, so that the result does not depend on how the batch is split; amp: bfloat16 nets,
        # autocast entered here, in each replica's thread (DataParallel's threads would re-enter it as float16 on CUDA)
        with torch.autocast("cuda" if x.is_cuda else "cpu", dtype=torch.bfloat16, enabled=amp):
            mu, logvar = self.encode(x)
            z = mu + (0.5 * logvar).exp() * eps                         # z = mu + sigma * eps   (K&W eq. 10)
            rec = self.nll(x, self.decode(z))                           # (B,)
        kl = kl_per_dim(mu, logvar).sum(1)                              # (B,)
        return torch.stack([rec.sum(), kl.sum()]).unsqueeze(0)


# ---------------------------------------------------------------- loss
def kl_per_dim(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) for each latent dimension, (B, D)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)              # K&W appendix B, per dimension


def log_importance_weights(model, x, eps):
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x): x (B, C, H, W), eps (K, B, D) -> (K, B)."""
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * eps                                 # z_k = mu + sigma * eps_k: (K, B, D)
    rec = model.nll(x.expand(len(eps), *x.shape).flatten(0, 1), model.decode(z.flatten(0, 1))).view(eps.shape[:2])
    log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)                        # log N(z; 0, I)
    log_qz = -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)             # log N(z; mu, sigma^2)
    return -rec + log_pz - log_qz


# ---------------------------------------------------------------- training
def train_step(model, opt, x, beta, amp=False):
    """One Adam step on a batch x (B, C, H, W) in [0, 1]. -> tensor (-log p(x|z), KL) per image."""
    raw = getattr(model, "module", model)
    eps = torch.randn(len(x), raw.latent_dim, device=x.device)
    rec, kl = model(x, eps, amp).sum(0) / len(x)                        # sum over replicas / global count
    loss = rec + beta * kl                                              # -ELBO (beta = 1), nats per image
    if not torch.isfinite(loss):
        fail(f"the loss became {loss.item()}", "--lr", "lower it; ckpt.pt still holds the last good state")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return torch.stack([rec, kl]).detach()


# ---------------------------------------------------------------- evaluation & outputs
@torch.no_grad()
def evaluate(model, images, device, batch_size=500):
    """-> (-ELBO, E_q[-log p(x|z)], KL) in nats per image, one z per image from a fixed eps so that epochs compare."""
    g, total = torch.Generator().manual_seed(0), torch.zeros(2)
    for x in to_float(images).to(device).split(batch_size):
        total += model(x, torch.randn(len(x), model.latent_dim, generator=g).to(device)).sum(0).cpu()
    rec, kl = (total / len(images)).tolist()
    return rec + kl, rec, kl


@torch.no_grad()
def latent_stats(model, images, device, batch_size=500):
    """Mean KL per latent dimension, and the active units: Var_x(E_q[z_u]) > 0.01 (Burda et al. 2016, sec. 5.2)."""
    codes = [model.encode(to_float(x).to(device)) for x in images.split(batch_size)]  # (mu, logvar) per batch
    mu, logvar = (torch.cat(t) for t in zip(*codes))                    # (N, D) each
    return kl_per_dim(mu, logvar).cpu().mean(0).tolist(), int((mu.cpu().var(0) > 0.01).sum())


@torch.no_grad()
def iw_nll(model, images, k, device):
    """-log p(x) ~ -log (1/K) sum_k w_k   (Burda et al. 2016, eq. 8), nats per image; K = 1: a one-sample -ELBO."""
    # an upper bound on the true NLL that tightens as K grows
    g, total, tic = torch.Generator().manual_seed(0), 0.0, time.time()
    per_step = max(1, 4096 // k)                                        # images per decoder call of <= 4096 z
    for i, x in enumerate(to_float(images).to(device).split(per_step)):
        log_w = log_importance_weights(model, x, torch.randn(k, len(x), model.latent_dim, generator=g).to(device))
        total += -(torch.logsumexp(log_w, 0) - math.log(k)).sum().item()  # log_w: (K, B)
        if i == 0:                                                      # after the first batch: the time it will take
            print(f"IW-NLL, K={k}, of {len(images)} images: about {(time.time() - tic) * len(images) / len(x):.0f} s")
    return total / len(images)


@torch.no_grad()
def prior_samples(model, n, seed, device, kind):  # z ~ N(0, I) by seed -> the mode or the mean of p(x|z) (n, C, H, W)
    z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    mean = model.mean_image(model.decode(z))
    return (mean > 0.5).float() if kind == "mode" and model.likelihood == "bernoulli" else mean


@torch.no_grad()
def write_pictures(model, test, expdir, step, device, kind):            # samples_, recon_, interp_<step>.png
    save_png(os.path.join(expdir, f"samples_{step}.png"), grid(prior_samples(model, 64, 0, device, kind), 8))  # fixed z
    cols = min(8, len(test))                                            # recon: up to 4 rows of 8 test images,
    rows = min(4, len(test) // cols)                                    # each above its reconstruction from z = mu
    x = to_float(test[:rows * cols]).to(device)
    recon = model.mean_image(model.decode(model.encode(x)[0]))
    pairs = torch.stack([x.view(rows, cols, *x.shape[1:]), recon.view(rows, cols, *x.shape[1:])], 1)  # in/out
    save_png(os.path.join(expdir, f"recon_{step}.png"), grid(pairs.flatten(0, 2), cols))
    mu = model.encode(to_float(test[:16]).to(device))[0]                # interp: up to 8 rows, z going from the code
    a, b = (mu[0::2], mu[1::2]) if len(mu) > 1 else (mu, mu)            # of test image 2i to that of image 2i + 1
    t = torch.linspace(0, 1, 10, device=device)[None, :, None]
    z = (1 - t) * a[:len(b), None] + t * b[:, None]                     # (pairs, 10, D)
    save_png(os.path.join(expdir, f"interp_{step}.png"), grid(model.mean_image(model.decode(z.flatten(0, 1))), 10))


def sample_only(args, device, expdir):  # --sample_only N: the modes (or means) of p(x|z) for N draws z, not draws of x
    path = args.ckpt or os.path.join(expdir, "best.pt" if os.path.exists(f"{expdir}/best.pt") else "ckpt.pt")
    ckpt = load_checkpoint(path)
    model = VAE(**ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    write_samples(expdir, prior_samples(model, args.sample_only, args.seed, device, args.samples))
    print(f"wrote {args.sample_only} samples ({args.samples}s of p(x|z)) from {path} to {expdir}/samples.png and .npy")
    return {"samples": args.sample_only, "ckpt": path}


# ---------------------------------------------------------------- data
def load_dataset(args):                                                 # -> (train, val, test) uint8 (N, C, H, W)
    if args.dataset in ("mnist", "fashion"):
        train, test = load_idx_images(args.dataset, os.path.join(args.datadir, args.dataset), args.data_url)
    else:                                                               # folder, shapes: a fixed 10% to test
        images = make_shapes(10000, 28) if args.dataset == "shapes" else load_folder(args.datadir, args.image_size)
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
        train, test = images[max(1, len(images) // 10):], images[:max(1, len(images) // 10)]
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]  # val: a fixed share
    n_val = max(1, round(len(train) * args.val_frac))
    if n_val >= len(train):                                             # e.g. --val_frac 1 or more
        fail(f"holds out all {len(train)} training images", "--val_frac", "lower it or add images")
    return train[n_val:], train[:n_val], test


def to_float(x):
    return x.float() / 255                                              # uint8 -> [0, 1]


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

    # data, model and optimizer, resumed from the run's checkpoint if it has one
    train, val, test = load_dataset(args)
    data = fingerprint(f"{args.dataset}, {len(train)} training images", train)
    raw = VAE(args.arch, tuple(train.shape[1:]), args.latent_dim, args.hidden, args.likelihood).to(device)
    opt = torch.optim.Adam(raw.parameters(), lr=args.lr, fused=True)  # fused: one kernel, 20% faster on CPU here
    # sums since the last log line (on the device): -log p(x|z), KL, images; logged: the seconds of that line
    state = {"best_val": math.inf, "seconds": 0.0, "sums": torch.zeros(3, device=device).double(), "logged": 0.0}
    step = resume(args, expdir, raw, {"adam": opt}, state, data, device)
    freeze(raw, args.freeze)
    model = nn.DataParallel(raw, device_ids=gpus) if len(gpus) > 1 else raw  # the loss is computed per replica
    write_text(os.path.join(expdir, "args.json"), json.dumps(vars(args), indent=1))
    print(f"{len(train)} train / {len(val)} val / {len(test)} test images of {tuple(train.shape[1:])}, {device}")
    train = train.to(device)                                            # batches drawn on the device

    # train: shuffled epochs, each (and the run, when its time is up) ended by an evaluation and a checkpoint; no
    # step waits for the device but to check the loss
    per_epoch, order, ckpt_path = math.ceil(len(train) / args.batch_size), None, os.path.join(expdir, "ckpt.pt")
    steps, start = args.epochs * per_epoch, time.time() - state["seconds"]
    with Run(args, expdir, step, steps, state["seconds"], "--epochs") as run:
        while step < steps and not run.over(state["seconds"]):
            epoch, i = divmod(step, per_epoch)
            if i == 0 or order is None:                                 # an epoch's order depends on (seed, epoch)
                g = torch.Generator(device).manual_seed(args.seed * 100003 + epoch)
                order = torch.randperm(len(train), generator=g, device=device)
            opt.param_groups[0]["lr"] = args.lr * args.lr_decay ** epoch  # exponential decay per epoch (one group)
            x = to_float(train[order[i * args.batch_size:(i + 1) * args.batch_size]])
            state["sums"] += F.pad(train_step(model, opt, x, args.beta, args.amp), (0, 1), value=1.0) * len(x)
            step, state["seconds"] = step + 1, time.time() - start
            run.advance(step, state["seconds"])
            if run.stopped or step % per_epoch and not run.over(state["seconds"]):
                continue                                                # Ctrl-C, or not the end of an epoch
            val_nelbo, (test_nelbo, test_rec, test_kl) = evaluate(raw, val, device)[0], evaluate(raw, test, device)
            rec, kl, n = state["sums"].tolist()
            run.log({"step": step, "epoch": round(step / per_epoch, 3), "train_nelbo": (rec + kl) / n,
                     "train_rec": rec / n, "train_kl": kl / n, "val_nelbo": val_nelbo, "test_nelbo": test_nelbo,
                     "test_rec": test_rec, "test_kl": test_kl, "lr": opt.param_groups[0]["lr"],
                     "images_per_s": round(n / max(state["seconds"] - state["logged"], 1e-9)),
                     "seconds": round(state["seconds"], 2)},
                    grid(prior_samples(raw, 64, 0, device, args.samples), 8) if args.tensorboard else None)
            run.advance(step, state["seconds"], train=f"{(rec + kl) / n:.1f}", val=f"{val_nelbo:.1f}")
            state["sums"], state["logged"] = torch.zeros_like(state["sums"]), time.time() - start
            if val_nelbo < state["best_val"]:                           # model selection on validation, never test
                state["best_val"] = val_nelbo
                save_checkpoint(os.path.join(expdir, "best.pt"), raw, {"adam": opt}, step, state, args, data)
            save_checkpoint(ckpt_path, raw, {"adam": opt}, step, state, args, data)
    save_checkpoint(ckpt_path, raw, {"adam": opt}, step, state, args, data)  # as tiny_wgan: also mid-epoch, on Ctrl-C
    interrupted(run, step, ckpt_path)

    # the final figures, from the best checkpoint
    if os.path.exists(os.path.join(expdir, "best.pt")):
        raw.load_state_dict(load_checkpoint(os.path.join(expdir, "best.pt"))["model"])
    (test_nelbo, test_rec, test_kl), (kl_dims, active) = evaluate(raw, test, device), latent_stats(raw, test, device)
    final = {"step": step, "test_nelbo": test_nelbo, "test_rec": test_rec, "test_kl": test_kl,
             "iw_nll": iw_nll(raw, test, args.iw_samples, device), "iw_samples": args.iw_samples,
             "active_units": active, "kl_per_dim": kl_dims, "train_seconds": round(state["seconds"], 2)}
    write_pictures(raw, test, expdir, step, device, args.samples)
    write_text(os.path.join(expdir, "final.json"), json.dumps(final, indent=1))
    print(f"KL per latent dim (nats): {' '.join(f'{v:.2f}' for v in kl_dims)}; active units {active}/{raw.latent_dim}")
    print(f"test -ELBO {test_nelbo:.1f} nats | IW-NLL (K={args.iw_samples}) {final['iw_nll']:.1f} nats")
    return final


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C outside the training loop: nothing to save, stop (status 130)
    main()
