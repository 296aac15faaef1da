"""Precomputed VAE latents ("features") in the official DiT/DiC per-file layout: read and write.

Layout (as in the official DiC release):
    <root>/<prefix>_features/<name>.npy   one latent, float32, shape (1, C, H, W)
    <root>/<prefix>_labels/<name>.npy     its class label, int64, shape (1,)
`<prefix>` is `imagenet<image size>` (e.g. imagenet256). A feature file and a label file belong
together when their names match; names are free-form (`<index>_<rank>.npy` in the official
release, `<index>.npy` and `<index>_flip.npy` from our extract_features.py) and any number of
pairs is fine.
"""
import io
import os
import re
import uuid
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import Dataset

FEATURES_SUFFIX = "_features"
LABELS_SUFFIX = "_labels"
TMP_PREFIX = ".partial-"  # in-progress files: hidden and not ending in .npy, so never read


def layout_prefix(image_size):
    """Folder prefix for an image size: 256 -> "imagenet256" (the official name)."""
    return f"imagenet{image_size}"


def layout_dirs(root, prefix):
    """(features folder, labels folder) of `prefix` under `root`."""
    root = os.fspath(root)
    return (os.path.join(root, prefix + FEATURES_SUFFIX), os.path.join(root, prefix + LABELS_SUFFIX))


def _natural_key(name):
    """Sort "10_0.npy" after "9_1.npy": numbers compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name) if part]


def _list_npy(folder):
    return {e.name for e in os.scandir(folder)
            if e.name.endswith(".npy") and not e.name.startswith(".") and e.is_file()}


#################################################################################
#                                   Writing                                     #
#################################################################################

def _atomic_npy(array, path):
    """np.save to a hidden temp file beside `path`, then rename: readers never see half a file."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _as_latent_array(latent):
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


#################################################################################
#                                   Reading                                     #
#################################################################################

def _npy_shape(path):
    """Shape stored in a .npy header, without reading the data."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            return tuple(read_header(f)[0])
    except (OSError, ValueError) as e:
        raise ValueError(f"latent file {path} cannot be read ({e}): is it a .npy file?") from e


def _load_npy(path):
    """np.load with a one-line error naming the file (a truncated or foreign file)."""
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"file {path} cannot be read ({e}): re-run the extraction "
                         f"(it rewrites incomplete files)") from e


def find_prefixes(root):
    """Every `<prefix>` with a `<prefix>_features` folder under `root`, sorted."""
    return sorted(e.name[:-len(FEATURES_SUFFIX)] for e in os.scandir(root)
                  if e.is_dir() and e.name.endswith(FEATURES_SUFFIX))


class LatentFeatureDataset(Dataset):
    """Latents of the official per-file layout: items `(latent float32 (C, H, W), label int64 ())`.

    `feature_path` is the root holding `<prefix>_features/` and `<prefix>_labels/` (or the
    `<prefix>_features` folder itself). `prefix` (e.g. "imagenet256") is needed only when the
    root holds more than one. Feature and label files are paired by name and sorted naturally.
    """

    def __init__(self, feature_path, prefix=None):
        root = os.path.abspath(os.fspath(feature_path))
        if not os.path.isdir(root):
            raise ValueError(f"feature path {feature_path} does not exist: pass the folder holding "
                             f"<prefix>_features/ and <prefix>_labels/ (e.g. imagenet256_features)")
        base = os.path.basename(root)
        if prefix is None and base.endswith(FEATURES_SUFFIX):  # pointed at the features folder
            root, prefix = os.path.dirname(root), base[:-len(FEATURES_SUFFIX)]
        if prefix is None:
            found = find_prefixes(root)
            if not found:
                raise ValueError(f"feature path {feature_path} holds no <prefix>_features folder "
                                 f"(e.g. imagenet256_features): run extract_features.py first")
            if len(found) > 1:
                raise ValueError(f"feature path {feature_path} holds several latent sets "
                                 f"({', '.join(p + FEATURES_SUFFIX for p in found)}): choose one "
                                 f"with the prefix (e.g. {found[0]!r})")
            prefix = found[0]
        self.root, self.prefix = root, prefix
        self.features_dir, self.labels_dir = layout_dirs(root, prefix)
        for folder in (self.features_dir, self.labels_dir):
            if not os.path.isdir(folder):
                raise ValueError(f"latent folder {folder} is missing: a latent set needs both "
                                 f"{prefix}{FEATURES_SUFFIX}/ and {prefix}{LABELS_SUFFIX}/")
        features, labels = _list_npy(self.features_dir), _list_npy(self.labels_dir)
        if not features:
            raise ValueError(f"latent folder {self.features_dir} holds no .npy files")
        if features != labels:
            no_label = sorted(features - labels, key=_natural_key)
            no_feature = sorted(labels - features, key=_natural_key)
            parts = []
            if no_label:
                parts.append(f"{len(no_label)} feature files have no label file (e.g. {no_label[0]})")
            if no_feature:
                parts.append(f"{len(no_feature)} label files have no feature file "
                             f"(e.g. {no_feature[0]})")
            raise ValueError(f"latent set {root}/{prefix}: {len(features)} feature files but "
                             f"{len(labels)} label files; {' and '.join(parts)}: feature and label "
                             f"files pair by name, so re-run the extraction or remove the strays")
        self.names = sorted(features, key=_natural_key)
        first = os.path.join(self.features_dir, self.names[0])
        shape = _npy_shape(first)
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[0] != 1):
            raise ValueError(f"latent file {first} has shape {shape}: expected "
                             f"(1, C, H, W) or (C, H, W)")
        self.latent_shape = tuple(shape[-3:])   # (C, H, W)
        self._labels = None

    def __len__(self):
        return len(self.names)

    def _read_label(self, name):
        label = _load_npy(os.path.join(self.labels_dir, name))
        if label.size != 1:
            raise ValueError(f"label file {os.path.join(self.labels_dir, name)} holds "
                             f"{label.size} values: expected one class index")
        return int(label.reshape(-1)[0])

    @property
    def labels(self):
        """All labels as an int64 array (read on first use: one small file per sample)."""
        if self._labels is None:
            self._labels = np.array([self._read_label(n) for n in self.names], dtype=np.int64)
        return self._labels

    @property
    def num_classes_seen(self):
        """max label + 1: the smallest --num-classes the latents fit."""
        return int(self.labels.max()) + 1

    def __getitem__(self, index):
        name = self.names[index]
        latent = _load_npy(os.path.join(self.features_dir, name))
        if latent.ndim not in (3, 4) or latent.size != int(np.prod(self.latent_shape)):
            raise ValueError(f"latent file {os.path.join(self.features_dir, name)} has shape "
                             f"{latent.shape}, the others {self.latent_shape}: mixed latent sets?")
        latent = torch.from_numpy(latent.reshape(self.latent_shape).astype(np.float32, copy=False))
        label = self._labels[index] if self._labels is not None else self._read_label(name)
        return latent, torch.tensor(label, dtype=torch.int64)
