"""The GPU paths of the four scripts, run on the CPU by proxy (no GPU is at hand where the tests run):
- DataParallel's own machinery: the loss module replicated by torch.nn.parallel.replicate and the batch split by its
  scatter, with the CUDA broadcast and scatter replaced by views and chunks, the replicas run in threads as
  parallel_apply runs them (autocast re-entered the way it does, with CUDA's default float16): the loss and the
  gradients equal the unreplicated module's, and autocast inside a replica runs in the dtype asked for;
- a meta-device pass: the loss module and its batch on torch.device("meta"), so that a tensor made on the CPU inside
  a forward or backward fails as it would on a GPU;
- host reads per training step: every call that reads a tensor's value on the host (a device-host sync on a GPU)
  counted while main() trains on the CPU."""
import collections
import os
import sys
import importlib
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import _functions, scatter_gather

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import tiny_nerf  # noqa: E402
import tiny_tensorf  # noqa: E402
import tiny_vae  # noqa: E402
import tiny_wgan  # noqa: E402

replicate = importlib.import_module("torch.nn.parallel.replicate")  # the module (the package exports the function)


def rays_at_origin(n, g):  # rays from (0, 0, 4) towards the origin, spread a little: (n, 6)
    return torch.cat([torch.tensor([0.0, 0, 4]).expand(n, 3), torch.randn(n, 3, generator=g) * 0.2 +
                      torch.tensor([0, 0, -1.0])], -1)


def case(name):
    """-> the loss module of script `name`, the keyword batch DataParallel scatters, and the step's loss from the
    gathered per-replica terms (as that script's training step computes it)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "nerf":
        model = tiny_nerf.NeRF(3, 16, 3, 16, 4, 2)
        model.N_samples, model.N_importance = 8, 8
        batch = dict(rays=rays_at_origin(12, g), target=torch.rand(12, 3, generator=g), u=torch.rand(12, 16, generator=g))
        return model, batch, lambda terms: (terms.sum(0) / batch["target"].numel()).sum()
    if name == "tensorf":                                              # dense (shift 0), a mask over half the box
        model = tiny_tensorf.TensorVM((12, 12, 12), n_lamb_sigma=4, n_lamb_sh=4, featureC=16, density_shift=0.0)
        model.alpha_mask = torch.rand(6, 6, 6, generator=g) > 0.5
        batch = dict(rays=rays_at_origin(12, g), target=torch.rand(12, 3, generator=g), u=torch.rand(12, generator=g))
        return model, batch, lambda terms: terms.sum() / batch["target"].numel()
    if name == "vae":
        model = tiny_vae.VAE("conv", (1, 28, 28), 4, 8, "bernoulli")
        batch = dict(x=torch.rand(12, 1, 28, 28, generator=g), eps=torch.randn(12, 4, generator=g))
        return model, batch, lambda terms: terms.sum() / len(batch["x"])
    model = tiny_wgan.WGAN(1, 16, nz=8, ngf=8, ndf=8, critic_norm="layer")
    if name == "wgan_generator":  # batch norm in G sees each replica's share, as in any DataParallel: a per-image G
        model.generator = nn.Sequential(nn.Linear(8, 256), nn.Unflatten(1, (1, 16, 16)), nn.Tanh())
        batch = dict(z=torch.randn(12, 8, generator=g))
        return model, batch, lambda terms: -terms.sum() / len(batch["z"])
    real, fake = (torch.rand(12, 1, 16, 16, generator=g) * 2 - 1 for _ in range(2))
    batch = dict(real=real, fake=fake, alpha=torch.rand(12, 1, 1, 1, generator=g), lam=10.0)
    return model, batch, lambda terms: ((terms.sum(0) / len(real)) * terms.new_tensor([-1.0, 1, 1, 0])).sum()


CASES = ["nerf", "tensorf", "vae", "wgan_critic", "wgan_generator"]


@pytest.fixture
def cpu_data_parallel(monkeypatch):
    """DataParallel's replicate and scatter on the CPU: the CUDA broadcast gives views of the parameters (so gradients
    flow back to them as through Broadcast), the CUDA scatter gives chunks, as comm.scatter cuts them."""
    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", lambda tensors, devices, detach=False: [
        [t.detach() if detach else t.view_as(t) for t in tensors] for _ in devices])
    monkeypatch.setattr(_functions.Scatter, "apply", lambda gpus, chunk_sizes, dim, x: x.chunk(len(gpus), dim))

    def run(module, batch, n, autocast_dtype=torch.float16):
        """What DataParallel.forward does with n devices, on the CPU: -> the gathered outputs."""
        (inputs, kwargs), ids = scatter_gather.scatter_kwargs((), batch, list(range(n)), 0), list(range(n))
        replicas = replicate.replicate(module, ids[:len(kwargs)], not torch.is_grad_enabled())
        grad_enabled, autocast_enabled, results = torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), {}

        def worker(i):                                                  # parallel_apply's _worker: a fresh thread
            torch.set_grad_enabled(grad_enabled)                        # re-enters autocast without a dtype, which
            with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_enabled):  # is float16 on CUDA
                results[i] = replicas[i](*inputs[i], **kwargs[i])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(replicas))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == len(replicas), "a replica raised"
        return torch.cat([results[i] for i in range(len(replicas))])   # Gather on the output device
    return run


@pytest.mark.parametrize("name", CASES)
def test_data_parallel_loss_and_gradients_equal_the_unreplicated_modules(name, cpu_data_parallel):
    model, batch, loss_of = case(name)
    params = [p for p in model.parameters()]

    def loss_and_grads(terms):
        model.zero_grad()
        loss = loss_of(terms)
        loss.backward()
        return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    whole, g_whole = loss_and_grads(model(**batch))
    replicated, g_replicated = loss_and_grads(cpu_data_parallel(model, batch, 3))
    assert whole.isfinite() and torch.allclose(whole, replicated, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in g_whole)
    for p, a, b in zip(params, g_whole, g_replicated):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (p.shape, (a - b).abs().max())


def test_vae_replicas_run_the_bfloat16_asked_for_not_the_float16_parallel_apply_enters(cpu_data_parallel):
    model, batch, _ = case("vae")
    seen = []
    model.encoder[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))  # hooks travel with replicas
    cpu_data_parallel(model, dict(batch, amp=True), 2)                 # --amp: autocast entered in each replica
    assert seen == [torch.bfloat16] * 2
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):                  # autocast around the DataParallel call (as
        cpu_data_parallel(model, batch, 2)                             # --amp was once) would give float16 replicas;
    assert seen == [torch.float32] * 2                                 # the replicas run as --amp (off) says


@pytest.mark.parametrize("name", CASES)
def test_a_training_step_on_the_meta_device_makes_no_tensor_on_the_cpu(name):
    model, batch, loss_of = case(name)
    meta = torch.device("meta")
    model.to(meta)
    batch = {k: v.to(meta) if torch.is_tensor(v) else v for k, v in batch.items()}
    if name == "tensorf":
        # the ray marcher's sample count and its compaction of occupied samples (nonzero) depend on the data, so no
        # meta tensor can stand in for them, and the grids' backward, a sparse product, has no meta kernel
        # (SparseMeta): the grids' interpolation forward, the basis and the colour MLP forward and backward
        for grids in (model.density_planes, model.density_lines, model.app_planes, model.app_lines):
            grids.requires_grad_(False)
        x, d = torch.rand(20, 3, device=meta), F.normalize(torch.randn(20, 3, device=meta), dim=-1)
        loss = model.density(x).sum() + model.color(x, d).sum()
    else:
        loss = loss_of(model(**batch))
    assert loss.device == meta
    loss.backward()
    assert all(p.grad is None or p.grad.device == meta for p in model.parameters())
    assert any(p.grad is not None for p in model.parameters())



# The Python-level calls that read a tensor on the host (each a device-host sync on a GPU), and .to(), which in a
# training step means a batch made on the host and copied. Syncs inside C++ ops (nonzero, boolean-mask indexing,
# the sparse product's coalesce) are not seen: tiny_tensorf's ray marcher has those, by design (its README line).
HOST_READS = ("item", "tolist", "cpu", "numpy", "to", "__bool__", "__float__", "__int__", "__index__")
SYNC_RUNS = {
    "nerf": (tiny_nerf, ["--scene", "procedural", "--proc_size", "16", "--preset", "cpu", "--netwidth", "16",
                         "--netwidth_fine", "16", "--N_samples", "8", "--N_importance", "8", "--N_rand", "64"]),
    "tensorf": (tiny_tensorf, ["--scene", "procedural", "--proc_size", "16", "--N_voxel_init", "4096",
                               "--N_voxel_final", "4096", "--upsamp_list", "--update_AlphaMask_list", "--batch_size",
                               "64"]),
    "vae": (tiny_vae, ["--dataset", "shapes", "--arch", "mlp", "--batch_size", "1024", "--iw_samples", "2", "--hidden",
                       "16"]),                                         # about 8 steps an epoch
    "wgan": (tiny_wgan, ["--dataset", "shapes", "--image_size", "8", "--batch_size", "16", "--ngf", "4", "--ndf", "4"]),
}
STEPS = {"nerf": "--N_iters", "tensorf": "--N_iters", "wgan": "--iters"}


@pytest.mark.parametrize("name", SYNC_RUNS)
def test_host_reads_per_training_step(name, tmp_path, monkeypatch):
    # Issue 11's goal: at most 2 device-host syncs per training step (log steps aside). Each script reads one value
    # a step, the loss's finiteness, so that a NaN stops the run before it reaches a checkpoint; the rest (batches,
    # the log's sums) stays on the device. tiny_wgan's step is a generator step with its n_critic critic steps.
    # tiny_tensorf reads 2 more, its ray marcher's step and sample count (the box's size, on the device), and syncs
    # in C++ besides (above): it does not meet the goal, and this bound keeps it from drifting further.
    module, argv = SYNC_RUNS[name]
    reads, total_at = collections.Counter(), {}
    for method in HOST_READS:
        def counted(self, *a, _method=method, _original=getattr(torch.Tensor, method), **k):
            reads[_method] += 1
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, method, counted)
    advance = module.Run.advance
    monkeypatch.setattr(module.Run, "advance", lambda run, step, *a, **k: (
        total_at.setdefault(step, reads.copy()), advance(run, step, *a, **k))[1])
    if name in ("nerf", "tensorf"):
        argv = argv + ["--datadir", str(tmp_path / "data"), "--testskip", "8", "--video_factor", "4"]
    steps = ["--epochs", "1"] if name == "vae" else [STEPS[name], "8", "--i_print", "1000"]  # vae: logs each epoch
    module.main(argv + steps + ["--basedir", str(tmp_path)])
    steps = sorted(total_at)[1:-1]                                     # not the first step, not the logged last
    per_step = [total_at[b] - total_at[a] for a, b in zip(steps, steps[1:])]
    assert len(per_step) >= 4
    limit = {"tensorf": 3, "wgan": 1 + tiny_wgan.get_parser().get_default("n_critic")}.get(name, 1)
    assert all(sum(r.values()) <= limit for r in per_step), per_step
