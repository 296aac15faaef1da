"""Checkpoint I/O: atomic writes that never overwrite, and loading of ours, official or bare files.

Our checkpoints keep DiT's top-level keys ("model", "ema", "opt", "args") so DiT/DiC tools
read them; resume state lives beside them under its own keys.
"""
import os
from functools import lru_cache

import torch

from helpers.files import atomic_write
from helpers.models import all_models


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


def atomic_save(obj, path, overwrite=False):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file.

    Refuses to replace an existing file unless `overwrite` is set, so no run loses another's work.
    """
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite)


def load_checkpoint_file(path):
    """Read a checkpoint onto the CPU with a one-line error for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist: pass the path of a .pt file")
    try:
        # Our files hold argparse.Namespace args and RNG states, so full unpickling is needed;
        # only load checkpoints you trust, as with any torch.load.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                              f"is it a complete torch checkpoint?") from e


def strip_wrapper_prefixes(state_dict):
    """Drop wrappers' key prefixes (DDP's `module.`, torch.compile's `_orig_mod.`)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def extract_state_dict(checkpoint, which="ema"):
    """Pick model weights out of a checkpoint: ours/DiT's dict ("ema"/"model") or a bare state_dict.

    `which` is "ema" (the weights papers report) or "model". Asking for "ema" from a dict that
    has no "ema" is an error rather than a silent fall-back to the raw weights.
    """
    if _is_state_dict(checkpoint):
        return strip_wrapper_prefixes(checkpoint)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint holds a {type(checkpoint).__name__}, not model weights")
    if which in checkpoint and _is_state_dict(checkpoint[which]):
        return strip_wrapper_prefixes(checkpoint[which])
    present = ", ".join(k for k in checkpoint if _is_state_dict(checkpoint[k])) or "none"
    raise CheckpointError(f"checkpoint has no {which!r} weights (weight sets present: {present}); "
                          f"choose one of those")


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@lru_cache(maxsize=None)
def _registered_shapes(name, in_channels, num_classes, input_size, learn_sigma):
    """Key -> shape of a registered variant, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = all_models()[name](input_size=input_size, in_channels=in_channels,
                                   num_classes=num_classes, learn_sigma=learn_sigma)
    return _shapes(model.state_dict())


def identify_variant(state_dict, input_size, in_channels, num_classes, learn_sigma=True):
    """Name of the registered variant whose keys and shapes match `state_dict`, or None."""
    shapes = _shapes(state_dict)
    for name in all_models():
        try:
            if _registered_shapes(name, in_channels, num_classes, input_size, learn_sigma) == shapes:
                return name
        except (ValueError, AssertionError):  # variant cannot take this size/config
            continue
    return None


def _infer_config(state_dict, model):
    """Best guess of the checkpoint's input size / channels / classes, for naming its variant."""
    in_channels = model.in_channels
    weight = state_dict.get("x_embedder.proj.weight")
    if weight is not None and weight.ndim == 4:
        in_channels = weight.shape[1]
    num_classes = model.num_classes
    for key in ("y_embedder_ls.0.embedding_table.weight", "y_embedder.embedding_table.weight"):
        if key in state_dict:
            num_classes = state_dict[key].shape[0] - 1
    return in_channels, num_classes


def load_model_weights(model, state_dict, model_name):
    """Load weights with strict=True; on mismatch raise one line naming both variants.

    The usual mistake is a checkpoint of another variant (DiC-B weights for --model DiC-S):
    say which variant the file holds, so the fix is obvious.
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    expected = _shapes(model.state_dict())
    got = _shapes(state_dict)
    if expected == got:
        model.load_state_dict(state_dict, strict=True)
        return model
    in_channels, num_classes = _infer_config(state_dict, model)
    found = identify_variant(state_dict, model.input_size, in_channels, num_classes, model.learn_sigma)
    if found is not None and found != model_name:
        raise CheckpointError(f"checkpoint holds {found} weights but the model is {model_name}: "
                              f"pass --model {found} or a {model_name} checkpoint")
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    details = []
    if missing:
        details.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if mismatched:
        k = mismatched[0]
        details.append(f"{len(mismatched)} shape mismatches (e.g. {k}: checkpoint "
                       f"{tuple(got[k])} vs model {tuple(expected[k])})")
    raise CheckpointError(f"checkpoint does not fit {model_name} "
                          f"(input_size={model.input_size}, in_channels={model.in_channels}, "
                          f"num_classes={model.num_classes}): {'; '.join(details)}; check --model, "
                          f"--image-size, --num-classes and --vae")
