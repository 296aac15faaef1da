"""Gaussian diffusion: noise schedules, the forward process, training losses, samplers.

This is the diffusion used by DiT and DiC (both ship the package derived from OpenAI's
guided-diffusion / improved-diffusion). Public names, signatures and numbers are the
same as DiT's `diffusion/gaussian_diffusion.py`, so checkpoints trained with either and
scripts written for either behave identically here:

- every coefficient table is computed once in float64 numpy and gathered per timestep
  into float32 tensors shaped like the input (`_extract_into_tensor`);
- the samplers draw their random numbers in the same order (initial noise with
  `th.randn(*shape)`, then one `th.randn_like(x)` per step, also at t = 0 where it is
  masked out), so a fixed seed gives the same samples.

Unlike DiT's package the per-device torch copies of the tables are cached, so sampling
does not upload numpy arrays at every step; the gathered values are bit-identical.
"""

import enum
import math

import numpy as np
import torch as th

from .diffusion_utils import discretized_gaussian_log_likelihood, normal_kl

_LN2 = np.log(2.0)  # nats -> bits


def mean_flat(tensor):
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


#################################################################################
#                                     Enums                                     #
#################################################################################


class ModelMeanType(enum.Enum):
    """What the network's (first C) output channels predict."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise eps (DiT/DiC default)


class ModelVarType(enum.Enum):
    """Where the variance of p(x_{t-1} | x_t) comes from.

    LEARNED_RANGE (DiT/DiC default with learn_sigma=True) lets the network interpolate,
    in log space, between the two fixed choices FIXED_SMALL (the posterior variance)
    and FIXED_LARGE (beta_t), which is easier to learn than a raw variance.
    """

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    """Training objective."""

    MSE = enum.auto()  # eps MSE (+ the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # MSE with the VB term scaled by T / 1000
    KL = enum.auto()  # the variational bound alone
    RESCALED_KL = enum.auto()  # the variational bound times T (estimates the full VLB)

    def is_vb(self):
        return self == LossType.KL or self == LossType.RESCALED_KL


#################################################################################
#                                Beta schedules                                 #
#################################################################################


def _warmup_beta(beta_start, beta_end, num_diffusion_timesteps, warmup_frac):
    """beta_end everywhere, except a linear ramp from beta_start over the first fraction."""
    betas = beta_end * np.ones(num_diffusion_timesteps, dtype=np.float64)
    warmup_time = int(num_diffusion_timesteps * warmup_frac)
    betas[:warmup_time] = np.linspace(beta_start, beta_end, warmup_time, dtype=np.float64)
    return betas


_LEGACY_SCHEDULES = ("quad", "linear", "warmup10", "warmup50", "const", "jsd")


def get_beta_schedule(beta_schedule, *, beta_start, beta_end, num_diffusion_timesteps):
    """The older, explicit-endpoint schedules (kept for API compatibility).

    `get_named_beta_schedule` is what `create_diffusion` uses.
    """
    T = num_diffusion_timesteps
    if beta_schedule == "quad":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif beta_schedule == "warmup10":
        betas = _warmup_beta(beta_start, beta_end, T, 0.1)
    elif beta_schedule == "warmup50":
        betas = _warmup_beta(beta_start, beta_end, T, 0.5)
    elif beta_schedule == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    else:
        raise ValueError(
            f"unknown beta schedule {beta_schedule!r}; choose one of {list(_LEGACY_SCHEDULES)}"
        )
    assert betas.shape == (T,)
    return betas


NAMED_SCHEDULES = ("linear", "squaredcos_cap_v2")


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas (float64 numpy, length T) for a named schedule.

    "linear": Ho et al.'s 1e-4..0.02 over 1000 steps. For other T both ends are scaled
    by 1000 / T, so that the total noise added (sum of betas) stays about the same.
    "squaredcos_cap_v2": Nichol & Dhariwal's cosine alpha-bar, betas capped at 0.999.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear",
            beta_start=scale * 0.0001,
            beta_end=scale * 0.02,
            num_diffusion_timesteps=num_diffusion_timesteps,
        )
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2,
        )
    raise ValueError(
        f"unknown noise schedule {schedule_name!r}; choose one of {list(NAMED_SCHEDULES)}"
    )


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha-bar(t), t in [0, 1], into T betas.

    beta_i = 1 - alpha_bar((i+1)/T) / alpha_bar(i/T), capped at max_beta: without the cap
    the cosine schedule's last beta is 1, which makes the chain singular at t = T.
    """
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


#################################################################################
#                              Gaussian diffusion                               #
#################################################################################


class GaussianDiffusion:
    """Training and sampling utilities for a discrete-time Gaussian diffusion.

    :param betas: 1-D array of per-step betas, step 0 (least noise) first.
    :param model_mean_type: a ModelMeanType.
    :param model_var_type: a ModelVarType.
    :param loss_type: a LossType.

    Timesteps `t` are 0-based: t = 0 is the first noising step. A `model` is any callable
    `model(x, t, **model_kwargs)`; it may return a tensor or a `(tensor, extra)` tuple.
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        # float64 throughout: alpha-bar of a 1000-step chain reaches ~4e-5, and the
        # ratios below lose digits in float32.
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.shape[0] == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("every beta must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)  # abar_t
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])  # abar_{t-1}
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)  # abar_{t+1}
        assert self.alphas_cumprod_prev.shape == (self.num_timesteps,)

        # q(x_t | x_0) and the x_0 <-> eps conversions.
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # Posterior q(x_{t-1} | x_t, x_0).
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # The posterior variance is 0 at t = 0, so its log is clipped by reusing entry 1.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = (
            betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

        # Tables DiT rebuilds on every p_mean_variance call; same values, built once.
        self._log_betas = np.log(self.betas)  # upper end of LEARNED_RANGE
        if len(self.posterior_variance) > 1:
            # FIXED_LARGE uses beta_t, except at t = 0 where the posterior variance
            # (of step 1) gives a better decoder log-likelihood.
            self._fixed_large_variance = np.append(self.posterior_variance[1], self.betas[1:])
            self._fixed_large_log_variance = np.log(self._fixed_large_variance)
        else:
            self._fixed_large_variance = self._fixed_large_log_variance = np.array([])

        # (table name, device) -> (numpy array it was built from, torch float64 copy).
        self._device_tables = {}

    # ------------------------------------------------------------------ helpers --

    def _extract(self, name, t, broadcast_shape):
        """`_extract_into_tensor(getattr(self, name), t, shape)` with a per-device cache.

        The cached torch copy is rebuilt if the attribute was replaced by another array.
        """
        arr = getattr(self, name)
        key = (name, t.device)
        hit = self._device_tables.get(key)
        if hit is None or hit[0] is not arr:
            hit = (arr, th.from_numpy(arr).to(device=t.device))
            self._device_tables[key] = hit
        return _broadcast_gathered(hit[1][t].float(), broadcast_shape)

    # ------------------------------------------------------ forward process q ---

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like x_start."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

        :param noise: the standard normal noise to use (drawn with randn_like if None).
        """
        if noise is None:
            noise = th.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(
                f"noise shape {tuple(noise.shape)} != x_start shape {tuple(x_start.shape)}"
            )
        return (
            self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        if x_start.shape != x_t.shape:
            raise ValueError(
                f"x_start shape {tuple(x_start.shape)} != x_t shape {tuple(x_t.shape)}"
            )
        posterior_mean = (
            self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t
        )
        posterior_variance = self._extract("posterior_variance", t, x_t.shape)
        posterior_log_variance_clipped = self._extract(
            "posterior_log_variance_clipped", t, x_t.shape
        )
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    # ----------------------------------------------------- reverse process p ----

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """Run the model once and turn its output into p(x_{t-1} | x_t) and an x_0 guess.

        :param model: callable `model(x, t, **model_kwargs)`.
        :param x: the (N, C, ...) tensor at time t.
        :param t: (N,) tensor of timestep indices.
        :param clip_denoised: clamp the x_0 prediction to [-1, 1] (DiT's sampling scripts
            pass False: latents are not bounded).
        :param denoised_fn: applied to the x_0 prediction before clamping.
        :return: dict with 'mean', 'variance', 'log_variance', 'pred_xstart' (all shaped
            like x) and 'extra' (the second item when the model returns a tuple).
        """
        if model_kwargs is None:
            model_kwargs = {}
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output = model(x, t, **model_kwargs)
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        else:
            extra = None

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = (B, C * 2, *x.shape[2:])
            if model_output.shape != expected:
                raise ValueError(
                    f"model output has shape {tuple(model_output.shape)}, expected {expected}: "
                    "with a learned variance (learn_sigma=True) the model must output 2*C channels"
                )
            model_output, model_var_values = th.split(model_output, C, dim=1)
            # Only LEARNED_RANGE is reachable from create_diffusion; like DiT's package,
            # both learned types use the range parametrisation.
            min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
            max_log = self._extract("_log_betas", t, x.shape)
            # The model's v in [-1, 1] maps to [min_var, max_var] in log space.
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = th.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            model_variance = self._extract("_fixed_large_variance", t, x.shape)
            model_log_variance = self._extract("_fixed_large_log_variance", t, x.shape)
        elif self.model_var_type == ModelVarType.FIXED_SMALL:
            model_variance = self._extract("posterior_variance", t, x.shape)
            model_log_variance = self._extract("posterior_log_variance_clipped", t, x.shape)
        else:
            raise ValueError(f"unsupported model_var_type {self.model_var_type}")

        def process_xstart(x0):
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            if clip_denoised:
                return x0.clamp(-1, 1)
            return x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        else:
            # EPSILON (and, as in DiT's package, PREVIOUS_X is not specially handled).
            eps = model_output
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=eps))
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)

        assert model_mean.shape == model_log_variance.shape == pred_xstart.shape == x.shape
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (inverts q_sample)."""
        assert x_t.shape == eps.shape
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
            - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """eps implied by x_t and an x_0 prediction (the inverse of the above)."""
        return (
            self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart
        ) / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape)

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x) (Sohl-Dickstein et al. 2015).

        `cond_fn(x, t, **model_kwargs)` returns that gradient.
        """
        if model_kwargs is None:
            model_kwargs = {}
        gradient = cond_fn(x, t, **model_kwargs)
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Guide through the score instead (Song et al. 2020): eps -= sqrt(1 - abar) grad.

        Returns a copy of p_mean_var with 'pred_xstart' and 'mean' recomputed.
        """
        if model_kwargs is None:
            model_kwargs = {}
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **model_kwargs)
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ---------------------------------------------------------- DDPM sampling ---

    def p_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
    ):
        """One ancestral step: x_{t-1} = mean + exp(log_var / 2) * z, z ~ N(0, I).

        z is drawn (once, with randn_like) at every step, also at t = 0 where it is
        masked out: keeping the draw keeps the random stream aligned with DiT's.
        :return: dict with 'sample' (x_{t-1}) and 'pred_xstart'.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        noise = th.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # 0 at t == 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * th.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """Sample with all `num_timesteps` ancestral steps; returns the final x_0 batch.

        :param shape: (N, C, H, W) of the samples.
        :param noise: the starting x_T; drawn with th.randn(*shape, device=device) if None.
        :param device: where to sample; if None, the model's parameters' device, else the
            device of `noise`, else CPU (so plain functions work as models).
        :param progress: show a tqdm bar.
        Other arguments as in p_sample. Runs under no_grad.
        """
        final = None
        for final in self.p_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
        ):
            pass
        return final["sample"]

    def p_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
    ):
        """Like p_sample_loop, but yields p_sample's dict after every step (t = T-1 .. 0)."""
        for out in self._sample_loop(
            self.p_sample, model, shape, noise, device, progress,
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                 model_kwargs=model_kwargs),
        ):
            yield out

    def _sample_loop(self, step_fn, model, shape, noise, device, progress, step_kwargs):
        """Shared reverse loop of the DDPM and DDIM samplers."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        device = _resolve_device(model, noise, device)
        img = noise if noise is not None else th.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm  # lazy: tqdm is only needed for the bar

            indices = tqdm(indices)
        for i in indices:
            t = th.tensor([i] * shape[0], device=device)
            with th.no_grad():
                out = step_fn(model, img, t, **step_kwargs)
                yield out
                img = out["sample"]

    # ---------------------------------------------------------- DDIM sampling ---

    def ddim_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """One DDIM step (Song et al. 2021, eq. 12); eta = 0 is deterministic.

        sigma = eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev).
        Noise is still drawn at every step (as in DiT), even when eta = 0.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)

        # Re-derive eps from the x_0 guess, so that x_0 predictors work too.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (
            eta
            * th.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
            * th.sqrt(1 - alpha_bar / alpha_bar_prev)
        )
        noise = th.randn_like(x)
        mean_pred = (
            out["pred_xstart"] * th.sqrt(alpha_bar_prev)
            + th.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        )
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # 0 at t == 0
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model,
        x,
        t,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        eta=0.0,
    ):
        """One deterministic DDIM step forward in time, x_t -> x_{t+1} (inversion)."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is deterministic: eta must be 0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            model_kwargs=model_kwargs,
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = self._extract("alphas_cumprod_next", t, x.shape)
        mean_pred = out["pred_xstart"] * th.sqrt(alpha_bar_next) + th.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Sample with DDIM over all `num_timesteps` steps; same arguments as p_sample_loop."""
        final = None
        for final in self.ddim_sample_loop_progressive(
            model, shape, noise=noise, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
            cond_fn=cond_fn, model_kwargs=model_kwargs, device=device, progress=progress,
            eta=eta,
        ):
            pass
        return final["sample"]

    def ddim_sample_loop_progressive(
        self,
        model,
        shape,
        noise=None,
        clip_denoised=True,
        denoised_fn=None,
        cond_fn=None,
        model_kwargs=None,
        device=None,
        progress=False,
        eta=0.0,
    ):
        """Like ddim_sample_loop, but yields ddim_sample's dict after every step."""
        for out in self._sample_loop(
            self.ddim_sample, model, shape, noise, device, progress,
            dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn,
                 model_kwargs=model_kwargs, eta=eta),
        ):
            yield out

    # ------------------------------------------------------- training losses ----

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretised
        Gaussian decoder NLL -log p(x_0 | x_1) at t = 0. Bits (not nats) so the values
        compare with papers.
        :return: dict with 'output' ((N,) tensor) and 'pred_xstart'.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(
            x_start=x_start, x_t=x_t, t=t
        )
        out = self.p_mean_variance(
            model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
        )
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / _LN2

        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / _LN2

        output = th.where((t == 0), decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-sample training loss at timesteps t.

        :param model: callable `model(x_t, t, **model_kwargs)`.
        :param x_start: (N, C, ...) clean inputs.
        :param t: (N,) timestep indices (DiT draws them with torch.randint(0, T, (N,))).
        :param noise: the eps used for q_sample (drawn with randn_like if None).
        :return: dict of (N,) tensors: 'loss' and, for the MSE losses, 'mse' and (with a
            learned variance) 'vb'; loss = mse + vb. The VB term sees the eps channels
            detached, so it trains only the variance (Nichol & Dhariwal's L_hybrid).
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = th.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)

        terms = {}
        if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
            terms["loss"] = self._vb_terms_bpd(
                model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                model_kwargs=model_kwargs,
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
        elif self.loss_type in (LossType.MSE, LossType.RESCALED_MSE):
            model_output = model(x_t, t, **model_kwargs)

            if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
                B, C = x_t.shape[:2]
                expected = (B, C * 2, *x_t.shape[2:])
                if model_output.shape != expected:
                    raise ValueError(
                        f"model output has shape {tuple(model_output.shape)}, expected "
                        f"{expected}: with learn_sigma=True the model must output 2*C channels"
                    )
                model_output, model_var_values = th.split(model_output, C, dim=1)
                # The VB term must not move the mean prediction: detach eps.
                frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
                terms["vb"] = self._vb_terms_bpd(
                    model=lambda *args, r=frozen_out: r,
                    x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                )["output"]
                if self.loss_type == LossType.RESCALED_MSE:
                    # Divide by 1000 for parity with the original implementation,
                    # where an unscaled VB term hurt the MSE term.
                    terms["vb"] *= self.num_timesteps / 1000.0

            if self.model_mean_type == ModelMeanType.PREVIOUS_X:
                target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
            elif self.model_mean_type == ModelMeanType.START_X:
                target = x_start
            else:
                target = noise
            if not (model_output.shape == target.shape == x_start.shape):
                raise ValueError(
                    f"model output has shape {tuple(model_output.shape)}, expected "
                    f"{tuple(x_start.shape)}"
                )
            terms["mse"] = mean_flat((target - model_output) ** 2)
            terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        else:
            raise ValueError(f"unsupported loss_type {self.loss_type}")
        return terms

    # ------------------------------------------------------ likelihood (bpd) ----

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, (N,); constant w.r.t. the model."""
        batch_size = x_start.shape[0]
        t = th.tensor([self.num_timesteps - 1] * batch_size, device=x_start.device)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        kl_prior = normal_kl(mean1=qt_mean, logvar1=qt_log_variance, mean2=0.0, logvar2=0.0)
        return mean_flat(kl_prior) / _LN2

    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None):
        """The full variational bound in bits per dim, one model call per timestep.

        :return: dict with 'total_bpd' and 'prior_bpd' ((N,)), and (N, T) tensors 'vb'
            (the bound's terms), 'xstart_mse' and 'mse' (eps MSE), columns ordered
            from t = T-1 down to t = 0.
        """
        device = x_start.device
        batch_size = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        for t in list(range(self.num_timesteps))[::-1]:
            t_batch = th.tensor([t] * batch_size, device=device)
            noise = th.randn_like(x_start)
            x_t = self.q_sample(x_start=x_start, t=t_batch, noise=noise)
            with th.no_grad():
                out = self._vb_terms_bpd(
                    model, x_start=x_start, x_t=x_t, t=t_batch, clip_denoised=clip_denoised,
                    model_kwargs=model_kwargs,
                )
            vb.append(out["output"])
            xstart_mse.append(mean_flat((out["pred_xstart"] - x_start) ** 2))
            eps = self._predict_eps_from_xstart(x_t, t_batch, out["pred_xstart"])
            mse.append(mean_flat((eps - noise) ** 2))

        vb = th.stack(vb, dim=1)
        xstart_mse = th.stack(xstart_mse, dim=1)
        mse = th.stack(mse, dim=1)
        prior_bpd = self._prior_bpd(x_start)
        total_bpd = vb.sum(dim=1) + prior_bpd
        return {
            "total_bpd": total_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }


#################################################################################
#                                    Helpers                                    #
#################################################################################


def _resolve_device(model, noise, device):
    """The sampling device: explicit, else the model's parameters', else noise's, else CPU.

    DiT only looks at the model's parameters, which fails for callables without them
    (a bound method such as `model.forward_with_cfg`, a lambda); the fallbacks fix that.
    """
    if device is not None:
        return device
    params = getattr(model, "parameters", None)
    if callable(params):
        try:
            return next(iter(params())).device
        except StopIteration:
            pass
    if noise is not None:
        return noise.device
    return th.device("cpu")


def _broadcast_gathered(res, broadcast_shape):
    """Append singleton dims to the gathered (N,) values and expand to the full shape."""
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    # A real (not expanded-view) float32 tensor, as DiT's `res + zeros(shape)` gives.
    return res.expand(broadcast_shape).contiguous()


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Gather 1-D numpy table values at `timesteps` into a float32 tensor.

    :param arr: 1-D numpy array (float64 tables are indexed in float64, then cast).
    :param timesteps: integer tensor of indices; its device is the result's device.
    :param broadcast_shape: shape of K dims whose first equals len(timesteps).
    :return: float32 tensor of broadcast_shape, constant over all non-batch dims.
    """
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    return _broadcast_gathered(res, broadcast_shape)
