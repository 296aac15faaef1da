"""
Export the weights of a training checkpoint: EMA weights only, as .safetensors, with the model name,
its constructor settings and the training objective in the metadata. sample.py and sample_ddp.py
read the file directly (no --model needed).

    python export.py --ckpt results/000-DiC-XL/checkpoints/0400000.pt --out DiC-XL.safetensors
    python export.py --ckpt REPA-SiT-XL-2-4M.pt --out REPA-SiT-XL-2.safetensors     # REPA's: objective rf

Releases that do not record their objective are recognised from their content (helpers/utils/releases.py):
REPA's files (projectors, REPA's args) export with REPA's rectified flow and without the projectors;
SiT's release exports with SiT's flow given --model SiT-XL/2.

Checkpoints are read with torch.load(weights_only=True), which refuses files that could run code
when unpickled. A file you trust that holds other Python objects (e.g. from another codebase) is
converted once into a plain one with --trust-pickle:

    python export.py --trust-pickle --ckpt trusted.pt --out trusted-safe.pt        # whole checkpoint
    python export.py --trust-pickle --ckpt trusted.pt --out model.safetensors      # EMA weights
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

from helpers.utils.checkpoint import SAFETENSORS_EXT, atomic_save, extract_state_dict, load_checkpoint_file
from helpers.utils.cli import JobError, one_line, run_main
from helpers.utils.files import atomic_write
from helpers.utils.models import canonical_name, is_model_name, model_names
from helpers.utils.releases import release_objective, sampling_args, split_projectors
from helpers.training.objectives import create_objective, objective_of_checkpoint
from helpers.training.runs import plain_rng_state, saved_args

EXPORT_FORMAT = "dic-export-1"
# The saved training flags a sampler needs to rebuild the model and its data space.
SAMPLER_ARGS = ("model", "image_size", "num_classes", "vae", "in_channels", "model_overrides", "dataset")


def to_plain(obj):
    """A trusted checkpoint's contents with only tensors and plain Python values (what
    torch.load(weights_only=True) reads): Namespaces become dicts, NumPy arrays tensors."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        if "numpy" in obj and "python" in obj and "torch" in obj:   # an RNG state of ours
            obj = plain_rng_state(obj)
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or torch.is_tensor(obj) or isinstance(obj, (bool, int, float, str, torch.Size)):
        return obj
    return str(obj)


def read_trusted(path):
    """Full unpickling, only behind --trust-pickle: the user vouches for the file."""
    if not os.path.isfile(path):
        raise JobError(f"checkpoint {path} does not exist: pass the path of a .pt file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise JobError(f"checkpoint {path} cannot be read ({type(e).__name__}: {one_line(e)})") from e


def export_metadata(checkpoint, model_name, objective):
    """The .safetensors metadata: model, sampler settings and objective, JSON-encoded strings."""
    saved = to_plain(sampling_args(saved_args(checkpoint), checkpoint))
    sampler_args = {k: saved[k] for k in SAMPLER_ARGS if k in saved}
    sampler_args["model"] = model_name
    return {"format": EXPORT_FORMAT, "model": json.dumps(model_name), "args": json.dumps(sampler_args),
            "model_kwargs": json.dumps(checkpoint.get("model_kwargs") if isinstance(checkpoint, dict) else None),
            "objective": json.dumps(objective)}


def checkpoint_objective(checkpoint, weights, given_name):
    """The objective to record: the checkpoint's own, else a release's recognised from its content
    (REPA's layout: rf; a SiT-named DiT file: SiT's flow), else DDPM (DiT's and DiC's releases)."""
    recorded = objective_of_checkpoint(checkpoint)
    if recorded is None:
        recorded, recognised = release_objective(checkpoint, weights, given_name)
        if recognised:
            print(recognised.replace("sampling with", "exporting as"))
    return recorded or create_objective(None).config()


def main(args):
    # Check --out before any work:
    ext = os.path.splitext(args.out)[1]
    if ext not in (SAFETENSORS_EXT, ".pt"):
        raise JobError(f"--out {args.out} must end in {SAFETENSORS_EXT} (EMA weights) or .pt (a converted "
                       f"checkpoint, with --trust-pickle)")
    if ext == ".pt" and not args.trust_pickle:
        raise JobError(f"--out {args.out}: a .pt output is the --trust-pickle conversion; to export weights "
                       f"use a {SAFETENSORS_EXT} name")
    if os.path.exists(args.out):
        raise JobError(f"{args.out} already exists: choose another --out or move it away")

    # Read the checkpoint (full unpickling only with --trust-pickle); a .pt out is the whole of it, made plain:
    checkpoint = read_trusted(args.ckpt) if args.trust_pickle else load_checkpoint_file(args.ckpt)
    if ext == ".pt":
        atomic_save(to_plain(checkpoint), args.out)
        print(f"Converted {args.ckpt} into {args.out} (tensors and plain values only)")
        return args.out

    # The chosen weights (EMA by default) and what a sampler needs to rebuild the model, as .safetensors:
    weights, projectors = split_projectors(extract_state_dict(to_plain(checkpoint), args.weights))
    given_name = args.model or saved_args(checkpoint).get("model")
    if not is_model_name(given_name):
        raise JobError(f"{args.ckpt} does not say which model it holds: pass --model (one of "
                       f"{', '.join(model_names())}, or SiT-XL/2 etc.)")
    model_name = canonical_name(given_name)
    metadata = export_metadata(checkpoint, model_name, checkpoint_objective(checkpoint, weights, given_name))
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous() for k, v in weights.items()}
    atomic_write(args.out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    dropped = f", without its {len(projectors)} REPA projector tensors" if projectors else ""
    print(f"Exported the {args.weights} weights of {model_name} ({len(tensors)} tensors{dropped}) to {args.out}")
    return args.out


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--ckpt", type=str, required=True, help="a checkpoint (ours, official DiT/DiC, bare)")
    parser.add_argument("--out", type=str, required=True, help="NAME.safetensors (or NAME.pt with --trust-pickle)")
    parser.add_argument("--weights", type=str, choices=["ema", "model"], default="ema")
    parser.add_argument("--model", type=str, default=None, help="model name, for files that do not record it")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read --ckpt with full unpickling (runs code it holds): only for files you trust")
    return parser


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser().parse_args()))
