"""tiny_wgan.py: a Wasserstein GAN in one file.

Arjovsky, Chintala & Bottou, "Wasserstein GAN", ICML 2017 (arXiv:1701.07875): a critic f,
kept K-Lipschitz by clipping every weight to [-c, c], is trained to maximise
    W ~ E_x~data[f(x)] - E_z~N(0,I)[f(G(z))]
(the Kantorovich-Rubinstein dual of the Wasserstein-1 distance, eq. 3), and the generator G
to minimise -E_z[f(G(z))]; algorithm 1 takes n_critic critic steps per generator step with
RMSprop. With --gp LAMBDA the clipping gives way to the gradient penalty of Gulrajani et al.,
"Improved Training of Wasserstein GANs", NeurIPS 2017 (arXiv:1704.00028), algorithm 1:
    L_critic = E[f(G(z))] - E[f(x)] + LAMBDA * E[(||grad_x^ f(x^)||_2 - 1)^2],
    x^ = a x + (1 - a) G(z),  a ~ U[0, 1] per sample, trained with Adam.

Usage:
    python tiny_wgan.py --gp 10                                   # WGAN-GP on MNIST (downloaded)
    python tiny_wgan.py                                           # weight clipping, as in the paper
    python tiny_wgan.py --gp 10 --datadir ../shared/data/mnist_small   # an offline copy of real digits
    python tiny_wgan.py --dataset shapes                          # procedural images, no network
    python tiny_wgan.py --dataset cifar10 --gp 10                 # CIFAR-10, official binary archive
    python tiny_wgan.py --dataset folder --datadir my_images --image_size 64
    python tiny_wgan.py --preset paper                            # the paper's widths, lr and n_critic
    python tiny_wgan.py --gp 10 --sample_only 64                  # samples from the checkpoint
Outputs go to logs/<expname>/ (args.json, ckpt.pt, metrics.jsonl, samples_<step>.png, final.json).
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
import signal
import struct
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


def fail(what, where, fix):
    """A user error: one line on stderr, exit status 1, no traceback."""
    raise SystemExit(f"error: {what} ({where}): {fix}")


# ---------------------------------------------------------------- arguments
# Defaults are sized for a CPU budget of minutes: widths 32, n_critic 2 and lr 5e-4 (benchmarks/results.md).
# --preset paper restores the papers' settings, before explicitly given flags.
PRESETS = {"paper": {  # DCGAN widths and WGAN / WGAN-GP algorithm 1 hyperparameters
    "clip": dict(nz=100, ngf=64, ndf=64, n_critic=5, lr=5e-5),
    "gp": dict(nz=100, ngf=64, ndf=64, n_critic=5, lr=1e-4)}}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        fail(message, "command line", "see python tiny_wgan.py --help")


def positive(kind):
    def check(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return check


def get_parser():
    p = Parser(description="Wasserstein GAN in one file.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mnist", choices=["mnist", "fashion", "cifar10", "folder", "shapes"],
                   help="mnist/fashion: idx files, cifar10: binary archive (downloaded); folder: any PNG/JPG images; "
                   "shapes: procedural")
    g.add_argument("--datadir", default="data",
                   help="data root holding mnist/, fashion/ or cifar10/; for --dataset folder, the image folder")
    g.add_argument("--data_url", default=None, help="where to download from (default: the dataset's official mirrors)")
    g.add_argument("--image_size", type=positive(int), default=32,
                   help="4 x a power of two; MNIST's 28x28 is padded to 32, other sizes are resized")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="paper: nz 100, widths 64, n_critic 5 and the papers' learning rates, before explicit flags")
    g.add_argument("--nz", type=positive(int), default=64, help="size of the noise z")
    g.add_argument("--ngf", type=positive(int), default=32, help="generator channels before the output layer")
    g.add_argument("--ndf", type=positive(int), default=32, help="critic channels after the first layer")
    g.add_argument("--critic_norm", choices=["batch", "layer", "none"], default=None,
                   help="normalisation in the critic (default: batch with clipping, layer with --gp)")
    g = p.add_argument_group("training")
    g.add_argument("--gp", type=positive(float), default=None, metavar="LAMBDA",
                   help="WGAN-GP with this penalty weight (10 in the paper) instead of weight clipping")
    g.add_argument("--clip_value", type=positive(float), default=0.01, help="c: critic weights are clipped to [-c, c]")
    g.add_argument("--n_critic", type=positive(int), default=2, help="critic steps per generator step (papers: 5)")
    g.add_argument("--paper_schedule", action="store_true",
                   help="100 critic steps for the first 25 generator steps and every 500th (WGAN reference code)")
    g.add_argument("--iters", type=positive(int), default=20000, help="generator steps")
    g.add_argument("--batch_size", type=positive(int), default=64, help="images per critic step (split over --gpus)")
    g.add_argument("--lr", type=positive(float), default=5e-4,
                   help="learning rate of both nets, RMSprop with clipping and Adam with --gp (papers: 5e-5, 1e-4)")
    g.add_argument("--beta1", type=float, default=0.0, help="Adam beta1 under --gp (WGAN-GP paper: 0)")
    g.add_argument("--beta2", type=float, default=0.9, help="Adam beta2 under --gp (WGAN-GP paper: 0.9)")
    g.add_argument("--max_minutes", type=positive(float), default=None,
                   help="stop training after this many minutes of wall-clock time, then write every output as usual")
    g.add_argument("--freeze", nargs="+", default=[], metavar="PATTERN",
                   help="freeze parameters whose names match these fnmatch patterns, e.g. 'critic.*'")
    g = p.add_argument_group("outputs")
    g.add_argument("--i_print", type=positive(int), default=50, help="generator steps per metrics.jsonl line")
    g.add_argument("--i_sample", type=positive(int), default=500, help="generator steps per samples_<step>.png grid")
    g.add_argument("--sample_only", type=positive(int), default=None, metavar="N",
                   help="write N samples (samples.png, samples.npy) from the checkpoint and exit")
    g = p.add_argument_group("run")
    g.add_argument("--basedir", default="logs", help="where experiment folders go")
    g.add_argument("--expname", default=None, help="experiment folder name (default: wgan[_gp]_<dataset>)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--gpus", default=None, help="comma-separated GPU ids for DataParallel (default: all visible)")
    g.add_argument("--no_reload", action="store_true", help="start fresh instead of resuming from ckpt.pt")
    g.add_argument("--ckpt", default=None, help="checkpoint to load instead of logs/<expname>/ckpt.pt")
    return p


def parse_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.preset:  # preset values replace defaults only: flags given explicitly still win
        given = parser.parse_args(argv, namespace=argparse.Namespace(**{k: None for k in vars(args)}))
        for key, value in PRESETS[args.preset]["gp" if args.gp else "clip"].items():
            if getattr(given, key) is None:
                setattr(args, key, value)
    args.critic_norm = args.critic_norm or ("layer" if args.gp else "batch")
    if args.gp and args.critic_norm == "batch":
        fail("batch norm makes each critic output depend on the whole batch, so the per-sample gradient penalty "
             "is wrong", "--critic_norm", "use layer or none with --gp (Gulrajani et al. sec. 4)")
    size = args.image_size
    if size < 8 or size & (size - 1) or size % 4:
        fail(f"must be 4 x a power of two (8, 16, 32, 64, ...), got {size}", "--image_size", "e.g. --image_size 32")
    args.expname = args.expname or f"wgan{'_gp' if args.gp else ''}_{args.dataset}"
    return args


# ---------------------------------------------------------------- data
MIRRORS = {"mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
           "fashion": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
           "cifar10": ["https://www.cs.toronto.edu/~kriz/"]}
MD5 = {  # published checksums
    "mnist": {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
              "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
              "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
              "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    "fashion": {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    "cifar10": {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"}}
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
CIFAR_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue bytes, row-major


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


def fetch(dataset, folder, base_url=None, needed=None):
    """Download whichever of the dataset's files are missing from folder (needed: the files that,
    when present, make the download unnecessary; default the downloaded files themselves)."""
    os.makedirs(folder, exist_ok=True)
    for name, md5 in MD5[dataset].items():
        path = os.path.join(folder, name)
        if os.path.exists(path) or (needed and all(os.path.exists(os.path.join(folder, n)) for n in needed)):
            continue
        for base in [base_url] if base_url else MIRRORS[dataset]:
            try:
                download(base.rstrip("/") + "/" + name, path, md5)
                break
            except (OSError, ValueError, http.client.HTTPException) as e:
                why = f"{base.rstrip('/')}/{name}: {e}"
        else:
            fail(f"cannot download {why}", path, f"no network? put {', '.join(MD5[dataset])} in {folder} by hand")


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


def load_idx_images(dataset, folder, base_url=None):
    """-> (train, test) uint8 images (N, 1, 28, 28) of MNIST or Fashion-MNIST."""
    fetch(dataset, folder, base_url)
    out = []
    for split in ("train", "t10k"):
        path = os.path.join(folder, f"{split}-images-idx3-ubyte.gz")
        images = read_idx(path)
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            fail(f"expected uint8 images of 28x28, got {images.dtype} {images.shape}", path, "replace the file")
        out.append(torch.from_numpy(images.copy()).unsqueeze(1))
    return out


def extract_cifar(archive, folder):
    """Copy the six .bin members of the CIFAR-10 binary archive into folder. Members are matched by
    base name and written under that name only, so no path in the archive can escape folder."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            for name in CIFAR_FILES:
                if name not in members:
                    fail(f"archive has no {name}", archive, "delete it to download it again")
                tmp = os.path.join(folder, name + ".part")
                with tar.extractfile(members[name]) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(tmp, os.path.join(folder, name))
    except (tarfile.TarError, OSError, EOFError) as e:
        fail(f"unreadable archive ({e})", archive, "delete it to download it again")


def load_cifar(folder, base_url=None):
    """-> (train, test) uint8 images (N, 3, 32, 32) from the binary CIFAR-10 files: fixed-size records
    of one label byte and 3072 pixel bytes (no pickle involved)."""
    fetch("cifar10", folder, base_url, needed=CIFAR_FILES)
    if not all(os.path.exists(os.path.join(folder, n)) for n in CIFAR_FILES):
        extract_cifar(os.path.join(folder, "cifar-10-binary.tar.gz"), folder)
    splits = []
    for names in (CIFAR_FILES[:5], CIFAR_FILES[5:]):
        parts = []
        for name in names:
            path = os.path.join(folder, name)
            data = np.fromfile(path, np.uint8)
            if len(data) == 0 or len(data) % CIFAR_RECORD:
                fail(f"{len(data)} bytes is not a whole number of {CIFAR_RECORD}-byte records", path,
                     "delete the .bin files to extract them again")
            parts.append(torch.from_numpy(data.reshape(-1, CIFAR_RECORD)[:, 1:].reshape(-1, 3, 32, 32).copy()))
        splits.append(torch.cat(parts))
    return splits


def make_shapes(n, size=32, seed=0):
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
    -> uint8 (N, C, size, size), C = 3 if any file is stored as RGB(A), else 1."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp")))
    if len(files) < 2:
        fail(f"found {len(files)} PNG/JPG/BMP images, need at least 2", root, "point --datadir at a folder of images")
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
    """-> (train, test) uint8 images (N, C, size, size). MNIST's 28x28 digits are padded with black
    to 32x32 (the DCGAN shapes need 4 x 2^k), resized for other sizes. Folder and shapes hold out 10%."""
    if args.dataset in ("mnist", "fashion"):
        train, test = load_idx_images(args.dataset, os.path.join(args.datadir, args.dataset), args.data_url)
    elif args.dataset == "cifar10":
        train, test = load_cifar(os.path.join(args.datadir, "cifar10"), args.data_url)
    else:
        images = make_shapes(10000, args.image_size) if args.dataset == "shapes" else \
            load_folder(args.datadir, args.image_size)
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
        n_test = max(1, len(images) // 10)
        train, test = images[n_test:], images[:n_test]
    if train.shape[-1] == 28 and args.image_size == 32:
        train, test = F.pad(train, (2, 2, 2, 2)), F.pad(test, (2, 2, 2, 2))
    elif train.shape[-1] != args.image_size:
        resize = lambda x: F.interpolate(x.float(), size=args.image_size, mode="bilinear", antialias=True)  # noqa: E731
        train, test = (resize(x).round().clamp(0, 255).to(torch.uint8) for x in (train, test))
    return train, test


def to_float(x):
    return x.float() / 127.5 - 1  # uint8 -> [-1, 1], the range of the generator's tanh


# ---------------------------------------------------------------- model
def up_block(a, b, first=False):
    """Transposed conv doubling the size (4x4 from 1x1 for the first), batch norm, ReLU (DCGAN)."""
    conv = nn.ConvTranspose2d(a, b, 4, 1, 0, bias=False) if first else nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)
    return [conv, nn.BatchNorm2d(b, track_running_stats=False), nn.ReLU(True)]


def down_block(a, b, norm):
    """Strided conv halving the size, normalisation, LeakyReLU(0.2) (DCGAN's critic block)."""
    layers = [nn.Conv2d(a, b, 4, 2, 1, bias=norm == "none")]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(b, track_running_stats=False))
    elif norm == "layer":  # per sample over (C, H, W): the critic stays a function of each image alone
        layers.append(nn.GroupNorm(1, b))
    return layers + [nn.LeakyReLU(0.2, True)]


class WGAN(nn.Module):
    """DCGAN generator G: z (B, nz) -> image (B, C, S, S) in [-1, 1] by transposed convs 1 -> 4 -> 8 ...
    -> S; critic f: image -> one unbounded score by strided convs S -> ... -> 4 -> 1 (no sigmoid).
    Batch norm keeps no running averages: the nets always use the batch's statistics, as in training.
    forward() returns this replica's loss terms, so DataParallel sends a few numbers to GPU 0."""

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
        """Generator terms from z (B, nz): (1, 1) sum of f(G(z)). Critic terms from real and fake images
        (B, C, S, S): (1, 2) sums of f(real), f(fake), and with lam (1, 4) also the sums of the penalty
        and of the gradient norm at x^, built from alpha (B, 1, 1, 1) inside the replica, so the double
        backward never crosses DataParallel's scatter."""
        if z is not None:
            return self.critic(self.generator(z)).sum().view(1, 1)
        terms = [self.critic(real).sum(), self.critic(fake).sum()]     # separate passes, as the reference code
        if lam is not None:
            penalty, norm = gradient_penalty(self.critic, real, fake, alpha, lam)
            terms += [penalty.sum(), norm.sum()]
        return torch.stack(terms).unsqueeze(0)


# ---------------------------------------------------------------- loss
def gradient_penalty(critic, real, fake, alpha, lam):
    """LAMBDA (||grad_x^ f(x^)||_2 - 1)^2 at x^ = alpha real + (1 - alpha) fake (Gulrajani et al. alg. 1),
    with one alpha per sample (B, 1, 1, 1) and the norm over all non-batch dimensions.
    -> penalty (B,), gradient norm (B,); create_graph so that the penalty trains the critic."""
    x_hat = (alpha * real + (1 - alpha) * fake.detach()).requires_grad_(True)
    grad, = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)  # row b: d f(x^_b) / d x^_b
    norm = grad.flatten(1).norm(2, dim=1)                              # (B,)
    return lam * (norm - 1) ** 2, norm


def clip_weights(critic, c):
    """w <- clip(w, -c, c) for every critic parameter (WGAN algorithm 1, line 7): after the step."""
    with torch.no_grad():
        for p in critic.parameters():
            p.clamp_(-c, c)


# ---------------------------------------------------------------- training
def critic_step(model, opt, real, lam=None, clip=None):
    """One critic step on real images (B, C, S, S): minimise E[f(G(z))] - E[f(x)] (+ penalty), then
    clip. -> tensor (W estimate, critic loss, mean gradient norm or nan), floats per image."""
    raw = model.module if isinstance(model, nn.DataParallel) else model
    b = len(real)
    with torch.no_grad():                                              # fakes made here: the split does not matter
        fake = raw.generator(torch.randn(b, raw.nz, device=real.device))
    alpha = torch.rand(b, 1, 1, 1, device=real.device)                # one weight per sample, not per pixel
    sums = model(real=real, fake=fake, alpha=alpha, lam=lam).sum(0) / b  # sum over replicas / global count
    w = sums[0] - sums[1]                                              # E[f(x)] - E[f(G(z))]   (WGAN eq. 3)
    loss = -w + (sums[2] if lam is not None else 0)
    if not torch.isfinite(loss):
        fail(f"the critic loss became {loss.item()}", "--lr", "lower the learning rate; ckpt.pt holds the last good state")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if clip is not None:
        clip_weights(raw.critic, clip)
    norm = sums[3] if lam is not None else torch.tensor(float("nan"))
    return torch.stack([w.detach(), loss.detach(), norm.detach()])


def generator_step(model, opt, b, device):
    """One generator step on b noise vectors: minimise -E[f(G(z))] with the critic held fixed.
    -> the generator loss, a float tensor."""
    raw = model.module if isinstance(model, nn.DataParallel) else model
    trainable = [p for p in raw.critic.parameters() if p.requires_grad]
    for p in trainable:                                                 # no gradients for the critic's weights
        p.requires_grad_(False)
    loss = -model(z=torch.randn(b, raw.nz, device=device)).sum() / b   # -E[f(G(z))]   (WGAN alg. 1, line 10)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    for p in trainable:
        p.requires_grad_(True)
    return loss.detach()


def n_critic_at(step, n_critic, paper_schedule):
    """Critic steps before generator step `step`: n_critic, or with the WGAN reference code's schedule
    100 for the first 25 generator steps and every 500th, to keep the critic near optimal."""
    return 100 if paper_schedule and (step < 25 or step % 500 == 0) else n_critic


def make_optimizer(params, args):
    """RMSprop as in the WGAN paper (momentum made clipping unstable there, sec. 3). Under --gp, Adam with
    the WGAN-GP paper's betas (0, 0.9) rather than DCGAN's (0.5, 0.9): no momentum lets the critic follow
    a moving generator, and on MNIST it scored FD 18 against 40 after 2 minutes (benchmarks/results.md)."""
    params = [p for p in params if p.requires_grad]
    if args.gp:
        return torch.optim.Adam(params, lr=args.lr, betas=(args.beta1, args.beta2)) if params else None
    return torch.optim.RMSprop(params, lr=args.lr) if params else None


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
    if not any(p.requires_grad for p in model.generator.parameters()):
        fail("every generator parameter is frozen", "--freeze", "match fewer parameters")


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
    """A tiny_wgan checkpoint as a dict, or a one-line error."""
    if not os.path.exists(path):
        fail("no such checkpoint", path, "train first, or pass --ckpt PATH")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch.load raises many types for a foreign or damaged file
        fail(f"not a readable checkpoint ({type(e).__name__})", path, "pass a ckpt.pt written by tiny_wgan.py")
    if not isinstance(ckpt, dict) or ckpt.get("script") != "tiny_wgan":
        fail("not a tiny_wgan checkpoint", path, "pass a ckpt.pt written by tiny_wgan.py")
    return ckpt


# ---------------------------------------------------------------- evaluation & outputs
@torch.no_grad()
def generate(model, z, batch_size):
    """G(z) in batches of the training batch size (batch norm uses batch statistics). -> [-1, 1] images."""
    return torch.cat([model.generator(z[i:i + batch_size]) for i in range(0, len(z), batch_size)])


@torch.no_grad()
def wasserstein_estimate(model, images, batch_size, device, seed=0):
    """E[f(x)] - E[f(G(z))] over held-out images and as many fixed-seed fakes: the critic's estimate
    of W(P_data, P_G) up to its Lipschitz constant (the curve of WGAN fig. 3)."""
    z = torch.randn(len(images), model.nz, generator=torch.Generator().manual_seed(seed)).to(device)
    total = 0.0
    for i in range(0, len(images), batch_size):
        real = to_float(images[i:i + batch_size]).to(device)
        total += (model.critic(real).sum() - model.critic(model.generator(z[i:i + batch_size])).sum()).item()
    return total / len(images)


def save_grid(path, images, nrow):
    """images (N, C, H, W) in [-1, 1] -> one PNG, nrow images per row, 2-pixel grey gaps."""
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.zeros((c, rows * (h + 2) + 2, nrow * (w + 2) + 2))
    for i, im in enumerate(images.cpu()):
        r, q = divmod(i, nrow)
        grid[:, 2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = im
    pixels = to_uint8(grid.unsqueeze(0))[0].permute(1, 2, 0).numpy()
    atomic(path, lambda p: iio.imwrite(p, pixels[..., 0] if c == 1 else pixels))


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()  # [-1, 1] -> 0..255


def sample_only(args, device, expdir):
    """--sample_only N: N samples from --ckpt (default ckpt.pt), as a grid and as samples.npy,
    uint8 (N, H, W) or (N, H, W, C)."""
    path = args.ckpt or os.path.join(expdir, "ckpt.pt")
    ckpt = load_checkpoint(path, device)
    model = WGAN(**ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    z = torch.randn(args.sample_only, model.nz, generator=torch.Generator().manual_seed(args.seed)).to(device)
    x = generate(model, z, ckpt["args"]["batch_size"])
    pixels = to_uint8(x).permute(0, 2, 3, 1).numpy()
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

    train, test = load_dataset(args)
    if len(train) < args.batch_size:
        fail(f"{len(train)} training images, fewer than one batch", "--batch_size", f"use at most {len(train)}")
    raw = WGAN(train.shape[1], args.image_size, args.nz, args.ngf, args.ndf, args.critic_norm).to(device)
    state = {"step": 0, "critic_steps": 0, "drawn": 0, "in_step": 0, "seconds": 0.0}  # counters of the run
    ckpt_path = os.path.join(expdir, "ckpt.pt")
    ckpt = None
    if args.ckpt or (os.path.exists(ckpt_path) and not args.no_reload):  # resume the same run
        ckpt = load_checkpoint(args.ckpt or ckpt_path, device)
        for key, value in raw.config.items():
            if ckpt["model_args"][key] != value:
                fail(f"checkpoint has {key}={ckpt['model_args'][key]}, this run {value}", args.ckpt or ckpt_path,
                     "use the same flags, --no_reload to start fresh, or another --expname")
        if bool(ckpt["args"]["gp"]) != bool(args.gp):
            fail(f"checkpoint was trained with {'--gp' if ckpt['args']['gp'] else 'clipping'}", args.ckpt or ckpt_path,
                 "use the same mode, --no_reload to start fresh, or another --expname")
        raw.load_state_dict(ckpt["model"])
    if args.freeze:
        freeze(raw, args.freeze)
    opt_d, opt_g = make_optimizer(raw.critic.parameters(), args), make_optimizer(raw.generator.parameters(), args)
    if ckpt is not None:
        for opt, key in ((opt_d, "opt_d"), (opt_g, "opt_g")):
            if opt is not None and ckpt.get(key) is not None:
                try:
                    opt.load_state_dict(ckpt[key])
                except ValueError:
                    fail("its optimizer state does not fit this run", args.ckpt or ckpt_path,
                         "use the same --gp and --freeze flags, or --no_reload to start fresh")
        state.update(ckpt["state"])
        torch.set_rng_state(ckpt["rng"].cpu())
        if device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu(), device)
        print(f"resumed from {args.ckpt or ckpt_path} at generator step {state['step']}")
    model = nn.DataParallel(raw, device_ids=gpus) if len(gpus) > 1 else raw  # the losses are computed per replica

    os.makedirs(expdir, exist_ok=True)
    write_text(os.path.join(expdir, "args.json"), json.dumps(vars(args), indent=1))
    metrics_path = os.path.join(expdir, "metrics.jsonl")
    old = pathlib.Path(metrics_path).read_text().splitlines() if os.path.exists(metrics_path) and state["step"] else []
    write_text(metrics_path, "".join(line + "\n" for line in old if json.loads(line)["step"] <= state["step"]))

    def save_checkpoint():
        atomic(ckpt_path, lambda p: torch.save({
            "script": "tiny_wgan", "model_args": raw.config, "model": raw.state_dict(), "state": dict(state),
            "opt_d": opt_d.state_dict() if opt_d else None, "opt_g": opt_g.state_dict(), "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "args": vars(args)}, p))

    orders = {}

    def next_batch():
        """Batches run through the training images epoch by epoch; an epoch's order depends on (seed, epoch)."""
        epoch, i = divmod(state["drawn"], len(train) // args.batch_size)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        state["drawn"] += 1
        return to_float(train[orders[epoch][i * args.batch_size:(i + 1) * args.batch_size]]).to(device)

    fixed_z = torch.randn(64, args.nz, generator=torch.Generator().manual_seed(1234)).to(device)  # the grids' noise
    lam, clip = args.gp, None if args.gp else args.clip_value
    budget = (args.max_minutes or math.inf) * 60
    print(f"{len(train)} train / {len(test)} held-out images of {tuple(train.shape[1:])}, generator "
          f"{sum(p.numel() for p in raw.generator.parameters()):,} / critic {sum(p.numel() for p in raw.critic.parameters()):,}"
          f" parameters, {'WGAN-GP lambda=%g' % lam if lam else 'clipping c=%g' % clip}, {device}")
    stop = []                                                          # Ctrl-C: finish the step, save, exit

    def on_ctrl_c(*_):
        stop.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)       # a second Ctrl-C stops at once
    in_main = threading.current_thread() is threading.main_thread()   # only there can Python catch signals
    previous = signal.signal(signal.SIGINT, on_ctrl_c) if in_main else None
    bar = tqdm(total=args.iters, initial=state["step"], desc="train", dynamic_ncols=True)
    start, running, n_d, g_loss, n_g, tic = time.time() - state["seconds"], torch.zeros(3), 0, 0.0, 0, time.time()
    try:
        while state["step"] < args.iters and state["seconds"] < budget and not stop:
            step = state["step"]
            while opt_d is not None and state["in_step"] < n_critic_at(step, args.n_critic, args.paper_schedule):
                running += critic_step(model, opt_d, next_batch(), lam, clip).cpu()  # WGAN algorithm 1, lines 2-8
                state["in_step"], state["critic_steps"], n_d = state["in_step"] + 1, state["critic_steps"] + 1, n_d + 1
                if stop:
                    break
            if stop:
                break
            g_loss += generator_step(model, opt_g, args.batch_size, device).item()  # lines 9-10
            state["step"], state["in_step"], n_g = step + 1, 0, n_g + 1
            state["seconds"] = time.time() - start
            bar.update()
            if state["step"] % args.i_print == 0 or state["step"] == args.iters or state["seconds"] >= budget:
                w, loss_d, norm = (running / max(n_d, 1)).tolist()
                record = {"step": state["step"], "critic_steps": state["critic_steps"], "wasserstein": w,
                          "loss_d": loss_d, "loss_g": g_loss / max(n_g, 1), "grad_norm": norm if lam else None,
                          "lr": args.lr, "g_steps_per_s": round(n_g / (time.time() - tic), 3),
                          "seconds": round(state["seconds"], 2)}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(W=f"{w:.4f}", loss_g=f"{record['loss_g']:.4f}")
                running, n_d, g_loss, n_g, tic = torch.zeros(3), 0, 0.0, 0, time.time()
                save_checkpoint()
            if state["step"] % args.i_sample == 0:
                save_grid(os.path.join(expdir, f"samples_{state['step']}.png"), generate(raw, fixed_z, args.batch_size), 8)
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    save_checkpoint()
    if stop:
        raise SystemExit(f"interrupted at generator step {state['step']}: saved {ckpt_path}; run the same command to resume")

    step = state["step"]
    save_grid(os.path.join(expdir, f"samples_{step}.png"), generate(raw, fixed_z, args.batch_size), 8)
    w = wasserstein_estimate(raw, test, args.batch_size, device)
    final = {"step": step, "critic_steps": state["critic_steps"], "wasserstein_test": w,
             "train_seconds": round(state["seconds"], 2), "held_out_images": len(test)}
    write_text(os.path.join(expdir, "final.json"), json.dumps(final, indent=1))
    print(f"final Wasserstein estimate {w:.4f} (E[f(x)] - E[f(G(z))] on {len(test)} held-out images) "
          f"after {step} generator steps")
    return final


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # outside training, or a second Ctrl-C: ckpt.pt holds the last saved state
        raise SystemExit("interrupted")
