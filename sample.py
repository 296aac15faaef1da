"""
Sample a grid of images from a trained DiC (or DiT) checkpoint, like DiT's sample.py.

    python sample.py --ckpt results/000-DiC-XL/checkpoints/0400000.pt --out sample.png

The checkpoint may be ours ({"model", "ema", "opt", "args"}), an official DiC/DiT file or a bare
state_dict; the EMA weights are used unless --weights model. Settings left unset (model, image
size, classes, VAE) are taken from the checkpoint's saved training args when it has them.
For many samples (FID), use sample_ddp.py. Image j of the grid draws its noise from a generator
seeded from (--seed, j), as image j of sample_ddp.py does: adding labels after it does not change
its noise.
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
from helpers.sampling.generation import generate, make_sampling
from helpers.sampling.noise import grid_noise


def default_labels(num_classes, log=print):
    """DiT's 8 ImageNet labels for 1000-class models; 0..7 (mod num_classes) for others."""
    if num_classes == 1000:
        return list(DIT_DEFAULT_LABELS)
    labels = [i % num_classes for i in range(8)]
    log(f"No --class-labels given for a {num_classes}-class model: using {' '.join(map(str, labels))}")
    return labels


def check_grid_args(args):
    """sample.py's own checks, before any work: --out, --nrow, one process."""
    if not os.path.splitext(args.out)[1]:
        raise JobError(f"--out {args.out!r} needs an image extension such as .png")
    if os.path.exists(args.out) and not args.overwrite:
        raise JobError(f"{args.out} already exists: pass --overwrite to replace it, or another --out")
    if args.nrow < 1:
        raise JobError(f"--nrow must be >= 1, got {args.nrow}")
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
    speed = setup_speed(args)  # --precision, --channels-last, --compile

    # Settings left unset come from the checkpoint's saved args; load the model (EMA weights by
    # default) and the VAE:
    checkpoint, state_dict = read_checkpoint(args.ckpt, args.weights)
    resolve_settings(args, checkpoint, state_dict)
    del checkpoint
    labels = args.class_labels if args.class_labels else default_labels(args.num_classes)
    model, vae = build_model(model_settings(args), state_dict, device, args.cfg_scale)

    # The guided model call and the reverse process (the checkpoint's objective decides):
    settings = sampler_settings(args)
    model_fn, sampler = make_sampling(model, vae, args.objective_config, settings, speed)

    # Per-sample noise: sample j draws from a generator seeded by (seed, j), as in sample_ddp.py.
    noise = grid_noise(args.seed, len(labels), args.num_classes)
    y = torch.tensor(labels, dtype=torch.long)
    samples = generate(model, vae, sampler, model_fn, noise, y, args.image_size, device, progress=True)
    report_solver(sampler, model_fn, y, settings)

    # Save and display images:
    atomic_write(args.out, lambda tmp: save_image(samples, tmp, nrow=args.nrow, normalize=True,
                                                  value_range=(-1, 1)), overwrite=args.overwrite)
    print(f"Saved a grid of {len(labels)} samples (labels {' '.join(map(str, labels))}) to {args.out}")
    return args.out


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="labels to sample (default: DiT's 207 360 387 974 88 979 417 279)")
    add_sampling_args(parser, cfg_scale=4.0, cfg_scale_source="DiT's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nrow", type=int, default=4, help="images per grid row")
    parser.add_argument("--out", type=str, default="sample.png", help="grid image to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_speed_args(parser)
    return parser


def parse_args(argv=None):
    """Parse flags; leftover --network_g__key=value model overrides become args.model_kwargs."""
    return parse_with_model_overrides(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
