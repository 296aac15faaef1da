"""Setting a training run up: building the run (data, model, EMA, optimizer, objective, run folder,
resumed position) once every input is checked (flags: helpers/training/flags.py; the loop: train.py).

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

from helpers.utils import fastpath
from helpers.utils.checkpoint import extract_state_dict, load_checkpoint_file, load_model_weights
from helpers.utils.cli import JobError, agree, one_line
from helpers.data.order import EpochBatches
from helpers.data.images import BUILTIN_DATASETS, ImageFolderDataset, builtin_dataset
from helpers.utils.files import check_writable, remove_stale_temps
from helpers.data.latents import LatentFeatureDataset
from helpers.utils.locks import RunLock
from helpers.utils.log import LossFile
from helpers.utils.models import create_model, is_dit
from helpers.training.repa_objective import LatentsWithImages, build_repa
from helpers.training.flags import inherit_args, resolve_args, warn_changed_settings
from helpers.training.objectives import create_objective, objective_from_args
from helpers.training.runs import (Progress, check_no_later_checkpoints, create_run_dir, find_resume_checkpoint,
                          load_resume_checkpoint, resume_progress, run_dir_of, saved_args)
from helpers.utils.seeds import seed_everything
from helpers.data.vae import downsample_factor_of_spec, latent_channels, load_vae


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
        if args.repa:   # each latent with the image it came from, for the encoder
            images = ImageFolderDataset(args.data_path, args.image_size, random_flip=False, channels=3,
                                        allow_empty_classes=args.allow_empty_classes)
            dataset = LatentsWithImages(dataset, images)
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
    encodes = args.data_path and not args.feature_path
    vae = load_vae(args.vae, device) if (encodes or decodes) and args.vae != "none" else None
    args.in_channels = latent_channels(vae) if vae is not None else channels
    objective = create_objective(objective_from_args(args))
    model_kwargs = dict(input_size=side, in_channels=args.in_channels, num_classes=args.num_classes,
                        learn_sigma=objective.learn_sigma, **args.model_overrides)
    model = build_model(args, model_kwargs, vae_factor).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    net = model
    if args.repa:   # the projectors train with the model; the encoders stay frozen
        net, objective = build_repa(args, model, objective, device)
    if args.channels_last:
        fastpath.to_channels_last(net)   # before the optimizer: its buffers follow the layout
    ema = deepcopy(model).requires_grad_(False)   # EMA in fp32, never trained
    try:   # DiT's AdamW (lr 1e-4, no weight decay, torch's betas/eps), fastest kernel available
        opt = fastpath.make_adamw(net.parameters(), lr=args.lr, weight_decay=0,
                                  fused=fastpath.fused_choice(args.fused_adamw))
    except ValueError as e:
        raise JobError(f"--fused-adamw {args.fused_adamw}: {one_line(e)}; use --fused-adamw auto or off") from e
    if args.ckpt:
        load_initial_weights(args, model, ema)
    if checkpoint is not None:
        load_model_weights(model, checkpoint["model"], args.model)
        load_model_weights(ema, checkpoint["ema"], args.model)
        if args.repa:
            if "projector" not in checkpoint:
                raise JobError(f"{resume_path} was trained without --repa: it has no projector to resume; start a "
                               f"REPA run from its weights with --ckpt {resume_path}")
            net.projectors.load_state_dict(checkpoint["projector"])
        try:   # keeps this run's AdamW kernel (torch would take the checkpoint's fused/foreach flags)
            fastpath.load_optimizer_state(opt, checkpoint["opt"])
        except (ValueError, KeyError) as e:
            raise JobError(f"the optimizer state in {resume_path} does not fit {args.model}: {one_line(e)}") from e
        check_no_later_checkpoints(resume_path, int(checkpoint["step"]))
    return dict(checkpoint=checkpoint, vae=vae, dataset=dataset, model=model, net=net, ema=ema, opt=opt,
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
              model=built["model"], net=built["net"], ema=built["ema"], opt=built["opt"],
              objective=built["objective"],
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
    if args.model_domain:
        log.warning(f"--model-domain {args.model_domain} is the official script's flag and unused here: "
                    f"the model is --model {args.model}")


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
