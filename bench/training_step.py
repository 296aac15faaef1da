"""Training throughput: train.py's step (diffusion loss, backward, AdamW, EMA) timed per
configuration, and the trainer and batch the flow-matching and REPA sections reuse. Part of
bench/bench.py (which puts the repository root and this folder on sys.path).

On CPU the configs of one model are timed in turns (one step of each per round, median per
config), so a change of load on the shared machine hits every row alike; where all of them do not
fit in memory at once (or with --no-in-turns, the CUDA default) each config is timed on its own.
"""
import copy

import torch

from helpers.utils.fastpath import (adamw_implementation, autocast_forward, channels_last_input,
                                    ema_update, ema_update_reference, make_adamw, maybe_compile,
                                    to_channels_last)
from measuring import PeakMemory, fmt, release_memory, time_alternating, time_calls

EMA_DECAY = 0.9999
STATE_BYTES_PER_PARAM = 20   # fp32 weights, EMA, grads, AdamW's two moments


def prepare_train(base, cfg, args, device, diffusion):
    """(step, info) for one config, built from `base` and warmed up (--warmup steps, at least one;
    a compile row's compiling happens here): step() runs train.py's step once; info has the first
    step's time, the peak memory over the warm-up steps and the AdamW kernel."""
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

    first = None
    for i in range(max(1, args.warmup + (2 if cfg["compile"] else 0))):   # >= 1: the peak memory is a step's
        wall, _, _ = time_calls(step, device, 0, 1)
        first = wall if i == 0 else first
    return step, dict(first_step_s=first, peak_mib=mem.stop(), memory_method=mem.method, optimizer=opt_kind)


def train_result(cfg, info, wall, cpu, n, timing):
    """One training row's numbers (img/s by wall and by CPU time)."""
    return dict(step_s=wall, images_per_s=n / wall, cpu_s=cpu, images_per_cpu_s=n / cpu if cpu > 0 else None,
                timing=timing, **info, **cfg)


def bench_train(name, base, cfg, args, device, diffusion):
    """Time train.py's step for one config on its own; returns a result dict."""
    try:
        step, info = prepare_train(base, cfg, args, device, diffusion)
        wall, cpu, _ = time_calls(step, device, 0, args.iters)
        result = train_result(cfg, info, wall, cpu, args.batch_size, "alone")
    except torch.cuda.OutOfMemoryError:
        result = dict(error="out of memory", **cfg)
    step = None
    release_memory(device)
    print(f"  train {name:9s} {cfg_label(result)}", flush=True)
    return result


def fits_in_turns(base, n_configs, device):
    """Whether every config's model, EMA, grads and AdamW state fit in half the free memory at once."""
    need = STATE_BYTES_PER_PARAM * sum(p.numel() for p in base.parameters()) * n_configs
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import os
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need < free / 2


def bench_train_rows(name, base, configs, args, device, diffusion):
    """{config name: result} for one model: every config built and warmed up, then timed in turns
    (args.in_turns and they fit in memory), else each on its own."""
    if not (args.in_turns and fits_in_turns(base, len(configs), device)):
        return {c: bench_train(name, base, cfg, args, device, diffusion) for c, cfg in configs.items()}
    steps, infos = {}, {}
    for c, cfg in configs.items():
        steps[c], infos[c] = prepare_train(base, cfg, args, device, diffusion)
    times = time_alternating(steps, device, 0, args.iters)
    results = {c: train_result(cfg, infos[c], *times[c], args.batch_size, "in turns") for c, cfg in configs.items()}
    for c, r in results.items():
        print(f"  train {name:9s} {c:28s} {cfg_label(r)}", flush=True)
    steps = None
    release_memory(device)
    return results


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
