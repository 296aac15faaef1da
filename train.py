"""
Train DiC (or DiT) with PyTorch DDP: the official recipe (AdamW lr 1e-4, no weight decay, global
batch 256, EMA 0.9999, class dropout 0.1, 1000-step linear diffusion with learned sigma, TF32) on
class folders (VAE-encoded on the fly), precomputed latents, or a built-in pixel-space dataset.

    torchrun --nnodes=1 --nproc_per_node=8 train.py --model DiC-XL --data-path /path/to/imagenet/train
    torchrun --nproc_per_node=8 train.py --model DiC-XL --feature-path /path/to/features
    python train.py --model DiC-Tiny --dataset digits --global-batch-size 64 --max-steps 2000
    torchrun --nproc_per_node=8 train.py --model DiC-XL --feature-path ... --resume auto

A run never gets lost: checkpoints are written atomically and never overwritten; --resume continues
bit-for-bit (model, EMA, optimizer, data position, every process's RNG); a NaN loss stops every
process at once and names the last good checkpoint. train_accelerate.py runs this same loop
through Hugging Face accelerate.
"""
import math
import os
import sys
import warnings
from contextlib import contextmanager, nullcontext
from copy import deepcopy

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from helpers.data.order import EpochBatches
from helpers.data.vae import downsample_factor_of_spec, encode, latent_channels, load_vae
from helpers.training import flags as train_flags, runs, setup as training
from helpers.training.interruptions import naming_hung_ranks, stop_at_step
from helpers.training.monitor import Monitor
from helpers.training.objectives import create_objective, objective_from_args, per_sample_draws
from helpers.training.repa_objective import build_repa
from helpers.training.runs import Progress, last_good_checkpoint, restore_rng_state, save_checkpoint, saved_args
from helpers.utils import fastpath
from helpers.utils.cli import EXIT_RUN_FAILED, JobError, agree, run_main
from helpers.utils.distributed import (Heartbeat, cleanup_distributed, is_distributed,
                                      setup_distributed)
from helpers.utils.fastpath import ema_update
from helpers.utils.log import LossFile, RunLogger, ThroughputMeter
from helpers.utils.preemption import StopRequest
from helpers.utils.seeds import derive_seed, seed_everything

# DDP (ours and accelerate's) warns on every process when a 1x1 convolution's weight gradient comes
# back with other strides on its size-1 dimensions than its bucket view ([128, 1, 128, 128] against
# [128, 1, 1, 1], DiCo's 1x1 convolutions under bf16 autocast): strides of size-1 dimensions, the
# same memory order, so the warning is noise and is not shown.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class DDPEngine:
    """What train.py's loop needs from its launcher: processes (torchrun), the model wrapper (DDP),
    backward, gradient clipping and autocast. train_accelerate.py supplies accelerate's instead."""

    scaler = None          # a GradScaler whose state is checkpointed (accelerate's fp16); none here
    mixed_precision = None

    def __init__(self, timeout_minutes=None):
        self.dist = setup_distributed(timeout_minutes)   # device from LOCAL_RANK, data and seeds from the global rank
        asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if asked != "no" and self.dist.is_main:   # `accelerate launch --mixed_precision fp16 train.py`
            print(f"warning: accelerate launch asked for --mixed_precision {asked}, which train.py does not use: "
                  f"run train_accelerate.py for accelerate's mixed precision (or train.py --precision bf16)",
                  file=sys.stderr, flush=True)

    def prepare(self, model, opt):
        """DDP over the processes (`python train.py` is one process: no process group, no DDP)."""
        if is_distributed():
            device = self.dist.device
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        return model, opt

    def describe(self):
        return f"DDP: {self.dist.world_size} process(es) on {self.dist.device}"

    def forward(self, model, args, device):
        return training.training_forward(model, device, args.precision, args.compile, args.channels_last,
                                         autocast=True)

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def no_sync(self, model, sync):
        """DDP's no_sync for the micro-batches before the last of a step (no gradient all-reduce)."""
        return model.no_sync() if isinstance(model, DDP) and not sync else nullcontext()

    def close(self):
        cleanup_distributed()


def main(args, engine=None):
    """Train a model; a bad input or a failed run raises JobError (one line, an exit code)."""
    # Processes (torchrun, or accelerate's through `engine`) and the run log (rank 0).
    if not args.dist_timeout > 0:
        raise JobError(f"--dist-timeout must be a positive number of minutes, got {args.dist_timeout:g}")
    engine = engine or DDPEngine(args.dist_timeout)
    args.mixed_precision = engine.mixed_precision   # accelerate's (saved with the run's flags); None here
    dist_info = engine.dist
    log = RunLogger(dist_info.is_main)
    with closed_at_end(engine, log):
        locks = []   # rank 0 locks the run folder it will write, for the whole job
        try:
            # Resume: rank 0 finds the checkpoint --resume names, its run folder locked first.
            model_filter = args.model if "model" in args.explicit else None
            resume_path = agree(lambda: runs.locate_resume(args.resume, args.results_dir, model_filter, locks),
                                on_main_only=True)
            if args.resume == "auto" and resume_path is None:
                log.info(f"--resume auto: no checkpoint to resume in {args.results_dir}; starting a new run")
            # Every process checks every input and builds the same run; they agree before anything is written.
            built = agree(lambda: build(args, dist_info, resume_path))
            checkpoint = built["checkpoint"]
            # Run folder: the resumed run's, or a new <results>/<NNN>-<model>/, locked for the whole job.
            run_dir = agree(lambda: runs.open_run_dir(args.results_dir, args.model,
                                                      resume_path if checkpoint is not None else None, locks),
                            on_main_only=True)
        except BaseException:
            for lock in locks:
                lock.release()
            raise
        flags = train_flags.run_flags(args)   # the run's settings: args.json, checkpoints, the tracker
        if dist_info.is_main:   # the log into <run>/log.txt, the flags into <run>/args.json
            log.attach_file(os.path.join(run_dir, "log.txt"))
            runs.write_flags_file(run_dir, flags)

        # Data order: each process's share of every batch, in an order a resume can re-enter anywhere.
        data = EpochBatches(built["dataset"], dist_info.rank, dist_info.world_size, args.global_batch_size,
                            args.global_seed, args.num_workers, pin_memory=dist_info.device.type == "cuda",
                            accum_steps=args.grad_accum_steps)
        run = training.Run(device=dist_info.device, rank=dist_info.rank, world_size=dist_info.world_size, log=log,
                           run_dir=run_dir, model=built["model"], net=built["net"], ema=built["ema"],
                           opt=built["opt"], objective=built["objective"], vae=built["vae"], data=data,
                           model_kwargs=built["model_kwargs"], lock=(locks or [None])[-1],
                           loss_file=LossFile(os.path.join(run_dir, "losses.csv")) if dist_info.is_main else None)
        log_setup(args, run, resumed=checkpoint is not None)
        if built["classes_note"]:
            log.info(built["classes_note"])   # "N classes from <data> (...); --num-classes overrides"
        if run.is_main:
            runs.warn_if_disk_small(run_dir, runs.checkpoint_bytes(run.model, run.ema, run.net), log)

        # Resume: the position, and this process's RNG and GradScaler states, from the checkpoint.
        progress = Progress()
        if checkpoint is not None:
            train_flags.warn_changed_settings(args, saved_args(checkpoint), log)
            progress = training.resume_checkpoint_state(run, checkpoint, resume_path, args.global_batch_size,
                                                        args.draws)
        if run.loss_file is not None:
            run.loss_file.start(resume_step=progress.step if checkpoint is not None else None)

        # Live samples, FID, TensorBoard/W&B; then the training loop.
        monitor = Monitor(train_flags.monitor_config(args), run, progress.step, resumed=progress.step > 0,
                          flags=flags)
        try:
            heartbeat = Heartbeat(run.rank, run.world_size, progress.step)   # who reached which step
            with StopRequest() as stop, naming_hung_ranks(heartbeat, run, progress, args.dist_timeout):
                train_loop(args, flags, engine, log, run, progress, monitor, stop, heartbeat)   # stop: exit 75
        finally:
            monitor.close()
            if run.lock is not None:
                run.lock.release()


@contextmanager
def closed_at_end(engine, log):
    """A JobError goes into log.txt as well (once the run folder exists); the log and the processes
    are closed at the end."""
    try:
        yield
    except JobError as e:
        log.info(f"{e.label}: {e}")
        raise
    finally:
        log.close()
        engine.close()   # the loop has returned: its DDP model is unreferenced, so gloo tears down cleanly


def build(args, dist_info, resume_path):
    """Every process checks and builds the same things (no file written): the resumed checkpoint,
    the dataset and VAE, the model and EMA, the objective, the optimizer, their weights."""
    device, world_size, rank = dist_info.device, dist_info.world_size, dist_info.rank
    # Flags: those not given on the command line come from a resumed run's; each is checked.
    checkpoint = None
    if resume_path is not None:
        checkpoint = runs.load_resume_checkpoint(resume_path)
        train_flags.inherit_args(args, saved_args(checkpoint))
    train_flags.resolve_args(args, world_size)
    args.precision = fastpath.choose_precision(args.precision, device, args.mixed_precision)   # auto -> tf32
    seed_everything(args.global_seed * world_size + rank)   # DiT's per-process seed (model init, dropout)
    fastpath.configure_tf32(args.precision in ("tf32", "bf16"))   # as official DiT/DiC; off for fp32

    # Data, and the VAE that encodes --data-path images or decodes live samples.
    vae_factor = downsample_factor_of_spec(args.vae)
    dataset, channels, side, classes = training.build_dataset(train_flags.data_config(args), vae_factor)
    args.num_classes = classes.count   # --num-classes, the resumed run's, else the data's own (saved with the run)
    training.check_batch_fits(dataset, args.global_batch_size)
    decodes = args.sample_every or args.fid_every   # live samples and FID decode latents
    encodes = args.data_path and not args.feature_path
    vae = load_vae(args.vae, device) if (encodes or decodes) and args.vae != "none" else None
    args.in_channels = latent_channels(vae) if vae is not None else channels

    # Objective, model and EMA (with --repa: the projectors beside the model, the encoders frozen).
    objective = create_objective(objective_from_args(args))
    overrides = {"class_dropout_prob": args.class_dropout_prob, **args.model_overrides}   # flags.check_class_dropout
    model_kwargs = dict(input_size=side, in_channels=args.in_channels, num_classes=args.num_classes,
                        learn_sigma=objective.learn_sigma, **overrides)
    model = training.build_model(args.model, model_kwargs, args.image_size, vae_factor).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    net = model
    if args.repa:
        net, objective = build_repa(train_flags.repa_config(args), model, objective, device)
    if args.channels_last:
        fastpath.to_channels_last(net)   # before the optimizer: its buffers follow the layout
    ema = deepcopy(model).requires_grad_(False)   # EMA in fp32, never trained

    # Optimizer, and the weights: --ckpt's, or the resumed run's (with its optimizer state).
    opt = training.make_optimizer(net, args.lr, args.fused_adamw)
    if args.ckpt:   # ours, official or REPA's; REPA's projectors go to ours with --repa (helpers/utils/releases.py)
        from helpers.utils.releases import load_initial_weights
        load_initial_weights(args.ckpt, args.model, model, ema, net.projectors if net is not model else None)
    if checkpoint is not None:
        training.load_resume_weights(checkpoint, resume_path, args.model, model, ema, net, opt)
    return dict(checkpoint=checkpoint, vae=vae, dataset=dataset, model=model, net=net, ema=ema, opt=opt,
                objective=objective, model_kwargs=model_kwargs, classes_note=classes.note)


def start_training(args, engine, log, run, progress):
    """(model, optimizer, forward) as the launcher runs them; every RNG where a resume left it."""
    device = run.device

    # Model and optimizer as the launcher runs them (DDP or accelerate), the forward as the objective
    # calls it (compile, autocast, channels_last); run.model stays the plain module the EMA follows.
    model, opt = engine.prepare(run.net, run.opt)
    log.info(engine.describe())
    forward = engine.forward(model, args, device)
    training.log_fast_path(run, args.precision, args.channels_last,
                           compiled=args.compile or hasattr(model, "_orig_mod"),
                           accelerate_precision=engine.mixed_precision)

    # Resume: every process's RNG (and the GradScaler) exactly where the checkpoint left them.
    if progress.step > 0:
        if engine.scaler is not None and run.resume_scaler is not None:
            engine.scaler.load_state_dict(run.resume_scaler)
        if run.resume_rng is not None:
            restore_rng_state(run.resume_rng, device)
        else:
            seed_everything(derive_seed(args.global_seed, progress.step, run.rank))
    else:
        ema_update(run.ema, run.model, decay=0)   # the EMA starts as the (synced) initial weights
    run.model.train()   # important! This enables embedding dropout for classifier-free guidance
    run.ema.eval()      # EMA model should always be in eval mode
    return model, opt, forward


def train_loop(args, flags, engine, log, run, progress, monitor, stop=None, heartbeat=None):
    device, world_size = run.device, run.world_size
    model, opt, forward = start_training(args, engine, log, run, progress)
    steps_per_epoch = run.data.steps_per_epoch
    target = args.epochs * steps_per_epoch
    target = min(target, args.max_steps) if args.max_steps else target
    if progress.step >= target:
        log.info(f"Nothing to do: the run is at step {progress.step}, the target is {target} "
                 f"(raise --max-steps or --epochs to train further)")
        return
    log.info(f"Training for {args.epochs} epochs, up to step {target} ...")
    bar = tqdm(total=target, initial=progress.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (run.is_main and not args.no_progress and sys.stdout.isatty()))
    log.set_progress(None if bar.disable else bar)
    meter = ThroughputMeter(device)
    terms = run.objective.log_terms   # loss terms logged beside the loss (REPA: denoise, proj)
    stats = torch.zeros(3 + len(terms), device=device)   # loss, skipped images, stop requests, terms
    local_batch = args.global_batch_size // world_size

    while progress.step < target:
        for micro_batches in run.data.steps(progress.epoch, start_sample=progress.start_sample):
            # One training step: the objective's loss on each of the --grad-accum-steps micro-batches
            # (gradients synced on the last), backward, clip, AdamW, EMA.
            if heartbeat is not None:
                heartbeat.arrive(progress.step + 1)   # its data is here: on to the step's collectives
            opt.zero_grad(set_to_none=True)
            loss, seen, term_values = 0.0, 0, [0.0] * len(terms)
            for k, batch in enumerate(micro_batches):
                x, model_kwargs, draws, images = prepare_batch(args, run, batch, progress.step)
                with engine.no_sync(model, sync=k + 1 == len(micro_batches)):
                    losses = run.objective.training_losses(forward, x, model_kwargs, draws, images=images)
                    share = x.shape[0] / local_batch   # this micro-batch's share of the local batch
                    micro_loss = losses["loss"].mean() * share
                    engine.backward(micro_loss)
                loss, seen = loss + micro_loss.detach(), seen + x.shape[0]
                term_values = [v + losses[name].detach().mean() * share for v, name in zip(term_values, terms)]
            grad_norm = None
            if args.max_grad_norm or (monitor.tracker.enabled and (progress.step + 1) % args.log_every == 0):
                grad_norm = engine.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
            training.set_lr(opt, training.lr_at(progress.step, args.lr, args.lr_schedule, target))
            opt.step()
            ema_update(run.ema, run.model, training.ema_decay_at(progress.step, args.ema_decay, args.ema_warmup))
            progress.step += 1
            progress.batch_in_epoch += 1

            # Loss summed over processes, skipped images and stop signals counted: one small all_reduce
            # and one host sync per step, on purpose: every process must see a NaN or a stop request at
            # the same step and stop together (one stopping alone would leave the others hanging).
            stats[0], stats[1], stats[2] = loss.float(), local_batch - seen, float(bool(stop and stop.requested))
            for i, value in enumerate(term_values):
                stats[3 + i] = value
            if is_distributed():
                dist.all_reduce(stats)
            loss_sum, skipped, stops, *term_sums = stats.tolist()
            loss_value = loss_sum / world_size
            if not math.isfinite(loss_value):
                last = last_good_checkpoint(run.run_dir, progress.last_saved)
                raise JobError(f"loss became {loss_value} at step {progress.step}; {last} (resume it with "
                               f"--resume, e.g. with a lower --lr or a --max-grad-norm)", code=EXIT_RUN_FAILED)
            progress.loss_sum += loss_value
            progress.loss_steps += 1
            for name, value in zip(terms, term_sums):
                progress.term_sums[name] = progress.term_sums.get(name, 0.0) + value / world_size
            progress.skipped += int(skipped)
            meter.update(1, args.global_batch_size - int(skipped))
            bar.update(1)

            # Log loss values, show progress (grids, FID, curves) and save checkpoints.
            scalars = None
            if progress.step % args.log_every == 0:
                scalars = log_window(run, progress, meter, opt, grad_norm)
            monitor.after_step(progress.step, scalars)
            if progress.step % args.ckpt_every == 0 or progress.step >= target:
                save_checkpoint(run, progress, steps_per_epoch, flags, args.global_batch_size, engine.scaler)
            if progress.step >= target:
                break
            if stops:   # preempted: this step saved by rank 0, then every process exits 75
                stop_at_step(run, progress, steps_per_epoch, flags, args.global_batch_size, engine.scaler, stop)
        else:   # the epoch's data ran out
            progress.epoch += 1
            progress.batch_in_epoch = progress.start_sample = 0
            continue
        break
    if progress.last_saved != progress.step:
        save_checkpoint(run, progress, steps_per_epoch, flags, args.global_batch_size, engine.scaler)
    bar.close()
    log.set_progress(None)
    log.info(f"Done: step {progress.step}, run folder {run.run_dir}")


def prepare_batch(args, run, batch, step):
    """(x, model_kwargs, draws, images) of one micro-batch on the device: images VAE-encoded as
    DiT's train.py (the clean images kept for REPA's encoder), and with --draws per-sample each
    sample's noise, time and label dropout drawn from (seed, step, its index), so the update is the
    same for every process count and accumulation."""
    if batch is None:
        raise JobError(f"every sample of a batch on process {run.rank} was unreadable (see the warnings above): "
                       f"remove the corrupt files")
    x, y, indices, *extra = batch
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    images = extra[0].to(run.device, non_blocking=True) if extra else (x if not args.feature_path else None)
    if args.data_path and not args.feature_path and run.vae is not None:
        x = encode(run.vae, x)   # images -> latents (x 0.18215)
    model_kwargs, draws = dict(y=y), None
    if args.draws == "per-sample":
        draws, drop = per_sample_draws(run.objective, x, indices, args.global_seed, step,
                                       run.model.class_dropout_prob)
        if drop is not None:
            model_kwargs["force_drop_ids"] = drop
    return x, model_kwargs, draws, images


def log_window(run, progress, meter, opt, grad_norm):
    """DiT's log line (loss averaged over processes and the window's steps) and a losses.csv row;
    returns the scalars a tracker logs."""
    avg_loss = progress.loss_sum / progress.loss_steps
    steps_per_sec, images_per_sec = meter.rates()
    terms = {name: total / progress.loss_steps for name, total in progress.term_sums.items()}
    line = (f"(step={progress.step:07d}) Train Loss: {avg_loss:.4f}"
            + "".join(f", {name.capitalize()} Loss: {value:.4f}" for name, value in terms.items())
            + f", Train Steps/Sec: {steps_per_sec:.2f}, Images/Sec: {images_per_sec:.1f}")
    if progress.skipped:
        line += f", Skipped Corrupt Images: {progress.skipped}"
    run.log.info(line)
    if run.loss_file is not None:
        run.loss_file.append(progress.step, avg_loss, steps_per_sec, images_per_sec, progress.epoch)
    progress.loss_sum, progress.loss_steps, progress.term_sums = 0.0, 0, {}
    meter.reset()
    scalars = {"loss": avg_loss, **{f"loss_{name}": v for name, v in terms.items()},
               "lr": opt.param_groups[0]["lr"], "steps_per_sec": steps_per_sec,
               "images_per_sec": images_per_sec, "peak_memory_gb": peak_memory_gb(run.device)}
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    return scalars


def peak_memory_gb(device):
    """Peak memory of this process so far: the CUDA allocator's, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def log_setup(args, run, resumed):
    """The set-up's log lines: folder, command, model, data, objective and optimisation."""
    log = run.log
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
    log.info(f"Objective: {run.objective.config()}; VAE: {args.vae}; precision: {args.precision}; lr {args.lr} "
             f"({args.lr_schedule}); "
             f"EMA decay {args.ema_decay}{f'; grad clip {args.max_grad_norm}' if args.max_grad_norm else ''}")
    log.info(fastpath.precision_line(args.precision, fastpath.bf16_support(run.device), args.mixed_precision))
    if args.ckpt:
        log.info(f"Initialised model and EMA weights from {args.ckpt}")
    if args.model_domain:
        log.warning(f"--model-domain {args.model_domain} is the official script's flag and unused here: "
                    f"the model is --model {args.model}")


def parse_args(argv=None, description="Train DiC/DiT with PyTorch DDP."):
    return train_flags.parse_args(train_flags.build_parser(description), argv)


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
