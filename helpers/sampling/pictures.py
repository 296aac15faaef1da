"""The pictures of DiT's talks, made by sample.py: a guidance sweep (one grid column per
classifier-free guidance scale, every column from the same noise and labels) and a latent walk
(the images along a slerp between two seeds' noises, helpers.sampling.noise.WalkNoise).

    scales = parse_cfg_scales("1,1.5,4")                       # --cfg-scale's type
    check_pictures(scales, interpolate, nrow)                   # before any work
    batches = images_at_scales(model, vae, objective_config, settings, speed, scales,
                               make_noise, labels, image_size, device)
    grid = sweep_grid(batches)                                   # rows = labels, columns = scales
"""
import argparse
import math
from dataclasses import replace

import torch

from helpers.sampling.generation import generate, make_sampling
from helpers.utils.cli import JobError


def parse_cfg_scales(text):
    """--cfg-scale's argparse type: "4" -> (4.0,), "1,1.5,4" -> (1.0, 1.5, 4.0). The range is
    checked by check_pictures, so a bad scale is a one-line JobError like every other bad value."""
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes a number or comma-separated numbers such as 1,1.5,4, "
                                         f"got {text!r}") from None


def check_pictures(scales, interpolate, nrow):
    """The checks of a sweep or a walk that need no checkpoint: fail before any work is done.
    `interpolate`: the walk's image count (None: no walk); `nrow`: --nrow as given (None: unset)."""
    for scale in scales:
        if not math.isfinite(scale):
            raise JobError(f"--cfg-scale must be a finite number, got {scale}")
        if scale < 1.0:
            raise JobError(f"--cfg-scale must be >= 1 (1 = no guidance), got {scale}")
    if nrow is not None and nrow < 1:
        raise JobError(f"--nrow must be >= 1, got {nrow}")
    if len(scales) > 1 and nrow is not None:
        raise JobError("--nrow does not apply to a --cfg-scale sweep: its grid has one column per scale")
    if interpolate is None:
        return
    if interpolate < 2:
        raise JobError(f"--interpolate needs at least 2 images (the two seeds' own), got {interpolate}")
    if len(scales) > 1:
        raise JobError(f"--interpolate walks at one --cfg-scale, got {len(scales)}: run it once per scale")


def images_at_scales(model, vae, objective_config, settings, speed, scales, make_noise, labels, image_size,
                     device, report=None):
    """One batch of images (N, C, H, W) per guidance scale, in `scales`' order.

    Each scale gets its own model call and reverse process (make_sampling with `settings`'
    cfg_scale replaced) and a fresh noise (make_noise(), an IndexNoise or WalkNoise, whose
    generators restart), so every scale starts from the same numbers and a scale's batch is
    bit-identical to a run at that scale alone. report(sampler, model_fn) is called after each.
    """
    batches = []
    for scale in scales:
        if len(scales) > 1:
            print(f"--cfg-scale {scale:g}:")
        model_fn, sampler = make_sampling(model, vae, objective_config, replace(settings, cfg_scale=scale), speed)
        batches.append(generate(model, vae, sampler, model_fn, make_noise(), labels, image_size, device,
                                progress=True))
        if report is not None:
            report(sampler, model_fn)
    return batches


def sweep_grid(batches):
    """(N * S, C, H, W) from S batches of N images, row-major as save_image lays them out with
    nrow = S: row i holds label i at every scale, column j is scale j."""
    return torch.stack(batches, dim=1).flatten(0, 1)
