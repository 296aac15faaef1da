"""Rank-0 logging for the trainers: stdout + <run>/log.txt, a machine-readable loss file, throughput.

Only the main process writes. Lines logged before the run folder exists (while the inputs are
still being validated) are kept in memory and written to log.txt once the folder is made, so a
run that fails validation leaves nothing on disk.
"""
import csv
import io
import logging
import os
import sys
import time

import torch

from helpers.utils.files import atomic_write_text

LOSS_FIELDS = ("step", "loss", "steps_per_sec", "images_per_sec", "epoch")


class _ConsoleHandler(logging.StreamHandler):
    """Writes to stdout, through tqdm.write while a progress bar is on screen (keeps the bar intact)."""

    progress = None

    def emit(self, record):
        if self.progress is not None:
            try:
                self.progress.write(self.format(record), file=sys.stdout)
                return
            except Exception:  # noqa: BLE001 - fall back to a plain write
                pass
        super().emit(record)


class _BufferHandler(logging.Handler):
    """Keeps formatted lines until the run folder exists."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


class RunLogger:
    """DiT-style logger: `[time] message` to stdout and <run>/log.txt on rank 0; silent elsewhere."""

    def __init__(self, is_main=True, name="dic.train"):
        self.is_main = is_main
        self.logger = logging.getLogger(f"{name}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.console = None
        self.buffer = None
        if is_main:
            fmt = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s" if sys.stdout.isatty()
                                    else "[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
            self.console = _ConsoleHandler(sys.stdout)
            self.console.setFormatter(fmt)
            self.logger.addHandler(self.console)
            self.buffer = _BufferHandler()
            self.buffer.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
            self.logger.addHandler(self.buffer)
        else:
            self.logger.addHandler(logging.NullHandler())

    def info(self, message):
        self.logger.info(message)

    def warning(self, message):
        self.logger.warning(f"warning: {message}")

    def attach_file(self, path):
        """Start writing to `path` (appending), after the lines logged so far."""
        if not self.is_main:
            return
        file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        file_handler.setFormatter(self.buffer.formatter)
        with open(path, "a", encoding="utf-8") as f:
            for line in self.buffer.lines:
                f.write(line + "\n")
        self.logger.removeHandler(self.buffer)
        self.buffer = None
        self.logger.addHandler(file_handler)

    def set_progress(self, bar):
        if self.console is not None:
            self.console.progress = bar

    def close(self):
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)


class LossFile:
    """`<run>/losses.csv`: one row per log line (step, loss averaged over processes and steps, speed).

    On resume the rows after the resumed step describe training that was thrown away, so they are
    dropped (log.txt keeps the full history); the rest stays byte-for-byte.
    """

    def __init__(self, path):
        self.path = path

    def start(self, resume_step=None):
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            kept = [r for r in rows if int(r["step"]) <= resume_step]
            if len(kept) != len(rows):
                buf = io.StringIO()
                writer = csv.DictWriter(buf, fieldnames=LOSS_FIELDS, lineterminator="\n")
                writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in LOSS_FIELDS} for r in kept)
                atomic_write_text(self.path, buf.getvalue(), overwrite=True)
        if not os.path.exists(self.path):
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(",".join(LOSS_FIELDS) + "\n")

    def append(self, step, loss, steps_per_sec, images_per_sec, epoch):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{step},{loss!r},{steps_per_sec:.4f},{images_per_sec:.2f},{epoch}\n")


def read_losses(path):
    """(steps, losses) from a losses.csv, for tests and loss-curve plots."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


class ThroughputMeter:
    """Steps/sec and images/sec since the last reset (waits for the GPU so the numbers are real)."""

    def __init__(self, device=None):
        self.device = device
        self.reset()

    def _sync(self):
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self):
        self._sync()
        self.start = time.perf_counter()
        self.steps = 0
        self.images = 0

    def update(self, steps, images):
        self.steps += steps
        self.images += images

    def rates(self):
        """(steps/sec, images/sec) over the current window."""
        self._sync()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.steps / elapsed, self.images / elapsed
