"""Run folders and training checkpoints: where a run lives, what a checkpoint holds, and how a
resumed run finds its place again.

    results/<NNN>-<model>/            one run (DiT's naming)
        log.txt  losses.csv  args.json
        checkpoints/<step:07d>.pt     written atomically, never overwritten

A checkpoint keeps DiT's keys ("model", "ema", "opt", "args") so DiT/DiC tools read it, and beside
them the exact-resume state: step, data position, every process's RNG state, GradScaler, loss
window. It holds tensors and plain Python values only (args as a dict, RNG states as tensors), so
`torch.load(path)` with its default weights_only=True reads it.
"""
import argparse
import json
import os
import random
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from helpers.utils import fastpath
from helpers.utils.checkpoint import atomic_save, load_checkpoint_file, tensor_bytes
from helpers.utils.cli import EXIT_RUN_FAILED, JobError
from helpers.utils.distributed import broadcast_object, gather_objects
from helpers.utils.files import check_writable, free_bytes, megabytes, remove_stale_temps
from helpers.utils.locks import RunLock

CHECKPOINT_FORMAT = "dic-train-2"   # 2: args as a dict, RNG states as tensors, the objective recorded
RESUME_KEYS = ("model", "ema", "opt", "args", "step", "epoch", "batch_in_epoch", "rng")
CKPT_NAME = re.compile(r"^(\d{7,})\.pt$")
RUN_NAME = re.compile(r"^(\d+)-(.+)$")


@dataclass
class Progress:
    """Where a run stands; everything here is saved and restored for an exact resume."""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0        # batches of `epoch` trained so far
    start_sample: int = 0          # samples of `epoch` to skip when its data starts (after a resume)
    loss_sum: float = 0.0          # losses of the current --log-every window
    loss_steps: int = 0
    term_sums: dict = field(default_factory=dict)   # the objective's log_terms over the window
    skipped: int = 0               # corrupt images skipped so far
    last_saved: Optional[int] = None


#################################################################################
#                                  Run folders                                  #
#################################################################################

def model_tag(model_name):
    return model_name.replace("/", "-")   # DiT-XL/2 -> DiT-XL-2, as DiT names its folders


def checkpoint_path(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


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


def run_dir_of(path):
    """The run folder a checkpoint belongs to (`<run>/checkpoints/<step>.pt`), or None."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None


def find_resume_checkpoint(spec, results_dir, model_name=None):
    """Checkpoint path for --resume: a file, a run folder (its newest), or 'auto' (newest checkpoint of
    the newest run, of `model_name` if given). None for 'auto' when there is nothing to resume."""
    if spec == "auto":
        runs = list_runs(results_dir, model_name)
        checkpoints = list_checkpoints(runs[-1]) if runs else []
        return checkpoints[-1][1] if checkpoints else None
    if os.path.isfile(spec):
        return spec
    if os.path.isdir(spec):
        for run_dir in (spec, os.path.dirname(os.path.abspath(spec))):   # a run folder or its checkpoints/
            checkpoints = list_checkpoints(run_dir)
            if checkpoints:
                return checkpoints[-1][1]
        raise JobError(f"--resume {spec}: the folder holds no checkpoints (checkpoints/NNNNNNN.pt)")
    raise JobError(f"--resume {spec}: no such checkpoint or run folder; pass a .pt file, a run folder, or auto")


def locate_resume(resume, results_dir, model_filter, locks):
    """Rank 0: the checkpoint --resume names (None: none), its run folder locked first (so no other
    job writes a newer checkpoint meanwhile, and two resumes of one run never both go ahead); `locks`
    gets the lock. Checks first that the results folder can be written (errors before work)."""
    check_writable(results_dir, folder=True, keep_folder=False)
    if not resume:
        return None
    path = find_resume_checkpoint(resume, results_dir, model_filter)
    run_dir = run_dir_of(path) if path else None
    if run_dir is None:
        return path
    locks.append(RunLock(run_dir, what="training").acquire())
    return find_resume_checkpoint(resume, results_dir, model_filter)   # newest, now that it is ours


def open_run_dir(results_dir, model_name, resume_path, locks):
    """Rank 0: the resumed run's folder, or a new `<results>/<NNN>-<model>/`; locked (`locks` gets a
    new lock), and cleared of the temp files of writes a killed job left."""
    run_dir = run_dir_of(resume_path) if resume_path is not None else None
    if run_dir is None:
        run_dir = create_run_dir(results_dir, model_name)
        locks.append(RunLock(run_dir, what="training").acquire())
    removed = remove_stale_temps(os.path.join(run_dir, "checkpoints"))
    if removed:
        print(f"Removed {removed} temp file(s) of an interrupted checkpoint write in {run_dir}", flush=True)
    return run_dir


def write_flags_file(run_dir, flags):
    """<run>/args.json: the run's flags as it started (kept as is on resume)."""
    args_file = os.path.join(run_dir, "args.json")
    if not os.path.exists(args_file):
        with open(args_file, "w", encoding="utf-8") as f:
            json.dump(flags, f, indent=2, default=str)


#################################################################################
#                          RNG states as plain tensors                          #
#################################################################################

def plain_rng_state(state):
    """An RNG state dict with NumPy's and Python's states as tensors and ints (format 1 held tuples)."""
    state = dict(state)
    if isinstance(state.get("numpy"), tuple):
        _, keys, pos, has_gauss, gauss = state["numpy"]
        state["numpy"] = {"keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}
    if isinstance(state.get("python"), tuple):
        version, values, gauss = state["python"]
        state["python"] = {"version": version, "state": torch.tensor(values, dtype=torch.int64), "gauss": gauss}
    return state


def capture_rng_state(device):
    """This process's torch (CPU and its GPU), NumPy and Python RNG states, as tensors and ints."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return plain_rng_state(state)


def restore_rng_state(state, device):
    """Put back a state from capture_rng_state (or the tuples that format 1 checkpoints hold)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = ("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    python_state = state["python"]
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss"])
    random.setstate(python_state)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


#################################################################################
#                           Saving and reading back                             #
#################################################################################

def plain_values(flags):
    """The run's flags (a dict) as plain values (what weights_only loading accepts)."""
    def plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v) for v in value)
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return str(value)
    return {key: plain(value) for key, value in flags.items()}


def saved_args(checkpoint):
    """The training flags a checkpoint carries, as a dict ({} if none): format 2's dict, format 1's
    and DiT's argparse.Namespace, or an exported .safetensors file's metadata."""
    if not isinstance(checkpoint, dict):
        return {}
    metadata = checkpoint.get("metadata")
    saved = metadata.get("args") if isinstance(metadata, dict) else checkpoint.get("args")
    if isinstance(saved, dict):
        return dict(saved)
    return dict(vars(saved)) if isinstance(saved, argparse.Namespace) else {}


def save_checkpoint(run, progress, steps_per_epoch, flags, global_batch_size, scaler=None):
    """Gather every process's RNG state; rank 0 writes `<run>/checkpoints/<step:07d>.pt` atomically
    (never over an existing file), the run's `flags` (a dict) under "args"; everyone waits for it.
    A failed write (e.g. a full disk) ends every process with the same one line, naming the last
    good checkpoint (the previous file is intact). Returns the path."""
    states = gather_objects(capture_rng_state(run.device))
    path = checkpoint_path(run.run_dir, progress.step)
    checkpoint = None
    if run.is_main:
        epoch, batch_in_epoch = progress.epoch, progress.batch_in_epoch
        if batch_in_epoch >= steps_per_epoch:   # a finished epoch counts as the next one's start
            epoch, batch_in_epoch = epoch + 1, 0
        checkpoint = {
            # DiT's keys, in the default memory layout whatever the fast path: they load anywhere.
            "model": fastpath.contiguous_state_dict(run.model.state_dict()),
            "ema": fastpath.contiguous_state_dict(run.ema.state_dict()),
            "opt": fastpath.contiguous_optimizer_state(run.opt.state_dict()),
            "args": plain_values(flags),
            "objective": run.objective.config(),
            "model_kwargs": run.model_kwargs,
            # Exact-resume state.
            "step": progress.step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "global_batch_size": global_batch_size, "world_size": len(states),
            "rng": states,                                  # one per process, in rank order
            "scaler": scaler.state_dict() if scaler is not None else None,
            "loss_window": {"sum": progress.loss_sum, "steps": progress.loss_steps, "terms": dict(progress.term_sums)},
            "skipped_images": progress.skipped,
            "fast_path": run.fast_path,                     # which speed options wrote it (information)
            "format": CHECKPOINT_FORMAT,
        }
        if run.net is not run.model:   # --repa: the projectors are training state (not sampled with)
            checkpoint["projector"] = fastpath.contiguous_state_dict(run.net.projectors.state_dict())
    failure = save_on_main(run, checkpoint, path)
    if failure is not None:   # every process: the same line, the same exit code
        raise JobError(f"{failure[0]}; {last_good_checkpoint(run.run_dir, progress.last_saved)}", code=failure[1])
    progress.last_saved = progress.step
    return path


def last_good_checkpoint(run_dir, last_saved):
    """What every message of a run that ends early says of its checkpoints (NaN, full disk, hung rank)."""
    if last_saved is None:
        return "no checkpoint was saved yet"
    return f"last good checkpoint: {checkpoint_path(run_dir, last_saved)}"


def save_on_main(run, checkpoint, path):
    """Rank 0 writes `checkpoint`; every process gets (message, exit code) of its failure, or None
    (the broadcast is the barrier)."""
    failure = None
    if run.is_main:
        try:
            atomic_save(checkpoint, path)
            run.log.info(f"Saved checkpoint to {path}")
        except JobError as e:   # a full disk (NoSpaceError), an existing file
            failure = (str(e), e.code)
        except OSError as e:
            failure = (f"cannot write {path}: {e.strerror or e}", EXIT_RUN_FAILED)
    return broadcast_object(failure)


def checkpoint_bytes(model, ema, net):
    """About a checkpoint's size: the model and EMA weights and AdamW's two moments per trained
    parameter (the RNG states and flags are small)."""
    trained = sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
    return tensor_bytes(model.state_dict()) + tensor_bytes(ema.state_dict()) + 3 * trained - \
        sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def warn_if_disk_small(run_dir, nbytes, log):
    """Warn when `run_dir`'s disk cannot hold two checkpoints of `nbytes` (the next one is written
    beside the last good one)."""
    try:
        free = free_bytes(run_dir)
    except OSError:
        return
    if free < 2 * nbytes:
        log.warning(f"the disk of {run_dir} has {megabytes(free)} MB free, less than two checkpoints "
                    f"(about {megabytes(nbytes)} MB each): free some space or choose another --results-dir")


def load_resume_checkpoint(path):
    """Read a checkpoint to resume (memory-mapped: every process shares the pages) and check that it
    holds a training state."""
    checkpoint = load_checkpoint_file(path, mmap=True)
    if not isinstance(checkpoint, dict) or "step" not in checkpoint or "rng" not in checkpoint:
        raise JobError(f"checkpoint {path} has no training state (step, data position, RNG): it cannot be "
                       f"resumed exactly; use --ckpt {path} to start a new run from its weights")
    missing = [k for k in RESUME_KEYS if k not in checkpoint]
    if missing:
        raise JobError(f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete and cannot be resumed; "
                       f"resume an earlier checkpoint of the run")
    return checkpoint


def check_no_later_checkpoints(path, step):
    """Resuming an older checkpoint of a run would write over its later ones: refuse."""
    run_dir = run_dir_of(path)
    later = [p for s, p in list_checkpoints(run_dir) if s > step] if run_dir else []
    if later:
        raise JobError(f"{os.path.basename(later[0])} is newer than {path}: resuming would write over that "
                       f"run's later checkpoints; resume the newest (--resume auto) or move the later ones away")


def resume_progress(checkpoint, global_batch_size, log):
    """The Progress a resumed run continues from (the data position re-expressed in this run's
    global batch, if it changed)."""
    samples_done = int(checkpoint["batch_in_epoch"]) * int(checkpoint.get("global_batch_size", global_batch_size))
    if samples_done % global_batch_size:
        log.warning(f"the resumed epoch is {samples_done} samples in, not a whole number of batches of "
                    f"{global_batch_size}: starting that epoch's data after sample {samples_done}")
    window = checkpoint.get("loss_window") or {}
    step = int(checkpoint["step"])
    return Progress(step=step, epoch=int(checkpoint["epoch"]), batch_in_epoch=samples_done // global_batch_size,
                    start_sample=samples_done, loss_sum=float(window.get("sum", 0.0)),
                    loss_steps=int(window.get("steps", 0)), term_sums=dict(window.get("terms", {})),
                    skipped=int(checkpoint.get("skipped_images", 0)),
                    last_saved=step)
