"""The prepared GPU check (issue 11): every GPU path of the four scripts on generated data, one table. Not a test.

    python benchmarks/gpu_check.py                  # one CUDA GPU, no network, about 5 minutes
    python benchmarks/gpu_check.py --device cpu     # the same paths on the CPU (a dry run: no syncs, no memory)

Per script: fp32 (TF32 on), --amp where the script has it, DataParallel over two replicas on one GPU (--gpus 0,0),
torchrun with one process where the script has DDP, a run stopped halfway and resumed that must match a straight
one, the GPU checkpoint rendered or sampled on the CPU, and the reference configuration for --minutes. Columns:
path, ok, steps/s, peak GPU memory, host syncs per training step (torch.cuda.set_sync_debug_mode, counted over two
runs of different lengths so that set-up and evaluation cancel), and the run's PSNR / -ELBO / W estimate."""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tiny_nerf  # noqa: E402
import tiny_tensorf  # noqa: E402
import tiny_vae  # noqa: E402
import tiny_wgan  # noqa: E402

MODULES = {"nerf": tiny_nerf, "tensorf": tiny_tensorf, "vae": tiny_vae, "wgan": tiny_wgan}
SMALL = {"nerf": ["--scene", "procedural", "--proc_size", "64", "--preset", "cpu", "--i_print", "10"],
         "tensorf": ["--scene", "procedural", "--proc_size", "64", "--preset", "cpu", "--i_print", "10"],
         "vae": ["--dataset", "shapes", "--iw_samples", "10"],
         "wgan": ["--dataset", "shapes", "--image_size", "32", "--i_print", "10"]}
STEPS = {"nerf": "--N_iters", "tensorf": "--N_iters", "vae": "--epochs", "wgan": "--iters"}
LENGTH = {"nerf": (40, 80), "tensorf": (40, 80), "vae": (1, 2), "wgan": (20, 40)}   # two lengths: syncs per step
REFERENCE = {"nerf": ["--scene", "procedural"], "tensorf": ["--scene", "procedural"], "vae": ["--dataset", "shapes"],
             "wgan": ["--dataset", "shapes"]}
METRIC = {"nerf": "psnr", "tensorf": "psnr", "vae": "test_nelbo", "wgan": "wasserstein_test"}


def run(name, argv, cuda):
    """main(argv) -> (final dict, seconds, host syncs, peak GB), syncs counted from the warnings CUDA raises."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode("warn")
    tic = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")                                 # every sync, not one per line
        final = MODULES[name].main(argv)
    if cuda:
        torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return final, time.time() - tic, syncs, torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0


def interrupt_after(name, k):
    """Ctrl-C (SIGINT) once the k-th training step of script `name` is done: the run saves and exits with 130.
    -> a function that takes the patch back."""
    module, fn = MODULES[name], "generator_step" if name == "wgan" else "train_step"
    real, calls = getattr(module, fn), [0]

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == k:
            signal.raise_signal(signal.SIGINT)
        return out
    setattr(module, fn, step)
    return lambda: setattr(module, fn, real)


def params(path):
    return torch.cat([v.flatten().float().cpu() for v in torch.load(path, weights_only=True)["model"].values()])


def check(name, args, tmp):
    """-> rows (path, ok, steps/s, GB, syncs/step, metric) of script `name`."""
    cuda, rows = args.device != "cpu", []
    data = ["--datadir", os.path.join(tmp, "data")] if name in ("nerf", "tensorf") else []
    base = SMALL[name] + data + ["--device", args.device, "--no_reload"]

    def row(path, extra, steps, compare=None):
        logs = os.path.join(tmp, path.replace(" ", "_"))
        try:
            n1, n2 = LENGTH[name] if steps is None else (steps, None)
            final, seconds, syncs, gb = run(name, base + extra + ["--basedir", logs, STEPS[name], str(n1)], cuda)
            per_step = ""
            if n2 is not None:                                          # the same run, longer: syncs per step
                first = final["step"]
                final, seconds, syncs2, gb = run(name, base + extra + ["--basedir", logs + "2", STEPS[name], str(n2)],
                                                 cuda)
                per_step = f"{(syncs2 - syncs) / max(final['step'] - first, 1):.1f}" if cuda else "-"
            ok = compare(logs) if compare else True
            rate = final.get("step", 0) / max(final.get("train_seconds", seconds), 1e-9)
            rows.append((f"{name} {path}", "pass" if ok else "FAIL", f"{rate:.1f}", f"{gb:.2f}", per_step,
                         f"{final.get(METRIC[name], float('nan')):.3f}"))
        except BaseException as e:                                      # SystemExit too: one row, go on
            traceback.print_exc()
            rows.append((f"{name} {path}", f"FAIL: {type(e).__name__}: {str(e)[:60]}", "", "", "", ""))

    row("fp32 (TF32)", [], None)
    if name in ("nerf", "vae") and (cuda or torch.cpu._is_avx512_bf16_supported()):  # else emulated: slow
        row("--amp", ["--amp"], None)
    if cuda:
        row("DataParallel --gpus 0,0", ["--gpus", "0,0"], LENGTH[name][0])
    n = LENGTH[name][1]

    def resumed_equals_straight(logs):                                  # Ctrl-C halfway, resumed: as straight
        (expname,) = os.listdir(logs)
        stopped, total = os.path.join(tmp, "stopped"), torch.load(os.path.join(logs, expname, "ckpt.pt"))["step"]
        restore = interrupt_after(name, total // 2)
        try:
            MODULES[name].main(base + ["--basedir", stopped, STEPS[name], str(n)])
        except SystemExit as e:
            assert e.code == 130, e.code
        finally:
            restore()
        MODULES[name].main(base[:-1] + ["--basedir", stopped, STEPS[name], str(n)])   # resumes (no --no_reload)
        a, b = params(os.path.join(logs, expname, "ckpt.pt")), params(os.path.join(stopped, expname, "ckpt.pt"))
        print(f"{name}: resumed vs straight, largest difference {(a - b).abs().max():.2e}")
        return torch.allclose(a, b, rtol=1e-3, atol=1e-5)
    row("Ctrl-C halfway, resumed", [], n, resumed_equals_straight)

    def on_cpu(logs):                                                   # the GPU checkpoint, rendered on the CPU
        flag = ["--render_only"] if name in ("nerf", "tensorf") else ["--sample_only", "16"]
        MODULES[name].main(SMALL[name] + data + ["--device", "cpu", "--basedir", logs, *flag])
        return True
    row("checkpoint used on the CPU", [], LENGTH[name][0], on_cpu)
    if hasattr(MODULES[name], "shard"):                                 # DDP: torchrun with one process
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               os.path.join(ROOT, f"tiny_{name}.py"), *base, "--basedir", os.path.join(tmp, "ddp"), STEPS[name],
               str(LENGTH[name][0])]
        tic = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        rows.append((f"{name} torchrun, 1 process", "pass" if out.returncode == 0 else f"FAIL: {out.stderr[-80:]}",
                     "", "", "", f"{time.time() - tic:.0f} s"))
    reference = REFERENCE[name] + data + ["--device", args.device, "--no_reload", "--max_minutes", str(args.minutes),
                                          "--basedir", os.path.join(tmp, "reference")]
    try:
        final, seconds, syncs, gb = run(name, reference, cuda)
        rate = final.get("step", 0) / max(final.get("train_seconds", seconds), 1e-9)
        rows.append((f"{name} reference, {args.minutes} min", "pass", f"{rate:.1f}", f"{gb:.2f}", "",
                     f"{final.get(METRIC[name], float('nan')):.3f}"))
    except BaseException as e:
        traceback.print_exc()
        rows.append((f"{name} reference", f"FAIL: {type(e).__name__}", "", "", "", ""))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a dry run)")
    p.add_argument("--minutes", type=float, default=0.5, help="budget of each reference-configuration run")
    p.add_argument("--scripts", nargs="+", default=list(MODULES), choices=list(MODULES))
    args = p.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU here (--device): run on a GPU machine, or --device cpu for a dry run")
    tmp, rows, tic = tempfile.mkdtemp(prefix="gpu_check_"), [], time.time()
    try:
        for name in args.scripts:
            rows += check(name, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    device = torch.cuda.get_device_name() if args.device != "cpu" else "CPU"
    print(f"\n| path | ok | steps/s | peak GB | host syncs/step | metric |  ({device}, torch {torch.__version__}, "
          f"{(time.time() - tic) / 60:.1f} min)")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0 if all(r[1] == "pass" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
