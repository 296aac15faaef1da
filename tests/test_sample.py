"""sample.py and helpers/sampling/: grids, checkpoint handling, CFG, per-sample noise, bad input."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, subprocess_env

import dic_models
import sample
from helpers.utils.checkpoint import atomic_save
from helpers.utils.cli import JobError
from helpers.utils.models import create_model
from helpers.sampling.samplers import ReverseProcess
from helpers.sampling.generation import clips_denoised, generate
from helpers.sampling.guidance import make_model_fn
from helpers.sampling.noise import IndexNoise, draw_labels, slerp
from helpers.utils.seeds import derive_seed
from helpers.data.vae import decode, load_vae


DDPM = {"name": "ddpm", "learn_sigma": True}
SIT = {"name": "sit", "path_type": "Linear", "prediction": "velocity", "loss_weight": None, "train_eps": None,
       "sample_eps": None, "learn_sigma": True}   # make_checkpoint's heads learn sigma


def reverse_process(steps, sampler="ddpm", clip_denoised=False, in_channels=4):
    """sample.py's reverse process for a DDPM checkpoint: DiT's `steps`-step ddpm or ddim."""
    return ReverseProcess(argparse.Namespace(sampler=sampler, num_sampling_steps=steps), DDPM, in_channels,
                          clip_denoised=clip_denoised)


def sample_latents(steps, model_fn, noise, labels, shape, sampler="ddpm", clip_denoised=False):
    return reverse_process(steps, sampler, clip_denoised, shape[0])(model_fn, noise, labels, shape, "cpu")


def random_model(model="DiC-Tiny", seed=0, **kwargs):
    """A model whose outputs are not all zero, in eval mode.

    The official init zeroes the output head (eps = 0 everywhere); the all-zero parameters are
    re-drawn here so labels, CFG and the two weight sets change the samples.
    """
    torch.manual_seed(seed)
    net = create_model(model, **kwargs)
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.05)
    return net.eval()


def make_checkpoint(path, model="DiC-Tiny", image_size=16, in_channels=1, num_classes=10, vae="none",
                    with_ema=True, with_args=True, seed=0, objective=None, model_overrides=None):
    """Our checkpoint format for a tiny random model (see random_model); "ema" differs from "model".
    `objective`: the recorded objective config (None: none recorded, i.e. DDPM)."""
    model_overrides = model_overrides or {}
    net = random_model(model, seed, input_size=image_size // (1 if vae == "none" else 2),
                       in_channels=in_channels, num_classes=num_classes, **model_overrides)
    state = net.state_dict()
    checkpoint = {"model": state, "opt": {}}
    if with_ema:
        checkpoint["ema"] = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    if with_args:
        checkpoint["args"] = dict(model=model, image_size=image_size, num_classes=num_classes, vae=vae,
                                  in_channels=in_channels, model_overrides=model_overrides,
                                  global_seed=0)  # as train.py saves them
    if objective is not None:
        checkpoint["objective"] = dict(objective)
    atomic_save(checkpoint, path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "0000010.pt")


def run_sample(*argv):
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "sample.py"), *argv],
                          capture_output=True, text=True, env=subprocess_env(), timeout=120)


def grid_size(n, nrow, side, padding=2):
    """(width, height) of torchvision's make_grid for n images of side x side (1 image: no padding)."""
    if n == 1:
        return side, side
    cols = min(n, nrow)
    rows = -(-n // nrow)
    return cols * (side + padding) + padding, rows * (side + padding) + padding


# ------------------------------------------------------------------ sample.py end to end

def test_grid_png_of_requested_labels_and_no_overwrite(tiny_ckpt, tmp_path):
    out = tmp_path / "grid" / "sample.png"
    result = run_sample("--ckpt", tiny_ckpt, "--class-labels", "1", "2", "3", "--nrow", "2",
                        "--num-sampling-steps", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "--model DiC-Tiny --image-size 16 --num-classes 10 --vae none" in result.stdout
    assert "Saved a grid of 3 samples (labels 1 2 3)" in result.stdout
    with Image.open(out) as image:
        assert image.size == grid_size(3, 2, 16) == (38, 38)
        assert image.mode == "RGB"
    before = out.read_bytes()
    again = run_sample("--ckpt", tiny_ckpt, "--num-sampling-steps", "5", "--out", str(out))
    assert again.returncode != 0
    assert again.stderr.strip().splitlines() == [f"error: {out} already exists: pass --overwrite "
                                                 f"to replace it, or another --out"]
    assert out.read_bytes() == before
    assert [p.name for p in out.parent.iterdir()] == ["sample.png"]  # no temp files left


def test_overwrite_and_same_seed_same_grid(tiny_ckpt, tmp_path):
    out = str(tmp_path / "s.png")
    common = ["--ckpt", tiny_ckpt, "--class-labels", "4", "--num-sampling-steps", "3", "--out", out]
    sample.main(sample.parse_args(common))
    first = open(out, "rb").read()
    sample.main(sample.parse_args(common + ["--overwrite"]))
    assert open(out, "rb").read() == first
    sample.main(sample.parse_args(common + ["--overwrite", "--seed", "1"]))
    assert open(out, "rb").read() != first
    sample.main(sample.parse_args(common + ["--overwrite", "--weights", "model"]))
    assert open(out, "rb").read() != first


def test_default_labels_for_small_class_count(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "d.png"
    sample.main(sample.parse_args(["--ckpt", tiny_ckpt, "--num-sampling-steps", "2", "--out", str(out)]))
    assert "using 0 1 2 3 4 5 6 7" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.size == grid_size(8, 4, 16)


def test_latent_model_with_tiny_vae(tiny_vae_dir, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "latent.pt", image_size=32, in_channels=4, num_classes=5,
                           vae=tiny_vae_dir)
    out = tmp_path / "latent.png"
    sample.main(sample.parse_args(["--ckpt", ckpt, "--class-labels", "0", "4", "--nrow", "1",
                                   "--num-sampling-steps", "3", "--guide-channels", "all",
                                   "--out", str(out)]))
    assert f"--vae {tiny_vae_dir}" in capsys.readouterr().out
    with Image.open(out) as image:  # 32 px images from 16x16 latents, one per row
        assert image.size == grid_size(2, 1, 32) == (36, 70)


def count_forward_calls(monkeypatch):
    calls = []
    forward = dic_models.DiC.forward

    def counting(self, x, t, y, **kwargs):
        calls.append(x.shape[0])
        return forward(self, x, t, y, **kwargs)

    monkeypatch.setattr(dic_models.DiC, "forward", counting)
    return calls


def test_ddim_50_calls_the_model_5x_less_than_ddpm_250(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "small.pt", image_size=8)
    calls = count_forward_calls(monkeypatch)
    base = ["--ckpt", ckpt, "--class-labels", "3", "--cfg-scale", "4.0"]
    sample.main(sample.parse_args(base + ["--out", str(tmp_path / "ddpm.png")]))
    ddpm_calls = list(calls)
    calls.clear()
    sample.main(sample.parse_args(base + ["--sampler", "ddim", "--num-sampling-steps", "50",
                                          "--out", str(tmp_path / "ddim.png")]))
    assert len(ddpm_calls) == 250 and len(calls) == 50
    assert set(ddpm_calls) == set(calls) == {2}  # guided: [cond; uncond] in one batch of 2
    calls.clear()
    sample.main(sample.parse_args(base[:-2] + ["--cfg-scale", "1", "--sampler", "ddim",
                                               "--num-sampling-steps", "10", "--out", str(tmp_path / "c1.png")]))
    assert calls == [1] * 10  # cfg 1: the plain forward, one row per image


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("extra, message", [
    (["--model", "DiC-S"], "checkpoint holds DiC-Tiny weights but the model is DiC-S: pass --model DiC-Tiny"),
    (["--cfg-scale", "0.5"], "--cfg-scale must be >= 1 (1 = no guidance), got 0.5"),
    (["--num-sampling-steps", "1"], "--num-sampling-steps must be >= 2, got 1"),
    (["--class-labels", "3", "10"], "class label 10 is out of range for a 10-class model (valid: 0..9)"),
    (["--model", "DiC-Huge"], "unknown model 'DiC-Huge': choose one of DiC-S, DiC-B, DiC-XL, DiC-H, DiC-Tiny"),
    (["--num-classes", "20"], "checkpoint does not fit DiC-Tiny (input_size=16, in_channels=1, num_classes=20)"),
    (["--cfg-scale", "1,4,0.5"], "--cfg-scale must be >= 1 (1 = no guidance), got 0.5"),
    (["--cfg-scale", "1,nan"], "--cfg-scale must be a finite number, got nan"),
    (["--cfg-scale", "1,4", "--nrow", "2"], "--nrow does not apply to a --cfg-scale sweep: its grid has one "
                                            "column per scale"),
    (["--interpolate", "1"], "--interpolate needs at least 2 images (the two seeds' own), got 1"),
    (["--interpolate", "3", "--cfg-scale", "1,4"], "--interpolate walks at one --cfg-scale, got 2: run it once "
                                                   "per scale"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tiny_ckpt, tmp_path, extra, message):
    out = tmp_path / "bad.png"
    with pytest.raises(ValueError) as info:
        sample.main(sample.parse_args(["--ckpt", tiny_ckpt, "--num-sampling-steps", "2",
                                       "--out", str(out), *extra]))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_checkpoint_without_ema_says_use_weights_model(tmp_path):
    ckpt = make_checkpoint(tmp_path / "noema.pt", with_ema=False)
    out = tmp_path / "x.png"
    result = run_sample("--ckpt", ckpt, "--num-sampling-steps", "2", "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: checkpoint {ckpt} has no 'ema' weights: use --weights model "
                                     f"to sample with its raw training weights")
    assert not out.exists()
    sample.main(sample.parse_args(["--ckpt", ckpt, "--weights", "model", "--class-labels", "1",
                                   "--num-sampling-steps", "2", "--out", str(out)]))
    assert out.exists()


def test_bare_state_dict_needs_settings_on_the_command_line(tmp_path):
    ckpt = make_checkpoint(tmp_path / "full.pt")
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(ckpt)["ema"], bare)
    out = tmp_path / "bare.png"
    with pytest.raises(JobError, match="checkpoint holds DiC-Tiny weights but the model is DiC-S"):
        sample.main(sample.parse_args(["--ckpt", str(bare), "--model", "DiC-S", "--image-size", "16",
                                       "--num-classes", "10", "--vae", "none", "--out", str(out)]))
    with pytest.raises(JobError, match=r"checkpoint does not fit DiC-Tiny \(input_size=16, "
                                              r"in_channels=1, num_classes=1000\)"):
        sample.main(sample.parse_args(["--ckpt", str(bare), "--model", "DiC-Tiny", "--image-size", "16",
                                       "--vae", "none", "--out", str(out)]))
    assert not out.exists()
    sample.main(sample.parse_args(["--ckpt", str(bare), "--model", "DiC-Tiny", "--image-size", "16",
                                   "--num-classes", "10", "--vae", "none", "--class-labels", "0",
                                   "--num-sampling-steps", "2", "--out", str(out)]))
    with Image.open(out) as image:  # 1 input channel read off the weights
        assert image.size == grid_size(1, 4, 16) == (16, 16)


# ------------------------------------------------------------------ helpers/sampling/ (guidance, noise)

def tiny_latent_model(seed=0):
    """DiC-Tiny on 4x8x8 latents, 10 classes."""
    return random_model(seed=seed, input_size=8, in_channels=4, num_classes=10)


@torch.no_grad()
def test_guide_channels_official_guides_3_of_4_and_all_guides_4():
    model = tiny_latent_model()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 20]), torch.tensor([3, 7])
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 10))
    scale = 4.0
    guided = uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4])
    official = make_model_fn(model, scale, "official")(x, t, y)
    every = make_model_fn(model, scale, "all")(x, t, y)
    assert official.shape == every.shape == (2, 8, 8, 8)
    torch.testing.assert_close(official[:, :3], guided[:, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(official[:, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)  # eps channel 3 + sigma
    torch.testing.assert_close(every[:, :4], guided, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(every[:, 4:], cond[:, 4:], rtol=1e-5, atol=1e-5)
    assert (official[:, 3] - every[:, 3]).abs().max() > 1e-3
    assert make_model_fn(model, 1.0) == model.forward  # no guidance: DiT's plain forward
    with pytest.raises(JobError, match="--guide-channels must be one of official, all"):
        make_model_fn(model, 2.0, "some")


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_sample_depends_only_on_its_index_not_its_batch(sampler):
    model = tiny_latent_model()
    model_fn = make_model_fn(model, 1.5)
    shape = (4, 8, 8)

    def run(indices, pad_to=None, seed=0):
        noise = IndexNoise(seed, indices, pad_to=pad_to)
        labels = draw_labels(noise, 10)
        return sample_latents(5, model_fn, noise, labels, shape, sampler)[:len(indices)]

    together = run(range(4))
    # Same batch shape (padded), other batch-mates and positions: bit for bit the same.
    apart = torch.cat([run([0, 1], pad_to=4), run([2], pad_to=4), run([3], pad_to=4)])
    assert torch.equal(together, apart)
    assert torch.equal(run([3, 1], pad_to=4), together[[3, 1]])
    # Another batch size: the same sample up to the float rounding of batched kernels.
    torch.testing.assert_close(run([2]), together[2:3], rtol=1e-4, atol=1e-3)
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(run(range(2), seed=1), together[:2])
    assert torch.isfinite(together).all()


def test_labels_random_or_balanced_and_noise_unchanged_by_balancing():
    noise_a, noise_b = IndexNoise(7, range(20, 32)), IndexNoise(7, range(20, 32))
    random_labels = draw_labels(noise_a, 5)
    balanced = draw_labels(noise_b, 5, balanced=True)
    assert balanced.tolist() == [i % 5 for i in range(20, 32)]
    assert random_labels.min() >= 0 and random_labels.max() < 5 and len(set(random_labels.tolist())) > 1
    assert torch.equal(noise_a.randn((2, 3)), noise_b.randn((2, 3)))
    assert torch.equal(draw_labels(IndexNoise(7, [25, 21]), 5), random_labels[[5, 1]])
    padded = IndexNoise(7, [25, 21], pad_to=4)
    assert draw_labels(padded, 5, balanced=True).tolist() == [0, 1, 0, 0]
    assert padded.randn((2, 3))[2:].abs().sum() == 0
    # Index i's generator is seeded with derive_seed(seed, i): another index or seed, another stream.
    assert torch.equal(IndexNoise(7, [25]).randn((3,))[0], torch.randn(3, generator=torch.Generator().manual_seed(
        derive_seed(7, 25))))
    assert derive_seed(0, 1) != derive_seed(1, 0) and 0 <= derive_seed(2**40, 10**9) < 2**63


# ------------------------------------------------------------------ fast path

def fast_path_run(model, sampler="ddpm", cfg_scale=4.0, indices=range(4), pad_to=None, steps=5, **speed):
    """Latents of `indices` (4x8x8) after `steps` steps with make_model_fn's fast-path settings."""
    model_fn = make_model_fn(model, cfg_scale, **speed)
    noise = IndexNoise(0, indices, pad_to=pad_to)
    labels = draw_labels(noise, 10)
    return sample_latents(steps, model_fn, noise, labels, (4, 8, 8), sampler)[:len(indices)]


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def test_bf16_model_call_returns_fp32_close_to_fp32():
    model = tiny_latent_model()
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([999, 500, 3]), torch.tensor([1, 2, 3])
    # Measured relative L2 error of one call (4 random tiny models): 0.7-0.8% without guidance,
    # 1.8-2.1% at cfg 4 (the scale multiplies the error of cond - uncond).
    for cfg_scale, bound in ((1.0, 1.5e-2), (4.0, 4e-2)):
        fp32 = make_model_fn(model, cfg_scale)(x, t, y)
        bf16 = make_model_fn(model, cfg_scale, precision="bf16")(x, t, y)
        assert fp32.dtype == bf16.dtype == torch.float32
        assert 1e-4 < relative_error(bf16, fp32) < bound
    with pytest.raises(JobError, match="--precision must be one of fp32, tf32, bf16, got 'fp16'"):
        make_model_fn(model, 4.0, precision="fp16")


@torch.no_grad()
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_bf16_sampling_stays_close_to_fp32(sampler):
    """The diffusion arithmetic stays fp32; only the model call runs in bf16. Measured relative L2
    error of the latents after 5 steps (tiny random model, 3 seeds): 0.4-0.5% without guidance,
    1.1-1.6% at cfg 4 (guidance multiplies the cond - uncond error by the scale)."""
    for cfg_scale, bound in ((1.0, 1e-2), (4.0, 3e-2)):
        fp32 = fast_path_run(tiny_latent_model(), sampler, cfg_scale)
        bf16 = fast_path_run(tiny_latent_model(), sampler, cfg_scale, precision="bf16")
        assert bf16.dtype == torch.float32
        assert 1e-4 < relative_error(bf16, fp32) < bound


@torch.no_grad()
def test_channels_last_samples_equal_default_within_1e_5():
    fp32 = fast_path_run(tiny_latent_model())
    model = tiny_latent_model()
    nhwc = fast_path_run(model, channels_last=True)
    assert model.x_embedder.proj.weight.is_contiguous(memory_format=torch.channels_last)
    # Measured: ~1.5e-6 of the largest value (different summation order only).
    torch.testing.assert_close(nhwc, fp32, rtol=1e-5, atol=1e-5 * fp32.abs().max().item())


@torch.no_grad()
@pytest.mark.parametrize("speed", [dict(precision="bf16"), dict(channels_last=True),
                                   dict(precision="bf16", channels_last=True)])
def test_each_fast_path_setting_keeps_a_sample_independent_of_its_batch(speed):
    model = tiny_latent_model()
    together = fast_path_run(model, indices=range(4), **speed)
    # As two ranks of a 2-process run would make them: other batch-mates, same (padded) shape.
    rank0 = fast_path_run(model, indices=[0, 2], pad_to=4, **speed)
    rank1 = fast_path_run(model, indices=[1, 3], pad_to=4, **speed)
    assert torch.equal(torch.stack([rank0[0], rank1[0], rank0[1], rank1[1]]), together)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_sampling_equals_eager_up_to_rounding():
    eager = fast_path_run(tiny_latent_model(), steps=3)
    compiled = fast_path_run(tiny_latent_model(), steps=3, compile=True)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())


def test_speed_flags_defaults_and_sample_py_end_to_end(tiny_ckpt, tmp_path):
    args = sample.parse_args(["--ckpt", "x.pt"])
    assert (args.precision, args.channels_last, args.compile) == ("auto", False, False)
    assert args.cfg_scale == 4.0
    fast = ["--ckpt", tiny_ckpt, "--class-labels", "1", "2", "--num-sampling-steps", "3",
            "--precision", "bf16", "--channels-last", "--out"]
    sample.main(sample.parse_args(fast + [str(tmp_path / "a.png")]))
    sample.main(sample.parse_args(fast + [str(tmp_path / "b.png")]))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


# ------------------------------------------------------------------ pixel space: clip x0 to [-1, 1]

@torch.no_grad()
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_pixel_space_samples_lie_in_minus_one_one(sampler):
    model = random_model(input_size=8, in_channels=1, num_classes=10)  # its x0 leaves [-1, 1] by far
    args = argparse.Namespace(image_size=8, sampler=sampler)
    process = reverse_process(5, sampler, clip_denoised=clips_denoised(None), in_channels=1)
    images = generate(model, None, process, make_model_fn(model, 1.0), IndexNoise(0, range(4)),
                      torch.tensor([0, 1, 2, 3]), args.image_size, "cpu")
    assert images.shape == (4, 1, 8, 8)
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.1                                     # not all one value
    unclipped = sample_latents(5, make_model_fn(model, 1.0), IndexNoise(0, range(4)),
                               torch.tensor([0, 1, 2, 3]), (1, 8, 8), sampler)
    assert unclipped.abs().max() > 10                             # without the clip: far outside


@torch.no_grad()
def test_latent_space_sampling_is_not_clipped(tiny_vae_dir):
    vae = load_vae(tiny_vae_dir, "cpu")
    model = tiny_latent_model()
    args = argparse.Namespace(image_size=16, sampler="ddpm")      # 8x8 latents of the factor-2 VAE
    model_fn = make_model_fn(model, 4.0)
    labels = torch.tensor([0, 1])

    def latents(clip):
        return sample_latents(5, model_fn, IndexNoise(0, range(2)), labels, (4, 8, 8), clip_denoised=clip)

    images = generate(model, vae, reverse_process(5, clip_denoised=clips_denoised(vae)), model_fn,
                      IndexNoise(0, range(2)), labels, args.image_size, "cpu")
    assert torch.equal(images, decode(vae, latents(False)))       # DiT's clip_denoised=False
    assert not torch.equal(latents(False), latents(True))
    assert clips_denoised(None) and clips_denoised("none") and not clips_denoised(vae)
    assert not clips_denoised("ema") and not clips_denoised(tiny_vae_dir)


def test_main_leaves_autograd_on_for_in_process_callers(tiny_ckpt, tmp_path):
    assert torch.is_grad_enabled()
    sample.main(sample.parse_args(["--ckpt", tiny_ckpt, "--class-labels", "1", "--num-sampling-steps", "2",
                                   "--out", str(tmp_path / "g.png")]))
    assert torch.is_grad_enabled()


def test_several_processes_are_refused_before_any_work(tiny_ckpt, tmp_path, monkeypatch):
    """Under a many-process torchrun every rank would write the same --out: sample_ddp.py's job."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "g.png"
    with pytest.raises(JobError, match="sample.py runs as one process: use sample_ddp.py"):
        sample.main(sample.parse_args(["--ckpt", tiny_ckpt, "--out", str(out)]))
    assert not out.exists()


# ------------------------------------------------------------------ the pictures of DiT's talks: sweep, walk

def test_slerp_matches_hand_computed_values():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    ends = slerp(torch.randn(3, 4), torch.randn(3, 4), [0.0, 1.0])
    walk = slerp(a, b, [0.0, 1 / 3, 0.5, 1.0])
    assert torch.equal(walk[0], a) and torch.equal(walk[3], b)          # the ends exactly, any vectors
    assert torch.equal(ends[0], slerp(ends[0], ends[1], [0.0])[0])
    torch.testing.assert_close(walk[1], torch.tensor([3 ** 0.5 / 2, 0.5]))  # 30 degrees along the arc
    torch.testing.assert_close(walk[2], (a + b) / 2 ** 0.5)             # the midpoint of the quarter circle
    scaled = slerp(3 * a, 3 * b, torch.linspace(0, 1, 7))                 # orthogonal, equal norms: norm 3
    torch.testing.assert_close(scaled.norm(dim=1), torch.full((7,), 3.0))
    # 45 degrees apart: (sin(pi/8) / sin(pi/4)) (a + (1, 1)) = 0.5411961 (2, 1) at w = 1/2.
    torch.testing.assert_close(slerp(a, torch.tensor([1.0, 1.0]), [0.5])[0], torch.tensor([1.0823922, 0.5411961]))
    # Parallel (no arc) and zero vectors: the straight line.
    torch.testing.assert_close(slerp(a, 2 * a, [0.5])[0], torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(slerp(torch.zeros(2), b, [0.25])[0], torch.tensor([0.0, 0.25]))


def test_cfg_scale_parses_one_or_several_scales(capsys):
    args = sample.parse_args(["--ckpt", "x.pt"])
    assert (args.cfg_scales, args.cfg_scale, args.interpolate, args.nrow) == ((4.0,), 4.0, None, None)
    args = sample.parse_args(["--ckpt", "x.pt", "--cfg-scale", "1,1.5,4"])
    assert (args.cfg_scales, args.cfg_scale) == ((1.0, 1.5, 4.0), 4.0)   # the largest: the shared checks'
    with pytest.raises(SystemExit):
        sample.parse_args(["--ckpt", "x.pt", "--cfg-scale", "1,,4"])
    assert "--cfg-scale: takes a number or comma-separated numbers such as 1,1.5,4, got '1,,4'" in capsys.readouterr().err


def tiles(path, count, columns, side=16, padding=2):
    """The `count` images of a save_image grid (`columns` per row), as uint8 arrays."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return [pixels[padding + r * (side + padding):][:side, padding + c * (side + padding):][:, :side]
            for r, c in (divmod(k, columns) for k in range(count))]


def test_cfg_sweep_column_equals_a_run_at_that_scale(tiny_ckpt, tmp_path, capsys):
    """Every column starts from the same noise (ancestral ddpm: x_T and every per-step noise)."""
    common = ["--ckpt", tiny_ckpt, "--class-labels", "1", "6", "--num-sampling-steps", "3", "--seed", "5"]
    sweep = sample.main(sample.parse_args(common + ["--cfg-scale", "1,4", "--out", str(tmp_path / "sweep.png")]))
    assert "Saved a guidance sweep of 2 labels (1 6) x 2 scales (1, 4)" in capsys.readouterr().out
    with Image.open(sweep) as image:
        assert image.size == grid_size(4, 2, 16)                         # 2 rows (labels) x 2 columns
    grid = tiles(sweep, 4, 2)
    for column, scale in enumerate(["1", "4"]):
        single = sample.main(sample.parse_args(common + ["--cfg-scale", scale, "--nrow", "1",
                                                         "--out", str(tmp_path / f"cfg{scale}.png")]))
        assert all(np.array_equal(grid[2 * row + column], tile) for row, tile in enumerate(tiles(single, 2, 1)))
    assert not np.array_equal(grid[0], grid[1])                          # the scale shows


def test_cfg_sweep_refuses_a_model_without_a_null_label(tmp_path):
    ckpt = make_checkpoint(tmp_path / "nodrop.pt", model_overrides={"class_dropout_prob": 0.0})
    with pytest.raises(JobError, match="has no null label .* pass --cfg-scale 1"):
        sample.main(sample.parse_args(["--ckpt", ckpt, "--cfg-scale", "1,2", "--out", str(tmp_path / "x.png")]))
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("objective, sampler", [(None, []), (SIT, ["--mode", "sde"])], ids=["ddpm", "sit-sde"])
def test_latent_walk_ends_are_the_two_seeds_images(tmp_path, capsys, objective, sampler):
    """Ancestral samplers: the per-step noise is walked too, so both ends equal sample.py's images of
    seeds 2 and 3. Compared in batches of the walk's shape (3 rows), where rounding is bit-exact."""
    ckpt = make_checkpoint(tmp_path / "ckpt.pt", objective=objective)
    common = ["--ckpt", ckpt, "--num-sampling-steps", "3", "--cfg-scale", "2", *sampler]
    walk = sample.main(sample.parse_args(common + ["--class-labels", "4", "9", "--seed", "2", "--interpolate", "3",
                                                   "--out", str(tmp_path / "walk.png")]))
    assert "Saved a latent walk of 3 images (label 4, seed 2 -> 3)" in capsys.readouterr().out
    steps = tiles(walk, 3, 3)
    for seed, end in (("2", steps[0]), ("3", steps[2])):
        single = sample.main(sample.parse_args(common + ["--class-labels", "4", "4", "4", "--seed", seed,
                                                         "--out", str(tmp_path / f"seed{seed}.png")]))
        assert np.array_equal(tiles(single, 3, 4)[0], end)
    assert not np.array_equal(steps[0], steps[1]) and not np.array_equal(steps[1], steps[2])
