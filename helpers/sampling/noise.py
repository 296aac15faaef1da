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
"""
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
