"""The reverse process of each training objective, every random draw taken per sample index from an
IndexNoise (helpers/sampling/noise.py), so a sample depends on its index and the settings alone:

    DDPM checkpoints   --sampler ddpm (DiT's ancestral sampler), ddim (eta 0), dpm-solver (DPM-Solver++(2M),
                       diffusers' scheduler on the model's epsilon)
    SiT checkpoints    --mode ode (torchdiffeq: dopri5, euler, heun2, rk4, ...) or sde (Euler, Heun), as SiT
    rf (REPA) ones     --mode ode (REPA's Euler; --heun) or sde (REPA's Euler-Maruyama), as REPA, which
                       guide inside the sampler (helpers/sampling/rf_samplers.py)

    sampler = ReverseProcess(settings, objective_config, in_channels)     # settings: SamplerSettings
    latents = sampler(model_fn, noise, labels, shape, device, progress)    # sampler.nfe: model calls of
                                                                           # the last batch (adaptive ODE)
"""
from dataclasses import dataclass

import torch
from tqdm import tqdm

from diffusion import create_diffusion
from helpers.sampling.dpm_solver import dit_betas, dpm_solver_sample, eps_from_model_output
from helpers.sampling.rf_samplers import rf_sample
from helpers.training.objectives import first_channels
from transport import Sampler, create_transport

DDPM_SAMPLERS = ("ddpm", "ddim", "dpm-solver")
SIT_MODES = ("ode", "sde")
SDE_METHODS = ("Euler", "Heun")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("Mean", "Tweedie", "Euler", "None")
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver": 20, "ode": 50, "sde": 250}


@dataclass(frozen=True)
class SamplerSettings:
    """The resolved sampling flags: guidance and the reverse process (helpers.sampling.flags.sampler_settings
    makes them from the command line; the defaults are the flags'). Which fields apply depends on
    the checkpoint's objective: `sampler` for DDPM, the rest but guidance for SiT's ODE/SDE."""
    cfg_scale: float = 1.0              # classifier-free guidance scale; 1 = no guidance
    guide_channels: str = "official"    # official (the first 3 latent channels) or all (rf's default)
    sampler: str = "ddpm"               # DDPM checkpoints: ddpm, ddim or dpm-solver
    num_sampling_steps: int = None      # None until resolved: DEFAULT_STEPS of the sampler or mode
    mode: str = "ode"                   # SiT and rf checkpoints: ode or sde
    sampling_method: str = None         # SiT ode: a torchdiffeq method (dopri5); SiT sde: Euler or Heun;
                                        # rf: euler or heun (ode), euler-maruyama (sde)
    atol: float = 1e-6                  # ode: tolerances
    rtol: float = 1e-3
    reverse: bool = False               # ode: integrate data -> noise
    likelihood: bool = False            # ode: also each sample's NLL (sample.py)
    diffusion_form: str = "sigma"       # sde: the diffusion coefficient w(t), its scale, the last step
    diffusion_norm: float = 1.0
    last_step: str = "Mean"
    last_step_size: float = 0.04
    guidance_low: float = 0.0           # guide only where REPA's time (1 = noise) is in [low, high]
    guidance_high: float = 1.0


def is_flow(objective_config):
    """Whether the objective samples with --mode ode|sde (SiT's flow and REPA's rf) rather than DDPM's --sampler."""
    return objective_config["name"] in ("sit", "rf")


def sampler_name(settings, objective_config):
    """'ddpm-250', 'ode-dopri5-50', 'sde-euler-maruyama-250', ...: what sample folders and logs call the
    reverse process."""
    if is_flow(objective_config):
        return f"{settings.mode}-{settings.sampling_method}-{settings.num_sampling_steps}"
    return f"{settings.sampler}-{settings.num_sampling_steps}"


def sampler_record(settings, objective_config):
    """Everything of the reverse process that decides a sample's pixels (for sample_ddp's record)."""
    keys = ["num_sampling_steps"]
    if objective_config["name"] == "rf":
        keys += ["mode", "sampling_method", "guidance_low", "guidance_high"]
    elif objective_config["name"] == "sit":
        keys += ["mode", "sampling_method", "atol", "rtol", "reverse", "guidance_low", "guidance_high"]
        if settings.mode == "sde":
            keys += ["diffusion_form", "diffusion_norm", "last_step", "last_step_size"]
    return {"sampler": sampler_name(settings, objective_config), "objective": dict(objective_config),
            **{k: getattr(settings, k) for k in keys}}


def reuse_last_call(model_fn):
    """model_fn that hands back its last output when called again with the very same x and t:
    SiT's SDE drift asks the model twice at every point (velocity, then score), so this halves the
    SDE's cost with the same numbers."""
    last = [None, None, None]

    def fn(x, t, **kwargs):
        if last[0] is x and last[1] is t:
            return last[2]
        out = model_fn(x, t, **kwargs)
        last[:] = [x, t, out]
        return out
    return fn


class ReverseProcess:
    """Latents from per-index noise: __call__(model_fn, noise, labels, shape, device, progress).

    `settings`: a SamplerSettings (or anything with the fields it reads: DDPM's sampler and
    num_sampling_steps; SiT's mode, sampling_method, num_sampling_steps and the ODE's or SDE's own;
    rf's mode, sampling_method, num_sampling_steps and its guidance). `null_label`: the model's
    num_classes, for rf's guidance (REPA's samplers guide; the other objectives' model_fn does)."""

    def __init__(self, settings, objective_config, in_channels, clip_denoised=False, null_label=None):
        self.settings, self.config, self.in_channels = settings, objective_config, in_channels
        self.clip_denoised, self.null_label = clip_denoised, null_label
        self.nfe, self.last_latents = None, None
        if objective_config["name"] == "sit":
            transport = {k: objective_config.get(k) for k in ("path_type", "prediction", "loss_weight",
                                                               "train_eps", "sample_eps")}
            self.transport_sampler = Sampler(create_transport(**transport))
        elif objective_config["name"] != "rf" and settings.sampler in ("ddpm", "ddim"):
            steps = settings.num_sampling_steps
            respacing = f"ddim{steps}" if settings.sampler == "ddim" else str(steps)
            self.diffusion = create_diffusion(respacing, learn_sigma=objective_config.get("learn_sigma", True),
                                              noise_schedule=objective_config.get("noise_schedule", "linear"),
                                              diffusion_steps=objective_config.get("diffusion_steps", 1000))

    @torch.no_grad()
    def __call__(self, model_fn, noise, labels, shape, device, progress=False):
        x = noise.randn(shape, device=device)                                 # x_T / x_0 of SiT: (N, C, H, W)
        y = labels.to(device)
        if self.config["name"] == "rf":
            x = rf_sample(self.settings, self.config, model_fn, noise, x, y, self.in_channels, self.null_label,
                          device, progress)
        elif self.config["name"] == "sit":
            x = self._sit(model_fn, noise, x, y, device)
        elif self.settings.sampler == "dpm-solver":
            betas = dit_betas(self.config.get("noise_schedule", "linear"), self.config.get("diffusion_steps", 1000))
            eps_fn = lambda x_t, t: eps_from_model_output(model_fn(x_t, t, y), self.in_channels)  # noqa: E731
            x = dpm_solver_sample(eps_fn, x, self.settings.num_sampling_steps, betas=betas, progress=progress)
        else:
            x = self._diffusion(model_fn, noise, x, y, shape, device, progress)
        self.last_latents = x
        return x

    def _diffusion(self, model_fn, noise, x, y, shape, device, progress):
        """DiT's ddpm/ddim arithmetic (p_mean_variance, then mean + exp(log_var / 2) z with no noise at
        t = 0, as p_sample) with z drawn per sample; DDIM (eta 0) is deterministic after x_T, so
        diffusion.ddim_sample is used as is."""
        diffusion, model_kwargs = self.diffusion, dict(y=y)
        steps = list(range(diffusion.num_timesteps))[::-1]
        for i in tqdm(steps, desc=f"{self.settings.sampler} steps", disable=not progress):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=device)
            if self.settings.sampler == "ddim":
                x = diffusion.ddim_sample(model_fn, x, t, clip_denoised=self.clip_denoised,
                                          model_kwargs=model_kwargs, eta=0.0)["sample"]
                continue
            out = diffusion.p_mean_variance(model_fn, x, t, clip_denoised=self.clip_denoised,
                                            model_kwargs=model_kwargs)
            z = noise.randn(shape, device=device)                             # drawn at t = 0 too, as DiT
            nonzero_mask = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
            x = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * z
        return x

    def _sit(self, model_fn, noise, x, y, device):
        """SiT's ODE or SDE from x (noise at t = 0) to data at t = 1; the SDE's noise per sample."""
        a, sampler = self.settings, self.transport_sampler
        velocity = first_channels(model_fn, self.in_channels)
        if a.mode == "ode":
            solve = sampler.sample_ode(sampling_method=a.sampling_method, num_steps=a.num_sampling_steps,
                                       atol=a.atol, rtol=a.rtol, reverse=a.reverse)
            out = solve(x, velocity, y=y)[-1]
            self.nfe = sampler.last_nfe
            return out
        solve = sampler.sample_sde(sampling_method=a.sampling_method, diffusion_form=a.diffusion_form,
                                   diffusion_norm=a.diffusion_norm,
                                   last_step=None if a.last_step == "None" else a.last_step,
                                   last_step_size=a.last_step_size, num_steps=a.num_sampling_steps)
        return solve(x, reuse_last_call(velocity), generator=lambda size: noise.randn(tuple(size[1:]), device=device),
                     y=y)[-1]

    def bits_per_dim(self, model_fn, latents, labels):
        """SiT's ODE likelihood of each sample, as negative log-likelihood in bits per dimension."""
        a = self.settings
        solve = self.transport_sampler.sample_ode_likelihood(sampling_method=a.sampling_method,
                                                             num_steps=a.num_sampling_steps, atol=a.atol, rtol=a.rtol)
        logp, _ = solve(latents, first_channels(model_fn, self.in_channels), y=labels.to(latents.device))
        return -logp / (latents[0].numel() * torch.log(torch.tensor(2.0)))
