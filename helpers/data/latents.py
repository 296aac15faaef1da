"""Precomputed VAE latents ("features"): the official DiT/DiC per-file layout and a packed layout.

Per-file layout (as in the official DiC release):
    <root>/<prefix>_features/<name>.npy   one latent, float32, shape (1, C, H, W)
    <root>/<prefix>_labels/<name>.npy     its class label, int64, shape (1,)
`<prefix>` is `imagenet<image size>` (e.g. imagenet256). A feature file and a label file belong
together when their names match; names are free-form (`<index>_<rank>.npy` in the official
release, `<index>.npy` and `<index>_flip.npy` from our extract_features.py) and any number of
pairs is fine. Samples are ordered by name, numbers compared as numbers.

Packed layout (ours; written by `convert_features.py` or `extract_features.py --packed`):
    <root>/<prefix>_packed/latents.npy    (N, C, H, W) float32, all latents in the order above
    <root>/<prefix>_packed/labels.npy     (N,) int64, their labels
    <root>/<prefix>_packed/names.txt      N lines: the per-file name each row came from
    <root>/<prefix>_packed/info.json      format, version, count, latent_shape, source, ...
Plain .npy files, so `np.load(path, mmap_mode="r")` reads any row without loading the rest. The
folder is built as `<root>/.partial-<prefix>_packed` and renamed into place when complete, so a
crash never leaves a packed set that would be read. `LatentFeatureDataset` reads either layout
and yields the same items in the same order; where a root holds both, it reads the packed one.

This module is the layout and its reader; helpers/data/per_file_writer.py writes the per-file
layout and helpers/data/packing.py the packed one.
"""
import json
import os
import re

import numpy as np
import torch
from torch.utils.data import Dataset

from helpers.utils.cli import JobError

FEATURES_SUFFIX = "_features"
LABELS_SUFFIX = "_labels"
PACKED_SUFFIX = "_packed"
TMP_PREFIX = ".partial-"  # in-progress files: hidden and not ending in .npy, so never read
PACKED_FORMAT, PACKED_VERSION = "dic-packed-latents", 1
PACKED_LATENTS, PACKED_LABELS, PACKED_NAMES, PACKED_INFO = (
    "latents.npy", "labels.npy", "names.txt", "info.json")


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
    """Visible .npy file names in `folder` (temp files are hidden, so never listed)."""
    return {e.name for e in os.scandir(folder)
            if e.name.endswith(".npy") and not e.name.startswith(".") and e.is_file()}


#################################################################################
#                                   Reading                                     #
#################################################################################

def _npy_header(path, what, hint):
    """(shape, Fortran order, dtype, data offset) of a .npy file, reading only its header; a
    one-line ValueError "<what> file <path> cannot be read (...): <hint>" if it is not one."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            return tuple(shape), fortran, dtype, f.tell()
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} file {path} cannot be read ({e}): {hint}") from e


def _load_npy(path):
    """np.load with a one-line error naming the file (a truncated or foreign file)."""
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"file {path} cannot be read ({e}): re-run the extraction "
                         f"(it rewrites incomplete files)") from e


def file_names(root, prefix):
    """Names of the per-file set's feature files, in dataset order ([] if there is no folder)."""
    features_dir = layout_dirs(root, prefix)[0]
    if not os.path.isdir(features_dir):
        return []
    return sorted(_list_npy(features_dir), key=_natural_key)


def find_prefixes(root):
    """Every `<prefix>` with a `<prefix>_features` folder under `root`, sorted."""
    return sorted(e.name[:-len(FEATURES_SUFFIX)] for e in os.scandir(root)
                  if e.is_dir() and e.name.endswith(FEATURES_SUFFIX))


def packed_dir(root, prefix):
    """The packed set folder of `prefix` under `root`: <root>/<prefix>_packed."""
    return os.path.join(os.fspath(root), prefix + PACKED_SUFFIX)


def find_packed_prefixes(root):
    """Every `<prefix>` with a `<prefix>_packed` folder under `root`, sorted (temp folders are
    hidden, so an unfinished packing is never listed)."""
    return sorted(e.name[:-len(PACKED_SUFFIX)] for e in os.scandir(root)
                  if e.is_dir() and e.name.endswith(PACKED_SUFFIX) and not e.name.startswith("."))


def read_packed_info(folder):
    """Check a packed set folder (files present, headers and sizes as info.json says) without
    reading the data; returns its info dict. One-line ValueError for anything wrong."""
    info_path = os.path.join(folder, PACKED_INFO)
    if not os.path.isfile(info_path):
        raise ValueError(f"packed latent folder {folder} has no {PACKED_INFO}: it was not written "
                         f"(completely) by convert_features.py; delete it and convert again")
    try:
        with open(info_path) as f:
            info = json.load(f)
        count, shape = int(info["count"]), tuple(int(n) for n in info["latent_shape"])
        fmt, version = info["format"], int(info["version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{info_path} cannot be read ({type(e).__name__}: {e}): delete {folder} "
                         f"and convert again") from e
    if fmt != PACKED_FORMAT or version != PACKED_VERSION:
        raise ValueError(f"{info_path} describes format {fmt!r} version {version}, not "
                         f"{PACKED_FORMAT!r} version {PACKED_VERSION}: convert again with this code")
    expected = {PACKED_LATENTS: ((count, *shape), np.dtype(np.float32)),
                PACKED_LABELS: ((count,), np.dtype(np.int64))}
    for name, (want_shape, want_dtype) in expected.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"packed latent folder {folder} lacks {name}: delete it and convert again")
        got_shape, fortran, dtype, offset = _npy_header(
            path, "packed", "re-run convert_features.py into another folder")
        if fortran:     # rows of a Fortran-order memory map are not the latents
            raise ValueError(f"packed file {path} cannot be read (Fortran order): re-run "
                             f"convert_features.py into another folder")
        if got_shape != want_shape or dtype != want_dtype:
            raise ValueError(f"packed file {path} holds {dtype} {got_shape}, but {PACKED_INFO} says "
                             f"{want_dtype} {want_shape}: delete {folder} and convert again")
        size = offset + int(np.prod(want_shape)) * want_dtype.itemsize
        if os.path.getsize(path) != size:
            raise ValueError(f"packed file {path} has {os.path.getsize(path)} bytes, expected "
                             f"{size}: it is truncated; delete {folder} and convert again")
    if not os.path.isfile(os.path.join(folder, PACKED_NAMES)):
        raise ValueError(f"packed latent folder {folder} lacks {PACKED_NAMES}: delete it and "
                         f"convert again")
    return info


def read_packed_names(folder):
    """The per-file names of a packed set's rows, in row order."""
    with open(os.path.join(folder, PACKED_NAMES), encoding="utf-8") as f:
        return f.read().splitlines()


LAYOUTS = ("auto", "files", "packed")


class LatentFeatureDataset(Dataset):
    """Precomputed latents: items `(latent float32 (C, H, W), label int64 ())`.

    `feature_path` is a root holding `<prefix>_features/` + `<prefix>_labels/` (the official
    per-file layout) and/or `<prefix>_packed/` (the packed layout), or one of those folders
    itself. `prefix` (e.g. "imagenet256") is needed only when the root holds latents of more
    than one prefix. `layout`: "auto" reads the packed set where there is one, else the files;
    "files" or "packed" insist on one. Both give the same items in the same order (file names
    sorted naturally); `.layout` says which one was read.
    """

    def __init__(self, feature_path, prefix=None, layout="auto", skip_nonfinite=False,
                 num_classes=None):
        self.skip_nonfinite = bool(skip_nonfinite)
        self.skipped_nonfinite = set()      # indices skipped for NaN/inf (in this process)
        self.num_classes = None if num_classes is None else int(num_classes)
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        root = os.path.abspath(os.fspath(feature_path))
        if not os.path.isdir(root):
            raise ValueError(f"feature path {feature_path} does not exist: pass the folder holding "
                             f"<prefix>_features/ and <prefix>_labels/ (e.g. imagenet256_features) "
                             f"or <prefix>_packed/")
        base = os.path.basename(root)
        if prefix is None and base.endswith(FEATURES_SUFFIX) and layout != "packed":
            root, prefix, layout = os.path.dirname(root), base[:-len(FEATURES_SUFFIX)], "files"
        elif prefix is None and base.endswith(PACKED_SUFFIX) and layout != "files":
            root, prefix, layout = os.path.dirname(root), base[:-len(PACKED_SUFFIX)], "packed"
        if prefix is None:
            prefix = self._only_prefix(feature_path, root, layout)
        if layout == "auto":
            layout = "packed" if os.path.isdir(packed_dir(root, prefix)) else "files"
        self.root, self.prefix, self.layout = root, prefix, layout
        self._labels = None
        if layout == "packed":
            self._init_packed()
        else:
            self._init_files()

    @staticmethod
    def _only_prefix(feature_path, root, layout):
        files = find_prefixes(root) if layout != "packed" else []
        packed = find_packed_prefixes(root) if layout != "files" else []
        found = sorted(set(files) | set(packed))
        if not found:
            unfinished = [e.name for e in os.scandir(root)
                          if e.name.startswith(TMP_PREFIX) and e.name.endswith(PACKED_SUFFIX)]
            hint = (f" ({unfinished[0]} is an unfinished packing: run convert_features.py again "
                    f"to finish it)" if unfinished else "")
            wanted = {"files": "<prefix>_features folder (e.g. imagenet256_features)",
                      "packed": "<prefix>_packed folder (e.g. imagenet256_packed)",
                      "auto": "<prefix>_features folder (e.g. imagenet256_features) nor "
                              "<prefix>_packed folder"}[layout]
            raise ValueError(f"feature path {feature_path} holds no {wanted}{hint}: run "
                             f"extract_features.py first")
        if len(found) > 1:
            shown = [p + (PACKED_SUFFIX if p in packed else FEATURES_SUFFIX) for p in found]
            raise ValueError(f"feature path {feature_path} holds several latent sets "
                             f"({', '.join(shown)}): choose one with the prefix (e.g. {found[0]!r})")
        return found[0]

    # ----------------------------------------------------------------- per-file layout
    def _init_files(self):
        root, prefix = self.root, self.prefix
        self.features_dir, self.labels_dir = layout_dirs(root, prefix)
        self.packed_dir = None
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
        self._names = sorted(features, key=_natural_key)
        first = os.path.join(self.features_dir, self._names[0])
        shape = _npy_header(first, "latent", "is it a .npy file?")[0]
        if len(shape) not in (3, 4) or (len(shape) == 4 and shape[0] != 1):
            raise ValueError(f"latent file {first} has shape {shape}: expected "
                             f"(1, C, H, W) or (C, H, W)")
        self.latent_shape = tuple(shape[-3:])   # (C, H, W)
        self._count = len(self._names)

    def _read_label(self, name):
        """One per-file label, checked (integer dtype, integral, in range) by check_label."""
        path = os.path.join(self.labels_dir, name)
        label = _load_npy(path)
        if label.size != 1:
            raise JobError(f"label file {path} holds {label.size} values: expected one class index")
        return self._check_label(label.reshape(-1)[0], label.dtype, f"label file {path}")

    def _check_label(self, value, dtype, where):
        """`value` as an int if it is a valid class index (integer dtype, in [0, num_classes)),
        else a one-line JobError naming `where` and the value."""
        if not np.issubdtype(dtype, np.integer):
            shown = value.item() if hasattr(value, "item") else value
            raise JobError(f"{where} holds {shown!r} ({dtype}): labels must be integer class "
                           f"indices (int64); re-run the extraction or fix the file")
        value = int(value)
        if value < 0 or (self.num_classes is not None and value >= self.num_classes):
            limit = f"{self.num_classes}" if self.num_classes is not None else "the class count"
            raise JobError(f"{where} holds label {value}, outside [0, {limit}): fix the file, or "
                           f"pass a --num-classes above every label")
        return value

    def _nonfinite(self, index, where):
        """Handle a latent with NaN/inf values: an error naming it, or with skip_nonfinite a
        skip that is counted (`.skipped_nonfinite`)."""
        if not self.skip_nonfinite:
            raise JobError(f"{where} holds non-finite values (NaN or inf): re-extract it, delete "
                           f"it, or pass --skip-nonfinite to skip such latents")
        self.skipped_nonfinite.add(index)

    def _read_latent(self, name):
        """One per-file latent as a float32 (C, H, W) array, its shape checked."""
        path = os.path.join(self.features_dir, name)
        latent = _load_npy(path)
        if latent.shape not in (self.latent_shape, (1, *self.latent_shape)):
            raise ValueError(f"latent file {path} has shape {latent.shape}, the others "
                             f"{self.latent_shape}: mixed latent sets?")
        return latent.reshape(self.latent_shape).astype(np.float32, copy=False)

    def check_labels(self, num_classes=None):
        """Check every label (integer, in [0, num_classes)) now, so a bad one stops the job at
        start-up naming its file instead of mid-training; later reads check the range too.
        Returns the labels."""
        if num_classes is not None:
            self.num_classes = int(num_classes)
        labels = self.labels
        limit = self.num_classes if self.num_classes is not None else np.iinfo(np.int64).max
        bad = np.flatnonzero((labels < 0) | (labels >= limit))
        if bad.size:
            row = int(bad[0])
            where = (self._packed_row(row) if self.layout == "packed" else
                     f"label file {os.path.join(self.labels_dir, self.names[row])}")
            self._check_label(labels[row], labels.dtype, where)
        return labels

    # ------------------------------------------------------------------- packed layout
    def _init_packed(self):
        self.features_dir = self.labels_dir = None
        self.packed_dir = packed_dir(self.root, self.prefix)
        if not os.path.isdir(self.packed_dir):
            raise ValueError(f"packed latent folder {self.packed_dir} is missing: convert the "
                             f"per-file set with convert_features.py first")
        self.info = read_packed_info(self.packed_dir)
        self.latent_shape = tuple(int(n) for n in self.info["latent_shape"])
        self._count = int(self.info["count"])
        self._names = None          # names.txt is read on first use
        self._arrays, self._arrays_pid = None, None
        self._scan_packed()

    def _packed_row(self, row):
        """Where a packed row comes from, for messages: the file and its per-file name."""
        names = read_packed_names(self.packed_dir)
        name = names[row] if row < len(names) else "?"
        return f"packed latent set {self.packed_dir} row {row} (from {name})"

    def _scan_packed(self, rows_per_chunk=None):
        """Start-up check of a packed set: every latent finite (else an error naming the row,
        or with skip_nonfinite the rows are skipped and counted) and every label integral."""
        latents, labels = self._packed_arrays()
        per_row = max(1, int(np.prod(self.latent_shape)))
        step = rows_per_chunk or max(1, (64 << 20) // (4 * per_row))     # ~64 MB at a time
        for start in range(0, self._count, step):
            chunk = np.asarray(latents[start:start + step]).reshape(-1, per_row)
            for row in np.flatnonzero(~np.isfinite(chunk).all(axis=1)) + start:
                self._nonfinite(int(row), self._packed_row(int(row)))
        negative = np.flatnonzero(np.asarray(labels) < 0)
        if negative.size:
            self._check_label(labels[negative[0]], labels.dtype, self._packed_row(negative[0]))

    def _packed_arrays(self):
        """(latents, labels) memory maps, opened lazily in each process (DataLoader workers
        map the files themselves instead of inheriting a parent's map)."""
        if self._arrays is None or self._arrays_pid != os.getpid():
            self._arrays = (np.load(os.path.join(self.packed_dir, PACKED_LATENTS), mmap_mode="r"),
                            np.load(os.path.join(self.packed_dir, PACKED_LABELS), mmap_mode="r"))
            self._arrays_pid = os.getpid()
        return self._arrays

    def __getstate__(self):
        state = dict(self.__dict__)
        if "_arrays" in state:      # memory maps are reopened by whoever unpickles this
            state["_arrays"], state["_arrays_pid"] = None, None
        return state

    # ------------------------------------------------------------------------- common
    @property
    def names(self):
        """Per-file names of the samples, in item order (for a packed set: its names.txt)."""
        if self._names is None:
            self._names = read_packed_names(self.packed_dir)
            if len(self._names) != self._count:
                raise ValueError(f"{os.path.join(self.packed_dir, PACKED_NAMES)} lists "
                                 f"{len(self._names)} names for {self._count} latents: delete "
                                 f"{self.packed_dir} and convert again")
        return self._names

    def __len__(self):
        return self._count

    @property
    def labels(self):
        """All labels as an int64 array (per-file: read on first use, one small file per sample)."""
        if self._labels is None:
            if self.layout == "packed":
                self._labels = np.array(self._packed_arrays()[1], dtype=np.int64)
            else:
                self._labels = np.array([self._read_label(n) for n in self.names], dtype=np.int64)
        return self._labels

    @property
    def num_classes_seen(self):
        """max label + 1: the smallest --num-classes the latents fit."""
        return int(self.labels.max()) + 1

    def __getitem__(self, index):
        """(latent, label), or None for a latent skipped for non-finite values (skip_nonfinite;
        the trainers' collate_skip_none drops it)."""
        if self.layout == "packed":
            latents, labels = self._packed_arrays()
            if not -self._count <= index < self._count:
                raise IndexError(f"index {index} is out of range for {self._count} latents")
            if index % self._count in self.skipped_nonfinite:
                return None
            latent = torch.from_numpy(np.array(latents[index]))   # a copy: never a view of the map
            label = int(labels[index])
            if label < 0 or (self.num_classes is not None and label >= self.num_classes):
                self._check_label(label, labels.dtype, self._packed_row(index % self._count))
            return latent, torch.tensor(label, dtype=torch.int64)
        name = self.names[index]
        latent = self._read_latent(name)
        if not np.isfinite(latent).all():
            self._nonfinite(index % self._count, f"latent file {os.path.join(self.features_dir, name)}")
            return None
        label = self._labels[index] if self._labels is not None else self._read_label(name)
        if self.num_classes is not None:
            label = self._check_label(label, np.dtype(np.int64), f"label file "
                                      f"{os.path.join(self.labels_dir, name)}")
        return torch.from_numpy(latent), torch.tensor(label, dtype=torch.int64)
