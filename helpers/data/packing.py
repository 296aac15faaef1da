"""Writing the packed latent layout (see helpers/data/latents.py for the layout): `pack_latents`
converts a per-file set into `<root>/<prefix>_packed/`, built in a hidden, locked
`.partial-<prefix>_packed` folder, resumable from its last saved row and renamed into place only
when complete, so a crash never leaves a packed set that would be read.
"""
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from helpers.data.latents import (FEATURES_SUFFIX, PACKED_FORMAT, PACKED_INFO, PACKED_LABELS,
                                  PACKED_LATENTS, PACKED_NAMES, PACKED_SUFFIX, PACKED_VERSION,
                                  TMP_PREFIX, LatentFeatureDataset, packed_dir, read_packed_info,
                                  read_packed_names)
from helpers.utils.cli import JobError
from helpers.utils.files import NoSpaceError, atomic_write_text, fsync_path, remove_stale_temps, reserve_space
from helpers.utils.locks import LOCK_NAME, RunLock

PACKED_PROGRESS = "progress.json"   # only inside an unfinished .partial-<prefix>_packed folder


class PackedSetExistsError(JobError, FileExistsError):
    """A packed set is already there and overwriting was not asked for; `.path` is its folder."""

    def __init__(self, path, message):
        super().__init__(message)
        self.path = path


def _lock_folder(folder):
    """An exclusive lock on the packed set being written, held until released (or the process
    dies); a second conversion gets a one-line JobError naming the holder."""
    return RunLock(folder, what="conversion").acquire()


def packed_is_current(final, source_root, prefix, names, shape):
    """True if `final` already holds a complete packed set of exactly these per-file latents."""
    try:
        info = read_packed_info(final)
    except ValueError:
        return False
    own = os.path.join(source_root, prefix + FEATURES_SUFFIX)
    return (os.path.realpath(str(info.get("source"))) == os.path.realpath(own)
            and tuple(info["latent_shape"]) == tuple(shape)
            and read_packed_names(final) == list(names))


def _remove_all_but(work, keep):
    """Delete every file and folder in `work` not named in `keep`."""
    for entry in os.scandir(work):
        if entry.name not in keep:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)


def _keep_only_packed_files(work):
    """Remove whatever a packed set must not publish: stale temps of killed writes, leftovers."""
    _remove_all_but(work, {PACKED_LATENTS, PACKED_LABELS, PACKED_NAMES, PACKED_INFO, LOCK_NAME})


def _fingerprint(source_root, prefix, names, shape):
    """What an unfinished conversion was converting, so a resume never mixes two sources."""
    digest = hashlib.sha256()
    digest.update(json.dumps([source_root, prefix, list(shape), len(names)]).encode())
    for name in names:
        digest.update(name.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _existing_set_is_current(final, source, overwrite, log):
    """True (and says so) if `final` already holds these very latents; a PackedSetExistsError if it
    holds another set and `overwrite` is off; False if there is nothing there or it may go."""
    if os.path.exists(final) and packed_is_current(final, source.root, source.prefix, source.names,
                                                   source.latent_shape):
        log(f"nothing to do: {final} already holds these {len(source)} latents")
        return True
    if os.path.exists(final) and not overwrite:
        raise PackedSetExistsError(final, f"{final} already holds a packed set: refusing to "
                                          f"overwrite it; delete it, pass overwrite (--overwrite) "
                                          f"or choose another output folder")
    return False


def _rows_done(progress_path, fingerprint, count, work, log):
    """Rows an interrupted conversion of the same latents already saved (0 for a fresh start)."""
    done = 0
    if os.path.exists(progress_path):
        try:
            with open(progress_path) as f:
                saved = json.load(f)
            if saved.get("fingerprint") == fingerprint:
                done = int(saved["rows_done"])
        except (OSError, ValueError, KeyError, TypeError):
            done = 0
        if done:
            log(f"resuming an interrupted conversion at row {done} of {count}")
        else:
            log(f"discarding an interrupted conversion of other latents in {work}")
    return done


def _open_packed_arrays(work, done, count, shape):
    """(latents, labels) memory maps in `work`: the saved ones when resuming, else new ones in
    an emptied folder (nothing from before is kept but the lock)."""
    latents_path = os.path.join(work, PACKED_LATENTS)
    labels_path = os.path.join(work, PACKED_LABELS)
    if done:
        return np.load(latents_path, mmap_mode="r+"), np.load(labels_path, mmap_mode="r+")
    _remove_all_but(work, {LOCK_NAME})
    latents = np.lib.format.open_memmap(latents_path, mode="w+", dtype=np.float32,
                                        shape=(count, *shape))
    labels = np.lib.format.open_memmap(labels_path, mode="w+", dtype=np.int64, shape=(count,))
    try:   # the whole set's blocks now: a full disk is one line here, never a SIGBUS mid-copy
        reserve_space(latents_path, work)
        reserve_space(labels_path, work)
    except NoSpaceError:
        _remove_all_but(work, {LOCK_NAME})
        raise
    return latents, labels


def _finite_pair(source, name):
    """One per-file (latent, label); a non-finite latent stops the conversion naming its file."""
    latent = source._read_latent(name)
    if not np.isfinite(latent).all():
        raise JobError(f"latent file {os.path.join(source.features_dir, name)} holds "
                       f"non-finite values (NaN or inf): re-extract it or delete it "
                       f"(and its label file), then convert again")
    return latent, source._read_label(name)


def _copy_rows(source, latents, labels, done, progress_path, fingerprint, workers, chunk_size,
               progress):
    """Copy the per-file latents from row `done` on into the memory maps, `workers` reader
    threads, flushing and saving the row count every `chunk_size` rows so a kill can resume."""
    from tqdm import tqdm
    names, count = source.names, len(source)
    bar = tqdm(total=count, initial=done, unit="latent", desc=f"packing {source.prefix}",
               disable=not progress, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for start in range(done, count, chunk_size):
            stop = min(start + chunk_size, count)
            pairs = pool.map(lambda name: _finite_pair(source, name), names[start:stop])
            for row, (latent, label) in enumerate(pairs, start):
                latents[row] = latent
                labels[row] = label
                bar.update(1)
            latents.flush()
            labels.flush()
            atomic_write_text(progress_path, json.dumps(
                {"fingerprint": fingerprint, "rows_done": stop, "count": count}), overwrite=True)
    bar.close()


def _fill_packed_arrays(work, source, done, progress_path, fingerprint, workers, chunk_size,
                        progress):
    """Write latents.npy and labels.npy in `work` (resuming at row `done`); returns the labels.
    The memory maps are closed when this returns."""
    latents, labels = _open_packed_arrays(work, done, len(source), source.latent_shape)
    _copy_rows(source, latents, labels, done, progress_path, fingerprint, workers, chunk_size,
               progress)
    return np.array(labels)


def _finish_packed_set(work, source, all_labels, progress_path):
    """names.txt and info.json beside the arrays (the arrays synced first), the progress file
    and any stray file removed, and the result checked as a reader will check it."""
    prefix, names = source.prefix, source.names
    atomic_write_text(os.path.join(work, PACKED_NAMES), "".join(n + "\n" for n in names),
                      overwrite=True)
    info = {"format": PACKED_FORMAT, "version": PACKED_VERSION, "count": len(source),
            "latent_shape": list(source.latent_shape), "latent_dtype": "float32",
            "label_dtype": "int64", "num_classes_seen": int(all_labels.max()) + 1,
            "prefix": prefix, "source": os.path.join(source.root, prefix + FEATURES_SUFFIX),
            "files": {"latents": PACKED_LATENTS, "labels": PACKED_LABELS,
                      "names": PACKED_NAMES}}
    for name in (PACKED_LATENTS, PACKED_LABELS):
        fsync_path(os.path.join(work, name))
    atomic_write_text(os.path.join(work, PACKED_INFO), json.dumps(info, indent=1) + "\n",
                      overwrite=True)
    os.remove(progress_path)
    _keep_only_packed_files(work)            # never publish a temp file
    read_packed_info(work)                   # what we are about to publish reads back


def _publish(work, final, out_root, prefix, overwrite):
    """Rename the finished `work` folder to `final` (replacing an old set only with
    `overwrite`), drop its lock file and sync the parent folder."""
    if os.path.exists(final):
        if not overwrite:
            raise PackedSetExistsError(final, f"{final} appeared while converting: refusing "
                                              f"to overwrite it; delete it, pass overwrite "
                                              f"(--overwrite) or choose another output folder")
        old = os.path.join(out_root, f"{TMP_PREFIX}old-{prefix}{PACKED_SUFFIX}.{os.getpid()}")
        os.rename(final, old)
        os.rename(work, final)
        shutil.rmtree(old)
    else:
        os.rename(work, final)
    os.remove(os.path.join(final, LOCK_NAME))
    fsync_path(out_root)


def pack_latents(feature_path, prefix=None, out_root=None, overwrite=False, workers=4,
                 chunk_size=4096, progress=True, log=print):
    """Convert a per-file latent set into the packed layout; returns the packed folder.

    Reads `<feature_path>/<prefix>_features/*.npy` + `_labels/*.npy` in the dataset's order
    (flipped copies are rows like any other) and writes `<out_root>/<prefix>_packed/` (default
    out_root: feature_path). The set is built in `<out_root>/.partial-<prefix>_packed/` and
    renamed into place only when complete; an interrupted conversion of the same source
    resumes there from its last saved row (saved every `chunk_size` rows). A packed set of exactly
    these latents is left as it is ("nothing to do"); another raises PackedSetExistsError unless
    `overwrite`. The set being written is locked (helpers.utils.locks.RunLock), stale temp files of
    killed writes in it are removed, and only the four packed files are ever published. Bad input (missing folders, unpaired
    files, different latent shapes, unreadable files) raises a one-line ValueError.
    """
    source = LatentFeatureDataset(feature_path, prefix=prefix, layout="files")
    prefix = source.prefix
    out_root = os.path.abspath(os.fspath(out_root if out_root is not None else source.root))
    final = packed_dir(out_root, prefix)
    if _existing_set_is_current(final, source, overwrite, log):
        return final
    os.makedirs(out_root, exist_ok=True)
    work = os.path.join(out_root, TMP_PREFIX + prefix + PACKED_SUFFIX)
    os.makedirs(work, exist_ok=True)
    lock = _lock_folder(work)
    try:
        removed = remove_stale_temps(work)
        if removed:
            log(f"removed {removed} temp files of an interrupted conversion")
        fingerprint = _fingerprint(source.root, prefix, source.names, source.latent_shape)
        progress_path = os.path.join(work, PACKED_PROGRESS)
        done = _rows_done(progress_path, fingerprint, len(source), work, log)
        all_labels = _fill_packed_arrays(work, source, done, progress_path, fingerprint, workers,
                                         chunk_size, progress)
        _finish_packed_set(work, source, all_labels, progress_path)
        _publish(work, final, out_root, prefix, overwrite)
    except NoSpaceError:   # nothing was written: leave no empty work folder behind
        lock.release()
        if not os.listdir(work):
            os.rmdir(work)
        raise
    finally:
        lock.release()
    return final
