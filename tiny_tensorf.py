"""tiny_tensorf.py: TensoRF radiance fields (vector-matrix decomposition) in one file.

Chen et al., "TensoRF: Tensorial Radiance Fields", ECCV 2022 (arXiv:2203.09517), reference defaults (Blender scenes).
Density and appearance are grids over the scene box, sums of plane x line products (VM, eq. 4):
    G(x, y, z) = sum_r v^Z_r(z) M^XY_r(x, y) + v^Y_r(y) M^XZ_r(x, z) + v^X_r(x) M^YZ_r(y, z),
sigma = softplus(G_sigma + shift), colour c = MLP(B G_app, d) (B a basis matrix, d the view). Rays march at half-voxel
steps, skip what an alpha mask marks empty and composite as in NeRF; the grids grow, the box shrinks to what is full.

    python tiny_tensorf.py --scene lego          # downloads nerf_synthetic into data/ if missing (procedural: offline)
    python tiny_tensorf.py --datadir ../shared/data --preset cpu --max_minutes 5 --testskip 50   # a local copy
    python tiny_tensorf.py --preset cpu --render_only    # test views and video from logs/tensorf_lego_cpu/ckpt.pt
Sections: arguments, model, training, evaluation & outputs, data, harness (the same in the four scripts), main.
Outputs in logs/<expname>/: args.json, ckpt.pt, metrics.jsonl, testset_<step>/, video_<step>.mp4, final.json."""
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

SCRIPT = "tiny_tensorf"
NEAR, FAR = 2.0, 6.0  # the depth range of every Blender scene (reference code), along unit directions


# ---------------------------------------------------------------- arguments
# PRESETS apply before the flags given on the command line, which win; cpu: tuned on lego (benchmarks/)
PRESETS = {"cpu": dict(N_voxel_init=32 ** 3, N_voxel_final=200 ** 3, upsamp_list=[100, 200, 300, 400, 500],
                       update_AlphaMask_list=[50, 150, 300, 500], batch_size=2048, video_factor=4)}
ALIASES = {"--n_iters": "--N_iters", "--dataset_name": "read from the folder (--datadir, --scene)",
           "--render_test": "--render_only", "--render_path": "--render_only (it renders the video)",
           "--lr_decay_iters": "the --N_iters or --max_minutes the decay runs over", "--downsample_train": "--half_res",
           "--N_vis": "--i_testset", "--vis_every": "--i_testset", "--config": "not read yet: give the flags"}


def get_parser():
    p = Parser(description="TensoRF in one file.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    g = p.add_argument_group("model (names of the reference TensoRF code)")
    g.add_argument("--N_voxel_init", type=pint, default=128 ** 3, help="voxels of the first grid")
    g.add_argument("--N_voxel_final", type=pint, default=300 ** 3, help="voxels after the last upsampling")
    g.add_argument("--upsamp_list", type=pint, nargs="*", default=[2000, 3000, 4000, 5500, 7000],
                   help="steps that upsample the grids (voxel counts spaced logarithmically)")
    g.add_argument("--update_AlphaMask_list", type=pint, nargs="*", default=[2000, 4000],
                   help="steps that recompute the alpha mask and shrink the box to it")
    g.add_argument("--n_lamb_sigma", type=pint, default=16, help="density components per plane/line pair")
    g.add_argument("--n_lamb_sh", type=pint, default=48, help="appearance components per plane/line pair")
    g.add_argument("--data_dim_color", type=pint, default=27, help="appearance feature width (basis matrix output)")
    g.add_argument("--featureC", type=pint, default=128, help="hidden units of the colour MLP")
    g.add_argument("--fea_pe", type=nint, default=2, help="frequencies encoding the appearance feature")
    g.add_argument("--view_pe", type=nint, default=2, help="frequencies encoding the view direction")
    g.add_argument("--density_shift", type=float, default=-10.0, help="sigma = softplus(feature + shift)")
    g.add_argument("--distance_scale", type=positive(float), default=25.0, help="alpha = 1 - exp(-sigma delta scale)")
    g = p.add_argument_group("rendering")
    g.add_argument("--step_ratio", type=positive(float), default=0.5, help="ray-marching step in voxels")
    g.add_argument("--alpha_mask_thre", type=nfloat, default=1e-4, help="alpha below which a voxel counts as empty")
    g.add_argument("--rm_weight_mask_thre", type=nfloat, default=1e-4, help="weight below which no colour is computed")
    g.add_argument("--chunk", type=pint, default=4096, help="rays rendered at once")
    g = p.add_argument_group("training")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS), help=f"defaults under the given flags: {PRESETS}")
    g.add_argument("--N_iters", type=pint, default=30000, help="training steps")
    g.add_argument("--batch_size", type=pint, default=4096, help="rays per step (split over --gpus)")
    g.add_argument("--lr_init", type=positive(float), default=0.02, help="Adam learning rate of the grids")
    g.add_argument("--lr_basis", type=positive(float), default=1e-3, help="Adam learning rate of the basis and MLP")
    g.add_argument("--lr_decay_target_ratio", type=positive(float), default=0.1, help="learning rates fall to this "
                   "fraction by the end of training (N_iters, or --max_minutes if that comes first)")
    g.add_argument("--lr_upsample_reset", action=flag, default=True, help="restart the decay at each upsampling")
    g.add_argument("--L1_weight_inital", type=nfloat, default=8e-5, help="L1 on density before the box shrinks")
    g.add_argument("--L1_weight_rest", type=nfloat, default=4e-5, help="L1 on density after")
    g.add_argument("--max_minutes", type=positive(float), default=None, help="training budget, then outputs as usual")
    g.add_argument("--freeze", nargs="+", default=[], metavar="PATTERN", help="freeze parameters by name: 'mlp.*'")
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
    g.add_argument("--expname", default=None, help="experiment folder (default: tensorf_<scene>[_<preset>])")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--gpus", default=None, help="comma-separated GPU ids for DataParallel (default: --device only)")
    g.add_argument("--no_reload", action="store_true", help="start afresh instead of resuming ckpt.pt")
    g.add_argument("--ckpt", default=None, help="checkpoint to load instead of logs/<expname>/ckpt.pt")
    return p



def preset_defaults(args):
    return PRESETS[args.preset] if args.preset else {}


def check_args(args):
    for name, steps in (("--upsamp_list", args.upsamp_list), ("--update_AlphaMask_list", args.update_AlphaMask_list)):
        if sorted(set(steps)) != steps:                                 # not strictly increasing
            fail(f"steps must increase, got {steps}", name, "e.g. --upsamp_list 2000 3000 4000")
    if args.N_voxel_final < args.N_voxel_init:
        fail(f"{args.N_voxel_final} < --N_voxel_init {args.N_voxel_init}", "--N_voxel_final", "grids only grow")
    if args.scene != os.path.basename(args.scene) or args.scene in ("", ".", ".."):
        fail(f"not a scene name: {args.scene!r}", "--scene", "name a folder of <datadir>/nerf_synthetic")
    args.expname = args.expname or f"tensorf_{args.scene}" + (f"_{args.preset}" if args.preset else "")
    return args


# ---------------------------------------------------------------- model
def ray_box(o, d, aabb):
    """Where rays o + t d (N, 3) enter and leave the box aabb (2, 3), slab method, in [NEAR, FAR] (miss: far <= near)"""
    d = torch.where(d.abs() < 1e-6, torch.full_like(d, 1e-6), d)        # parallel to a face: a huge t, not a NaN
    ta, tb = (aabb[1] - o) / d, (aabb[0] - o) / d
    return torch.minimum(ta, tb).amax(-1).clamp(NEAR, FAR), torch.maximum(ta, tb).amin(-1).clamp(NEAR, FAR)


RENDER_OPTIONS = ("step_ratio", "alpha_mask_thre", "rm_weight_mask_thre", "white_bkgd")  # set from flags, not saved
MAT, VEC = ((0, 1), (0, 2), (1, 2)), (2, 1, 0)  # pair i: a plane over world axes MAT[i], a line along axis VEC[i]


class Interp(torch.autograd.Function):
    """sum_k w[:, k] table[idx[:, k]] -> (P, C) by embedding_bag; the backward, a sparse product W^T grad, runs
    several times faster on CPUs than grid_sample's serial scatter."""

    @staticmethod
    def forward(ctx, table, idx, w):
        ctx.save_for_backward(idx, w)
        ctx.rows = len(table)
        return F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        idx, w = ctx.saved_tensors
        ij = torch.stack([idx.flatten(), torch.arange(len(idx), device=idx.device).repeat_interleave(idx.shape[1])])
        wt = torch.sparse_coo_tensor(ij, w.flatten(), (ctx.rows, len(idx)), check_invariants=False)  # W^T (rows, P)
        return torch.sparse.mm(wt, grad), None, None


def corners(t, n):
    """t (P,) in [-1, 1] over n vertices (corners aligned) -> vertices i, i + 1 (P, 2) and weights 1 - f, f (P, 2)."""
    p = (t + 1) * (0.5 * (n - 1))
    i = p.floor().clamp(0, n - 2)
    return torch.stack([i, i + 1], 1).long(), torch.stack([1 - (p - i), p - i], 1)


def vm_sample(planes, lines, x):
    """M_r(u, v) v_r(w) of every pair and component at x (P, 3) in [-1, 1]^3 -> (P, 3 C). planes[i] (R_v, R_u, C),
    lines[i] (R_w, C): channels last (the reference's (1, C, R_v, R_u), transposed)."""
    out = []
    for plane, line, (a, b), c in zip(planes, lines, MAT, VEC):
        (iu, wu), (iv, wv) = corners(x[:, a], plane.shape[1]), corners(x[:, b], len(plane))
        i = (iv[:, :, None] * plane.shape[1] + iu[:, None]).flatten(1)  # the 4 vertices around (u, v)   (P, 4)
        m = Interp.apply(plane.flatten(0, 1), i, (wv[:, :, None] * wu[:, None]).flatten(1))  # bilinear in (u, v)
        v = Interp.apply(line, *corners(x[:, c], len(line)))            # linear in w
        out.append(m * v)                                               # M_r(u, v) v_r(w)   (P, C)
    return torch.cat(out, 1)


def vm_dense(planes, lines):
    """The tensor at the vertices (X, Y, Z), summed over pairs and components; vm_sample is trilinear in it."""
    spec = ("jic,kc->ijk", "kic,jc->ijk", "kjc,ic->ijk")                # M^XY(x, y) v^Z(z), M^XZ v^Y, M^YZ v^X
    return sum(torch.einsum(s, p, l_) for s, p, l_ in zip(spec, planes, lines))


def encode(x, L):
    """(sin(2^k x), cos(2^k x)) for k < L in the reference code's order: x (P, C) -> (P, 2 C L)."""
    xf = (x[..., None] * 2.0 ** torch.arange(L, device=x.device)).flatten(-2)
    return torch.cat([xf.sin(), xf.cos()], -1)


class TensorVM(nn.Module):
    """Density and appearance grids in VM form over the box `aabb`, the basis matrix and the colour MLP; forward
    returns this replica's loss terms, so DataParallel gathers a number per GPU. Grids, box and mask change shape."""

    def __init__(self, reso=(128, 128, 128), n_lamb_sigma=16, n_lamb_sh=48, data_dim_color=27, featureC=128, fea_pe=2,
                 view_pe=2, density_shift=-10.0, distance_scale=25.0, bound=1.5):
        super().__init__()
        self.config = {k: v for k, v in locals().items() if k not in ("self", "reso", "__class__")}  # the arguments
        self.fea_pe, self.view_pe, self.density_shift = fea_pe, view_pe, density_shift
        self.distance_scale = distance_scale
        self.register_buffer("aabb", torch.tensor([[-bound] * 3, [bound] * 3]))
        self.register_buffer("alpha_mask", torch.ones(1, 1, 1, dtype=torch.bool))  # over aabb; 1x1x1: no mask yet

        def grids(n):                                                   # the reference's init: N(0, 0.1^2)
            return (nn.ParameterList([nn.Parameter(0.1 * torch.randn(reso[b], reso[a], n)) for a, b in MAT]),
                    nn.ParameterList([nn.Parameter(0.1 * torch.randn(reso[c], n)) for c in VEC]))
        self.density_planes, self.density_lines = grids(n_lamb_sigma)
        self.app_planes, self.app_lines = grids(n_lamb_sh)
        self.basis_mat = nn.Linear(3 * n_lamb_sh, data_dim_color, bias=False)  # B: 144 -> 27
        width = data_dim_color * (1 + 2 * fea_pe) + 3 * (1 + 2 * view_pe)      # 150 in the reference configuration
        self.mlp = nn.Sequential(nn.Linear(width, featureC), nn.ReLU(inplace=True), nn.Linear(featureC, featureC),
                                 nn.ReLU(inplace=True), nn.Linear(featureC, 3))
        nn.init.zeros_(self.mlp[-1].bias)
        self.step_ratio, self.alpha_mask_thre, self.rm_weight_mask_thre, self.white_bkgd = 0.5, 1e-4, 1e-4, True

    def reso(self):                                                     # grid vertices along x, y, z
        return [len(self.density_lines[VEC.index(axis)]) for axis in range(3)]

    def units(self):                                                    # voxel size along x, y, z
        return (self.aabb[1] - self.aabb[0]) / (torch.tensor(self.reso(), device=self.aabb.device) - 1)

    def normalize(self, x):                                             # world -> [-1, 1]^3 over the box
        return (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0]) * 2 - 1

    def density(self, x):                                               # x (P, 3) normalised -> sigma (P,)
        return F.softplus(vm_sample(self.density_planes, self.density_lines, x).sum(1) + self.density_shift)

    def color(self, x, viewdirs):
        """x (P, 3) normalised, unit viewdirs (P, 3) -> rgb (P, 3): the MLP on [B a(x), d, PE(B a(x)), PE(d)]."""
        feature = self.basis_mat(vm_sample(self.app_planes, self.app_lines, x))  # (P, 27)
        h = torch.cat([feature, viewdirs, encode(feature, self.fea_pe), encode(viewdirs, self.view_pe)], -1)
        return torch.sigmoid(self.mlp(h))

    def occupied(self, x):  # points x (P, 3) in the box -> the alpha mask at their nearest vertices (P,): a lookup
        size = torch.tensor(self.alpha_mask.shape, device=x.device)
        i = ((self.normalize(x) + 1) * 0.5 * (size - 1)).round().long().clamp(min=0).minimum(size - 1)
        return self.alpha_mask[i[:, 0], i[:, 1], i[:, 2]]

    def render_rays(self, rays, u=None):
        """Rays (N, 6) -> rgb (N, 3), depth, acc (N,): samples every step_ratio voxels from where a ray enters the box,
        shifted by u (N,) in training; density where the alpha mask is on, colour where w_i > rm_weight_mask_thre."""
        o, d = rays[:, :3], F.normalize(rays[:, 3:6], dim=-1)
        near, far = ray_box(o, d, self.aabb)
        step = self.units().mean().item() * self.step_ratio             # step_ratio voxels
        S = max(1, int((far - near).max().item() / step) + 1)          # enough samples for the longest chord
        z = near[:, None] + step * (torch.arange(S, device=rays.device) + (0.0 if u is None else u[:, None]))  # (N, S)
        idx = torch.nonzero((z < far[:, None]).view(-1))[:, 0]          # samples inside the box, flat indices
        x = (o[idx // S] + d[idx // S] * z.view(-1)[idx, None])         # (P, 3) world points
        keep = self.occupied(x)
        idx, x = idx[keep], self.normalize(x[keep])
        sigma = torch.zeros(z.numel(), device=z.device).index_put((idx,), self.density(x)).view_as(z)
        alpha = 1 - torch.exp(-sigma * step * self.distance_scale)     # a_i = 1 - exp(-sigma_i delta_i)
        T = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha + 1e-10], -1), -1)  # prod_{j<i}(1 - a_j)
        w = alpha * T[:, :-1]                                           # w_i = T_i a_i   (N, S)
        bright = w.view(-1)[idx] > self.rm_weight_mask_thre
        idx, x = idx[bright], x[bright]
        rgb = torch.zeros(z.numel(), 3, device=z.device).index_put((idx,), self.color(x, d[idx // S])).view(*z.shape, 3)
        acc = w.sum(1)                                                  # sum_i w_i <= 1
        rgb_map = (w[..., None] * rgb).sum(1) + (1 - acc[:, None]) * float(self.white_bkgd)  # C = sum_i w_i c_i (+ bg)
        return rgb_map, (w * z).sum(1), acc

    def forward(self, rays, target=None, u=None):
        """-> (1, 1) summed squared error against target (N, 3), or without target (N, 6): rgb, depth, disp, acc."""
        rgb, depth, acc = self.render_rays(rays, u)
        if target is not None:
            return ((rgb - target) ** 2).sum()[None, None]
        disp = 1 / torch.clamp(depth / acc.clamp(min=1e-10), min=1e-10)  # inverse of the expected depth of the hit
        return torch.cat([rgb, depth[:, None], disp[:, None], acc[:, None]], -1)

    def density_l1(self):                                               # the reference's sparsity term on density
        return sum(g.abs().mean() for g in [*self.density_planes, *self.density_lines])

    def remap(self, fn):
        """Each grid g -> fn(g, dims), g in the reference layout (1, C, H, W) over world axes dims; frozen stays so."""
        for planes, lines in ((self.density_planes, self.density_lines), (self.app_planes, self.app_lines)):
            for i, (a, b), c, p, v in zip(range(3), MAT, VEC, planes, lines):
                plane = fn(p.detach().permute(2, 0, 1)[None], (b, a))[0].permute(1, 2, 0)   # back to channels last
                planes[i] = nn.Parameter(plane.contiguous(), p.requires_grad)
                lines[i] = nn.Parameter(fn(v.detach().t()[None, :, :, None], (c, 3))[0, :, :, 0].t().contiguous(),
                                        v.requires_grad)

    def upsample(self, n_voxels):                                       # (no graph: remap detaches)
        """Resample the grids to about n_voxels cubic voxels over the box (field kept up to interpolation error)."""
        size = self.aabb[1] - self.aabb[0]
        reso = (size / (size.prod() / n_voxels) ** (1 / 3)).round().long().clamp(min=2).tolist() + [1]
        self.remap(lambda g, d: F.interpolate(g, (reso[d[0]], reso[d[1]]), mode="bilinear", align_corners=True))
        return reso[:3]

    @torch.no_grad()
    def update_alpha_mask(self):
        """Alpha of every vertex from the dense grid (an einsum: cheap), dilated by a voxel -> share of voxels kept."""
        sigma = F.softplus(vm_dense(self.density_planes, self.density_lines) + self.density_shift)
        alpha = 1 - torch.exp(-sigma * self.units().mean() * self.step_ratio * self.distance_scale)  # at the step
        self.alpha_mask = F.max_pool3d(alpha[None, None], 3, stride=1, padding=1)[0, 0] >= self.alpha_mask_thre
        return self.alpha_mask.float().mean().item()

    def shrink(self):                                                   # (no graph: remap detaches)
        """Crop the box, the grids and the mask to the vertices the alpha mask keeps: the field inside is unchanged."""
        kept, units = self.alpha_mask.nonzero().cpu(), self.units()
        if len(kept) == 0:
            return
        hi = torch.maximum(kept.amax(0), kept.amin(0) + 1).minimum(torch.tensor(self.reso()) - 1)  # at least 2 vertices
        lo = torch.minimum(kept.amin(0), hi - 1)
        span = [slice(a, b + 1) for a, b in zip(lo.tolist(), hi.tolist())] + [slice(None)]
        self.remap(lambda g, dims: g[:, :, span[dims[0]], span[dims[1]]].clone())
        self.alpha_mask = self.alpha_mask[span[0], span[1], span[2]].clone()
        self.aabb = self.aabb[0] + torch.stack([lo, hi]).to(units) * units

    def load_state_dict(self, state, strict=True):                      # grids, box, mask: the checkpoint's shapes
        for name, old in self.state_dict(keep_vars=True).items():       # the parameters and buffers themselves
            if name in state and old.shape != state[name].shape:         # resized in place: optimizers keep them
                old.data = torch.empty_like(state[name], device=old.device)
        return super().load_state_dict(state, strict)


# ---------------------------------------------------------------- training
def make_optimizer(raw, args):  # Adam with the reference's groups and betas; built anew whenever the grids change shape
    grids = [*raw.density_planes, *raw.density_lines, *raw.app_planes, *raw.app_lines]
    nets = [*raw.basis_mat.parameters(), *raw.mlp.parameters()]
    return torch.optim.Adam([{"params": grids, "lr": args.lr_init}, {"params": nets, "lr": args.lr_basis}],
                            betas=(0.9, 0.99), fused=True)


def train_step(model, raw, opt, rays, target, u, l1_weight):
    """One Adam step on MSE + L1 on the density grids (reference lego: no total variation) -> the MSE (detached)."""
    mse = model(rays, target, u).sum() / target.numel()                 # sum over replicas / global count
    loss = mse + l1_weight * raw.density_l1()
    if not torch.isfinite(loss):
        fail(f"the loss became {loss.item()}", "--lr_init", "lower the rates; ckpt.pt still holds the last good state")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return mse.detach()


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


def rays_in_box(data, aabb):  # flat indices of the training pixels whose rays cross the box (the rest: background)
    n, H, W = data["images"].shape[:3]
    keep = []
    for i in tqdm(range(n), desc="rays in box", leave=False):
        o, d = get_rays(H, W, data["focal"], data["poses"][i])
        near, far = ray_box(o.view(-1, 3), F.normalize(d.view(-1, 3), dim=-1), aabb)
        keep.append(torch.nonzero(far > near)[:, 0] + i * H * W)
    return torch.cat(keep)


def sample_batch(data, pixels, n_rays, g):  # rays (n, 6), colours (n, 3), jitter u (n,): those pixels, g's device
    H, W = data["images"].shape[1:3]
    k = pixels[torch.randint(len(pixels), (n_rays,), generator=g, device=g.device)]
    img, ys, xs = k // (H * W), k // W % H, k % W
    o, d = get_rays(H, W, data["focal"], data["poses"][img], ys, xs)
    return torch.cat([o, d], -1), data["images"][img, ys, xs], torch.rand(n_rays, generator=g, device=g.device)


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
    data = load_scene(args)
    print(f"{len(data['images'])} train / {len(data['test_images'])} test views of {data['H']}x{data['W']}, "
          f"focal {data['focal']:.1f}, {device}")
    if args.render_only:
        return render_only(args, data, device, gpus, expdir, TensorVM)

    # model and optimizer, resumed from the run's checkpoint (grids, box and mask of its shapes) if it has one
    raw = TensorVM([round(args.N_voxel_init ** (1 / 3))] * 3, args.n_lamb_sigma, args.n_lamb_sh, args.data_dim_color,
                   args.featureC, args.fea_pe, args.view_pe, args.density_shift, args.distance_scale).to(device)
    for key in RENDER_OPTIONS:
        setattr(raw, key, getattr(args, key))
    opt = make_optimizer(raw, args)
    state = {"seconds": 0.0, "sums": torch.zeros(2, device=device), "lr_reset": 0.0}  # MSE, steps since the last log
    scene = fingerprint(f"{args.scene}, {len(data['images'])} views", data["images"], data["poses"])
    step = resume(args, expdir, raw, {"adam": opt}, state, scene, device)
    freeze(raw, args.freeze)
    model = nn.DataParallel(raw, device_ids=gpus) if len(gpus) > 1 else raw  # the loss is computed per replica
    write_text(os.path.join(expdir, "args.json"), json.dumps(vars(args), indent=1))
    print(f"grid {'x'.join(map(str, raw.reso()))}")
    data["images"], data["poses"] = data["images"].to(device), data["poses"].to(device)  # drawn from on the device

    # train: a step's rays and jitter depend on (seed, step) only; the grids grow and the box shrinks on schedule
    counts = np.geomspace(args.N_voxel_init, args.N_voxel_final, len(args.upsamp_list) + 1)[1:]   # log-spaced
    voxels = dict(zip(args.upsamp_list, counts))
    masks, pixels, ckpt_path = args.update_AlphaMask_list, rays_in_box(data, raw.aabb), os.path.join(expdir, "ckpt.pt")
    start = time.time() - state["seconds"]
    with Run(args, expdir, step, args.N_iters, state["seconds"], "--N_iters") as run:
        while step < args.N_iters and not run.over(state["seconds"]):
            progress = max(step / args.N_iters, state["seconds"] / run.budget)  # the schedule, 0 ... 1
            if step in masks or step in voxels:                         # the grids change shape: a new optimizer
                if step in masks:                                       # the reference shrinks only at the first;
                    kept = raw.update_alpha_mask()                      # masked voxels never get a gradient again,
                    raw.shrink()                                        # so shrinking each time loses nothing
                    pixels = rays_in_box(data, raw.aabb)
                    tqdm.write(f"[{step}] alpha mask keeps {kept:.1%} of the voxels, box {raw.aabb.tolist()}")
                if step in voxels:
                    state["lr_reset"] = progress if args.lr_upsample_reset else 0.0
                    tqdm.write(f"[{step}] grid upsampled to {'x'.join(map(str, raw.upsample(voxels[step])))}")
                opt = make_optimizer(raw, args)
            decay = args.lr_decay_target_ratio ** (progress - state["lr_reset"])  # 1 -> target ratio over training
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = args.lr_init * decay, args.lr_basis * decay
            g = torch.Generator(device).manual_seed(args.seed * 1000003 + step)
            rays, target, u = sample_batch(data, pixels, args.batch_size, g)
            l1 = args.L1_weight_inital if not masks or step < masks[0] else args.L1_weight_rest
            state["sums"] += F.pad(train_step(model, raw, opt, rays, target, u, l1)[None], (0, 1), value=1.0)
            step, state["seconds"] = step + 1, time.time() - start
            run.advance(step, state["seconds"])
            if step % args.i_print == 0 or step == args.N_iters:
                m = state["sums"][0] / state["sums"][1]
                run.bar.set_postfix(psnr=f"{mse2psnr(m):.2f}", refresh=False)
                run.log({"step": step, "mse": m.item(), "psnr": mse2psnr(m), "lr": opt.param_groups[0]["lr"],
                         "reso": raw.reso(), "seconds": round(state["seconds"], 2)})
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
