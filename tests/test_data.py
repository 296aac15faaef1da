"""Tests of helpers/data/images.py (crop, class folders, built-in datasets) and helpers/data/latents.py."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import make_image_folder
from helpers.data.images import (BUILTIN_DATASETS, CorruptImageWarning, ImageFolderDataset,
                            builtin_dataset, center_crop_arr, collate_skip_none, split_indices)
from helpers.data.latents import LatentFeatureDataset, layout_dirs
from helpers.data.per_file_writer import pair_is_complete, remove_partial_files, write_latent


#################################################################################
#                                 Center crop                                   #
#################################################################################

def test_center_crop_takes_the_middle_columns_without_resizing():
    # 6 wide x 4 high, target 4: short side already 4, so no resize; columns 1..4 are kept.
    arr = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    out = center_crop_arr(Image.fromarray(arr), 4)
    assert out.size == (4, 4)
    np.testing.assert_array_equal(np.array(out), arr[:, 1:5])


def test_center_crop_box_halves_then_crops():
    # 16 wide x 8 high, target 4: short side 8 >= 2*4, so one 2x2 box average to 8x4, then the
    # middle 4 columns (2..5). Each 2x2 block holds {v, v, v+4, v+4}: its average v+2 is exact.
    rng = np.random.default_rng(0)
    base = rng.integers(0, 60, size=(4, 8)).astype(np.uint8) * 4          # block values v
    arr = np.repeat(np.repeat(base, 2, axis=0), 2, axis=1)                 # (8, 16)
    arr[1::2] += 4                                                         # odd rows: v+4
    out = np.array(center_crop_arr(Image.fromarray(arr), 4))
    np.testing.assert_array_equal(out, (base + 2)[:, 2:6])


def test_center_crop_upscales_small_images():
    img = Image.fromarray(np.full((3, 5, 3), 200, dtype=np.uint8))
    out = np.array(center_crop_arr(img, 6))
    assert out.shape == (6, 6, 3)
    assert np.all(out == 200)  # bicubic keeps a constant image constant


#################################################################################
#                                Class folders                                  #
#################################################################################

def test_image_folder_labels_values_and_range(tmp_path):
    root = tmp_path / "data"
    for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        folder = root / f"class_{'ba'[c]}"   # sorted: class_a (label 0) holds blue
        folder.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10, 8), colour).save(folder / f"{i}.PNG")
    (root / "class_a" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root, 4, random_flip=False)
    assert ds.classes == ["class_a", "class_b"]
    assert len(ds) == 4 and ds.targets == [0, 0, 1, 1]
    image, label = ds[0]
    assert image.shape == (3, 4, 4) and image.dtype == torch.float32 and label == 0
    np.testing.assert_allclose(image[:, 0, 0].numpy(), [-1.0, -1.0, 1.0])   # blue
    image, label = ds[3]
    np.testing.assert_allclose(image[:, 2, 3].numpy(), [1.0, -1.0, -1.0])   # red
    assert label == 1


def test_image_folder_flip_and_greyscale(tmp_path):
    root = tmp_path / "data" / "c0"
    root.mkdir(parents=True)
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[:, 0] = 255                                   # left column white
    Image.fromarray(arr).save(root / "a.png")
    ds = ImageFolderDataset(tmp_path / "data", 4, random_flip=False, channels=1)
    plain = ds.load(0)
    flipped = ds.load(0, flip=True)
    assert plain.shape == (1, 4, 4)
    assert torch.all(plain[0, :, 0] == 1) and torch.all(plain[0, :, 1:] == -1)
    assert torch.equal(flipped, torch.flip(plain, dims=[-1]))
    flips = ImageFolderDataset(tmp_path / "data", 4, random_flip=True)
    torch.manual_seed(0)
    seen = {bool(flips[0][0][0, 0, 0] > 0) for _ in range(20)}
    assert seen == {True, False}                     # both orientations occur


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = make_image_folder(tmp_path / "data", num_classes=2, per_class=2, size=(8, 8))
    (tmp_path / "data" / "n00000001" / "zz_garbage.png").write_bytes(b"not an image at all")
    good = tmp_path / "data" / "n00000000" / "img_0_0.png"
    data = good.read_bytes()
    (tmp_path / "data" / "n00000000" / "zz_truncated.png").write_bytes(data[:len(data) // 2])
    ds = ImageFolderDataset(root, 8, random_flip=False)
    assert len(ds) == 6
    with pytest.warns(CorruptImageWarning, match="skipping corrupt image"):
        items = [ds[i] for i in range(len(ds))]
    bad = [i for i, item in enumerate(items) if item is None]
    assert [os.path.basename(ds.samples[i][0]) for i in bad] == ["zz_truncated.png", "zz_garbage.png"]
    assert ds.num_skipped == 2 and ds.skipped == set(bad)
    with pytest.warns(CorruptImageWarning):
        batches = list(DataLoader(ds, batch_size=3, collate_fn=collate_skip_none))
    assert [len(b[1]) for b in batches] == [2, 2]
    assert collate_skip_none([None, None]) is None


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        ImageFolderDataset(tmp_path / "nope", 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty", 8)
    (tmp_path / "empty" / "c0").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(tmp_path / "empty", 8)


#################################################################################
#                              Built-in datasets                                #
#################################################################################

def test_digits_sizes_split_and_range():
    assert BUILTIN_DATASETS["digits"] == (1, 8, 10)
    train, test = builtin_dataset("digits", "train"), builtin_dataset("digits", "test")
    assert len(train) + len(test) == 1797
    assert len(test) == 359                           # sum over classes of round(0.2 * n)
    image, label = train[0]
    assert image.shape == (1, 16, 16) and isinstance(label, int)
    for ds in (train, test):
        assert ds.num_classes == 10
        assert sorted(set(ds.labels.tolist())) == list(range(10))
        assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
        assert ds.images.min() == -1.0 and ds.images.max() > 0.9
    native = builtin_dataset("digits", "test", image_size=8)
    assert native[0][0].shape == (1, 8, 8)
    levels = torch.unique(native.images * 8 + 8)      # 0..16 grey levels come back exactly
    assert torch.allclose(levels, levels.round()) and levels.max() == 16


def test_digits_split_is_disjoint_and_deterministic():
    from sklearn.datasets import load_digits
    labels = load_digits().target
    train, test = split_indices(labels)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == len(labels)
    again_train, again_test = split_indices(labels)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    counts = np.bincount(labels[test], minlength=10)
    np.testing.assert_array_equal(counts, np.round(0.2 * np.bincount(labels)).astype(int))
    # the images of the two splits really differ (no test image leaks into training)
    tr, te = builtin_dataset("digits", "train", 8), builtin_dataset("digits", "test", 8)
    a, b = tr.images.flatten(1), te.images.flatten(1)
    assert torch.cdist(b, a).min(dim=1).values.gt(0).float().mean() > 0.95  # few exact duplicates
    assert torch.equal(te.images, builtin_dataset("digits", "test", 8).images)


def test_builtin_errors():
    with pytest.raises(ValueError, match="unknown built-in dataset 'mnist': choose one of digits"):
        builtin_dataset("mnist")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        builtin_dataset("digits", "val")


#################################################################################
#                                   Latents                                     #
#################################################################################

def _official_pair(root, name, latent, label, prefix="imagenet256"):
    features_dir, labels_dir = layout_dirs(root, prefix)
    os.makedirs(features_dir, exist_ok=True)
    os.makedirs(labels_dir, exist_ok=True)
    np.save(os.path.join(features_dir, name), latent)
    np.save(os.path.join(labels_dir, name), label)


def test_latent_dataset_reads_official_rank_naming(tmp_path):
    rng = np.random.default_rng(0)
    latents = {f"{i}_{r}.npy": rng.standard_normal((1, 4, 2, 2)).astype(np.float32)
               for i, r in [(0, 0), (0, 1), (1, 0), (10, 0), (2, 1)]}
    for k, (name, latent) in enumerate(latents.items()):
        _official_pair(tmp_path, name, latent, np.array([k * 2], dtype=np.int64))
    ds = LatentFeatureDataset(tmp_path)
    assert len(ds) == 5 and ds.latent_shape == (4, 2, 2) and ds.prefix == "imagenet256"
    assert ds.names == ["0_0.npy", "0_1.npy", "1_0.npy", "2_1.npy", "10_0.npy"]
    latent, label = ds[4]
    assert latent.shape == (4, 2, 2) and latent.dtype == torch.float32
    assert label.dtype == torch.int64 and label.shape == () and label.item() == 6   # 10_0 was 4th
    np.testing.assert_array_equal(latent.numpy(), latents["10_0.npy"][0])
    assert ds.num_classes_seen == 9
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch[0].shape == (5, 4, 2, 2) and batch[1].tolist() == [0, 2, 4, 8, 6]
    # pointing at the features folder itself works too
    assert len(LatentFeatureDataset(tmp_path / "imagenet256_features")) == 5


def test_latent_dataset_plain_naming_and_unbatched_files(tmp_path):
    for i in range(3):
        _official_pair(tmp_path, f"{i}.npy", np.full((4, 3, 3), i, np.float32),
                       np.array(i + 1, dtype=np.int64), prefix="imagenet32")
    ds = LatentFeatureDataset(tmp_path)
    assert ds.latent_shape == (4, 3, 3) and len(ds) == 3
    latent, label = ds[2]
    assert torch.all(latent == 2) and label.item() == 3 and ds.num_classes_seen == 4


def test_write_latent_round_trip_and_completeness(tmp_path):
    latent = torch.randn(1, 4, 2, 2)
    path = write_latent(tmp_path, "7", latent, 3, prefix="imagenet16")
    write_latent(tmp_path, "7_flip", latent[0].flip(-1), 3, prefix="imagenet16")
    assert path == os.path.join(tmp_path, "imagenet16_features", "7.npy")
    saved = np.load(path)
    assert saved.shape == (1, 4, 2, 2) and saved.dtype == np.float32
    label = np.load(os.path.join(tmp_path, "imagenet16_labels", "7.npy"))
    assert label.shape == (1,) and label.dtype == np.int64 and label[0] == 3
    assert pair_is_complete(tmp_path, "7", (4, 2, 2), prefix="imagenet16")
    assert not pair_is_complete(tmp_path, "8", (4, 2, 2), prefix="imagenet16")
    leftover = os.path.join(tmp_path, "imagenet16_features", ".partial-9.npy.123.abcd")
    open(leftover, "wb").close()
    ds = LatentFeatureDataset(tmp_path)              # temp files are never read
    assert ds.names == ["7.npy", "7_flip.npy"]
    torch.testing.assert_close(ds[1][0], latent[0].flip(-1))
    with open(path, "r+b") as f:       # a truncated file counts as missing and reads clearly
        f.truncate(os.path.getsize(path) - 4)
    assert not pair_is_complete(tmp_path, "7", (4, 2, 2), prefix="imagenet16")
    with pytest.raises(ValueError, match="7.npy cannot be read .*re-run the extraction"):
        ds[0]
    assert remove_partial_files(tmp_path, "imagenet16") == 1 and not os.path.exists(leftover)
    with pytest.raises(ValueError, match="shape"):
        write_latent(tmp_path, "x", torch.zeros(2, 4, 2, 2), 0)


def test_latent_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        LatentFeatureDataset(tmp_path / "nope")
    with pytest.raises(ValueError, match="holds no <prefix>_features folder"):
        LatentFeatureDataset(tmp_path)
    (tmp_path / "imagenet256_features").mkdir()
    with pytest.raises(ValueError, match=r"imagenet256_labels is missing"):
        LatentFeatureDataset(tmp_path)
    (tmp_path / "imagenet256_labels").mkdir()
    with pytest.raises(ValueError, match=r"imagenet256_features holds no \.npy files"):
        LatentFeatureDataset(tmp_path)
    for name in ("0_0.npy", "1_0.npy", "2_0.npy"):
        _official_pair(tmp_path, name, np.zeros((1, 4, 2, 2), np.float32), np.zeros(1, np.int64))
    os.remove(tmp_path / "imagenet256_labels" / "1_0.npy")
    np.save(tmp_path / "imagenet256_labels" / "5_0.npy", np.zeros(1, np.int64))
    np.save(tmp_path / "imagenet256_labels" / "6_0.npy", np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=r"3 feature files but 4 label files; 1 feature files have "
                                         r"no label file \(e\.g\. 1_0\.npy\) and 2 label files have "
                                         r"no feature file \(e\.g\. 5_0\.npy\)"):
        LatentFeatureDataset(tmp_path)
    (tmp_path / "imagenet512_features").mkdir()
    with pytest.raises(ValueError, match="several latent sets .*imagenet256_features, "
                                         "imagenet512_features"):
        LatentFeatureDataset(tmp_path)
