"""Training objectives behind one interface, so one training loop trains them all:

    losses = objective.training_losses(model, x, model_kwargs, draws=None)
    losses["loss"]          # (B,) per-sample loss; the loop takes its mean
    objective.config()      # plain dict saved in every checkpoint; create_objective(config) rebuilds it

`draws` optionally fixes the random draws of a batch (timesteps, noise) so a caller can key them
per sample; without it each objective draws exactly as its reference code does, so the same seed
gives the reference's numbers. Samplers read the objective a checkpoint was trained with from its
"objective" entry (older checkpoints, which have none, were trained with DDPM).
"""
import argparse
import math

import torch

from diffusion import create_diffusion
from helpers.utils.cli import JobError
from helpers.utils.seeds import generator
from transport import create_transport

OBJECTIVES = ("ddpm", "sit", "rf")
PATH_TYPES = ("Linear", "GVP", "VP")   # SiT's paths (t = 1 data)
RF_PATH_TYPES = ("linear", "cosine")   # REPA's paths (t = 1 noise)
WEIGHTINGS = ("uniform", "lognormal")  # REPA's time distributions
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = ("velocity", "likelihood")


class DDPM:
    log_terms = ()   # loss terms the trainers log beside the loss (REPA: denoise, proj)

    """DiT's objective: a timestep drawn uniformly per sample, then the 1000-step linear-schedule
    diffusion's loss (MSE on epsilon, plus the VLB term when the model learns sigma)."""

    name = "ddpm"

    def __init__(self, learn_sigma=True, noise_schedule="linear", diffusion_steps=1000):
        self.learn_sigma = bool(learn_sigma)
        self.noise_schedule = noise_schedule
        self.diffusion_steps = int(diffusion_steps)
        self.diffusion = create_diffusion(timestep_respacing="", noise_schedule=noise_schedule,
                                          learn_sigma=self.learn_sigma, diffusion_steps=self.diffusion_steps)

    def training_losses(self, model, x, model_kwargs=None, draws=None, images=None):
        """DiT's training_losses with t ~ U{0..T-1} drawn first (on x's device), then the noise.
        (`images`, the batch's clean images, are for terms that need them: REPA's.)"""
        draws = draws or {}
        t = draws.get("t")
        if t is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return self.diffusion.training_losses(model, x, t, model_kwargs or {}, noise=draws.get("noise"))

    def times(self, u):
        """Timesteps from uniforms in [0, 1): t ~ U{0..T-1}, as randint."""
        return (u * self.diffusion.num_timesteps).long().clamp(max=self.diffusion.num_timesteps - 1)

    def config(self):
        return {"name": self.name, "learn_sigma": self.learn_sigma, "noise_schedule": self.noise_schedule,
                "diffusion_steps": self.diffusion_steps}


class SiT:
    log_terms = ()

    """SiT's flow matching (transport/): x_t = alpha_t x1 + sigma_t x0 with t ~ U[t0, t1] (t = 0
    noise, t = 1 data), the model called with continuous t and regressing the path's velocity
    (or noise, or score). A model with a learned-sigma head has its extra channels dropped, as
    SiT's models do, so DiT-shaped SiT releases load."""

    name = "sit"

    def __init__(self, path_type="Linear", prediction="velocity", loss_weight=None, train_eps=None,
                 sample_eps=None, learn_sigma=False):
        for flag, value, choices in (("--path-type", path_type, PATH_TYPES), ("--prediction", prediction, PREDICTIONS),
                                     ("--loss-weight", loss_weight, (None,) + LOSS_WEIGHTS)):
            if value not in choices:
                raise JobError(f"{flag} {value!r} is not one of {', '.join(map(str, choices))}")
        self.settings = dict(path_type=path_type, prediction=prediction, loss_weight=loss_weight,
                             train_eps=train_eps, sample_eps=sample_eps)
        self.learn_sigma = bool(learn_sigma)
        self.transport = create_transport(**self.settings)

    def training_losses(self, model, x, model_kwargs=None, draws=None, images=None):
        """SiT's training_losses (x0 = randn_like(x1) first, then t) unless `draws` fixes them."""
        draws = draws or {}
        return self.transport.training_losses(first_channels(model, x.shape[1]), x, model_kwargs or {},
                                              noise=draws.get("noise"), t=draws.get("t"))

    def times(self, u):
        """Times from uniforms in [0, 1): t ~ U[t0, t1], SiT's training interval."""
        t0, t1 = self.transport.check_interval(self.transport.train_eps, self.transport.sample_eps)
        return u * (t1 - t0) + t0

    def config(self):
        return {"name": self.name, **self.settings, "learn_sigma": self.learn_sigma}


class RF:
    log_terms = ()

    """REPA's rectified-flow objective (REPA's loss.py SILoss), in REPA's time: t = 1 is NOISE.
    x_t = alpha_t x + sigma_t eps (linear: alpha = 1 - t, sigma = t; cosine: cos / sin of pi t / 2),
    the model called with t in [0, 1] regressing v = d alpha/dt x + d sigma/dt eps (linear: eps - x);
    t ~ U(0, 1) ("uniform") or the log-normal of EDM's sigmas ("lognormal": t = sigmoid(n), n ~ N(0, 1),
    on the linear path). SiT's objective ("sit") is the same family in the opposite convention."""

    name = "rf"

    def __init__(self, path_type="linear", weighting="uniform", learn_sigma=False):
        for flag, value, choices in (("--path-type", path_type, RF_PATH_TYPES), ("--weighting", weighting, WEIGHTINGS)):
            if value not in choices:
                raise JobError(f"{flag} {value!r} is not one of {', '.join(choices)} (objective rf)")
        self.path_type, self.weighting, self.learn_sigma = path_type, weighting, bool(learn_sigma)

    def interpolant(self, t):
        """(alpha_t, sigma_t, d alpha_t, d sigma_t) of REPA's path at time t (tensor)."""
        if self.path_type == "linear":
            return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
        half_pi = math.pi / 2
        return (torch.cos(half_pi * t), torch.sin(half_pi * t), -half_pi * torch.sin(half_pi * t),
                half_pi * torch.cos(half_pi * t))

    def times(self, u):
        """Times from uniforms in [0, 1): uniform, or log-normal through the normal quantile of u."""
        if self.weighting == "uniform":
            return u
        sigma = torch.exp(math.sqrt(2.0) * torch.erfinv(2 * u.double().clamp(1e-12, 1 - 1e-12) - 1)).to(u.dtype)
        return sigma / (1 + sigma) if self.path_type == "linear" else 2 / math.pi * torch.atan(sigma)

    def draw_times(self, n):
        """REPA's own draw (default generator, on the CPU, before the noise)."""
        if self.weighting == "uniform":
            return torch.rand((n, 1, 1, 1)).flatten()
        sigma = torch.randn((n, 1, 1, 1)).exp().flatten()
        return sigma / (1 + sigma) if self.path_type == "linear" else 2 / math.pi * torch.atan(sigma)

    def training_losses(self, model, x, model_kwargs=None, draws=None, images=None):
        """REPA's denoising loss per sample: t drawn first, then eps = randn_like(x), unless `draws`
        fixes them. Returns {"loss": (B,), "pred": model output}."""
        draws = draws or {}
        t = draws.get("t")
        t = (self.draw_times(x.shape[0]) if t is None else t).to(device=x.device, dtype=x.dtype)
        noise = draws.get("noise")
        noise = torch.randn_like(x) if noise is None else noise
        alpha, sigma, d_alpha, d_sigma = (c.view(-1, *([1] * (x.ndim - 1))) for c in self.interpolant(t))
        x_t = alpha * x + sigma * noise
        target = d_alpha * x + d_sigma * noise
        pred = first_channels(model, x.shape[1])(x_t, t, **(model_kwargs or {}))
        return {"loss": ((pred - target) ** 2).mean(dim=list(range(1, x.ndim))), "pred": pred}

    def config(self):
        return {"name": self.name, "path_type": self.path_type, "weighting": self.weighting,
                "learn_sigma": self.learn_sigma}


def per_sample_draws(objective, x, indices, seed, step, class_dropout_prob):
    """Each sample's random draws from generator(seed, step, its dataset index), in this order: its
    noise, a uniform for its time, a uniform for its label dropout. They do not depend on the batch,
    the process count or gradient accumulation, so every layout makes the same update.
    Returns (draws for training_losses, force_drop_ids for the model or None)."""
    gens = [generator(seed, step, int(i)) for i in indices]
    noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])
    u = torch.stack([torch.rand((), generator=g) for g in gens])
    drop = torch.stack([torch.rand((), generator=g) for g in gens]) < class_dropout_prob
    draws = {"noise": noise.to(x.device, x.dtype), "t": objective.times(u).to(x.device)}
    return draws, (drop.long().to(x.device) if class_dropout_prob > 0 else None)


def first_channels(model, channels):
    """model, its output cut to the first `channels` channels (a learned-sigma head's other half dropped)."""
    def forward(x, t, **kwargs):
        return model(x, t, **kwargs)[:, :channels]
    return forward


def create_objective(config):
    """The objective a checkpoint's "objective" dict (or a trainer's flags) describes."""
    config = dict(config or {"name": "ddpm"})
    name = config.pop("name", "ddpm")
    config.pop("repa", None)   # REPA's training term: nothing a sampler or a rebuilt objective needs
    if name == "ddpm":
        return DDPM(**config)
    if name == "sit":
        return SiT(**config)
    if name == "rf":
        return RF(**config)
    raise JobError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")


def objective_of_checkpoint(checkpoint):
    """The objective config a checkpoint records (or its exported metadata); None if it has none
    (official DiT/DiC files and this project's format 1: all DDPM)."""
    if not isinstance(checkpoint, dict):
        return None
    metadata = checkpoint.get("metadata")
    config = metadata.get("objective") if isinstance(metadata, dict) else checkpoint.get("objective")
    return dict(config) if isinstance(config, dict) and "name" in config else None


def add_objective_args(parser, sampling=False):
    """The objective flags: the trainers' (defaults: DDPM, SiT's transport defaults), or the samplers'
    (all unset: taken from the checkpoint; for files that do not record their objective)."""
    group = parser.add_argument_group("objective" + (" (default: the checkpoint's)" if sampling else ""))
    group.add_argument("--objective", type=str, default=None if sampling else "ddpm", choices=OBJECTIVES,
                       help="ddpm: DiT's diffusion; sit: SiT's flow matching (transport/, t = 1 data); "
                            "rf: REPA's rectified flow (t = 1 noise)")
    group.add_argument("--path-type", type=str, default=None, choices=PATH_TYPES + RF_PATH_TYPES,
                       help="the interpolant path: sit Linear (default), GVP, VP; rf linear (default), cosine")
    group.add_argument("--weighting", type=str, default=None, choices=WEIGHTINGS,
                       help="rf: the time distribution, uniform (default) or lognormal")
    group.add_argument("--prediction", type=str, default=None if sampling else "velocity", choices=PREDICTIONS,
                       help="sit: what the model predicts")
    group.add_argument("--loss-weight", type=str, default=None, choices=LOSS_WEIGHTS,
                       help="sit: loss weight for noise/score prediction (default none)")
    group.add_argument("--train-eps", type=float, default=None, help="sit: training time interval margin")
    group.add_argument("--sample-eps", type=float, default=None, help="sit: sampling time interval margin")
    group.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=None,
                       help="model head with learned-sigma channels (default: on for ddpm, off for sit)")
    return group


OBJECTIVE_FLAGS = ("objective", "path_type", "prediction", "loss_weight", "train_eps", "sample_eps", "learn_sigma",
                   "weighting")


def objective_from_args(args, base=None):
    """objective_config of the objective flags in `args` (the samplers' parsed flags)."""
    return objective_config(**{key: getattr(args, key) for key in OBJECTIVE_FLAGS}, base=base)


def objective_config(objective=None, path_type=None, prediction=None, loss_weight=None, train_eps=None,
                     sample_eps=None, learn_sigma=None, weighting=None, base=None):
    """The objective config the flags' values ask for; values left unset (None) keep `base`'s (a
    checkpoint's config) or the defaults."""
    base = {k: v for k, v in (base or {}).items() if k != "repa"}
    name = objective or base.get("name", "ddpm")
    if name != base.get("name", name):
        base = {}   # another objective than the checkpoint's: its settings do not carry over
    config = {"name": name}
    learn_sigma = learn_sigma if learn_sigma is not None else base.get("learn_sigma", name == "ddpm")
    flow = dict(path_type=path_type, prediction=prediction, loss_weight=loss_weight, train_eps=train_eps,
                sample_eps=sample_eps)
    if weighting is not None and name != "rf":
        raise JobError("--weighting is REPA's time distribution: add --objective rf")
    if name == "rf":
        sit_only = [f"--{k.replace('_', '-')}" for k in ("prediction", "loss_weight", "train_eps", "sample_eps")
                    if flow[k] is not None and flow[k] != {"prediction": "velocity"}.get(k)]
        if sit_only:
            raise JobError(f"{sit_only[0]} is a setting of SiT's objective; REPA's rf predicts the velocity "
                           f"on t in [0, 1]: drop it, or use --objective sit")
        config["path_type"] = path_type or base.get("path_type", "linear")
        config["weighting"] = weighting or base.get("weighting", "uniform")
    elif name == "sit":
        for key, value in flow.items():
            config[key] = value if value is not None else base.get(key, {"path_type": "Linear",
                                                                         "prediction": "velocity"}.get(key))
    elif any(flow[key] is not None and flow[key] != default for key, default in
             (("path_type", "Linear"), ("prediction", "velocity"), ("loss_weight", None), ("train_eps", None),
              ("sample_eps", None))):
        raise JobError("--path-type, --prediction, --loss-weight, --train-eps and --sample-eps are flow-matching "
                       "settings: add --objective sit")
    config["learn_sigma"] = bool(learn_sigma)
    create_objective(config)   # checks the values
    return config
