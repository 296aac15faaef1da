"""The one seed rule of the project: a seed is derive_seed(global seed, what, which), so every
random draw of a sample, an image or a process depends only on those integers, never on the batch,
the process count or where a job was resumed."""
import random
from contextlib import contextmanager

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


def _mix64(x):
    """splitmix64's finaliser: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts):
    """A 63-bit seed from non-negative integers (e.g. global seed, epoch, sample index)."""
    h = 0
    for part in parts:
        part = int(part)
        if part < 0:
            raise ValueError(f"seeds are built from non-negative integers, got {part}")
        h = _mix64(h ^ (part & _MASK64))
    return h >> 1


def generator(*parts):
    """A CPU torch.Generator seeded with derive_seed(*parts): the same numbers on any device."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


@contextmanager
def isolated_rng(seed):
    """Run a block with torch/NumPy/Python RNGs seeded from `seed`, then put the old states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
