"""sample_ddp.py: exact sample counts, the same .npz from any process count, resume, bad input."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, subprocess_env
from test_sample import make_checkpoint

import sample_ddp
from helpers.utils.cli import JobError

N = 10  # not a multiple of any batch size used here
FOLDER = "DiC-Tiny-0000100-size-16-vae-vae-cfg-1.5-seed-0-ddpm-5"


def ddp_args(ckpt, sample_dir, *extra):
    return ["--ckpt", ckpt, "--num-fid-samples", str(N), "--num-sampling-steps", "5",
            "--sample-dir", str(sample_dir), *extra]


def run_in_process(ckpt, sample_dir, *extra):
    return sample_ddp.main(sample_ddp.parse_args(ddp_args(ckpt, sample_dir, *extra)))


def run_script(ckpt, sample_dir, *extra, nproc=1, env=None):
    """sample_ddp.py as a user runs it; with `env` (tests/hooked.py's test-only variables) through the hooks."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    script = [os.path.join(REPO_ROOT, "tests", "hooked.py"), "sample_ddp.py"] if env else \
        [os.path.join(REPO_ROOT, "sample_ddp.py")]
    return subprocess.run([*launcher, *script, *ddp_args(ckpt, sample_dir, *extra)],
                          capture_output=True, text=True, env=subprocess_env(**(env or {})), timeout=300)


def load(npz):
    with np.load(npz) as f:
        return f["arr_0"]


@pytest.fixture(scope="module")
def latent_ckpt(tmp_path_factory, tiny_vae_dir):
    """A DiC-Tiny on the tiny VAE's 4x8x8 latents of 16 px images (the VAE keeps pixels unsaturated)."""
    folder = tmp_path_factory.mktemp("ckpt") / "vae"
    shutil.copytree(tiny_vae_dir, folder)
    return make_checkpoint(folder.parent / "0000100.pt", image_size=16, in_channels=4, num_classes=10,
                           vae=str(folder))


@pytest.fixture(scope="module")
def reference(latent_ckpt, tmp_path_factory):
    """One process, batch 3: the .npz every other run must reproduce."""
    npz = run_in_process(latent_ckpt, tmp_path_factory.mktemp("reference"), "--per-proc-batch-size", "3")
    return npz


def test_one_process_writes_exactly_n_images(reference):
    assert os.path.basename(reference) == f"{FOLDER}.npz"
    images = load(reference)
    assert images.shape == (N, 16, 16, 3) and images.dtype == np.uint8
    folder = reference[:-len(".npz")]
    pngs = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
    assert pngs == [f"{i:06d}.png" for i in range(N)]
    assert np.array_equal(np.asarray(Image.open(os.path.join(folder, "000007.png"))), images[7])
    assert len({images[i].tobytes() for i in range(N)}) == N      # ten different samples
    saturated = np.mean((images == 0) | (images == 255))
    assert saturated < 0.2 and images.std() > 10                  # real pixel values, not clamps


def test_two_processes_give_the_same_npz_byte_for_byte(latent_ckpt, reference, tmp_path):
    result = run_script(latent_ckpt, tmp_path, "--per-proc-batch-size", "3", nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Sampling {N} images with 2 process(es), batch 3 per process" in result.stdout
    npz = tmp_path / f"{FOLDER}.npz"
    assert npz.read_bytes() == open(reference, "rb").read()
    # One process at another batch size: the same bytes too. (Per-sample noise makes the samples
    # equal by construction; batched kernels could in principle round a row differently at
    # another batch shape, which on this machine they do not. The README states the caveat.)
    other = run_in_process(latent_ckpt, tmp_path / "b4", "--per-proc-batch-size", "4")
    assert open(other, "rb").read() == open(reference, "rb").read()


def test_interrupted_run_resumes_to_the_same_npz_and_a_done_run_is_left_alone(latent_ckpt, reference,
                                                                               tmp_path, capsys):
    killed = run_script(latent_ckpt, tmp_path, "--per-proc-batch-size", "3",
                        env={"DIC_TEST_EXIT_AFTER_BATCHES": 1})
    assert killed.returncode == 3, killed.stderr[-2000:]
    folder = tmp_path / FOLDER
    assert sorted(p.name for p in folder.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    assert not (tmp_path / f"{FOLDER}.npz").exists()
    (folder / ".000003.tmp-99999.png").write_bytes(b"half a png")  # as if killed mid-write
    first_png_mtime = os.stat(folder / "000000.png").st_mtime_ns

    npz = run_in_process(latent_ckpt, tmp_path, "--per-proc-batch-size", "3")
    assert f"Resuming: 3 of {N} samples already in" in capsys.readouterr().out
    assert open(npz, "rb").read() == open(reference, "rb").read()
    assert os.stat(folder / "000000.png").st_mtime_ns == first_png_mtime  # skipped, not redone

    mtime = os.stat(npz).st_mtime_ns
    result = run_script(latent_ckpt, tmp_path, "--per-proc-batch-size", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{npz} already holds all {N} samples: nothing to do" in result.stdout
    assert os.stat(npz).st_mtime_ns == mtime and open(npz, "rb").read() == open(reference, "rb").read()


def test_a_killed_npz_write_leaves_its_temp_in_the_locked_folder_and_the_rerun_removes_it(latent_ckpt, reference,
                                                                                          tmp_path, monkeypatch):
    """The .npz is packed inside the locked sample folder, so what a killed packing leaves is a temp
    file there, which the rerun removes; another job's live temp beside the folder is never touched."""
    other_job = tmp_path / ".tmp-another-job.npz"
    other_job.write_bytes(b"another job's .npz, being written")

    def killed(folder, num, path, *args, **kwargs):   # as SIGKILL mid-write leaves it: a temp beside `path`
        with open(os.path.join(os.path.dirname(path), ".tmp-x8z1q.npz"), "wb") as f:
            f.write(b"PK half an npz")
        raise SystemExit(137)
    monkeypatch.setattr(sample_ddp, "write_npz_from_pngs", killed)
    with pytest.raises(SystemExit):
        run_in_process(latent_ckpt, tmp_path, "--per-proc-batch-size", "3")
    assert (tmp_path / FOLDER / ".tmp-x8z1q.npz").exists()
    monkeypatch.undo()
    npz = run_in_process(latent_ckpt, tmp_path, "--per-proc-batch-size", "3")
    assert open(npz, "rb").read() == open(reference, "rb").read()
    assert sorted(os.listdir(tmp_path)) == [".tmp-another-job.npz", FOLDER, f"{FOLDER}.npz"]
    assert not [name for name in os.listdir(tmp_path / FOLDER) if name.startswith(".tmp-")]


def test_random_labels_are_the_checkpoints_classes(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "three.pt", num_classes=3)
    drawn, original = [], sample_ddp.draw_labels
    monkeypatch.setattr(sample_ddp, "draw_labels", lambda noise, n, balanced: drawn.append(
        (n, original(noise, n, balanced))) or drawn[-1][1])
    sample_ddp.main(sample_ddp.parse_args(["--ckpt", ckpt, "--num-fid-samples", "8", "--num-sampling-steps", "2",
                                           "--per-proc-batch-size", "8", "--cfg-scale", "1",
                                           "--sample-dir", str(tmp_path / "s")]))
    assert [n for n, _ in drawn] == [3] and set(drawn[0][1].tolist()) == {0, 1, 2}


def test_pixel_space_grey_samples_are_rgb_and_labels_can_be_balanced(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "pixels.pt")  # 1-channel 16 px, vae none, from its args
    npz = sample_ddp.main(sample_ddp.parse_args(
        ["--ckpt", ckpt, "--num-fid-samples", "3", "--num-sampling-steps", "2", "--per-proc-batch-size", "2",
         "--sample-dir", str(tmp_path / "s"), "--balanced-classes", "--cfg-scale", "1"]))
    assert "--model DiC-Tiny --image-size 16 --num-classes 10 --vae none --in-channels 1" in capsys.readouterr().out
    assert npz.endswith("DiC-Tiny-pixels-size-16-vae-none-cfg-1.0-seed-0-ddpm-2-balanced.npz")
    images = load(npz)
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    with open(os.path.join(npz[:-len(".npz")], sample_ddp.SETTINGS_FILE)) as f:
        assert json.load(f)["clip_denoised"] is True                # pixel space: x0 clipped to [-1, 1]


# ------------------------------------------------------------------ bad input

def test_bad_cfg_scale_is_a_one_line_error_and_creates_nothing(latent_ckpt, tmp_path):
    result = run_script(latent_ckpt, tmp_path / "s", "--cfg-scale", "0.9")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --cfg-scale must be >= 1 (1 = no guidance), got 0.9"
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("extra, error, message", [
    (["--model", "DiC-S"], JobError,
     "checkpoint holds DiC-Tiny weights but the model is DiC-S: pass --model DiC-Tiny or a DiC-S checkpoint"),
    (["--model", "DiT-XL/9"], JobError, "unknown model 'DiT-XL/9': choose one of"),
    (["--num-fid-samples", "0"], JobError, "--per-proc-batch-size and --num-fid-samples must be >= 1"),
    (["--image-size", "30"], JobError, "--image-size 30 gives a 15x15 model input (VAE factor 2) that DiC-Tiny cannot "
                                       "take: it downsamples by 4, so use an image size divisible by 8 (e.g. 24)"),
    (["--image-size", "15"], JobError, "--image-size 15 is not a multiple of the VAE's downsampling factor 2"),
])
def test_bad_input_creates_no_output(latent_ckpt, tmp_path, extra, error, message):
    with pytest.raises(error) as info:
        run_in_process(latent_ckpt, tmp_path / "s", *extra)
    assert message in str(info.value)
    assert not (tmp_path / "s").exists()


def test_checkpoint_without_ema_says_use_weights_model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "noema.pt", with_ema=False)
    with pytest.raises(JobError, match="has no 'ema' weights: use --weights model"):
        run_in_process(ckpt, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_existing_outputs_of_other_settings_are_never_mixed_or_overwritten(latent_ckpt, reference, tmp_path):
    sample_dir = os.path.dirname(reference)
    before = open(reference, "rb").read()
    with pytest.raises(JobError, match=r"exists but holds \(10, 16, 16, 3\), not \(12, 16, 16, 3\): "
                                            r"move it away to sample again"):
        sample_ddp.main(sample_ddp.parse_args(ddp_args(latent_ckpt, sample_dir, "--num-fid-samples", "12")))
    # Another run's checkpoint with the same file name maps to the same folder: refused.
    other = tmp_path / "other" / os.path.basename(latent_ckpt)
    other.parent.mkdir()
    shutil.copy(latent_ckpt, other)
    with pytest.raises(JobError, match="holds samples made with other settings \\(ckpt: "):
        run_in_process(str(other), sample_dir)
    assert open(reference, "rb").read() == before


# ------------------------------------------------------------------ fast path

def test_bf16_channels_last_npz_is_the_same_from_two_processes(latent_ckpt, tmp_path):
    fast = ["--per-proc-batch-size", "3", "--precision", "bf16", "--channels-last"]
    one = run_in_process(latent_ckpt, tmp_path / "one", *fast)
    assert os.path.basename(one) == f"{FOLDER}-bf16.npz"             # its own folder: other numbers
    result = run_script(latent_ckpt, tmp_path / "two", *fast, nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "batch 3 per process (bf16, channels_last on, compile off)" in result.stdout
    assert (tmp_path / "two" / f"{FOLDER}-bf16.npz").read_bytes() == open(one, "rb").read()
    with open(os.path.join(one[:-len(".npz")], sample_ddp.SETTINGS_FILE)) as f:
        settings = json.load(f)
    assert settings["precision"] == "bf16" and settings["clip_denoised"] is False


def test_a_folder_from_before_the_seed_rule_is_refused_not_mixed(latent_ckpt, reference, tmp_path):
    """Folders written before the precision/clip/seed_rule keys drew their noise from another seed
    rule: resuming one would mix two kinds of samples, so it is refused with the reason."""
    folder = tmp_path / FOLDER
    shutil.copytree(reference[:-len(".npz")], folder)
    settings_path = folder / sample_ddp.SETTINGS_FILE
    settings = json.loads(settings_path.read_text())
    del settings["precision"], settings["clip_denoised"], settings["seed_rule"]   # as earlier versions wrote it
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(JobError, match=r"other settings \(seed_rule: 'seedsequence', now 'derive_seed'\)"):
        run_in_process(latent_ckpt, tmp_path, "--per-proc-batch-size", "3")
    # An old pixel-space folder was sampled without the [-1, 1] clip: refused, not mixed.
    args = sample_ddp.parse_args(ddp_args(latent_ckpt, tmp_path, "--model", "DiC-Tiny", "--image-size", "16",
                                          "--num-classes", "10", "--vae", "none", "--in-channels", "1"))
    args.objective_config = {"name": "ddpm", "learn_sigma": True}   # as resolve_settings finds it
    old_pixel_settings = {k: v for k, v in sample_ddp.image_settings(args).items()
                          if k not in sample_ddp.LEGACY_SETTINGS}
    settings_path.write_text(json.dumps(old_pixel_settings))
    with pytest.raises(JobError, match=r"other settings \(clip_denoised: False, now True\)"):
        sample_ddp.check_output(args, str(folder), str(tmp_path / "pixels.npz"), (N, 16, 16, 3))


def test_dpm_solver_npz_is_the_same_from_two_processes(latent_ckpt, tmp_path):
    fast = ["--per-proc-batch-size", "3", "--sampler", "dpm-solver", "--num-sampling-steps", "4"]
    one = run_in_process(latent_ckpt, tmp_path / "one", *fast)
    assert one.endswith("-dpm-solver-4.npz")
    result = run_script(latent_ckpt, tmp_path / "two", *fast, nproc=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "two" / os.path.basename(one)).read_bytes() == open(one, "rb").read()
    assert load(one).std() > 0


def test_a_stop_signal_ends_between_chunks_with_75_and_a_rerun_finishes_the_same(latent_ckpt, reference,
                                                                                 tmp_path, monkeypatch, capsys):
    original, calls = sample_ddp.generate, {"n": 0}

    def generate(*args, **kwargs):   # SIGUSR1 during the first chunk: that chunk is finished, then stop
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(*args, **kwargs)
    monkeypatch.setattr(sample_ddp, "generate", generate)
    with pytest.raises(JobError) as stopped:
        run_in_process(latent_ckpt, tmp_path, "--per-proc-batch-size", "3")
    assert stopped.value.code == 75 and str(stopped.value).startswith("SIGUSR1 received: stopped between chunks")
    assert sorted(p.name for p in (tmp_path / FOLDER).glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    monkeypatch.setattr(sample_ddp, "generate", original)
    npz = run_in_process(latent_ckpt, tmp_path, "--per-proc-batch-size", "3")
    assert open(npz, "rb").read() == open(reference, "rb").read()
