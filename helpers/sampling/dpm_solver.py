"""DPM-Solver++ (Lu et al. 2022) for the DDPM-trained models of this repo, through diffusers'
DPMSolverMultistepScheduler driven by the model's epsilon output.

    eps_fn = model_eps_fn(model.forward_with_cfg, in_channels=4, y=y, cfg_scale=4.0)
    x_T = ...                                   # initial noise, drawn per sample index
    latents = dpm_solver_sample(eps_fn, x_T, num_steps=20)

The scheduler is set up to be the same process as diffusion.create_diffusion's: 1000 steps whose
betas are passed exactly (trained_betas), epsilon prediction, no thresholding (latents are not
bounded), and the ODE variant "dpmsolver++" of order 2. Its update draws no random numbers, so a
sample depends only on its own x_T (and on the model): per-index determinism comes from the
caller drawing x_T per index, as with DDIM.

Timesteps handed to eps_fn are the ORIGINAL 0..999 indices the model was trained on (what
diffusion.respace's wrapper maps respaced indices to), as a (B,) int64 tensor on x's device.
"""
import numpy as np
import torch

from diffusion import gaussian_diffusion as gd
from helpers.utils.cli import JobError

ALGORITHM = "dpmsolver++"   # the ODE solver; "sde-dpmsolver++" would draw noise at every step
SOLVER_ORDER = 2            # DPM-Solver++(2M), the variant recommended for guided sampling


def dit_betas(noise_schedule="linear", diffusion_steps=1000):
    """The betas of create_diffusion's base process (float64), so both samplers share one."""
    return gd.get_named_beta_schedule(noise_schedule, diffusion_steps)


def make_scheduler(betas=None, num_steps=20, timesteps=None, device=None, solver_order=SOLVER_ORDER):
    """A fresh DPMSolverMultistepScheduler on DiT's process with `num_steps` steps (or the
    explicit descending `timesteps`); fresh because it keeps the previous model outputs."""
    from diffusers import DPMSolverMultistepScheduler

    betas = np.asarray(dit_betas() if betas is None else betas, dtype=np.float64)
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=len(betas), trained_betas=betas.tolist(), solver_order=solver_order,
        prediction_type="epsilon", thresholding=False, algorithm_type=ALGORITHM,
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
        timestep_spacing="linspace")
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
    else:
        scheduler.set_timesteps(num_inference_steps=num_steps, device=device)
    return scheduler


def check_num_steps(num_steps, diffusion_steps=1000):
    """Refuse a step count the solver cannot use, in one line naming the flag."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= diffusion_steps:
        raise JobError(f"--num-sampling-steps {num_steps} does not suit --sampler dpm-solver: use "
                       f"1..{diffusion_steps} (10-25 is its useful range; 20 is typical)")


def eps_from_model_output(out, in_channels):
    """The epsilon part of a DiT/DiC output: the first C of its 2C channels (learned sigma), or
    the whole output when the model predicts epsilon only."""
    if out.shape[1] == 2 * in_channels:
        return out[:, :in_channels]
    if out.shape[1] == in_channels:
        return out
    raise JobError(f"the model outputs {out.shape[1]} channels but the latents have {in_channels}: "
                   f"expected {in_channels} (epsilon) or {2 * in_channels} (epsilon + sigma)")


def model_eps_fn(model_fn, in_channels, **model_kwargs):
    """eps_fn(x, t) for dpm_solver_sample from a DiT-style model_fn(x, t, **kwargs) (e.g.
    model.forward or model.forward_with_cfg with y=..., cfg_scale=...)."""
    def eps_fn(x, t):
        return eps_from_model_output(model_fn(x, t, **model_kwargs), in_channels)
    return eps_fn


def dpm_solver_sample(eps_fn, x_T, num_steps=20, betas=None, timesteps=None, progress=False,
                      solver_order=SOLVER_ORDER):
    """Integrate the probability-flow ODE from x_T (noise at the first timestep, 999 by default)
    to x_0 with DPM-Solver++(2M): `num_steps` calls of eps_fn(x, t) with original 0..999 t.

    The state is kept in float32 (as the scheduler computes), the result has x_T's dtype.
    `timesteps` (descending ints) replaces diffusers' evenly spaced 999, ..., 50 if given;
    solver_order=1 is DDIM on the same timesteps (a check of the set-up).
    """
    if timesteps is None:
        check_num_steps(num_steps, len(dit_betas() if betas is None else betas))
    scheduler = make_scheduler(betas, num_steps, timesteps, x_T.device, solver_order)
    x = x_T.to(torch.float32)
    steps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps)
    with torch.no_grad():
        for t in steps:
            t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
            eps = eps_fn(x, t_batch).to(torch.float32)
            x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x.to(x_T.dtype)
