"""tiny_vae.py: a variational autoencoder in one file.

Kingma & Welling, "Auto-Encoding Variational Bayes", ICLR 2014 (arXiv:1312.6114).
The encoder maps an image x to q(z|x) = N(mu, diag(sigma^2)); z = mu + sigma * eps with
eps ~ N(0, I) (the reparameterisation trick, sec. 2.4); the decoder maps z to p(x|z).
Training maximises the evidence lower bound, reported as its negative in nats per image:
    -ELBO(x) = E_q[-log p(x|z)] + KL(q(z|x) || N(0, I)).
At the end, an importance-weighted estimate of -log p(x) (Burda et al. 2016) tightens it.

Usage:
    python tiny_vae.py                                        # MNIST, downloaded to data/mnist/
    python tiny_vae.py --datadir ../shared/data/mnist_small   # an offline copy of real digits
    python tiny_vae.py --dataset shapes                       # procedural images, no network
    python tiny_vae.py --dataset folder --datadir my_images --image_size 32 --likelihood gaussian
    python tiny_vae.py --arch mlp                             # the classic 784-400-20 VAE
    python tiny_vae.py --sample_only 64                       # prior samples from the checkpoint
Outputs go to logs/<expname>/ (args.json, ckpt.pt, best.pt, metrics.jsonl, PNG grids).
"""
import argparse
import fnmatch
import gzip
import hashlib
import http.client
import json
import math
import os
import pathlib
import struct
import time
import urllib.request

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

LOG_2PI = math.log(2 * math.pi)


def fail(what, where, fix):
    """A user error: one line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {what} ({where}): {fix}")


# ---------------------------------------------------------------- arguments
ARCH_DEFAULTS = {"conv": dict(latent_dim=16, hidden=32, lr=3e-3, lr_decay=0.94),
                 "mlp": dict(latent_dim=20, hidden=400, lr=1e-3, lr_decay=1.0)}  # mlp: the PyTorch example


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        fail(message, "command line", "see python tiny_vae.py --help")


def positive(kind):
    def check(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return check


def get_parser():
    p = Parser(description="Variational autoencoder in one file.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=["mnist", "fashion", "folder", "shapes"],
                   help="mnist/fashion: idx files (downloaded); folder: any PNG/JPG images; shapes: procedural")
    g.add_argument("--datadir", default="data",
                   help="data root holding mnist/ or fashion/; for --dataset folder, the image folder")
    g.add_argument("--data_url", default=None,
                   help="base URL of the idx .gz files (default: the dataset's official mirrors)")
    g.add_argument("--image_size", type=positive(int), default=28, help="folder images are resized to this")
    g.add_argument("--val_frac", type=float, default=0.1,
                   help="share of the training images held out to choose the best checkpoint")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="conv", choices=["conv", "mlp"], help="conv encoder/decoder, or the classic MLP")
    g.add_argument("--latent_dim", type=positive(int), default=None, help="size of z (default: 16 conv, 20 mlp)")
    g.add_argument("--hidden", type=positive(int), default=None,
                   help="conv: channels of the first layer, doubled per stride; mlp: hidden units (default: 32 conv, 400 mlp)")
    g.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"],
                   help="p(x|z): Bernoulli logits for [0, 1] pixels, or Gaussian with a learned scale for natural images")
    g.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (beta-VAE, Higgins et al. 2017)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive(int), default=50, help="passes over the training images")
    g.add_argument("--batch_size", type=positive(int), default=128, help="images per step (split over --gpus)")
    g.add_argument("--lr", type=positive(float), default=None, help="Adam learning rate of the first epoch "
                   "(default: 3e-3 conv, 1e-3 mlp)")
    g.add_argument("--lr_decay", type=positive(float), default=None,
                   help="the learning rate is lr * lr_decay^epoch (default: 0.94 conv, 1 mlp)")
    g.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for training (CPUs with AVX512-BF16 or AMX, GPUs from Ampere on)")
    g.add_argument("--max_minutes", type=positive(float), default=None,
                   help="stop training after this many minutes of wall-clock time, then evaluate as usual")
    g.add_argument("--freeze", nargs="+", default=[], metavar="PATTERN",
                   help="freeze parameters whose names match these fnmatch patterns, e.g. 'encoder.*'")
    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--iw_samples", type=positive(int), default=100,
                   help="K, importance samples per test image for the final -log p(x) estimate")
    g.add_argument("--sample_only", type=positive(int), default=None, metavar="N",
                   help="write N prior samples (samples.png, samples.npy) from the checkpoint and exit")
    g = p.add_argument_group("run")
    g.add_argument("--basedir", default="logs", help="where experiment folders go")
    g.add_argument("--expname", default=None, help="experiment folder name (default: vae_<dataset>_<arch>)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--gpus", default=None, help="comma-separated GPU ids for DataParallel (default: all visible)")
    g.add_argument("--no_reload", action="store_true", help="start fresh instead of resuming from ckpt.pt")
    g.add_argument("--ckpt", default=None, help="checkpoint to load instead of logs/<expname>/ckpt.pt")
    return p


def parse_args(argv=None):
    args = get_parser().parse_args(argv)
    for key, value in ARCH_DEFAULTS[args.arch].items():  # derived: defaults that depend on --arch
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 0 < args.val_frac < 1:
        fail(f"must be between 0 and 1, got {args.val_frac}", "--val_frac", "e.g. --val_frac 0.1")
    if args.beta < 0:
        fail(f"must be >= 0, got {args.beta}", "--beta", "use 1 for the plain ELBO")
    if args.image_size < 4:
        fail(f"must be at least 4, got {args.image_size}", "--image_size", "e.g. --image_size 32")
    args.expname = args.expname or f"vae_{args.dataset}_{args.arch}"
    return args


# ---------------------------------------------------------------- data
MIRRORS = {"mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
           "fashion": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]}
MD5 = {  # published checksums of the four idx .gz files
    "mnist": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    "fashion": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}}
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def download(url, path, md5):
    """Stream url to path with a progress bar. The bytes go to path.part and take the final
    name only once their md5 matches, so a failed or interrupted download leaves nothing."""
    tmp, digest = path + ".part", hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            size = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := r.read(1 << 16):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise ValueError(f"md5 {digest.hexdigest()} is not the published {md5}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch_idx(dataset, folder, base_url=None):
    """Download whichever of the four idx files are missing from folder."""
    os.makedirs(folder, exist_ok=True)
    for name, md5 in MD5[dataset].items():
        path = os.path.join(folder, name)
        if os.path.exists(path):
            continue
        for base in [base_url] if base_url else MIRRORS[dataset]:
            try:
                download(base.rstrip("/") + "/" + name, path, md5)
                break
            except (OSError, ValueError, http.client.HTTPException) as e:
                why = f"{base.rstrip('/')}/{name}: {e}"
        else:
            fail(f"cannot download {why}", path, f"no network? put the four {dataset} idx .gz files in {folder} by hand")


def read_idx(path):
    """Parse an idx file (gzipped or not): bytes 0-1 zero, byte 2 the dtype code, byte 3 the number
    of dimensions, then one big-endian uint32 per dimension, then the data. -> numpy array."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # not gzip, or a truncated gzip stream
        fail(f"unreadable idx file ({e})", path, "delete it to download it again, or replace it")
    fix = "delete it to download it again, or replace it with the original file"
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        fail("not an idx file (bad magic number)", path, fix)
    ndim, head = data[3], 4 + 4 * data[3]
    if len(data) < head:
        fail("truncated idx header", path, fix)
    dims = struct.unpack(f">{ndim}I", data[4:head])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    if len(data) - head != math.prod(dims) * dtype.itemsize:
        fail(f"{len(data) - head} data bytes for shape {dims}: truncated or foreign file", path, fix)
    return np.frombuffer(data, dtype, offset=head).reshape(dims)


def load_idx_dataset(dataset, folder, base_url=None):
    """-> (train images, train labels, test images, test labels); images uint8 (N, 1, 28, 28)."""
    fetch_idx(dataset, folder, base_url)
    out = []
    for split in ("train", "t10k"):
        path = os.path.join(folder, f"{split}-images-idx3-ubyte.gz")
        images = read_idx(path)
        labels = read_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"))
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            fail(f"expected uint8 images of 28x28, got {images.dtype} {images.shape}", path, "replace the file")
        if labels.shape != images.shape[:1]:
            fail(f"{len(labels)} labels for {len(images)} images", path, "use the images and labels of one release")
        out += [torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]
    return out


def make_shapes(n, size=28, seed=0):
    """Procedural dataset: one white disc, ring, square or diamond per image, of random size,
    position and rotation, drawn at 4x resolution and box-filtered down. -> uint8 (n, 1, size, size)."""
    g, s, out = torch.Generator().manual_seed(seed), 4 * size, []
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


def load_folder(root, size):
    """Every PNG/JPG/BMP under root, centre-cropped to a square and resized to size x size.
    -> uint8 (N, C, size, size), C = 3 if any file is stored as RGB(A), else 1 (grey repeated)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
    if len(files) < 3:
        fail(f"found {len(files)} PNG/JPG/BMP images, need at least 3", root, "point --datadir at a folder of images")
    images = []
    for path in tqdm(files, desc="images", leave=False):
        try:
            a = np.asarray(iio.imread(path))
        except Exception as e:  # imageio raises many types for a broken file
            fail(f"cannot read image ({type(e).__name__})", path, "remove or replace the file")
        a = a[..., None] if a.ndim == 2 else a[..., :3] if a.shape[-1] >= 3 else a[..., :1]  # drop alpha
        scale = np.iinfo(a.dtype).max if a.dtype.kind in "ui" else 1.0
        x = torch.from_numpy(a.astype(np.float32) / scale).permute(2, 0, 1)
        h, w = x.shape[1:]
        k = min(h, w)
        x = x[:, (h - k) // 2:(h - k) // 2 + k, (w - k) // 2:(w - k) // 2 + k]
        x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        images.append((x.clamp(0, 1) * 255).round().to(torch.uint8))
    c = max(im.shape[0] for im in images)
    return torch.stack([im.expand(c, -1, -1) for im in images])


def load_dataset(args):
    """-> (train, val, test) uint8 image tensors (N, C, H, W). Validation is carved from the
    training images by a fixed permutation; the folder dataset also gives its first 10% to test."""
    if args.dataset in ("mnist", "fashion"):
        train, _, test, _ = load_idx_dataset(args.dataset, os.path.join(args.datadir, args.dataset), args.data_url)
    elif args.dataset == "shapes":
        images = make_shapes(10000)
        train, test = images[:8000], images[8000:]
    else:
        images = load_folder(args.datadir, args.image_size)
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
        n_test = max(1, len(images) // 10)
        train, test = images[n_test:], images[:n_test]
    train = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]
    n_val = max(1, round(len(train) * args.val_frac))
    if n_val >= len(train):
        fail(f"holds out all {len(train)} training images", "--val_frac", "lower it or add images")
    return train[n_val:], train[:n_val], test


def to_float(x):
    return x.float() / 255  # uint8 -> [0, 1]


# ---------------------------------------------------------------- model
class VAE(nn.Module):
    """q(z|x) = N(mu, diag(exp(logvar))) from the encoder; p(x|z) from the decoder: logits of
    independent Bernoulli pixels, or means of Gaussian pixels with one learned scale.
    forward() computes this replica's loss terms, so DataParallel sends two numbers to GPU 0."""

    def __init__(self, arch, shape, latent_dim, hidden, likelihood):
        super().__init__()
        self.config = dict(arch=arch, shape=list(shape), latent_dim=latent_dim, hidden=hidden, likelihood=likelihood)
        self.latent_dim, self.likelihood = latent_dim, likelihood
        c, size = shape[0], shape[1]
        if arch == "mlp":  # the PyTorch example: 784-400-(20 mu, 20 logvar); 20-400-784
            d = c * size * size
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))
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
            self.encoder = nn.Sequential(*down, nn.Flatten(), nn.Linear(flat, fc), nn.ELU(), nn.Linear(fc, 2 * latent_dim))
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
        # Bernoulli on grey pixels x_i in [0, 1] is the cross-entropy of the PyTorch example, whose figures we compare to
        if self.likelihood == "bernoulli":  # -sum_i [x_i log p_i + (1 - x_i) log(1 - p_i)], p = sigmoid(out)
            nll = F.binary_cross_entropy_with_logits(out, x, reduction="none")
        else:  # -log N(x_i; out_i, sigma^2) = (x_i - out_i)^2 / (2 sigma^2) + log sigma + log(2 pi) / 2
            nll = 0.5 * ((x - out) / self.log_sigma.exp()) ** 2 + self.log_sigma + 0.5 * LOG_2PI
        return nll.flatten(1).sum(1)

    def mean_image(self, out):
        """Decoder output -> the mean of p(x|z) in [0, 1], what the sample grids show."""
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out.clamp(0, 1)

    def forward(self, x, eps):
        """x (B, C, H, W) in [0, 1]; eps (B, latent_dim) ~ N(0, I), drawn by the caller so that the
        result does not depend on how the batch is split. -> (1, 2): summed -log p(x|z) and KL."""
        mu, logvar = self.encode(x)
        z = mu + (0.5 * logvar).exp() * eps                             # z = mu + sigma * eps   (K&W eq. 10)
        rec = self.nll(x, self.decode(z))                               # (B,)
        kl = kl_per_dim(mu, logvar).sum(1)                              # (B,)
        return torch.stack([rec.sum(), kl.sum()]).unsqueeze(0)


# ---------------------------------------------------------------- loss
def kl_per_dim(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) for each latent dimension, (B, D)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)              # K&W appendix B, per dimension


def log_importance_weights(model, x, eps):
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), z_k = mu + sigma * eps_k.
    x (B, C, H, W), eps (K, B, D) -> (K, B)."""
    mu, logvar = model.encode(x)
    z = mu + (0.5 * logvar).exp() * eps                                 # (K, B, D)
    k, b = eps.shape[:2]
    rec = model.nll(x.expand(k, *x.shape).flatten(0, 1), model.decode(z.flatten(0, 1))).view(k, b)
    log_pz = -0.5 * (z.pow(2) + LOG_2PI).sum(-1)                        # log N(z; 0, I)
    log_qz = -0.5 * (eps.pow(2) + LOG_2PI + logvar).sum(-1)             # log N(z; mu, sigma^2)
    return -rec + log_pz - log_qz


# ---------------------------------------------------------------- training
def train_step(model, opt, x, beta, amp=False):
    """One Adam step on a batch x (B, C, H, W) in [0, 1]. -> tensor (-log p(x|z), KL) per image.
    amp: the networks run in bfloat16 autocast; the loss terms stay float32."""
    raw = model.module if isinstance(model, nn.DataParallel) else model
    eps = torch.randn(len(x), raw.latent_dim, device=x.device)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        rec, kl = model(x, eps).sum(0) / len(x)                         # sum over replicas / global count
    loss = rec + beta * kl                                              # -ELBO (beta = 1), nats per image
    if not torch.isfinite(loss):
        fail(f"the loss became {loss.item()}", "--lr", "lower the learning rate; ckpt.pt still holds the last good state")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return torch.stack([rec, kl]).detach()


def freeze(model, patterns):
    """Stop gradients to the parameters whose qualified names match any fnmatch pattern."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            fail(f"pattern {pattern!r} matches no parameter", "--freeze", f"names look like {names[0]}, {names[-1]}")
    for name, p in model.named_parameters():
        p.requires_grad_(not any(fnmatch.fnmatch(name, pat) for pat in patterns))
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"frozen {n_frozen:,} parameters, trainable {n_train:,}")
    if n_train == 0:
        fail("every parameter is frozen", "--freeze", "match fewer parameters")


def pick_devices(args):
    """--device and --gpus -> (device, DataParallel ids); the model lives on the first id."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device {args.device!r}", "--device", "use auto, cpu, cuda or cuda:N")
    if device.type != "cuda":
        return device, []
    n = torch.cuda.device_count()
    if n == 0:
        fail("CUDA is not available", "--device", "use --device cpu")
    first = device.index or 0
    gpus = args.gpus.split(",") if args.gpus else [first] + [i for i in range(n) if i != first]
    if any(not str(i).isdigit() or int(i) >= n for i in gpus):
        fail(f"{n} GPUs visible, asked for {args.gpus}", "--gpus", "list ids that exist, e.g. --gpus 0,1")
    gpus = [int(i) for i in gpus]
    return torch.device("cuda", gpus[0]), gpus


def atomic(path, write):
    """write(tmp) then rename: a crash or Ctrl-C never leaves a half-written file at path."""
    root, ext = os.path.splitext(path)
    write(f"{root}.tmp{ext}")
    os.replace(f"{root}.tmp{ext}", path)


def write_text(path, text):
    atomic(path, lambda p: pathlib.Path(p).write_text(text))


def load_checkpoint(path, device):
    """A tiny_vae checkpoint as a dict, or a one-line error."""
    if not os.path.exists(path):
        fail("no such checkpoint", path, "train first, or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch.load raises many types for a foreign or damaged file
        fail(f"not a readable checkpoint ({type(e).__name__})", path, "pass a ckpt.pt or best.pt written by tiny_vae.py")
    if not isinstance(ckpt, dict) or ckpt.get("script") != "tiny_vae":
        fail("not a tiny_vae checkpoint", path, "pass a ckpt.pt or best.pt written by tiny_vae.py")
    return ckpt


# ---------------------------------------------------------------- evaluation & outputs
@torch.no_grad()
def evaluate(model, images, batch_size, device):
    """-ELBO = E_q[-log p(x|z)] + KL in nats per image, one z per image from a fixed eps so that
    epochs compare. -> (-ELBO, -log p(x|z), KL)."""
    g, total = torch.Generator().manual_seed(0), torch.zeros(2)
    for i in range(0, len(images), batch_size):
        x = to_float(images[i:i + batch_size]).to(device)
        eps = torch.randn(len(x), model.latent_dim, generator=g).to(device)
        total += model(x, eps).sum(0).cpu()
    rec, kl = (total / len(images)).tolist()
    return rec + kl, rec, kl


@torch.no_grad()
def iw_nll(model, images, k, device):
    """-log p(x) ~ -log (1/K) sum_k w_k   (Burda et al. 2016, eq. 8), nats per image: an upper
    bound on the true NLL that tightens as K grows; K = 1 is a one-sample -ELBO."""
    g, total = torch.Generator().manual_seed(0), 0.0
    per_step = max(1, 4096 // k)                                        # images per decoder call of <= 4096 z
    for i in tqdm(range(0, len(images), per_step), desc=f"IW-NLL K={k}", leave=False):
        x = to_float(images[i:i + per_step]).to(device)
        eps = torch.randn(k, len(x), model.latent_dim, generator=g).to(device)
        log_w = log_importance_weights(model, x, eps)                   # (K, B)
        total += -(torch.logsumexp(log_w, 0) - math.log(k)).sum().item()
    return total / len(images)


@torch.no_grad()
def latent_stats(model, images, batch_size, device):
    """KL per latent dimension averaged over images, and the active units: dimensions whose
    posterior mean varies over the data, Var_x(E_q[z_u]) > 0.01 (Burda et al. 2016, sec. 5.2)."""
    mus, kls = [], []
    for i in range(0, len(images), batch_size):
        mu, logvar = model.encode(to_float(images[i:i + batch_size]).to(device))
        mus.append(mu.cpu())
        kls.append(kl_per_dim(mu, logvar).cpu())
    return torch.cat(kls).mean(0).tolist(), int((torch.cat(mus).var(0) > 0.01).sum())


def save_grid(path, images, nrow):
    """images (N, C, H, W) in [0, 1] -> one PNG, nrow images per row, 2-pixel grey gaps."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), 0.5)
    for i, im in enumerate(images.cpu()):
        r, q = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = im
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    atomic(path, lambda p: iio.imwrite(p, pixels[..., 0] if c == 1 else pixels))


@torch.no_grad()
def prior_samples(model, n, seed, device):
    """Means of p(x|z) for z ~ N(0, I) from a fixed seed. -> (n, C, H, W) in [0, 1]."""
    z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return model.mean_image(model.decode(z))


@torch.no_grad()
def write_pictures(model, test, expdir, step, device):
    """samples_<step>.png (64 prior samples, fixed z), recon_<step>.png (up to 4 rows of 8 test
    images, each above its reconstruction from z = mu) and interp_<step>.png (up to 8 rows: z moves
    linearly from the mean code of test image 2i to that of image 2i+1 in 10 steps)."""
    save_grid(os.path.join(expdir, f"samples_{step}.png"), prior_samples(model, 64, 0, device), 8)
    cols = min(8, len(test))
    rows = min(4, len(test) // cols)
    x = to_float(test[:rows * cols]).to(device)
    recon = model.mean_image(model.decode(model.encode(x)[0]))
    pairs = torch.stack([x.view(rows, cols, *x.shape[1:]), recon.view(rows, cols, *x.shape[1:])], 1)  # in/out
    save_grid(os.path.join(expdir, f"recon_{step}.png"), pairs.flatten(0, 2), cols)
    mu = model.encode(to_float(test[:16]).to(device))[0]
    a, b = (mu[0::2], mu[1::2]) if len(mu) > 1 else (mu, mu)
    t = torch.linspace(0, 1, 10, device=device)[None, :, None]
    z = (1 - t) * a[:len(b), None] + t * b[:, None]                     # (pairs, 10, D)
    save_grid(os.path.join(expdir, f"interp_{step}.png"), model.mean_image(model.decode(z.flatten(0, 1))), 10)


def sample_only(args, device, expdir):
    """--sample_only N: N prior samples from --ckpt (default best.pt, else ckpt.pt) as a grid and
    as samples.npy, uint8 (N, H, W) or (N, H, W, C)."""
    path = args.ckpt or next((p for p in (os.path.join(expdir, "best.pt"), os.path.join(expdir, "ckpt.pt"))
                              if os.path.exists(p)), os.path.join(expdir, "best.pt"))
    ckpt = load_checkpoint(path, device)
    model = VAE(**ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    x = prior_samples(model, args.sample_only, args.seed, device)
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    os.makedirs(expdir, exist_ok=True)
    atomic(os.path.join(expdir, "samples.npy"), lambda p: np.save(p, pixels[..., 0] if x.shape[1] == 1 else pixels))
    save_grid(os.path.join(expdir, "samples.png"), x, math.ceil(math.sqrt(args.sample_only)))
    print(f"wrote {args.sample_only} samples from {path} to {expdir}/samples.png and samples.npy")
    return {"samples": args.sample_only, "ckpt": path}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device, gpus = pick_devices(args)
    expdir = os.path.join(args.basedir, args.expname)
    if args.sample_only:
        return sample_only(args, device, expdir)

    train, val, test = load_dataset(args)
    raw = VAE(args.arch, tuple(train.shape[1:]), args.latent_dim, args.hidden, args.likelihood).to(device)
    opt = torch.optim.Adam(raw.parameters(), lr=args.lr, fused=True)  # fused: one kernel, 20% faster on CPU here
    step, best_val, seconds = 0, math.inf, 0.0
    ckpt_path, best_path = os.path.join(expdir, "ckpt.pt"), os.path.join(expdir, "best.pt")
    if args.ckpt or (os.path.exists(ckpt_path) and not args.no_reload):  # resume the same run
        ckpt = load_checkpoint(args.ckpt or ckpt_path, device)
        for key, value in raw.config.items():
            if ckpt["model_args"][key] != value:
                fail(f"checkpoint has {key}={ckpt['model_args'][key]}, this run {value}", args.ckpt or ckpt_path,
                     "use the same flags, --no_reload to start fresh, or another --expname")
        raw.load_state_dict(ckpt["model"])
        if "optimizer" in ckpt:  # a best.pt holds the weights only
            opt.load_state_dict(ckpt["optimizer"])
            step, best_val, seconds = ckpt["step"], ckpt["best_val"], ckpt["seconds"]
            torch.set_rng_state(ckpt["rng"].cpu())
            if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), device)
        print(f"resumed from {args.ckpt or ckpt_path} at step {step}")
    if args.freeze:
        freeze(raw, args.freeze)
    model = nn.DataParallel(raw, device_ids=gpus) if len(gpus) > 1 else raw  # the loss is computed per replica

    os.makedirs(expdir, exist_ok=True)
    write_text(os.path.join(expdir, "args.json"), json.dumps(vars(args), indent=1))
    metrics_path = os.path.join(expdir, "metrics.jsonl")
    old = pathlib.Path(metrics_path).read_text().splitlines() if os.path.exists(metrics_path) and step else []
    kept = "".join(line + "\n" for line in old if json.loads(line)["step"] <= step)  # drop lines past the checkpoint
    write_text(metrics_path, kept)

    def save_checkpoint():
        atomic(ckpt_path, lambda p: torch.save({
            "script": "tiny_vae", "model_args": raw.config, "model": raw.state_dict(), "optimizer": opt.state_dict(),
            "step": step, "best_val": best_val, "seconds": seconds, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "args": vars(args)}, p))

    per_epoch = math.ceil(len(train) / args.batch_size)
    total, budget = args.epochs * per_epoch, (args.max_minutes or math.inf) * 60
    print(f"{len(train)} train / {len(val)} val / {len(test)} test images of {tuple(train.shape[1:])}, "
          f"{sum(p.numel() for p in raw.parameters()):,} parameters, {device}")
    bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)
    start, running, n_img, busy = time.time() - seconds, torch.zeros(2), 0, 0.0  # busy: seconds in train steps
    try:
        while step < total and seconds < budget:
            epoch, first = divmod(step, per_epoch)
            for group in opt.param_groups:
                group["lr"] = args.lr * args.lr_decay ** epoch           # exponential decay per epoch
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
            for i in range(first, per_epoch):                           # an epoch's order depends on (seed, epoch)
                tic = time.time()
                x = to_float(train[order[i * args.batch_size:(i + 1) * args.batch_size]]).to(device)
                running += train_step(model, opt, x, args.beta, args.amp).cpu() * len(x)
                step, n_img, busy, seconds = step + 1, n_img + len(x), busy + time.time() - tic, time.time() - start
                bar.update()
                if seconds >= budget:
                    break
            val_nelbo = evaluate(raw, val, 500, device)[0]
            test_nelbo, test_rec, test_kl = evaluate(raw, test, 500, device)
            n = max(n_img, 1)
            record = {"step": step, "epoch": round(step / per_epoch, 3), "train_nelbo": running.sum().item() / n,
                      "train_rec": running[0].item() / n, "train_kl": running[1].item() / n, "val_nelbo": val_nelbo,
                      "test_nelbo": test_nelbo, "test_rec": test_rec, "test_kl": test_kl, "lr": opt.param_groups[0]["lr"],
                      "images_per_s": round(n / max(busy, 1e-9)), "seconds": round(time.time() - start, 2)}
            running, n_img, busy = torch.zeros(2), 0, 0.0
            if val_nelbo < best_val:                                    # model selection on validation, never test
                best_val = val_nelbo
                atomic(best_path, lambda p: torch.save({"script": "tiny_vae", "model_args": raw.config,
                       "model": raw.state_dict(), "step": step, "val_nelbo": val_nelbo, "args": vars(args)}, p))
            save_checkpoint()
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(train=f"{record['train_nelbo']:.1f}", val=f"{val_nelbo:.1f}", test=f"{test_nelbo:.1f}")
            seconds = time.time() - start
    except KeyboardInterrupt:
        bar.close()
        save_checkpoint()
        raise SystemExit(f"interrupted at step {step}: saved {ckpt_path}; run the same command to resume")
    bar.close()

    if os.path.exists(best_path):                                      # final figures from the best checkpoint
        raw.load_state_dict(load_checkpoint(best_path, device)["model"])
    test_nelbo, test_rec, test_kl = evaluate(raw, test, 500, device)
    nll = iw_nll(raw, test, args.iw_samples, device)
    kl_dims, active = latent_stats(raw, test, 500, device)
    write_pictures(raw, test, expdir, step, device)
    final = {"step": step, "test_nelbo": test_nelbo, "test_rec": test_rec, "test_kl": test_kl, "iw_nll": nll,
             "iw_samples": args.iw_samples, "active_units": active, "kl_per_dim": kl_dims,
             "train_seconds": round(seconds, 2)}
    write_text(os.path.join(expdir, "final.json"), json.dumps(final, indent=1))
    print(f"KL per latent dim (nats): {' '.join(f'{v:.2f}' for v in kl_dims)}; "
          f"active units {active}/{raw.latent_dim}")
    print(f"test -ELBO {test_nelbo:.1f} nats | IW-NLL (K={args.iw_samples}) {nll:.1f} nats")
    return final


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside training, where ckpt.pt is saved first: nothing to save
        raise SystemExit("interrupted")
