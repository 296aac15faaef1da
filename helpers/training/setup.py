"""Setting a training run up: the pieces train.py's main builds, each from the values it names
(data, model, optimizer, initial or resumed weights, the resumed position), the Run they make up,
and the forward as the loop calls it (flags: helpers/training/flags.py; the loop: train.py).

Nothing is written until every check has passed on every process: errors are one line (JobError),
and a run that fails validation leaves no folder behind.
"""
import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from helpers.utils import fastpath
from helpers.utils.checkpoint import extract_state_dict, load_checkpoint_file, load_model_weights
from helpers.utils.cli import JobError, one_line
from helpers.data.order import EpochBatches
from helpers.data.images import BUILTIN_DATASETS, ImageFolderDataset, builtin_dataset
from helpers.data.latents import LatentFeatureDataset
from helpers.utils.locks import RunLock
from helpers.utils.log import LossFile
from helpers.utils.models import create_model, is_dit
from helpers.training.repa_objective import LatentsWithImages
from helpers.training.runs import check_no_later_checkpoints, resume_progress


#################################################################################
#                                Building a run                                 #
#################################################################################

@dataclass
class Run:
    """What a trainer holds for the whole run (the changing position is a runs.Progress)."""
    device: torch.device
    rank: int
    world_size: int
    log: Any                      # helpers.utils.log.RunLogger
    run_dir: str
    model: torch.nn.Module        # the plain module: the EMA follows it, checkpoints save it
    net: torch.nn.Module          # what trains: the model, or with --repa the model and its projectors
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    objective: Any                # helpers.training.objectives: training_losses(model, x, model_kwargs)
    vae: Optional[Any]            # encodes --data-path images, decodes live samples; None in pixel space
    data: EpochBatches
    model_kwargs: dict
    fast_path: Optional[dict] = None
    loss_file: Optional[LossFile] = None
    resume_rng: Optional[dict] = None     # this process's saved RNG state, when resuming exactly
    resume_scaler: Optional[dict] = None
    lock: Optional[RunLock] = None        # rank 0: the run folder's lock, held for the whole job

    @property
    def is_main(self):
        return self.rank == 0


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from, from the trainers' flags of the same names (flags.data_config)."""
    data_path: Optional[str]      # class folders (with feature_path and repa: the latents' images)
    feature_path: Optional[str]   # precomputed latents
    dataset: Optional[str]        # a built-in pixel-space dataset
    image_size: int
    num_classes: Optional[int]    # None: the data's own count (class folders, or the latents' labels)
    vae: str                      # named in errors (the latents' VAE factor is passed apart)
    skip_nonfinite: bool
    allow_empty_classes: bool
    repa: bool                    # latents come with the images they were made from


class Classes(NamedTuple):
    """The run's number of classes, and the log line saying it came from the data (None when
    --num-classes, a resumed run or a built-in dataset set it)."""
    count: int
    note: Optional[str]


def build_dataset(config, vae_factor):
    """(dataset, in_channels, model input side, Classes) for the chosen source (`config` a
    DataConfig); one-line errors for bad data, and for a label the class count cannot hold."""
    side = config.image_size // vae_factor
    if config.feature_path:
        dataset = LatentFeatureDataset(config.feature_path, skip_nonfinite=config.skip_nonfinite)
        c, h, w = dataset.latent_shape
        if h != w or h != side or config.image_size % vae_factor:
            raise JobError(f"latents in {config.feature_path} are {c}x{h}x{w} but --image-size {config.image_size} "
                           f"with --vae {config.vae} (factor {vae_factor}) needs {c}x{side}x{side}: pass "
                           f"--image-size {h * vae_factor} (or the --vae the latents were made with)")
        dataset.check_labels(config.num_classes)   # every label: an integer in [0, --num-classes)
        classes = latent_classes(dataset, config.num_classes, config.feature_path)
        dataset.num_classes = classes.count        # later reads check the range too
        if config.repa:   # each latent with the image it came from, for the encoder
            images = ImageFolderDataset(config.data_path, config.image_size, random_flip=False, channels=3,
                                        allow_empty_classes=config.allow_empty_classes)
            dataset = LatentsWithImages(dataset, images)
        return dataset, c, side, classes
    if config.image_size % vae_factor:
        raise JobError(f"--image-size {config.image_size} is not divisible by the VAE's factor {vae_factor}: "
                       f"use a multiple of {vae_factor}")
    if config.dataset:
        dataset = builtin_dataset(config.dataset, "train", config.image_size)
        channels = BUILTIN_DATASETS[config.dataset][0]
    else:
        dataset = ImageFolderDataset(config.data_path, config.image_size, random_flip=True, channels=3,
                                     allow_empty_classes=config.allow_empty_classes)
        channels = 3
    return dataset, channels, side, image_classes(dataset, config.num_classes, config.data_path, config.dataset)


def latent_classes(dataset, num_classes, path):
    """Classes of a latent set: `num_classes` (its labels already checked against it), else the
    labels' own count (max label + 1), so a 5-class set trains a 5-class model, not DiT's 1000."""
    if num_classes is not None:
        return Classes(num_classes, None)
    count = dataset.num_classes_seen
    note = (f"{count} class{'es' * (count > 1)} from {path} (labels 0..{count - 1} of its {len(dataset):,} "
            f"latents); --num-classes overrides")
    return Classes(count, note)


def image_classes(dataset, num_classes, data_path, builtin):
    """Classes of class folders or a built-in set: `num_classes`, else one per class folder (an
    unseen label would waste an embedding row; DiT's default of 1000 lets sampling draw them).
    A folder whose label `num_classes` cannot hold is refused in one line."""
    found = dataset.num_classes
    if num_classes is None:
        note = (f"{found} class{'es' * (found > 1)} from {data_path} (class folders {preview(dataset.classes)}); "
                f"--num-classes overrides")
        return Classes(found, note)
    if found > num_classes:
        what = f"class folders ({preview(dataset.classes)})" if data_path else "classes"
        raise JobError(f"{data_path or 'built-in ' + builtin} has {found} {what}, labels 0..{found - 1}, but "
                       f"--num-classes is {num_classes}: pass --num-classes {found} or more"
                       f"{' (or leave it out: the folders set it)' if data_path else ''}")
    return Classes(num_classes, None)


def preview(names, shown=3):
    """'a, b, c' or 'a, b, ..., z (26)': class names for one log line, however many there are."""
    names = list(names)
    if len(names) <= shown + 1:
        return ", ".join(names)
    return f"{', '.join(names[:shown - 1])}, ..., {names[-1]} ({len(names)})"


def check_batch_fits(dataset, global_batch_size):
    if len(dataset) < global_batch_size:
        raise JobError(f"the dataset has {len(dataset)} samples, fewer than --global-batch-size "
                       f"{global_batch_size}: lower it or add data")


def build_model(name, model_kwargs, image_size, vae_factor):
    """Model `name` with a one-line error (and a size hint) when it cannot take the input."""
    side, channels = model_kwargs["input_size"], model_kwargs["in_channels"]
    try:
        model = create_model(name, **model_kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        hint = ""
        if is_dit(name) and name.rsplit("/", 1)[-1].isdigit():
            step = vae_factor * int(name.rsplit("/", 1)[-1])
            hint = f"; use an image size divisible by {step} (e.g. {max(step, image_size // step * step)})"
        raise JobError(f"cannot build {name} for a {channels}x{side}x{side} input (--image-size "
                       f"{image_size}, VAE factor {vae_factor}): {one_line(e)}{hint}") from e
    factor = getattr(model, "downsample_factor", 1)   # DiC halves the resolution (levels - 1) times
    if side % factor:
        step = vae_factor * factor
        raise JobError(f"--image-size {image_size} gives a {side}x{side} model input (VAE factor "
                       f"{vae_factor}) that {name} cannot take: it downsamples by {factor}, so use an "
                       f"image size divisible by {step} (e.g. {max(step, image_size // step * step)})")
    return model


def make_optimizer(net, lr, fused_adamw):
    """DiT's AdamW (lr 1e-4, no weight decay, torch's betas/eps), fastest kernel available."""
    try:
        return fastpath.make_adamw(net.parameters(), lr=lr, weight_decay=0, fused=fastpath.fused_choice(fused_adamw))
    except ValueError as e:
        raise JobError(f"--fused-adamw {fused_adamw}: {one_line(e)}; use --fused-adamw auto or off") from e


def load_initial_weights(path, model_name, model, ema):
    """--ckpt: model and EMA weights of a new run from any checkpoint (ours, official, bare)."""
    init = load_checkpoint_file(path)
    weights = extract_state_dict(init, "model" if isinstance(init, dict) and "model" in init else "ema")
    load_model_weights(model, weights, model_name)
    has_ema = isinstance(init, dict) and "ema" in init and not torch.is_tensor(init.get("ema"))
    load_model_weights(ema, extract_state_dict(init, "ema") if has_ema else weights, model_name)


def load_resume_weights(checkpoint, path, model_name, model, ema, net, opt):
    """--resume: model, EMA, projectors (when `net` has them) and optimizer state from the checkpoint."""
    load_model_weights(model, checkpoint["model"], model_name)
    load_model_weights(ema, checkpoint["ema"], model_name)
    if net is not model:   # --repa
        if "projector" not in checkpoint:
            raise JobError(f"{path} was trained without --repa: it has no projector to resume; start a "
                           f"REPA run from its weights with --ckpt {path}")
        net.projectors.load_state_dict(checkpoint["projector"])
    try:   # keeps this run's AdamW kernel (torch would take the checkpoint's fused/foreach flags)
        fastpath.load_optimizer_state(opt, checkpoint["opt"])
    except (ValueError, KeyError) as e:
        raise JobError(f"the optimizer state in {path} does not fit {model_name}: {one_line(e)}") from e
    check_no_later_checkpoints(path, int(checkpoint["step"]))


def resume_checkpoint_state(run, checkpoint, path, global_batch_size, draws):
    """The resumed position, and this process's RNG and GradScaler states to restore."""
    log = run.log
    progress = resume_progress(checkpoint, global_batch_size, log)
    states = checkpoint["rng"]
    if len(states) == run.world_size:
        run.resume_rng = states[run.rank]
    elif draws == "per-sample":
        log.info(f"the checkpoint was written by {len(states)} processes, this run has {run.world_size}: the "
                 f"per-sample draws do not depend on it, so the run goes on as it would have (up to float "
                 f"rounding of the gradient sums)")
    else:
        log.warning(f"the checkpoint was written by {len(states)} processes, this run has {run.world_size}: "
                    f"random streams are re-seeded, so the run is not bit-identical (--draws global)")
    run.resume_scaler = checkpoint.get("scaler")
    log.info(f"Resuming from {path} at step {progress.step} (epoch {progress.epoch}, batch "
             f"{progress.batch_in_epoch} of {run.data.steps_per_epoch}) in {run.run_dir}")
    return progress


#################################################################################
#                           The forward, as the loop calls it                   #
#################################################################################

def training_forward(model, device, precision, compile, channels_last, autocast=True):
    """`model` (plain, DDP or accelerate-prepared) as the objective calls it: torch.compile'd with
    `compile`, under bf16 autocast with precision bf16 (if `autocast`; output in fp32), its input
    in channels_last with `channels_last`.

    Only this forward is compiled: run.model stays the plain module, so EMA updates and checkpoints
    see clean parameter names. The batch itself stays NCHW (the objective draws its noise with
    randn_like, which fills a channels_last tensor in memory order, i.e. other noise for one seed).
    """
    if compile and not hasattr(model, "_orig_mod"):
        model = fastpath.maybe_compile(model, True)
    if autocast:
        model = fastpath.autocast_forward(model, device, precision)
    if not channels_last:
        return model

    def forward(x, *args, **kwargs):
        return model(fastpath.channels_last_input(x), *args, **kwargs)
    return forward


def ema_decay_at(step, decay, warmup):
    """The EMA decay of optimizer step `step` (0-based): `decay` (--ema-decay), or with `warmup`
    (--ema-warmup) its warmed-up form."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def lr_at(step, lr, schedule, total_steps):
    """The learning rate of optimizer step `step` (0-based): `lr` (--lr) throughout for the constant
    schedule (DiT's), or for "cosine" half a cosine from `lr` down to 0 at step `total_steps` (the run's
    last step), the usual way to let a short run end on small steps. A function of the step alone, so
    a resumed run follows it exactly. (On the quick start it did not beat the constant rate: README.)
    The rate is set every step, so a resumed run takes a given --lr rather than the optimizer
    state's."""
    if schedule == "constant":
        return lr
    progress = min(step, total_steps) / max(total_steps, 1)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(opt, lr):
    """Give every parameter group the learning rate `lr` (a plain float keeps the fused kernel's path)."""
    for group in opt.param_groups:
        group["lr"] = lr


def log_fast_path(run, precision, channels_last, compiled, accelerate_precision=None):
    """One line naming the active fast-path options (and remember them for the checkpoints)."""
    accelerated = accelerate_precision not in (None, "no")
    precision = accelerate_precision if accelerated else precision
    run.fast_path = dict(precision=precision, adamw=fastpath.optimizer_implementation(run.opt),
                         ema="foreach", channels_last=bool(channels_last), compile=bool(compiled))
    label = precision + (" (accelerate)" if accelerated else "")
    if precision == "tf32" and run.device.type != "cuda":
        label = f"tf32 (plain fp32 on {run.device.type})"
    run.log.info(fastpath.describe(label, run.fast_path["adamw"], run.fast_path["channels_last"], compiled))
