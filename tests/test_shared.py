"""Tests of what the four scripts share: the harness, byte-identical in each, and every other definition that two
scripts both need (the image data of tiny_vae and tiny_wgan, the scene data and evaluation of tiny_nerf and
tiny_tensorf); the reading order; and the harness's behaviour through each script's command line: unknown flags,
--gpus without CUDA, an unusable --basedir, TensorBoard, a spent --max_minutes budget, the progress bar's ETA."""
import ast
import importlib.util
import os
import pathlib
import sys
import time
import types

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tiny_nerf  # noqa: E402
import tiny_tensorf  # noqa: E402
import tiny_vae  # noqa: E402
import tiny_wgan  # noqa: E402
from helpers import one_line_error  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = {"nerf": tiny_nerf, "tensorf": tiny_tensorf, "vae": tiny_vae, "wgan": tiny_wgan}
SOURCES = {name: (ROOT / f"tiny_{name}.py").read_text() for name in MODULES}
BANNERS = ["arguments", "model", "training", "evaluation & outputs", "data", "harness (identical in all four scripts)"]
OWN = {  # the names each script defines its own way: the model and what drives it
    "SCRIPT", "ALIASES", "PRESETS", "get_parser", "preset_defaults", "check_args", "RENDER_OPTIONS", "NEAR, FAR",
    "train_step", "make_optimizer", "load_dataset", "to_float", "sample_only", "sample_batch", "main"}
# the smallest run of each script: a few steps on data it makes itself
QUICK = {"nerf": ["--scene", "procedural", "--proc_size", "16", "--netdepth", "2", "--netwidth", "16",
                  "--netdepth_fine", "2", "--netwidth_fine", "16", "--N_samples", "8", "--N_importance", "8",
                  "--N_rand", "64", "--N_iters", "3", "--i_print", "1", "--video_factor", "4"],
         "tensorf": ["--scene", "procedural", "--proc_size", "16", "--N_voxel_init", str(16 ** 3), "--N_voxel_final",
                     str(16 ** 3), "--upsamp_list", "--update_AlphaMask_list", "--n_lamb_sigma", "2", "--n_lamb_sh", "2",
                     "--featureC", "8", "--batch_size", "64", "--N_iters", "3", "--i_print", "1", "--video_factor", "4"],
         "vae": ["--dataset", "shapes", "--arch", "mlp", "--hidden", "16", "--epochs", "1", "--iw_samples", "2"],
         "wgan": ["--dataset", "shapes", "--image_size", "8", "--ngf", "4", "--ndf", "4", "--iters", "3",
                  "--i_print", "1", "--i_sample", "1"]}


def definitions(source):
    """Top-level functions, classes and assignments of a script: {name: source text}."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign):
            name = ", ".join(ast.get_source_segment(source, t) for t in node.targets)
        else:
            continue
        out[name] = ast.get_source_segment(source, node)
    return out


def harness(source):
    return source[source.index("# " + "-" * 64 + " harness"):source.index("\ndef main(")]


def quick(name, tmp_path):
    """The argv of a quick run of script `name` with its outputs (and a generated scene) under tmp_path."""
    scene = ["--datadir", str(tmp_path / "data")] if name in ("nerf", "tensorf") else []
    return QUICK[name] + scene + ["--basedir", str(tmp_path / "logs")]


# ---------------------------------------------------------------- the shared text
def test_the_harness_is_byte_identical_in_the_four_scripts():
    sections = {name: harness(source) for name, source in SOURCES.items()}
    assert len(set(sections.values())) == 1, {n: len(s) for n, s in sections.items()}
    assert len(sections["vae"].splitlines()) > 150                      # the section, not an empty match


def test_every_definition_two_scripts_share_is_identical():
    seen = {}
    for name, source in SOURCES.items():
        for key, text in definitions(source).items():
            seen.setdefault(key, {})[name] = text
    shared = {key: by for key, by in seen.items() if len(by) > 1}
    drift = sorted(key for key, by in shared.items() if len(set(by.values())) > 1 and key not in OWN)
    assert not drift, drift
    assert {"load_blender", "render_testset", "ray_cast", "fetch_synthetic"} <= shared.keys()  # nerf and tensorf
    assert {"read_idx", "load_folder", "make_shapes", "grid"} <= shared.keys()                 # vae and wgan


@pytest.mark.parametrize("name", MODULES)
def test_reading_order_model_first_harness_last(name):
    lines = SOURCES[name].splitlines()
    where = [next((i for i, line in enumerate(lines) if line.startswith("# ") and line.endswith(" " + banner)), None)
             for banner in BANNERS]
    assert None not in where and where == sorted(where), dict(zip(BANNERS, where))
    assert where[1] < 150                                               # a reader reaches the model quickly
    assert lines.index("def main(argv=None):") > where[-1]


# ---------------------------------------------------------------- the harness through each script
@pytest.mark.parametrize("name", MODULES)
def test_flags_of_the_reference_code_are_answered_with_their_name_here(name):
    module = MODULES[name]
    flag, equivalent = next(iter(module.ALIASES.items()))
    msg = one_line_error(module.main, [flag, "1"])
    assert f"{flag} is {equivalent} here" in msg and f"python tiny_{name}.py --help" in msg
    assert "did you mean --batch_size" in one_line_error(tiny_vae.main, ["--batch-size", "4"])
    assert "did you mean --N_iters" in one_line_error(tiny_nerf.main, ["--n_iter", "4"])


@pytest.mark.parametrize("name", MODULES)
def test_gpus_without_cuda_and_an_unusable_basedir_are_one_line_errors(name, tmp_path):
    module = MODULES[name]
    if not torch.cuda.is_available():
        assert "--gpus" in one_line_error(module.main, ["--device", "cpu", "--gpus", "0,1"])
        assert "--gpus" in one_line_error(module.main, ["--gpus", "0,1"])
    (tmp_path / "file").write_text("not a folder")
    msg = one_line_error(module.main, quick(name, tmp_path) + ["--basedir", str(tmp_path / "file")])
    assert "cannot write to the run folder" in msg and str(tmp_path / "file") in msg


def test_tensorboard_missing_is_named(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    for name, module in MODULES.items():
        msg = one_line_error(module.main, quick(name, tmp_path) + ["--tensorboard"])
        assert "tensorboard" in msg and "pip install tensorboard" in msg


@pytest.mark.parametrize("name", MODULES)
def test_tensorboard_gets_the_numbers_and_a_picture(name, monkeypatch, tmp_path):
    """A stand-in for torch.utils.tensorboard records what each script sends it."""
    calls = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            calls.append(("init", logdir, purge_step))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, step))

        def add_image(self, tag, image, step, dataformats):
            assert image.dtype.name == "uint8" and len(dataformats) == image.ndim
            calls.append(("image", tag, step))

        def flush(self):
            pass
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "tensorboard" else real(n, *a))
    MODULES[name].main(quick(name, tmp_path) + ["--tensorboard"])
    assert calls[0][0] == "init" and calls[0][2] == 0
    assert {c[0] for c in calls} == {"init", "scalar", "image"}, calls
    assert any(c[1] in ("loss", "mse", "train_nelbo", "wasserstein") for c in calls if c[0] == "scalar")


@pytest.mark.parametrize("name", MODULES)
def test_a_spent_budget_says_so_and_how_to_train_on(name, tmp_path, capsys):
    argv = quick(name, tmp_path) + ["--max_minutes", "1e-9"]            # spent after the first step
    first = MODULES[name].main(argv)
    assert first["step"] == 1, first
    capsys.readouterr()
    again = MODULES[name].main(argv)                                    # the same command: nothing more to train
    assert again["step"] == 1
    assert "--max_minutes is spent: raise it to train on" in capsys.readouterr().out


def test_the_bar_under_a_budget_ends_where_the_budget_does(tmp_path):
    args = tiny_vae.parse_args(["--max_minutes", "1"])
    with tiny_vae.Run(args, str(tmp_path), 0, 10 ** 6, 0.0, "--epochs") as run:
        run.bar.start_t = time.time() - 10.0                            # 100 steps in 10 s: 10 steps/s
        run.advance(100, 10.0)
        assert 550 < run.bar.total < 650                                 # 50 s left: about 500 more steps
        run.advance(200, 59.9)
        assert run.bar.total <= 210 and not run.over(59.9) and run.over(60.0)
    args = tiny_vae.parse_args([])
    with tiny_vae.Run(args, str(tmp_path), 0, 1234, 0.0, "--epochs") as run:
        run.advance(100, 10.0)
        assert run.bar.total == 1234                                     # no budget: the step count


def test_a_checkpoint_whose_counters_have_other_shapes_is_a_one_line_error(tmp_path):
    argv = quick("nerf", tmp_path)                                      # its counters: a (4,) tensor of sums
    tiny_nerf.main(argv)
    path = tmp_path / "logs" / "nerf_procedural" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["state"]["sums"] = torch.zeros(3)                              # as tiny_nerf wrote them before issue 14
    torch.save(ckpt, path)
    assert "older version" in one_line_error(tiny_nerf.main, argv + ["--N_iters", "4"])
