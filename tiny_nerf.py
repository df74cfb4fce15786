"""tiny_nerf.py: neural radiance fields in one file. Mildenhall et al., "NeRF: Representing Scenes as Neural Radiance
Fields for View Synthesis", ECCV 2020 (arXiv:2003.08934), with the reference code's Blender defaults: an MLP maps ray
points and directions to density and colour for volume rendering (eq. 3); a fine MLP resamples by the coarse weights.

    python tiny_nerf.py --scene lego                     # downloads nerf_synthetic into data/ if missing
    python tiny_nerf.py --datadir ../shared/data --preset cpu --max_minutes 15 --testskip 50
    python tiny_nerf.py --scene procedural               # a scene generated here: no network needed
    python tiny_nerf.py --preset cpu --render_only       # test views and video from logs/nerf_lego_cpu/ckpt.pt
Sections: arguments, model, rendering, training, evaluation & outputs, data, harness (the same in the four scripts),
main. Outputs in logs/<expname>/: args.json, ckpt.pt, metrics.jsonl, testset_<step>/, video_<step>.mp4, final.json."""
import argparse
import difflib
import fnmatch
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
import zipfile

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

SCRIPT = "tiny_nerf"
NEAR, FAR = 2.0, 6.0  # the depth range of every Blender scene (reference code)


# ---------------------------------------------------------------- arguments
# --preset: applied before the flags given on the command line, which win; cpu: tuned on lego (benchmarks/)
PRESETS = {"cpu": dict(N_samples=32, N_importance=32, netwidth=128, netwidth_fine=128, N_rand=512, amp="auto",
                       video_factor=4, use_batching=True, lrate=3e-3, lrate_decay=8, precrop_iters=100)}
ALIASES = {"--no_batching": "--no-use_batching", "--render_test": "--render_only", "--ft_path": "--ckpt",
           "--i_img": "--i_print", "--dataset_type": "read from the folder (--datadir, --scene)",
           "--config": "not read yet: give the flags", "--no_cuda": "--device cpu"}


def get_parser():
    p = Parser(description="NeRF in one file.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pint, nint, nfloat = positive(int), positive(int, zero=True), positive(float, zero=True)
    flag = argparse.BooleanOptionalAction                               # --flag / --no-flag
    g = p.add_argument_group("data")
    g.add_argument("--scene", default="lego", help="<datadir>/nerf_synthetic/<scene>, or procedural: generated here")
    g.add_argument("--datadir", default="data", help="data root holding nerf_synthetic/")
    g.add_argument("--data_url", default=None, help="URL of nerf_synthetic.zip (default: the NeRF authors' copy)")
    g.add_argument("--half_res", action="store_true", help="halve the images (area filter) and the focal length")
    g.add_argument("--white_bkgd", action=flag, default=True, help="composite images and renderings on white")
    g.add_argument("--testskip", type=pint, default=1, help="use every N-th test view")
    g.add_argument("--proc_size", type=pint, default=100, help="image size of the procedural scene")
    g = p.add_argument_group("model and rendering")
    g.add_argument("--netdepth", type=pint, default=8, help="layers of the coarse MLP")
    g.add_argument("--netwidth", type=pint, default=256, help="units per layer of the coarse MLP")
    g.add_argument("--netdepth_fine", type=pint, default=8, help="layers of the fine MLP")
    g.add_argument("--netwidth_fine", type=pint, default=256, help="units per layer of the fine MLP")
    g.add_argument("--multires", type=nint, default=10, help="L, frequencies encoding a position")
    g.add_argument("--multires_views", type=nint, default=4, help="L, frequencies encoding a view direction")
    g.add_argument("--use_viewdirs", action=flag, default=True, help="colour depends on the view direction")
    g.add_argument("--N_samples", type=pint, default=64, help="stratified samples per ray (coarse MLP)")
    g.add_argument("--N_importance", type=nint, default=128, help="more samples per ray for the fine MLP (0: none)")
    g.add_argument("--perturb", type=nfloat, default=1.0, help="jitter the samples in training if > 0 (on/off)")
    g.add_argument("--lindisp", action="store_true", help="sample linearly in disparity rather than depth")
    g.add_argument("--raw_noise_std", type=nfloat, default=0.0, help="std of noise added to the density in training")
    g.add_argument("--chunk", type=pint, default=1024 * 32, help="rays rendered at once")
    g.add_argument("--netchunk", type=pint, default=None, help="points per MLP call (default: GPU 65536, CPU 4096)")
    g.add_argument("--amp", action=flag, default=False, help="bfloat16 MLPs (AVX512-BF16/AMX CPUs, Ampere+ GPUs)")
    g = p.add_argument_group("training")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS), help=f"defaults under the given flags: {PRESETS}")
    g.add_argument("--N_iters", type=pint, default=200000, help="training steps")
    g.add_argument("--N_rand", type=pint, default=1024, help="rays per step (split over --gpus)")
    g.add_argument("--lrate", type=positive(float), default=5e-4, help="Adam learning rate at step 0")
    g.add_argument("--lrate_decay", type=positive(float), default=500, help="lrate falls tenfold per N thousand steps")
    g.add_argument("--precrop_iters", type=nint, default=500, help="first steps drawing rays from the image centre")
    g.add_argument("--precrop_frac", type=float, default=0.5, help="size of that centre crop")
    g.add_argument("--use_batching", action=flag, default=False, help="draw a step's rays from all images, not one")
    g.add_argument("--max_minutes", type=positive(float), default=None, help="training budget, then outputs as usual")
    g.add_argument("--freeze", nargs="+", default=[], metavar="PATTERN", help="freeze parameters by name: 'coarse.*'")
    g = p.add_argument_group("evaluation and outputs")
    g.add_argument("--i_print", type=pint, default=100, help="steps between log lines")
    g.add_argument("--i_weights", type=pint, default=10000, help="steps between checkpoints")
    g.add_argument("--i_testset", type=pint, default=50000, help="steps between test-set renderings")
    g.add_argument("--i_video", type=pint, default=50000, help="steps between turntable videos")
    g.add_argument("--render_factor", type=nint, default=0, help="render test views downsampled by this factor")
    g.add_argument("--video_factor", type=nint, default=0, help="downsample the video by this (0: --render_factor)")
    g.add_argument("--render_only", action="store_true", help="render test views and video of the checkpoint, exit")
    g.add_argument("--tensorboard", action="store_true", help="log to TensorBoard too (pip install tensorboard)")
    g = p.add_argument_group("run")
    g.add_argument("--basedir", default="logs", help="where experiment folders go")
    g.add_argument("--expname", default=None, help="experiment folder (default: nerf_<scene>[_<preset>])")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--gpus", default=None, help="comma-separated GPU ids for DataParallel (default: --device only)")
    g.add_argument("--no_reload", action="store_true", help="start afresh instead of resuming ckpt.pt")
    g.add_argument("--ckpt", default=None, help="checkpoint to load instead of logs/<expname>/ckpt.pt")
    return p


def preset_defaults(args):
    return PRESETS[args.preset] if args.preset else {}


def check_args(args):
    if not 0 < args.precrop_frac <= 1:
        fail(f"must be in (0, 1], got {args.precrop_frac}", "--precrop_frac", "e.g. --precrop_frac 0.5")
    if args.scene != os.path.basename(args.scene) or args.scene in ("", ".", ".."):
        fail(f"not a scene name: {args.scene!r}", "--scene", "name a folder of <datadir>/nerf_synthetic")
    args.expname = args.expname or f"nerf_{args.scene}" + (f"_{args.preset}" if args.preset else "")
    return args


# ---------------------------------------------------------------- model
def positional_encoding(x, L):
    """gamma(p) = (p, sin(2^0 p), cos(2^0 p), ..., sin(2^(L-1) p), cos(2^(L-1) p))  (NeRF eq. 4, keeping p and
    without the paper's factor pi, as the reference code does). x (..., 3) -> (..., 3 + 6 L)."""
    xf = x[..., None, :] * 2.0 ** torch.arange(L, device=x.device, dtype=x.dtype)[:, None]  # (..., L, 3)
    return torch.cat([x, torch.stack([xf.sin(), xf.cos()], -2).flatten(-3)], -1)


class MLP(nn.Module):
    """The NeRF MLP (paper fig. 7; the reference code's layout and names): gamma(x) through `depth` ReLU layers, fed
    again after layer `skip`; density from the last one; a feature + gamma(d) -> width/2 -> rgb (else rgb directly)."""

    def __init__(self, depth, width, in_pts, in_views, use_viewdirs, skip=4):
        super().__init__()
        self.skip, self.use_viewdirs = skip, use_viewdirs
        self.pts_linears = nn.ModuleList([nn.Linear(in_pts, width)] + [
            nn.Linear(width + (in_pts if k == skip + 1 else 0), width) for k in range(1, depth)])
        if use_viewdirs:
            self.alpha_linear, self.feature_linear = nn.Linear(width, 1), nn.Linear(width, width)
            self.views_linears = nn.ModuleList([nn.Linear(width + in_views, width // 2)])
            self.rgb_linear = nn.Linear(width // 2, 3)
        else:
            self.output_linear = nn.Linear(width, 4)
        # a thin fog to start from: sigma = softplus(-2.25) = 0.1 where the features are 0
        nn.init.constant_(self.alpha_linear.bias if use_viewdirs else self.output_linear.bias[3:], -2.25)

    def forward(self, x, d):
        """x (P, in_pts) encoded points, d (P, in_views) encoded directions -> raw (P, 4): rgb logits, density."""
        h = x
        for k, layer in enumerate(self.pts_linears):
            h = F.relu(layer(torch.cat([x, h], -1) if k == self.skip + 1 else h), inplace=True)
        if not self.use_viewdirs:
            return self.output_linear(h)
        sigma = self.alpha_linear(h)                                    # density does not depend on the view
        h = F.relu(self.views_linears[0](torch.cat([self.feature_linear(h), d], -1)), inplace=True)  # (P, width / 2)
        return torch.cat([self.rgb_linear(h), sigma], -1)


RENDER_OPTIONS = ("N_samples", "N_importance", "lindisp", "raw_noise_std", "white_bkgd", "netchunk", "amp")


class NeRF(nn.Module):
    """Coarse and fine MLPs and their rendering. forward(rays, target, u): this replica's summed squared errors, one per
    network, for DataParallel to gather; forward(rays): rendered maps. config: saved; RENDER_OPTIONS: set by callers."""

    def __init__(self, netdepth=8, netwidth=256, netdepth_fine=8, netwidth_fine=256, multires=10, multires_views=4,
                 use_viewdirs=True, fine=True):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}  # the arguments
        self.multires, self.multires_views = multires, multires_views
        in_pts, in_views = 3 + 6 * multires, (3 + 6 * multires_views) * use_viewdirs  # 63 and 27 by default
        self.coarse = MLP(netdepth, netwidth, in_pts, in_views, use_viewdirs)
        self.fine = MLP(netdepth_fine, netwidth_fine, in_pts, in_views, use_viewdirs) if fine else None
        self.N_samples, self.N_importance, self.lindisp, self.raw_noise_std = 64, 128, False, 0.0
        self.white_bkgd, self.netchunk, self.amp = True, 1024 * 64, False

    def query(self, mlp, pts, viewdirs):
        """pts (N, S, 3), viewdirs (N, 3) -> raw (N, S, 4) in float32; netchunk points at a time, bfloat16 with amp."""
        p, v = pts.reshape(-1, 3), viewdirs[:, None].expand(pts.shape).reshape(-1, 3)
        with torch.autocast("cuda" if pts.is_cuda else "cpu", dtype=torch.bfloat16, enabled=self.amp):
            raw = [mlp(positional_encoding(a, self.multires), positional_encoding(b, self.multires_views))
                   for a, b in zip(p.split(self.netchunk), v.split(self.netchunk))]
        return torch.cat(raw).float().view(*pts.shape[:-1], 4)

    def forward(self, rays, target=None, u=None):
        """rays (N, 6), target (N, 3) or None, u (N, N_samples + N_importance) or None (deterministic) -> (1, nets + 1):
        summed squared errors (fine first), the last net's summed opacity; no target: (N, 6) rgb, depth, disp, acc"""
        outs = render_rays(self, rays, u, self.raw_noise_std if target is not None else 0.0)
        if target is not None:
            return torch.stack([((out[0] - target) ** 2).sum() for out in outs[::-1]] + [outs[-1][3].sum()])[None]
        return torch.cat([outs[-1][0], torch.stack(outs[-1][1:4], -1)], -1)  # rgb, then depth, disparity, opacity


# ---------------------------------------------------------------- rendering
def raw2outputs(raw, z, rays_d, raw_noise_std=0.0, white_bkgd=False):
    """Volume rendering (NeRF eq. 3) of raw MLP outputs (N, S, 4) at sorted depths z (N, S) along rays_d (N, 3).
    -> rgb (N, 3), depth (N,), disparity (N,), accumulated opacity (N,), weights (N, S)."""
    # the last interval: to FAR on a white background, which lies beyond; else infinite, the last sample opaque (the
    # reference's 1e10, which on white makes any density there paint the background: it learns to kill all density)
    end = torch.full_like(z[:, :1], FAR if white_bkgd else 1e10)
    delta = (torch.cat([z[:, 1:], end], -1) - z) * rays_d.norm(dim=-1, keepdim=True)  # delta_i = (t_{i+1} - t_i) |d|
    noise = torch.randn_like(z) * raw_noise_std if raw_noise_std > 0 else 0.0  # a regulariser (reference code)
    # sigma = softplus(raw), not the reference's ReLU: a network whose raw density falls below 0 everywhere (early, on
    # a small object on white) renders the empty scene and behind a ReLU never gets a gradient again; softplus has one
    sigma = F.softplus(raw[..., 3] + noise)                             # sigma > 0
    alpha = 1 - torch.exp(-sigma * delta)                               # alpha_i = 1 - exp(-sigma_i delta_i)
    T = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], -1), -1)  # prod_{j<i}(1 - a_j)
    weights = alpha * T[:, :-1]                                         # w_i = T_i alpha_i   (N, S)
    rgb = (weights[..., None] * torch.sigmoid(raw[..., :3])).sum(1)     # C = sum_i w_i c_i   (eq. 3)
    depth, acc = (weights * z).sum(1), weights.sum(1)                   # sum_i w_i t_i, sum_i w_i <= 1
    disp = 1 / torch.clamp(depth / acc.clamp(min=1e-10), min=1e-10)     # inverse of the expected depth of the hit
    rgb = rgb + (1 - acc[:, None]) * float(white_bkgd)                  # what the ray does not hit: white or black
    return rgb, depth, disp, acc, weights


def sample_pdf(bins, weights, n, u=None):
    """n samples per ray by inverse transform sampling (sec. 5.2) of the piecewise-constant pdf on edges bins (N, B + 1)
    and weights (N, B); u (N, n) uniforms, or None: (i + 0.5) / n (the reference's linspace hits edges). -> (N, n)"""
    w = weights + 1e-5                                                  # no empty pdf (reference code)
    cdf = F.pad(torch.cumsum(w / w.sum(-1, keepdim=True), -1), (1, 0))  # (N, B + 1), 0 ... 1
    u = ((torch.arange(n, device=bins.device) + 0.5) / n).expand(len(bins), n) if u is None else u  # quantiles
    idx = torch.searchsorted(cdf, u.contiguous(), right=True)           # cdf[idx - 1] <= u < cdf[idx]
    lo, hi = (idx - 1).clamp(min=0), idx.clamp(max=cdf.shape[-1] - 1)
    c0, c1, b0, b1 = cdf.gather(-1, lo), cdf.gather(-1, hi), bins.gather(-1, lo), bins.gather(-1, hi)
    denom = torch.where(c1 - c0 < 1e-5, torch.ones_like(c0), c1 - c0)
    return b0 + (u - c0) / denom * (b1 - b0)                            # invert the CDF's linear piece


def render_rays(nerf, rays, u=None, raw_noise_std=0.0):
    """Hierarchical sampling (sec. 5.2) of rays (N, 6), u (N, N_samples + N_importance) or None -> [coarse, fine]."""
    o, d, S = rays[:, :3], rays[:, 3:6], nerf.N_samples
    t = torch.linspace(0, 1, S, device=rays.device).expand(len(rays), S)
    z = 1 / (1 / NEAR * (1 - t) + 1 / FAR * t) if nerf.lindisp else NEAR * (1 - t) + FAR * t  # (N, S)
    if u is not None:  # one uniform depth per bin (eq. 2); bins between midpoints, as in the reference code
        mids = 0.5 * (z[:, 1:] + z[:, :-1])
        lower, upper = torch.cat([z[:, :1], mids], -1), torch.cat([mids, z[:, -1:]], -1)
        z = lower + (upper - lower) * u[:, :S]

    def shade(mlp, z):                                                  # r(t) = o + t d at depths z: (N, S, 3)
        raw = nerf.query(mlp, o[:, None] + d[:, None] * z[..., None], d / d.norm(dim=-1, keepdim=True))
        return raw2outputs(raw, z, d, raw_noise_std, nerf.white_bkgd)
    outs = [shade(nerf.coarse, z)]
    if nerf.fine is not None and nerf.N_importance > 0:  # more depths where the coarse weights are, all sorted
        extra = sample_pdf(0.5 * (z[:, 1:] + z[:, :-1]), outs[0][4][:, 1:-1], nerf.N_importance,
                           None if u is None else u[:, S:])
        outs.append(shade(nerf.fine, torch.sort(torch.cat([z, extra.detach()], -1), -1).values))
    return outs


# ---------------------------------------------------------------- training
def train_step(model, opt, rays, target, u):
    """One Adam step on rays (N, 6), colours (N, 3), u as in NeRF.forward -> MSE per network (fine first), opacity."""
    out = model(rays, target, u).sum(0)                                 # sum over replicas
    mse = out[:-1] / target.numel()                                     # / global count
    loss = mse.sum()                                                    # MSE(fine) + MSE(coarse)   (eq. 6)
    if not torch.isfinite(loss):
        fail(f"the loss became {loss.item()}", "--lrate", "lower it; ckpt.pt still holds the last good state")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return torch.cat([mse, out[-1:] / len(target)]).detach()


# ---------------------------------------------------------------- evaluation & outputs
def mse2psnr(mse):
    return -10 * math.log10(max(float(mse), 1e-10))                    # PSNR = -10 log10(MSE), colours in [0, 1]


def ssim(a, b):
    """SSIM (Wang et al. 2004) of (H, W, 3) images in [0, 1]: an 11x11 Gaussian window (sigma 1.5), valid pixels."""
    k = min(11, *a.shape[:2])                                           # smaller for images under 11 pixels
    g = torch.exp(-(torch.arange(k, dtype=torch.float64) - (k - 1) / 2) ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None]).div(g.sum() ** 2).expand(3, 1, k, k)
    x, y = (im.permute(2, 0, 1)[None].double() for im in (a, b))
    mx, my, xx, yy, xy = (F.conv2d(v, window, groups=3) for v in (x, y, x * x, y * y, x * y))
    sxx, syy, sxy = xx - mx ** 2, yy - my ** 2, xy - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return (((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))).mean().item()


@torch.no_grad()
def render_image(model, H, W, focal, c2w, chunk, device):  # one view -> (H, W, 6) on the CPU: rgb, depth, disp, opacity
    rays = torch.cat(get_rays(H, W, focal, c2w), -1).view(-1, 6)
    return torch.cat([model(r.to(device)).cpu() for r in rays.split(chunk)]).view(H, W, 6)


def render_testset(model, data, args, folder, step, device, run=None):  # -> folder/<stem>.png, metrics.json; run.log
    f = args.render_factor or 1
    H, W, focal = data["H"] // f, data["W"] // f, data["focal"] / f
    os.makedirs(folder, exist_ok=True)
    views = {}
    for name, gt, c2w in tqdm(list(zip(data["test_names"], data["test_images"], data["test_poses"])), "test views"):
        rgb = render_image(model, H, W, focal, c2w, args.chunk, device)[..., :3].clamp(0, 1)
        gt = area_resize(gt, H, W) if f > 1 else gt
        views[name] = {"psnr": mse2psnr(((rgb - gt) ** 2).mean()), "ssim": ssim(rgb, gt)}
        save_png(os.path.join(folder, f"{name}.png"), to_uint8(rgb))
    mean = {key: float(np.mean([v[key] for v in views.values()])) for key in ("psnr", "ssim")}
    result = {"step": step, **mean, "views": len(views), "size": [H, W], "per_view": views}
    write_text(os.path.join(folder, "metrics.json"), json.dumps(result, indent=1))
    if run:
        run.log({"step": step, "test_psnr": mean["psnr"], "test_ssim": mean["ssim"]},
                os.path.join(folder, data["test_names"][0] + ".png"))    # TensorBoard: the first test view
    return result


def render_video(model, data, args, path, device, frames=40):  # a turntable -> path.mp4 (.gif: no video writer)
    f = args.video_factor or args.render_factor or 1
    H, W, focal = data["H"] // f // 2 * 2, data["W"] // f // 2 * 2, data["focal"] / f  # even sizes for H.264
    radius = data["poses"][:, :3, 3].norm(dim=-1).median().item()
    out = torch.stack([render_image(model, H, W, focal, orbit_pose(azimuth, 30, radius), args.chunk, device)
                       for azimuth in tqdm(np.arange(frames) * 360 / frames, desc="video", leave=False)])
    disp = out[..., 4:5] * out[..., 5:6]                                # empty space black
    video = to_uint8(torch.cat([out[..., :3], (disp / disp.max().clamp(min=1e-10)).expand_as(out[..., :3])], 2))
    mp4 = importlib.util.find_spec("imageio_ffmpeg") or importlib.util.find_spec("av")  # imageio's video writers
    path, opts = (path + ".mp4", dict(fps=30, codec="libx264")) if mp4 else (path + ".gif", dict(duration=33, loop=0))
    atomic(path, lambda p: iio.imwrite(p, video, **opts))                # 30 frames per second either way
    return path


def finish(model, data, args, outdir, step, seconds, device, run=None):  # test views, video, final.json, summary
    f, g = args.render_factor or 1, args.video_factor or args.render_factor or 1
    rays, tic = (len(data["test_images"]) / f ** 2 + 40 / g ** 2) * data["H"] * data["W"], time.time()
    render_image(model, 1, 1024, data["focal"], data["test_poses"][0], args.chunk, device)   # 1024 rays, timed
    print(f"rendering the test views and a video, {rays:,.0f} rays: about {(time.time() - tic) * rays / 1024:.0f} s")
    test = render_testset(model, data, args, os.path.join(outdir, f"testset_{step}"), step, device, run)
    video = render_video(model, data, args, os.path.join(outdir, f"video_{step}"), device)
    final = {**{k: v for k, v in test.items() if k != "per_view"}, "train_seconds": round(seconds, 2), "video": video}
    write_text(os.path.join(outdir, "final.json"), json.dumps(final, indent=1))
    print(f"wrote {os.path.join(outdir, f'testset_{step}')}/ and {video}")
    print(f"test PSNR {test['psnr']:.2f} dB, SSIM {test['ssim']:.3f} over {test['views']} views")
    return final


def render_only(args, data, device, gpus, expdir, model_class):  # outputs of a checkpoint in render_only_<step>/
    ckpt = load_checkpoint(args.ckpt or os.path.join(expdir, "ckpt.pt"))
    raw = model_class(**ckpt["model_args"]).to(device)
    raw.load_state_dict(ckpt["model"])
    for key in RENDER_OPTIONS:
        setattr(raw, key, getattr(args, key))
    model = nn.DataParallel(raw, device_ids=gpus) if len(gpus) > 1 else raw
    return finish(model, data, args, os.path.join(expdir, f"render_only_{ckpt['step']}"), ckpt["step"], 0.0, device)


# ---------------------------------------------------------------- data
SYNTHETIC = ("chair", "drums", "ficus", "hotdog", "lego", "materials", "mic", "ship")
SYNTHETIC_PAGE = "https://drive.google.com/drive/folders/128yBriW1IG_3NJ5Rp7APSTZsJqdJdfc1"  # linked from the NeRF site
SYNTHETIC_URL = ("https://drive.usercontent.google.com/download?id=18JxhpWD-4ZmuFKLzKlAw-w5PpzZxXOcG"
                 "&export=download&confirm=t")


def fetch_synthetic(datadir, url):  # nerf_synthetic.zip (no checksum is published) -> datadir/nerf_synthetic/<scene>
    target, zip_path, tmp = (os.path.join(datadir, "nerf_synthetic" + ext) for ext in ("", ".zip", ".tmp"))
    try:
        os.makedirs(datadir, exist_ok=True)
        if not os.path.exists(zip_path):
            download(url, zip_path)
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(zip_path) as z:                            # it drops "/" and "..": all stays in tmp
            z.extractall(tmp, [m for m in z.infolist() if m.filename.startswith("nerf_synthetic/")])
        scenes = os.listdir(os.path.join(tmp, "nerf_synthetic"))
    except (zipfile.BadZipFile, FileNotFoundError):
        fail("not a zip of a nerf_synthetic/ folder", zip_path, f"delete it and download it again ({SYNTHETIC_PAGE})")
    except Exception as e:  # OSError, HTTP errors
        fail(f"cannot download {url} ({e})", target, f"no network? get nerf_synthetic.zip from {SYNTHETIC_PAGE} and "
             f"unzip it into {datadir}, or train on a scene made here: --scene procedural")
    for scene in scenes:                                                # each scene by one rename, once complete
        if not os.path.exists(os.path.join(target, scene)):
            os.renames(os.path.join(tmp, "nerf_synthetic", scene), os.path.join(target, scene))
    shutil.rmtree(tmp)
    os.remove(zip_path)


def composite(rgba, white):
    """RGBA (..., 4) straight alpha -> RGB (..., 3) over a white or black background: C = a c + (1 - a) bg."""
    return rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:]) * float(white)


def area_resize(image, h, w):  # (H, W, C) -> (h, w, C), averaging pixel areas (the reference's cv2.INTER_AREA)
    return F.interpolate(image.permute(2, 0, 1)[None], size=(h, w), mode="area")[0].permute(1, 2, 0)


def read_rgba(path, half_res):  # a PNG -> float RGBA (H, W, 4) in [0, 1]; RGB gets alpha 1
    try:
        a = np.asarray(iio.imread(path))
    except Exception as e:                                              # imageio raises many types for a broken file
        fail("missing image" if isinstance(e, FileNotFoundError) else f"cannot read image ({type(e).__name__})", path,
             "replace the file, download the scene again, or fix file_path in its transforms file")
    if a.ndim != 3 or a.shape[-1] not in (3, 4) or a.dtype.kind != "u":
        fail(f"expected an 8- or 16-bit RGB(A) image, got {a.dtype} {a.shape}", path, "replace the file")
    x = F.pad(torch.from_numpy(a.astype(np.float32) / np.iinfo(a.dtype).max), (0, 4 - a.shape[-1]), value=1.0)
    return area_resize(x, x.shape[0] // 2, x.shape[1] // 2) if half_res else x


# A scene in the NeRF synthetic data's Blender format: transforms_{train,test}.json hold camera_angle_x and, per frame,
# a file_path (PNG, extension omitted) and a camera-to-world transform_matrix (OpenGL: looks down -z, +y up).
def load_blender(folder, half_res=False, white_bkgd=True, testskip=1):
    # -> dict: images (N, H, W, 3), poses (N, 4, 4), test_images, test_poses, test_names (file stems), H, W, focal
    data, shape = {}, None
    for name, split, skip in (("train", "", 1), ("test", "test_", testskip)):
        path = os.path.join(folder, f"transforms_{name}.json")
        try:                                                            # every number read is checked here
            meta = json.loads(pathlib.Path(path).read_text())
            frames, angle = meta["frames"][::skip], float(meta["camera_angle_x"])
            poses = torch.tensor([f["transform_matrix"] for f in frames], dtype=torch.float32)
            if not frames or poses.shape[1:] != (4, 4) or not poses.isfinite().all() or not 0 < angle < math.pi:
                raise ValueError("needs frames with a finite 4x4 transform_matrix, and 0 < camera_angle_x < pi")
            files = [os.path.normpath(os.path.join(folder, f["file_path"].removesuffix(".png") + ".png"))
                     for f in frames]                                   # Blender omits the extension
        except FileNotFoundError:
            fail("missing transforms file", path, "download the scene again, or check --datadir and --scene")
        except (ValueError, KeyError, TypeError) as e:
            fail(f"not a usable Blender transforms file ({type(e).__name__}: {e})", path, "fix or replace the file")
        images = [composite(read_rgba(f, half_res), white_bkgd) for f in tqdm(files, f"{name} images", leave=False)]
        shape = shape or images[0].shape                                # the first training image's
        for file, image in zip(files, images):
            if image.shape != shape:
                fail(f"image of {tuple(image.shape[:2])} among images of {tuple(shape[:2])}", file, "use one size")
        data[split + "images"], data[split + "poses"], data[split + "angle"] = torch.stack(images), poses, angle
    data["test_names"], (data["H"], data["W"]) = [os.path.basename(f).removesuffix(".png") for f in files], shape[:2]
    data["focal"] = 0.5 * data["W"] / math.tan(0.5 * data["angle"])    # from the field of view and the actual width
    return data


def get_rays(H, W, focal, c2w, ys=None, xs=None):
    """Rays through the centres of all H x W pixels, or of pixels (ys, xs) of any shape S with c2w (4, 4) or (*S, 4, 4).
    -> origins, directions (H, W, 3) or (*S, 3), world frame. Pixel (y, x) looks along ((x + 0.5 - W/2) / f,
    -(y + 0.5 - H/2) / f, -1) in the camera frame (the reference code omits the 0.5; Blender renders centres)."""
    if ys is None:
        ys, xs = torch.meshgrid(torch.arange(H, device=c2w.device), torch.arange(W, device=c2w.device), indexing="ij")
    dirs = torch.stack([(xs + 0.5 - 0.5 * W) / focal, -(ys + 0.5 - 0.5 * H) / focal, -torch.ones_like(xs)], -1).float()
    rays_d = (c2w[..., :3, :3] @ dirs[..., None])[..., 0]            # d = R d_cam
    return c2w[..., :3, 3].expand(rays_d.shape), rays_d              # o = camera centre


def orbit_pose(azimuth, elevation, radius):  # camera-to-world (4, 4) at azimuth, elevation (degrees) and radius, +z up
    a, e = math.radians(float(azimuth)), math.radians(float(elevation))
    back = torch.tensor([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])  # camera +z
    right = F.normalize(torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0]), back), dim=0)
    columns = torch.stack([right, torch.linalg.cross(back, right), back, radius * back], 1)  # right, up, back, centre
    return torch.cat([columns, torch.tensor([[0.0, 0.0, 0.0, 1.0]])])


ELLIPSOIDS = [  # centre, radius (or radii), colour (None: checkered grey), highlight; the floor is a flat disc
    ((0.45, -0.4, 0.0), 0.45, (0.9, 0.2, 0.15), 0.6), ((-0.5, 0.45, -0.1), 0.35, (0.2, 0.7, 0.3), 0.6),
    ((0.45, 0.6, -0.25), 0.2, (0.95, 0.8, 0.2), 0.6), ((-0.55, -0.45, -0.1), 0.35, (0.25, 0.4, 0.9), 0.0),
    ((0.0, 0.0, -0.5), (1.3, 1.3, 0.05), None, 0.0)]


def ray_cast(o, d):  # unit rays (..., 3) -> RGBA (..., 4) of the nearest hit: Lambert, Blinn-Phong; alpha 0 on a miss
    light = F.normalize(torch.tensor([0.4, 0.3, 0.87]), dim=0)
    half = F.normalize(light - d, dim=-1)                               # halfway between the light and the viewer
    best, rgb = torch.full(o.shape[:-1], math.inf), torch.zeros_like(o)
    for centre, radii, colour, shine in ELLIPSOIDS:
        r = torch.tensor(radii)
        q, v = (o - torch.tensor(centre)) / r, d / r                    # scaled to the unit sphere: |q + t v| = 1
        a, b, c = (v * v).sum(-1), (q * v).sum(-1), (q * q).sum(-1) - 1
        t = (-b - (b * b - a * c).clamp(min=0).sqrt()) / a              # the nearer root of a t^2 + 2 b t + c = 0
        hit = (b * b > a * c) & (t > 0) & (t < best)
        p, n = o + t[..., None] * d, F.normalize((q + t[..., None] * v) / r, dim=-1)  # normal: grad |(p - c) / r|^2
        albedo = torch.tensor(colour) if colour else 0.5 + 0.35 * ((2 * p[..., :2]).floor().sum(-1, keepdim=True) % 2)
        shade = albedo * (0.3 + 0.7 * (n * light).sum(-1, keepdim=True).clamp(min=0))   # Lambert
        shade = shade + shine * (n * half).sum(-1, keepdim=True).clamp(min=0) ** 40     # Blinn-Phong
        best, rgb = torch.where(hit, t, best), torch.where(hit[..., None], shade, rgb)
    return torch.cat([rgb.clamp(0, 1), best.isfinite().float()[..., None]], -1)


# The procedural scene in Blender format, 2x2 rays a pixel; cameras at radius 4, random (train, val) or on a ring (test)
def make_procedural(folder, size, views=(40, 4, 8)):
    g, tmp, angle = torch.Generator().manual_seed(0), folder + ".tmp", 0.6911112070083618  # lego's camera_angle_x
    shutil.rmtree(tmp, ignore_errors=True)
    for split, n in zip(("train", "val", "test"), views):
        os.makedirs(os.path.join(tmp, split))
        azimuth, elevation = torch.rand(n, generator=g) * 360, 10 + 60 * torch.rand(n, generator=g)
        if split == "test":
            azimuth, elevation = torch.arange(n) * 360 / n + 15, torch.full((n,), 30.0)
        frames = []
        for i in range(n):
            c2w = orbit_pose(azimuth[i], elevation[i], 4.0)
            o, d = get_rays(2 * size, 2 * size, size / math.tan(0.5 * angle), c2w)
            rgba = area_resize(ray_cast(o, F.normalize(d, dim=-1)), size, size)
            rgba[..., :3] /= rgba[..., 3:].clamp(min=1e-6)              # straight alpha, as in Blender's PNGs
            iio.imwrite(os.path.join(tmp, split, f"r_{i}.png"), to_uint8(rgba))
            frames.append({"file_path": f"./{split}/r_{i}", "transform_matrix": c2w.tolist()})
        pathlib.Path(tmp, f"transforms_{split}.json").write_text(json.dumps(dict(camera_angle_x=angle, frames=frames)))
    os.replace(tmp, folder)


def load_scene(args):  # --scene -> load_blender's dict, the scene generated or downloaded first if need be
    name = f"procedural_{args.proc_size}" if args.scene == "procedural" else args.scene
    folder = os.path.join(args.datadir, "nerf_synthetic", name)
    if not os.path.exists(folder) and args.scene == "procedural":
        make_procedural(folder, args.proc_size)
    elif not os.path.exists(folder):
        if args.scene not in SYNTHETIC:
            fail("no such scene folder", folder, f"use one of {', '.join(SYNTHETIC)} or procedural, or check --datadir")
        fetch_synthetic(args.datadir, args.data_url or SYNTHETIC_URL)
    return load_blender(folder, args.half_res, args.white_bkgd, args.testskip)


def sample_batch(data, step, args, g):
    """N_rand rays (N, 6), colours (N, 3), u as in NeRF.forward, drawn by g on its device: pixels of one random image
    (the reference's Blender default) or of all (--use_batching), central until precrop_iters lest white win."""
    n, H, W = data["images"].shape[:3]
    y0, x0, h, w = 0, 0, H, W
    if step < args.precrop_iters:                                       # the centre crop
        dh, dw = max(1, int(H // 2 * args.precrop_frac)), max(1, int(W // 2 * args.precrop_frac))
        y0, x0, h, w = H // 2 - dh, W // 2 - dw, 2 * dh, 2 * dw
    if args.use_batching:
        k = torch.randint(n * h * w, (args.N_rand,), generator=g, device=g.device)
        img = k // (h * w)
    else:
        k = torch.randperm(h * w, generator=g, device=g.device)[:args.N_rand]
        img = torch.randint(n, (), generator=g, device=g.device).expand(len(k))
    ys, xs = y0 + k // w % h, x0 + k % w
    u = torch.rand(len(k), args.N_samples + args.N_importance, generator=g, device=g.device) if args.perturb else None
    return torch.cat(get_rays(H, W, data["focal"], data["poses"][img], ys, xs), -1), data["images"][img, ys, xs], u


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
    args.netchunk = args.netchunk or (1024 * 64 if device.type == "cuda" else 4096)  # small chunks: 2x faster on CPUs
    # the cpu preset's amp: bfloat16 only on CPUs with AVX512-BF16 (AMX): without it a preset step runs 11x slower
    args.amp = torch.cpu._is_avx512_bf16_supported() if args.amp == "auto" else args.amp
    expdir = make_expdir(args)
    torch.manual_seed(args.seed)
    data = load_scene(args)
    print(f"{len(data['images'])} train / {len(data['test_images'])} test views of {data['H']}x{data['W']}, "
          f"focal {data['focal']:.1f}, {device}")
    if args.render_only:
        return render_only(args, data, device, gpus, expdir, NeRF)

    # model and optimizer, resumed from the run's checkpoint if it has one
    raw = NeRF(args.netdepth, args.netwidth, args.netdepth_fine, args.netwidth_fine, args.multires,
               args.multires_views, args.use_viewdirs, args.N_importance > 0).to(device)
    for key in RENDER_OPTIONS:
        setattr(raw, key, getattr(args, key))
    opt = torch.optim.Adam(raw.parameters(), lr=args.lrate, fused=True)  # fused: one kernel for all parameters
    # sums since the last log line: MSE per network, opacity, steps
    state = {"seconds": 0.0, "sums": torch.zeros(4 if raw.fine is not None else 3, device=device)}
    scene = fingerprint(f"{args.scene}, {len(data['images'])} views", data["images"], data["poses"])
    step = resume(args, expdir, raw, {"adam": opt}, state, scene, device)
    freeze(raw, args.freeze)
    model = nn.DataParallel(raw, device_ids=gpus) if len(gpus) > 1 else raw  # the loss is computed per replica
    write_text(os.path.join(expdir, "args.json"), json.dumps(vars(args), indent=1))
    data["images"], data["poses"] = data["images"].to(device), data["poses"].to(device)  # drawn from on the device

    # train: a step's rays and uniforms depend on (seed, step) only, so a resumed run is the same run; no step waits
    # for the device but to check the loss (log lines: the means since the last one)
    start, ckpt_path = time.time() - state["seconds"], os.path.join(expdir, "ckpt.pt")
    with Run(args, expdir, step, args.N_iters, state["seconds"], "--N_iters") as run:
        while step < args.N_iters and not run.over(state["seconds"]):
            opt.param_groups[0]["lr"] = args.lrate * 0.1 ** (step / (args.lrate_decay * 1000))  # one Adam group
            g = torch.Generator(device).manual_seed(args.seed * 1000003 + step)
            # the MSE of each network (fine first), then the mean opacity of the rays, and 1 (a step)
            state["sums"] += F.pad(train_step(model, opt, *sample_batch(data, step, args, g)), (0, 1), value=1.0)
            step, state["seconds"] = step + 1, time.time() - start
            run.advance(step, state["seconds"])
            if step % args.i_print == 0 or step == args.N_iters:
                m = (state["sums"][:-1] / state["sums"][-1]).cpu()      # MSE per network, opacity
                run.bar.set_postfix(psnr=f"{mse2psnr(m[0]):.2f}", refresh=False)
                if m[-1] == 0:                                          # density 0 everywhere: no gradient either
                    fail(f"every ray rendered empty for {state['sums'][-1]:.0f} steps: a dead network", f"step {step}",
                         "start afresh (--no_reload) with a lower --lrate, a longer --precrop_iters or another --seed")
                run.log({"step": step, "loss": m[:-1].sum().item(), "psnr": mse2psnr(m[0]), "opacity": m[-1].item(),
                         "lr": opt.param_groups[0]["lr"], "seconds": round(state["seconds"], 2),
                         **{"psnr_coarse": mse2psnr(c) for c in m[1:-1]}})
                state["sums"].zero_()
            if step % args.i_weights == 0:
                save_checkpoint(ckpt_path, raw, {"adam": opt}, step, state, args, scene)
            if step % args.i_testset == 0 and step < args.N_iters and not run.over(state["seconds"]):
                render_testset(model, data, args, os.path.join(expdir, f"testset_{step}"), step, device, run)
            if step % args.i_video == 0 and step < args.N_iters and not run.over(state["seconds"]):
                render_video(model, data, args, os.path.join(expdir, f"video_{step}"), device)
    save_checkpoint(ckpt_path, raw, {"adam": opt}, step, state, args, scene)
    interrupted(run, step, ckpt_path)
    return finish(model, data, args, expdir, step, state["seconds"], device, run)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C outside the training loop: nothing to save, stop (status 130)
    main()
