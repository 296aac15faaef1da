"""Gradient checkpointing: peak memory and time of one forward + backward with and without it. Part of
bench/bench.py (which puts the repository root and this folder on sys.path).
"""
import torch

from diffusion import create_diffusion
from helpers.utils.models import create_model
from measuring import PeakMemory, fmt, release_memory, time_alternating
from training_step import train_batch


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
    model = None   # frees it (a `del` of a name the closures use reads as undefined to pyflakes)
    release_memory(device)
    if "error" not in result:
        print(f"  grad-ckpt {name:9s} batch {args.gc_batch}: peak {fmt(result['peak_mib_off'], '.0f')} -> "
              f"{fmt(result['peak_mib_on'], '.0f')} MiB, step {result['step_s_off']:.2f} -> "
              f"{result['step_s_on']:.2f} s", flush=True)
    return result
