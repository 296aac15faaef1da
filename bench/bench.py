"""Speed benchmark for DiC and DiT: training throughput, sampling latency, peak memory, GMACs and
latent loading, in one run, with markdown tables (and --json).

    python bench/bench.py                          # CPU quick set: DiC-S vs DiT-S/2, batch 4, 32x32 latents
    python bench/bench.py --models all             # DiC-S/B/XL/H and DiT-S/2, B/2, L/2, XL/2
    python bench/bench.py --device cuda --compile  # GPU defaults (batch 32, full sampling chains)
    python bench/bench.py --no-train --no-sample --no-data --grad-checkpointing-memory  # new sections + XL

What is timed (warm-up iterations excluded, median of the timed ones):
- training: one step as train.py does it: t ~ U{0..999}, diffusion.training_losses (eps MSE + VB,
  learned sigma), backward, AdamW step, EMA update. "eager" is DiT's recipe (fp32, NCHW,
  torch.optim.AdamW defaults, per-parameter EMA); "fast" is helpers/utils/fastpath.py's path (bf16
  autocast + fused AdamW + foreach EMA; + channels_last with --channels-last; + a
  torch.compile row with --compile). The ablation rows add one component at a time to eager,
  and time the fast path with the other memory format.
- sampling: DDPM-250 and DDIM-50 with classifier-free guidance (scale 1.5; the batch holds n images
  + n null-label rows, as DiT's sample.py). With --sample-steps-scale < 1 only a few steps are
  timed and the per-step median is multiplied by the step count: such latencies are marked
  "extrapolated".
- memory: CUDA: torch.cuda.max_memory_allocated over the config (model, EMA, optimizer state and
  activations). CPU: the rise of the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs before each config) over the resident set before it.
- GMACs: one forward at batch 1 on the meta device under torch.utils.flop_counter.FlopCounterMode
  (conv, linear and attention matmuls; MACs = FLOPs / 2), checked against the papers' numbers.
- flow matching: the SiT step (Linear path, velocity, learn_sigma=False model) vs the DDPM step,
  same batch and config, timed in turns (--extra-configs picks the configs of this and the next two).
- SiT sampling: helpers.sampling.samplers.ReverseProcess, ODE dopri5 / euler-50 / heun2-50 and SDE
  Euler-250, CFG as above; NFE counted; on CPU a short solve is timed and scaled by the full NFE.
  With random weights dopri5's NFE says nothing about a trained model's.
- REPA: SiT step vs SiT + REPA step (DINOv2 encoder with random weights on the batch's images,
  projector on DiC's enc1 / DiT's block4, projection loss), and the encoder forward alone.
- gradient checkpointing: peak memory and time of one fp32 forward + backward with and without
  set_grad_checkpointing(True) (--grad-checkpointing-memory adds DiC-XL and DiT-XL/2).
- data: random-order batches of latents from the official per-file .npy layout vs one packed,
  memory-mapped .npy array, both written to a temp dir (warm page cache), compared with the
  training step's consumption rate.
"""
import argparse
import contextlib
import copy
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from diffusion import create_diffusion  # noqa: E402
from helpers.utils.fastpath import (adamw_implementation, autocast_forward, channels_last_input,  # noqa: E402
                              configure_tf32, ema_update, ema_update_reference, make_adamw,
                              maybe_compile, to_channels_last)
from helpers.utils.files import atomic_write_text  # noqa: E402
from helpers.utils.models import create_model, model_names  # noqa: E402

QUICK_MODELS = ["DiC-S", "DiT-S/2"]
ALL_MODELS = ["DiC-S", "DiC-B", "DiC-XL", "DiC-H", "DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"]
# DiC vs the DiT of similar GMACs (the DiC paper's comparisons)
PAIRS = [("DiC-S", "DiT-S/2"), ("DiC-B", "DiT-B/2"), ("DiC-XL", "DiT-XL/2"), ("DiC-H", "DiT-XL/2")]
# GMACs at 256px (32x32 latents): DiC paper / shared/spec/DIC.md; DiT paper Table 1 ("Gflops")
SPEC_GMACS_256 = {"DiC-S": 5.87, "DiC-B": 23.44, "DiC-XL": 116.10, "DiC-H": 204.32,
                  "DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64}
EMA_DECAY = 0.9999
CFG_SCALE = 1.5
SAMPLERS = (("DDPM-250", "250"), ("DDIM-50", "ddim50"))


#################################################################################
#                                   Machine                                     #
#################################################################################

def describe_machine(device, threads):
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu, "logical_cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": threads, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "device": str(device), "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    tf32=torch.backends.cuda.matmul.allow_tf32)
    try:
        info["load_average_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


#################################################################################
#                                Timing & memory                                #
#################################################################################

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the next RSS base is honest


class PeakMemory:
    """Peak memory of what runs between start() and stop(), in MiB, with how it was measured."""

    def __init__(self, device):
        self.device = device

    def start(self):
        _release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated"
            return self
        self.base = _read_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.method = "peak RSS rise (VmHWM reset)"
        except OSError:
            self.method = "peak RSS rise (process high-water mark, not resettable: lower bound)"
        return self

    def stop(self):
        sync(self.device)
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _read_status_kib("VmHWM")
        if peak is None or self.base is None:
            return None
        return max(0, peak - self.base) / 1024


def time_calls(fn, device, warmup, iters):
    """(median wall s, median process-CPU s, first call s) over `iters` calls after `warmup` calls."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(iters):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), first


#################################################################################
#                                   Configs                                     #
#################################################################################

def _add_fast_rows(configs, fast, args):
    """The rows training and sampling share, after their eager ones: (ablation) the fast path
    with the other memory format, then fast, then (--compile) fast + compile."""
    if args.ablation:
        if fast["channels_last"]:
            configs["fast without channels_last"] = {**fast, "channels_last": False}
        else:
            configs["fast + channels_last"] = {**fast, "channels_last": True}
    configs["fast"] = fast
    if args.compile:
        configs["fast + compile"] = {**fast, "compile": True}
    return configs


def train_configs(args):
    """name -> settings. eager = DiT's recipe; fast = the fastpath switches (channels_last per
    --channels-last); ablation = one switch at a time, and fast with the other memory format."""
    eager = dict(precision="fp32", channels_last=False, fused_adamw=False, foreach_ema=False, compile=False)
    fast = dict(precision="bf16", channels_last=args.fast_channels_last, fused_adamw=True, foreach_ema=True,
                compile=False)
    configs = {"eager fp32": eager}
    if args.ablation:
        configs["+channels_last"] = {**eager, "channels_last": True}
        configs["+bf16"] = {**eager, "precision": "bf16"}
        configs["+fused AdamW, foreach EMA"] = {**eager, "fused_adamw": True, "foreach_ema": True}
    return _add_fast_rows(configs, fast, args)


def sample_configs(args):
    """eager fp32 vs fast (bf16 autocast, channels_last per --channels-last) [+ compile]."""
    fast = dict(precision="bf16", channels_last=args.fast_channels_last, compile=False)
    configs = {"eager fp32": dict(precision="fp32", channels_last=False, compile=False)}
    return _add_fast_rows(configs, fast, args)


#################################################################################
#                                     GMACs                                     #
#################################################################################

def count_gmacs(name, latent_size, in_channels=4):
    """Forward GMACs at batch 1 (meta device: no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = create_model(name, input_size=latent_size, in_channels=in_channels).eval()
        x = torch.randn(1, in_channels, latent_size, latent_size)
        t = torch.zeros(1, dtype=torch.long)
        y = torch.zeros(1, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    params = sum(p.numel() for p in model.parameters())
    return counter.get_total_flops() / 2e9, params


#################################################################################
#                                   Training                                    #
#################################################################################

def bench_train(name, base, cfg, args, device, diffusion):
    """Time train.py's step for one config; returns a result dict."""
    mem = PeakMemory(device).start()
    model = copy.deepcopy(base).to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    if cfg["channels_last"]:
        to_channels_last(model)
        to_channels_last(ema)
    if cfg["fused_adamw"]:
        opt = make_adamw(model.parameters(), lr=1e-4, weight_decay=0)
        opt_kind = adamw_implementation(list(model.parameters()))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)  # DiT's line
        opt_kind = "torch default"
    update = ema_update if cfg["foreach_ema"] else ema_update_reference
    forward = autocast_forward(maybe_compile(model, cfg["compile"]), device, cfg["precision"])

    g = torch.Generator(device="cpu").manual_seed(args.seed)
    n, L = args.batch_size, args.latent_size
    x = torch.randn(n, 4, L, L, generator=g).to(device)
    y = torch.randint(0, 1000, (n,), generator=g).to(device)
    if cfg["channels_last"]:
        x = channels_last_input(x)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (n,), device=device)
        loss = diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update(ema, model, EMA_DECAY)

    warmup = args.warmup + (2 if cfg["compile"] else 0)
    try:
        wall, cpu, first = time_calls(step, device, warmup, args.iters)
        peak = mem.stop()
        result = dict(step_s=wall, images_per_s=n / wall, cpu_s=cpu,
                      images_per_cpu_s=n / cpu if cpu > 0 else None,
                      first_step_s=first, peak_mib=peak, memory_method=mem.method, optimizer=opt_kind,
                      **cfg)
    except torch.cuda.OutOfMemoryError:
        result = dict(error="out of memory", **cfg)
    del model, ema, opt, forward, x, y
    _release_memory(device)
    print(f"  train {name:9s} {cfg_label(result)}", flush=True)
    return result


def cfg_label(r):
    if "error" in r:
        return r["error"]
    return f"{r['step_s'] * 1000:8.1f} ms/step  {r['images_per_s']:7.2f} img/s  peak {fmt(r['peak_mib'], '.0f')} MiB"


#################################################################################
#                                   Sampling                                    #
#################################################################################

def _sample_loop(diffusion, kind, model_fn, z, model_kwargs, device):
    if kind.startswith("DDIM"):
        return diffusion.ddim_sample_loop_progressive(model_fn, z.shape, noise=z, clip_denoised=False,
                                                      model_kwargs=model_kwargs, device=device, eta=0.0)
    return diffusion.p_sample_loop_progressive(model_fn, z.shape, noise=z, clip_denoised=False,
                                               model_kwargs=model_kwargs, device=device)


def time_sampler(diffusion, kind, model_fn, z, model_kwargs, device, timed_steps):
    """Per reverse step: median wall s, median process-CPU s, and the wall total over
    `timed_steps` steps (after one warm-up step); with timed_steps = all steps the total is the
    real chain latency."""
    warm = _sample_loop(diffusion, kind, model_fn, z, model_kwargs, device)
    next(warm)
    warm.close()
    sync(device)
    walls, cpus = [], []
    loop = _sample_loop(diffusion, kind, model_fn, z, model_kwargs, device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in loop:
        sync(device)
        now, cnow = time.perf_counter(), time.process_time()
        walls.append(now - t0)
        cpus.append(cnow - c0)
        t0, c0 = now, cnow
        if len(walls) >= timed_steps:
            break
    loop.close()
    return statistics.median(walls), statistics.median(cpus), sum(walls)


def bench_sample(name, base, cfg, args, device):
    mem = PeakMemory(device).start()
    model = copy.deepcopy(base).to(device).eval()
    if cfg["channels_last"]:
        to_channels_last(model)
    # compile the whole guided forward (network + guidance arithmetic) when asked
    compiled = maybe_compile(model.forward_with_cfg, cfg["compile"])
    model_fn = autocast_forward(compiled, device, cfg["precision"])
    n, L = args.sample_batch, args.latent_size
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    z = torch.randn(n, 4, L, L, generator=g)
    y = torch.randint(0, 1000, (n,), generator=g)
    z = torch.cat([z, z], 0).to(device)                         # (2n, 4, L, L): [cond; uncond]
    y = torch.cat([y, torch.full((n,), 1000)], 0).to(device)    # null label = num_classes
    if cfg["channels_last"]:
        z = channels_last_input(z)
    model_kwargs = dict(y=y, cfg_scale=CFG_SCALE)
    result = dict(cfg)
    try:
        with torch.no_grad():
            if cfg["compile"]:                                   # compile outside the timings
                t0 = time.perf_counter()
                model_fn(z, torch.zeros(2 * n, dtype=torch.long, device=device), **model_kwargs)
                sync(device)
                result["compile_s"] = time.perf_counter() - t0
            for label, respacing in SAMPLERS:
                diffusion = create_diffusion(respacing)
                total = diffusion.num_timesteps
                timed = total if args.sample_steps_scale >= 1 else \
                    min(total, max(args.min_sample_steps, math.ceil(args.sample_steps_scale * total)))
                per_step, cpu_step, measured = time_sampler(diffusion, label, model_fn, z, model_kwargs,
                                                            device, timed)
                latency = measured if timed == total else per_step * total
                result[label] = dict(steps=total, timed_steps=timed, extrapolated=timed < total,
                                     step_s=per_step, batch_latency_s=latency, per_image_s=latency / n,
                                     cpu_step_s=cpu_step, per_image_cpu_s=cpu_step * total / n, images=n)
        result["peak_mib"] = mem.stop()
        result["memory_method"] = mem.method
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
    del model, compiled, model_fn, z, y
    _release_memory(device)
    if "error" in result:
        print(f"  sample {name:9s} {result['error']}", flush=True)
    else:
        print(f"  sample {name:9s} " + "  ".join(
            f"{label} {result[label]['per_image_s']:.3f} s/img" for label, _ in SAMPLERS), flush=True)
    return result


#################################################################################
#                     Flow matching, REPA, gradient checkpointing               #
#################################################################################

def time_alternating(fns, device, warmup, iters):
    """{name: (median wall s, median process-CPU s)} of callables timed in turns (one call each per
    round, through time_calls), so load changes on a shared machine hit every one alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    walls, cpus = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            wall, cpu, _ = time_calls(fn, device, 0, 1)
            walls[k].append(wall)
            cpus[k].append(cpu)
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in fns}


def make_trainer(model, cfg, device, extra_params=()):
    """(forward, step(loss_fn)) for one config: the optimizer over model (+ extra) parameters and
    the EMA as bench_train's; step(loss_fn) runs loss_fn(forward) + backward + AdamW + EMA."""
    model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    if cfg["channels_last"]:
        to_channels_last(model)
        to_channels_last(ema)
    params = list(model.parameters()) + list(extra_params)
    opt = make_adamw(params, lr=1e-4, weight_decay=0) if cfg["fused_adamw"] else \
        torch.optim.AdamW(params, lr=1e-4, weight_decay=0)
    update = ema_update if cfg["foreach_ema"] else ema_update_reference
    forward = autocast_forward(maybe_compile(model, cfg["compile"]), device, cfg["precision"])

    def step(loss_fn):
        loss = loss_fn(forward)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update(ema, model, EMA_DECAY)
    return forward, step


def train_batch(args, device, n, channels_last=False):
    """The fixed (latents, labels) batch of the training rows."""
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    x = torch.randn(n, 4, args.latent_size, args.latent_size, generator=g).to(device)
    y = torch.randint(0, 1000, (n,), generator=g).to(device)
    return (channels_last_input(x) if channels_last else x), y


def bench_sit_train(name, cfg, args, device):
    """DDPM step (learned sigma, as train.py) vs SiT flow-matching step (Linear, velocity,
    learn_sigma=False), same batch and config, timed in turns."""
    from helpers.training.objectives import DDPM, SiT
    torch.manual_seed(args.seed)
    steps = {}
    for label, objective, learn_sigma in (("DDPM", DDPM(), True), ("SiT", SiT("Linear", "velocity"), False)):
        model = create_model(name, input_size=args.latent_size, learn_sigma=learn_sigma)
        forward, step = make_trainer(model, cfg, device)
        x, y = train_batch(args, device, args.batch_size, cfg["channels_last"])
        loss_fn = (lambda obj, x, y: lambda f: obj.training_losses(f, x, dict(y=y))["loss"].mean())(objective, x, y)
        steps[label] = (lambda step, loss_fn: lambda: step(loss_fn))(step, loss_fn)
    times = time_alternating(steps, device, args.warmup, args.iters)
    n = args.batch_size
    result = {k: dict(step_s=w, cpu_s=c, images_per_s=n / w, images_per_cpu_s=n / c) for k, (w, c) in times.items()}
    del steps
    _release_memory(device)
    print(f"  sit-train {name:9s} {cfg['name']}: DDPM {result['DDPM']['images_per_s']:.2f} img/s, "
          f"SiT {result['SiT']['images_per_s']:.2f} img/s", flush=True)
    return result


SIT_SOLVERS = (("ODE dopri5", "ode", "dopri5", 50), ("ODE euler-50", "ode", "euler", 50),
               ("ODE heun2-50", "ode", "heun2", 50), ("SDE Euler-250", "sde", "Euler", 250))


def sit_sampler_args(mode, method, steps):
    """The ReverseProcess settings of sample.py's SiT defaults for one solver."""
    from types import SimpleNamespace
    return SimpleNamespace(sampler="ddpm", mode=mode, sampling_method=method, num_sampling_steps=steps,
                           atol=1e-6, rtol=1e-3, reverse=False, diffusion_form="sigma", diffusion_norm=1.0,
                           last_step="Mean", last_step_size=0.04)


def count_calls(fn):
    """fn wrapped to count its calls in .calls."""
    def counted(*a, **k):
        counted.calls += 1
        return fn(*a, **k)
    counted.calls = 0
    return counted


def bench_sit_sample(name, cfg, args, device):
    """Latency per image of SiT's ODE/SDE solvers (helpers.sampling.samplers.ReverseProcess, CFG as the DDPM
    rows) for a learn_sigma=False model; with --sample-steps-scale < 1 a short solve is timed and
    scaled by the NFE of the full one (counted on a free zero field where the model's is zero)."""
    from helpers.training.objectives import SiT
    from helpers.sampling.samplers import ReverseProcess
    from helpers.sampling.setup import IndexNoise, make_model_fn
    torch.manual_seed(args.seed)
    model = create_model(name, input_size=args.latent_size, learn_sigma=False).to(device).eval()
    model_fn = make_model_fn(model, CFG_SCALE, precision=cfg["precision"], channels_last=cfg["channels_last"],
                             compile=cfg["compile"])
    n, shape, objective = args.sample_batch, (4, args.latent_size, args.latent_size), SiT("Linear", "velocity").config()
    noise = IndexNoise(args.seed, range(n))
    labels = noise.labels(1000)
    result = dict(images=n)
    with torch.no_grad():
        x0 = noise.randn(shape, device=device)
        t0 = torch.zeros(n, device=device)
        result["zero_field"] = bool(model_fn(x0, t0, labels.to(device)).abs().max() == 0)   # also the warm-up
        zero_fn = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
        per_nfe = None
        for label, mode, method, steps in sorted(SIT_SOLVERS, key=lambda s: s[2] == "dopri5"):  # euler first
            adaptive = method == "dopri5"
            full = args.sample_steps_scale >= 1
            counter = count_calls(model_fn if (full or (adaptive and not result["zero_field"])) else zero_fn)
            sampler = ReverseProcess(sit_sampler_args(mode, method, steps), objective, 4)
            solve = lambda s=sampler, f=counter: s(f, noise, labels, shape, device)  # noqa: E731
            if full or (adaptive and not result["zero_field"]):
                wall, cpu, _ = time_calls(solve, device, 0, 1)
                nfe = counter.calls
                result[label] = dict(nfe=nfe, timed_nfe=nfe, batch_latency_s=wall, cpu_s=cpu, extrapolated=False)
            else:
                solve()
                nfe = counter.calls                                            # the full solve's NFE
                if adaptive:                                                   # per-NFE cost of euler's short run
                    wall, cpu, timed = per_nfe[0] * nfe, per_nfe[1] * nfe, 0
                else:
                    k = max(args.min_sample_steps, math.ceil(args.sample_steps_scale * (steps - 1)))
                    short = ReverseProcess(sit_sampler_args(mode, method, k + 1), objective, 4)
                    counter_short = count_calls(model_fn)
                    w, c, _ = time_calls(lambda: short(counter_short, noise, labels, shape, device), device, 0, 1)
                    timed = counter_short.calls
                    wall, cpu = w / timed * nfe, c / timed * nfe
                    if method == "euler":
                        per_nfe = (w / timed, c / timed)
                result[label] = dict(nfe=nfe, timed_nfe=timed, batch_latency_s=wall, cpu_s=cpu, extrapolated=True)
            r = result[label]
            r.update(per_image_s=r["batch_latency_s"] / n, per_image_cpu_s=r["cpu_s"] / n,
                     ms_per_nfe=1000 * r["batch_latency_s"] / r["nfe"])
    del model, model_fn
    _release_memory(device)
    print(f"  sit-sample {name:9s} {cfg['name']}: " + "  ".join(
        f"{label} {result[label]['per_image_s']:.2f} s/img (NFE {result[label]['nfe']})" for label, *_ in SIT_SOLVERS),
        flush=True)
    return result


def repa_stage(name):
    """REPA's alignment point: DiC's enc1 stage (16x16 at 32x32 latents), DiT's block 4."""
    return "block4" if name.startswith("DiT") else "enc1"


def bench_repa(name, cfg, args, device):
    """SiT step vs SiT + REPA step (encoder on the batch's images, 256 px -> 224, projector on the
    stage's features from the same forward, projection loss x 0.5, backward through model and
    projector), and the encoder forward alone, timed in turns on the same batch."""
    import timm

    from helpers.training.objectives import SiT
    from helpers.training.repa import ENCODERS, Projector, encoder_input_size, encoder_tokens, preprocess, projection_loss
    timm_name, z_dim, _ = ENCODERS[args.repa_encoder]
    side = args.image_size                                   # encoder input 224 px per 256 px of image
    encoder = timm.create_model(timm_name, pretrained=False, img_size=encoder_input_size(side),
                                num_classes=0)               # random weights: the same cost as DINOv2's
    encoder = encoder.to(device).eval().requires_grad_(False)
    encode = autocast_forward(lambda im: encoder_tokens(encoder, preprocess(im, side)).float(), device,
                              cfg["precision"])
    objective, stage, n = SiT("Linear", "velocity"), repa_stage(name), args.repa_batch
    x, y = train_batch(args, device, n, cfg["channels_last"])
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    torch.manual_seed(args.seed)
    base = create_model(name, input_size=args.latent_size, learn_sigma=False)
    _, plain_step = make_trainer(copy.deepcopy(base), cfg, device)
    model = copy.deepcopy(base)
    projector = Projector(model.feature_channels(stage), z_dim, conv=stage.startswith(("enc", "mid", "dec")))
    projector.to(device).train()
    _, repa_step = make_trainer(model, cfg, device, extra_params=projector.parameters())
    project = autocast_forward(projector, device, cfg["precision"])
    del base

    def plain_loss(f):
        return objective.training_losses(f, x, dict(y=y))["loss"].mean()

    feats = {}

    def tapped(x_t, t, y):                      # one forward: output for the loss, features for REPA
        out, feats["h"] = model(x_t, t, y, return_features=(stage,))
        return out
    tapped = autocast_forward(tapped, device, cfg["precision"])

    def repa_loss(_):
        loss = objective.training_losses(tapped, x, dict(y=y))["loss"].mean()
        z = encode(images)
        proj, _ = projection_loss([project(feats.pop("h")[stage])], [z])
        return loss + 0.5 * proj

    times = time_alternating({"plain": lambda: plain_step(plain_loss), "REPA": lambda: repa_step(repa_loss),
                              "encoder": lambda: encode(images)}, device, args.warmup, args.iters)
    result = {k: dict(step_s=w, cpu_s=c) for k, (w, c) in times.items()}
    result.update(batch=n, encoder_name=f"{args.repa_encoder} ({timm_name}, random weights)", stage=stage,
                  projector_params=sum(p.numel() for p in projector.parameters()),
                  encoder_precision="bf16 autocast" if cfg["precision"] == "bf16" else "fp32")
    del encoder, encode, model, projector, tapped, plain_step, repa_step, project
    _release_memory(device)
    print(f"  repa {name:9s} {cfg['name']}: plain {result['plain']['step_s'] * 1000:.0f} ms, REPA "
          f"{result['REPA']['step_s'] * 1000:.0f} ms, encoder {result['encoder']['step_s'] * 1000:.0f} ms "
          f"(batch {n})", flush=True)
    return result


def bench_grad_checkpointing(name, args, device):
    """Peak memory and time of one fp32 forward + backward (DDPM loss, no optimizer) with and without
    model.set_grad_checkpointing(True), at --gc-batch; weights and grads are allocated before the
    measured step, so the peak rise is activations and temporaries."""
    diffusion = create_diffusion(timestep_respacing="")
    torch.manual_seed(args.seed)
    model = create_model(name, input_size=args.latent_size).to(device).train()
    x, y = train_batch(args, device, args.gc_batch)
    t = torch.randint(0, diffusion.num_timesteps, (args.gc_batch,), generator=torch.Generator().manual_seed(0))
    t = t.to(device)

    def fwd_bwd(checkpointing):
        def run():
            model.set_grad_checkpointing(checkpointing)
            diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean().backward()
        return run
    result = dict(batch=args.gc_batch, params=sum(p.numel() for p in model.parameters()))
    try:
        fwd_bwd(False)()                                                     # allocates the grads
        for label, on in (("off", False), ("on", True)):
            fwd_bwd(on)()                                                    # warm-up of this variant
            mem = PeakMemory(device).start()
            fwd_bwd(on)()
            result[f"peak_mib_{label}"] = mem.stop()
            result["memory_method"] = mem.method
        times = time_alternating({"off": fwd_bwd(False), "on": fwd_bwd(True)}, device, 0, args.gc_iters)
        result.update({f"step_s_{k}": w for k, (w, c) in times.items()},
                      **{f"cpu_s_{k}": c for k, (w, c) in times.items()})
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
    model.set_grad_checkpointing(False)
    del model
    _release_memory(device)
    if "error" not in result:
        print(f"  grad-ckpt {name:9s} batch {args.gc_batch}: peak {fmt(result['peak_mib_off'], '.0f')} -> "
              f"{fmt(result['peak_mib_on'], '.0f')} MiB, step {result['step_s_off']:.2f} -> "
              f"{result['step_s_on']:.2f} s", flush=True)
    return result


#################################################################################
#                                 Data loading                                  #
#################################################################################

def bench_data(args):
    """samples/s of random-order batch reads: official per-file .npy vs a packed memory-mapped .npy."""
    num, batch, L = args.data_samples, args.data_batch, args.latent_size
    rng = np.random.default_rng(args.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="dic_bench_latents_") as root:
        feat_dir = os.path.join(root, "imagenet256_features")
        label_dir = os.path.join(root, "imagenet256_labels")
        os.makedirs(feat_dir)
        os.makedirs(label_dir)
        latents = rng.standard_normal((num, 1, 4, L, L), dtype=np.float32)
        labels = rng.integers(0, 1000, size=(num, 1), dtype=np.int64)
        t0 = time.perf_counter()
        names = [f"{i}_0.npy" for i in range(num)]   # the official release's <index>_<rank>.npy
        for i, file_name in enumerate(names):
            np.save(os.path.join(feat_dir, file_name), latents[i])   # (1, 4, L, L) float32
            np.save(os.path.join(label_dir, file_name), labels[i])   # (1,) int64
        write_files_s = time.perf_counter() - t0
        bytes_per_file = os.path.getsize(os.path.join(feat_dir, names[0]))   # header + 4*L*L float32
        # Packed: plain numpy (the repo's own packed format is timed below, via helpers.data.latents)
        t0 = time.perf_counter()
        np.save(os.path.join(root, "latents.npy"), latents.reshape(num, 4, L, L))
        np.save(os.path.join(root, "labels.npy"), labels.reshape(num))
        write_packed_s = time.perf_counter() - t0
        del latents

        feat_paths = [os.path.join(feat_dir, f) for f in names]
        label_paths = [os.path.join(label_dir, f) for f in names]

        def per_file(idx):  # what DiT/DiC's feature dataset does per item
            x = np.concatenate([np.load(feat_paths[i]) for i in idx])
            y = np.concatenate([np.load(label_paths[i]) for i in idx])
            return torch.from_numpy(x), torch.from_numpy(y)

        packed_x = np.load(os.path.join(root, "latents.npy"), mmap_mode="r")
        packed_y = np.load(os.path.join(root, "labels.npy"), mmap_mode="r")

        def packed(idx):
            return torch.from_numpy(packed_x[idx]), torch.from_numpy(packed_y[idx])

        readers = {"per-file .npy (official layout), np.load per item": per_file,
                   "packed .npy (plain numpy), np.load(mmap_mode='r'), fancy-indexed batch": packed}
        # The repo's own readers: helpers.data.latents.LatentFeatureDataset on both layouts, items
        # collated into a batch as a DataLoader does (layout written by helpers.data.latents.pack_latents).
        from torch.utils.data import default_collate

        from helpers.data.latents import LatentFeatureDataset
        from helpers.data.packing import pack_latents
        files_ds = LatentFeatureDataset(root, layout="files")
        files_ds.labels  # noqa: B018  (read the label files once, as training would)
        t0 = time.perf_counter()
        pack_latents(root, progress=False, log=lambda *a, **k: None)
        write_repo_packed_s = time.perf_counter() - t0
        packed_ds = LatentFeatureDataset(root, layout="packed")

        def collate_from(dataset):
            return lambda idx: default_collate([dataset[int(i)] for i in idx])
        readers["per-file via helpers.data.latents.LatentFeatureDataset (layout=files), per item + collate"] = \
            collate_from(files_ds)
        readers["packed via helpers.data.latents.LatentFeatureDataset (layout=packed), per item + collate"] = \
            collate_from(packed_ds)

        for label, read in readers.items():
            order = rng.permutation(num)
            read(order[:batch])  # warm-up
            t0 = time.perf_counter()
            for start in range(0, num, batch):
                xb, yb = read(order[start:start + batch])
                assert xb.shape[-3:] == (4, L, L) and len(xb) == len(yb)
            seconds = time.perf_counter() - t0
            results[label] = dict(samples_per_s=num / seconds, seconds=seconds)
            print(f"  data  {label}: {num / seconds:,.0f} samples/s", flush=True)
    return dict(samples=num, batch=batch, write_per_file_s=write_files_s, write_packed_s=write_packed_s,
                pack_latents_s=write_repo_packed_s,
                bytes_per_file=bytes_per_file, readers=results,
                note="warm page cache (files just written), one reader thread; cold disk reads of "
                     "many small files are slower")


#################################################################################
#                                    Report                                     #
#################################################################################

def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def timing_basis(res):
    """"cpu" when ratios use process CPU time (CPU device, one thread: steadier on a shared
    machine), else "wall"."""
    m = res["machine"]
    return "cpu" if m["gpu"] is None and m["torch_threads"] == 1 else "wall"


def train_rate(r, basis):
    return r.get("images_per_cpu_s" if basis == "cpu" else "images_per_s")


# Dense bf16 tensor-core peaks in TFLOP/s (vendor datasheets), matched against the GPU's name in
# order (PCIe before the SXM default); --peak-tflops overrides or supplies one for other devices.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("RTX 4090", 165.0))


def peak_tflops(res):
    """The device's dense bf16 peak for MFU, or None when unknown (CPUs unless given)."""
    given = res["settings"].get("peak_tflops")
    if given:
        return given
    gpu = res["machine"].get("gpu") or ""
    return next((peak for name, peak in PEAK_BF16_TFLOPS if name in gpu), None)


def train_tflops(gmacs, images_per_s):
    """Achieved training TFLOP/s: forward + backward cost about 3 forwards, 2 FLOPs per MAC."""
    return 6 * gmacs * images_per_s / 1e3


def sample_latency(r, basis, sampler="DDPM-250"):
    s = r.get(sampler, {})
    return s.get("per_image_cpu_s" if basis == "cpu" else "per_image_s")


def extras_report(res, basis, by):
    """Markdown of the flow-matching, SiT sampling, REPA and gradient checkpointing sections."""
    a, lines = res["settings"], []
    key = "cpu_s" if basis == "cpu" else "step_s"
    sit_train = [(n, c, r) for n, e in res["models"].items() for c, r in e.get("sit_train", {}).items()]
    if sit_train:
        lines += ["### Flow-matching (SiT) training step", "",
                  f"SiT objective (Linear path, velocity, model with learn_sigma=False) vs DDPM (eps + VB, "
                  f"learned sigma), batch {a['batch_size']}, the same config, steps timed in turns.", "",
                  "| model | config | DDPM img/s (wall) | SiT img/s (wall) | DDPM img/s (CPU time) | "
                  "SiT img/s (CPU time) | SiT step / DDPM step |", "|---|---|---:|---:|---:|---:|---:|"]
        for n, c, r in sit_train:
            d, s = r["DDPM"], r["SiT"]
            lines.append(f"| {n} | {c} | {d['images_per_s']:.2f} | {s['images_per_s']:.2f} | "
                         f"{d['images_per_cpu_s']:.2f} | {s['images_per_cpu_s']:.2f} | "
                         f"{fmt(ratio(s[key], d[key]))}x |")
        lines += ["", f"Step-time ratio {by}; < 1 means the SiT step is cheaper.", ""]
    sit_sample = [(n, c, r) for n, e in res["models"].items() for c, r in e.get("sit_sample", {}).items()]
    if sit_sample:
        lines += ["### SiT ODE/SDE sampling latency per image", "",
                  f"helpers.sampling.samplers.ReverseProcess with sample.py's SiT defaults (atol 1e-6, rtol 1e-3; SDE "
                  f"diffusion 'sigma', last step Mean 0.04), learn_sigma=False model, {a['sample_batch']} images "
                  f"+ as many null-label rows, CFG {CFG_SCALE}. Each cell: s/img (wall) and NFE (model calls).", "",
                  "| model | config | " + " | ".join(label for label, *_ in SIT_SOLVERS) +
                  " | ms per NFE (batch, wall) | s/img by CPU time (" + SIT_SOLVERS[-1][0] + ") |",
                  "|---|---|" + "---:|" * (len(SIT_SOLVERS) + 2)]
        for n, c, r in sit_sample:
            cells = []
            for label, *_ in SIT_SOLVERS:
                s = r[label]
                mark = "" if not s["extrapolated"] else \
                    (" (extrapolated from euler's s/NFE)" if s["timed_nfe"] == 0 else
                     f" (extrapolated from {s['timed_nfe']} NFE)")
                cells.append(f"{s['per_image_s']:.2f}, NFE {s['nfe']}{mark}")
            last = r[SIT_SOLVERS[-1][0]]
            lines.append(f"| {n} | {c} | " + " | ".join(cells) + f" | {last['ms_per_nfe']:.0f} | "
                         f"{last['per_image_cpu_s']:.2f} |")
        zero = all(r.get("zero_field") for _, _, r in sit_sample)
        lines += ["", "Every NFE is one guided forward (batch 2n), the cost of a DDPM step, so latency ~ NFE x "
                  "ms per NFE / n. **dopri5's NFE here is not representative of a trained model**: "
                  + ("these models are randomly initialised with a zero-initialised final layer (adaLN-Zero), "
                     "so their velocity field is exactly 0 and dopri5's NFE comes from its step-size control "
                     "alone (counted on a zero field, identical for it); " if zero else
                     "with random weights the field is not a trained model's; ")
                  + "a trained model's NFE, and so its latency, is set by the learned field (rerun with a "
                  "checkpoint through sample.py, which reports the NFE). The fixed-step rows do not depend "
                  "on the weights: euler-50 49 NFE, heun2-50 98, SDE Euler-250 500 (SiT's SDE drift calls "
                  "the model twice per step on the same input, once for the velocity and once for the "
                  "score: transport.Sampler.sample_sde).", ""]
    repa = [(n, c, r) for n, e in res["models"].items() for c, r in e.get("repa", {}).items()]
    if repa:
        r0 = repa[0][2]
        lines += ["### REPA step cost", "",
                  f"SiT step vs SiT + REPA step on the same batch ({r0['batch']} latents + their "
                  f"{a['image_size']} px images), "
                  f"timed in turns: encoder {r0['encoder_name']} on preprocess(images) "
                  f"({a['image_size'] * 224 // 256} px), projector "
                  f"(REPA's MLP 2048-2048, 1x1 convs on DiC's map) on the stage's features from the same "
                  f"forward, -cos projection loss x 0.5, backward through model and projector, AdamW over "
                  f"both, EMA.", "",
                  "| model | config | stage | encoder precision | projector params (M) | plain step ms (wall) | "
                  "REPA step ms (wall) | encoder forward ms (wall) | REPA / plain | encoder / plain |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for n, c, r in repa:
            lines.append(f"| {n} | {c} | {r['stage']} | {r['encoder_precision']} | {r['projector_params'] / 1e6:.1f} | "
                         f"{r['plain']['step_s'] * 1000:.0f} | {r['REPA']['step_s'] * 1000:.0f} | "
                         f"{r['encoder']['step_s'] * 1000:.0f} | {fmt(ratio(r['REPA'][key], r['plain'][key]))}x | "
                         f"{fmt(ratio(r['encoder'][key], r['plain'][key]))}x |")
        lines += ["", f"Ratios {by}. The encoder has random weights (DINOv2's cannot be downloaded here): "
                  "the same cost as the real ones. On GPU the encoder may run in bf16 (it runs under the "
                  "config's autocast here: fp32 in eager rows, bf16 in fast rows).", ""]
    gc = res.get("grad_checkpointing")
    if gc:
        lines += ["### Gradient checkpointing", "",
                  "One fp32 forward + backward (DDPM loss, no optimizer step) with and without "
                  "`model.set_grad_checkpointing(True)` (per block, non-reentrant), same batch; weights and "
                  "grads are allocated before the measured step, so the peak is activations and temporaries "
                  f"({next(iter(gc.values())).get('memory_method', '-')}).", "",
                  "| model | params (M) | batch | weights + grads MiB | peak MiB off | peak MiB on | on / off | "
                  "step s off (wall) | step s on (wall) | step time on / off |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        key_off, key_on = ("cpu_s_off", "cpu_s_on") if basis == "cpu" else ("step_s_off", "step_s_on")
        for n, r in gc.items():
            if "error" in r:
                lines.append(f"| {n} | {r['params'] / 1e6:.0f} | {r['batch']} | | {r['error']} | | | | | |")
                continue
            lines.append(f"| {n} | {r['params'] / 1e6:.1f} | {r['batch']} | {8 * r['params'] / 2**20:.0f} | "
                         f"{fmt(r['peak_mib_off'], '.0f')} | {fmt(r['peak_mib_on'], '.0f')} | "
                         f"{fmt(ratio(r['peak_mib_on'], r['peak_mib_off']))} | {r['step_s_off']:.2f} | "
                         f"{r['step_s_on']:.2f} | {fmt(ratio(r[key_on], r[key_off]))}x |")
        lines += ["", f"Step-time ratio {by} (checkpointing recomputes each block's forward in the backward).", ""]
    return lines


def markdown_report(res):
    m, a = res["machine"], res["settings"]
    basis = timing_basis(res)
    by = "by CPU time" if basis == "cpu" else "wall clock"
    lines = ["## DiC / DiT speed benchmark", ""]
    lines.append(f"- command: `{res['command']}`")
    gpu = f", GPU {m['gpu']} ({m['gpu_memory_gib']} GiB, CUDA {m['cuda']}, TF32 {m['tf32']})" if m["gpu"] else ""
    lines.append(f"- machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['cpu_capability']}), "
                 f"torch {m['torch']}, Python {m['python']}{gpu}; device {m['device']}; "
                 f"load average at start {fmt(m.get('load_average_1min'))}")
    lines.append(f"- torch threads: {m['torch_threads']}"
                 + (" (CPU default 1 for steady timings; --threads N to change)" if m["gpu"] is None else ""))
    lines.append(f"- training: batch {a['batch_size']}, {a['latent_size']}x{a['latent_size']} latents "
                 f"(image {a['image_size']}px), {a['warmup']} warm-up + median of {a['iters']} timed steps; "
                 f"step = diffusion.training_losses + backward + AdamW + EMA")
    lines.append(f"- sampling: {a['sample_batch']} images per batch (+ as many null-label rows), CFG {CFG_SCALE}, "
                 f"latency per image = batch latency / images"
                 + ("; **extrapolated** = median step time x steps" if a["sample_steps_scale"] < 1 else ""))
    lines.append("- fast = bf16 autocast + fused AdamW + foreach EMA"
                 + (" + channels_last" if a["fast_channels_last"] else " (NCHW; --channels-last adds channels_last)")
                 + (" (+ torch.compile row)" if a["compile"] else ""))
    if basis == "cpu":
        lines.append("- **ratios (`vs eager`, DiC/DiT) use process CPU time**: with one thread it counts the "
                     "work done and not the time other processes held the cores (this machine is shared); "
                     "wall-clock columns are shown beside them.")
    lines.append("")

    lines += ["### Training throughput", "",
              "| model | params (M) | GMACs | GMACs (paper, 256px) | config | ms/step (wall) | img/s (wall) | "
              "img/s (CPU time) | vs eager | TFLOP/s (wall) | MFU | peak MiB |",
              "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    peak = peak_tflops(res)
    for name, r in res["models"].items():
        base = r["train"].get("eager fp32", {})
        for cfg, t in r["train"].items():
            if "error" in t:
                lines.append(f"| {name} | | | | {cfg} | {t['error']} | | | | | | |")
                continue
            label = cfg + (f" (first step {t['first_step_s']:.0f} s: compiling)" if t.get("compile") else "")
            tflops = train_tflops(r["gmacs"], t["images_per_s"])
            mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
            lines.append(
                f"| {name} | {r['params'] / 1e6:.1f} | {r['gmacs']:.2f} | {fmt(r['gmacs_paper'])} | {label} | "
                f"{t['step_s'] * 1000:.0f} | {t['images_per_s']:.2f} | {fmt(t['images_per_cpu_s'])} | "
                f"{fmt(ratio(train_rate(t, basis), train_rate(base, basis)))}x | {tflops:.3g} | {mfu} | "
                f"{fmt(t['peak_mib'], '.0f')} |")
    lines.append("")
    lines.append(f"`vs eager` = img/s ratio to the same model's eager fp32 row ({by}). TFLOP/s = "
                 f"6 x GMACs x img/s (forward + backward ~ 3 forwards); MFU = TFLOP/s / the device's dense "
                 f"bf16 peak ({fmt(peak, '.0f')} TFLOP/s; --peak-tflops sets it).")
    lines.append("")

    lines += ["### Sampling latency per image", "",
              "| model | config | DDPM-250 s/img (wall) | DDIM-50 s/img (wall) | DDPM-250 s/img (CPU time) | "
              "ms/step (batch, wall) | timed steps | vs eager | peak MiB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["models"].items():
        base = r["sample"].get("eager fp32", {})
        for cfg, s in r["sample"].items():
            if "error" in s:
                lines.append(f"| {name} | {cfg} | {s['error']} | | | | | | |")
                continue
            ddpm, ddim = s["DDPM-250"], s["DDIM-50"]
            label = cfg + (f" (compiling {s['compile_s']:.0f} s)" if "compile_s" in s else "")
            lines.append(
                f"| {name} | {label} | {ddpm['per_image_s']:.2f}{' (extrapolated)' if ddpm['extrapolated'] else ''} | "
                f"{ddim['per_image_s']:.2f}{' (extrapolated)' if ddim['extrapolated'] else ''} | "
                f"{ddpm['per_image_cpu_s']:.2f} | {ddpm['step_s'] * 1000:.1f} | "
                f"{ddpm['timed_steps']}/{ddpm['steps']}, {ddim['timed_steps']}/{ddim['steps']} | "
                f"{fmt(ratio(sample_latency(base, basis), sample_latency(s, basis)))}x | "
                f"{fmt(s.get('peak_mib'), '.0f')} |")
    lines.append("")
    lines.append(f"`vs eager` = eager DDPM-250 latency / this one ({by}). A DDPM and a DDIM step cost the "
                 "same (one guided forward), so DDIM-50 = DDPM-250 / 5 up to noise.")
    lines.append("")

    pairs = [(d, t) for d, t in PAIRS if d in res["models"] and t in res["models"]]
    if pairs:
        lines += ["### DiC vs DiT of similar GMACs", "",
                  f"Ratios {by}; > 1 means DiC is faster.", "",
                  "| DiC | DiT | GMACs | train img/s DiC/DiT (eager) | (fast) | sampling speed-up DiC vs DiT "
                  "(eager) | (fast) |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for d, t in pairs:
            rd, rt = res["models"][d], res["models"][t]

            def tr(cfg):
                return ratio(train_rate(rd["train"].get(cfg, {}), basis), train_rate(rt["train"].get(cfg, {}), basis))

            def sp(cfg):
                return ratio(sample_latency(rt["sample"].get(cfg, {}), basis),
                             sample_latency(rd["sample"].get(cfg, {}), basis))
            lines.append(f"| {d} | {t} | {rd['gmacs']:.2f} vs {rt['gmacs']:.2f} | {fmt(tr('eager fp32'))}x | "
                         f"{fmt(tr('fast'))}x | {fmt(sp('eager fp32'))}x | {fmt(sp('fast'))}x |")
        lines.append("")

    lines += extras_report(res, basis, by)
    if res.get("data"):
        d = res["data"]
        consume = res.get("consumption")
        lines += ["### Latent loading", "",
                  f"{d['samples']:,} synthetic (1, 4, {a['latent_size']}, {a['latent_size']}) float32 latents, "
                  f"random-order batches of {d['batch']}, {d['note']}. Writing them took "
                  f"{d['write_per_file_s']:.1f} s as per-file .npy vs {d['write_packed_s']:.2f} s as one "
                  f"plain-numpy packed array; helpers.data.latents.pack_latents converted the per-file set in "
                  f"{fmt(d.get('pack_latents_s'), '.1f')} s.", "",
                  "| reader | samples/s (wall) | vs training consumption |", "|---|---:|---:|"]
        for label, r in d["readers"].items():
            lines.append(f"| {label} | {r['samples_per_s']:,.0f} | "
                         f"{fmt(ratio(r['samples_per_s'], consume['images_per_s']) if consume else None, '.0f')}x |")
        if consume:
            lines.append("")
            lines.append(f"Training consumption: {consume['images_per_s']:.2f} img/s ({consume['model']}, "
                         f"{consume['config']}, this device, {by}). Above 1x one reader thread keeps up.")
        lines.append("")
    lines.append(f"Total bench time: {res['elapsed_s']:.0f} s.")
    return "\n".join(lines)


#################################################################################
#                                      Main                                     #
#################################################################################

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--models", default="quick",
                   help="'quick' (DiC-S, DiT-S/2), 'all' (DiC-S/B/XL/H, DiT-S/2, B/2, L/2, XL/2) "
                        "or a comma list of registry names")
    p.add_argument("--image-size", type=int, default=256, help="image side; latents are image/8")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default cpu 4, cuda 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default cpu 1, cuda 5)")
    p.add_argument("--iters", type=int, default=None, help="timed steps, median reported (default cpu 3, cuda 20)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling batch (default cpu 2, cuda 32)")
    p.add_argument("--sample-steps-scale", type=float, default=None,
                   help="fraction of each chain's steps to time, then extrapolate per-step x steps "
                        "(default cpu 0.01, cuda 1 = whole chains, nothing extrapolated)")
    p.add_argument("--min-sample-steps", type=int, default=5, help="timed steps at least, when extrapolating")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 1 on cpu for steady numbers; torch's default on cuda)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels_last in the fast path (default off; the ablation rows time the other choice)")
    p.add_argument("--compile", action="store_true", help="also time fast path + torch.compile")
    p.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the one-component-at-a-time training rows")
    p.add_argument("--no-sample", dest="sample", action="store_false", help="skip sampling")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip training")
    p.add_argument("--no-data", dest="data", action="store_false", help="skip the latent loading benchmark")
    p.add_argument("--data-samples", type=int, default=5000, help="synthetic latents for the loading benchmark")
    p.add_argument("--data-batch", type=int, default=256, help="batch of the loading benchmark")
    p.add_argument("--extra-configs", default=None,
                   help="comma list of training configs (names of the training rows) for the flow-matching, "
                        "SiT sampling and REPA sections (default cpu 'eager fp32': bf16 is emulated, so "
                        "slow, on CPUs without AVX512-BF16; cuda 'eager fp32,fast')")
    p.add_argument("--no-sit", dest="sit", action="store_false",
                   help="skip the flow-matching (SiT) training step and ODE/SDE sampling sections")
    p.add_argument("--no-repa", dest="repa", action="store_false", help="skip the REPA step cost section")
    p.add_argument("--repa-encoder", default=None,
                   help="REPA encoder (helpers.training.repa.ENCODERS; random weights, same cost; default cpu "
                        "dinov2-vit-s, cuda dinov2-vit-b as REPA)")
    p.add_argument("--repa-batch", type=int, default=None, help="REPA section batch (default cpu 2, cuda 32)")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false",
                   help="skip the gradient checkpointing section")
    p.add_argument("--grad-checkpointing-memory", action="store_true",
                   help="also measure gradient checkpointing on DiC-XL and DiT-XL/2 (CPU: ~3 GB and "
                        "~10 s per step each; --models all includes them)")
    p.add_argument("--gc-batch", type=int, default=None,
                   help="batch of the gradient checkpointing forward + backward (default cpu 1, cuda 32)")
    p.add_argument("--gc-iters", type=int, default=None,
                   help="timed forward + backward pairs of the gradient checkpointing rows (default cpu 2, cuda 5)")
    p.add_argument("--precision", choices=["tf32", "fp32"], default="tf32",
                   help="the eager rows' precision, as the trainers' --precision (fast rows: bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the device for the MFU column (default: known GPUs, e.g. H100 989)")
    p.add_argument("--json", default=None, help="also write all numbers to this .json (refuses to overwrite)")
    args = p.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    cuda = args.device == "cuda"
    defaults = dict(batch_size=32 if cuda else 4, warmup=5 if cuda else 1, iters=20 if cuda else 3,
                    sample_batch=32 if cuda else 2, sample_steps_scale=1.0 if cuda else 0.01,
                    threads=None if cuda else 1, extra_configs="eager fp32,fast" if cuda else "eager fp32",
                    repa_encoder="dinov2-vit-b" if cuda else "dinov2-vit-s", repa_batch=32 if cuda else 2,
                    gc_batch=32 if cuda else 1, gc_iters=5 if cuda else 2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models == "quick":
        args.model_list = QUICK_MODELS
    elif args.models == "all":
        args.model_list = ALL_MODELS
    else:
        args.model_list = [s.strip() for s in args.models.split(",") if s.strip()]
    unknown = [m for m in args.model_list if m not in model_names()]
    if unknown:
        p.error(f"unknown model(s) {unknown}: choose from {', '.join(model_names())}")
    if args.image_size % 8:
        p.error(f"--image-size {args.image_size} is not a multiple of 8 (the VAE downsamples by 8)")
    args.latent_size = args.image_size // 8
    args.fast_channels_last = bool(args.channels_last)
    args.extra_config_list = [c.strip() for c in args.extra_configs.split(",") if c.strip()]
    known = [c for c in train_configs(args) if c != "fast + compile"]
    if any(c not in known for c in args.extra_config_list):
        p.error(f"--extra-configs {args.extra_configs!r}: choose from {', '.join(known)}")
    from helpers.training.repa import ENCODERS
    if args.repa_encoder not in ENCODERS:
        p.error(f"--repa-encoder {args.repa_encoder!r}: choose from {', '.join(ENCODERS)}")
    args.gc_model_list = list(args.model_list) + [m for m in ("DiC-XL", "DiT-XL/2") if
                                                  args.grad_checkpointing_memory and m not in args.model_list]
    for key in ("batch_size", "iters", "sample_batch", "data_samples", "data_batch", "repa_batch", "gc_batch",
                "gc_iters"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or not 0 < args.sample_steps_scale:
        p.error("--warmup must be >= 0 and --sample-steps-scale > 0")
    if args.json and os.path.exists(args.json):
        p.error(f"--json {args.json} exists: choose a new file (results are never overwritten)")
    return args


def warm_up_libraries(device, diffusion):
    """One throwaway DiC-Tiny step in fp32 and bf16, so one-time library set-up (oneDNN/cuDNN
    initialisation, first allocations) is not charged to the first measured config."""
    model = create_model("DiC-Tiny", input_size=16, num_classes=10).to(device)
    x = torch.randn(2, 4, 16, 16, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    t = torch.zeros(2, dtype=torch.long, device=device)
    for precision in ("fp32", "bf16"):
        diffusion.training_losses(autocast_forward(model, device, precision), x, t, dict(y=y))["loss"].mean().backward()
    del model
    _release_memory(device)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configure_tf32(args.precision == "tf32")
    machine = describe_machine(device, torch.get_num_threads())
    res = {"command": " ".join(["python", "bench/bench.py"] + (sys.argv[1:] if argv is None else list(argv))),
           "machine": machine,
           "settings": {k: v for k, v in vars(args).items() if k not in ("model_list", "extra_config_list")}
           | {"models": args.model_list},
           "models": {}}
    print(f"machine: {machine}", flush=True)
    diffusion = create_diffusion(timestep_respacing="")
    warm_up_libraries(device, diffusion)
    for name in args.model_list:
        gmacs, params = count_gmacs(name, args.latent_size)
        paper = SPEC_GMACS_256.get(name) if args.image_size == 256 else None
        print(f"{name}: {params / 1e6:.1f} M parameters, {gmacs:.2f} GMACs (paper {fmt(paper)})", flush=True)
        torch.manual_seed(args.seed)
        base = create_model(name, input_size=args.latent_size)   # built once on CPU, copied per config
        entry = {"params": params, "gmacs": gmacs, "gmacs_paper": paper, "train": {}, "sample": {}}
        if args.train:
            for cfg_name, cfg in train_configs(args).items():
                entry["train"][cfg_name] = bench_train(name, base, cfg, args, device, diffusion)
        if args.sample:
            for cfg_name, cfg in sample_configs(args).items():
                entry["sample"][cfg_name] = bench_sample(name, base, cfg, args, device)
        del base
        _release_memory(device)
        configs = train_configs(args)
        for key, bench, wanted in (("sit_train", bench_sit_train, args.sit),
                                   ("sit_sample", bench_sit_sample, args.sit),
                                   ("repa", bench_repa, args.repa)):
            if wanted:
                entry[key] = {c: bench(name, {**configs[c], "name": c}, args, device) for c in args.extra_config_list}
        res["models"][name] = entry
    if args.grad_checkpointing:
        res["grad_checkpointing"] = {name: bench_grad_checkpointing(name, args, device) for name in args.gc_model_list}

    # the fastest measured training row of the first model: what a loader has to keep up with
    first = res["models"][args.model_list[0]]["train"]  # empty with --no-train
    basis = timing_basis(res)
    rows = [(cfg, train_rate(r, basis)) for cfg, r in first.items() if train_rate(r, basis)]
    if rows:
        cfg, rate = max(rows, key=lambda kv: kv[1])
        res["consumption"] = dict(model=args.model_list[0], config=cfg, images_per_s=rate, basis=basis)
    if args.data:
        res["data"] = bench_data(args)
    res["elapsed_s"] = time.perf_counter() - start
    report = markdown_report(res)
    res["markdown"] = report
    print()
    print(report)
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
