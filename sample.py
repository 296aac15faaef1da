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

from helpers.distributed import setup_distributed
from helpers.models import parse_model_overrides
from helpers.sampling import (DIT_DEFAULT_LABELS, IndexNoise, SamplingError, atomic_replace,
                              build_model, check_common_args, generate, make_diffusion,
                              make_model_fn, read_checkpoint, resolve_settings)


def default_labels(num_classes, log=print):
    """DiT's 8 ImageNet labels for 1000-class models; 0..7 (mod num_classes) for others."""
    if num_classes == 1000:
        return list(DIT_DEFAULT_LABELS)
    labels = [i % num_classes for i in range(8)]
    log(f"No --class-labels given for a {num_classes}-class model: using {' '.join(map(str, labels))}")
    return labels


def main(args):
    check_common_args(args)
    if not os.path.splitext(args.out)[1]:
        raise SamplingError(f"--out {args.out!r} needs an image extension such as .png")
    if os.path.exists(args.out) and not args.overwrite:
        raise SamplingError(f"{args.out} already exists: pass --overwrite to replace it, or another --out")
    if args.nrow < 1:
        raise SamplingError(f"--nrow must be >= 1, got {args.nrow}")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32  # True: fast, may change the last bits
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.set_grad_enabled(False)
    device = setup_distributed().device

    # Load the model (EMA weights by default) and the VAE:
    checkpoint, state_dict = read_checkpoint(args.ckpt, args.weights)
    resolve_settings(args, checkpoint, state_dict)
    del checkpoint
    labels = args.class_labels if args.class_labels else default_labels(args.num_classes)
    model, vae = build_model(args, state_dict, device)
    diffusion = make_diffusion(model, args.sampler, args.num_sampling_steps)

    # Per-sample noise: sample j draws from a generator seeded by (seed, j). Its random label is
    # drawn and discarded so the noise stream is the same as in sample_ddp.py.
    noise = IndexNoise(args.seed, range(len(labels)))
    noise.labels(args.num_classes)
    y = torch.tensor(labels, dtype=torch.long)
    model_fn = make_model_fn(model, args.cfg_scale, args.guide_channels)
    samples = generate(model, vae, diffusion, model_fn, noise, y, args, device, progress=True)

    # Save and display images:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_replace(lambda tmp: save_image(samples, tmp, nrow=args.nrow, normalize=True,
                                          value_range=(-1, 1)), args.out)
    print(f"Saved a grid of {len(labels)} samples (labels {' '.join(map(str, labels))}) to {args.out}")
    return args.out


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt", type=str, required=True,
                        help="checkpoint: ours, an official DiC/DiT file, or a bare state_dict")
    parser.add_argument("--weights", type=str, choices=["ema", "model"], default="ema",
                        help="which weights of our/DiT's checkpoint to use (default: ema)")
    parser.add_argument("--model", type=str, default=None,
                        help="model name, e.g. DiC-XL or DiT-XL/2 (default: checkpoint's, else DiC-XL)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in pixels (default: checkpoint's, else 256)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes (default: checkpoint's, else 1000)")
    parser.add_argument("--vae", type=str, default=None,
                        help="ema, mse, a local AutoencoderKL folder, or none for pixel space "
                             "(default: checkpoint's, else ema)")
    parser.add_argument("--in-channels", type=int, default=None,
                        help="image channels of a pixel-space model (--vae none); default: checkpoint's")
    parser.add_argument("--class-labels", type=int, nargs="+", default=None,
                        help="labels to sample (default: DiT's 207 360 387 974 88 979 417 279)")
    parser.add_argument("--cfg-scale", type=float, default=4.0,
                        help="classifier-free guidance scale; 1 = no guidance (default: 4.0, DiT's)")
    parser.add_argument("--guide-channels", type=str, choices=["official", "all"], default="official",
                        help="official: guide the first 3 latent channels as DiT/DiC; all: every channel")
    parser.add_argument("--num-sampling-steps", type=int, default=250)
    parser.add_argument("--sampler", type=str, choices=["ddpm", "ddim"], default="ddpm",
                        help="ddpm: DiT's ancestral sampler; ddim: deterministic DDIM (eta 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nrow", type=int, default=4, help="images per grid row")
    parser.add_argument("--out", type=str, default="sample.png", help="grid image to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="allow TF32 matmuls/convolutions on Ampere+ GPUs (default: on)")
    return parser


def parse_args(argv=None):
    """Parse flags; leftover --network_g__key=value model overrides become args.model_kwargs."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        args.model_kwargs = parse_model_overrides(extra)
    except ValueError as e:
        parser.error(str(e))
    return args


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
