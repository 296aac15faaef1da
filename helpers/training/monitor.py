"""What a run shows while it trains: sample grids from the EMA (--sample-every), FID against a
reference batch (--fid-every) and TensorBoard / W&B curves (--tensorboard, --wandb).

Grids use fixed noise and fixed classes (the same every time, so grids compare across steps, and a
resumed run writes the same grid at step N as an uninterrupted one); FID samples are drawn over all
processes with per-index seeds, as sample_ddp.py does, and scored with evaluate.py's code. Both use
the run's own reverse process with --sample-steps: DPM-Solver++ for DDPM runs, SiT's Heun ODE for
flow matching.
"""
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from helpers.utils.cli import JobError
from helpers.utils.distributed import gather_objects
from helpers.evaluation.inception import load_extractor
from helpers.evaluation.metrics import compute_statistics, frechet_distance
from helpers.evaluation.npz_files import read_npz_statistics
from helpers.utils.files import atomic_write
from helpers.sampling.samplers import SamplerSettings
from helpers.sampling.generation import generate, make_sampling, to_uint8_rgb
from helpers.sampling.noise import IndexNoise, draw_labels
from helpers.utils.seeds import derive_seed
from helpers.training.tracking import Tracker

GRID_SEED_TAG = 1    # grid noise: IndexNoise(derive_seed(global seed, tag), index), apart from FID's
FID_SEED_TAG = 2


def add_monitor_args(parser):
    """The trainers' flags for live samples, FID and tracking (all off by default)."""
    g = parser.add_argument_group("progress: live samples, FID, tracking")
    g.add_argument("--sample-every", type=int, default=None, help="write an EMA sample grid every N steps")
    g.add_argument("--sample-steps", type=int, default=25, help="reverse-process steps of live samples and FID")
    g.add_argument("--sample-count", type=int, default=16, help="images in a live sample grid")
    g.add_argument("--sample-cfg-scale", type=float, default=1.0, help="guidance of live samples and FID")
    g.add_argument("--fid-every", type=int, default=None, help="compute FID every N steps")
    g.add_argument("--fid-ref", type=str, default=None, help="reference batch .npz (images, or ADM's statistics)")
    g.add_argument("--fid-samples", type=int, default=5000, help="samples per FID")
    g.add_argument("--fid-batch-size", type=int, default=32, help="samples per process and batch for FID")
    g.add_argument("--inception-weights", type=str, default=None, help="local torch-fidelity Inception weights")
    g.add_argument("--tensorboard", action="store_true", help="TensorBoard event files in <run>/tensorboard")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb-project", type=str, default=None)
    g.add_argument("--wandb-entity", type=str, default=None)
    return g


@dataclass(frozen=True)
class MonitorConfig:
    """What a run shows while it trains, from the trainers' flags of the same names (flags.monitor_config)."""
    global_seed: int
    image_size: int
    num_classes: int
    sample_every: Optional[int]     # a grid every N steps (None: no grids)
    sample_steps: int
    sample_count: int
    sample_cfg_scale: float
    fid_every: Optional[int]        # FID every N steps (None: no FID)
    fid_ref: Optional[str]
    fid_samples: int
    fid_batch_size: int
    inception_weights: Optional[str]
    tensorboard: bool
    wandb: bool
    wandb_project: Optional[str]
    wandb_entity: Optional[str]

    def check(self):
        """Errors at start-up, not at step N: counts, and the FID reference and weights files."""
        for flag, value in (("--sample-every", self.sample_every), ("--fid-every", self.fid_every),
                            ("--sample-steps", self.sample_steps), ("--sample-count", self.sample_count),
                            ("--fid-samples", self.fid_samples), ("--fid-batch-size", self.fid_batch_size)):
            if value is not None and value < 1:
                raise JobError(f"{flag} must be >= 1, got {value}")
        if self.sample_cfg_scale < 1:
            raise JobError(f"--sample-cfg-scale must be >= 1 (1 = no guidance), got {self.sample_cfg_scale}")
        if self.fid_every:
            if not self.fid_ref or not os.path.isfile(self.fid_ref):
                raise JobError(f"--fid-every needs --fid-ref REF.npz (a reference batch, e.g. ADM's "
                               f"VIRTUAL_imagenet256_labeled.npz or evaluate.py --make-ref): {self.fid_ref} is not a file")
            if self.inception_weights and not os.path.isfile(self.inception_weights):
                raise JobError(f"--inception-weights {self.inception_weights} is not a file: pass torch-fidelity's "
                               f"weights-inception-2015-12-05 .pth")


def monitor_settings(objective_config, steps, cfg_scale):
    """The live samples' reverse process at `steps` steps: DPM-Solver++ for DDPM, a Heun ODE for flow
    matching (SiT's heun2; REPA's Heun for rf), guided as each objective's authors guide (rf: REPA's
    all channels; else DiT's first 3)."""
    return SamplerSettings(cfg_scale=cfg_scale, guide_channels="all" if objective_config["name"] == "rf" else "official",
                           sampler="dpm-solver", num_sampling_steps=steps, mode="ode", sampling_method="heun2",
                           atol=1e-6, rtol=1e-3, reverse=False)


class Monitor:
    """Live grids, FID and tracking of one run (`config` a MonitorConfig; `flags`, the run's flags,
    are the trackers' config); every process calls it, rank 0 writes."""

    def __init__(self, config, run, progress_step, resumed, flags=None):
        self.config, self.run = config, run
        self.sampler_settings = monitor_settings(run.objective.config(), config.sample_steps, config.sample_cfg_scale)
        self.extractor, self.ref_stats = None, None
        self.tracker = Tracker(run.run_dir, tensorboard=config.tensorboard, wandb=config.wandb,
                               wandb_project=config.wandb_project, wandb_entity=config.wandb_entity,
                               config=flags, resume_step=progress_step if resumed else None,
                               enabled=run.is_main and (config.tensorboard or config.wandb))

    def _images(self, noise, labels):
        """uint8 (N, H, W, 3) images of the EMA for `noise`'s rows."""
        run = self.run
        model_fn, sampler = make_sampling(run.ema, run.vae, run.objective.config(), self.sampler_settings, speed={})
        return to_uint8_rgb(generate(run.ema, run.vae, sampler, model_fn, noise, labels,
                                     self.config.image_size, run.device))

    @torch.no_grad()
    def grid(self, step):
        """Rank 0: <run>/samples/<step:07d>.png, the same noise and classes every time; returns the grid."""
        from torchvision.utils import make_grid   # here, not at the top: torchvision costs every process ~1 s to import
        config, run = self.config, self.run
        noise = IndexNoise(derive_seed(config.global_seed, GRID_SEED_TAG), range(config.sample_count))
        labels = torch.arange(config.sample_count) % config.num_classes
        images = torch.from_numpy(self._images(noise, labels)).permute(0, 3, 1, 2)
        grid = make_grid(images, nrow=int(np.ceil(np.sqrt(config.sample_count))), padding=2).permute(1, 2, 0).numpy()
        path = os.path.join(run.run_dir, "samples", f"{step:07d}.png")
        from PIL import Image
        atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"), overwrite=True)
        run.log.info(f"Saved EMA samples to {path}")
        self.tracker.log_image(step, "samples", grid)
        return grid

    @torch.no_grad()
    def fid_images(self):
        """This process's FID samples: (indices, uint8 images); image i from seed (global seed, i)."""
        config, run = self.config, self.run
        seed = derive_seed(config.global_seed, FID_SEED_TAG)
        b, out_indices, out_images = config.fid_batch_size, [], []
        for start in range(run.rank * b, config.fid_samples, run.world_size * b):
            indices = list(range(start, min(start + b, config.fid_samples)))
            noise = IndexNoise(seed, indices, pad_to=b)
            images = self._images(noise, draw_labels(noise, config.num_classes))[:len(indices)]
            out_indices += indices
            out_images.append(images)
        return out_indices, (np.concatenate(out_images) if out_images else None)

    @torch.no_grad()
    def fid(self, step):
        """FID of --fid-samples EMA samples against --fid-ref (every process samples; rank 0 scores)."""
        run = self.run
        if self.extractor is None:
            self.extractor = load_extractor(self.config.inception_weights, run.device)
        indices, images = self.fid_images()
        pool = self.extractor(images)["pool"] if images is not None else None
        gathered = gather_objects((indices, pool))
        if not run.is_main:
            return None
        order = np.argsort(np.concatenate([i for i, p in gathered if p is not None]))
        features = np.concatenate([p for _, p in gathered if p is not None])[order]
        value = fid_against(features, self.reference_stats())
        run.log.info(f"(step={step:07d}) FID-{self.config.fid_samples}: {value:.4f}")
        self.tracker.log_scalars(step, {"fid": value})
        return value

    def reference_stats(self):
        """(mu, sigma) of --fid-ref: its precomputed statistics, else those of its images (once)."""
        if self.ref_stats is None:
            saved = read_npz_statistics(self.config.fid_ref, "reference batch")
            if saved is not None:
                self.ref_stats = saved[0]
            else:
                with np.load(self.config.fid_ref) as ref:
                    images = ref["arr_0"]
                pools = [self.extractor(images[i:i + 64])["pool"] for i in range(0, len(images), 64)]
                self.ref_stats = compute_statistics(np.concatenate(pools))
        return self.ref_stats

    def after_step(self, step, scalars=None):
        """Called by every process after each optimizer step: scalars (rank 0), grids, FID."""
        config = self.config
        if scalars:
            self.tracker.log_scalars(step, scalars)
        if config.sample_every and step % config.sample_every == 0 and self.run.is_main:
            self.grid(step)
        if config.fid_every and step % config.fid_every == 0:
            self.fid(step)

    def close(self):
        self.tracker.close()


def fid_against(features, ref_stats):
    """Fréchet distance of pool features to reference (mu, sigma), as evaluate.py computes it."""
    mu, sigma = compute_statistics(features)
    return float(frechet_distance(mu, sigma, *ref_stats))
