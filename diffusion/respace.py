"""Timestep respacing: sample with a subset of a trained diffusion's steps.

A model trained on T = 1000 steps can be sampled with, e.g., 250 of them ("250") or with
DDIM's fixed stride ("ddim50"). The respaced process keeps the alpha-bars of the kept
steps and recomputes its betas from them, so q(x_t | x_0) is unchanged at those steps;
the model is still called with the ORIGINAL timestep indices (0..T-1), which is what it
was trained on. Same rules and numbers as DiT's `diffusion/respace.py`.
"""

import numpy as np
import torch as th

from .gaussian_diffusion import GaussianDiffusion


def _ddim_stride_steps(num_timesteps, desired_count):
    """Steps range(0, T, stride) for the smallest stride giving exactly desired_count.

    Strides 1..T-1 are tried, as in DiT. When none fits, the error names the nearest
    counts that do, since e.g. 60 of 1000 (strides 16 -> 63, 17 -> 59) is a common typo.
    """
    possible = set()
    for stride in range(1, num_timesteps):
        count = len(range(0, num_timesteps, stride))
        if count == desired_count:
            return set(range(0, num_timesteps, stride))
        possible.add(count)
    below = [c for c in possible if c < desired_count]
    above = [c for c in possible if c > desired_count]
    nearest = ([max(below)] if below else []) + ([min(above)] if above else [])
    nearest = [f"ddim{c}" for c in nearest]
    raise ValueError(
        f"cannot create exactly {desired_count} steps with an integer stride from "
        f"{num_timesteps} diffusion steps (ddim{desired_count}); nearest possible: "
        f"{', '.join(nearest) if nearest else 'none'}"
    )


def space_timesteps(num_timesteps, section_counts):
    """Which of the original steps to keep, as a set of indices in 0..num_timesteps-1.

    :param num_timesteps: steps of the original process (e.g. 1000).
    :param section_counts: either "ddimN" (DDIM's fixed stride giving exactly N steps),
        or comma-separated counts / a list of ints. With counts, the original steps are
        cut into len(counts) equal sections (the first `T % len` sections one step
        longer) and counts[i] steps are taken from section i, evenly spaced from its
        first to its last step: index start + round(k * (size-1)/(count-1)) (with the
        stride accumulated as a float, as DiT does). "250" of 1000 gives 0, 4, 8, ...,
        995, 999; "10,15,20" of 300 takes 10, 15 and 20 steps from the three hundreds.
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired_count = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(
                    f"bad timestep_respacing {section_counts!r}: expected 'ddimN' with an integer N"
                ) from None
            if desired_count < 1:
                raise ValueError(f"bad timestep_respacing {section_counts!r}: N must be >= 1")
            return _ddim_stride_steps(num_timesteps, desired_count)
        try:
            section_counts = [int(x) for x in text.split(",")]
        except ValueError:
            raise ValueError(
                f"bad timestep_respacing {section_counts!r}: expected '', 'ddimN', or "
                "comma-separated step counts such as '250' or '10,15,20'"
            ) from None
    section_counts = [int(c) for c in section_counts]
    if not section_counts or min(section_counts) < 1:
        raise ValueError(f"step counts must be positive integers, got {section_counts}")

    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        # Accumulate the float stride (not k * stride) so rounding matches DiT exactly.
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return set(all_steps)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over a subset of a base process's steps.

    :param use_timesteps: the original steps to keep (any collection of ints).
    :param kwargs: the GaussianDiffusion kwargs of the base (full) process.

    Attributes: `timestep_map[i]` is the original index of respaced step i (ascending),
    `original_num_steps` the base process's T. Every method that calls the model wraps
    it so that the model sees original indices.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])

        base_diffusion = GaussianDiffusion(**kwargs)
        # Keep abar at the kept steps: beta'_i = 1 - abar_{k_i} / abar_{k_{i-1}}.
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(new_betas)
        super().__init__(**kwargs)
        # Shared by every wrapper this object makes (one per model call), so the
        # timestep_map tensor is built once per device instead of once per step.
        self._map_tensors = {}

    def p_mean_variance(self, model, *args, **kwargs):  # pylint: disable=signature-differs
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):  # pylint: disable=signature-differs
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(
            model, self.timestep_map, self.original_num_steps, map_cache=self._map_tensors
        )

    def _scale_timesteps(self, t):
        # The wrapped model already maps t; no further scaling (kept for API parity).
        return t


class _WrappedModel:
    """Calls `model(x, timestep_map[t], **kwargs)`: respaced index -> original index."""

    def __init__(self, model, timestep_map, original_num_steps, map_cache=None):
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps
        # (device, dtype) -> timestep_map as a tensor
        self._map_tensors = {} if map_cache is None else map_cache

    def __call__(self, x, ts, **kwargs):
        key = (ts.device, ts.dtype)
        map_tensor = self._map_tensors.get(key)
        if map_tensor is None:
            map_tensor = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
            self._map_tensors[key] = map_tensor
        return self.model(x, map_tensor[ts], **kwargs)
