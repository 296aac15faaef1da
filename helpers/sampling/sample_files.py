"""Sample folders and .npz files: one PNG per sample index, then one .npz (arr_0 uint8 (N, H, W, 3))
streamed from them with fixed zip timestamps, so the same images always give the same bytes."""
import os
import zipfile

import numpy as np
from PIL import Image
from tqdm import tqdm

from helpers.utils.cli import JobError
from helpers.utils.files import atomic_write


def png_name(index):
    return f"{index:06d}.png"


def npz_shape(path):
    """Shape of arr_0 in an .npz, read from its header only (no data loaded); None if unreadable."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
            expected_bytes = int(np.prod(shape)) * dtype.itemsize
            if dtype != np.uint8 or zf.getinfo("arr_0.npy").file_size < expected_bytes:
                return None
            return tuple(shape)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def write_npz_from_pngs(folder, num, path, image_shape, progress=False):
    """Stream PNGs 000000..num-1 of `folder` into a new `path` (.npz, arr_0 uint8 (num, H, W, 3)), atomically.

    Written image by image (no 50k-image array in memory) with a fixed zip timestamp, so the same
    images always give the same bytes. Reads back the header to verify the count.
    """
    shape = (num, *image_shape)

    def write(tmp):
        entry = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf, \
                zf.open(entry, "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                    "fortran_order": False, "shape": shape})
            indices = range(num)
            if progress:
                indices = tqdm(indices, desc="Building .npz file from samples")
            for i in indices:
                png = os.path.join(folder, png_name(i))
                try:
                    with Image.open(png) as image:
                        pixels = np.asarray(image, dtype=np.uint8)
                except OSError as e:
                    raise JobError(f"cannot read sample {png} ({e}): delete it and rerun") from e
                if pixels.shape != tuple(image_shape):
                    raise JobError(f"sample {png} is {pixels.shape}, expected {tuple(image_shape)}: "
                                        f"delete it (or the folder) and rerun")
                f.write(np.ascontiguousarray(pixels).tobytes())

    atomic_write(path, write)  # never replaces: called only when no .npz exists
    if npz_shape(path) != shape:
        raise JobError(f"{path} was written but does not hold {shape} uint8 samples")
    return path
