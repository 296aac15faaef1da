"""Speed switches the training and sampling scripts share: precision, memory format, compile,
fused/foreach AdamW and a foreach EMA update. Each is one small function behind a flag.

What changes numbers and what does not (checked in tests/test_fastpath.py, timed by
bench/bench.py):

- Same numbers up to float rounding, safe to leave on:
    * `make_adamw(..., fused="auto")`: AdamW with torch's defaults (betas (0.9, 0.999), eps 1e-8,
      no amsgrad) through the fused kernel (CUDA and CPU) or the foreach kernel; the updates equal
      the plain for-loop AdamW up to float rounding (foreach is bit-identical on CPU).
    * `ema_update`: DiT's `ema.mul_(decay).add_(param, alpha=1 - decay)` as one foreach lerp
      (one pass instead of two); equals DiT's per-parameter loop to a few ulp (tested on CPU).
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

Which precision runs (`choose_precision`, one line from `precision_line`): `--precision auto` (the
default everywhere) is tf32: DiT's TF32 on GPUs, the same plain fp32 on CPUs. bf16 stays opt-in
even where the CPU has bf16 instructions, though it trains DiC-S 1.6-1.8x and DiC-Tiny 1.5x faster there
(bench/README.md): it changes the numbers (~1%), and a default that followed the CPU would train
other numbers on every other machine (machines here differ from session to session) and under
every test that checks fp32 numbers with the default flags. An explicit bf16 on a device without bf16
instructions (an AVX2 CPU: oneDNN's reference kernels, measured 40x slower than fp32) is refused
with the fix, as `--fused-adamw on` is where there is no fused kernel: what was asked is run or
refused, never swapped for something else. DIC_FORCE_BF16=1 runs it anyway (slowly).
"""
import os
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from helpers.utils.checkpoint import strip_wrapper_prefixes
from helpers.utils.cli import JobError

PRECISIONS = ("fp32", "tf32", "bf16")
PRECISION_CHOICES = ("auto",) + PRECISIONS   # the --precision flag's choices; auto resolves to one of PRECISIONS
FORCE_BF16_ENV = "DIC_FORCE_BF16"            # "1": run an explicit bf16 even where it would be slow


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
#                       Precision for the device at hand                        #
#################################################################################

@dataclass(frozen=True)
class Bf16Support:
    """What a device offers bf16 autocast. fast: kernels better than reference code (native bf16
    instructions, or oneDNN's AVX512 emulation); native: bf16 instructions; hardware: their name
    for the messages ("AVX512-BF16", "AMX", "AVX2", a GPU's name)."""
    device_type: str
    fast: bool
    native: bool
    hardware: str


def cpu_bf16_flags():
    """The CPU probe (tests monkeypatch it): oneDNN's bf16 check, the x86 bf16 instructions,
    torch's kernel level (AVX2, AVX512, ...) and whether the CPU is an x86 one."""
    return dict(mkldnn_bf16=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
                amx=bool(torch.cpu._is_amx_tile_supported()),
                capability=torch.backends.cpu.get_cpu_capability(),
                x86=platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"))


def cpu_bf16_support(flags):
    """Bf16Support of a CPU from cpu_bf16_flags(). oneDNN's check also passes for AVX512 without
    bf16 instructions (it emulates them: fast, not native); where it fails, bf16 runs reference kernels."""
    if not flags["x86"]:
        return Bf16Support("cpu", flags["mkldnn_bf16"], flags["mkldnn_bf16"],
                           "bf16 instructions" if flags["mkldnn_bf16"] else flags["capability"])
    native = flags["amx"] or flags["avx512_bf16"]
    hardware = "AMX" if flags["amx"] else "AVX512-BF16" if flags["avx512_bf16"] else flags["capability"]
    return Bf16Support("cpu", flags["mkldnn_bf16"], native, hardware)


def bf16_support(device):
    """Bf16Support of `device` (a torch.device or its name), probed."""
    device = torch.device(device)
    if device.type == "cpu":
        return cpu_bf16_support(cpu_bf16_flags())
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return Bf16Support("cuda", native, native, torch.cuda.get_device_name(device))
    return Bf16Support(device.type, False, False, device.type)   # no autocast there (autocast_context)


def slow_bf16_reason(support):
    """Why bf16 is slow on a device without fast bf16, for the messages."""
    if support.device_type == "cpu":
        return (f"this CPU has no bf16 instructions ({support.hardware}): bf16 would run reference kernels, "
                f"~40x slower than fp32")
    return (f"this {support.device_type} device ({support.hardware}) has no native bf16: bf16 would be "
            f"emulated, slower than fp32")


def resolve_precision(requested, support, force=False, flag="--precision bf16",
                      fix="use --precision fp32 (or auto)"):
    """The precision to run for a requested one on a device with `support` (a Bf16Support).

    auto -> tf32 everywhere (DiT's TF32 on GPU; tf32 is plain fp32 on CPU): bf16 stays opt-in (see
    the module docstring). bf16 where `support.fast` is False -> JobError naming `fix`, unless
    `force` (DIC_FORCE_BF16=1). fp32, tf32 and bf16 otherwise run as asked.
    """
    if requested not in PRECISION_CHOICES:
        raise JobError(f"--precision {requested!r}: choose one of {', '.join(PRECISION_CHOICES)}")
    if requested == "auto":
        return "tf32"
    if requested == "bf16" and not support.fast and not force:
        raise JobError(f"{flag}: {slow_bf16_reason(support)}; {fix}, or set {FORCE_BF16_ENV}=1 to run bf16 anyway")
    return requested


def precision_line(precision, support, accelerate=None):
    """One line: what runs, and what else this device offers, e.g. "precision: tf32 (plain fp32
    on cpu); this CPU has no bf16 instructions (AVX2): ...". `accelerate`: accelerate's
    mixed_precision, which is what runs when it is bf16 or fp16."""
    where = support.hardware if support.device_type == "cuda" else support.device_type
    if accelerate in ("bf16", "fp16"):
        precision, how = accelerate, f"{accelerate} autocast by accelerate"
    elif precision == "tf32":
        how = "TF32 matmuls and convolutions" if support.device_type == "cuda" else "plain fp32"
    else:
        how = {"bf16": "bf16 autocast", "fp32": "strict fp32"}[precision]
    line = f"precision: {precision} ({how} on {where})"
    if precision == "bf16" and not support.fast:
        return f"{line}, forced by {FORCE_BF16_ENV}=1; {slow_bf16_reason(support)}"
    if precision in ("bf16", "fp16") or support.device_type != "cpu":
        return line
    if support.native:
        return (f"{line}; this CPU has bf16 instructions ({support.hardware}): --precision bf16 trains ~1.5-1.8x "
                f"faster on such CPUs (bench/README.md) but changes the numbers, so it is opt-in")
    if support.fast:
        return (f"{line}; this CPU emulates bf16 ({support.hardware}, no bf16 instructions): "
                f"--precision bf16 is unmeasured here")
    return f"{line}; {slow_bf16_reason(support)}, so auto never picks it"


def choose_precision(requested, device, accelerate=None):
    """resolve_precision on `device` (probed), forced by DIC_FORCE_BF16=1 in the environment.
    accelerate's mixed_precision (`accelerate`) gets the same check when it is bf16."""
    support = bf16_support(device)
    force = os.environ.get(FORCE_BF16_ENV) == "1"
    if accelerate == "bf16":
        resolve_precision("bf16", support, force, flag="accelerate's mixed_precision bf16",
                          fix="launch without --mixed_precision bf16")
    return resolve_precision(requested, support, force)


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
    """torch.compile(model, mode=mode, dynamic=False) when enabled, else the model itself.

    `model` may be a module or any callable (e.g. `model.forward_with_cfg`, compiling the network
    together with the guidance arithmetic). The compiled module wrapper shares the parameters with
    `model`; save and EMA from `unwrap_compiled` (the wrapper's state_dict keys carry an
    `_orig_mod.` prefix). dynamic=False: the batch shape is fixed in training; a new one (a last,
    smaller sampling batch) compiles once more instead of compiling slower shape-generic kernels.

    eager_random: random ops inside the compiled graph (DiC/DiT's class-label dropout) draw from
    torch's eager generator (sets `torch._inductor.config.fallback_random`, process-wide), so a
    compiled run sees the same random numbers as an eager one with the same seed. Inductor's own
    generator would draw other labels to drop: a different (equally valid) run, not float rounding.

    On CPU inductor's layout optimisation is turned off (process-wide): it makes the convolutions'
    activations channels_last, and a compiled DiC-S bf16 training step then ran slower than eager
    bf16 (1.72x vs 1.86x eager fp32's speed, one run); with it off, compiled is 5-10% faster than
    eager bf16 (bench/README.md). The layout stays the one the model and --channels-last chose.
    """
    if not enabled:
        return model
    import torch._inductor.config as inductor_config
    if eager_random:
        inductor_config.fallback_random = True
    if (_device_type_of(model) or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        inductor_config.layout_optimization = False
    return torch.compile(model, mode=mode, dynamic=False)


def _device_type_of(model):
    """The device type of a module's (or a bound method's module's) first parameter; None for
    other callables (then maybe_compile takes CUDA where there is one)."""
    module = getattr(model, "__self__", model)
    if not isinstance(module, torch.nn.Module):
        return None
    param = next(module.parameters(), None)
    return None if param is None else param.device.type


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
    """ema = decay * ema + (1 - decay) * param for every parameter, as DiT's update_ema, in one
    foreach call: `_foreach_lerp_(ema, param, 1 - decay)`, i.e. ema + (1 - decay) * (param - ema).
    One pass over the EMA instead of DiT's two (`mul_`, then `add_`): 11 ms instead of 23 for
    DiC-S's 33M parameters on one CPU thread. The same update up to float rounding (within a few
    ulp of DiT's per step, tested), not bit for bit; decay 0 copies the parameters exactly.
    Wrapped models (DDP, torch.compile) are accepted.
    """
    ema_tensors, model_tensors = ema_pairs(ema_model, model)
    torch._foreach_lerp_(ema_tensors, model_tensors, 1 - decay)


@torch.no_grad()
def ema_update_reference(ema_model, model, decay=0.9999):
    """DiT's per-parameter EMA update, kept as the reference the foreach one is tested (and benched) against."""
    ema_tensors, model_tensors = ema_pairs(ema_model, model)
    for ema, param in zip(ema_tensors, model_tensors):
        ema.mul_(decay).add_(param, alpha=1 - decay)


#################################################################################
#                         The fastest settings, measured                        #
#################################################################################

def busy_cores(interval=0.3):
    """How many cores other work keeps busy right now: the share of CPU time that was not idle in
    /proc/stat over `interval` seconds, times the core count (the 1-minute load average where there
    is no /proc/stat). Not the load average itself: it lags by a minute, and just after `pip install`
    it still counted the install (1.5 on an idle 2-core machine, so the quick start took 1 process)."""
    def cpu_times():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]   # user nice system idle iowait irq softirq steal
        return sum(values), values[3] + values[4]
    try:
        total_before, idle_before = cpu_times()
        time.sleep(interval)
        total_after, idle_after = cpu_times()
    except (OSError, ValueError):
        return os.getloadavg()[0]
    elapsed = max(total_after - total_before, 1)
    return (1.0 - (idle_after - idle_before) / elapsed) * os.cpu_count()


def fastest_settings(device="cpu", support=None, busy=None, cores=None):
    """The fastest training (and sampling) settings measured for `device`, as a dict:
    {"precision", "channels_last", "compile", "threads", "why"}; pass them to train.py as
    `--precision P --[no-]channels-last --[no-]compile` and OMP_NUM_THREADS=threads (None: torch's
    default). support / busy (busy_cores()) / cores default to this machine's (probed); tests pass values.

    Measured (bench/quickstart_settings.py and bench/bench.py on a shared 2-core AVX512-BF16 EPYC,
    settings timed in turns): bf16 autocast trains DiC-Tiny (batch 64, 16x16 digits) 1.5x and
    DiC-S 1.6-1.8x faster than fp32; channels_last: 1.03x in fp32, 0.74x with bf16; torch.compile
    saves 4% (DiC-Tiny, wall) to 5-8% (DiC-S) per step for 2-3.5 minutes of cold compiling, which a
    1,000-step quick start (~10-25 s saved) never earns back, so it stays off. Without bf16
    instructions bf16 is emulated (AVX512: unmeasured) or reference code (AVX2: 40x slower): fp32.
    Threads: with the cores held by other jobs (load average 3.8 on 2 cores) 2 threads ran a
    DiC-Tiny step 1.5-7x slower (wall) than 1 thread, so only idle cores are used, at least one.
    CUDA (not measured here): bf16 where the GPU has it natively, else DiT's tf32.
    """
    device = torch.device(device)
    support = bf16_support(device) if support is None else support
    settings = dict(channels_last=False, compile=False, threads=None)
    if device.type == "cuda":
        precision = "bf16" if support.native else "tf32"
        return dict(settings, precision=precision, why=f"{support.hardware}: {precision} (unmeasured here)")
    precision = "bf16" if support.native else "fp32"
    cores = os.cpu_count() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    threads = max(1, min(cores, round(cores - busy)))
    why = (f"{support.hardware}: {precision} ({'bf16 instructions' if support.native else 'no bf16 instructions'}); "
           f"{threads} thread(s): {busy:.1f} of {cores} cores busy")
    return dict(settings, precision=precision, threads=threads, why=why)


#################################################################################
#                                    Summary                                    #
#################################################################################

def describe(precision, adamw, channels_last, compiled, ema="foreach"):
    """One log line naming the active fast-path options, e.g.
    "fast path: precision tf32, AdamW fused, EMA foreach, channels_last off, compile off"."""
    return (f"fast path: precision {precision}, AdamW {adamw}, EMA {ema}, "
            f"channels_last {'on' if channels_last else 'off'}, compile {'on' if compiled else 'off'}")
