"""Frechet distance and class coverage of generated MNIST digits, for the benchmarks.

A LeNet-style classifier (conv5-pool-conv5-pool-120-84-10) is trained by this file on the
training digits of the data root; images are described by its 84 penultimate activations, and
    FD = |m1 - m2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))      (Heusel et al. 2017, as in FID)
compares the features of samples with those of the test digits. Coverage: the share of the ten
classes that receive at least 5% of the samples by the classifier's vote.

    python benchmarks/fd.py --datadir ../shared/data/mnist_small --calibrate   # reference points
    python benchmarks/fd.py --datadir ../shared/data/mnist_small samples.npy   # score samples
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import tiny_vae  # noqa: E402  (its idx reader)

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def features(self, x):
        """(N, 1, 28, 28) in [0, 1] -> (N, 84)."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward(self, x):
        return self.fc3(self.features(x))


def load_digits(datadir):
    """-> train images, train labels, test images (uint8 (N, 28, 28)) from <datadir>/mnist/."""
    folder = os.path.join(datadir, "mnist")
    read = lambda name: torch.from_numpy(tiny_vae.read_idx(os.path.join(folder, name)).copy())  # noqa: E731
    return (read("train-images-idx3-ubyte.gz"), read("train-labels-idx1-ubyte.gz").long(),
            read("t10k-images-idx3-ubyte.gz"))


def classifier(datadir, epochs=8):
    """The LeNet trained on the training digits (Adam, 8 epochs, seed 0), cached in benchmarks/runs/."""
    path = os.path.join(CACHE, "lenet_" + os.path.basename(os.path.normpath(datadir)) + ".pt")
    net = LeNet()
    if os.path.exists(path):
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    images, labels, _ = load_digits(datadir)
    x = images.float().unsqueeze(1) / 255
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(net(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    os.makedirs(CACHE, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.eval()


@torch.no_grad()
def features(net, images):
    """uint8 (N, 28, 28) or float in [0, 1] -> (features (N, 84) float64, predicted class (N,)).
    32x32 images (tiny_wgan pads MNIST to 32) are cropped to their central 28x28."""
    x = torch.as_tensor(images)
    if x.shape[-1] == 32:
        x = x[..., 2:30, 2:30]
    x = (x.float() / 255 if x.dtype == torch.uint8 else x.float()).reshape(-1, 1, 28, 28)
    f = torch.cat([net.features(b) for b in x.split(500)])
    return f.double().numpy(), net.fc3(f).argmax(1).numpy()


def frechet(f1, f2):
    """|m1 - m2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)); the last trace is the sum of the square
    roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), symmetric and PSD, so no complex sqrtm."""
    m1, m2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w.clip(0))) @ v.T                              # S1^(1/2)
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(0)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def coverage(pred):
    """Share of the ten classes that receive at least 5% of the samples."""
    return float((np.bincount(pred, minlength=10) / len(pred) >= 0.05).mean())


def score(samples, datadir):
    """-> dict(fd, coverage) of samples against the test digits."""
    net = classifier(datadir)
    f_test, _ = features(net, load_digits(datadir)[2])
    f, pred = features(net, samples)
    return {"fd": frechet(f, f_test), "coverage": coverage(pred)}


def calibration(datadir, n=2000):
    """FD of reference image sets against the test digits: real training digits (the floor),
    the same blurred by a 3x3 box filter, and uniform noise."""
    torch.manual_seed(0)
    real = load_digits(datadir)[0][:n]
    blurred = F.avg_pool2d(real.float().unsqueeze(1) / 255, 3, 1, 1, count_include_pad=False)
    return {"real": score(real, datadir), "blurred 3x3": score(blurred, datadir),
            "noise": score(torch.rand(n, 28, 28), datadir)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("samples", nargs="?", help="a samples.npy of uint8 (N, 28, 28)")
    p.add_argument("--datadir", default="../shared/data/mnist_small")
    p.add_argument("--calibrate", action="store_true", help="print the reference points")
    args = p.parse_args()
    if args.calibrate:
        for name, s in calibration(args.datadir).items():
            print(f"{name:12s} FD {s['fd']:8.1f}  coverage {s['coverage']:.1f}")
    if args.samples:
        s = score(np.load(args.samples), args.datadir)
        print(f"FD {s['fd']:.1f}  coverage {s['coverage']:.1f}")


if __name__ == "__main__":
    main()
