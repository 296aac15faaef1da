"""The guided model call the samplers make: DiT's classifier-free guidance (which channels, and
REPA's guidance interval for SiT), wrapped in the fast path (helpers/utils/fastpath.py)."""
import torch

from helpers.utils.cli import JobError
from helpers.utils.fastpath import PRECISIONS, autocast_forward, channels_last_input, maybe_compile, to_channels_last

GUIDE_CHANNELS = {"official": None, "all": "all"}  # --guide-channels -> forward_with_cfg's argument


def make_model_fn(model, cfg_scale, guide_channels="official", precision="fp32", channels_last=False,
                  compile=False, guidance_interval=None):
    """The callable the sampler calls, model_fn(x, t, y) -> model output for x's rows, in fp32.

    cfg_scale > 1: DiT's classifier-free guidance via model.forward_with_cfg on [x; x] with labels
    [y; null] (null = num_classes), keeping the conditional half (the halves are identical).
    guide_channels "official" guides the first 3 latent channels as DiT/DiC/SiT do, "all" every one.
    cfg_scale == 1: the plain forward, as DiT's sample_ddp.py. guidance_interval (low, high), for
    SiT's time t in [0, 1]: guide only where REPA's time 1 - t lies in [low, high], as REPA's sampler.

    Fast path (helpers/utils/fastpath.py): precision "bf16" runs the call (network and guidance) under
    bf16 autocast and casts its output back to fp32; channels_last stores the model's weights NHWC
    (in place) and feeds it NHWC input; compile wraps the whole call in torch.compile.
    """
    if guide_channels not in GUIDE_CHANNELS:
        raise JobError(f"--guide-channels must be one of {', '.join(GUIDE_CHANNELS)}, got {guide_channels!r}")
    if precision not in PRECISIONS:
        raise JobError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if cfg_scale <= 1.0:
        fn = model.forward
    else:
        null_label = model.num_classes

        def fn(x, t, y):
            n = x.shape[0]
            if guidance_interval is not None and not (guidance_interval[0] <= 1 - float(t[0])
                                                      <= guidance_interval[1]):
                return model.forward(x, t, y)                              # outside the interval
            x_in = torch.cat([x, x], dim=0)                                # (2N, C, H, W)
            y_in = torch.cat([y, torch.full_like(y, null_label)], dim=0)
            out = model.forward_with_cfg(x_in, torch.cat([t, t], dim=0), y_in, cfg_scale,
                                         guide_channels=GUIDE_CHANNELS[guide_channels])
            return out[:n]                                                 # (N, out_channels, H, W)

    if channels_last:
        to_channels_last(model)
        nchw_fn = fn

        def fn(x, t, y):
            return nchw_fn(channels_last_input(x), t, y)

    device = next(model.parameters()).device
    return maybe_compile(autocast_forward(fn, device, precision), compile)
