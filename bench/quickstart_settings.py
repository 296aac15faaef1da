"""Which precision / channels_last / compile / thread count trains the quick start's model fastest on
this machine: train.py's step (DDPM loss, backward, fused AdamW, foreach EMA) of DiC-Tiny on 16x16
one-channel digits at batch 64 (quickstart.py's recipe), every setting timed in turns (one step of
each per round, median per setting), and what helpers.utils.fastpath.fastest_settings() picks.

    OMP_NUM_THREADS=1 python bench/quickstart_settings.py                # eager settings, 1 and 2 threads
    OMP_NUM_THREADS=1 python bench/quickstart_settings.py --compile      # + compiled rows (minutes)

Wall time is what a user waits for; CPU time is steadier on a shared machine, but counts a second
thread's work (and spinning) too, so compare thread counts by wall time.
"""
import argparse
import copy
import os
import statistics
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from diffusion import create_diffusion  # noqa: E402
from helpers.utils import fastpath  # noqa: E402
from helpers.utils.models import create_model  # noqa: E402

SIDE, CHANNELS, CLASSES = 16, 1, 10   # quickstart.py: --image-size 16, built-in digits (grey, 10 classes)


def settings_to_time(threads, compiled):
    """name -> (precision, channels_last, compile, threads) of the rows to time: fp32 and bf16,
    NCHW and channels_last, 1 thread and `threads`; with `compiled`, compiled fp32 and bf16."""
    rows = {}
    for threads in sorted({1, threads}):
        for precision in ("fp32", "bf16"):
            for channels_last in (False, True):
                rows[f"{precision}{' + channels_last' if channels_last else ''}, {threads} thread(s)"] = (
                    precision, channels_last, False, threads)
    if compiled:
        for precision in ("fp32", "bf16"):
            rows[f"{precision} + compile, 1 thread(s)"] = (precision, False, True, 1)
    return rows


def make_step(base, setting, batch, diffusion, seed=0):
    """train.py's step for one (precision, channels_last, compile, threads) setting; returns
    (step, seconds spent building and warming up, i.e. compiling for a compiled row)."""
    precision, channels_last, compiled, threads = setting
    start = time.perf_counter()
    model = copy.deepcopy(base).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    if channels_last:
        fastpath.to_channels_last(model)
        fastpath.to_channels_last(ema)
    opt = fastpath.make_adamw(model.parameters(), lr=1e-3)
    forward = fastpath.autocast_forward(fastpath.maybe_compile(model, compiled), "cpu", precision)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, SIDE, SIDE, generator=g)
    y = torch.randint(0, CLASSES, (batch,), generator=g)
    if channels_last:
        forward = nhwc_input(forward)

    def step():
        torch.set_num_threads(threads)
        t = torch.randint(0, diffusion.num_timesteps, (batch,))
        loss = diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fastpath.ema_update(ema, model, 0.999)

    for _ in range(3 if compiled else 2):
        step()
    return step, time.perf_counter() - start


def nhwc_input(forward):
    """`forward` fed its (N, C, H, W) input in channels_last, as train.py's --channels-last."""
    def call(x, *args, **kwargs):
        return forward(fastpath.channels_last_input(x), *args, **kwargs)
    return call


def time_in_turns(steps, rounds):
    """{name: (median wall s, median CPU s)} over `rounds` rounds of one step of each."""
    walls, cpus = {k: [] for k in steps}, {k: [] for k in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            w, c = time.perf_counter(), time.process_time()
            step()
            walls[name].append(time.perf_counter() - w)
            cpus[name].append(time.process_time() - c)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in steps}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64, help="quickstart.py's --batch-size")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (one step of every setting each)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="the other thread count to time (default: all)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile rows (compiling takes minutes)")
    args = p.parse_args(argv)
    print(fastpath.precision_line("tf32", fastpath.bf16_support("cpu")), flush=True)
    diffusion = create_diffusion(timestep_respacing="")
    torch.manual_seed(0)
    base = create_model("DiC-Tiny", input_size=SIDE, in_channels=CHANNELS, num_classes=CLASSES)
    rows = settings_to_time(args.threads, args.compile)
    if not fastpath.bf16_support("cpu").fast:   # reference kernels: ~40x slower, not worth timing
        rows = {k: v for k, v in rows.items() if v[0] != "bf16"}
    steps, build_s = {}, {}
    for name, setting in rows.items():
        steps[name], build_s[name] = make_step(base, setting, args.batch_size, diffusion)
    times = time_in_turns(steps, args.rounds)
    load = os.getloadavg()[0]
    base_wall = times[next(iter(rows))][0]
    print(f"\nDiC-Tiny, batch {args.batch_size}, {SIDE}x{SIDE}x{CHANNELS}; {args.rounds} rounds in turns; "
          f"load average {load:.1f} on {os.cpu_count()} cores\n")
    print("| setting | ms/step (wall) | ms/step (CPU time) | vs fp32 1 thread (wall) | build + warm-up s |")
    print("|---|---:|---:|---:|---:|")
    for name, (wall, cpu) in times.items():
        print(f"| {name} | {wall * 1000:.0f} | {cpu * 1000:.0f} | {base_wall / wall:.2f}x | {build_s[name]:.1f} |")
    print(f"\nfastest_settings(): {fastpath.fastest_settings('cpu')}")


if __name__ == "__main__":
    main()
