"""Benchmark runner: train one script for a fixed wall-clock budget with a fixed command,
evaluate it, and append one row to benchmarks/results.md. Not part of the tests.

    python benchmarks/run.py vae --minutes 2                  # tiny_vae.py, default (conv) model
    python benchmarks/run.py vae --minutes 5 -- --arch mlp    # flags after -- go to the script
    python benchmarks/run.py wgan --minutes 5 -- --gp 10
    python benchmarks/run.py nerf --minutes 5 -- --preset cpu # lego from ../shared/data
    python benchmarks/run.py tensorf --minutes 5 -- --preset cpu

Time nothing while another training runs on the same cores. Runs go to benchmarks/runs/
(git-ignored); the row names the exact command, minus --basedir/--expname/--no_reload.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNS = os.path.join(HERE, "runs")
RESULTS = os.path.join(HERE, "results.md")
sys.path.insert(0, HERE)

SECTIONS = {  # script -> (section title, table header)
    "vae": ("tiny_vae.py on mnist_small (8k train / 2k test real MNIST digits)",
            "| date | machine | torch | command | budget | test -ELBO (nats) | IW-NLL (nats) | FD (real floor) "
            "| coverage | train images/s |\n|---|---|---|---|---|---|---|---|---|---|"),
    "wgan": ("tiny_wgan.py on mnist_small (8k train / 2k test real MNIST digits)",
             "| date | machine | torch | command | budget | FD (real floor) | coverage | generator steps/s "
             "| final W estimate |\n|---|---|---|---|---|---|---|---|---|"),
    "nerf": ("tiny_nerf.py on lego (half resolution, 400x400; test views 0, 50, 100, 150)",
             "| date | machine | torch | command | budget | test PSNR (dB) | SSIM | steps | s/step |\n|---|---|---|---|---|---|---|---|---|"),
    "tensorf": ("tiny_tensorf.py on lego (half resolution, 400x400; test views 0, 50, 100, 150)",
                "| date | machine | torch | command | budget | test PSNR (dB) | SSIM | steps | s/step |\n|---|---|---|---|---|---|---|---|---|"),
}


def machine():
    """CPU model and cores, or the GPU name, for the row."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    model = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores"


def run(cmd):
    print("$", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        sys.exit(f"benchmark command failed with status {out.returncode}")
    return out.stdout


def bench_vae(args, extra):
    import fd
    name = "vae_" + "_".join([f"{args.minutes:g}min"] + [e.strip("-") for e in extra])
    shown = ["python", "tiny_vae.py", "--datadir", args.datadir, "--max_minutes", f"{args.minutes:g}",
             "--iw_samples", str(args.iw_samples)] + extra
    private = ["--basedir", RUNS, "--expname", name]
    run([sys.executable] + shown[1:] + private + ["--no_reload"])
    expdir = os.path.join(RUNS, name)
    final = json.load(open(os.path.join(expdir, "final.json")))
    rows = [json.loads(line) for line in open(os.path.join(expdir, "metrics.jsonl"))]
    speed = statistics.median(r["images_per_s"] for r in rows)
    run([sys.executable] + shown[1:] + private + ["--sample_only", "2000"])
    datadir = os.path.join(ROOT, args.datadir)                        # the command runs in ROOT
    sampled = fd.score(np.load(os.path.join(expdir, "samples.npy")), datadir)
    floor = fd.calibration(datadir)["real"]["fd"]
    best = min(rows, key=lambda r: r["val_nelbo"])
    figures = [f"{final['test_nelbo']:.1f} (best val at {best['seconds']:.0f} s)",
               f"{final['iw_nll']:.1f} (K={final['iw_samples']})", f"{sampled['fd']:.0f} ({floor:.0f})",
               f"{sampled['coverage'] * 10:.0f}/10", f"{speed:,.0f}"]
    return " ".join(shown), figures


def bench_wgan(args, extra):
    import fd
    name = "wgan_" + "_".join([f"{args.minutes:g}min"] + [e.strip("-") for e in extra])
    shown = ["python", "tiny_wgan.py", "--datadir", args.datadir, "--max_minutes", f"{args.minutes:g}"] + extra
    private = ["--basedir", RUNS, "--expname", name]
    run([sys.executable] + shown[1:] + private + ["--no_reload"])
    expdir = os.path.join(RUNS, name)
    final = json.load(open(os.path.join(expdir, "final.json")))
    rows = [json.loads(line) for line in open(os.path.join(expdir, "metrics.jsonl"))]
    speed = final["step"] / final["train_seconds"]
    run([sys.executable] + shown[1:] + private + ["--sample_only", "2000"])
    datadir = os.path.join(ROOT, args.datadir)
    sampled = fd.score(np.load(os.path.join(expdir, "samples.npy")), datadir)
    floor = fd.calibration(datadir)["real"]["fd"]
    figures = [f"{sampled['fd']:.0f} ({floor:.0f})", f"{sampled['coverage'] * 10:.0f}/10",
               f"{speed:.2f} ({final['step']} steps, {rows[-1]['critic_steps']} critic)",
               f"{final['wasserstein_test']:.4g}"]
    return " ".join(shown), figures


def bench_nerf(args, extra, script="nerf"):
    """tiny_nerf.py or tiny_tensorf.py on lego: the same protocol and figures."""
    name = f"{script}_" + "_".join([f"{args.minutes:g}min"] + [e.strip("-") for e in extra])
    shown = ["python", f"tiny_{script}.py", "--datadir", "../shared/data", "--testskip", "50",
             "--max_minutes", f"{args.minutes:g}"] + extra
    run([sys.executable] + shown[1:] + ["--basedir", RUNS, "--expname", name, "--no_reload"])
    rows = [json.loads(line) for line in open(os.path.join(RUNS, name, "metrics.jsonl"))]
    test = [r for r in rows if "test_psnr" in r][-1]
    step, seconds = test["step"], max(r.get("seconds", 0) for r in rows)
    figures = [f"{test['test_psnr']:.2f}", f"{test['test_ssim']:.3f}", str(step), f"{seconds / step:.2f}"]
    return " ".join(shown), figures


def append_row(script, command, figures, minutes):
    title, header = SECTIONS[script]
    row = "| " + " | ".join([datetime.date.today().isoformat(), machine(), torch.__version__, f"`{command}`",
                             f"{minutes:g} min"] + figures) + " |"
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    lines = text.rstrip("\n").split("\n")
    if f"## {title}" not in lines:
        lines += ["", f"## {title}", "", *header.split("\n")]
        end = len(lines)
    else:
        end = lines.index(f"## {title}") + 1
        while end < len(lines) and (not lines[end].strip() or not lines[end].startswith("|")):
            end += 1                                                   # skip notes down to the table
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
    lines.insert(end, row)
    tmp = RESULTS + ".tmp"
    open(tmp, "w").write("\n".join(lines) + "\n")
    os.replace(tmp, RESULTS)
    print(row)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("script", choices=sorted(SECTIONS))
    p.add_argument("--minutes", type=float, required=True, help="training budget (--max_minutes)")
    p.add_argument("--datadir", default="../shared/data/mnist_small", help="MNIST data root (vae, wgan)")
    p.add_argument("--iw_samples", type=int, default=1000)
    p.add_argument("--dry", action="store_true", help="print the row, do not append it to results.md")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)            # flags after -- go to the script
    args, extra = p.parse_args(argv[:cut]), argv[cut + 1:]
    bench = {"vae": bench_vae, "wgan": bench_wgan, "nerf": bench_nerf, "tensorf": lambda a, e: bench_nerf(a, e, "tensorf")}
    command, figures = bench[args.script](args, extra)
    if args.dry:
        print(" | ".join([command] + figures))
    else:
        append_row(args.script, command, figures, args.minutes)


if __name__ == "__main__":
    main()
