"""Run a script of the repo with test-only fault and tracing hooks patched in from outside, so the
scripts themselves carry no test flags. Used by the tests as `python tests/hooked.py SCRIPT ARGS...`
(also under torchrun). The hooks, each switched on by a test-only environment variable:

    DIC_TEST_NAN_AT_STEP=K          global rank 0's loss becomes NaN at training step K
    DIC_TEST_LOG_SAMPLES=FOLDER     each process appends "step epoch index..." for every batch it
                                    trains on to FOLDER/debug_samples_rank<r>.txt
    DIC_TEST_SIGNAL_AT_STEP=K:SIG   global rank 0, as its training step K starts, sends signal SIG (e.g.
                                    SIGTERM) to its launcher (torchrun, which forwards it to every
                                    worker), or to itself when it has none
    DIC_TEST_SLEEP_AT_STEP=K:R:S    global rank R's data loader sleeps S seconds before step K's batches
    DIC_TEST_EXIT_AFTER_BATCHES=N   sampling exits abruptly (os._exit(3), as if killed) before
                                    generating its batch N + 1
"""
import os
import runpy
import signal
import time
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from helpers.data import order as data_order  # noqa: E402
from helpers.sampling import generation as sampling  # noqa: E402
from helpers.training import objectives, runs  # noqa: E402


def rank():
    return int(os.environ.get("RANK", "0"))


def nan_at_step(step):
    original = objectives.DDPM.training_losses
    calls = {"n": 0}

    def training_losses(self, model, x, model_kwargs=None, draws=None, **kwargs):
        calls["n"] += 1
        losses = original(self, model, x, model_kwargs, draws, **kwargs)
        if calls["n"] == step and rank() == 0:
            losses["loss"] = losses["loss"] * float("nan")
        return losses
    objectives.DDPM.training_losses = training_losses


def at_step(step, action):
    """Call action() as the training step `step` starts (the objective's call number `step`)."""
    original = objectives.DDPM.training_losses
    calls = {"n": 0}

    def training_losses(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            action()
        return original(self, *args, **kwargs)
    objectives.DDPM.training_losses = training_losses


def signal_at_step(spec):
    step, name = spec.split(":")
    launched = "TORCHELASTIC_RUN_ID" in os.environ
    if rank() == 0:
        at_step(int(step), lambda: os.kill(os.getppid() if launched else os.getpid(), getattr(signal, name)))


def sleep_at_step(spec):
    """A data loader stuck for `seconds` before the batches of step `step` (1-based, this run's)."""
    step, who, seconds = spec.split(":")
    original = data_order.EpochBatches.steps
    state = {"n": 0}

    def steps(self, *args, **kwargs):
        for micro_batches in original(self, *args, **kwargs):
            state["n"] += 1
            if state["n"] == int(step) and rank() == int(who):
                time.sleep(float(seconds))
            yield micro_batches
    data_order.EpochBatches.steps = steps


def log_samples(folder):
    state = {"step": 0}
    original_resume, original_epoch = runs.resume_progress, data_order.EpochBatches.epoch

    def resume_progress(*args, **kwargs):
        progress = original_resume(*args, **kwargs)
        state["step"] = progress.step
        return progress

    def epoch(self, epoch, start_sample=0):
        path = os.path.join(folder, f"debug_samples_rank{rank()}.txt")
        for batch in original_epoch(self, epoch, start_sample):
            state["step"] += 1
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{state['step']} {epoch} {' '.join(str(int(i)) for i in batch[2])}\n")
            yield batch
    runs.resume_progress = resume_progress
    data_order.EpochBatches.epoch = epoch


def exit_after_batches(n):
    original = sampling.generate
    calls = {"n": 0}

    def generate(*args, **kwargs):
        if calls["n"] >= n:
            print(f"[rank {rank()}] DIC_TEST_EXIT_AFTER_BATCHES={n}: exiting now", flush=True)
            os._exit(3)
        calls["n"] += 1
        return original(*args, **kwargs)
    sampling.generate = generate


if __name__ == "__main__":
    if os.environ.get("DIC_TEST_NAN_AT_STEP"):
        nan_at_step(int(os.environ["DIC_TEST_NAN_AT_STEP"]))
    if os.environ.get("DIC_TEST_SIGNAL_AT_STEP"):
        signal_at_step(os.environ["DIC_TEST_SIGNAL_AT_STEP"])
    if os.environ.get("DIC_TEST_SLEEP_AT_STEP"):
        sleep_at_step(os.environ["DIC_TEST_SLEEP_AT_STEP"])
    if os.environ.get("DIC_TEST_LOG_SAMPLES"):
        log_samples(os.environ["DIC_TEST_LOG_SAMPLES"])
    if os.environ.get("DIC_TEST_EXIT_AFTER_BATCHES"):
        exit_after_batches(int(os.environ["DIC_TEST_EXIT_AFTER_BATCHES"]))
    script = os.path.join(REPO_ROOT, sys.argv[1])
    sys.argv = [script] + sys.argv[2:]
    runpy.run_path(script, run_name="__main__")
