"""How a training run shows how it is going: scalars and sample grids to TensorBoard (event files
in <run_dir>/tensorboard/) and, optionally, Weights & Biases (run folder in <run_dir>/wandb/).

    tracker = Tracker(run_dir, tensorboard=True, wandb=args.wandb, config=vars(args),
                      resume_step=resumed_step, enabled=rank == 0)
    tracker.log_scalars(step, {"loss/mse": 0.12, "lr": 1e-4})
    tracker.log_image(step, "samples/live", grid_uint8_hwc)     # or a path to a PNG
    tracker.close()

A resumed run continues the same curves, each step once. TensorBoard: the writer opens with
purge_step = resume_step + 1, so the killed run's events after the checkpoint are dropped by
readers and the resumed run's values stand. W&B cannot rewind an offline run, so it resumes the
same run id (kept in <run_dir>/tracking.json) and skips steps it already logged: those keep the
killed run's values. WANDB_MODE=offline (or wandb_mode="offline") needs no account.
"""
import json
import os
import secrets

import numpy as np

from helpers.utils.cli import JobError
from helpers.utils.files import atomic_write_text

STATE_FILE = "tracking.json"   # {"wandb_run_id": str, "wandb_last_step": int}
FLUSH_SECS = 30                # at most this much TensorBoard history is lost to a kill


def _import_wandb():
    """wandb is optional: imported only when asked for, with a one-line fix if missing."""
    try:
        import wandb
    except ImportError:
        raise JobError("--wandb needs the wandb package, which is not installed: pip install "
                       "wandb (or leave out --wandb)") from None
    return wandb


def _summary_writer(log_dir, purge_step):
    """torch's SummaryWriter, with a one-line fix if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise JobError("TensorBoard logging needs the tensorboard package: pip install "
                       "'tensorboard>=2.10' (or pass --no-tensorboard)") from None
    return SummaryWriter(log_dir=log_dir, purge_step=purge_step, flush_secs=FLUSH_SECS)


def as_image(image):
    """A uint8 (H, W, 3) array from an array or an image file (what both backends take)."""
    if isinstance(image, (str, os.PathLike)):
        from PIL import Image
        try:
            with Image.open(image) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, ValueError) as e:
            raise JobError(f"cannot read image {os.fspath(image)}: {e}") from None
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise JobError(f"an image to log must be uint8 (H, W, 3), got {array.dtype} "
                       f"{tuple(array.shape)}: convert it (e.g. helpers.data.images) before logging")
    return array


def as_scalars(values):
    """{name: float} from numbers, 0-d arrays or tensors, naming the value that is not one."""
    scalars = {}
    for name, value in values.items():
        try:
            scalars[str(name)] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError):
            raise JobError(f"tracked value {name!r} is not a number: {value!r}") from None
    return scalars


class Tracker:
    """TensorBoard and/or W&B logging of one run, on the main process only (enabled=False makes
    every call a no-op, so the other ranks can hold one too)."""

    def __init__(self, run_dir, tensorboard=True, wandb=False, wandb_project=None,
                 wandb_entity=None, config=None, resume_step=None, wandb_mode=None,
                 enabled=True):
        self.run_dir = os.fspath(run_dir)
        self.enabled = enabled and (tensorboard or wandb)
        self.writer, self.wandb_run = None, None
        self._state_path = os.path.join(self.run_dir, STATE_FILE)
        self._state = {}
        if not self.enabled:
            return
        if resume_step is not None and int(resume_step) < 0:
            raise JobError(f"resume step {resume_step} is negative: pass the step of the "
                           f"checkpoint the run resumes from")
        os.makedirs(self.run_dir, exist_ok=True)
        if tensorboard:
            purge = None if resume_step is None else int(resume_step) + 1
            self.writer = _summary_writer(os.path.join(self.run_dir, "tensorboard"), purge)
            if resume_step is None and config:
                self.writer.add_text("config", _config_markdown(config), 0)
        if wandb:
            self._start_wandb(wandb_project, wandb_entity, config, resume_step, wandb_mode)

    def _start_wandb(self, project, entity, config, resume_step, mode):
        """A new W&B run, or the run of the stored id when resuming (its steps kept)."""
        wandb = _import_wandb()
        stored = self._read_state() if resume_step is not None else {}
        run_id = stored.get("wandb_run_id") or secrets.token_hex(4)
        self._state = {"wandb_run_id": run_id,
                       "wandb_last_step": int(stored.get("wandb_last_step", -1))}
        self._floor = self._state["wandb_last_step"]
        self._write_state()
        self.wandb_run = wandb.init(project=project or "DiC", entity=entity, config=config,
                                    dir=self.run_dir, id=run_id, resume="allow", mode=mode)

    def _read_state(self):
        """The stored W&B run id and last step ({} if the run never used W&B)."""
        if not os.path.exists(self._state_path):
            return {}
        try:
            with open(self._state_path, encoding="utf-8") as f:
                state = json.load(f)
            return {"wandb_run_id": str(state["wandb_run_id"]),
                    "wandb_last_step": int(state["wandb_last_step"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JobError(f"{self._state_path} is unreadable ({e}): delete it to start a new "
                           f"W&B run for this folder") from None

    def _write_state(self):
        atomic_write_text(self._state_path, json.dumps(self._state) + "\n", overwrite=True)

    def _wandb_log(self, step, data):
        """Log to W&B unless the killed run already logged this step (self._floor)."""
        if step <= self._floor:
            return
        self.wandb_run.log(data, step=step)
        if step > self._state["wandb_last_step"]:
            self._state["wandb_last_step"] = step
            self._write_state()

    def log_scalars(self, step, values):
        """Scalars (loss terms, lr, grad norm, images/s, memory, FID) at a training step."""
        if not self.enabled:
            return
        step, scalars = int(step), as_scalars(values)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self._wandb_log(step, scalars)

    def log_image(self, step, name, image):
        """One image (a live sample grid) at a training step: a uint8 HWC array or a file."""
        if not self.enabled:
            return
        step, array = int(step), as_image(image)
        if self.writer is not None:
            self.writer.add_image(name, array, step, dataformats="HWC")
        if self.wandb_run is not None:
            import wandb
            self._wandb_log(step, {name: wandb.Image(array)})

    def flush(self):
        """Write pending TensorBoard events now (e.g. before a checkpoint)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self):
        """Flush and close both backends; safe to call twice."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _config_markdown(config):
    """The run's configuration as a TensorBoard text block (a JSON code block)."""
    return "```\n" + json.dumps(config, indent=2, sort_keys=True, default=str) + "\n```"
