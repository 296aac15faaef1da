"""Latent loading: random-order batch reads of the official per-file .npy layout vs one packed,
memory-mapped array (plain numpy and the repo's own LatentFeatureDataset on both layouts), all
written to a temp folder (warm page cache). Part of bench/bench.py (which puts the repository root
and this folder on sys.path).
"""
import os
import tempfile
import time

import numpy as np
import torch


def write_per_file_set(root, latents, labels):
    """The latents in the official layout (`<index>_0.npy`, as the official release names them);
    returns (file names, seconds taken, bytes per feature file)."""
    feat_dir = os.path.join(root, "imagenet256_features")
    label_dir = os.path.join(root, "imagenet256_labels")
    os.makedirs(feat_dir)
    os.makedirs(label_dir)
    t0 = time.perf_counter()
    names = [f"{i}_0.npy" for i in range(len(latents))]   # the official release's <index>_<rank>.npy
    for i, file_name in enumerate(names):
        np.save(os.path.join(feat_dir, file_name), latents[i])   # (1, 4, L, L) float32
        np.save(os.path.join(label_dir, file_name), labels[i])   # (1,) int64
    write_files_s = time.perf_counter() - t0
    bytes_per_file = os.path.getsize(os.path.join(feat_dir, names[0]))   # header + 4*L*L float32
    return names, write_files_s, bytes_per_file


def write_plain_packed(root, latents, labels):
    """The same latents as two plain-numpy arrays (latents.npy, labels.npy); returns seconds."""
    num, L = len(latents), latents.shape[-1]
    # Packed: plain numpy (the repo's own packed format is timed below, via helpers.data.latents)
    t0 = time.perf_counter()
    np.save(os.path.join(root, "latents.npy"), latents.reshape(num, 4, L, L))
    np.save(os.path.join(root, "labels.npy"), labels.reshape(num))
    return time.perf_counter() - t0


def plain_readers(root, names):
    """label -> read(indices): what DiT/DiC's feature dataset does per item, and fancy-indexed
    batches of the plain-numpy packed arrays."""
    feat_paths = [os.path.join(root, "imagenet256_features", f) for f in names]
    label_paths = [os.path.join(root, "imagenet256_labels", f) for f in names]

    def per_file(idx):  # what DiT/DiC's feature dataset does per item
        x = np.concatenate([np.load(feat_paths[i]) for i in idx])
        y = np.concatenate([np.load(label_paths[i]) for i in idx])
        return torch.from_numpy(x), torch.from_numpy(y)

    packed_x = np.load(os.path.join(root, "latents.npy"), mmap_mode="r")
    packed_y = np.load(os.path.join(root, "labels.npy"), mmap_mode="r")

    def packed(idx):
        return torch.from_numpy(packed_x[idx]), torch.from_numpy(packed_y[idx])

    return {"per-file .npy (official layout), np.load per item": per_file,
            "packed .npy (plain numpy), np.load(mmap_mode='r'), fancy-indexed batch": packed}


def repo_readers(root):
    """The repo's own readers: helpers.data.latents.LatentFeatureDataset on both layouts, items
    collated into a batch as a DataLoader does (layout written by helpers.data.packing.pack_latents).
    Returns (label -> read(indices), seconds pack_latents took)."""
    from torch.utils.data import default_collate

    from helpers.data.latents import LatentFeatureDataset
    from helpers.data.packing import pack_latents
    files_ds = LatentFeatureDataset(root, layout="files")
    files_ds.labels  # noqa: B018  (read the label files once, as training would)
    t0 = time.perf_counter()
    pack_latents(root, progress=False, log=lambda *a, **k: None)
    write_repo_packed_s = time.perf_counter() - t0
    packed_ds = LatentFeatureDataset(root, layout="packed")

    def collate_from(dataset):
        return lambda idx: default_collate([dataset[int(i)] for i in idx])
    readers = {
        "per-file via helpers.data.latents.LatentFeatureDataset (layout=files), per item + collate":
            collate_from(files_ds),
        "packed via helpers.data.latents.LatentFeatureDataset (layout=packed), per item + collate":
            collate_from(packed_ds)}
    return readers, write_repo_packed_s


def time_readers(readers, rng, num, batch, L):
    """samples/s of each reader over one random-order pass in batches (after one warm-up batch)."""
    results = {}
    for label, read in readers.items():
        order = rng.permutation(num)
        read(order[:batch])  # warm-up
        t0 = time.perf_counter()
        for start in range(0, num, batch):
            xb, yb = read(order[start:start + batch])
            assert xb.shape[-3:] == (4, L, L) and len(xb) == len(yb)
        seconds = time.perf_counter() - t0
        results[label] = dict(samples_per_s=num / seconds, seconds=seconds)
        print(f"  data  {label}: {num / seconds:,.0f} samples/s", flush=True)
    return results


def bench_data(args):
    """samples/s of random-order batch reads: official per-file .npy vs a packed memory-mapped .npy."""
    num, batch, L = args.data_samples, args.data_batch, args.latent_size
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="dic_bench_latents_") as root:
        latents = rng.standard_normal((num, 1, 4, L, L), dtype=np.float32)
        labels = rng.integers(0, 1000, size=(num, 1), dtype=np.int64)
        names, write_files_s, bytes_per_file = write_per_file_set(root, latents, labels)
        write_packed_s = write_plain_packed(root, latents, labels)
        del latents
        readers = plain_readers(root, names)
        own, write_repo_packed_s = repo_readers(root)
        results = time_readers({**readers, **own}, rng, num, batch, L)
    return dict(samples=num, batch=batch, write_per_file_s=write_files_s, write_packed_s=write_packed_s,
                pack_latents_s=write_repo_packed_s,
                bytes_per_file=bytes_per_file, readers=results,
                note="warm page cache (files just written), one reader thread; cold disk reads of "
                     "many small files are slower")
