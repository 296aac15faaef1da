"""Flow matching (SiT's transport) through the trainers and the samplers: exact 2-process resume,
byte-identical ODE/SDE .npz files from 1 and 2 processes, SiT-style releases (learned-sigma head,
no recorded objective) and the one-line errors for wrong combinations."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, subprocess_env
from test_train import assert_opt_equal, assert_state_dicts_equal, latent_args, latents, load, only_run  # noqa: F401
from test_train import logged_losses, run_script

import sample
import sample_ddp
from helpers.utils.checkpoint import atomic_save
from helpers.utils.cli import JobError
from helpers.utils.models import create_model
from helpers.training.objectives import SiT, create_objective
from helpers.sampling.guidance import make_model_fn
from transport import create_transport

SIT = {"name": "sit", "path_type": "Linear", "prediction": "velocity", "loss_weight": None, "train_eps": None,
       "sample_eps": None, "learn_sigma": False}


def sit_checkpoint(path, learn_sigma=False, record=True, model="DiC-Tiny", seed=0, **kwargs):
    """A random pixel-space (16 px, 1 channel, 10 classes) model saved as train.py would after
    --objective sit; record=False leaves the objective and args out (a bare SiT-style release)."""
    torch.manual_seed(seed)
    net = create_model(model, input_size=16, in_channels=1, num_classes=10, learn_sigma=learn_sigma, **kwargs)
    for p in net.parameters():
        if p.abs().sum() == 0:     # the official init zeroes the head: re-draw it so samples vary
            p.data.normal_(0, 0.05)
    if not record:
        atomic_save(net.state_dict(), path)
        return str(path)
    atomic_save({"model": net.state_dict(), "ema": net.state_dict(), "opt": {},
                 "args": dict(model=model, image_size=16, num_classes=10, vae="none", in_channels=1,
                              model_overrides={}), "objective": {**SIT, "learn_sigma": learn_sigma}}, path)
    return str(path)


def test_sit_objective_is_sit_numbers_with_the_sigma_half_dropped():
    """Same seed, same loss as SiT's transport called on the first C output channels."""
    model = create_model("DiC-Tiny", input_size=8, in_channels=4, num_classes=10, learn_sigma=True)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    torch.manual_seed(5)
    ours = SiT(learn_sigma=True).training_losses(model, x, dict(y=y))["loss"]
    torch.manual_seed(5)
    reference = create_transport().training_losses(lambda z, t, **kw: model(z, t, **kw)[:, :4], x, dict(y=y))["loss"]
    assert torch.equal(ours, reference) and ours.shape == (3,)
    assert create_objective(SIT).config() == SIT


def test_sit_two_process_resume_is_bit_identical(tmp_path, latents):
    common = ["--objective", "sit", "--log-every", "1", "--ckpt-every", "2"]
    one_go = run_script(latent_args(latents, tmp_path / "a", *common, "--max-steps", "4"), nproc=2)
    first = run_script(latent_args(latents, tmp_path / "b", *common, "--max-steps", "2"), nproc=2)
    resumed = run_script(latent_args(latents, tmp_path / "b", "--max-steps", "4", "--resume", "auto",
                                     "--log-every", "1", "--ckpt-every", "2"), nproc=2)
    assert one_go.returncode == first.returncode == resumed.returncode == 0, resumed.output
    a = load(os.path.join(only_run(tmp_path / "a"), "checkpoints", "0000004.pt"))
    b = load(os.path.join(only_run(tmp_path / "b"), "checkpoints", "0000004.pt"))
    assert a["objective"] == b["objective"] == SIT          # the objective came back from the checkpoint
    assert a["model_kwargs"]["learn_sigma"] is False and a["model"]["final_layer.out_proj.weight"].shape[0] == 4
    assert_state_dicts_equal(a["model"], b["model"])
    assert_state_dicts_equal(a["ema"], b["ema"])
    assert_opt_equal(a["opt"], b["opt"])
    assert logged_losses(one_go.stdout) == logged_losses(first.stdout) + logged_losses(resumed.stdout)


# Slow (CI time): accelerate + --objective sit exact 2-process resume, with the objective taken back
# from the checkpoint (resumed without --objective), stays in the default set through
# test_repa_training.py::test_repa_two_process_resume_is_bit_identical[train_accelerate.py-sit], and the
# whole objective config (path type included) coming back from a checkpoint through
# test_sit_two_process_resume_is_bit_identical above.
@pytest.mark.slow
def test_sit_accelerate_resume_is_bit_identical(tmp_path, latents):
    common = ["--objective", "sit", "--path-type", "GVP", "--log-every", "1", "--ckpt-every", "2"]
    cpu = {"ACCELERATE_USE_CPU": "true"}
    one_go = run_script(latent_args(latents, tmp_path / "a", *common, "--max-steps", "4"), nproc=2,
                        script="train_accelerate.py", env=cpu)
    first = run_script(latent_args(latents, tmp_path / "b", *common, "--max-steps", "2"), nproc=2,
                       script="train_accelerate.py", env=cpu)
    resumed = run_script(latent_args(latents, tmp_path / "b", "--max-steps", "4", "--resume", "auto"), nproc=2,
                         script="train_accelerate.py", env=cpu)
    assert one_go.returncode == first.returncode == resumed.returncode == 0, resumed.output
    a = load(os.path.join(only_run(tmp_path / "a"), "checkpoints", "0000004.pt"))
    b = load(os.path.join(only_run(tmp_path / "b"), "checkpoints", "0000004.pt"))
    assert a["objective"]["path_type"] == b["objective"]["path_type"] == "GVP"
    assert_state_dicts_equal(a["model"], b["model"])
    assert_opt_equal(a["opt"], b["opt"])


def run_sample_ddp(ckpt, sample_dir, *extra, nproc=1):
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                                   if nproc > 1 else [])
    argv = ["--ckpt", ckpt, "--num-fid-samples", "7", "--per-proc-batch-size", "3", "--cfg-scale", "1.5",
            "--sample-dir", str(sample_dir), *extra]
    return subprocess.run([*launcher, os.path.join(REPO_ROOT, "sample_ddp.py"), *argv], capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)


@pytest.mark.parametrize("mode", [["--mode", "ode"], ["--mode", "sde", "--num-sampling-steps", "6"]])
def test_sit_npz_is_byte_identical_from_one_and_two_processes(tmp_path, mode):
    ckpt = sit_checkpoint(tmp_path / "sit.pt")
    one = run_sample_ddp(ckpt, tmp_path / "one", *mode)
    two = run_sample_ddp(ckpt, tmp_path / "two", *mode, nproc=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    name = "ode-dopri5-50" if mode[1] == "ode" else "sde-Euler-6"
    (npz_one,) = (tmp_path / "one").glob(f"*-{name}.npz")
    (npz_two,) = (tmp_path / "two").glob(f"*-{name}.npz")
    assert npz_one.read_bytes() == npz_two.read_bytes()
    with np.load(npz_one) as f:
        images = f["arr_0"]
    assert images.shape == (7, 16, 16, 3) and images.std() > 0
    if mode[1] == "ode":   # the adaptive solver's cost is reported
        assert "The ODE solver (dopri5) made" in one.stdout and "function evaluations per batch" in one.stdout


def test_a_bare_sit_release_is_identified_and_sampled(tmp_path, capsys):
    """A DiT-shaped state_dict with an 8-channel (learned-sigma) head and nothing else, as SiT's
    release: with --objective sit and no --model, the variant and the head are read from the weights."""
    ckpt = sit_checkpoint(tmp_path / "SiT-S-2.pt", learn_sigma=True, record=False, model="DiT-S/2")
    common = ["--ckpt", ckpt, "--objective", "sit", "--image-size", "16", "--num-classes", "10", "--vae", "none",
              "--in-channels", "1", "--class-labels", "3", "--cfg-scale", "1", "--mode", "ode",
              "--sampling-method", "euler", "--num-sampling-steps", "4"]
    args = sample.parse_args(common + ["--out", str(tmp_path / "a.png")])
    sample.main(args)
    assert args.model == "DiT-S/2" and args.objective_config == {**SIT, "learn_sigma": True}
    assert "The ODE solver (euler) made 3 function evaluations" in capsys.readouterr().out
    assert (tmp_path / "a.png").exists()


def test_wrong_sampler_for_the_objective_is_one_line(tmp_path):
    sit = sit_checkpoint(tmp_path / "sit.pt")
    with pytest.raises(JobError, match="--sampler ddim is for DDPM checkpoints; this one was trained with flow "
                                       "matching"):
        sample.main(sample.parse_args(["--ckpt", sit, "--sampler", "ddim", "--out", str(tmp_path / "x.png")]))
    with pytest.raises(JobError, match="--sampling-method Heun is an SDE method: add --mode sde"):
        sample.main(sample.parse_args(["--ckpt", sit, "--sampling-method", "Heun", "--out", str(tmp_path / "x.png")]))
    with pytest.raises(JobError, match="--likelihood needs --mode ode and --cfg-scale 1"):
        sample.main(sample.parse_args(["--ckpt", sit, "--likelihood", "--out", str(tmp_path / "x.png")]))
    from test_sample import make_checkpoint
    ddpm = make_checkpoint(tmp_path / "ddpm.pt")
    with pytest.raises(JobError, match="--mode is for flow-matching \\(sit\\) checkpoints; this one was trained "
                                       "with DDPM"):
        sample_ddp.main(sample_ddp.parse_args(["--ckpt", ddpm, "--mode", "sde", "--sample-dir", str(tmp_path / "s")]))
    assert sorted(os.listdir(tmp_path)) == ["ddpm.pt", "sit.pt"]   # nothing written


def test_likelihood_of_samples_in_bits_per_dim(tmp_path, capsys):
    ckpt = sit_checkpoint(tmp_path / "sit.pt")
    sample.main(sample.parse_args(["--ckpt", ckpt, "--class-labels", "1", "2", "--cfg-scale", "1", "--likelihood",
                                   "--sampling-method", "rk4", "--num-sampling-steps", "5",
                                   "--out", str(tmp_path / "a.png")]))
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("NLL of the samples")][0]
    values = [float(v) for v in line.split(": ")[1].split(" (")[0].split()]
    assert len(values) == 2 and all(np.isfinite(values))


@torch.no_grad()
def test_guidance_interval_guides_only_inside_it():
    """REPA's interval in REPA's time (1 = noise): SiT's t = 0.9 is REPA's 0.1, t = 0.2 is 0.8."""
    model = create_model("DiC-Tiny", input_size=8, in_channels=4, num_classes=10, learn_sigma=False).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    guided = make_model_fn(model, 3.0)
    plain = make_model_fn(model, 1.0)
    interval = make_model_fn(model, 3.0, guidance_interval=(0.0, 0.7))
    for t, inside in ((0.9, True), (0.2, False)):
        tt = torch.full((2,), t)
        want = guided(x, tt, y) if inside else plain(x, tt, y)
        assert torch.equal(interval(x, tt, y), want)
    assert not torch.equal(guided(x, torch.full((2,), 0.2), y), plain(x, torch.full((2,), 0.2), y))


@pytest.mark.slow
def test_a_dit_xl_2_shaped_sit_release_samples_without_a_model_flag(tmp_path, tiny_vae_dir, capsys):
    """The shape of SiT's SiT-XL-2-256x256.pt (DiT-XL/2, 4 latent channels in, 8 out, 1000 classes),
    random values stored in fp16 to keep the file small: identified as DiT-XL/2 with a learned-sigma
    head, and sampled with SiT's ODE on 32x32 latents (64 px through the tiny factor-2 VAE)."""
    with torch.device("meta"):
        shapes = create_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=generator) * 0.02).half() for k, v in shapes.items()}
    ckpt = tmp_path / "SiT-XL-2-256x256.pt"
    torch.save(state, ckpt)
    args = sample.parse_args(["--ckpt", str(ckpt), "--objective", "sit", "--image-size", "64", "--vae", tiny_vae_dir,
                              "--class-labels", "207", "--cfg-scale", "1", "--mode", "ode", "--sampling-method",
                              "euler", "--num-sampling-steps", "2", "--out", str(tmp_path / "a.png")])
    sample.main(args)
    assert args.model == "DiT-XL/2" and args.objective_config["learn_sigma"] is True
    assert "The ODE solver (euler) made 1 function evaluations" in capsys.readouterr().out


@torch.no_grad()
def test_the_sde_asks_the_model_once_per_point_with_the_same_samples():
    """SiT's SDE drift calls the model for the velocity and again for the score at the same point;
    reusing the first output gives the same sample for half the model calls."""
    from helpers.sampling.noise import IndexNoise
    from helpers.sampling.samplers import ReverseProcess
    model = create_model("DiC-Tiny", input_size=8, in_channels=4, num_classes=10, learn_sigma=False).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    calls = {"n": 0}

    def model_fn(x, t, y):
        calls["n"] += 1
        return model(x, t, y)
    args = argparse.Namespace(mode="sde", sampling_method="Euler", num_sampling_steps=6, diffusion_form="sigma",
                              diffusion_norm=1.0, last_step="Mean", last_step_size=0.04)
    process = ReverseProcess(args, SIT, 4)
    labels = torch.tensor([1, 2])
    cached = process(model_fn, IndexNoise(0, range(2)), labels, (4, 8, 8), "cpu")
    assert calls["n"] == 6          # 5 Euler-Maruyama points + the last step, one model call each
    import helpers.sampling.samplers as samplers_module
    original, samplers_module.reuse_last_call = samplers_module.reuse_last_call, lambda fn: fn
    try:
        calls["n"] = 0
        twice = process(model_fn, IndexNoise(0, range(2)), labels, (4, 8, 8), "cpu")
    finally:
        samplers_module.reuse_last_call = original
    assert calls["n"] == 12 and torch.equal(cached, twice)
