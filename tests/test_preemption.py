"""A job the cluster stops loses nothing: a stop signal (SIGTERM, SIGUSR1) saves the step every process
is in and exits 75; a full disk is one line with the previous checkpoint kept; a hung rank is named."""
import errno
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, subprocess_env
from test_train import (assert_opt_equal, assert_state_dicts_equal, call_main, latent_args, latents,  # noqa: F401
                        load, only_run)

from helpers.training import objectives
from helpers.utils.cli import EXIT_PREEMPTED

# The documented recipe (scripts/slurm_train.sh): torchrun forwards SIGUSR1 too, not only SIGTERM.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]


def torchrun(script, argv, env=None):
    cmd = [*TORCHRUN, os.path.join(REPO_ROOT, "tests", "hooked.py"), script, *map(str, argv)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(**(env or {})), capture_output=True,
                          text=True, timeout=300)
    proc.output = proc.stdout + proc.stderr
    return proc


def checkpoints(results):
    return sorted(os.listdir(os.path.join(only_run(results), "checkpoints")))


def test_a_stop_signal_saves_the_step_and_exits_75(tmp_path, latents, monkeypatch, capsys):
    """One process (in this process): SIGTERM during step 2 saves step 2, exit code 75."""
    original, calls = objectives.DDPM.training_losses, {"n": 0}

    def training_losses(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(objectives.DDPM, "training_losses", training_losses)
    previous = signal.getsignal(signal.SIGTERM)
    assert call_main(latent_args(latents, tmp_path / "r", "--max-steps", "4", "--ckpt-every", "100")) == 75
    assert EXIT_PREEMPTED == 75 and signal.getsignal(signal.SIGTERM) is previous   # handler put back
    path = os.path.join(only_run(tmp_path / "r"), "checkpoints", "0000002.pt")
    assert capsys.readouterr().err.strip() == (f"stopped: SIGTERM received: stopped at step 2 with its checkpoint "
                                               f"{path}; run again with --resume auto to continue")
    assert checkpoints(tmp_path / "r") == ["0000002.pt"] and load(path)["step"] == 2


def test_preempted_twice_under_torchrun_then_resumed_equals_one_run(tmp_path, latents):
    """Two processes: train.py gets SIGTERM in step 2, train_accelerate.py (resumed) SIGUSR1 in step 3,
    both through torchrun as a scheduler sends them; --resume auto then ends where one run does, the
    cosine learning rate included (it is a function of the step and the run's last step)."""
    common = ["--max-steps", "4", "--ckpt-every", "100", "--log-every", "1", "--lr-schedule", "cosine"]
    one_go = torchrun("train.py", latent_args(latents, tmp_path / "a", *common))
    assert one_go.returncode == 0, one_go.output

    b = tmp_path / "b"
    first = torchrun("train.py", latent_args(latents, b, *common), {"DIC_TEST_SIGNAL_AT_STEP": "2:SIGTERM"})
    assert first.returncode != 0 and checkpoints(b) == ["0000002.pt"], first.output
    assert "stopped: SIGTERM received: stopped at step 2 with its checkpoint" in first.stderr, first.output
    second = torchrun("train_accelerate.py", latent_args(latents, b, *common, "--resume", "auto"),
                      {"DIC_TEST_SIGNAL_AT_STEP": "1:SIGUSR1", "ACCELERATE_USE_CPU": "true"})
    assert checkpoints(b) == ["0000002.pt", "0000003.pt"], second.output
    assert "stopped: SIGUSR1 received: stopped at step 3 with its checkpoint" in second.stderr, second.output
    third = torchrun("train.py", latent_args(latents, b, *common, "--resume", "auto"))
    assert third.returncode == 0, third.output
    assert checkpoints(b) == ["0000002.pt", "0000003.pt", "0000004.pt"]

    a = load(os.path.join(only_run(tmp_path / "a"), "checkpoints", "0000004.pt"))
    r = load(os.path.join(only_run(b), "checkpoints", "0000004.pt"))
    assert_state_dicts_equal(a["model"], r["model"])
    assert_state_dicts_equal(a["ema"], r["ema"])
    assert_opt_equal(a["opt"], r["opt"])
    assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(a["rng"], r["rng"]))
    # The last step (index 3 of 4) ran at lr * (1 + cos(3 pi / 4)) / 2, lr = 1e-4 (the default).
    assert all(abs(group["lr"] - 1e-4 * (2 - 2 ** 0.5) / 4) < 1e-15 for group in r["opt"]["param_groups"])


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (root only): room for one DiC-Tiny checkpoint (16 MB), not two."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(small_disk, latents, capsys):
    results = small_disk / "r"
    assert call_main(latent_args(latents, results, "--max-steps", "2", "--ckpt-every", "1")) == 1
    folder = os.path.join(only_run(results), "checkpoints")
    out, err = capsys.readouterr()
    assert "has 24 MB free, less than two checkpoints (about 15 MB each)" in out
    line = re.fullmatch(rf"error: no space left on {folder} while writing {folder}/0000002.pt \(needed about "
                        rf"15 MB, ([\d.]+) MB free\); last good checkpoint: {folder}/0000001.pt\n", err)
    assert line and 8 < float(line.group(1)) < 15, err
    assert os.listdir(folder) == ["0000001.pt"] and load(os.path.join(folder, "0000001.pt"))["step"] == 1


def test_a_full_disk_while_writing_latents_is_one_line(tmp_path, monkeypatch):
    from helpers.data import per_file_writer
    from helpers.utils.files import NoSpaceError

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(per_file_writer.np, "save", full)
    with pytest.raises(NoSpaceError, match=rf"^no space left on {tmp_path}/imagenet64_labels while writing "
                                           rf"{tmp_path}/imagenet64_labels/7.npy \(needed about 0.0 MB, [\d.]+ MB free\)$"):
        per_file_writer.write_latent(tmp_path, "7", torch.zeros(4, 8, 8), 1, prefix="imagenet64")
    assert os.listdir(tmp_path / "imagenet64_labels") == []


def test_a_rank_that_does_not_arrive_is_named(tmp_path, latents):
    """Rank 1's data loader sleeps 4 s before step 2, --dist-timeout 0.03 (1.8 s): rank 0 names it and stops."""
    proc = torchrun("train.py", latent_args(latents, tmp_path / "r", "--max-steps", "4", "--ckpt-every", "1",
                                            "--dist-timeout", "0.03"), {"DIC_TEST_SLEEP_AT_STEP": "2:1:4"})
    good = os.path.join(only_run(tmp_path / "r"), "checkpoints", "0000001.pt")
    assert proc.returncode != 0
    assert (f"error: rank(s) 1 did not arrive at step 2 within --dist-timeout 0.03 min (a stuck data loader, "
            f"file system or deadlock); every rank completed step 1; last good checkpoint: {good}\n"
            in proc.stderr), proc.output
    assert proc.stderr.count("error: rank(s) 1 did not arrive") == 1
