"""Setting a training run up: the trainers' flags, their checks, and building the run (data, model,
EMA, optimizer, objective, run folder, resumed position). The loop itself is in train.py.

Nothing is written until every check has passed on every process: errors are one line (JobError),
and a run that fails validation leaves no folder behind.
"""
import argparse
import json
import os
import sys
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from helpers import fastpath
from helpers.checkpoint import extract_state_dict, load_checkpoint_file, load_model_weights
from helpers.cli import JobError, agree, one_line
from helpers.data_order import EpochBatches
from helpers.images import BUILTIN_DATASETS, ImageFolderDataset, builtin_dataset
from helpers.files import check_writable, remove_stale_temps
from helpers.latents import LatentFeatureDataset
from helpers.locks import RunLock
from helpers.log import LossFile
from helpers.models import create_model, is_dit, model_names, parse_args_with_overrides
from helpers.monitor import add_monitor_args, check_monitor_args
from helpers.objectives import add_objective_args, create_objective, objective_from_args
from helpers.runs import (Progress, check_no_later_checkpoints, create_run_dir, find_resume_checkpoint,
                          load_resume_checkpoint, resume_progress, run_dir_of, saved_args)
from helpers.seeds import seed_everything
from helpers.vae import downsample_factor_of_spec, latent_channels, load_vae


#################################################################################
#                                   Arguments                                   #
#################################################################################

def build_parser(description):
    """The command line of both trainers (DiT/DiC-compatible names and defaults)."""
    p = argparse.ArgumentParser(description=description,
                                epilog="Model constructor overrides: --network_g__<keyword>=<value> "
                                       "(e.g. --network_g__skip_stride=1), as in the official DiC script.")
    data = p.add_argument_group("data (exactly one of --data-path, --feature-path, --dataset)")
    data.add_argument("--data-path", type=str, default=None, help="class folders, VAE-encoded on the fly")
    data.add_argument("--feature-path", type=str, default=None, help="precomputed latents (extract_features.py)")
    data.add_argument("--dataset", type=str, default=None, choices=sorted(BUILTIN_DATASETS),
                      help="a built-in pixel-space dataset (no download)")
    data.add_argument("--image-size", type=int, default=None, help="pixels (default 256; 16 for --dataset)")
    data.add_argument("--num-classes", type=int, default=None, help="default 1000 (the dataset's for --dataset)")
    data.add_argument("--vae", type=str, default=None,
                      help="ema | mse | a local AutoencoderKL folder | none (default ema; none for --dataset)")
    data.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per process (default 4)")
    data.add_argument("--skip-nonfinite", action="store_true", help="skip and count latents holding NaN/inf")
    data.add_argument("--allow-empty-classes", action="store_true",
                      help="let empty class folders keep their label index (as torchvision's ImageFolder)")

    model = p.add_argument_group("model and optimisation")
    model.add_argument("--model", type=str, default="DiC-XL", help=f"one of {', '.join(model_names())}")
    model.add_argument("--global-batch-size", type=int, default=256, help="processes x micro-batch x accumulation")
    model.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    model.add_argument("--draws", type=str, default="per-sample", choices=["per-sample", "global"],
                       help="per-sample: noise/time/label dropout from (seed, step, index), the same on any layout; "
                            "global: DiT's draws from each process's RNG")
    model.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (weight decay 0)")
    model.add_argument("--precision", type=str, default="tf32", choices=list(fastpath.PRECISIONS),
                       help="tf32 (official), fp32 (strict) or bf16 (autocast)")
    model.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (default off)")
    model.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    model.add_argument("--ema-warmup", action="store_true",
                       help="EMA decay min(--ema-decay, (1 + step) / (10 + step)): short runs average less early")
    model.add_argument("--global-seed", type=int, default=0)
    add_objective_args(p)

    fast = p.add_argument_group("fast path (bench/README.md has the timings)")
    fast.add_argument("--fused-adamw", type=str, default="auto", choices=["auto", "on", "off"],
                      help="AdamW kernel: fused where available (auto), or not")
    fast.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                      help="NHWC weights and activations (default off)")
    fast.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                      help="torch.compile the training forward (default off)")

    run = p.add_argument_group("run length, checkpoints and logging")
    run.add_argument("--results-dir", type=str, default="results")
    run.add_argument("--epochs", type=int, default=1400)
    run.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    run.add_argument("--log-every", type=int, default=100)
    run.add_argument("--ckpt-every", type=int, default=50_000)
    run.add_argument("--ckpt", type=str, default=None, help="start a new run from these weights")
    run.add_argument("--resume", type=str, default=None,
                     help="continue a run exactly: a checkpoint, a run folder, or auto")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_monitor_args(p)
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
        raise JobError(f"pass exactly one data source, got {', '.join(sources) or 'none'}: --data-path "
                       f"<class folders>, --feature-path <latents> or --dataset {'|'.join(sorted(BUILTIN_DATASETS))}")
    if args.dataset:
        channels, _, classes = BUILTIN_DATASETS[args.dataset]
        args.vae = "none" if args.vae is None else args.vae
        if str(args.vae).lower() != "none":
            raise JobError(f"--dataset {args.dataset} is {channels}-channel pixel data: drop --vae {args.vae} "
                           f"(built-in datasets train in pixel space)")
        args.image_size = 16 if args.image_size is None else args.image_size
        args.num_classes = classes if args.num_classes is None else args.num_classes
        args.num_workers = 0 if args.num_workers is None else args.num_workers  # data is in memory
    args.num_workers = 4 if args.num_workers is None else args.num_workers
    args.vae = "ema" if args.vae is None else ("none" if str(args.vae).lower() == "none" else args.vae)
    args.image_size = 256 if args.image_size is None else args.image_size
    args.num_classes = 1000 if args.num_classes is None else args.num_classes
    if args.model not in model_names():
        raise JobError(f"unknown model {args.model!r}: choose one of {', '.join(model_names())}")
    for flag, value, low in (("--image-size", args.image_size, 1), ("--num-classes", args.num_classes, 1),
                             ("--global-batch-size", args.global_batch_size, 1), ("--epochs", args.epochs, 1),
                             ("--log-every", args.log_every, 1), ("--ckpt-every", args.ckpt_every, 1),
                             ("--num-workers", args.num_workers, 0), ("--max-steps", args.max_steps, 1),
                             ("--global-seed", args.global_seed, 0), ("--grad-accum-steps", args.grad_accum_steps, 1)):
        if value is not None and value < low:
            raise JobError(f"{flag} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise JobError(f"--lr must be positive, got {args.lr}")
    if not 0 <= args.ema_decay < 1:
        raise JobError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise JobError(f"--max-grad-norm must be positive, got {args.max_grad_norm}")
    if args.global_batch_size % world_size:
        raise JobError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} "
                       f"processes: use a multiple of {world_size}")
    if args.global_batch_size % (world_size * args.grad_accum_steps):
        raise JobError(f"--global-batch-size {args.global_batch_size} is not divisible by {world_size} processes x "
                       f"--grad-accum-steps {args.grad_accum_steps}: use a multiple of "
                       f"{world_size * args.grad_accum_steps}")
    check_monitor_args(args)
    if args.resume and args.ckpt:
        raise JobError("--resume and --ckpt do not mix: --resume continues a run (weights, optimizer, data "
                       "position), --ckpt starts a new run from weights")
    return args


# Flags a resumed run does not take from its checkpoint.
_NOT_INHERITED = {"resume", "ckpt", "explicit", "no_progress", "mixed_precision"}
# Flags that change the training itself: changed on resume, the run goes on, but not as it would have.
_EXACTNESS = ("data_path", "feature_path", "dataset", "image_size", "vae", "global_batch_size", "global_seed", "draws",
              "lr", "precision", "mixed_precision", "max_grad_norm", "model_overrides", "fused_adamw",
              "channels_last", "compile", "objective")


def inherit_args(args, saved):
    """Options not given on the command line come from the resumed run's saved args."""
    if saved and "draws" not in saved and "draws" not in args.explicit:
        args.draws = "global"   # runs from before per-sample draws continue as they started
    for key, value in saved.items():
        if key in vars(args) and key not in args.explicit and key not in _NOT_INHERITED:
            if key == "channels_last" and isinstance(value, str):   # format 1 saved auto|on|off
                value = value == "on"
            setattr(args, key, value)
    return args


def warn_changed_settings(args, saved, log):
    for key in _EXACTNESS:
        if key in saved and saved[key] != getattr(args, key, None):
            log.warning(f"resuming with {key}={getattr(args, key, None)!r} where the run used {saved[key]!r}: "
                        f"training goes on, but not as the uninterrupted run would have")


#################################################################################
#                                Building a run                                 #
#################################################################################

@dataclass
class Run:
    """What a trainer holds for the whole run (the changing position is a runs.Progress)."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world_size: int
    log: Any                      # helpers.log.RunLogger
    run_dir: str
    model: torch.nn.Module        # the plain module: the EMA follows it, checkpoints save it
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    objective: Any                # helpers.objectives: training_losses(model, x, model_kwargs)
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


def build_dataset(args, vae_factor):
    """(dataset, in_channels, model input side) for the chosen source; one-line errors for bad data."""
    side = args.image_size // vae_factor
    if args.feature_path:
        dataset = LatentFeatureDataset(args.feature_path, skip_nonfinite=args.skip_nonfinite)
        c, h, w = dataset.latent_shape
        if h != w or h != side or args.image_size % vae_factor:
            raise JobError(f"latents in {args.feature_path} are {c}x{h}x{w} but --image-size {args.image_size} "
                           f"with --vae {args.vae} (factor {vae_factor}) needs {c}x{side}x{side}: pass "
                           f"--image-size {h * vae_factor} (or the --vae the latents were made with)")
        dataset.check_labels(args.num_classes)   # every label: an integer in [0, --num-classes)
        return dataset, c, side
    if args.image_size % vae_factor:
        raise JobError(f"--image-size {args.image_size} is not divisible by the VAE's factor {vae_factor}: "
                       f"use a multiple of {vae_factor}")
    if args.dataset:
        dataset = builtin_dataset(args.dataset, "train", args.image_size)
        channels = BUILTIN_DATASETS[args.dataset][0]
    else:
        dataset = ImageFolderDataset(args.data_path, args.image_size, random_flip=True, channels=3,
                                     allow_empty_classes=args.allow_empty_classes)
        channels = 3
    if dataset.num_classes > args.num_classes:
        raise JobError(f"{args.data_path or 'built-in ' + args.dataset} has {dataset.num_classes} classes "
                       f"(labels up to {dataset.num_classes - 1}) >= --num-classes {args.num_classes}: pass "
                       f"--num-classes {dataset.num_classes} or more")
    return dataset, channels, side


def build_model(args, model_kwargs, vae_factor):
    """The model of --model with a one-line error (and a size hint) when it cannot take the input."""
    side, channels = model_kwargs["input_size"], model_kwargs["in_channels"]
    try:
        model = create_model(args.model, **model_kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        hint = ""
        if is_dit(args.model) and args.model.rsplit("/", 1)[-1].isdigit():
            step = vae_factor * int(args.model.rsplit("/", 1)[-1])
            hint = f"; use an image size divisible by {step} (e.g. {max(step, args.image_size // step * step)})"
        raise JobError(f"cannot build {args.model} for a {channels}x{side}x{side} input (--image-size "
                       f"{args.image_size}, VAE factor {vae_factor}): {one_line(e)}{hint}") from e
    factor = getattr(model, "downsample_factor", 1)   # DiC halves the resolution (levels - 1) times
    if side % factor:
        step = vae_factor * factor
        raise JobError(f"--image-size {args.image_size} gives a {side}x{side} model input (VAE factor "
                       f"{vae_factor}) that {args.model} cannot take: it downsamples by {factor}, so use an "
                       f"image size divisible by {step} (e.g. {max(step, args.image_size // step * step)})")
    return model


def load_initial_weights(args, model, ema):
    """--ckpt: model and EMA weights of a new run from any checkpoint (ours, official, bare)."""
    init = load_checkpoint_file(args.ckpt)
    weights = extract_state_dict(init, "model" if isinstance(init, dict) and "model" in init else "ema")
    load_model_weights(model, weights, args.model)
    has_ema = isinstance(init, dict) and "ema" in init and not torch.is_tensor(init.get("ema"))
    load_model_weights(ema, extract_state_dict(init, "ema") if has_ema else weights, args.model)


def build(args, device, world_size, rank, resume_path):
    """Every process checks and builds the same things; returns the pieces of a Run (no files written)."""
    checkpoint = None
    if resume_path is not None:
        checkpoint = load_resume_checkpoint(resume_path)
        inherit_args(args, saved_args(checkpoint))
    resolve_args(args, world_size)
    seed_everything(args.global_seed * world_size + rank)   # DiT's per-process seed (model init, dropout)
    fastpath.configure_tf32(args.precision in ("tf32", "bf16"))   # as official DiT/DiC; off for fp32
    vae_factor = downsample_factor_of_spec(args.vae)
    dataset, channels, side = build_dataset(args, vae_factor)
    if len(dataset) < args.global_batch_size:
        raise JobError(f"the dataset has {len(dataset)} samples, fewer than --global-batch-size "
                       f"{args.global_batch_size}: lower it or add data")
    decodes = args.sample_every or args.fid_every   # live samples and FID decode latents
    vae = load_vae(args.vae, device) if (args.data_path or decodes) and args.vae != "none" else None
    args.in_channels = latent_channels(vae) if vae is not None else channels
    objective = create_objective(objective_from_args(args))
    model_kwargs = dict(input_size=side, in_channels=args.in_channels, num_classes=args.num_classes,
                        learn_sigma=objective.learn_sigma, **args.model_overrides)
    model = build_model(args, model_kwargs, vae_factor).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    if args.channels_last:
        fastpath.to_channels_last(model)   # before the optimizer: its buffers follow the layout
    ema = deepcopy(model).requires_grad_(False)   # EMA in fp32, never trained
    try:   # DiT's AdamW (lr 1e-4, no weight decay, torch's betas/eps), fastest kernel available
        opt = fastpath.make_adamw(model.parameters(), lr=args.lr, weight_decay=0,
                                  fused=fastpath.fused_choice(args.fused_adamw))
    except ValueError as e:
        raise JobError(f"--fused-adamw {args.fused_adamw}: {one_line(e)}; use --fused-adamw auto or off") from e
    if args.ckpt:
        load_initial_weights(args, model, ema)
    if checkpoint is not None:
        load_model_weights(model, checkpoint["model"], args.model)
        load_model_weights(ema, checkpoint["ema"], args.model)
        try:   # keeps this run's AdamW kernel (torch would take the checkpoint's fused/foreach flags)
            fastpath.load_optimizer_state(opt, checkpoint["opt"])
        except (ValueError, KeyError) as e:
            raise JobError(f"the optimizer state in {resume_path} does not fit {args.model}: {one_line(e)}") from e
        check_no_later_checkpoints(resume_path, int(checkpoint["step"]))
    return dict(checkpoint=checkpoint, vae=vae, dataset=dataset, model=model, ema=ema, opt=opt,
                objective=objective, model_kwargs=model_kwargs)


def setup_run(args, dist_info, log):
    """Validate every input and build the run on every process, then (rank 0) create or reopen the
    run folder, locked for this job. Returns (Run, Progress)."""
    device, world_size, rank = dist_info.device, dist_info.world_size, dist_info.rank
    locks = []   # rank 0 locks the run folder it will write, for the whole job
    try:
        resume_path = agree(lambda: locate_resume(args, locks), on_main_only=True)
        if args.resume == "auto" and resume_path is None:
            log.info(f"--resume auto: no checkpoint to resume in {args.results_dir}; starting a new run")
        # Every process validates and builds; they agree before anything is written.
        built = agree(lambda: build(args, device, world_size, rank, resume_path))
        checkpoint = built["checkpoint"]
        run_dir = agree(lambda: open_run_dir(args, resume_path if checkpoint is not None else None, locks),
                        on_main_only=True)
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    if dist_info.is_main:
        log.attach_file(os.path.join(run_dir, "log.txt"))
        args_file = os.path.join(run_dir, "args.json")
        if not os.path.exists(args_file):
            with open(args_file, "w", encoding="utf-8") as f:
                json.dump({k: v for k, v in vars(args).items() if k != "explicit"}, f, indent=2, default=str)

    data = EpochBatches(built["dataset"], rank, world_size, args.global_batch_size, args.global_seed,
                        args.num_workers, pin_memory=device.type == "cuda", accum_steps=args.grad_accum_steps)
    run = Run(args=args, device=device, rank=rank, world_size=world_size, log=log, run_dir=run_dir,
              model=built["model"], ema=built["ema"], opt=built["opt"], objective=built["objective"],
              vae=built["vae"], data=data, model_kwargs=built["model_kwargs"], lock=(locks or [None])[-1],
              loss_file=LossFile(os.path.join(run_dir, "losses.csv")) if dist_info.is_main else None)
    describe(run, resumed=checkpoint is not None)
    progress = Progress()
    if checkpoint is not None:
        progress = resume_checkpoint_state(run, checkpoint, resume_path)
    if run.loss_file is not None:
        run.loss_file.start(resume_step=progress.step if checkpoint is not None else None)
    return run, progress


def locate_resume(args, locks):
    """Rank 0: the checkpoint --resume names, its run folder locked first (so no other job writes
    a newer checkpoint meanwhile, and two resumes of one run never both go ahead). Checks first that
    the results folder can be written (errors before work)."""
    check_writable(args.results_dir, folder=True, keep_folder=False)
    if not args.resume:
        return None
    model_filter = args.model if "model" in args.explicit else None
    path = find_resume_checkpoint(args.resume, args.results_dir, model_filter)
    run_dir = run_dir_of(path) if path else None
    if run_dir is None:
        return path
    locks.append(RunLock(run_dir, what="training").acquire())
    return find_resume_checkpoint(args.resume, args.results_dir, model_filter)   # newest, now that it is ours


def open_run_dir(args, resume_path, locks):
    """Rank 0: the resumed run's folder, or a new `<results>/<NNN>-<model>/`; locked, and cleared of
    the temp files of writes a killed job left."""
    run_dir = run_dir_of(resume_path) if resume_path is not None else None
    if run_dir is None:
        run_dir = create_run_dir(args.results_dir, args.model)
        locks.append(RunLock(run_dir, what="training").acquire())
    removed = remove_stale_temps(os.path.join(run_dir, "checkpoints"))
    if removed:
        print(f"Removed {removed} temp file(s) of an interrupted checkpoint write in {run_dir}", flush=True)
    return run_dir


def resume_checkpoint_state(run, checkpoint, path):
    """The resumed position, and this process's RNG and GradScaler states to restore."""
    args, log = run.args, run.log
    warn_changed_settings(args, saved_args(checkpoint), log)
    progress = resume_progress(checkpoint, args.global_batch_size, log)
    states = checkpoint["rng"]
    if len(states) == run.world_size:
        run.resume_rng = states[run.rank]
    elif args.draws == "per-sample":
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


def describe(run, resumed):
    args, log = run.args, run.log
    if not resumed:
        log.info(f"Experiment directory created at {run.run_dir}")
    log.info(f"Command: {' '.join(sys.argv)}")
    n_params = sum(p.numel() for p in run.model.parameters())
    kw = run.model_kwargs
    log.info(f"{args.model} parameters: {n_params:,} (input {kw['input_size']}x{kw['input_size']}x"
             f"{kw['in_channels']}, {args.num_classes} classes"
             f"{', overrides ' + str(args.model_overrides) if args.model_overrides else ''})")
    source = args.feature_path or args.data_path or f"built-in {args.dataset}"
    log.info(f"Dataset contains {len(run.data):,} samples ({source}); {run.data.steps_per_epoch:,} steps per "
             f"epoch at global batch {args.global_batch_size} ({args.global_batch_size // run.world_size} x "
             f"{run.world_size} processes)")
    log.info(f"Objective: {run.objective.config()}; VAE: {args.vae}; precision: {args.precision}; lr {args.lr}; "
             f"EMA decay {args.ema_decay}{f'; grad clip {args.max_grad_norm}' if args.max_grad_norm else ''}")
    if args.ckpt:
        log.info(f"Initialised model and EMA weights from {args.ckpt}")


#################################################################################
#                           The forward, as the loop calls it                   #
#################################################################################

def training_forward(model, run, autocast=True):
    """`model` (plain, DDP or accelerate-prepared) as the objective calls it: torch.compile'd with
    --compile, under bf16 autocast with --precision bf16 (if `autocast`; output in fp32), its input
    in channels_last with --channels-last.

    Only this forward is compiled: run.model stays the plain module, so EMA updates and checkpoints
    see clean parameter names. The batch itself stays NCHW (the objective draws its noise with
    randn_like, which fills a channels_last tensor in memory order, i.e. other noise for one seed).
    """
    if run.args.compile and not hasattr(model, "_orig_mod"):
        model = fastpath.maybe_compile(model, True)
    if autocast:
        model = fastpath.autocast_forward(model, run.device, run.args.precision)
    if not run.args.channels_last:
        return model

    def forward(x, *args, **kwargs):
        return model(fastpath.channels_last_input(x), *args, **kwargs)
    return forward


def ema_decay_at(args, step):
    """The EMA decay of optimizer step `step` (0-based): --ema-decay, or its warmed-up form."""
    return min(args.ema_decay, (1 + step) / (10 + step)) if args.ema_warmup else args.ema_decay


def log_fast_path(run, compiled, accelerate_precision=None):
    """One line naming the active fast-path options (and remember them for the checkpoints)."""
    accelerated = accelerate_precision not in (None, "no")
    precision = accelerate_precision if accelerated else run.args.precision
    run.fast_path = dict(precision=precision, adamw=fastpath.optimizer_implementation(run.opt),
                         ema="foreach", channels_last=bool(run.args.channels_last), compile=bool(compiled))
    label = precision + (" (accelerate)" if accelerated else "")
    if precision == "tf32" and run.device.type != "cuda":
        label = f"tf32 (plain fp32 on {run.device.type})"
    run.log.info(fastpath.describe(label, run.fast_path["adamw"], run.fast_path["channels_last"], compiled))
