"""Training objectives behind one interface, so one training loop trains them all:

    losses = objective.training_losses(model, x, model_kwargs, draws=None)
    losses["loss"]          # (B,) per-sample loss; the loop takes its mean
    objective.config()      # plain dict saved in every checkpoint; create_objective(config) rebuilds it

`draws` optionally fixes the random draws of a batch (timesteps, noise) so a caller can key them
per sample; without it each objective draws exactly as its reference code does, so the same seed
gives the reference's numbers. Samplers read the objective a checkpoint was trained with from its
"objective" entry (older checkpoints, which have none, were trained with DDPM).
"""
import torch

from diffusion import create_diffusion
from helpers.cli import JobError

OBJECTIVES = ("ddpm",)


class DDPM:
    """DiT's objective: a timestep drawn uniformly per sample, then the 1000-step linear-schedule
    diffusion's loss (MSE on epsilon, plus the VLB term when the model learns sigma)."""

    name = "ddpm"

    def __init__(self, learn_sigma=True, noise_schedule="linear", diffusion_steps=1000):
        self.learn_sigma = bool(learn_sigma)
        self.noise_schedule = noise_schedule
        self.diffusion_steps = int(diffusion_steps)
        self.diffusion = create_diffusion(timestep_respacing="", noise_schedule=noise_schedule,
                                          learn_sigma=self.learn_sigma, diffusion_steps=self.diffusion_steps)

    def training_losses(self, model, x, model_kwargs=None, draws=None):
        """DiT's training_losses with t ~ U{0..T-1} drawn first (on x's device), then the noise."""
        draws = draws or {}
        t = draws.get("t")
        if t is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device)
        return self.diffusion.training_losses(model, x, t, model_kwargs or {}, noise=draws.get("noise"))

    def config(self):
        return {"name": self.name, "learn_sigma": self.learn_sigma, "noise_schedule": self.noise_schedule,
                "diffusion_steps": self.diffusion_steps}


def create_objective(config):
    """The objective a checkpoint's "objective" dict (or a trainer's flags) describes."""
    config = dict(config or {"name": "ddpm"})
    name = config.pop("name", "ddpm")
    if name == "ddpm":
        return DDPM(**config)
    raise JobError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")


def objective_of_checkpoint(checkpoint, learn_sigma=True):
    """The objective config a checkpoint records; DDPM (DiT's) for checkpoints without one."""
    config = checkpoint.get("objective") if isinstance(checkpoint, dict) else None
    if isinstance(config, dict) and "name" in config:
        return dict(config)
    metadata = checkpoint.get("metadata") if isinstance(checkpoint, dict) else None
    if isinstance(metadata, dict) and isinstance(metadata.get("objective"), dict):
        return dict(metadata["objective"])
    return DDPM(learn_sigma=learn_sigma).config()


def add_objective_args(parser):
    """The trainers' objective flags (more objectives add theirs here, not in the loop)."""
    group = parser.add_argument_group("objective")
    group.add_argument("--objective", type=str, default="ddpm", choices=OBJECTIVES,
                       help="ddpm: DiT's 1000-step diffusion with learned sigma (default)")
    return group


def objective_from_args(args, learn_sigma):
    """The objective the trainer's flags ask for."""
    if args.objective == "ddpm":
        return DDPM(learn_sigma=learn_sigma)
    raise JobError(f"unknown --objective {args.objective!r}: choose one of {', '.join(OBJECTIVES)}")
