"""Per-sample randomness: one CPU generator per sample index, so a sample depends on its index and
the settings alone.

Determinism: every sample index i owns a CPU torch.Generator seeded from (seed, i). It draws, in
this order, the random class label, the initial noise x_T and every per-step noise of the reverse
process. So the randomness of image i depends only on (seed, i), never on its batch-mates, the batch
size or the number of processes; the diffusion arithmetic itself is DiT's (p_mean_variance,
p_sample's update, ddim_sample). Bit-exact pixels also need the same batch shape for every model
call (see IndexNoise's pad_to): batched kernels round a row the same way at any position of a
batch of one shape, but not necessarily at another batch size. Each fast-path setting
(--precision, --channels-last, --compile) keeps this guarantee as long as every process
uses the same setting; only --precision bf16 changes the numbers beyond float rounding.

A latent walk (sample.py --interpolate) draws from WalkNoise instead: every draw of image 0 of two
seeds, spherically interpolated (slerp), so the walk's ends are those seeds' images.
"""
import math

import torch

from helpers.utils.seeds import generator


class IndexNoise:
    """One CPU generator per sample index; every draw is stacked over the batch in index order.

    Drawing on the CPU makes the numbers the same on any device and any process count.
    `pad_to` adds filler rows (zero noise, label 0, no generator) up to a fixed batch size, so
    every model call of a run has the same shape: batched kernels (BLAS, cuDNN) may round a row
    differently at another batch size, but not at another position in a batch of the same shape.
    """

    def __init__(self, global_seed, indices, pad_to=None):
        self.indices = list(indices)
        self.generators = [generator(global_seed, i) for i in self.indices]
        self.rows = max(len(self.indices), pad_to or 0)

    def _pad(self, rows):
        filler = torch.zeros_like(rows[0])
        return torch.stack(rows + [filler] * (self.rows - len(rows)))

    def labels(self, num_classes):
        """(rows,) random labels, uniform over the classes as in DiT's sample_ddp.py."""
        return self._pad([torch.randint(0, num_classes, (), generator=g) for g in self.generators])

    def randn(self, shape, device="cpu"):
        """(rows, *shape) standard normal noise, each row from its own sample's generator."""
        return self._pad([torch.randn(shape, generator=g) for g in self.generators]).to(device)


def grid_noise(seed, count, num_classes):
    """IndexNoise for images 0..count-1 whose labels the caller chooses: each index's random label
    is drawn and discarded, so image j gets the same noise stream as image j of sample_ddp.py."""
    noise = IndexNoise(seed, range(count))
    noise.labels(num_classes)
    return noise


def draw_labels(noise, num_classes, balanced=False):
    """Labels for noise's rows. The random draw happens even when `balanced`, so switching
    --balanced-classes changes labels only, never the noise of an index."""
    labels = noise.labels(num_classes)
    if balanced:
        labels[:len(noise.indices)] = torch.tensor([i % num_classes for i in noise.indices])
    return labels


def slerp(a, b, weights, eps=1e-6):
    """(len(weights), *a.shape): the spherical interpolation of a and b at each weight w in [0, 1],
    (sin((1 - w) theta) a + sin(w theta) b) / sin(theta), theta the angle between a and b (flattened).

    Why spherical: two independent Gaussian draws in many dimensions are nearly orthogonal with
    nearly equal norms; the straight line between them passes through vectors of smaller norm
    (about 1/sqrt(2) at the midpoint), which the model never saw as noise, while slerp keeps the
    norm. The coefficients are computed first (in float64), so w = 0 and w = 1 give a and b exactly.
    Nearly parallel (or anti-parallel, or zero) vectors have no well-defined arc: plain lerp then.
    """
    a64, b64 = a.double().flatten(), b.double().flatten()
    norms = float(a64.norm() * b64.norm())
    theta = math.acos(max(-1.0, min(1.0, float(a64 @ b64) / norms))) if norms > 0 else 0.0
    rows = []
    for w in weights:
        w = float(w)
        if math.sin(theta) < eps:
            c0, c1 = 1.0 - w, w
        else:
            c0, c1 = math.sin((1.0 - w) * theta) / math.sin(theta), math.sin(w * theta) / math.sin(theta)
        rows.append(c0 * a + c1 * b)
    return torch.stack(rows)


class WalkNoise:
    """IndexNoise's draws for a latent walk of `steps` images between two seeds: every draw (x_T and
    each per-step noise of an ancestral sampler) is the slerp of what image 0 of `seed` and image 0
    of `seed + 1` draw (grid_noise's streams, the random label discarded) at w = linspace(0, 1, steps).

    Why every draw, not x_T alone: the first and last images then draw exactly the numbers of
    sample.py's image 0 of the two seeds, so they are those images for every sampler, the ancestral
    ones (ddpm, SiT's sde) included (bit for bit at the same batch shape, see above); with the
    per-step noise of one seed kept, the last image would be neither seed's. The walk stays smooth:
    each draw moves continuously with w and slerp keeps its norm. A deterministic sampler (ddim,
    dpm-solver, ode) draws x_T alone, so only x_T is interpolated.
    """

    def __init__(self, seed, steps, num_classes):
        self.weights = torch.linspace(0, 1, steps, dtype=torch.float64).tolist()
        self.ends = [grid_noise(s, 1, num_classes) for s in (seed, seed + 1)]
        self.indices = list(range(steps))         # positions along the walk
        self.rows = steps

    def randn(self, shape, device="cpu"):
        """(steps, *shape): the two seeds' next draws, slerped at each weight of the walk."""
        a, b = (end.randn(shape)[0] for end in self.ends)
        return slerp(a, b, self.weights).to(device)
