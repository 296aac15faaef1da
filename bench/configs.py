"""The configurations the training and sampling rows run under: eager (DiT's recipe), the fast path
and the one-switch-at-a-time ablation rows, and the fast rows' precision on the device at hand.
Part of bench/bench.py (which puts the repository root and this folder on sys.path).
"""
import os

from helpers.utils.fastpath import FORCE_BF16_ENV, bf16_support, precision_line, resolve_precision


def fast_precision(requested, device):
    """(precision, line) of the fast rows: auto = bf16 where `device` has bf16 instructions, else
    fp32; an explicit bf16 where bf16 would crawl is refused (unless DIC_FORCE_BF16=1), as in the
    trainers. The line says what runs and why."""
    support = bf16_support(device)
    if requested == "auto":
        precision = "bf16" if support.native else "fp32"
    else:
        precision = resolve_precision(requested, support, os.environ.get(FORCE_BF16_ENV) == "1",
                                      flag="--fast-precision bf16", fix="use --fast-precision fp32 (or auto)")
    return precision, "fast rows: " + precision_line(precision, support)


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
    fast = dict(precision=args.fast_precision, channels_last=args.fast_channels_last, fused_adamw=True,
                foreach_ema=True, compile=False)
    configs = {"eager fp32": eager}
    if args.ablation:
        configs["+channels_last"] = {**eager, "channels_last": True}
        if args.fast_precision == "bf16":
            configs["+bf16"] = {**eager, "precision": "bf16"}
        configs["+fused AdamW, foreach EMA"] = {**eager, "fused_adamw": True, "foreach_ema": True}
    return _add_fast_rows(configs, fast, args)


def sample_configs(args):
    """eager fp32 vs fast (--fast-precision, channels_last per --channels-last) [+ compile]."""
    fast = dict(precision=args.fast_precision, channels_last=args.fast_channels_last, compile=False)
    configs = {"eager fp32": dict(precision="fp32", channels_last=False, compile=False)}
    return _add_fast_rows(configs, fast, args)
