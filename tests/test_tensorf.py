"""Tests of tiny_tensorf.py: the VM field against the dense tensor it factorises, upsampling, the alpha mask and
the shrunk box, the colour MLP's width, and the CLI end to end on the procedural scene, resumed across an
upsampling, and fed bad input. Run: pytest tests/"""
import json
import os
import signal
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tiny_tensorf  # noqa: E402
from helpers import one_line_error, rejects_foreign_checkpoints, stops_with_130  # noqa: E402

SMALL = ["--N_voxel_init", str(24 ** 3), "--N_voxel_final", str(40 ** 3), "--n_lamb_sigma", "8", "--n_lamb_sh", "8",
         "--featureC", "32", "--batch_size", "512", "--i_print", "5", "--video_factor", "2"]


def error_of(argv):
    return one_line_error(tiny_tensorf.main, argv)


def vertices(model, axis):
    """World coordinates of the grid vertices along an axis."""
    return model.aabb[0, axis] + torch.arange(model.reso()[axis]) * model.units()[axis]


def field(model, points):
    """Density feature (sum of all components) at world points (P, 3)."""
    return tiny_tensorf.vm_sample(model.density_planes, model.density_lines, model.normalize(points)).sum(-1)


def dense_at(model, points):
    """The same from the dense tensor: trilinear interpolation with grid_sample (corners aligned)."""
    volume = tiny_tensorf.vm_dense(model.density_planes, model.density_lines)        # (X, Y, Z)
    grid = model.normalize(points).view(1, -1, 1, 1, 3)                             # (x, y, z) -> W, H, D
    return F.grid_sample(volume.permute(2, 1, 0)[None, None], grid, align_corners=True).view(-1)


def components(planes, lines):
    """Every pair's and component's M_r(u, v) v_r(w) at the vertices, by broadcasting: (3 C, X, Y, Z)."""
    xy, xz, yz = (p.permute(2, 1, 0) for p in planes)                   # (C, X, Y), (C, X, Z), (C, Y, Z)
    z, y, x = (l_.t() for l_ in lines)                                  # the lines along z, y, x: (C, R)
    return torch.cat([xy[..., None] * z[:, None, None], xz[:, :, None] * y[:, None, :, None],
                      yz[:, None] * x[:, :, None, None]])


@pytest.fixture(scope="module")
def datadir(tmp_path_factory):
    """A data root holding the procedural scene at 32 pixels, generated once."""
    root = tmp_path_factory.mktemp("data")
    tiny_tensorf.make_procedural(str(root / "nerf_synthetic" / "procedural_32"), 32)
    return root


# ---------------------------------------------------------------- math
def test_vm_field_equals_trilinear_sampling_of_the_dense_tensor():
    torch.manual_seed(0)
    model = tiny_tensorf.TensorVM((5, 6, 7), n_lamb_sigma=3, n_lamb_sh=2)          # a tiny, non-cubic grid
    points = (torch.rand(500, 3) * 2 - 1) * 1.5
    assert torch.allclose(field(model, points), dense_at(model, points), atol=1e-5)
    # every component, and the appearance grids alike: (3 C, X, Y, Z) against vm_sample's (P, 3 C)
    full = components(model.app_planes, model.app_lines)
    grid = model.normalize(points).view(1, -1, 1, 1, 3)
    want = F.grid_sample(full.permute(0, 3, 2, 1)[None], grid, align_corners=True).view(6, -1).t()
    assert torch.allclose(tiny_tensorf.vm_sample(model.app_planes, model.app_lines, model.normalize(points)), want, atol=1e-5)
    # at a grid vertex the field is the sum over pairs and components of plane entry times line entry
    i, j, k = 2, 4, 1
    p, l_ = model.density_planes, model.density_lines
    assert torch.allclose(tiny_tensorf.vm_dense(p, l_), components(p, l_).sum(0), atol=1e-5)
    by_hand = sum(components(p, l_)[:, i, j, k])
    assert torch.allclose(field(model, torch.stack([vertices(model, a)[n] for a, n in enumerate((i, j, k))])[None]),
                          by_hand, atol=1e-5)


def smooth(model):
    """Give every plane and line smooth values (low-frequency sinusoids of the world coordinates)."""
    def fn(g, dims):
        out = torch.ones_like(g)
        for axis, d in zip(dims, (2, 3)):
            if axis < 3:
                t = vertices(model, axis).view([-1 if n == d else 1 for n in range(4)])
                out = out * torch.cos(1.3 * t + 0.4 * axis + torch.arange(g.shape[1]).view(1, -1, 1, 1))
        return out
    model.remap(fn)


def test_upsampling_keeps_the_field_up_to_interpolation_error():
    torch.manual_seed(0)
    model = tiny_tensorf.TensorVM((20, 20, 20), n_lamb_sigma=4, n_lamb_sh=4)
    model.aabb = torch.tensor([[-1.0, -1.5, -0.5], [1.0, 1.5, 0.5]])                # non-cubic: axes must not mix
    smooth(model)
    points = model.aabb[0] + torch.rand(2000, 3) * (model.aabb[1] - model.aabb[0])
    before = field(model, points)
    reso = model.upsample(40 ** 3)
    assert reso == model.reso() and reso[1] > reso[0] > reso[2]                     # cubic voxels over a 2 x 3 x 1 box
    after = field(model, points)
    # the sinusoids have |f''| <= 1.3^2 on each factor; linear interpolation errs by <= h^2/8 |f''| per factor,
    # h = 3/19 here: about 0.005 per factor. Observed: well under 0.02 in total, against a field spread of ~1.
    assert (after - before).abs().max() < 0.02 and before.std() > 0.5
    model2 = tiny_tensorf.TensorVM((20, 20, 20), n_lamb_sigma=4, n_lamb_sh=4)     # a field it must differ from
    model2.aabb = model.aabb.clone()
    assert (field(model2, points) - before).abs().max() > 0.5


def cube_density(model, half=0.5, value=20.0):
    """Density grids whose feature is `value` inside the cube |x|, |y|, |z| <= half and 0 outside (pair 0 only)."""
    def fn(g, dims):
        out = torch.zeros_like(g)
        if dims == (1, 0):                                                          # the XY plane of pair 0
            out[0, 0] = value * ((vertices(model, 1).abs() <= half)[:, None] & (vertices(model, 0).abs() <= half))
        elif dims == (2, 3):                                                        # the Z line of pair 0
            out[0, 0, :, 0] = (vertices(model, 2).abs() <= half).float()
        return out
    model.remap(fn)


def test_alpha_mask_skips_empty_space_and_the_box_shrinks_to_it(monkeypatch):
    model = tiny_tensorf.TensorVM((31, 31, 31), n_lamb_sigma=2, n_lamb_sh=2)       # vertices every 0.1
    cube_density(model)
    kept = model.update_alpha_mask()
    inside, empty = torch.tensor([[0.0, 0.0, 0.0], [0.45, -0.45, 0.3]]), torch.tensor([[1.2, 1.2, 1.2], [-1.0, 0.0, 0.0]])
    assert model.occupied(inside).all() and not model.occupied(empty).any()
    assert kept == pytest.approx(13 ** 3 / 31 ** 3)                                  # 11 vertices + 1 dilated per side
    # a ray through the cube gets density; a ray through the box past the cube evaluates no density at all
    evaluated, real = [], model.density
    monkeypatch.setattr(model, "density", lambda x: evaluated.append(len(x)) or real(x))
    rays = torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0, -1.0], [1.0, 1.0, 4.0, 0.0, 0.0, -1.0]])
    rgb, depth, acc = model.render_rays(rays[:1])
    assert acc.item() > 0.99 and evaluated[-1] > 0
    rgb, depth, acc = model.render_rays(rays[1:])
    assert evaluated[-1] == 0 and acc.item() == 0 and torch.allclose(rgb, torch.ones(1, 3))
    points = (torch.rand(300, 3) * 2 - 1) * 0.6
    before = field(model, points)
    model.shrink()
    assert torch.allclose(model.aabb, torch.tensor([[-0.6] * 3, [0.6] * 3]), atol=1e-5)
    # the same vertices: equal up to float32 rounding of the coordinates (the field changes by 200 per unit at edges)
    assert model.reso() == [13, 13, 13] and torch.allclose(field(model, points), before, atol=1e-4)


def test_frozen_grids_stay_frozen_when_the_grids_change_shape():
    model = tiny_tensorf.TensorVM((31, 31, 31), n_lamb_sigma=2, n_lamb_sh=2)
    tiny_tensorf.freeze(model, ["density_*"])
    cube_density(model)
    model.update_alpha_mask()
    model.shrink()
    assert model.upsample(20 ** 3) == model.reso() == [20, 20, 20]                 # new tensors, new parameters
    assert not any(p.requires_grad for p in [*model.density_planes, *model.density_lines])
    assert all(p.requires_grad for p in [*model.app_planes, *model.app_lines, *model.mlp.parameters()])


def test_colour_mlp_is_150_wide_in_the_reference_configuration():
    model = tiny_tensorf.TensorVM((8, 8, 8))
    assert model.mlp[0].in_features == 150 and model.basis_mat.weight.shape == (27, 144)
    assert [p.shape[-1] for p in model.density_planes] == [16] * 3 and [p.shape[-1] for p in model.app_lines] == [48] * 3
    x = torch.rand(10, 3) * 2 - 1
    assert model.color(x, F.normalize(torch.randn(10, 3), dim=-1)).shape == (10, 3)


# ---------------------------------------------------------------- command line
def test_cli_learns_procedural_scene_and_writes_every_output(datadir, tmp_path, capsys):
    argv = ["--scene", "procedural", "--proc_size", "32", "--datadir", str(datadir), "--basedir", str(tmp_path),
            "--N_iters", "150", "--upsamp_list", "40", "80", "--update_AlphaMask_list", "60", "100", *SMALL]
    final = tiny_tensorf.main(argv)
    expdir = tmp_path / "tensorf_procedural"
    data = tiny_tensorf.load_blender(str(datadir / "nerf_synthetic" / "procedural_32"))
    mean_colour = data["images"].mean((0, 1, 2))                                    # the best constant image
    baseline = -10 * torch.log10(((data["test_images"] - mean_colour) ** 2).mean()).item()
    # the constant scores about 10 dB on this scene; 150 steps of 512 rays (10 s) reached 23.9 dB here, and 20 dB
    # needs the objects' shapes and colours in place
    assert baseline < 12 and final["psnr"] > 20, (baseline, final["psnr"])
    for name in ["args.json", "ckpt.pt", "metrics.jsonl", "testset_150/metrics.json", "testset_150/r_0.png",
                 "testset_150/r_7.png"]:
        assert (expdir / name).exists(), name
    assert (expdir / "video_150.gif").exists() or (expdir / "video_150.mp4").exists()
    rows = [json.loads(line) for line in open(expdir / "metrics.jsonl")]
    reso = {r["step"]: r["reso"] for r in rows if "reso" in r}
    assert reso[35] == [24] * 3 and reso[75] == [31] * 3 and 31 < max(reso[150]) <= 40   # 24^3 -> 31^3 -> 40^3
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("test PSNR ")


def test_resume_across_an_upsampling_continues_the_same_run(datadir, tmp_path, monkeypatch, capsys):
    argv = ["--scene", "procedural", "--proc_size", "32", "--datadir", str(datadir), "--render_factor", "4",
            "--N_iters", "8", "--upsamp_list", "4", "6", "--update_AlphaMask_list", "5", *SMALL]
    straight = tiny_tensorf.main(argv + ["--basedir", str(tmp_path / "a")])
    real, calls = tiny_tensorf.train_step, []

    def ctrl_c_at_third_step(*a, **k):                                              # Ctrl-C during step 3
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)
    monkeypatch.setattr(tiny_tensorf, "train_step", ctrl_c_at_third_step)
    stops_with_130(tiny_tensorf.main, argv + ["--basedir", str(tmp_path / "b")], capsys, 3)
    monkeypatch.setattr(tiny_tensorf, "train_step", real)
    resumed = tiny_tensorf.main(argv + ["--basedir", str(tmp_path / "b")])
    a, b = (torch.load(tmp_path / d / "tensorf_procedural" / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["step"] == b["step"] == 8 and a["state"]["lr_reset"] == b["state"]["lr_reset"] > 0
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:                                                          # grids, box, mask: same run
        assert torch.allclose(a["model"][key].float(), b["model"][key].float(), atol=1e-6), key
    opt_a, opt_b = a["optimizers"]["adam"], b["optimizers"]["adam"]
    assert [g["lr"] for g in opt_a["param_groups"]] == [g["lr"] for g in opt_b["param_groups"]]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    assert resumed["psnr"] == pytest.approx(straight["psnr"], abs=1e-4)


# ---------------------------------------------------------------- bad input
@pytest.fixture
def broken(datadir, tmp_path):
    """A copy of the procedural scene to damage, and the argv that trains on it."""
    import shutil
    shutil.copytree(datadir / "nerf_synthetic" / "procedural_32", tmp_path / "nerf_synthetic" / "procedural_32")
    return tmp_path, ["--scene", "procedural", "--proc_size", "32", "--datadir", str(tmp_path), "--basedir",
                      str(tmp_path / "logs"), "--N_iters", "2", "--render_factor", "4", *SMALL]


def test_missing_transforms_file_and_image(broken):
    root, argv = broken
    scene = root / "nerf_synthetic" / "procedural_32"
    os.remove(scene / "train" / "r_3.png")
    assert "missing image" in error_of(argv) and "r_3.png" in error_of(argv)
    os.remove(scene / "transforms_train.json")
    assert "missing transforms file" in error_of(argv)


@pytest.mark.parametrize("flags,words", [
    (["--upsamp_list", "30", "20"], "--upsamp_list"),
    (["--N_voxel_final", "1000"], "--N_voxel_final"),
    (["--batch_size", "0"], "--batch_size"),
    (["--step_ratio", "-1"], "--step_ratio"),
    (["--scene", "../etc"], "--scene"),
    (["--freeze", "nothing*"], "--freeze"),
])
def test_bad_flags_are_one_line_errors(broken, flags, words):
    assert words in error_of(broken[1] + flags)


def test_bad_checkpoints_and_nan_leave_existing_files_intact(broken, monkeypatch):
    root, argv = broken
    tiny_tensorf.main(argv)
    ckpt = root / "logs" / "tensorf_procedural" / "ckpt.pt"
    saved = ckpt.read_bytes()
    rejects_foreign_checkpoints(error_of, argv, str(root), "tiny_tensorf")
    assert "n_lamb_sigma" in error_of(argv + ["--n_lamb_sigma", "4", "--N_iters", "4"])  # another model
    monkeypatch.setattr(tiny_tensorf.TensorVM, "density_l1", lambda self: torch.tensor(float("nan")))
    assert "nan" in error_of(argv + ["--N_iters", "4"])
    assert ckpt.read_bytes() == saved
