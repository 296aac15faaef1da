"""The packed latent layout: convert_features.py, extract_features.py --packed and reading packed
sets through LatentFeatureDataset (bit-exact round trips, order, atomicity, resume, errors)."""
import fcntl
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import make_image_folder, subprocess_env
import convert_features
import extract_features
from helpers.data.latents import LatentFeatureDataset, layout_dirs
from helpers.data.packing import pack_latents

PREFIX = "imagenet256"
SHAPE = (4, 2, 3)
# official rank naming, our flips, plain names; natural order puts 10_0 after 9_1
NAMES = ["0_0", "0_1", "1_0", "1_0_flip", "2_1", "9_1", "10_0", "10_0_flip", "7"]
ORDER = ["0_0", "0_1", "1_0", "1_0_flip", "2_1", "7", "9_1", "10_0", "10_0_flip"]


def _official_set(root, names=NAMES, shape=SHAPE, prefix=PREFIX, seed=0):
    """Per-file latents with arbitrary float32 bit patterns (NaN payloads, -0, infs,
    subnormals), half stored as (1, C, H, W) with (1,) labels, half as (C, H, W) with scalars."""
    rng = np.random.default_rng(seed)
    features_dir, labels_dir = layout_dirs(root, prefix)
    os.makedirs(features_dir, exist_ok=True)
    os.makedirs(labels_dir, exist_ok=True)
    data = {}
    for k, name in enumerate(names):
        bits = rng.integers(0, 2 ** 32, size=shape, dtype=np.uint64).astype(np.uint32)
        latent = bits.view(np.float32)
        label = np.int64(rng.integers(0, 1000))
        batched = k % 2 == 0
        np.save(os.path.join(features_dir, name + ".npy"), latent[None] if batched else latent)
        np.save(os.path.join(labels_dir, name + ".npy"),
                np.array([label]) if batched else np.array(label))
        data[name] = (latent, int(label))
    return data


def _convert(*argv):
    """convert_features.main in this process; returns the exit code (0 when it returns)."""
    try:
        return convert_features.run_main(convert_features.main, convert_features.build_parser()
                                         .parse_args(["--quiet", *map(str, argv)]))
    except SystemExit as e:
        return e.code
    return 0


def _error(capsys, *argv):
    assert _convert(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _read_bytes(folder, *names):
    return [open(os.path.join(folder, n), "rb").read() for n in names]


PACKED_FILES = ("latents.npy", "labels.npy", "names.txt")


def test_round_trip_is_bit_exact_in_dataset_order(tmp_path, capsys):
    data = _official_set(tmp_path)
    assert _convert("--feature-path", tmp_path) == 0
    packed = tmp_path / f"{PREFIX}_packed"
    assert capsys.readouterr().out.strip() == (f"done: 9 latents {SHAPE} with labels < "
                                               f"{max(l for _, l in data.values()) + 1} packed into "
                                               f"{packed}")
    assert sorted(os.listdir(packed)) == ["info.json", "labels.npy", "latents.npy", "names.txt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]      # no temp debris

    latents = np.load(packed / "latents.npy", mmap_mode="r")
    labels = np.load(packed / "labels.npy")
    assert latents.shape == (9, *SHAPE) and latents.dtype == np.float32
    assert labels.shape == (9,) and labels.dtype == np.int64
    assert (packed / "names.txt").read_text().splitlines() == [n + ".npy" for n in ORDER]
    for row, name in enumerate(ORDER):
        want, label = data[name]
        np.testing.assert_array_equal(latents[row].view(np.uint32), want.view(np.uint32))
        assert labels[row] == label
    info = json.loads((packed / "info.json").read_text())
    assert info["format"] == "dic-packed-latents" and info["version"] == 1
    assert info["count"] == 9 and info["latent_shape"] == list(SHAPE)
    assert info["source"] == str(tmp_path / f"{PREFIX}_features")


def test_dataset_reads_packed_like_files(tmp_path):
    _official_set(tmp_path)
    files = LatentFeatureDataset(tmp_path)
    assert files.layout == "files"
    pack_latents(tmp_path, progress=False)
    packed = LatentFeatureDataset(tmp_path)                        # auto: the packed set wins
    assert packed.layout == "packed" and packed.prefix == PREFIX
    assert LatentFeatureDataset(tmp_path / f"{PREFIX}_packed").layout == "packed"
    assert LatentFeatureDataset(tmp_path, layout="files").layout == "files"
    assert LatentFeatureDataset(tmp_path / f"{PREFIX}_features").layout == "files"

    assert len(packed) == len(files) == 9 and packed.latent_shape == files.latent_shape == SHAPE
    assert packed.names == files.names == [n + ".npy" for n in ORDER]
    assert packed.labels.dtype == np.int64 and packed.labels.tolist() == files.labels.tolist()
    assert packed.num_classes_seen == files.num_classes_seen
    for i in range(len(files)):
        (a, y), (b, z) = files[i], packed[i]
        assert b.dtype == torch.float32 and b.shape == SHAPE and z.dtype == torch.int64
        assert z.shape == () and z.item() == y.item()
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert torch.equal(packed[-1][0].view(torch.int32), files[8][0].view(torch.int32))
    with pytest.raises(IndexError):
        packed[9]

    # items are copies: writable, and writing one never reaches the memory map
    item = packed[0][0]
    item.fill_(1.0)
    assert torch.equal(packed[0][0].view(torch.int32), files[0][0].view(torch.int32))

    # workers open the files themselves: a pickled (spawned) copy holds no memory map, and
    # forked DataLoader workers give the same batches
    packed[0]
    clone = pickle.loads(pickle.dumps(packed))
    assert clone._arrays is None and torch.equal(clone[3][0].view(torch.int32),
                                                 files[3][0].view(torch.int32))
    want = [(x.view(torch.int32), y) for x, y in DataLoader(files, batch_size=4)]
    got = [(x.view(torch.int32), y) for x, y in DataLoader(packed, batch_size=4, num_workers=2)]
    assert len(got) == len(want) == 3
    for (a, y), (b, z) in zip(want, got):
        assert torch.equal(a, b) and torch.equal(y, z)

    os.makedirs(tmp_path / "other" / f"{PREFIX}_features")
    with pytest.raises(ValueError, match="holds no <prefix>_packed folder"):
        LatentFeatureDataset(tmp_path / "other", layout="packed")
    with pytest.raises(ValueError, match="layout 'dense' is not one of auto, files, packed"):
        LatentFeatureDataset(tmp_path, layout="dense")


def test_refuses_to_overwrite_and_overwrite_replaces(tmp_path, capsys):
    _official_set(tmp_path)
    assert _convert("--feature-path", tmp_path) == 0
    packed = tmp_path / f"{PREFIX}_packed"
    before = _read_bytes(packed, *PACKED_FILES, "info.json")
    _official_set(tmp_path, names=["11_0"], seed=1)                  # the per-file set grows
    err = _error(capsys, "--feature-path", tmp_path)
    assert err == (f"error: {packed} already holds a packed set: refusing to "
                   f"overwrite it; pass --overwrite to replace it, or choose another --out")
    assert _read_bytes(packed, *PACKED_FILES, "info.json") == before   # untouched
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        pack_latents(tmp_path, progress=False)

    assert _convert("--feature-path", tmp_path, "--overwrite") == 0
    assert "done: 10 latents" in capsys.readouterr().out
    ds = LatentFeatureDataset(tmp_path)
    assert ds.layout == "packed" and len(ds) == 10 and ds.names[-1] == "11_0.npy"
    assert sorted(os.listdir(tmp_path)) == [f"{PREFIX}_features", f"{PREFIX}_labels",
                                            f"{PREFIX}_packed"]

    # --out elsewhere leaves the source folder alone
    out = tmp_path / "fast"
    assert _convert("--feature-path", tmp_path, "--out", out) == 0
    assert sorted(os.listdir(out)) == [f"{PREFIX}_packed"]
    assert _read_bytes(out / f"{PREFIX}_packed", *PACKED_FILES) == \
        _read_bytes(packed, *PACKED_FILES)


def test_bad_input_one_line_errors(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert f"feature path {missing} does not exist" in _error(capsys, "--feature-path", missing)
    (tmp_path / "empty").mkdir()
    assert "holds no <prefix>_features folder (e.g. imagenet256_features)" in _error(
        capsys, "--feature-path", tmp_path / "empty")

    root = tmp_path / "unpaired"
    _official_set(root)
    os.remove(root / f"{PREFIX}_labels" / "2_1.npy")
    assert ("9 feature files but 8 label files; 1 feature files have no label file "
            "(e.g. 2_1.npy)") in _error(capsys, "--feature-path", root)

    root = tmp_path / "shapes"
    _official_set(root)
    np.save(root / f"{PREFIX}_features" / "9_1.npy", np.zeros((1, 4, 3, 2), np.float32))
    err = _error(capsys, "--feature-path", root, "--chunk-size", 2)
    assert (f"latent file {root / f'{PREFIX}_features' / '9_1.npy'} has shape (1, 4, 3, 2), the "
            f"others {SHAPE}: mixed latent sets?") in err

    root = tmp_path / "labels"
    _official_set(root)
    np.save(root / f"{PREFIX}_labels" / "7.npy", np.array([1, 2], np.int64))
    assert "7.npy holds 2 values: expected one class index" in _error(capsys, "--feature-path", root)

    root = tmp_path / "two"
    _official_set(root)
    _official_set(root, prefix="imagenet512")
    assert "several latent sets (imagenet256_features, imagenet512_features)" in _error(
        capsys, "--feature-path", root)
    assert _convert("--feature-path", root, "--prefix", "imagenet512") == 0
    capsys.readouterr()
    assert "--workers must be at least 1, got 0" in _error(capsys, "--feature-path", root,
                                                           "--workers", 0)

    for name in ("unpaired", "shapes", "labels"):      # nothing that would be read was published
        assert not (tmp_path / name / f"{PREFIX}_packed").exists()
    # the shape error came mid-way: rows 0-5 were saved for a resume, in a hidden temp folder
    assert sorted(os.listdir(tmp_path / "shapes")) == [f".partial-{PREFIX}_packed",
                                                       f"{PREFIX}_features", f"{PREFIX}_labels"]
    assert json.loads((tmp_path / "shapes" / f".partial-{PREFIX}_packed" / "progress.json")
                      .read_text())["rows_done"] == 6
    assert LatentFeatureDataset(tmp_path / "shapes").layout == "files"


def test_cli_exit_status_and_message(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "convert_features.py", "--feature-path",
                           str(tmp_path / "x")], cwd=repo_root, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"error: feature path {tmp_path / 'x'} "
                                   f"does not exist: pass the folder holding <prefix>_features/ "
                                   f"and <prefix>_labels/ (e.g. imagenet256_features) or "
                                   f"<prefix>_packed/")


def test_interrupted_conversion_is_never_read_and_resumes(tmp_path, monkeypatch, capsys):
    data = _official_set(tmp_path)
    real_read = LatentFeatureDataset._read_latent
    read = []

    def crash_at_row_5(self, name):
        if len(read) == 5:
            raise KeyboardInterrupt("power cut")
        read.append(name)
        return real_read(self, name)

    monkeypatch.setattr(LatentFeatureDataset, "_read_latent", crash_at_row_5)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pack_latents(tmp_path, out_root=out, chunk_size=2, workers=1, progress=False)
    partial = out / f".partial-{PREFIX}_packed"
    assert os.listdir(out) == [partial.name]
    assert sorted(os.listdir(partial)) == ["labels.npy", "latents.npy", "progress.json"]
    assert json.loads((partial / "progress.json").read_text())["rows_done"] == 4

    # only temp files: not a latent set, with a hint; beside per-file latents, the files are read
    with pytest.raises(ValueError, match=r"holds no <prefix>_features folder .* nor <prefix>_packed "
                                         r"folder \(\.partial-imagenet256_packed is an unfinished "
                                         r"packing: run convert_features.py again"):
        LatentFeatureDataset(out)
    os.rename(partial, tmp_path / partial.name)
    assert LatentFeatureDataset(tmp_path).layout == "files"
    os.rename(tmp_path / partial.name, partial)

    # the same command resumes at the last saved row and reads only what is left
    monkeypatch.setattr(LatentFeatureDataset, "_read_latent",
                        lambda self, name: (read.append(name), real_read(self, name))[1])
    read.clear()
    assert _convert("--feature-path", tmp_path, "--out", out, "--chunk-size", 2,
                    "--workers", 1) == 0
    assert "resuming an interrupted conversion at row 4 of 9" in capsys.readouterr().out
    assert read == [n + ".npy" for n in ORDER[4:]]
    assert os.listdir(out) == [f"{PREFIX}_packed"]
    ds = LatentFeatureDataset(out)
    assert ds.layout == "packed"
    for i, name in enumerate(ORDER):
        assert np.array_equal(ds[i][0].numpy().view(np.uint32), data[name][0].view(np.uint32))
        assert ds[i][1].item() == data[name][1]

    # a fresh conversion of other latents discards a stale temp folder instead of resuming it
    os.makedirs(tmp_path / "o2" / partial.name)
    (tmp_path / "o2" / partial.name / "progress.json").write_text('{"fingerprint": "x", '
                                                                   '"rows_done": 4}')
    pack_latents(tmp_path, out_root=tmp_path / "o2", progress=False, log=print)
    assert "discarding an interrupted conversion" in capsys.readouterr().out
    assert _read_bytes(tmp_path / "o2" / f"{PREFIX}_packed", *PACKED_FILES) == \
        _read_bytes(out / f"{PREFIX}_packed", *PACKED_FILES)


def test_damaged_packed_sets_and_concurrent_conversion(tmp_path):
    _official_set(tmp_path)
    final = pack_latents(tmp_path, progress=False)
    # a second conversion while one holds the lock is refused
    work = tmp_path / "o" / f".partial-{PREFIX}_packed"
    os.makedirs(work)
    with open(work / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="being written by another conversion job"):
            pack_latents(tmp_path, out_root=tmp_path / "o", progress=False)

    latents = os.path.join(final, "latents.npy")
    with open(latents, "r+b") as f:
        f.truncate(os.path.getsize(latents) - 4)
    with pytest.raises(ValueError, match=r"latents\.npy has \d+ bytes, expected \d+: it is truncated"):
        LatentFeatureDataset(tmp_path)
    os.remove(latents)
    with pytest.raises(ValueError, match="lacks latents.npy"):
        LatentFeatureDataset(tmp_path)
    os.remove(os.path.join(final, "info.json"))
    with pytest.raises(ValueError, match="has no info.json: it was not written"):
        LatentFeatureDataset(tmp_path)


#################################################################################
#                          extract_features.py --packed                         #
#################################################################################

def _extract(**kwargs):
    args = extract_features.build_parser().parse_args(
        [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items() if v is not True] +
        [f"--{k.replace('_', '-')}" for k, v in kwargs.items() if v is True])
    code = extract_features.run_main(extract_features.main, args)
    if code:
        raise SystemExit(code)


def test_extract_features_packed_equals_conversion(tmp_path, tiny_vae_dir, capsys):
    images = make_image_folder(tmp_path / "images", num_classes=2, per_class=3, size=(36, 36))
    out = tmp_path / "features"
    common = dict(data_path=images, features_path=out, image_size=32, vae=tiny_vae_dir,
                  batch_size=4, num_workers=0, flip=True)
    _extract(max_images=2, packed=True, **common)                    # a quick try, packed
    assert "packed into" in capsys.readouterr().out
    assert len(LatentFeatureDataset(out)) == 4

    # finishing the extraction without --packed would leave the packed copy stale: refused
    with pytest.raises(SystemExit) as e:
        _extract(**common)
    assert e.value.code == 2
    assert "is stale: re-pack it with --packed" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                  # ... and so is a rerun
        _extract(**common)
    assert "no longer matches the per-file latents" in capsys.readouterr().err

    _extract(packed=True, **common)                                  # re-packs, saying so
    assert "re-packing: the per-file latents changed" in capsys.readouterr().out
    packed = out / "imagenet32_packed"
    ds = LatentFeatureDataset(out)
    assert ds.layout == "packed" and len(ds) == 12 and ds.latent_shape == (4, 16, 16)
    assert ds.names[:3] == ["0.npy", "0_flip.npy", "1.npy"]

    # the same bytes as converting the per-file output
    assert _convert("--feature-path", out, "--out", tmp_path / "converted") == 0
    assert _read_bytes(packed, *PACKED_FILES) == \
        _read_bytes(tmp_path / "converted" / "imagenet32_packed", *PACKED_FILES)
    files = LatentFeatureDataset(out, layout="files")
    for i in range(len(files)):
        assert torch.equal(files[i][0], ds[i][0]) and files[i][1] == ds[i][1]

    capsys.readouterr()
    _extract(packed=True, **common)                                  # nothing to do
    assert f"packed set {packed} is up to date" in capsys.readouterr().out

    # a packed set made from another folder is never replaced; nothing is written
    other = tmp_path / "other"
    os.makedirs(other)
    os.rename(tmp_path / "converted" / "imagenet32_packed", other / "imagenet32_packed")
    with pytest.raises(SystemExit):
        _extract(**{**common, "features_path": other, "packed": True})
    assert "is a packed set made from" in capsys.readouterr().err
    assert sorted(os.listdir(other)) == ["imagenet32_packed"]


def test_a_full_disk_is_one_line_before_any_row_is_copied(tmp_path, monkeypatch):
    """The packed files' blocks are reserved up front (posix_fallocate): a disk too small for the set
    gives the one no-space line, with nothing left behind, instead of a SIGBUS from the memory map."""
    import errno
    from helpers.utils import files
    root = str(tmp_path)
    _official_set(root)
    calls = []

    def full(fd, offset, length):
        calls.append(length)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.os, "posix_fallocate", full)
    with pytest.raises(files.NoSpaceError) as info:
        pack_latents(root, progress=False, log=lambda *a: None)
    message = str(info.value)
    work = os.path.join(str(root), ".partial-" + PREFIX + "_packed")
    assert message.startswith(f"no space left on {work} while writing {os.path.join(work, 'latents.npy')}")
    assert "(needed about " in message and " MB free)" in message and info.value.code == 1
    assert calls and calls[0] > 0
    assert not any(name.startswith(".partial") for name in os.listdir(root)) and not os.path.exists(work)
