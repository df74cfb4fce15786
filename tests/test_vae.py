"""Tests of tiny_vae.py: the math against closed forms, the data readers against generated
files, and the CLI end to end on the procedural dataset. Run: pytest tests/"""
import gzip
import json
import math
import os
import re
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tiny_vae  # noqa: E402
from helpers import (ctrl_c_during_call, fake_mnist, one_line_error, rejects_bad_idx_and_empty_folder,  # noqa: E402
                     rejects_foreign_checkpoints, same_rows, stops_with_130, write_idx)


def small_vae(arch="conv", latent_dim=4, likelihood="bernoulli"):
    torch.manual_seed(0)
    return tiny_vae.VAE(arch, (1, 28, 28), latent_dim, 8, likelihood)


def error_of(argv):
    return one_line_error(tiny_vae.main, argv)


# ---------------------------------------------------------------- math
def test_kl_matches_closed_form():
    mu = torch.tensor([[0.0, 1.0, 2.0]])
    logvar = torch.log(torch.tensor([[1.0, 4.0, 0.25]]))
    # 0.5 (mu^2 + s^2 - 1 - log s^2), by hand: 0, 0.5 (1 + 4 - 1 - log 4), 0.5 (4 + 0.25 - 1 + log 4)
    expected = torch.tensor([[0.0, 0.5 * (4 - math.log(4)), 0.5 * (3.25 + math.log(4))]])
    assert torch.allclose(tiny_vae.kl_per_dim(mu, logvar), expected, atol=1e-6)
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    reference = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0))
    assert torch.allclose(tiny_vae.kl_per_dim(mu, logvar), reference, atol=1e-5)


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_gradients_reach_encoder_through_the_sample(arch):
    model = small_vae(arch)
    x = torch.rand(6, 1, 28, 28)
    rec, _ = model(x, torch.randn(6, 4)).sum(0)
    rec.backward()  # reconstruction only: the encoder gets gradients only through z = mu + sigma * eps
    head = model.encoder[-1]
    assert head.weight.grad[:4].abs().sum() > 0, "no gradient to mu"
    assert head.weight.grad[4:].abs().sum() > 0, "no gradient to logvar (sigma)"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_bernoulli_and_gaussian_nll_by_hand():
    model = small_vae()
    x, out = torch.tensor([[1.0, 0.0, 0.5]]), torch.tensor([[0.0, 2.0, -1.0]])
    p = torch.sigmoid(out)
    expected = -(x * p.log() + (1 - x) * (1 - p).log()).sum(1)
    assert torch.allclose(model.nll(x, out), expected, atol=1e-5)
    gauss = small_vae(likelihood="gaussian")
    sigma = gauss.log_sigma.exp()
    expected = (0.5 * ((x - out) / sigma) ** 2 + sigma.log() + 0.5 * math.log(2 * math.pi)).sum(1)
    assert torch.allclose(gauss.nll(x, out), expected, atol=1e-5)


def test_iw_with_one_sample_is_the_elbo_and_more_samples_are_tighter():
    model = small_vae()
    x = torch.rand(3, 1, 28, 28).round()
    n = 20000
    eps = torch.randn(n, 3, 4)
    with torch.no_grad():
        log_w = tiny_vae.log_importance_weights(model, x, eps)       # (n, 3): n one-sample bounds
        mu, logvar = model.encode(x)
        z = mu + (0.5 * logvar).exp() * eps
        rec = model.nll(x.expand(n, 3, 1, 28, 28).flatten(0, 1), model.decoder(z.flatten(0, 1))).view(n, 3)
        kl = tiny_vae.kl_per_dim(mu, logvar).sum(1)
    # -log w = rec + log q - log p; E_q[log q - log p] = KL exactly, so the means agree up to
    # Monte Carlo error of the KL part: allow 5 standard errors.
    kl_mc = -log_w - rec
    err = (kl_mc.mean(0) - kl).abs()
    assert (err < 5 * kl_mc.std(0) / math.sqrt(n) + 1e-4).all(), (kl_mc.mean(0), kl)
    images = (torch.rand(64, 1, 28, 28) * 255).to(torch.uint8)
    elbo = tiny_vae.evaluate(model, images, torch.device("cpu"), 64)[0]
    iw1 = tiny_vae.iw_nll(model, images, 1, torch.device("cpu"))
    iw50 = tiny_vae.iw_nll(model, images, 50, torch.device("cpu"))
    assert abs(iw1 - elbo) < 0.01 * elbo          # one-sample bounds of the same quantity
    assert iw50 < iw1 - 0.1                        # log-mean-exp over K > 1 is tighter (Burda et al. thm 1)


# ---------------------------------------------------------------- data
@pytest.mark.parametrize("name,code,dtype", [("a.idx.gz", 0x08, np.uint8), ("b.idx", 0x0C, np.int32),
                                             ("c.idx", 0x0D, np.float32)])
def test_read_idx_roundtrip(tmp_path, name, code, dtype):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype) % 200
    write_idx(str(tmp_path / name), array, code)
    out = tiny_vae.read_idx(str(tmp_path / name))
    assert out.shape == (2, 3, 5) and np.array_equal(out, array)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    good = str(tmp_path / "good.idx")
    write_idx(good, np.zeros((4, 28, 28), np.uint8))
    data = open(good, "rb").read()
    cases = {"truncated.idx": data[:-10], "magic.idx": b"\x01\x02" + data[2:], "short.idx": data[:6],
             "foreign.gz": b"this is not gzip at all", "cut.gz": gzip.compress(data)[:40]}
    for name, content in cases.items():
        path = str(tmp_path / name)
        open(path, "wb").write(content)
        with pytest.raises(SystemExit) as e:
            tiny_vae.read_idx(path)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and path in msg and "\n" not in msg, msg


def test_idx_dataset_checks_image_size(tmp_path):
    fake_mnist(str(tmp_path / "mnist"), size=20)
    with pytest.raises(SystemExit, match="28x28"):
        tiny_vae.load_idx_images("mnist", str(tmp_path / "mnist"))


def test_download_verifies_md5(http_dir, tmp_path, monkeypatch):
    served, url = http_dir
    md5 = fake_mnist(str(served))
    monkeypatch.setitem(tiny_vae.IDX_MD5, "mnist", md5)
    target = str(tmp_path / "data" / "mnist")
    train, test = tiny_vae.load_idx_images("mnist", target, url)
    assert train.shape == (40, 1, 28, 28) and test.shape == (20, 1, 28, 28)
    assert sorted(os.listdir(target)) == sorted(md5)

    bad = dict(md5, **{"t10k-images-idx3-ubyte.gz": "0" * 32})     # the server sends another file
    other = str(tmp_path / "other")
    with pytest.raises(SystemExit) as e:
        tiny_vae.fetch(other, bad, url)
    assert "md5" in str(e.value.code) and "t10k-images" in str(e.value.code)
    assert "t10k-images-idx3-ubyte.gz" not in os.listdir(other)
    assert not [f for f in os.listdir(other) if f.endswith(".part")]


def test_fashion_downloads_into_its_folder_and_trains(http_dir, tmp_path, monkeypatch):
    served, url = http_dir
    monkeypatch.setitem(tiny_vae.IDX_MD5, "fashion", fake_mnist(str(served)))
    final = tiny_vae.main(["--dataset", "fashion", "--datadir", str(tmp_path / "data"), "--data_url", url,
                           "--arch", "mlp", "--epochs", "1", "--iw_samples", "2", "--basedir", str(tmp_path)])
    assert sorted(os.listdir(tmp_path / "data" / "fashion")) == sorted(tiny_vae.IDX_MD5["fashion"])
    assert math.isfinite(final["test_nelbo"]) and (tmp_path / "vae_fashion_mlp" / "best.pt").exists()


def test_download_without_network_is_one_line_naming_the_offline_choices(tmp_path):
    msg = error_of(["--datadir", str(tmp_path), "--data_url", "http://127.0.0.1:9/", "--basedir", str(tmp_path)])
    assert "cannot download" in msg and "by hand" in msg and "--datadir" in msg and "--dataset shapes" in msg
    assert not os.listdir(tmp_path / "mnist")


def test_folder_of_grey_and_colour_images(tmp_path):
    rng = np.random.default_rng(0)
    iio.imwrite(tmp_path / "grey.png", rng.integers(0, 256, (40, 30), np.uint8))
    iio.imwrite(tmp_path / "rgba.png", rng.integers(0, 256, (20, 20, 4), np.uint8))
    os.makedirs(tmp_path / "sub")
    iio.imwrite(tmp_path / "sub" / "rgb.jpg", rng.integers(0, 256, (64, 48, 3), np.uint8))
    images = tiny_vae.load_folder(str(tmp_path), 16)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.uint8
    grey = images[0]                                                # sorted: grey.png, rgba.png, sub/rgb.jpg
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_colour_folder_with_gaussian_likelihood_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "images")
    for i in range(40):                                             # colour blobs on a dark background
        im = np.zeros((20, 20, 3), np.uint8)
        y, x = rng.integers(2, 12, 2)
        im[y:y + 6, x:x + 6] = rng.integers(100, 256, 3)
        iio.imwrite(tmp_path / "images" / f"{i}.png", im)
    argv = ["--dataset", "folder", "--datadir", str(tmp_path / "images"), "--image_size", "16", "--likelihood",
            "gaussian", "--epochs", "30", "--iw_samples", "2", "--basedir", str(tmp_path), "--batch_size", "8"]
    final = tiny_vae.main(argv)
    rows = [json.loads(line) for line in open(tmp_path / "vae_folder_conv" / "metrics.jsonl")]
    # a smoke test of the RGB + Gaussian path: the first epoch sits near 1,900 nats, 30 epochs far below
    assert math.isfinite(final["test_nelbo"]) and rows[-1]["train_nelbo"] < rows[0]["train_nelbo"] - 100
    tiny_vae.main(argv + ["--sample_only", "5"])
    samples = np.load(tmp_path / "vae_folder_conv" / "samples.npy")
    assert samples.shape == (5, 16, 16, 3) and samples.dtype == np.uint8


def test_shapes_are_reproducible_and_varied():
    make = tiny_vae.make_shapes.__wrapped__                             # not the tests' copy of the first draw
    a, b = make(300, 28), make(300, 28)
    assert torch.equal(a, b) and a.shape == (300, 1, 28, 28) and a.dtype == torch.uint8
    ink = a.float().mean((1, 2, 3)) / 255
    assert ink.min() > 0.02 and ink.max() < 0.8 and ink.std() > 0.02


# ---------------------------------------------------------------- CLI
def mean_image_baseline(train, test):
    """-log p(x) of the best model that ignores z: independent Bernoulli pixels with the training
    mean image. A VAE whose -ELBO beats it by far has learned to encode the image in z."""
    p = (tiny_vae.to_float(train).mean(0, keepdim=True)).clamp(1e-4, 1 - 1e-4)
    x = tiny_vae.to_float(test)
    return -(x * p.log() + (1 - x) * (1 - p).log()).flatten(1).sum(1).mean().item()


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    basedir = tmp_path_factory.mktemp("logs")
    argv = ["--dataset", "shapes", "--basedir", str(basedir), "--epochs", "2", "--iw_samples", "20"]
    return basedir, argv, tiny_vae.main(argv)


def test_cli_learns_shapes_and_writes_every_output(shapes_run, capsys):
    basedir, argv, final = shapes_run
    args = tiny_vae.parse_args(argv)
    train, _, test = tiny_vae.load_dataset(args)
    baseline = mean_image_baseline(train, test)                    # about 256 nats on shapes
    # Trained 2 epochs (about 20 s on a 2-core AVX2 CPU; 81.5 nats there, 96 after one), the conv VAE must explain
    # most of what the mean image cannot: an untrained one sits near 784 log 2 = 543 nats, the mean-image model at
    # the baseline.
    assert final["test_nelbo"] < 0.5 * baseline, (final["test_nelbo"], baseline)
    assert final["iw_nll"] <= final["test_nelbo"] + 1.0
    assert final["active_units"] >= 4 and len(final["kl_per_dim"]) == 16
    expdir = basedir / "vae_shapes_conv"
    step = final["step"]
    for name in ["args.json", "ckpt.pt", "best.pt", "metrics.jsonl", "final.json",
                 f"samples_{step}.png", f"recon_{step}.png", f"interp_{step}.png"]:
        assert (expdir / name).exists(), name
    assert not [f for f in os.listdir(expdir) if ".tmp" in f]
    rows = [json.loads(line) for line in open(expdir / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["test_nelbo"] < rows[0]["test_nelbo"]
    assert iio.imread(expdir / f"recon_{step}.png").shape == (8 * 30 + 2, 8 * 30 + 2)
    assert iio.imread(expdir / f"interp_{step}.png").shape == (8 * 30 + 2, 10 * 30 + 2)
    assert json.load(open(expdir / "args.json"))["epochs"] == 2


def test_sample_only_writes_grid_and_array(shapes_run, capsys):
    basedir, argv, _ = shapes_run
    expdir = basedir / "vae_shapes_conv"
    tiny_vae.main(argv + ["--sample_only", "10", "--samples", "mean"])
    means = np.load(expdir / "samples.npy")
    assert means.shape == (10, 28, 28) and means.dtype == np.uint8 and means.max() > 128
    assert ((means > 0) & (means < 255)).mean() > 0.01                  # grey edges: the means of p(x|z)
    tiny_vae.main(argv + ["--sample_only", "10"])                       # the default: the same z, their modes
    modes = np.load(expdir / "samples.npy")
    assert set(np.unique(modes)) <= {0, 255} and ((means >= 128) == (modes == 255)).mean() > 0.999
    assert (expdir / "samples.png").exists() and "10 samples (modes of p(x|z))" in capsys.readouterr().out


def test_summary_is_the_last_line(tmp_path, capsys):
    tiny_vae.main(["--dataset", "shapes", "--arch", "mlp", "--epochs", "1", "--iw_samples", "3",
                   "--basedir", str(tmp_path)])
    out = capsys.readouterr().out
    assert re.search(r"IW-NLL, K=3, of 1000 images: about \d+ s", out), out   # said before the long part
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"test -ELBO \d+\.\d nats \| IW-NLL \(K=3\) \d+\.\d nats", last), last


def run_lines(expdir):
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_s")}
            for line in open(expdir / "metrics.jsonl")]


def test_resume_continues_the_same_run(tmp_path, monkeypatch, capsys):
    common = ["--dataset", "shapes", "--arch", "mlp", "--iw_samples", "2", "--basedir", str(tmp_path)]
    straight = tiny_vae.main(common + ["--expname", "a", "--epochs", "3"])
    per_epoch = straight["step"] // 3                                   # 64: 8,100 training images in 128s
    tiny_vae.main(common + ["--expname", "b", "--epochs", "1"])        # stop at an epoch end ...
    resumed = tiny_vae.main(common + ["--expname", "b", "--epochs", "3"])  # ... and go on
    assert resumed["step"] == straight["step"] == 3 * per_epoch and per_epoch == 64
    assert resumed["test_nelbo"] == pytest.approx(straight["test_nelbo"], abs=1e-4)
    same_rows(run_lines(tmp_path / "a"), run_lines(tmp_path / "b"), 1e-4)

    undo = ctrl_c_during_call(monkeypatch, tiny_vae, "train_step", 80)  # Ctrl-C in the middle of epoch 2
    stops_with_130(tiny_vae.main, common + ["--expname", "c", "--epochs", "3"], capsys, 80)
    undo()
    resumed = tiny_vae.main(common + ["--expname", "c", "--epochs", "3"])
    assert resumed["test_nelbo"] == pytest.approx(straight["test_nelbo"], abs=1e-4)
    same_rows(run_lines(tmp_path / "c"), run_lines(tmp_path / "a"), 1e-4)  # the epoch's sums survive Ctrl-C too


def test_freeze_trains_only_the_decoder(tmp_path, capsys):
    common = ["--dataset", "shapes", "--arch", "mlp", "--epochs", "1", "--iw_samples", "2", "--basedir", str(tmp_path)]
    tiny_vae.main(common + ["--expname", "base", "--epochs", "1"])
    before = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)["model"]
    tiny_vae.main(common + ["--expname", "base", "--epochs", "2", "--freeze", "encoder.*"])
    assert "parameters: 330,040 frozen" in capsys.readouterr().out   # 784*400+400 + 400*40+40
    after = torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder"))
    assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("decoder"))


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("flags,words", [
    (["--lr", "-1"], "--lr"), (["--batch_size", "0"], "--batch_size"), (["--val_frac", "1.5"], "--val_frac"),
    (["--arch", "resnet"], "--arch"), (["--device", "cuda"], "--device"), (["--device", "tpu9"], "--device"),
    (["--freeze", "nothing.*"], "--freeze"), (["--beta", "-1"], "--beta"),
])
def test_bad_flags_are_one_line_errors(tmp_path, flags, words):
    if flags[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    msg = error_of(["--dataset", "shapes", "--epochs", "1", "--basedir", str(tmp_path)] + flags)
    assert words in msg


def test_bad_data_is_one_line_error(tmp_path):
    rejects_bad_idx_and_empty_folder(error_of, str(tmp_path))


def test_bad_checkpoints_and_other_data_leave_existing_files_intact(tmp_path):
    common = ["--dataset", "shapes", "--arch", "mlp", "--epochs", "1", "--iw_samples", "2", "--basedir", str(tmp_path)]
    tiny_vae.main(common + ["--expname", "run"])
    ckpt = tmp_path / "run" / "ckpt.pt"
    saved = ckpt.read_bytes()
    assert "latent_dim" in error_of(common + ["--expname", "run", "--latent_dim", "7"])
    msg = error_of(common + ["--expname", "run", "--val_frac", "0.2"])  # other training images, same model
    assert "trained on other data" in msg and "--no_reload" in msg
    rejects_foreign_checkpoints(error_of, common + ["--expname", "run"], str(tmp_path), "tiny_vae")
    assert "no such checkpoint" in error_of(common + ["--expname", "none", "--sample_only", "4"])
    assert ckpt.read_bytes() == saved


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    common = ["--dataset", "shapes", "--arch", "mlp", "--iw_samples", "2", "--basedir", str(tmp_path)]
    tiny_vae.main(common + ["--epochs", "1"])
    ckpt = tmp_path / "vae_shapes_mlp" / "ckpt.pt"
    saved = ckpt.read_bytes()
    monkeypatch.setattr(tiny_vae, "kl_per_dim", lambda mu, logvar: mu * math.nan)
    assert "nan" in error_of(common + ["--epochs", "2"])
    assert ckpt.read_bytes() == saved
