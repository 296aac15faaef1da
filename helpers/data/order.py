"""The order training data is read in, reproducible to the sample and resumable mid-epoch.

- The global order of an epoch comes from (global seed, epoch) alone: one permutation, of which
  process r takes every world_size-th index.
- Each sample's random augmentation (the flip) comes from derive_seed(global seed, epoch, index),
  so it is the same whichever process or DataLoader worker reads it, and wherever a run resumed.
"""
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from helpers.data.images import collate_skip_none
from helpers.utils.seeds import derive_seed, isolated_rng


class SeededSamples(Dataset):
    """Wraps a dataset so item i of epoch e draws its augmentation from a seed of (seed, e, i),
    and returns `(x, y, i)` (then any extra of the item, e.g. REPA's image; None for a corrupt one)."""

    def __init__(self, dataset, seed):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with isolated_rng(derive_seed(self.seed, self.epoch, index)):
            item = self.dataset[index]
        if item is None:
            return None
        return (item[0], item[1], index, *item[2:])   # (x, y, index[, image for REPA])


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler's shuffle (randperm seeded with seed + epoch, rank r takes every
    world_size-th index) that can start part-way into an epoch, for exact resume.

    Every epoch uses the first floor(N / global_batch) * global_batch indices of the permutation
    (the full batches; DiT's loader drops the last partial one too), so each sample is seen at
    most once per epoch and every process gets the same number of batches. `set_epoch(epoch,
    start)` skips the first `start` indices of the epoch's global order (batches done x global
    batch): skipping globally then striding equals each process skipping its own batches, and
    stays right if the number of processes changes.
    """

    def __init__(self, dataset, num_replicas, rank, global_batch_size, seed):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.global_batch_size = global_batch_size
        self.usable = len(dataset) // global_batch_size * global_batch_size
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def epoch_order(self):
        """The epoch's global order of sample indices (all processes together), before the start offset."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=g)[:self.usable].tolist()

    def __iter__(self):
        order = self.epoch_order()[self.start:]
        end = len(order) // self.num_replicas * self.num_replicas
        return iter(order[self.rank:end:self.num_replicas])

    def __len__(self):
        return max(self.usable - self.start, 0) // self.num_replicas


class EpochBatches:
    """The training batches `(x, y, indices)` of each epoch, in the resumable order above; with
    gradient accumulation a step's local batch comes as accum_steps consecutive micro-batches."""

    def __init__(self, dataset, rank, world_size, global_batch_size, seed, num_workers, pin_memory, accum_steps=1):
        self.samples = SeededSamples(dataset, seed)
        self.seed, self.rank, self.accum_steps = seed, rank, accum_steps
        self.steps_per_epoch = len(dataset) // global_batch_size
        self.sampler = ResumableDistributedSampler(self.samples, world_size, rank, global_batch_size, seed)
        micro_batch = global_batch_size // (world_size * accum_steps)
        self.loader = DataLoader(self.samples, batch_size=micro_batch, shuffle=False,
                                 sampler=self.sampler, num_workers=num_workers, pin_memory=pin_memory,
                                 drop_last=True, collate_fn=collate_skip_none, generator=torch.Generator())

    def __len__(self):
        return len(self.samples)

    def epoch(self, epoch, start_sample=0):
        """An iterator over epoch `epoch`'s batches of this process, after `start_sample` samples."""
        self.sampler.set_epoch(epoch, start=start_sample)
        self.samples.set_epoch(epoch)
        self.loader.generator.manual_seed(derive_seed(self.seed, epoch, self.rank, 1))
        return iter(self.loader)

    def steps(self, epoch, start_sample=0):
        """Epoch `epoch`'s optimizer steps of this process: lists of accum_steps micro-batches."""
        micro_batches = []
        for batch in self.epoch(epoch, start_sample):
            micro_batches.append(batch)
            if len(micro_batches) == self.accum_steps:
                yield micro_batches
                micro_batches = []
