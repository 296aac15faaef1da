"""Speed switches the training and sampling scripts share: precision, memory format, compile,
fused/foreach AdamW and a foreach EMA update. Each is one small function behind a flag.

What changes numbers and what does not (checked in tests/test_fastpath.py, timed by
bench/bench.py):

- Same numbers up to float rounding, safe to leave on:
    * `make_adamw(..., fused="auto")`: AdamW with torch's defaults (betas (0.9, 0.999), eps 1e-8,
      no amsgrad) through the fused kernel (CUDA and CPU) or the foreach kernel; the updates equal
      the plain for-loop AdamW up to float rounding (foreach is bit-identical on CPU).
    * `ema_update`: DiT's `ema.mul_(decay).add_(param, alpha=1 - decay)` done with foreach ops;
      bit-identical to DiT's per-parameter loop (tested on CPU).
    * `load_optimizer_state`: a resumed optimizer keeps the kernel it was built with (torch's
      load_state_dict would take the saved `fused`/`foreach` flags).
    * `to_channels_last` / `channels_last_input`: NHWC memory layout for the convolutions; same
      math, outputs equal eager NCHW to ~1e-6 relative (different summation order). Not faster
      for DiC on CPU (bench: +2-4% in fp32, -10% with bf16: GroupNorm's NHWC CPU kernels are slow,
      backward ~13x the NCHW one); on CUDA unmeasured here, and CUDA GroupNorm has returned NCHW
      for NHWC input (pytorch#111824), i.e. layout conversions around every DiC block. So: off
      unless `bench/bench.py --device cuda` shows a gain (`--channels-last` is opt-in). Checkpoints
      stay plain: save `contiguous_state_dict(model.state_dict())`.
- Change numbers, opt-in:
    * `autocast_context(device, "bf16")`: bf16 autocast (convolutions and matmuls in bf16, norms and
      reductions in fp32); outputs differ from fp32 by ~0.5% relative (see the test for the bound).
    * `configure_tf32(True)`: TF32 matmuls/convolutions on Ampere+ GPUs (DiT's and DiC's official
      training turns it on; no effect on CPU).
    * `maybe_compile`: torch.compile (same math, but fused kernels reorder float operations, and the
      first steps pay the compile time; 15 s cold for a tiny conv net on CPU). Random ops in the
      graph use the eager generator, so a compiled training run equals the eager one up to float
      rounding (4 DiC-Tiny steps: ~1e-8 relative on the weights).
"""
from contextlib import nullcontext

import torch

from helpers.utils.checkpoint import strip_wrapper_prefixes

PRECISIONS = ("fp32", "tf32", "bf16")


#################################################################################
#                                    Precision                                  #
#################################################################################

def check_precision(precision):
    """Raise one clear error for an unknown precision name; return it otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def configure_tf32(enabled):
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions. A no-op for CPU math."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def autocast_context(device, precision):
    """Context manager for the forward pass: bf16 autocast on CPU/CUDA for "bf16", else a no-op.

    "tf32" is fp32 storage with TF32 math: it is switched on globally by configure_tf32, so it
    needs no context here. Autocast keeps parameters and gradients in fp32.
    """
    check_precision(precision)
    device_type = torch.device(device).type
    if precision == "bf16" and device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return nullcontext()


def autocast_forward(fn, device, precision):
    """Wrap a model (or any callable returning a tensor) so it runs under `autocast_context` and
    returns fp32, so the losses / the diffusion arithmetic that follow stay in fp32.

    With precision "fp32" or "tf32" the callable is returned unchanged.
    """
    check_precision(precision)
    if precision != "bf16":
        return fn

    def forward(*args, **kwargs):
        with autocast_context(device, precision):
            out = fn(*args, **kwargs)
        return out.float()

    return forward


#################################################################################
#                                 Memory format                                 #
#################################################################################

def to_channels_last(model):
    """Store the model's 4-D weights (convolutions) as NHWC, in place; returns the model.

    Parameters keep their shapes and names, so state_dicts save and load as before.
    """
    return model.to(memory_format=torch.channels_last)


def contiguous_state_dict(state_dict):
    """A state_dict whose tensors are in the default (NCHW) layout: the tensors that already are
    are kept (no copy), channels_last ones are copied. Same values and keys, so a checkpoint saved
    from a channels_last model is a plain one and loads into any model exactly."""
    return type(state_dict)((k, v.contiguous() if torch.is_tensor(v) else v) for k, v in state_dict.items())


def contiguous_optimizer_state(opt_state):
    """An optimizer state_dict with its per-parameter tensors in the default layout (see above)."""
    state = {i: {k: v.contiguous() if torch.is_tensor(v) else v for k, v in per_param.items()}
             for i, per_param in opt_state["state"].items()}
    return {**opt_state, "state": state}


def channels_last_input(x):
    """An (N, C, H, W) batch in NHWC memory layout (same values, same shape); other ranks unchanged."""
    if x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


#################################################################################
#                                     Compile                                   #
#################################################################################

def maybe_compile(model, enabled, mode=None, eager_random=True):
    """torch.compile(model, mode=mode) when enabled, else the model itself.

    `model` may be a module or any callable (e.g. `model.forward_with_cfg`, compiling the network
    together with the guidance arithmetic). The compiled module wrapper shares the parameters with
    `model`; save and EMA from `unwrap_compiled` (the wrapper's state_dict keys carry an
    `_orig_mod.` prefix).

    eager_random: random ops inside the compiled graph (DiC/DiT's class-label dropout) draw from
    torch's eager generator (sets `torch._inductor.config.fallback_random`, process-wide), so a
    compiled run sees the same random numbers as an eager one with the same seed. Inductor's own
    generator would draw other labels to drop: a different (equally valid) run, not float rounding.
    """
    if not enabled:
        return model
    if eager_random:
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True
    return torch.compile(model, mode=mode)


def unwrap_compiled(model):
    """The original module behind torch.compile (and DDP) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


#################################################################################
#                                    Optimizer                                  #
#################################################################################

def _devices_support(params, supported):
    return len(params) > 0 and all(p.device.type in supported and torch.is_floating_point(p) for p in params)


def adamw_implementation(params, fused="auto"):
    """Which AdamW kernel `make_adamw` uses for these parameters: "fused", "foreach" or "for-loop".

    fused: "auto" = fused where torch has a fused kernel for every parameter's device (CUDA and,
    since torch 2.4, CPU), else foreach where supported (CUDA), else torch's for-loop;
    True = fused (error if unsupported); False = foreach where supported, else for-loop.
    """
    from torch.utils._foreach_utils import (_get_foreach_kernels_supported_devices,
                                            _get_fused_kernels_supported_devices)
    params = list(params)
    fused_ok = _devices_support(params, _get_fused_kernels_supported_devices())
    if fused is True and not fused_ok:
        devices = sorted({p.device.type for p in params})
        raise ValueError(f"fused AdamW is not supported for parameters on {devices} with this torch "
                         f"({torch.__version__}); use fused='auto' or False")
    if fused not in ("auto", True, False):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
    if fused is True or (fused == "auto" and fused_ok):
        return "fused"
    if _devices_support(params, _get_foreach_kernels_supported_devices()):
        return "foreach"
    return "for-loop"


def make_adamw(params, lr, weight_decay=0.0, fused="auto"):
    """torch.optim.AdamW(params, lr, weight_decay) with torch's other defaults (DiT's optimizer),
    through the fastest kernel available (see adamw_implementation); same math as the plain one.
    """
    params = list(params)
    if params and isinstance(params[0], dict):
        flat = [p for group in params for p in group["params"]]
    else:
        flat = params
    impl = adamw_implementation(flat, fused)
    kwargs = {"fused": True} if impl == "fused" else ({"foreach": True} if impl == "foreach" else {"foreach": False})
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


def fused_choice(choice):
    """A --fused-adamw {auto,on,off} choice as make_adamw's `fused` argument ("auto", True, False)."""
    mapping = {"auto": "auto", "on": True, "off": False}
    if choice not in mapping:
        raise ValueError(f"fused AdamW must be 'auto', 'on' or 'off', got {choice!r}")
    return mapping[choice]


def optimizer_implementation(opt):
    """"fused", "foreach" or "for-loop": the AdamW kernel `opt` runs (from its own flags)."""
    group = opt.param_groups[0] if opt.param_groups else opt.defaults
    if group.get("fused"):
        return "fused"
    return "foreach" if group.get("foreach") else "for-loop"


def load_optimizer_state(opt, state_dict):
    """opt.load_state_dict(state_dict), keeping the kernel `opt` was built with.

    torch's load_state_dict replaces every param group's settings with the saved ones, including
    `fused` and `foreach`: a checkpoint written by a for-loop AdamW (e.g. torch's default on CPU,
    or DiT's) would silently switch a fused optimizer back, and vice versa. This puts the kernel
    flags of `opt` back, stores each `step` where that kernel wants it (fused: float32 on the
    parameter's device; otherwise a CPU tensor) and gives the moment buffers their parameter's
    memory layout (channels_last models). Values are copied exactly; nothing else changes.
    """
    kernel = {key: opt.defaults.get(key) for key in ("fused", "foreach", "capturable")}
    opt.load_state_dict(state_dict)
    for group in opt.param_groups:
        group.update(kernel)
        on_device = bool(kernel["fused"] or kernel["capturable"])
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            for key, value in list(state.items()):
                if not torch.is_tensor(value):
                    continue
                if key == "step":
                    state[key] = (value.to(dtype=torch.float32, device=p.device) if on_device
                                  else value.to(device="cpu"))
                elif value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
    return opt


#################################################################################
#                                       EMA                                     #
#################################################################################

def ema_pairs(ema_model, model):
    """(ema tensors, model tensors) paired by parameter name; one clear error if the names differ."""
    # Names without DDP's `module.` / torch.compile's `_orig_mod.`, as checkpoint loading strips them.
    ema_params = strip_wrapper_prefixes(dict(ema_model.named_parameters()))
    model_params = strip_wrapper_prefixes(dict(model.named_parameters()))
    if ema_params.keys() != model_params.keys():
        missing = sorted(model_params.keys() - ema_params.keys())[:3]
        extra = sorted(ema_params.keys() - model_params.keys())[:3]
        raise ValueError(f"EMA and model parameters differ: missing in EMA {missing}, only in EMA {extra}; "
                         f"build the EMA as a deepcopy of the model")
    names = list(model_params)
    return [ema_params[n].data for n in names], [model_params[n].data for n in names]


@torch.no_grad()
def ema_update(ema_model, model, decay=0.9999):
    """ema = decay * ema + (1 - decay) * param for every parameter, as DiT's update_ema, in two
    foreach calls (`_foreach_mul_`, then `_foreach_add_` with alpha = 1 - decay): the same two
    float operations per element as DiT's `ema.mul_(decay).add_(param, alpha=1 - decay)`, so the
    result is bit-identical (tested on CPU). Wrapped models (DDP, torch.compile) are accepted.
    """
    ema_tensors, model_tensors = ema_pairs(ema_model, model)
    torch._foreach_mul_(ema_tensors, decay)
    torch._foreach_add_(ema_tensors, model_tensors, alpha=1 - decay)


@torch.no_grad()
def ema_update_reference(ema_model, model, decay=0.9999):
    """DiT's per-parameter EMA update, kept as the reference the foreach version is tested against."""
    ema_tensors, model_tensors = ema_pairs(ema_model, model)
    for ema, param in zip(ema_tensors, model_tensors):
        ema.mul_(decay).add_(param, alpha=1 - decay)


#################################################################################
#                                    Summary                                    #
#################################################################################

def describe(precision, adamw, channels_last, compiled, ema="foreach"):
    """One log line naming the active fast-path options, e.g.
    "fast path: precision tf32, AdamW fused, EMA foreach, channels_last off, compile off"."""
    return (f"fast path: precision {precision}, AdamW {adamw}, EMA {ema}, "
            f"channels_last {'on' if channels_last else 'off'}, compile {'on' if compiled else 'off'}")
