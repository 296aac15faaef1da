"""Sampling latency per image: DDPM-250 and DDIM-50 with classifier-free guidance, whole chains or a
few timed steps extrapolated. Part of bench/bench.py (which puts the repository root and this
folder on sys.path).
"""
import copy
import math
import statistics
import time

import torch

from diffusion import create_diffusion
from helpers.utils.fastpath import autocast_forward, channels_last_input, maybe_compile, to_channels_last
from measuring import PeakMemory, release_memory, sync

CFG_SCALE = 1.5
SAMPLERS = (("DDPM-250", "250"), ("DDIM-50", "ddim50"))


def _sample_loop(diffusion, kind, model_fn, z, model_kwargs, device):
    """The progressive (step by step) DDIM or DDPM chain, so single steps can be timed."""
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
    """Time DDPM-250 and DDIM-50 with CFG for one config; returns a result dict."""
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
    release_memory(device)
    if "error" in result:
        print(f"  sample {name:9s} {result['error']}", flush=True)
    else:
        print(f"  sample {name:9s} " + "  ".join(
            f"{label} {result[label]['per_image_s']:.3f} s/img" for label, _ in SAMPLERS), flush=True)
    return result
