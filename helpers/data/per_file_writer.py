"""Writing latents in the official per-file layout (see helpers/data/latents.py for the layout):
one atomically written `<name>.npy` pair per image, as extract_features.py writes them, plus the
checks a resumed extraction needs (which pairs are complete, which temp files a killed run left).
"""
import io
import os
import uuid
from functools import lru_cache

import numpy as np
import torch

from helpers.data.latents import TMP_PREFIX, layout_dirs
from helpers.utils.files import is_out_of_space, no_space_error


def _atomic_npy(array, path):
    """np.save to a hidden temp file beside `path`, then rename: readers never see half a file.

    Not helpers.utils.files.atomic_write, on purpose: no fsync per file (an extraction writes two
    small files per image, millions for ImageNet; a file a crash left short fails
    pair_is_complete's size check and is rewritten on resume), and the temp name starts with
    TMP_PREFIX, which remove_partial_files clears after a killed run.
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and is_out_of_space(e, folder):
            raise no_space_error(folder, path, array.nbytes + 128) from e
        raise


def _as_latent_array(latent):
    """A latent (tensor or array, (C, H, W) or (1, C, H, W)) as the file's (1, C, H, W) float32."""
    if torch.is_tensor(latent):
        latent = latent.detach().to("cpu", torch.float32).numpy()
    latent = np.asarray(latent, dtype=np.float32)
    if latent.ndim == 3:
        latent = latent[None]                       # (C, H, W) -> (1, C, H, W)
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise ValueError(f"a latent must have shape (C, H, W) or (1, C, H, W), got {latent.shape}")
    return np.ascontiguousarray(latent)


def write_latent(root, index_name, latent, label, prefix="imagenet256"):
    """Write one (latent, label) pair as `<index_name>.npy` in the official layout, atomically.

    The label goes first, so an existing feature file always has its complete label beside it.
    Returns the feature file's path.
    """
    features_dir, labels_dir = layout_dirs(root, prefix)
    os.makedirs(features_dir, exist_ok=True)
    os.makedirs(labels_dir, exist_ok=True)
    name = f"{index_name}.npy"
    _atomic_npy(np.array([int(label)], dtype=np.int64), os.path.join(labels_dir, name))
    path = os.path.join(features_dir, name)
    _atomic_npy(_as_latent_array(latent), path)
    return path


@lru_cache(maxsize=None)
def _npy_nbytes(shape, dtype_str):
    """Cached by (shape, dtype): the header size depends on both, so np.save measures it once."""
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=np.dtype(dtype_str)))
    return buf.tell()


def npy_nbytes(shape, dtype):
    """Size in bytes of the .npy file np.save writes for an array of this shape and dtype."""
    return _npy_nbytes(tuple(int(n) for n in shape), np.dtype(dtype).str)


def pair_is_complete(root, index_name, latent_shape, prefix="imagenet256"):
    """True if both files of `index_name` exist with the sizes of a (1, C, H, W) float32 latent
    and a (1,) int64 label (so a truncated file from a power cut counts as missing)."""
    features_dir, labels_dir = layout_dirs(root, prefix)
    name = f"{index_name}.npy"
    expected = ((os.path.join(features_dir, name), npy_nbytes((1, *latent_shape), np.float32)),
                (os.path.join(labels_dir, name), npy_nbytes((1,), np.int64)))
    try:
        return all(os.path.getsize(path) == size for path, size in expected)
    except OSError:  # a file is missing
        return False


def remove_partial_files(root, prefix):
    """Delete temp files left by a killed writer; returns how many were removed."""
    removed = 0
    for folder in layout_dirs(root, prefix):
        if os.path.isdir(folder):
            for entry in os.scandir(folder):
                if entry.name.startswith(TMP_PREFIX):
                    os.remove(entry.path)
                    removed += 1
    return removed
