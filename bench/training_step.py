"""Training throughput: train.py's step (diffusion loss, backward, AdamW, EMA) timed per
configuration, and the trainer and batch the flow-matching and REPA sections reuse. Part of
bench/bench.py (which puts the repository root and this folder on sys.path).
"""
import copy

import torch

from helpers.utils.fastpath import (adamw_implementation, autocast_forward, channels_last_input,
                                    ema_update, ema_update_reference, make_adamw, maybe_compile,
                                    to_channels_last)
from measuring import PeakMemory, fmt, release_memory, time_calls

EMA_DECAY = 0.9999


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
    release_memory(device)
    print(f"  train {name:9s} {cfg_label(result)}", flush=True)
    return result


def cfg_label(r):
    """One training row as the progress line prints it (or its error)."""
    if "error" in r:
        return r["error"]
    return f"{r['step_s'] * 1000:8.1f} ms/step  {r['images_per_s']:7.2f} img/s  peak {fmt(r['peak_mib'], '.0f')} MiB"


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
