"""Progress while training: EMA sample grids (fixed noise and classes), FID equal to evaluate.py's on
the same samples, TensorBoard curves without duplicated steps after a resume, W&B offline."""
import os
import types

import numpy as np
import pytest
import torch

from test_train import call_main, only_run

import evaluate

from helpers.utils.models import create_model
from helpers.training.monitor import Monitor, MonitorConfig
from helpers.training.objectives import DDPM

DIGITS = ["--model", "DiC-Tiny", "--dataset", "digits", "--global-batch-size", "8", "--no-progress",
          "--sample-every", "2", "--sample-steps", "3", "--sample-count", "4", "--ckpt-every", "2",
          "--ema-decay", "0.5", "--lr", "1e-2"]   # an EMA that moves within 4 steps


def test_grids_are_the_same_for_the_same_seed_and_after_a_resume(tmp_path):
    assert call_main([*DIGITS, "--max-steps", "4", "--results-dir", tmp_path / "a"]) == 0
    assert call_main([*DIGITS, "--max-steps", "2", "--results-dir", tmp_path / "b"]) == 0
    assert call_main([*DIGITS, "--max-steps", "4", "--results-dir", tmp_path / "b", "--resume", "auto"]) == 0
    a, b = (os.path.join(only_run(tmp_path / n), "samples") for n in ("a", "b"))
    assert sorted(os.listdir(a)) == sorted(os.listdir(b)) == ["0000002.png", "0000004.png"]
    for name in os.listdir(a):
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read()
    from PIL import Image
    with Image.open(os.path.join(a, "0000004.png")) as grid:
        assert grid.size == (2 * 18 + 2, 2 * 18 + 2)          # 2 x 2 images of 16 px, 2 px padding
    assert open(os.path.join(a, "0000002.png"), "rb").read() != open(os.path.join(a, "0000004.png"), "rb").read()


def test_tensorboard_curves_have_each_step_once_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    common = ["--model", "DiC-Tiny", "--dataset", "digits", "--global-batch-size", "8", "--no-progress",
              "--log-every", "1", "--ckpt-every", "2", "--tensorboard", "--results-dir", tmp_path]
    assert call_main([*common, "--max-steps", "3"]) == 0       # steps 1-3 logged, checkpoint at 2
    os.remove(os.path.join(only_run(tmp_path), "checkpoints", "0000003.pt"))   # as if killed after step 3
    assert call_main([*common, "--max-steps", "5", "--resume", "auto"]) == 0    # resumes at 2: 3, 4, 5
    events = EventAccumulator(os.path.join(only_run(tmp_path), "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "steps_per_sec", "images_per_sec", "peak_memory_gb", "grad_norm"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5]
    losses = dict(line.split(",")[:2] for line in open(os.path.join(only_run(tmp_path), "losses.csv")).read().split()[1:])
    assert [round(e.value, 5) for e in events.Scalars("loss")] == [round(float(losses[str(s)]), 5) for s in range(1, 6)]


def test_wandb_offline_writes_its_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    assert call_main(["--model", "DiC-Tiny", "--dataset", "digits", "--global-batch-size", "8", "--no-progress",
                      "--log-every", "1", "--max-steps", "2", "--wandb", "--results-dir", tmp_path / "r"]) == 0
    folder = os.path.join(only_run(tmp_path / "r"), "wandb")
    runs = [name for name in os.listdir(folder) if name.startswith("offline-run-")]
    assert len(runs) == 1 and any(f.endswith(".wandb") for f in os.listdir(os.path.join(folder, runs[0])))


@torch.no_grad()
def test_fid_during_training_equals_evaluate_py_on_the_same_samples(tmp_path, random_inception_weights):
    weights = random_inception_weights           # conftest: save_random_inception_weights(path), seed 0
    rng = np.random.default_rng(0)
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    torch.manual_seed(0)
    ema = create_model("DiC-Tiny", input_size=16, in_channels=1, num_classes=10).eval()
    for p in ema.parameters():
        p.data.normal_(0, 0.05)
    args = types.SimpleNamespace(global_seed=0, sample_steps=3, sample_cfg_scale=1.0, image_size=16,
                                 num_classes=10, fid_samples=6, fid_batch_size=4, fid_ref=str(ref),
                                 inception_weights=weights, tensorboard=False, wandb=False, wandb_project=None,
                                 wandb_entity=None, sample_count=4, sample_every=None, fid_every=1)
    log = types.SimpleNamespace(info=lambda message: None)
    run = types.SimpleNamespace(args=args, ema=ema, model=ema, vae=None, device=torch.device("cpu"), rank=0,
                                world_size=1, is_main=True, run_dir=str(tmp_path), log=log, objective=DDPM())
    monitor = Monitor(MonitorConfig(**vars(args)), run, 0, resumed=False)
    value = monitor.fid(step=1)
    indices, images = monitor.fid_images()
    assert indices == list(range(6)) and images.shape == (6, 16, 16, 3)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images)
    results = evaluate.main(evaluate.build_parser().parse_args([str(ref), str(samples), "--inception-weights", weights]))
    assert value == pytest.approx(results["FID"], rel=1e-6)
