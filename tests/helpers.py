"""Helpers shared by the test files: one-line user errors, generated idx files, Ctrl-C, metrics rows."""
import gzip
import hashlib
import math
import os
import signal
import struct

import numpy as np
import pytest
import torch


def one_line_error(main, argv):
    """Run a script's main(argv), expect a one-line user error `error: ...`; return its text."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def write_idx(path, array, code=0x08):
    """An idx file (gzipped if path ends in .gz): zero, zero, dtype code, ndim, big-endian sizes, data."""
    head = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = head + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(data)


def fake_mnist(folder, n_train=40, n_test=20, size=28, low=0):
    """The four MNIST idx .gz files with random pixels in [low, 255]. -> {file name: md5}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), rng.integers(low, 256, (n, size, size), np.uint8))
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), rng.integers(0, 10, n, np.uint8))
    return {name: hashlib.md5(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name.endswith("-ubyte.gz")}


def rejects_foreign_checkpoints(error_of, argv, folder, script):
    """A checkpoint of another program and a file that is no checkpoint at all, passed by --ckpt,
    must each stop the run with a one-line error naming the problem."""
    foreign, junk = os.path.join(folder, "foreign.pt"), os.path.join(folder, "junk.pt")
    torch.save({"state_dict": {}}, foreign)
    with open(junk, "wb") as f:
        f.write(b"junk")
    assert f"not a {script} checkpoint" in error_of(argv + ["--ckpt", foreign])
    assert "not a readable checkpoint" in error_of(argv + ["--ckpt", junk])


def ctrl_c_during_call(monkeypatch, module, name, n):
    """Send SIGINT (Ctrl-C) to this process during the n-th call of module.name; -> a function that undoes it."""
    calls, real = [0], getattr(module, name)

    def interrupted(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            signal.raise_signal(signal.SIGINT)
        return real(*a, **k)
    monkeypatch.setattr(module, name, interrupted)
    return lambda: monkeypatch.setattr(module, name, real)


def stops_with_130(main, argv, capsys, step):
    """main(argv) must stop as after Ctrl-C: exit status 130 and one line naming the step it saved."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 130
    assert f"interrupted at step {step}: saved " in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C handling is put back


def same_rows(a, b, tol=1e-5):
    """Two lists of metrics rows agree: the same keys, numbers within tol, everything else equal."""
    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x, y)
        for key in x:
            if isinstance(x[key], float) or isinstance(y[key], float):
                assert math.isclose(x[key], y[key], rel_tol=tol, abs_tol=tol), (key, x, y)
            else:
                assert x[key] == y[key], (key, x, y)


def rejects_bad_idx_and_empty_folder(error_of, root):
    """A truncated MNIST test-image file under root/mnist and an empty image folder: one-line errors
    naming the file and the problem."""
    fake_mnist(os.path.join(root, "mnist"))
    path = os.path.join(root, "mnist", "t10k-images-idx3-ubyte.gz")
    with open(path, "rb") as f:
        head = f.read(100)
    with open(path, "wb") as f:
        f.write(head)
    assert path in error_of(["--datadir", root, "--basedir", root])
    os.makedirs(os.path.join(root, "empty"))
    assert "images" in error_of(["--dataset", "folder", "--datadir", os.path.join(root, "empty"), "--basedir", root])
