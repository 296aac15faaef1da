""".npz files of the evaluation: ADM's image batches (`arr_0`, uint8 (N, H, W, 3)), read in
batches from their header without loading the whole array, their precomputed statistics
(mu, sigma, mu_s, sigma_s), and atomic writes of .npz and .json results.
"""
import json
import os
import zipfile

import numpy as np

from helpers.evaluation.inception import POOL_DIM, SPATIAL_DIM, first_line
from helpers.utils.cli import JobError
from helpers.utils.files import atomic_write, atomic_write_text

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def _read_npy_header(f):
    """The (shape, fortran_order, dtype) header of an open .npy stream, or None for a format
    version the streaming reader does not handle (then the array is read whole)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


class NpzImages:
    """`arr_0` of an .npz batch (uint8 (N, H, W, 3)), validated from its header and read in
    batches without loading the whole array (ADM's evaluator streams it the same way)."""

    def __init__(self, path, what="batch", min_images=1):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise JobError(f"{what} {self.path} does not exist")
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                if "arr_0" not in self.keys:
                    raise JobError(f"{what} {self.path} has no arr_0 (keys: "
                                          f"{', '.join(self.keys) or 'none'}): save images with "
                                          f"np.savez(path, images)")
                with zf.open("arr_0.npy") as f:
                    header = _read_npy_header(f)
                    data_bytes = zf.getinfo("arr_0.npy").file_size - f.tell()
        except zipfile.BadZipFile as e:
            raise JobError(f"{what} {self.path} is not an .npz file ({e})") from e
        if header is None:                                  # rare .npy format 3.0: read it whole
            with np.load(self.path) as z:
                arr = z["arr_0"]
            header = (arr.shape, False, arr.dtype)
        self.shape, self.fortran_order, self.dtype = tuple(header[0]), header[1], np.dtype(header[2])
        if self.dtype != np.uint8:
            raise JobError(f"{what} {self.path}: arr_0 has dtype {self.dtype}, expected uint8 "
                                  f"images (N, H, W, 3) in [0, 255]")
        if len(self.shape) != 4 or self.shape[3] != 3:
            hint = " (channels first? save (N, H, W, 3))" if len(self.shape) == 4 and self.shape[1] == 3 else ""
            raise JobError(f"{what} {self.path}: arr_0 has shape {self.shape}, expected "
                                  f"(N, H, W, 3) RGB images{hint}")
        if data_bytes < int(np.prod(self.shape)):
            raise JobError(f"{what} {self.path}: arr_0 is truncated ({data_bytes} bytes of "
                                  f"image data for shape {self.shape}); rewrite the file")
        if self.shape[0] < min_images:
            raise JobError(f"{what} {self.path} holds {self.shape[0]} images; at least "
                                  f"{min_images} are needed")

    def __len__(self):
        return self.shape[0]

    def num_batches(self, batch_size):
        return -(-len(self) // batch_size)

    def batches(self, batch_size):
        """Yield uint8 arrays (<= batch_size, H, W, 3) in order."""
        if self.fortran_order:
            with np.load(self.path) as z:
                arr = z["arr_0"]
            for start in range(0, len(arr), batch_size):
                yield np.ascontiguousarray(arr[start:start + batch_size])
            return
        per_image = int(np.prod(self.shape[1:]))
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
                _read_npy_header(f)
                for start in range(0, len(self), batch_size):
                    count = min(batch_size, len(self) - start)
                    data = f.read(count * per_image)
                    if len(data) != count * per_image:
                        raise JobError(f"{self.path}: arr_0 ends at image "
                                              f"{start + len(data) // per_image} of {len(self)}")
                    yield np.frombuffer(data, dtype=np.uint8).reshape((count,) + self.shape[1:])
        except (zipfile.BadZipFile, OSError, EOFError) as e:    # e.g. a CRC error mid-file
            raise JobError(f"{self.path}: arr_0 cannot be read ({first_line(e)})") from e


def read_npz_statistics(path, what="batch"):
    """ADM's precomputed statistics in an .npz: ((mu, sigma), (mu_s, sigma_s)), or None if the
    file has no `mu` (ADM then computes them from arr_0)."""
    with np.load(path) as z:
        if "mu" not in z.files:
            return None
        missing = [k for k in STAT_KEYS if k not in z.files]
        if missing:
            raise JobError(f"{what} {path} has mu but not {', '.join(missing)}: a reference "
                                  f"batch holds all of {', '.join(STAT_KEYS)}")
        stats = {k: z[k] for k in STAT_KEYS}
    for key, dim in (("mu", POOL_DIM), ("mu_s", SPATIAL_DIM)):
        sig = "sigma" + key[2:]
        if stats[key].shape != (dim,) or stats[sig].shape != (dim, dim):
            raise JobError(f"{what} {path}: {key}/{sig} have shapes {stats[key].shape}/"
                                  f"{stats[sig].shape}, expected ({dim},)/({dim}, {dim})")
    return (stats["mu"], stats["sigma"]), (stats["mu_s"], stats["sigma_s"])


#################################################################################
#                                 Atomic writes                                 #
#################################################################################

def save_npz_atomic(path, overwrite=False, **arrays):
    """np.savez (uncompressed, like ADM's batches) to a temp file, then rename; never clobbers."""
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays), overwrite)


def save_json_atomic(path, obj, overwrite=False):
    """JSON (indent 2) written atomically; never clobbers unless `overwrite`."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", overwrite)
