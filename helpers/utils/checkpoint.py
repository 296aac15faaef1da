"""Reading weights files safely: ours, official DiT/DiC/DiCo files, bare state_dicts and exported
.safetensors; picking a weight set out of them; loading it into a model with a clear error.

Every .pt file is read with torch.load(weights_only=True): a file can hold tensors and plain Python
values only, so a checkpoint from anywhere runs no code when read. Checkpoints written by earlier
versions of this project (argparse.Namespace args, NumPy RNG states) are read with exactly those
types allow-listed, nothing more.
"""
import argparse
import json
import os
import pickle
import re
from functools import lru_cache

import numpy as np
import torch

from helpers.utils.cli import JobError, one_line
from helpers.utils.files import atomic_write
from helpers.utils.models import all_models, canonical_name

SAFETENSORS_EXT = ".safetensors"
# What checkpoints of this project written before the safe format hold besides tensors.
_LEGACY_GLOBALS = [argparse.Namespace, np.ndarray, np.dtype,
                   (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct,
                   *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType"))]


def atomic_save(obj, path, overwrite=False):
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file.

    Refuses to replace an existing file unless `overwrite` is set, so no run loses another's work.
    A full disk is one line (helpers.utils.files.NoSpaceError) with the checkpoint's size in it.
    """
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite, size_hint=tensor_bytes(obj))


def tensor_bytes(obj):
    """Bytes of the tensors in a (nested) checkpoint: about its size on disk."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def refusal(path, reason):
    """The one line for a file that is not a plain weights file."""
    return (f"checkpoint {path} was refused: it is not a plain weights file ({reason}); if you trust "
            f"its source, convert it once with: python export.py --trust-pickle --ckpt {path} --out "
            f"{os.path.splitext(path)[0]}-safe.pt")


def load_checkpoint_file(path, mmap=False):
    """A checkpoint's contents on the CPU, read without running code: .safetensors gives
    {"ema": tensors, "metadata": {...}}; a .pt file is read with weights_only=True."""
    if not os.path.isfile(path):
        raise JobError(f"checkpoint {path} does not exist: pass the path of a .pt or .safetensors file")
    if path.endswith(SAFETENSORS_EXT):
        return read_safetensors(path)
    try:
        with torch.serialization.safe_globals(_LEGACY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every unreadable file gets a clear one-line message
        refused = _unsafe_global(e) if isinstance(e, pickle.UnpicklingError) else None
        if refused:
            raise JobError(refusal(path, f"it holds {refused}, which loading would call")) from e
        if mmap:   # not a zip checkpoint (e.g. torch's legacy format): read it without mmap
            return load_checkpoint_file(path)
        raise JobError(f"checkpoint {path} cannot be read ({type(e).__name__}): is it a complete torch "
                       f"checkpoint?") from e


def _unsafe_global(error):
    """The global a weights-only load refused (e.g. "io.open"), or None for another failure."""
    found = re.search(r"Unsupported global:\s*GLOBAL\s+([\w.<>]+)", str(error))
    return found.group(1) if found else None


def read_safetensors(path):
    """An exported .safetensors file as {"ema": state_dict, "metadata": {key: JSON-decoded value}}."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            weights = {key: f.get_tensor(key) for key in f.keys()}
            raw = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise JobError(f"{path} is not a readable .safetensors file ({one_line(e)}): export it again "
                       f"with export.py") from e
    metadata = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)
        except ValueError:
            metadata[key] = value
    return {"ema": weights, "metadata": metadata}


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
        raise JobError(f"checkpoint holds a {type(checkpoint).__name__}, not model weights")
    if which in checkpoint and _is_state_dict(checkpoint[which]):
        return strip_wrapper_prefixes(checkpoint[which])
    present = ", ".join(k for k in checkpoint if _is_state_dict(checkpoint[k])) or "none"
    raise JobError(f"checkpoint has no {which!r} weights (weight sets present: {present}); "
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
    for key in ("y_embedder_ls.0.embedding_table.weight", "y_embedder.embedding_table.weight",
                "y_embedder.embedding_table_0.weight"):
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
    if found is not None and found != canonical_name(model_name):
        raise JobError(f"checkpoint holds {found} weights but the model is {model_name}: "
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
    raise JobError(f"checkpoint does not fit {model_name} "
                          f"(input_size={model.input_size}, in_channels={model.in_channels}, "
                          f"num_classes={model.num_classes}): {'; '.join(details)}; check --model, "
                          f"--image-size, --num-classes and --vae")
