"""The quick start's speed levers, side by side: train.py's real run (digits, batch 64, 16x16x1,
log every 50 steps) of DiC-Tiny at its own width (32) and at the quick start's (16), fp32 or bf16,
in 1 or 2 single-thread processes (torchrun, gloo), every configuration once per round, rounds in
turns, the median of each configuration's steady steps/s (train.py's last logged window) and of
its whole wall time (start-up included).

    python bench/quickstart_levers.py                       # 200 steps, 2 rounds (about 10 minutes)
    python bench/quickstart_levers.py --steps 100 --rounds 1 --configs 16:bf16:2 32:fp32:1

A configuration is WIDTH:PRECISION:PROCESSES. bf16 configurations are skipped where the CPU has no
bf16 instructions (there bf16 is a trap: helpers/utils/fastpath.py).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

DEFAULT_CONFIGS = ["32:fp32:1", "32:bf16:1", "32:bf16:2", "16:fp32:1", "16:bf16:1", "16:fp32:2", "16:bf16:2"]


def run_once(width, precision, processes, steps, folder):
    """(steady steps/s, wall seconds) of one train.py run."""
    flags = ["--dataset", "digits", "--model", "DiC-Tiny", "--image-size", "16", "--global-batch-size", "64",
             "--lr", "4e-3", "--ema-decay", "0.999", "--ema-warmup", "--max-steps", str(steps),
             "--ckpt-every", str(steps), "--log-every", "50", "--num-workers", "0", "--no-progress",
             "--results-dir", folder, "--precision", precision, f"--network_g__hidden_size={width}"]
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                    str(processes)] if processes > 1 else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run([*launcher, os.path.join(REPO_ROOT, "train.py"), *flags], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({width}:{precision}:{processes}):\n{proc.stderr[-2000:]}")
    rates = re.findall(r"Train Steps/Sec: ([0-9.]+)", proc.stdout + proc.stderr)
    return float(rates[-1]), wall


def main(args):
    from helpers.utils import fastpath
    native = fastpath.bf16_support("cpu").native
    configs = []
    for text in args.configs:
        width, precision, processes = text.split(":")
        if precision == "bf16" and not native:
            print(f"skipping {text}: this CPU has no bf16 instructions")
            continue
        configs.append((int(width), precision, int(processes)))
    results = {config: [] for config in configs}
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            for config in configs:
                results[config].append(run_once(*config, args.steps, os.path.join(folder, f"{round_index}")))
                print(f"round {round_index + 1}: width {config[0]}, {config[1]}, {config[2]} process(es): "
                      f"{results[config][-1][0]:.2f} steps/s, {results[config][-1][1]:.1f} s", flush=True)
    base = statistics.median(rate for rate, _ in results[configs[0]])
    print(f"\n| width | precision | processes | steps/s (median) | vs {configs[0][0]}:{configs[0][1]}:{configs[0][2]} "
          f"| wall of {args.steps} steps |")
    print("|---:|---|---:|---:|---:|---:|")
    for config, runs in results.items():
        rate, wall = statistics.median(r for r, _ in runs), statistics.median(w for _, w in runs)
        print(f"| {config[0]} | {config[1]} | {config[2]} | {rate:.2f} | {rate / base:.2f}x | {wall:.1f} s |")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Time the quick start's levers (width, precision, processes).")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="WIDTH:PRECISION:PROCESSES ...")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
