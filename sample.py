"""
Sample a grid of images from a trained DiC (or DiT) checkpoint, like DiT's sample.py.

    python sample.py --ckpt results/000-DiC-XL/checkpoints/0400000.pt --out sample.png

The checkpoint may be ours ({"model", "ema", "opt", "args"}), an official DiC/DiT file or a bare
state_dict; the EMA weights are used unless --weights model. Settings left unset (model, image
size, classes, VAE) are taken from the checkpoint's saved training args when it has them.
For many samples (FID), use sample_ddp.py. Image j of the grid draws its noise from a generator
seeded from (--seed, j), as image j of sample_ddp.py does: adding labels after it does not change
its noise.

The pictures of DiT's talks:

    python sample.py --ckpt ... --cfg-scale 1,1.5,4 --out sweep.png   # a column per guidance scale
    python sample.py --ckpt ... --class-labels 88 --interpolate 8 --out walk.png   # seed -> seed + 1
"""
import argparse
import os
import sys

import torch
from torchvision.utils import save_image

from helpers.utils.cli import JobError, run_main
from helpers.utils.distributed import setup_distributed
from helpers.utils.files import atomic_write
from helpers.utils.files import check_writable
from helpers.sampling.checkpoint_model import build_model, read_checkpoint
from helpers.sampling.flags import (DIT_DEFAULT_LABELS, add_model_args, add_sampling_args, add_speed_args,
                                    check_common_args, model_settings, parse_with_model_overrides, resolve_settings,
                                    sampler_settings, setup_speed)
from helpers.sampling.noise import WalkNoise, grid_noise
from helpers.sampling.pictures import check_pictures, images_at_scales, parse_cfg_scales, sweep_grid

DEFAULT_NROW = 4


def default_labels(num_classes, log=print):
    """DiT's 8 ImageNet labels for 1000-class models; 0..7 (mod num_classes) for others."""
    if num_classes == 1000:
        return list(DIT_DEFAULT_LABELS)
    labels = [i % num_classes for i in range(8)]
    log(f"No --class-labels given for a {num_classes}-class model: using {' '.join(map(str, labels))}")
    return labels


def check_grid_args(args):
    """sample.py's own checks, before any work: --cfg-scale, --interpolate, --nrow, --out, one process."""
    check_pictures(args.cfg_scales, args.interpolate, args.nrow)
    if not os.path.splitext(args.out)[1]:
        raise JobError(f"--out {args.out!r} needs an image extension such as .png")
    if os.path.exists(args.out) and not args.overwrite:
        raise JobError(f"{args.out} already exists: pass --overwrite to replace it, or another --out")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would write the same --out
        raise JobError("sample.py runs as one process: use sample_ddp.py under torchrun")
    check_writable(args.out, folder=False, keep_folder=False)   # errors before work: a read-only folder


def report_solver(sampler, model_fn, labels, settings):
    """Print the ODE solver's function evaluations and, with --likelihood, each sample's NLL."""
    if sampler.nfe is not None:
        print(f"The ODE solver ({settings.sampling_method}) made {sampler.nfe} function evaluations")
    if settings.likelihood:
        nll = sampler.bits_per_dim(model_fn, sampler.last_latents, labels)
        print(f"NLL of the samples (bits/dim, {settings.sampling_method}): "
              f"{' '.join(f'{v:.4f}' for v in nll.tolist())} (mean {nll.mean().item():.4f})")


@torch.no_grad()  # scoped to the run: in-process callers keep autograd
def main(args):
    # Check the flags and --out before any work:
    check_common_args(args)
    check_grid_args(args)
    device = setup_distributed().device  # this node's GPU (LOCAL_RANK) under a 1-process torchrun
    speed = setup_speed(args, device)  # --precision (said in one line), --channels-last, --compile

    # Settings left unset come from the checkpoint's saved args; load the model (EMA weights by
    # default) and the VAE (the largest scale decides whether guidance needs a null label):
    checkpoint, state_dict = read_checkpoint(args.ckpt, args.weights)
    resolve_settings(args, checkpoint, state_dict)
    del checkpoint
    labels = args.class_labels if args.class_labels else default_labels(args.num_classes)
    model, vae = build_model(model_settings(args), state_dict, device, max(args.cfg_scales))

    # Per-sample noise: sample j draws from a generator seeded by (seed, j), as in sample_ddp.py; a
    # walk slerps image 0's draws of two seeds. The guided model call and the reverse process (the
    # checkpoint's objective decides) are made per --cfg-scale:
    if args.interpolate is not None:
        labels = [labels[0]] * args.interpolate
        make_noise = lambda: WalkNoise(args.seed, args.interpolate, args.num_classes)  # noqa: E731
    else:
        make_noise = lambda: grid_noise(args.seed, len(labels), args.num_classes)  # noqa: E731
    y = torch.tensor(labels, dtype=torch.long)
    settings = sampler_settings(args)
    batches = images_at_scales(model, vae, args.objective_config, settings, speed, args.cfg_scales, make_noise,
                               y, args.image_size, device,
                               report=lambda sampler, model_fn: report_solver(sampler, model_fn, y, settings))

    # Save and display images:
    samples, nrow = sweep_grid(batches), grid_columns(args)
    atomic_write(args.out, lambda tmp: save_image(samples, tmp, nrow=nrow, normalize=True,
                                                  value_range=(-1, 1)), overwrite=args.overwrite)
    print(saved_message(args, labels))
    return args.out


def grid_columns(args):
    """Images per grid row: one per scale in a sweep, the whole walk in one row unless --nrow."""
    if len(args.cfg_scales) > 1:
        return len(args.cfg_scales)
    if args.nrow is not None:
        return args.nrow
    return args.interpolate if args.interpolate is not None else DEFAULT_NROW


def saved_message(args, labels):
    """What was written where, for the log."""
    if args.interpolate is not None:
        return (f"Saved a latent walk of {args.interpolate} images (label {labels[0]}, seed {args.seed} -> "
                f"{args.seed + 1}) to {args.out}")
    if len(args.cfg_scales) > 1:
        return (f"Saved a guidance sweep of {len(labels)} labels ({' '.join(map(str, labels))}) x "
                f"{len(args.cfg_scales)} scales ({', '.join(f'{s:g}' for s in args.cfg_scales)}) to {args.out}")
    return f"Saved a grid of {len(labels)} samples (labels {' '.join(map(str, labels))}) to {args.out}"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="labels to sample (default: DiT's 207 360 387 974 88 979 417 279)")
    add_sampling_args(parser, cfg_scale=4.0, cfg_scale_source="DiT's")
    add_picture_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nrow", type=int, default=None,
                        help=f"images per grid row (default {DEFAULT_NROW}; a walk: all in one row; "
                             f"a --cfg-scale sweep: one column per scale, no --nrow)")
    parser.add_argument("--out", type=str, default="sample.png", help="grid image to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_speed_args(parser)
    return parser


def add_picture_args(parser):
    """The guidance sweep and the latent walk. sample.py's --cfg-scale takes several scales, so it
    replaces add_sampling_args' float one (a group that resolves this one conflict; the parser
    still refuses any other duplicate flag)."""
    group = parser.add_argument_group("guidance sweep and latent walk", conflict_handler="resolve")
    group.add_argument("--cfg-scale", dest="cfg_scales", type=parse_cfg_scales, default=(4.0,),
                       metavar="SCALE[,SCALE...]",
                       help="classifier-free guidance scale, >= 1; 1 = no guidance (default: 4.0, DiT's). "
                            "Several, comma-separated (1,1.5,4): one grid column per scale, rows = labels, "
                            "every column from the same noise and labels")
    group.add_argument("--interpolate", type=int, default=None, metavar="N",
                       help="a latent walk of N images of the first --class-labels label from --seed's noise "
                            "to --seed + 1's (slerp at N evenly spaced points). Every random draw is "
                            "interpolated, x_T and an ancestral sampler's per-step noise alike, so the ends "
                            "are sample.py's images of the two seeds and the walk is smooth")
    return parser


def parse_args(argv=None):
    """Parse flags; leftover --network_g__key=value model overrides become args.model_kwargs.
    args.cfg_scale is the largest --cfg-scale, what the shared checks and settings read."""
    args = parse_with_model_overrides(build_parser(), argv)
    args.cfg_scale = max(args.cfg_scales)
    return args


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
