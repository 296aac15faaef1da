"""Image datasets: ADM's center crop, ImageNet-style class folders, and small built-in datasets.

Every dataset here yields `(image, label)` with `image` a float tensor (C, H, W) in [-1, 1]
(DiT's `ToTensor` + `Normalize(0.5, 0.5)`), so pixel-space and VAE pipelines see the same range.
"""
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from helpers.utils.cli import JobError

# Same suffixes as torchvision's ImageFolder (compared case-insensitively: ImageNet uses .JPEG).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# name -> (channels, native side in pixels, number of classes)
BUILTIN_DATASETS = {
    "digits": (1, 8, 10),  # scikit-learn's load_digits(): 1,797 8x8 images, 16 grey levels
}


class CorruptImageWarning(UserWarning):
    """An image file that PIL cannot read; it is skipped, never fatal."""


#################################################################################
#                                 Transforms                                    #
#################################################################################

def center_crop_arr(pil_image, image_size):
    """ADM's center crop (as used by DiT): box-halve while the short side is >= 2x the target,
    bicubic-resize the short side to `image_size`, then cut the central square.

    Returns a PIL image of size (image_size, image_size).
    """
    while min(*pil_image.size) >= 2 * image_size:
        half = tuple(side // 2 for side in pil_image.size)
        pil_image = pil_image.resize(half, resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    resized = tuple(round(side * scale) for side in pil_image.size)
    pil_image = pil_image.resize(resized, resample=Image.BICUBIC)
    arr = np.array(pil_image)                       # (H, W[, C])
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def pil_to_tensor(pil_image):
    """PIL image (uint8) -> float tensor (C, H, W) in [-1, 1]."""
    arr = np.asarray(pil_image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]                       # (H, W) -> (H, W, 1)
    tensor = torch.from_numpy(arr.transpose(2, 0, 1).copy())  # (C, H, W) in [0, 255]
    return tensor / 127.5 - 1.0


#################################################################################
#                             Class-folder dataset                              #
#################################################################################

def find_images(root, allow_empty_classes=False):
    """ImageFolder's listing: (classes, [(path, label)]) with sorted class folders and sorted
    files walked recursively, so dataset indices match torchvision.datasets.ImageFolder's.

    A class folder without images is refused (ImageFolder refuses it too: it would take a label
    and shift every later class); with `allow_empty_classes` it keeps its label index, so the
    indices stay ImageFolder's. Raises JobError (one line) for a missing root, no class
    folders, an empty class folder or no images.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise JobError(f"data path {root} does not exist or is not a folder: pass a folder "
                       f"holding one sub-folder of images per class")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise JobError(f"data path {root} has no class sub-folders: put the images of each "
                       f"class in their own sub-folder (root/<class>/<image>)")
    samples, empty = [], []
    for label, name in enumerate(classes):
        count = len(samples)
        for folder, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for fname in sorted(files):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(folder, fname), label))
        if len(samples) == count:
            empty.append(name)
    if not samples:
        raise JobError(f"data path {root} holds no images ({', '.join(IMG_EXTENSIONS)}) in its "
                       f"{len(classes)} class sub-folders")
    if empty and not allow_empty_classes:
        others = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise JobError(f"class folder {os.path.join(root, empty[0])}{others} holds no images, yet "
                       f"would take a label and shift every later class: remove it, or pass "
                       f"--allow-empty-classes to keep ImageFolder's indices")
    return classes, samples


# 16-bit and 32-bit grey modes, scaled to 8 bits by their full range (PIL's own convert clips
# them, so a 16-bit grey image turns white).
_WIDE_GREY = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
              "I": 65535.0}


def _wide_grey_to_l(img):
    """A 16-bit / 32-bit integer or float grey image as 8-bit "L", scaled by its range."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        scale = 1.0 if finite.size and finite.max() <= 1.0 else 255.0   # [0, 1] or [0, 255]
        arr = np.nan_to_num(arr, nan=0.0) / scale
    else:
        arr = arr.astype(np.float64) / _WIDE_GREY[img.mode]
    return Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8), "L")


def to_mode(img, mode="RGB"):
    """Any PIL image as 8-bit "RGB" or "L", whatever its mode: 16/32-bit and float grey are
    scaled (not clipped), palette images with transparency go through RGBA, alpha is dropped
    as torchvision's loader does, CMYK/YCbCr/1/LA/... use PIL's conversions."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"to_mode converts to 'RGB' or 'L', not {mode!r}")
    if img.mode in _WIDE_GREY or img.mode == "F":
        img = _wide_grey_to_l(img)
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == mode:
        return img
    try:
        return img.convert(mode)
    except ValueError:          # modes PIL converts only via RGBA
        return img.convert("RGBA").convert(mode)


def to_rgb(img):
    """Any PIL image as 8-bit RGB (see to_mode)."""
    return to_mode(img, "RGB")


def load_image(path, channels=3):
    """Read an image as RGB (channels=3) or greyscale (channels=1), any PIL mode converted by
    to_mode; None (and a warning) if the file is corrupt."""
    mode = {3: "RGB", 1: "L"}[channels]
    try:
        with Image.open(path) as img:
            img.load()                  # the full decode happens inside the try
            return to_mode(img, mode)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        warnings.warn(f"skipping corrupt image {path} ({type(e).__name__}: {e})",
                      CorruptImageWarning, stacklevel=2)
        return None


class ImageFolderDataset(Dataset):
    """Class-folder images with ADM's center crop and DiT's optional random horizontal flip.

    Items are `(image (C, H, W) in [-1, 1], label int)`; classes are the sorted sub-folder
    names (`.classes`). A corrupt file gives None (use `collate_skip_none`), a warning, and
    adds its index to `.skipped` (counted in the process that read it: with DataLoader
    workers, count the Nones in the main process instead).
    """

    def __init__(self, root, image_size, random_flip=True, channels=3, allow_empty_classes=False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (greyscale) or 3 (RGB), got {channels}")
        if image_size <= 0:
            raise ValueError(f"image size must be positive, got {image_size}")
        self.root = os.fspath(root)
        self.image_size = image_size
        self.random_flip = random_flip
        self.channels = channels
        self.classes, self.samples = find_images(self.root, allow_empty_classes)
        self.targets = [label for _, label in self.samples]
        self.skipped = set()

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def num_skipped(self):
        return len(self.skipped)

    def __len__(self):
        return len(self.samples)

    def load(self, index, flip=False):
        """The center-cropped image at `index` as a tensor, flipped if asked; None if corrupt."""
        path, _ = self.samples[index]
        img = load_image(path, self.channels)
        if img is None:
            self.skipped.add(index)
            return None
        img = center_crop_arr(img, self.image_size)
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(img)

    def __getitem__(self, index):
        flip = self.random_flip and torch.rand(()).item() < 0.5
        image = self.load(index, flip=flip)
        if image is None:
            return None
        return image, self.targets[index]


def collate_skip_none(batch):
    """default_collate without the Nones that corrupt images leave; None if nothing is left."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    return default_collate(batch)


#################################################################################
#                              Built-in datasets                                #
#################################################################################

class TensorImageDataset(Dataset):
    """Images (N, C, H, W) in [-1, 1] with integer labels, held in memory."""

    def __init__(self, images, labels, num_classes):
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


def split_indices(labels, test_fraction=0.2, seed=0):
    """Fixed stratified split: per class, round(test_fraction * n) indices go to the test set.

    Uses NumPy's legacy RandomState, whose stream NumPy keeps stable across versions, so the
    held-out set is the same on every machine. Returns (train, test) sorted index arrays.
    """
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _load_digits():
    """scikit-learn's digits as (N, 1, 8, 8) float in [-1, 1] and (N,) int labels."""
    from sklearn.datasets import load_digits  # ships inside the wheel: no download
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))[:, None]  # (N, 1, 8, 8) in 0..16
    return images / 8.0 - 1.0, digits.target.astype(np.int64)


def builtin_dataset(name, split="train", image_size=16):
    """A small dataset that needs no download: `(image (C, H, W) in [-1, 1], label)` items.

    "digits": scikit-learn's 8x8 digits, bilinearly resized to `image_size`; 20% of each class
    is held out ("test", fixed seed) and never appears in "train".
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in dataset {name!r}: choose one of "
                         f"{', '.join(BUILTIN_DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if image_size <= 0:
        raise ValueError(f"image size must be positive, got {image_size}")
    channels, native, num_classes = BUILTIN_DATASETS[name]
    images, labels = _load_digits()
    if image_size != native:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size),
                                                 mode="bilinear", align_corners=False,
                                                 antialias=image_size < native)
        images = images.clamp(-1.0, 1.0)
    train, test = split_indices(labels, test_fraction=0.2, seed=0)
    keep = train if split == "train" else test
    return TensorImageDataset(images[keep].contiguous(), torch.from_numpy(labels[keep]), num_classes)
