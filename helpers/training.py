"""What train.py and train_accelerate.py share, so the two scripts differ only in how they wrap the
model and run one optimisation step.

    args = parse_args(build_parser("..."))
    run = prepare(args, dist_info)        # validate every input, build data/model/EMA/optimizer,
                                          # restore a resumed run; only then create the run folder
    ... wrap run.model (DDP or accelerate), define train_step(x, y) -> loss ...
    train(run, train_step)                # the loop: data order, logging, checkpoints, NaN stop

Training never loses a run:
- checkpoints are written atomically and never overwritten;
- `--resume` continues bit-for-bit: the checkpoint holds the step, the data position (epoch and
  batch within it), the torch/NumPy/Python RNG states of every process, optimizer, EMA and
  GradScaler, and the running loss window;
- the data order comes from (global seed, epoch) alone, and each sample's random augmentation
  from (global seed, epoch, sample index) alone, so neither depends on where a run was stopped
  nor on the number of DataLoader workers;
- a NaN/inf loss stops every process at once, before anything is saved.
"""
import argparse
import json
import math
import os
import random
import re
import sys
from contextlib import contextmanager
from copy import deepcopy

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from diffusion import create_diffusion
from helpers import fastpath
from helpers.checkpoint import atomic_save, extract_state_dict, load_checkpoint_file, load_model_weights
from helpers.distributed import barrier, broadcast_object, gather_objects, is_distributed, seed_everything
from helpers.images import BUILTIN_DATASETS, ImageFolderDataset, builtin_dataset, collate_skip_none
from helpers.latents import LatentFeatureDataset
from helpers.log import LossFile, RunLogger, ThroughputMeter
from helpers.models import create_model, is_dit, model_names, parse_args_with_overrides
from helpers.vae import downsample_factor_of_spec, encode, latent_channels, load_vae

CHECKPOINT_FORMAT = "dic-train-1"
RESUME_KEYS = ("model", "ema", "opt", "args", "step", "epoch", "batch_in_epoch", "rng")
CKPT_NAME = re.compile(r"^(\d{7,})\.pt$")
RUN_NAME = re.compile(r"^(\d+)-(.+)$")


class TrainingError(Exception):
    """A problem the user must fix; printed as one line (no traceback), exit code `code`."""

    def __init__(self, message, code=2):
        super().__init__(_one_line(message, default="error"))
        self.code = code


def _one_line(message, default=None):
    """The first line of a message or exception (`default`, else the exception's type, if empty)."""
    text = str(message).strip()
    return text.splitlines()[0] if text else (default or type(message).__name__)


#################################################################################
#                                   Arguments                                   #
#################################################################################

def build_parser(description):
    """The command line of both trainers (DiT/DiC-compatible names and defaults)."""
    p = argparse.ArgumentParser(description=description,
                                epilog="Model constructor overrides: --network_g__<keyword>=<value> "
                                       "(e.g. --network_g__skip_stride=1), as in the official DiC script.")
    data = p.add_argument_group("data (exactly one of --data-path, --feature-path, --dataset)")
    data.add_argument("--data-path", type=str, default=None,
                      help="ImageNet-style class folders, encoded on the fly by the VAE (or raw with --vae none)")
    data.add_argument("--feature-path", type=str, default=None,
                      help="precomputed latents (<prefix>_features/ + <prefix>_labels/, any count)")
    data.add_argument("--dataset", type=str, default=None, choices=sorted(BUILTIN_DATASETS),
                      help="a built-in pixel-space dataset (no download); sets --vae none, "
                           "--image-size 16 and its class count unless given")
    data.add_argument("--image-size", type=int, default=None, help="pixels (default 256; 16 for --dataset)")
    data.add_argument("--num-classes", type=int, default=None, help="default 1000 (the dataset's for --dataset)")
    data.add_argument("--vae", type=str, default=None,
                      help="ema | mse (stabilityai/sd-vae-ft-*), a local AutoencoderKL folder, or none "
                           "(pixel space); default ema (none for --dataset)")
    data.add_argument("--num-workers", type=int, default=None,
                      help="DataLoader workers per process (default 4; 0 for in-memory --dataset)")

    model = p.add_argument_group("model and optimisation")
    model.add_argument("--model", type=str, default="DiC-XL", help=f"one of {', '.join(model_names())}")
    model.add_argument("--global-batch-size", type=int, default=256)
    model.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (weight decay 0)")
    model.add_argument("--precision", type=str, default="tf32", choices=list(fastpath.PRECISIONS),
                       help="tf32 (official: TF32 matmuls on GPU), fp32 (strict), bf16 (autocast; "
                            "changes the numbers, opt-in)")
    model.add_argument("--grad-clip", action="store_true", help="clip the gradient norm (off, as official)")
    model.add_argument("--max-grad-norm", type=float, default=None,
                       help="norm for --grad-clip (default 1.0; giving it turns clipping on)")
    model.add_argument("--ema-decay", type=float, default=0.9999,
                       help="EMA decay per step (0.9999, official; shorter runs want less, e.g. 0.999)")
    model.add_argument("--global-seed", type=int, default=0)

    fast = p.add_argument_group("fast path (helpers/fastpath.py; bench/README.md has the timings)")
    fast.add_argument("--fused-adamw", type=str, default="auto", choices=["auto", "on", "off"],
                      help="AdamW kernel: auto = fused where torch has it for the device (CUDA, and CPU "
                           "since torch 2.4), else foreach/for-loop; same math as torch's default AdamW "
                           "up to float rounding (default auto)")
    fast.add_argument("--channels-last", type=str, default="auto", choices=["auto", "on", "off"],
                      help="NHWC weights and batches: same math up to float rounding; auto = off "
                           "(slower for DiC on CPU, unmeasured on CUDA; default auto)")
    fast.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                      help="torch.compile the training forward (minutes of compilation; reorders float "
                           "operations; default off). Checkpoints stay plain state_dicts")

    run = p.add_argument_group("run length, checkpoints and logging")
    run.add_argument("--results-dir", type=str, default="results")
    run.add_argument("--epochs", type=int, default=1400)
    run.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    run.add_argument("--log-every", type=int, default=100)
    run.add_argument("--ckpt-every", type=int, default=50_000)
    run.add_argument("--ckpt", type=str, default=None,
                     help="initialise the weights (model and EMA) from a checkpoint; a new run from step 0")
    run.add_argument("--resume", type=str, default=None,
                     help="continue a run exactly: a checkpoint .pt, a run folder, or 'auto' (newest "
                          "checkpoint of the newest run; a new run if there is none). Continues in the "
                          "same run folder; options not given are taken from the checkpoint")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    # Test hooks, not for users.
    run.add_argument("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--debug-log-samples", action="store_true", help=argparse.SUPPRESS)
    return p


_UNSET = object()


def parse_args(parser, argv=None):
    """Parse known flags plus `--network_g__key=value` overrides; remember which flags were given."""
    args, overrides = parse_args_with_overrides(parser, argv)
    args.model_overrides = overrides
    probe = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    probe, _ = parser.parse_known_args(argv, namespace=probe)
    args.explicit = sorted(k for k, v in vars(probe).items() if v is not _UNSET)
    if args.model_overrides:
        args.explicit.append("model_overrides")
    return args


def resolve_args(args, world_size):
    """Fill dataset-dependent defaults and check every flag on its own (no file is touched)."""
    sources = [name for name, value in (("--data-path", args.data_path), ("--feature-path", args.feature_path),
                                        ("--dataset", args.dataset)) if value]
    if len(sources) != 1:
        raise TrainingError(f"pass exactly one data source, got {', '.join(sources) or 'none'}: "
                            f"--data-path <class folders>, --feature-path <latents> or --dataset "
                            f"{'|'.join(sorted(BUILTIN_DATASETS))}")
    if args.dataset:
        channels, _, classes = BUILTIN_DATASETS[args.dataset]
        if args.vae is None:
            args.vae = "none"
        if str(args.vae).lower() != "none":
            raise TrainingError(f"--dataset {args.dataset} is {channels}-channel pixel data: drop "
                                f"--vae {args.vae} (built-in datasets train in pixel space)")
        args.image_size = 16 if args.image_size is None else args.image_size
        args.num_classes = classes if args.num_classes is None else args.num_classes
        args.num_workers = 0 if args.num_workers is None else args.num_workers  # data is in memory
    args.num_workers = 4 if args.num_workers is None else args.num_workers
    args.vae = "ema" if args.vae is None else ("none" if str(args.vae).lower() == "none" else args.vae)
    args.image_size = 256 if args.image_size is None else args.image_size
    args.num_classes = 1000 if args.num_classes is None else args.num_classes
    if args.model not in model_names():
        raise TrainingError(f"unknown model {args.model!r}: choose one of {', '.join(model_names())}")
    for flag, value, low in (("--image-size", args.image_size, 1), ("--num-classes", args.num_classes, 1),
                             ("--global-batch-size", args.global_batch_size, 1), ("--epochs", args.epochs, 1),
                             ("--log-every", args.log_every, 1), ("--ckpt-every", args.ckpt_every, 1),
                             ("--num-workers", args.num_workers, 0), ("--max-steps", args.max_steps, 1)):
        if value is not None and value < low:
            raise TrainingError(f"{flag} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise TrainingError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.ema_decay < 1:
        raise TrainingError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.global_batch_size % world_size:
        raise TrainingError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                            f"{world_size} processes: use a multiple of {world_size}")
    if args.max_grad_norm is not None:
        args.grad_clip = True
    if args.grad_clip and args.max_grad_norm is None:
        args.max_grad_norm = 1.0
    if args.grad_clip and not args.max_grad_norm > 0:
        raise TrainingError(f"--max-grad-norm must be positive, got {args.max_grad_norm}")
    if args.resume and args.ckpt:
        raise TrainingError("--resume and --ckpt do not mix: --resume continues a run (weights, "
                            "optimizer, data position), --ckpt starts a new run from weights")
    return args


#################################################################################
#                                Data and order                                 #
#################################################################################

_MASK64 = (1 << 64) - 1


def _mix64(x):
    """splitmix64 finaliser: a well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts):
    """A 63-bit seed from integers (e.g. global seed, epoch, sample index)."""
    h = 0
    for part in parts:
        h = _mix64(h ^ (int(part) & _MASK64))
    return h >> 1


@contextmanager
def isolated_rng(seed):
    """Run a block with torch/NumPy/Python RNGs seeded from `seed`, then put the old states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2 ** 32))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededSamples(Dataset):
    """Wraps a dataset so item i of epoch e draws its augmentation (e.g. the random flip) from a
    seed of (global seed, e, i), and returns `(x, y, i)` (None for a corrupt image).

    The random flips are then the same whichever process or DataLoader worker reads the sample
    and wherever a run was resumed, which is what makes resuming with workers exact.
    """

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
        x, y = item
        return x, y, index


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler's shuffle (randperm seeded with seed + epoch, rank r takes every
    world_size-th index) that can start part-way into an epoch, for exact resume.

    Every epoch uses the first floor(N / global_batch) * global_batch indices of the permutation
    (the full batches; DiT's loader drops the last partial one too), so each sample is seen at
    most once per epoch and every process gets the same number of batches. DiT's sampler instead
    pads by repeating a few samples when N is not divisible by the number of processes.
    `set_epoch(epoch, start)` skips the first `start` indices of the epoch's global order, i.e.
    start = batches done * global batch; skipping globally then striding is the same as each
    process skipping its own batches, and stays right if the number of processes changes.
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


def build_dataset(args, vae_factor):
    """(dataset, in_channels, model input side) for the chosen source; one-line errors for bad data."""
    side = args.image_size // vae_factor
    if args.feature_path:
        dataset = LatentFeatureDataset(args.feature_path)
        c, h, w = dataset.latent_shape
        if h != w or h != side or args.image_size % vae_factor:
            raise TrainingError(
                f"latents in {args.feature_path} are {c}x{h}x{w} but --image-size {args.image_size} with "
                f"--vae {args.vae} (factor {vae_factor}) needs {c}x{side}x{side}: pass --image-size "
                f"{h * vae_factor} (or the --vae the latents were made with)")
        # Reads every label. All processes do it at once (none waits in a collective meanwhile).
        if dataset.num_classes_seen > args.num_classes:
            raise TrainingError(f"latents in {args.feature_path} have label {dataset.num_classes_seen - 1} "
                                f">= --num-classes {args.num_classes}: pass --num-classes "
                                f"{dataset.num_classes_seen} or more")
        return dataset, c, side
    if args.image_size % vae_factor:
        raise TrainingError(f"--image-size {args.image_size} is not divisible by the VAE's factor "
                            f"{vae_factor}: use a multiple of {vae_factor}")
    if args.dataset:
        dataset = builtin_dataset(args.dataset, "train", args.image_size)
        channels, found = BUILTIN_DATASETS[args.dataset][0], dataset.num_classes
    else:
        dataset = ImageFolderDataset(args.data_path, args.image_size, random_flip=True, channels=3)
        channels, found = 3, dataset.num_classes
    if found > args.num_classes:
        raise TrainingError(f"{args.data_path or 'built-in ' + args.dataset} has {found} classes (labels up to {found - 1}) "
                            f">= --num-classes {args.num_classes}: pass --num-classes {found} or more")
    return dataset, channels, side


def _check_model_size(model, args, side, vae_factor):
    """DiC halves the resolution (levels - 1) times: the model input side must divide by that."""
    factor = getattr(model, "downsample_factor", 1)
    if side % factor:
        step = vae_factor * factor
        raise TrainingError(
            f"--image-size {args.image_size} gives a {side}x{side} model input (VAE factor {vae_factor}) "
            f"that {args.model} cannot take: it downsamples by {factor}, so use an image size divisible "
            f"by {step} (e.g. {max(step, args.image_size // step * step)})")


#################################################################################
#                              Fast path, RNG state                             #
#################################################################################

def training_forward(model, run, autocast=True):
    """The network as the diffusion loss calls it: `model` (plain, DDP or accelerate-prepared),
    torch.compile'd with --compile (unless already compiled), under bf16 autocast with --precision
    bf16 if `autocast` (output in fp32), its input x_t in channels_last with --channels-last on.

    Only this forward is compiled: run.model stays the plain module, so EMA updates and
    checkpoints see clean parameter names (no `_orig_mod.` / `module.` prefixes).
    The batch itself stays NCHW: the diffusion draws its noise with randn_like(x_start), which
    fills a channels_last tensor in memory order, i.e. other noise for the same seed; converting
    x_t here keeps the noise, and so the run, the same in both layouts.
    """
    if run.args.compile and not hasattr(model, "_orig_mod"):
        model = fastpath.maybe_compile(model, True)
    if autocast:
        model = fastpath.autocast_forward(model, run.device, run.args.precision)
    if not run.channels_last:
        return model

    def forward(x, *args, **kwargs):
        return model(fastpath.channels_last_input(x), *args, **kwargs)
    return forward


def diffusion_loss(run, forward, x, y):
    """DiT's training loss of one batch: timesteps drawn uniformly per sample, the diffusion's loss
    (MSE + VLB with learned sigma) of `forward` averaged over the batch."""
    t = torch.randint(0, run.diffusion.num_timesteps, (x.shape[0],), device=run.device)
    return run.diffusion.training_losses(forward, x, t, dict(y=y))["loss"].mean()


def log_fast_path(run, compiled, accelerate_precision=None):
    """One line naming the active fast-path options (and remember them for the checkpoints).

    accelerate_precision: accelerate's mixed precision ("bf16", "fp16"; None or "no": none), which
    then is the precision the forward runs in.
    """
    accelerated = accelerate_precision not in (None, "no")
    precision = accelerate_precision if accelerated else run.args.precision
    run.fast_path = dict(precision=precision, adamw=fastpath.optimizer_implementation(run.opt),
                         ema="foreach", channels_last=run.channels_last, compile=bool(compiled))
    label = precision + (" (accelerate)" if accelerated else "")
    if precision == "tf32" and run.device.type != "cuda":
        label = f"tf32 (plain fp32 on {run.device.type})"
    run.log.info(fastpath.describe(label, run.fast_path["adamw"], run.channels_last, compiled, ema="foreach"))


def capture_rng_state(device):
    """This process's torch (CPU and its GPU), NumPy and Python RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


#################################################################################
#                        Run folders and checkpoint files                       #
#################################################################################

def model_tag(model_name):
    return model_name.replace("/", "-")   # DiT-XL/2 -> DiT-XL-2, as DiT names its folders


def list_checkpoints(run_dir):
    """[(step, path)] of a run's checkpoints, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in os.listdir(folder) if (m := CKPT_NAME.match(name))]
    return sorted(found)


def list_runs(results_dir, model_name=None):
    """Run folders `<NNN>-<model>` in results_dir (of one model if given), lowest number first."""
    if not os.path.isdir(results_dir):
        return []
    runs = []
    for name in os.listdir(results_dir):
        m = RUN_NAME.match(name)
        path = os.path.join(results_dir, name)
        if m and os.path.isdir(path) and (model_name is None or m.group(2) == model_tag(model_name)):
            runs.append((int(m.group(1)), path))
    return [path for _, path in sorted(runs)]


def create_run_dir(results_dir, model_name):
    """Make `<results_dir>/<NNN>-<model>/checkpoints`. NNN is DiT's (the number of entries already
    there), moved past any number in use; the folder is created with exist_ok=False, so two jobs
    starting at once never share one."""
    os.makedirs(results_dir, exist_ok=True)
    names = os.listdir(results_dir)
    used = [int(m.group(1)) for name in names if (m := RUN_NAME.match(name))]
    index = max([len(names)] + [u + 1 for u in used])
    while True:
        path = os.path.join(results_dir, f"{index:03d}-{model_tag(model_name)}")
        try:
            os.makedirs(path, exist_ok=False)
            break
        except FileExistsError:
            index += 1
    os.makedirs(os.path.join(path, "checkpoints"), exist_ok=False)
    return path


def find_resume_checkpoint(spec, results_dir, model_name=None):
    """Checkpoint path for --resume: a file, a run folder (its newest), or 'auto' (newest checkpoint of
    the newest run, of `model_name` if given). None for 'auto' when there is nothing to resume."""
    if spec == "auto":
        runs = list_runs(results_dir, model_name)
        if not runs:
            return None
        checkpoints = list_checkpoints(runs[-1])
        return checkpoints[-1][1] if checkpoints else None
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec):
        for run_dir in (spec, os.path.dirname(os.path.abspath(spec))):   # a run folder or its checkpoints/
            checkpoints = list_checkpoints(run_dir)
            if checkpoints:
                return checkpoints[-1][1]
        raise TrainingError(f"--resume {spec}: the folder holds no checkpoints (checkpoints/NNNNNNN.pt)")
    raise TrainingError(f"--resume {spec}: no such checkpoint or run folder; pass a .pt file, a run "
                        f"folder, or auto")


def run_dir_of(checkpoint_path):
    """The run folder a checkpoint belongs to (`<run>/checkpoints/<step>.pt`), or None."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def load_resume_checkpoint(path):
    """Read a resume checkpoint memory-mapped (every process shares the pages) and check it has a
    training state."""
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception:  # noqa: BLE001 - not a zip checkpoint: read it the ordinary way (clear errors)
        checkpoint = load_checkpoint_file(path)
    if not isinstance(checkpoint, dict) or "step" not in checkpoint or "rng" not in checkpoint:
        raise TrainingError(f"checkpoint {path} has no training state (step, data position, RNG): it "
                            f"cannot be resumed exactly; use --ckpt {path} to start a new run from its weights")
    missing = [k for k in RESUME_KEYS if k not in checkpoint]
    if missing:
        raise TrainingError(f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete and cannot be "
                            f"resumed; resume an earlier checkpoint of the run")
    return checkpoint


# Flags a resumed run does not take from its checkpoint.
_NOT_INHERITED = {"resume", "ckpt", "explicit", "no_progress", "mixed_precision", "debug_nan_at_step",
                  "debug_log_samples"}
# Flags that change the training itself: differing from the checkpoint's, the run goes on but not as
# the uninterrupted run would have.
_EXACTNESS = ("data_path", "feature_path", "dataset", "image_size", "vae", "global_batch_size", "global_seed",
              "lr", "precision", "mixed_precision", "grad_clip", "max_grad_norm", "model_overrides",
              "fused_adamw", "channels_last", "compile")


def _args_dict(saved):
    """A checkpoint's saved "args" (argparse.Namespace, dict or None) as a dict."""
    return vars(saved) if isinstance(saved, argparse.Namespace) else dict(saved or {})


def inherit_args(args, saved):
    """Options not given on the command line come from the resumed run's saved args."""
    saved = _args_dict(saved)
    for key, value in saved.items():
        if key in vars(args) and key not in args.explicit and key not in _NOT_INHERITED:
            setattr(args, key, value)
    return args


#################################################################################
#                                 Building a run                                #
#################################################################################

class TrainRun:
    """Everything a trainer holds: settings, model/EMA/optimizer, data, position and logging."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def _collective(fn, dist_info, on_main_only=False):
    """Run `fn` (on rank 0 only, or on every rank) and agree on the outcome: when any process fails,
    every process raises the same one-line TrainingError, so no process hangs waiting for another."""
    result, error = None, None
    if dist_info.is_main or not on_main_only:
        try:
            result = fn()
        except TrainingError as e:
            error = (str(e), e.code)
        except (ValueError, OSError) as e:  # the helpers' one-line errors (bad data, VAE, checkpoint)
            error = (_one_line(e), 2)
    if dist_info.world_size > 1:
        if on_main_only:
            result, error = broadcast_object((result, error))
        else:
            errors = gather_objects(error)
            error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise TrainingError(error[0], error[1])
    return result


def prepare(args, dist_info, log=None):
    """Validate all inputs and build the run. Nothing is written until every check has passed on
    every process; then rank 0 creates (or, on resume, reopens) the run folder."""
    log = log or RunLogger(dist_info.is_main)
    device, world_size = dist_info.device, dist_info.world_size

    # 1. What to resume (decided on rank 0, shared): the checkpoint and the run's saved options.
    def locate():
        if not args.resume:
            return None
        model_filter = args.model if "model" in args.explicit else None
        return find_resume_checkpoint(args.resume, args.results_dir, model_filter)
    resume_path = _collective(locate, dist_info, on_main_only=True)
    if args.resume == "auto" and resume_path is None:
        log.info(f"--resume auto: no checkpoint to resume in {args.results_dir}; starting a new run")

    # 2. Every process validates and builds; they agree before anything is written.
    def build():
        checkpoint = None
        if resume_path is not None:
            checkpoint = load_resume_checkpoint(resume_path)
            inherit_args(args, checkpoint.get("args"))
        resolve_args(args, world_size)
        seed_everything(args.global_seed * world_size + dist_info.rank)   # DiT's per-process seed
        fastpath.configure_tf32(args.precision in ("tf32", "bf16"))   # as official DiT/DiC; off for fp32
        try:
            vae_factor = downsample_factor_of_spec(args.vae)
        except ValueError as e:
            raise TrainingError(str(e)) from e
        dataset, channels, side = build_dataset(args, vae_factor)
        if len(dataset) < args.global_batch_size:
            raise TrainingError(f"the dataset has {len(dataset)} samples, fewer than --global-batch-size "
                                f"{args.global_batch_size}: lower it or add data")
        vae = load_vae(args.vae, device) if args.data_path and args.vae != "none" else None
        if vae is not None:
            channels = latent_channels(vae)
        args.in_channels = channels
        model_kwargs = dict(input_size=side, in_channels=channels, num_classes=args.num_classes,
                            **args.model_overrides)
        try:
            model = create_model(args.model, **model_kwargs)
        except (ValueError, TypeError, AssertionError) as e:
            hint = ""
            if is_dit(args.model) and args.model.rsplit("/", 1)[-1].isdigit():
                step = vae_factor * int(args.model.rsplit("/", 1)[-1])
                hint = f"; use an image size divisible by {step} (e.g. {max(step, args.image_size // step * step)})"
            raise TrainingError(f"cannot build {args.model} for a {channels}x{side}x{side} input (--image-size "
                                f"{args.image_size}, VAE factor {vae_factor}): {_one_line(e)}{hint}") from e
        _check_model_size(model, args, side, vae_factor)
        model = model.to(device)
        channels_last = fastpath.use_channels_last(args.channels_last, device)
        if channels_last:
            fastpath.to_channels_last(model)   # before the optimizer: its buffers follow the layout
        ema = deepcopy(model).to(device)   # EMA in fp32, never trained
        ema.requires_grad_(False)
        try:   # DiT's AdamW (lr 1e-4, no weight decay, torch's betas/eps), fastest kernel available
            opt = fastpath.make_adamw(model.parameters(), lr=args.lr, weight_decay=0,
                                      fused=fastpath.fused_choice(args.fused_adamw))
        except ValueError as e:
            raise TrainingError(f"--fused-adamw {args.fused_adamw}: {_one_line(e)}; use --fused-adamw "
                                f"auto or off") from e
        if args.ckpt:
            init = load_checkpoint_file(args.ckpt)
            weights = extract_state_dict(init, "model" if isinstance(init, dict) and "model" in init else "ema")
            load_model_weights(model, weights, args.model)
            has_ema = isinstance(init, dict) and "ema" in init and not torch.is_tensor(init.get("ema"))
            load_model_weights(ema, extract_state_dict(init, "ema") if has_ema else weights, args.model)
        if checkpoint is not None:
            load_model_weights(model, checkpoint["model"], args.model)
            load_model_weights(ema, checkpoint["ema"], args.model)
            try:   # keeps this run's AdamW kernel (torch would take the checkpoint's fused/foreach flags)
                fastpath.load_optimizer_state(opt, checkpoint["opt"])
            except (ValueError, KeyError) as e:
                raise TrainingError(f"the optimizer state in {resume_path} does not fit {args.model}: "
                                    f"{_one_line(e)}") from e
            run_dir = run_dir_of(resume_path)
            later = [p for s, p in list_checkpoints(run_dir) if s > checkpoint["step"]] if run_dir else []
            if later:
                raise TrainingError(f"{os.path.basename(later[0])} is newer than {resume_path}: resuming "
                                    f"would write over that run's later checkpoints; resume the newest "
                                    f"(--resume auto) or move the later ones away")
        return dict(checkpoint=checkpoint, vae=vae, dataset=dataset, model=model, ema=ema, opt=opt,
                    model_kwargs=model_kwargs, channels_last=channels_last)
    built = _collective(build, dist_info)
    checkpoint = built["checkpoint"]
    diffusion = create_diffusion(timestep_respacing="", learn_sigma=built["model"].learn_sigma)

    # 3. The run folder: a new one, or the resumed run's own.
    def make_folder():
        if checkpoint is not None and run_dir_of(resume_path) is not None:
            return run_dir_of(resume_path)
        return create_run_dir(args.results_dir, args.model)
    run_dir = _collective(make_folder, dist_info, on_main_only=True)
    if dist_info.is_main:
        log.attach_file(os.path.join(run_dir, "log.txt"))
        args_file = os.path.join(run_dir, "args.json")
        if not os.path.exists(args_file):
            with open(args_file, "w", encoding="utf-8") as f:
                json.dump({k: v for k, v in vars(args).items() if k != "explicit"}, f, indent=2, default=str)

    # Data pipeline: the global order comes from (seed, epoch), augmentation from (seed, epoch, index).
    dataset = SeededSamples(built["dataset"], args.global_seed)
    local_batch = args.global_batch_size // world_size
    sampler = ResumableDistributedSampler(dataset, world_size, dist_info.rank, args.global_batch_size,
                                          args.global_seed)
    loader = DataLoader(dataset, batch_size=local_batch, shuffle=False, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda", drop_last=True,
                        collate_fn=collate_skip_none, generator=torch.Generator())

    run = TrainRun(args=args, dist=dist_info, device=device, log=log, run_dir=run_dir,
                   checkpoint_dir=os.path.join(run_dir, "checkpoints"), diffusion=diffusion,
                   vae=built["vae"], model=built["model"], ema=built["ema"], opt=built["opt"],
                   model_kwargs=built["model_kwargs"], channels_last=built["channels_last"], fast_path=None,
                   dataset=dataset,
                   sampler=sampler, loader=loader, local_batch=local_batch,
                   steps_per_epoch=len(dataset) // args.global_batch_size,
                   step=0, epoch=0, batch_in_epoch=0, loss_sum=0.0, loss_steps=0, skipped=0,
                   resume_path=resume_path, resume_state=None, last_saved=None, start_sample=0,
                   loss_file=LossFile(os.path.join(run_dir, "losses.csv")) if dist_info.is_main else None)
    _describe(run)
    if checkpoint is not None:
        _load_position(run, checkpoint)
    if run.loss_file is not None:
        run.loss_file.start(resume_step=run.step if checkpoint is not None else None)
    return run


def _describe(run):
    args, log = run.args, run.log
    if run.resume_path is None:
        log.info(f"Experiment directory created at {run.run_dir}")
    log.info(f"Command: {' '.join(sys.argv)}")
    n_params = sum(p.numel() for p in run.model.parameters())
    log.info(f"{args.model} parameters: {n_params:,} (input {run.model_kwargs['input_size']}x"
             f"{run.model_kwargs['input_size']}x{run.model_kwargs['in_channels']}, {args.num_classes} classes"
             f"{', overrides ' + str(args.model_overrides) if args.model_overrides else ''})")
    source = args.feature_path or args.data_path or f"built-in {args.dataset}"
    log.info(f"Dataset contains {len(run.dataset):,} samples ({source}); {run.steps_per_epoch:,} steps per "
             f"epoch at global batch {args.global_batch_size} ({run.local_batch} x {run.dist.world_size} processes)")
    log.info(f"VAE: {args.vae}; precision: {args.precision}; lr {args.lr}; EMA decay {args.ema_decay}"
             f"{f'; grad clip {args.max_grad_norm}' if args.grad_clip else ''}")
    if args.ckpt:
        log.info(f"Initialised model and EMA weights from {args.ckpt}")


def _load_position(run, checkpoint):
    """Step, data position, loss window and per-process RNG states of a resumed run."""
    args, log = run.args, run.log
    saved = _args_dict(checkpoint.get("args"))
    for key in _EXACTNESS:
        if key in saved and saved[key] != getattr(args, key, None):
            log.warning(f"resuming with {key}={getattr(args, key, None)!r} where the run used "
                        f"{saved[key]!r}: training goes on, but not as the uninterrupted run would have")
    run.step = int(checkpoint["step"])
    run.epoch = int(checkpoint["epoch"])
    samples_done = int(checkpoint["batch_in_epoch"]) * int(checkpoint.get("global_batch_size", args.global_batch_size))
    run.batch_in_epoch = samples_done // args.global_batch_size
    if samples_done % args.global_batch_size:
        log.warning(f"the resumed epoch is {samples_done} samples in, not a whole number of batches of "
                    f"{args.global_batch_size}: starting that epoch's data after sample {samples_done}")
    run.start_sample = samples_done
    window = checkpoint.get("loss_window") or {}
    run.loss_sum, run.loss_steps = float(window.get("sum", 0.0)), int(window.get("steps", 0))
    run.skipped = int(checkpoint.get("skipped_images", 0))
    run.last_saved = run.step
    states = checkpoint["rng"]
    if len(states) == run.dist.world_size:
        run.resume_state = {"rng": states[run.dist.rank], "scaler": checkpoint.get("scaler")}
    else:
        log.warning(f"the checkpoint was written by {len(states)} processes, this run has "
                    f"{run.dist.world_size}: random streams are re-seeded, so the run is not bit-identical")
        run.resume_state = {"rng": None, "scaler": checkpoint.get("scaler")}
    log.info(f"Resuming from {run.resume_path} at step {run.step} (epoch {run.epoch}, batch {run.batch_in_epoch} "
             f"of {run.steps_per_epoch}) in {run.run_dir}")


#################################################################################
#                                    Saving                                     #
#################################################################################

def _position(run):
    """(epoch, batch_in_epoch) of the next batch; a finished epoch counts as the next one's start."""
    if run.batch_in_epoch >= run.steps_per_epoch:
        return run.epoch + 1, 0
    return run.epoch, run.batch_in_epoch


def _checkpoint_path(run, step):
    return os.path.join(run.checkpoint_dir, f"{step:07d}.pt")


def save_checkpoint(run, scaler=None):
    """Gather every process's RNG state; rank 0 writes `<run>/checkpoints/<step:07d>.pt` atomically
    (never over an existing file); everyone waits at a barrier. Returns the path."""
    states = gather_objects(capture_rng_state(run.device))
    path = _checkpoint_path(run, run.step)
    if run.dist.is_main:
        epoch, batch_in_epoch = _position(run)
        checkpoint = {
            # DiT's keys: every DiT/DiC tool reads these.
            # (tensors in the default layout, also from a channels_last run: they load anywhere)
            "model": fastpath.contiguous_state_dict(run.model.state_dict()),
            "ema": fastpath.contiguous_state_dict(run.ema.state_dict()),
            "opt": fastpath.contiguous_optimizer_state(run.opt.state_dict()),
            "args": run.args,
            # Exact-resume state.
            "step": run.step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "global_batch_size": run.args.global_batch_size,
            "world_size": run.dist.world_size,
            "rng": states,                       # one dict per process, in rank order
            "scaler": scaler.state_dict() if scaler is not None else None,
            "loss_window": {"sum": run.loss_sum, "steps": run.loss_steps},
            "skipped_images": run.skipped,
            "model_kwargs": run.model_kwargs,
            "fast_path": run.fast_path,          # which speed options wrote it (information only)
            "format": CHECKPOINT_FORMAT,
        }
        atomic_save(checkpoint, path)
        run.log.info(f"Saved checkpoint to {path}")
    run.last_saved = run.step
    barrier()
    return path


#################################################################################
#                                  The loop                                     #
#################################################################################

class NonFiniteLoss(TrainingError):
    def __init__(self, message):
        super().__init__(message, code=1)


def _target_steps(run):
    total = run.args.epochs * run.steps_per_epoch
    return min(total, run.args.max_steps) if run.args.max_steps else total


def _progress_bar(run):
    if not (run.dist.is_main and not run.args.no_progress and sys.stdout.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=_target_steps(run), initial=run.step, dynamic_ncols=True, desc="train", unit="step")


def _debug_log_samples(run, indices):
    path = os.path.join(run.run_dir, f"debug_samples_rank{run.dist.rank}.txt")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{run.step + 1} {run.epoch} {' '.join(str(int(i)) for i in indices)}\n")


def train(run, train_step, scaler=None):
    """Run the loop until --max-steps or --epochs: `train_step(x, y)` does forward, backward,
    optimizer and EMA for one batch of model inputs and returns the (local) loss tensor.

    Saves every --ckpt-every steps and at the end; stops every process at the first NaN/inf loss
    without saving. Returns the number of steps taken in this call.
    """
    args, log, device = run.args, run.log, run.device
    world_size = run.dist.world_size
    if run.resume_state is not None:
        if scaler is not None and run.resume_state.get("scaler") is not None:
            scaler.load_state_dict(run.resume_state["scaler"])
        if run.resume_state["rng"] is not None:
            restore_rng_state(run.resume_state["rng"], device)
        else:
            seed_everything(derive_seed(args.global_seed, run.step, run.dist.rank))
    else:
        fastpath.ema_update(run.ema, run.model, decay=0)   # EMA starts as the (now synced) initial weights
    run.model.train()
    run.ema.eval()

    target = _target_steps(run)
    start_step = run.step
    if run.step >= target:
        log.info(f"Nothing to do: the run is at step {run.step}, the target is {target} "
                 f"(raise --max-steps or --epochs to train further)")
        return 0
    log.info(f"Training for {args.epochs} epochs, up to step {target} ...")
    bar = _progress_bar(run)
    log.set_progress(bar)
    meter = ThroughputMeter(device)
    stats = torch.zeros(2, device=device)
    try:
        while run.step < target:
            run.sampler.set_epoch(run.epoch, start=run.start_sample)
            run.dataset.set_epoch(run.epoch)
            run.loader.generator.manual_seed(derive_seed(args.global_seed, run.epoch, run.dist.rank, 1))
            for batch in run.loader:
                if batch is None:
                    raise TrainingError(f"every image of a batch on process {run.dist.rank} was unreadable "
                                        f"(see the warnings above): remove the corrupt files")
                x, y, indices = batch
                if args.debug_log_samples:
                    _debug_log_samples(run, indices)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                if run.vae is not None:
                    x = encode(run.vae, x)
                if args.debug_nan_at_step == run.step + 1 and run.dist.is_main:
                    x = x * float("nan")
                loss = train_step(x, y)

                run.step += 1
                run.batch_in_epoch += 1
                # Loss summed over processes, corrupt skips counted: one 2-float all_reduce and one
                # host sync per step, kept on purpose. The NaN stop needs this step's loss on every
                # process at once: a rank that stopped alone would leave the others hanging in
                # DDP's next all_reduce, and a stop found only at log time could save NaN weights
                # first. It is small next to a training step.
                stats[0] = loss.detach().float()
                stats[1] = run.local_batch - x.shape[0]
                if is_distributed():
                    dist.all_reduce(stats)
                loss_sum, skipped = stats.tolist()
                loss_value = loss_sum / world_size
                if not math.isfinite(loss_value):
                    last = (f"last good checkpoint: {_checkpoint_path(run, run.last_saved)}"
                            if run.last_saved is not None else "no checkpoint was saved yet")
                    raise NonFiniteLoss(f"loss became {loss_value} at step {run.step}; {last} (resume it "
                                        f"with --resume, e.g. with a lower --lr or --grad-clip)")
                skipped = int(skipped)
                images = args.global_batch_size - skipped
                run.loss_sum += loss_value
                run.loss_steps += 1
                run.skipped += skipped
                meter.update(1, images)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)

                if run.step % args.log_every == 0:
                    avg_loss = run.loss_sum / run.loss_steps
                    steps_per_sec, images_per_sec = meter.rates()
                    line = (f"(step={run.step:07d}) Train Loss: {avg_loss:.4f}, Train Steps/Sec: "
                            f"{steps_per_sec:.2f}, Images/Sec: {images_per_sec:.1f}")
                    if run.skipped:
                        line += f", Skipped Corrupt Images: {run.skipped}"
                    log.info(line)
                    if run.loss_file is not None:
                        run.loss_file.append(run.step, avg_loss, steps_per_sec, images_per_sec, run.epoch)
                    run.loss_sum, run.loss_steps = 0.0, 0
                    meter.reset()
                if run.step % args.ckpt_every == 0 or run.step >= target:
                    save_checkpoint(run, scaler)
                if run.step >= target:
                    break
            else:   # the epoch's data ran out
                run.epoch += 1
                run.batch_in_epoch = 0
                run.start_sample = 0
                continue
            break
        if run.last_saved != run.step:
            save_checkpoint(run, scaler)
    finally:
        if bar is not None:
            bar.close()
        log.set_progress(None)
    log.info(f"Done: step {run.step}, run folder {run.run_dir}")
    return run.step - start_step


#################################################################################
#                                 Entry point                                   #
#################################################################################

def run_guarded(body, dist_info, log=None):
    """Call `body()`; a TrainingError becomes one line on stderr (rank 0) and log.txt, and an exit code.

    `body` should hold the DDP/accelerate objects in its own frame, so they are gone (and can be
    garbage-collected before the process group is torn down) when this returns.
    """
    try:
        body()
        return 0
    except TrainingError as e:
        if dist_info.is_main:
            if log is not None:
                log.info(f"error: {e}")
            print(f"error: {e}", file=sys.stderr, flush=True)
        return e.code
    finally:
        if log is not None:
            log.close()


__all__ = ["TrainingError", "NonFiniteLoss", "build_parser", "parse_args", "resolve_args", "prepare", "train",
           "training_forward", "diffusion_loss", "log_fast_path", "save_checkpoint", "run_guarded",
           "ResumableDistributedSampler", "SeededSamples", "derive_seed"]
