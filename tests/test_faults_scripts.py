"""The fault rules of helpers/utils/files.py and helpers/utils/locks.py as the scripts use them: one writer per
run folder, workers that die with their launcher, no leftovers, plain-open() file modes, and errors
before any work."""
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, subprocess_env
from test_sample import make_checkpoint
from test_train import call_main, latent_args, latents, only_run, run_script  # noqa: F401

import export
import sample
import sample_ddp
from helpers.utils.cli import JobError


def start_script(argv, nproc=1):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 else [sys.executable]) + [os.path.join(REPO_ROOT, "train.py"), *map(str, argv)]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def log_says(results, text):
    """Whether the one run folder in `results` has a log.txt containing `text` (False until it exists)."""
    runs = sorted(os.listdir(results)) if os.path.isdir(results) else []
    path = os.path.join(results, runs[0], "log.txt") if runs else ""
    return os.path.exists(path) and text in open(path).read()


def pids_running(script_dir):
    """Live processes whose command line runs a train.py of `script_dir`'s tests (from /proc)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            state = open(f"/proc/{pid}/stat").read().split()[2]
        except OSError:
            continue
        if state != "Z" and any(b"train.py" in part for part in cmdline) and \
                any(str(script_dir).encode() in part for part in cmdline):
            found.append(int(pid))
    return found


def test_a_second_job_on_a_run_folder_is_refused_and_the_first_finishes_untouched(tmp_path, latents):
    results = tmp_path / "r"
    assert call_main(latent_args(latents, results, "--max-steps", "2", "--ckpt-every", "2")) == 0
    run = only_run(results)
    first = start_script(latent_args(latents, results, "--max-steps", "400", "--ckpt-every", "200",
                                     "--log-every", "50", "--resume", "auto"))
    assert wait_for(lambda: log_says(results, "Resuming from"))
    second = run_script(latent_args(latents, results, "--max-steps", "400", "--resume", "auto"))
    assert second.returncode == 2
    assert second.stderr.strip().startswith(f"error: {run} is being written by another training job: pid "
                                            f"{first.pid} on "), second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000002.pt", "0000200.pt", "0000400.pt"]
    assert "error" not in open(os.path.join(run, "log.txt")).read()


def test_killing_torchrun_of_a_training_run_leaves_no_workers(tmp_path, latents):
    job = start_script(latent_args(latents, tmp_path / "r", "--max-steps", "100000", "--ckpt-every", "100000",
                                   "--log-every", "10"), nproc=2)
    assert wait_for(lambda: len(pids_running(tmp_path)) >= 3), "launcher and two workers did not start"
    assert wait_for(lambda: log_says(tmp_path / "r", "(step=0000010)"))
    os.killpg(job.pid, signal.SIGKILL)            # what a scheduler does to the launcher's group
    job.wait(timeout=30)
    assert wait_for(lambda: not pids_running(tmp_path), timeout=15), pids_running(tmp_path)


def test_a_resumed_run_removes_the_temp_files_of_a_killed_checkpoint_write(tmp_path, latents):
    results = tmp_path / "r"
    assert call_main(latent_args(latents, results, "--max-steps", "2", "--ckpt-every", "2")) == 0
    checkpoints = os.path.join(only_run(results), "checkpoints")
    with open(os.path.join(checkpoints, ".tmp-killed.pt"), "wb") as f:
        f.write(b"half a checkpoint")
    assert call_main(latent_args(latents, results, "--max-steps", "3", "--resume", "auto")) == 0
    assert sorted(os.listdir(checkpoints)) == ["0000002.pt", "0000003.pt"]


def test_sample_py_into_a_read_only_folder_fails_before_sampling(tmp_path, monkeypatch):
    if os.geteuid() == 0:   # root writes anywhere: make the folder impossible instead of read-only
        blocked = tmp_path / "file"
        blocked.write_text("not a folder")
        out = blocked / "grid.png"
    else:
        blocked = tmp_path / "ro"
        blocked.mkdir()
        os.chmod(blocked, 0o555)
        out = blocked / "grid.png"
    ckpt = make_checkpoint(tmp_path / "c.pt")
    monkeypatch.setattr(sample, "read_checkpoint", lambda *a: pytest.fail("sampling work started"))
    with pytest.raises(JobError, match=f"cannot write to {blocked}"):
        sample.main(sample.parse_args(["--ckpt", ckpt, "--out", str(out)]))


def test_sample_py_refuses_a_size_the_model_cannot_take_before_any_work(tmp_path, monkeypatch):
    """DiC-Tiny downsamples by 4 and DiT-S/4 patches by 4: --image-size 30 is one line, before the
    VAE or the model is built (the trainer's rule, on the meta device)."""
    from helpers.sampling import checkpoint_model
    monkeypatch.setattr(checkpoint_model, "load_vae", lambda *a: pytest.fail("sampling work started"))
    ckpt = make_checkpoint(tmp_path / "c.pt")
    with pytest.raises(JobError, match=r"^--image-size 30 gives a 30x30 model input \(VAE factor 1\) that DiC-Tiny "
                                       r"cannot take: it downsamples by 4, so use an image size divisible by 4 "
                                       r"\(e.g. 28\)$"):
        sample.main(sample.parse_args(["--ckpt", ckpt, "--image-size", "30", "--out", str(tmp_path / "g.png")]))
    assert not (tmp_path / "g.png").exists()
    dit = checkpoint_model.ModelSettings(model="DiT-S/4", image_size=30, num_classes=10, vae="none", in_channels=3,
                                         model_kwargs={}, learn_sigma=True)
    with pytest.raises(JobError, match=r"input_size 30 is not divisible by patch_size 4; use an image size "
                                       r"divisible by 4 \(e.g. 28\)$"):
        checkpoint_model.check_settings(dit, {}, cfg_scale=1.0)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_a_script_writes_has_the_mode_of_a_plain_open(tmp_path, latents, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        plain = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
        assert call_main(latent_args(latents, tmp_path / "r", "--max-steps", "1")) == 0
        ckpt = os.path.join(only_run(tmp_path / "r"), "checkpoints", "0000001.pt")
        tiny = make_checkpoint(tmp_path / "tiny.pt")
        sample.main(sample.parse_args(["--ckpt", tiny, "--num-sampling-steps", "2", "--class-labels", "1",
                                       "--out", str(tmp_path / "grid.png")]))
        npz = sample_ddp.main(sample_ddp.parse_args(["--ckpt", tiny, "--num-fid-samples", "2",
                                                     "--num-sampling-steps", "2", "--sample-dir",
                                                     str(tmp_path / "samples")]))
        export.main(export.build_parser().parse_args(["--ckpt", ckpt, "--out", str(tmp_path / "w.safetensors")]))
        written = [ckpt, tmp_path / "grid.png", npz, tmp_path / "w.safetensors"]
        written += [os.path.join(only_run(tmp_path / "r"), name) for name in ("log.txt", "args.json", "losses.csv")]
        folder = npz[:-len(".npz")]
        written += [os.path.join(folder, name) for name in os.listdir(folder)]
        modes = {str(p): oct(stat.S_IMODE(os.stat(p).st_mode)) for p in written}
        assert set(modes.values()) == {oct(plain)}, modes
        assert torch.load(ckpt)["step"] == 1 and np.load(npz)["arr_0"].shape == (2, 16, 16, 3)
    finally:
        os.umask(old)


def test_a_nan_latent_is_named_and_skip_nonfinite_trains_past_it(tmp_path, capsys):
    from test_train import make_latents
    root = make_latents(tmp_path / "lat", n=48)
    bad = os.path.join(root, "imagenet64_features", "37.npy")
    values = np.load(bad)
    values[0, 0, 0] = np.nan
    np.save(bad, values)
    argv = latent_args(root, tmp_path / "r", "--max-steps", "6", "--ckpt-every", "6", "--log-every", "6")
    assert call_main(argv) == 2   # a data error, not an optimisation failure
    assert f"latent file {bad} holds non-finite values (NaN or inf)" in capsys.readouterr().err
    assert call_main([*argv[:argv.index("--results-dir")], "--results-dir", tmp_path / "s", "--max-steps", "6",
                      "--ckpt-every", "6", "--log-every", "6", "--skip-nonfinite"]) == 0   # one epoch: all 48 seen
    assert "Skipped Corrupt Images: 1" in capsys.readouterr().out
