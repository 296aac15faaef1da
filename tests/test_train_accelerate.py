"""train_accelerate.py: exact bf16 resume over two CPU processes, the same checkpoint format as train.py,
and GradScaler state carried through checkpoints (the fp16 path; accelerate runs fp16 as fp32 on CPU)."""
import os

import pytest
import torch

from test_train import (assert_opt_equal, assert_state_dicts_equal, call_main, latent_args, latents,  # noqa: F401
                        load, logged_losses, only_run, run_script, weights_rel_err)

import train
from helpers.utils.log import read_losses
from helpers.utils.models import create_model

CPU = {"ACCELERATE_USE_CPU": "true"}


def test_bf16_resume_is_bit_identical_and_format_matches_train_py(tmp_path, latents):
    """bf16 + channels_last under accelerate on 2 processes: exact resume, and checkpoints in the
    format (and default memory layout) of a default train.py run."""
    common = ["--precision", "bf16", "--channels-last", "--log-every", "1", "--ckpt-every", "2"]
    one_go = run_script(latent_args(latents, tmp_path / "a", *common, "--max-steps", "4"), nproc=2,
                        script="train_accelerate.py", env=CPU)
    assert one_go.returncode == 0, one_go.output
    assert "accelerate: 2 processes on cpu" in one_go.stdout and "mixed precision bf16" in one_go.stdout
    assert ("fast path: precision bf16 (accelerate), AdamW fused, EMA foreach, channels_last on, compile off"
            in one_go.stdout)
    first = run_script(latent_args(latents, tmp_path / "b", *common, "--max-steps", "2"), nproc=2,
                       script="train_accelerate.py", env=CPU)
    assert first.returncode == 0, first.output
    resumed = run_script(latent_args(latents, tmp_path / "b", *common, "--max-steps", "4", "--resume", "auto"),
                         nproc=2, script="train_accelerate.py", env=CPU)
    assert resumed.returncode == 0, resumed.output

    run_a, run_b = only_run(tmp_path / "a"), only_run(tmp_path / "b")
    a = load(os.path.join(run_a, "checkpoints", "0000004.pt"))
    b = load(os.path.join(run_b, "checkpoints", "0000004.pt"))
    assert_state_dicts_equal(a["model"], b["model"])
    assert_state_dicts_equal(a["ema"], b["ema"])
    assert_opt_equal(a["opt"], b["opt"])
    assert all(v.dtype == torch.float32 for v in a["ema"].values())       # EMA kept in fp32
    assert logged_losses(one_go.stdout) == logged_losses(first.stdout) + logged_losses(resumed.stdout)
    assert read_losses(os.path.join(run_a, "losses.csv"))[1] == read_losses(os.path.join(run_b, "losses.csv"))[1]
    assert a["world_size"] == 2 and len(a["rng"]) == 2 and a["args"]["precision"] == "bf16"
    assert a["fast_path"] == {"precision": "bf16", "adamw": "fused", "ema": "foreach", "channels_last": True,
                              "compile": False}
    assert all(v.is_contiguous() for key in ("model", "ema") for v in a[key].values())

    # Same format as train.py: identical top-level keys, weight keys/shapes, optimizer layout, RNG entries.
    assert call_main(latent_args(latents, tmp_path / "ddp", "--max-steps", "2", "--ckpt-every", "2")) == 0
    d = load(os.path.join(only_run(tmp_path / "ddp"), "checkpoints", "0000002.pt"))
    assert set(a) == set(d)
    for key in ("model", "ema"):
        assert {k: v.shape for k, v in a[key].items()} == {k: v.shape for k, v in d[key].items()}
    assert a["opt"]["param_groups"] == d["opt"]["param_groups"]
    assert a["opt"]["state"].keys() == d["opt"]["state"].keys()
    assert set(a["rng"][0]) == set(d["rng"][0])
    assert set(a["args"]) == set(d["args"]) and a["model_kwargs"] == d["model_kwargs"]


class GradScalerEngine(train.DDPEngine):
    """train.py's engine with a CPU GradScaler in the loop, as accelerate runs fp16 on a GPU:
    backward scales the loss, the optimizer steps through the scaler."""

    def __init__(self):
        super().__init__()
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)

    def prepare(self, model, opt):
        scaler = self.scaler

        class ScaledStep:
            def __init__(self, inner):
                self.inner = inner
                self.param_groups = inner.param_groups

            def zero_grad(self, set_to_none=True):
                self.inner.zero_grad(set_to_none=set_to_none)

            def step(self):
                scaler.step(self.inner)
                scaler.update()
        return model, ScaledStep(opt)

    def backward(self, loss):
        self.scaler.scale(loss).backward()


def test_grad_scaler_state_is_saved_and_restored(tmp_path, latents):
    """What train_accelerate.py does with accelerator.scaler under fp16 on a GPU, here with a CPU
    GradScaler in train.py's loop: its state goes into every checkpoint and comes back on resume,
    bit-exactly."""

    def fit(results, max_steps, resume=None):
        argv = latent_args(latents, results, "--max-steps", max_steps, "--ckpt-every", "2", "--log-every", "1")
        engine = GradScalerEngine()
        train.main(train.parse_args([str(a) for a in argv] + (["--resume", resume] if resume else [])), engine)
        return engine.scaler

    one_go = fit(tmp_path / "a", 4)
    fit(tmp_path / "b", 2)
    resumed = fit(tmp_path / "b", 4, resume="auto")
    a = load(os.path.join(only_run(tmp_path / "a"), "checkpoints", "0000004.pt"))
    b = load(os.path.join(only_run(tmp_path / "b"), "checkpoints", "0000004.pt"))
    mid = load(os.path.join(only_run(tmp_path / "b"), "checkpoints", "0000002.pt"))
    assert mid["scaler"]["scale"] == 2.0 ** 12                 # grew once per step (growth_interval=1)
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] == 2.0 ** 14
    assert one_go.get_scale() == resumed.get_scale() == 2.0 ** 14
    assert_state_dicts_equal(a["model"], b["model"])
    assert_opt_equal(a["opt"], b["opt"])


@pytest.mark.slow
def test_compile_trains_resumes_and_saves_plain_checkpoints(tmp_path, latents):
    """--compile (torch.compile of the prepared model), one process: 2 steps, then resume to 4;
    the checkpoints have the eager run's keys and load into a plain model."""
    common = ["--log-every", "1", "--ckpt-every", "2"]
    first = run_script(latent_args(latents, tmp_path / "c", *common, "--max-steps", "2", "--compile"),
                       script="train_accelerate.py", env=CPU)
    assert first.returncode == 0, first.output
    assert "channels_last off, compile on" in first.stdout
    resumed = run_script(latent_args(latents, tmp_path / "c", *common, "--max-steps", "4", "--resume", "auto"),
                         script="train_accelerate.py", env=CPU)
    assert resumed.returncode == 0, resumed.output
    assert "compile on" in resumed.stdout and "Resuming from" in resumed.stdout
    assert call_main(latent_args(latents, tmp_path / "e", *common, "--max-steps", "4")) == 0
    c = load(os.path.join(only_run(tmp_path / "c"), "checkpoints", "0000004.pt"))
    e = load(os.path.join(only_run(tmp_path / "e"), "checkpoints", "0000004.pt"))
    assert c["fast_path"]["compile"] is True and c["step"] == 4
    for key in ("model", "ema"):
        assert list(c[key]) == list(e[key])
        assert weights_rel_err(c[key], e[key]) < 1e-5   # float rounding (measured ~1e-8)
    create_model("DiC-Tiny", **c["model_kwargs"]).load_state_dict(c["ema"], strict=True)
