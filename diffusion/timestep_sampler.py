"""Timestep samplers for training (from guided-diffusion's resample.py, as DiT ships).

DiT and DiC train with uniform timesteps (`torch.randint(0, T, (N,))` in train.py);
these samplers are kept for API parity and for importance-sampled VLB training.
"""

from abc import ABC, abstractmethod

import numpy as np
import torch as th
import torch.distributed as dist

SAMPLER_NAMES = ("uniform", "loss-second-moment")


def create_named_schedule_sampler(name, diffusion):
    """A ScheduleSampler by name: "uniform" or "loss-second-moment"."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise ValueError(f"unknown schedule sampler {name!r}; choose one of {list(SAMPLER_NAMES)}")


class ScheduleSampler(ABC):
    """A distribution over timesteps, with importance weights that keep the loss unbiased."""

    @abstractmethod
    def weights(self):
        """Positive (unnormalised) numpy weights, one per diffusion step."""

    def sample(self, batch_size, device):
        """Draw (timesteps, weights) for a batch; weights = 1 / (T p(t)).

        Uses numpy's global RNG (np.random.choice), as the original does.
        """
        w = self.weights()
        p = w / np.sum(w)
        indices_np = np.random.choice(len(p), size=(batch_size,), p=p)
        indices = th.from_numpy(indices_np).long().to(device)
        weights_np = 1 / (len(p) * p[indices_np])
        weights = th.from_numpy(weights_np).float().to(device)
        return indices, weights


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely (weights all 1)."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler whose weights follow the losses seen so far."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Gather (t, loss) pairs from every rank, then update identically everywhere.

        Needs an initialised torch.distributed process group; batches of different
        sizes are padded to the largest for all_gather and trimmed afterwards.
        """
        world = dist.get_world_size()
        batch_sizes = [th.tensor([0], dtype=th.int32, device=local_ts.device) for _ in range(world)]
        dist.all_gather(
            batch_sizes, th.tensor([len(local_ts)], dtype=th.int32, device=local_ts.device)
        )
        batch_sizes = [x.item() for x in batch_sizes]
        max_bs = max(batch_sizes)
        timestep_batches = [th.zeros(max_bs).to(local_ts) for _ in batch_sizes]
        loss_batches = [th.zeros(max_bs).to(local_losses) for _ in batch_sizes]
        dist.all_gather(timestep_batches, local_ts)
        dist.all_gather(loss_batches, local_losses)
        timesteps = [x.item() for y, bs in zip(timestep_batches, batch_sizes) for x in y[:bs]]
        losses = [x.item() for y, bs in zip(loss_batches, batch_sizes) for x in y[:bs]]
        self.update_with_all_losses(timesteps, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update from lists of int timesteps and float losses (deterministically:
        every rank calls this with the same arguments and must stay in sync)."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(E[L_t^2]) over the last `history_per_term` losses.

    Uniform until every timestep has a full history; a `uniform_prob` floor keeps every
    timestep reachable (Nichol & Dhariwal 2021, section 3.3).
    """

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        # np.int64, not the removed np.int alias the original used.
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        weights /= np.sum(weights)
        weights *= 1 - self.uniform_prob
        weights += self.uniform_prob / len(weights)
        return weights

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                # Full: drop the oldest loss.
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()
