"""The configurations the training and sampling rows run under: eager (DiT's recipe), the fast path
and the one-switch-at-a-time ablation rows. Part of bench/bench.py (which puts the repository root
and this folder on sys.path).
"""


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
