"""The reverse process of each training objective, every random draw taken per sample index from an
IndexNoise (helpers/sampling/setup.py), so a sample depends on its index and the settings alone:

    DDPM checkpoints   --sampler ddpm (DiT's ancestral sampler), ddim (eta 0), dpm-solver (DPM-Solver++(2M),
                       diffusers' scheduler on the model's epsilon)
    SiT checkpoints    --mode ode (torchdiffeq: dopri5, euler, heun2, rk4, ...) or sde (Euler, Heun), as SiT

    sampler = make_sampler(args, objective_config, in_channels)
    latents = sampler(model_fn, noise, labels, shape, device, progress)    # sampler.nfe: model calls of
                                                                           # the last batch (adaptive ODE)
"""
import torch
from tqdm import tqdm

from diffusion import create_diffusion
from helpers.utils.cli import JobError
from helpers.sampling.dpm_solver import check_num_steps, dit_betas, dpm_solver_sample, eps_from_model_output
from helpers.training.objectives import first_channels
from transport import Sampler, create_transport

DDPM_SAMPLERS = ("ddpm", "ddim", "dpm-solver")
SIT_MODES = ("ode", "sde")
SDE_METHODS = ("Euler", "Heun")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("Mean", "Tweedie", "Euler", "None")
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm-solver": 20, "ode": 50, "sde": 250}


def add_sampler_args(parser):
    """The reverse-process flags of both sampling scripts (which apply depends on the objective)."""
    parser.add_argument("--num-sampling-steps", type=int, default=None,
                        help="steps (default: ddpm 250, ddim 50, dpm-solver 20, ode 50, sde 250)")
    parser.add_argument("--sampler", type=str, choices=DDPM_SAMPLERS, default="ddpm",
                        help="DDPM checkpoints: ddpm (ancestral), ddim (eta 0) or dpm-solver (DPM-Solver++)")
    sit = parser.add_argument_group("flow-matching (SiT) checkpoints")
    sit.add_argument("--mode", type=str, choices=SIT_MODES, default="ode", help="ode or sde sampling")
    sit.add_argument("--sampling-method", type=str, default=None,
                     help="ode: a torchdiffeq method (default dopri5); sde: Euler (default) or Heun")
    sit.add_argument("--atol", type=float, default=1e-6, help="ode: absolute tolerance")
    sit.add_argument("--rtol", type=float, default=1e-3, help="ode: relative tolerance")
    sit.add_argument("--reverse", action="store_true", help="ode: integrate data -> noise (SiT's flag)")
    sit.add_argument("--likelihood", action="store_true", help="ode: also report each sample's NLL (bits/dim)")
    sit.add_argument("--diffusion-form", type=str, choices=DIFFUSION_FORMS, default="sigma",
                     help="sde: the diffusion coefficient w(t)")
    sit.add_argument("--diffusion-norm", type=float, default=1.0, help="sde: scale of w(t)")
    sit.add_argument("--last-step", type=str, choices=LAST_STEPS, default="Mean", help="sde: the last step")
    sit.add_argument("--last-step-size", type=float, default=0.04, help="sde: size of the last step")
    sit.add_argument("--guidance-low", type=float, default=0.0,
                     help="guide only where REPA's time (1 = noise) is >= this (default 0)")
    sit.add_argument("--guidance-high", type=float, default=1.0,
                     help="guide only where REPA's time (1 = noise) is <= this (default 1)")
    return parser


def resolve_sampler_args(args, objective_config):
    """Check the flags against the checkpoint's objective (one line for a wrong combination) and
    fill the step count and ODE/SDE method defaults."""
    sit = objective_config["name"] == "sit"
    if sit:
        if args.sampler != "ddpm":
            raise JobError(f"--sampler {args.sampler} is for DDPM checkpoints; this one was trained with flow "
                           f"matching (sit): use --mode ode or --mode sde")
        method = args.sampling_method or ("dopri5" if args.mode == "ode" else "Euler")
        if args.mode == "sde" and method not in SDE_METHODS:
            raise JobError(f"--sampling-method {method} is not an SDE method: choose one of {', '.join(SDE_METHODS)}")
        if args.mode == "ode" and method in SDE_METHODS:
            raise JobError(f"--sampling-method {method} is an SDE method: add --mode sde, or pick an ODE "
                           f"method (dopri5, euler, heun2, rk4, ...)")
        if args.likelihood and (args.mode != "ode" or args.cfg_scale != 1.0):
            raise JobError("--likelihood needs --mode ode and --cfg-scale 1 (a guided field has no likelihood)")
        args.sampling_method = method
        kind = args.mode
    else:
        sit_flags = [flag for flag, value, default in (
            ("--mode", args.mode, "ode"), ("--sampling-method", args.sampling_method, None),
            ("--likelihood", args.likelihood, False), ("--reverse", args.reverse, False),
            ("--guidance-low", args.guidance_low, 0.0), ("--guidance-high", args.guidance_high, 1.0))
            if value != default]
        if sit_flags:
            raise JobError(f"{sit_flags[0]} is for flow-matching (sit) checkpoints; this one was trained with "
                           f"DDPM: use --sampler ddpm|ddim|dpm-solver")
        kind = args.sampler
    if not 0 <= args.guidance_low <= args.guidance_high <= 1:
        raise JobError(f"the guidance interval needs 0 <= --guidance-low <= --guidance-high <= 1, got "
                       f"{args.guidance_low}, {args.guidance_high}")
    if args.num_sampling_steps is None:
        args.num_sampling_steps = DEFAULT_STEPS[kind]
    if args.num_sampling_steps < 2:
        raise JobError(f"--num-sampling-steps must be >= 2, got {args.num_sampling_steps}")
    if kind == "dpm-solver":
        check_num_steps(args.num_sampling_steps)
    return args


def sampler_name(args, objective_config):
    """'ddpm-250', 'ode-dopri5-50', ...: what sample folders and logs call the reverse process."""
    if objective_config["name"] == "sit":
        return f"{args.mode}-{args.sampling_method}-{args.num_sampling_steps}"
    return f"{args.sampler}-{args.num_sampling_steps}"


def sampler_settings(args, objective_config):
    """Everything of the reverse process that decides a sample's pixels (for sample_ddp's record)."""
    keys = ["num_sampling_steps"]
    if objective_config["name"] == "sit":
        keys += ["mode", "sampling_method", "atol", "rtol", "reverse", "guidance_low", "guidance_high"]
        if args.mode == "sde":
            keys += ["diffusion_form", "diffusion_norm", "last_step", "last_step_size"]
    return {"sampler": sampler_name(args, objective_config), "objective": dict(objective_config),
            **{k: getattr(args, k) for k in keys}}


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
    """Latents from per-index noise: __call__(model_fn, noise, labels, shape, device, progress)."""

    def __init__(self, args, objective_config, in_channels, clip_denoised=False):
        self.args, self.config, self.in_channels = args, objective_config, in_channels
        self.clip_denoised = clip_denoised
        self.nfe, self.last_latents = None, None
        if objective_config["name"] == "sit":
            settings = {k: objective_config.get(k) for k in ("path_type", "prediction", "loss_weight",
                                                              "train_eps", "sample_eps")}
            self.transport_sampler = Sampler(create_transport(**settings))
        elif args.sampler in ("ddpm", "ddim"):
            respacing = f"ddim{args.num_sampling_steps}" if args.sampler == "ddim" else str(args.num_sampling_steps)
            self.diffusion = create_diffusion(respacing, learn_sigma=objective_config.get("learn_sigma", True),
                                              noise_schedule=objective_config.get("noise_schedule", "linear"),
                                              diffusion_steps=objective_config.get("diffusion_steps", 1000))

    @torch.no_grad()
    def __call__(self, model_fn, noise, labels, shape, device, progress=False):
        x = noise.randn(shape, device=device)                                 # x_T / x_0 of SiT: (N, C, H, W)
        y = labels.to(device)
        if self.config["name"] == "sit":
            x = self._sit(model_fn, noise, x, y, device)
        elif self.args.sampler == "dpm-solver":
            betas = dit_betas(self.config.get("noise_schedule", "linear"), self.config.get("diffusion_steps", 1000))
            eps_fn = lambda x_t, t: eps_from_model_output(model_fn(x_t, t, y), self.in_channels)  # noqa: E731
            x = dpm_solver_sample(eps_fn, x, self.args.num_sampling_steps, betas=betas, progress=progress)
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
        for i in tqdm(steps, desc=f"{self.args.sampler} steps", disable=not progress):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=device)
            if self.args.sampler == "ddim":
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
        a, sampler = self.args, self.transport_sampler
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
        a = self.args
        solve = self.transport_sampler.sample_ode_likelihood(sampling_method=a.sampling_method,
                                                             num_steps=a.num_sampling_steps, atol=a.atol, rtol=a.rtol)
        logp, _ = solve(latents, first_channels(model_fn, self.in_channels), y=labels.to(latents.device))
        return -logp / (latents[0].numel() * torch.log(torch.tensor(2.0)))
