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
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from helpers.training import flags as train_flags, setup as training
from helpers.utils.cli import EXIT_RUN_FAILED, JobError, run_main
from helpers.utils.distributed import cleanup_distributed, is_distributed, setup_distributed
from helpers.utils.fastpath import ema_update
from helpers.utils.log import RunLogger, ThroughputMeter
from helpers.training.monitor import Monitor
from helpers.training.objectives import per_sample_draws
from helpers.training.runs import checkpoint_path, restore_rng_state, save_checkpoint
from helpers.utils.seeds import derive_seed, seed_everything
from helpers.data.vae import encode


class DDPEngine:
    """What train.py's loop needs from its launcher: processes (torchrun), the model wrapper (DDP),
    backward, gradient clipping and autocast. train_accelerate.py supplies accelerate's instead."""

    scaler = None          # a GradScaler whose state is checkpointed (accelerate's fp16); none here
    mixed_precision = None

    def __init__(self):
        self.dist = setup_distributed()   # device from LOCAL_RANK, data and seeds from the global rank
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

    def forward(self, model, run):
        return training.training_forward(model, run, autocast=True)

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
    engine = engine or DDPEngine()
    args.mixed_precision = engine.mixed_precision   # accelerate's (saved with the run's flags); None here
    log = RunLogger(engine.dist.is_main)
    try:
        train(args, engine, log)
    except JobError as e:
        log.info(f"error: {e}")   # into log.txt as well, once the run folder exists
        raise
    finally:
        log.close()
        engine.close()   # train() has returned: its DDP model is unreferenced, so gloo tears down cleanly


def train(args, engine, log):
    # Set-up: every input is checked on every process before anything is written; then the run folder.
    run, progress = training.setup_run(args, engine.dist, log)
    monitor = Monitor(run, progress.step, resumed=progress.step > 0)   # live samples, FID, TensorBoard/W&B
    try:
        train_loop(args, engine, log, run, progress, monitor)
    finally:
        monitor.close()
        if run.lock is not None:
            run.lock.release()


def train_loop(args, engine, log, run, progress, monitor):
    device, world_size = run.device, run.world_size

    # Model and optimizer as the launcher runs them (DDP or accelerate), the forward as the objective
    # calls it (compile, autocast, channels_last); run.model stays the plain module the EMA follows.
    model, opt = engine.prepare(run.net, run.opt)
    log.info(engine.describe())
    forward = engine.forward(model, run)
    training.log_fast_path(run, compiled=args.compile or hasattr(model, "_orig_mod"),
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
    stats = torch.zeros(2 + len(terms), device=device)
    local_batch = args.global_batch_size // world_size

    while progress.step < target:
        for micro_batches in run.data.steps(progress.epoch, start_sample=progress.start_sample):
            # One training step: the objective's loss on each of the --grad-accum-steps micro-batches
            # (gradients synced on the last), backward, clip, AdamW, EMA.
            opt.zero_grad(set_to_none=True)
            loss, seen, term_values = 0.0, 0, [0.0] * len(terms)
            for k, batch in enumerate(micro_batches):
                x, model_kwargs, draws, images = prepare_batch(run, batch, progress.step)
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
            opt.step()
            ema_update(run.ema, run.model, training.ema_decay_at(args, progress.step))
            progress.step += 1
            progress.batch_in_epoch += 1

            # Loss summed over processes, skipped images counted: one small all_reduce and one host
            # sync per step, on purpose: every process must see a NaN at the same step and stop
            # together (one stopping alone would leave the others hanging in DDP's next all_reduce).
            stats[0], stats[1] = loss.float(), local_batch - seen
            for i, value in enumerate(term_values):
                stats[2 + i] = value
            if is_distributed():
                dist.all_reduce(stats)
            loss_sum, skipped, *term_sums = stats.tolist()
            loss_value = loss_sum / world_size
            if not math.isfinite(loss_value):
                last = (f"last good checkpoint: {checkpoint_path(run.run_dir, progress.last_saved)}"
                        if progress.last_saved is not None else "no checkpoint was saved yet")
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
                save_checkpoint(run, progress, steps_per_epoch, engine.scaler)
            if progress.step >= target:
                break
        else:   # the epoch's data ran out
            progress.epoch += 1
            progress.batch_in_epoch = progress.start_sample = 0
            continue
        break
    if progress.last_saved != progress.step:
        save_checkpoint(run, progress, steps_per_epoch, engine.scaler)
    bar.close()
    log.set_progress(None)
    log.info(f"Done: step {progress.step}, run folder {run.run_dir}")


def prepare_batch(run, batch, step):
    """(x, model_kwargs, draws, images) of one micro-batch on the device: images VAE-encoded as
    DiT's train.py (the clean images kept for REPA's encoder), and with --draws per-sample each
    sample's noise, time and label dropout drawn from (seed, step, its index), so the update is the
    same for every process count and accumulation."""
    if batch is None:
        raise JobError(f"every sample of a batch on process {run.rank} was unreadable (see the warnings above): "
                       f"remove the corrupt files")
    x, y, indices, *extra = batch
    x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
    images = extra[0].to(run.device, non_blocking=True) if extra else (x if not run.args.feature_path else None)
    if run.args.data_path and not run.args.feature_path and run.vae is not None:
        x = encode(run.vae, x)   # images -> latents (x 0.18215)
    model_kwargs, draws = dict(y=y), None
    if run.args.draws == "per-sample":
        draws, drop = per_sample_draws(run.objective, x, indices, run.args.global_seed, step,
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


def parse_args(argv=None, description="Train DiC/DiT with PyTorch DDP."):
    return train_flags.parse_args(train_flags.build_parser(description), argv)


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
