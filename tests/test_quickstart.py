"""The quick start path end to end (few steps), and its judge on known inputs."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, load_bench_module, subprocess_env
from helpers.data.images import builtin_dataset
from helpers.evaluation.quality import evaluate_samples, feature_frechet, train_classifier


@pytest.fixture(scope="module")
def digits():
    return builtin_dataset("digits", "train", 16), builtin_dataset("digits", "test", 16)


def test_judge_scores_real_digits_as_real_and_shuffled_labels_as_wrong(digits):
    train, test = digits
    # Real held-out digits presented as "samples": accuracy is the judge's own test accuracy,
    # and their distance to the test set is zero (same images).
    figures = evaluate_samples(test.images, test.labels, train.images, train.labels,
                               test.images, test.labels)
    assert figures["classifier_test_accuracy"] > 0.9
    assert figures["sample_accuracy"] == figures["classifier_test_accuracy"]
    assert abs(figures["frechet_samples_vs_test"]) < 1e-6
    assert figures["frechet_train_vs_test"] > 0
    # The same images with every label moved to the next class: the judge disagrees almost always.
    wrong = (test.labels + 1) % 10
    figures = evaluate_samples(test.images, wrong, train.images, train.labels, test.images, test.labels)
    assert figures["sample_accuracy"] < 0.1


def test_frechet_ranks_noise_far_above_real_digits(digits):
    train, test = digits
    judge = train_classifier(train.images, train.labels)
    noise = torch.rand(len(test.images), 1, 16, 16) * 2 - 1
    real = feature_frechet(judge, train.images[:len(test.images)], test.images)
    assert feature_frechet(judge, noise, test.images) > 10 * real


def run_quickstart(tmp_path, *flags):
    command = [sys.executable, "quickstart.py", "--results-dir", str(tmp_path), *flags]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, tmp_path / "000-DiC-Tiny"


def check_figures(figures, out, num_samples, steps):
    for key in ("classifier_test_accuracy", "sample_accuracy"):
        assert 0.0 <= figures[key] <= 1.0
    assert figures["classifier_test_accuracy"] > 0.9
    assert figures["num_samples"] == num_samples and figures["steps"] == steps
    assert np.isfinite(figures["frechet_samples_vs_test"]) and figures["frechet_train_vs_test"] > 0
    assert figures["nn_train_distance_samples"] > 0 and figures["nn_train_distance_heldout"] > 0
    assert re.search(r"held-out accuracy: \d+\.\d%", out)
    assert re.search(rf"Sample class accuracy \(cfg {figures['cfg_scale']}\): \d+\.\d% of {num_samples} samples", out)
    match = re.search(r"samples vs real held-out (\d+\.\d\d); floor, real train vs real held-out (\d+\.\d\d)", out)
    assert match and float(match.group(1)) == pytest.approx(figures["frechet_samples_vs_test"], abs=0.01)
    match = re.search(r"Nearest training digit \(median L2 distance\): samples (\d+\.\d\d); real held-out (\d+\.\d\d)", out)
    assert match and float(match.group(2)) == pytest.approx(figures["nn_train_distance_heldout"], abs=0.01)
    assert f"(step={steps:07d}) Train Loss:" in out


def test_quickstart_writes_grid_curve_and_figures(tmp_path):
    import quickstart
    out, run_dir = run_quickstart(tmp_path, "--objective", "ddpm", "--steps", "6", "--log-every", "2", "--batch-size", "16",
                                  "--samples-per-class", "2", "--sampling-steps", "3", "--processes", "2")
    assert (run_dir / "checkpoints" / "0000006.pt").is_file()
    # Trained as printed: two single-thread processes under torchrun, the quick start's width, no null
    # label (cfg 1 never needs one).
    assert "$ OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 train.py --dataset digits" in out
    saved = torch.load(run_dir / "checkpoints" / "0000006.pt", map_location="cpu", weights_only=True)["args"]
    assert saved["model_overrides"] == {"hidden_size": 16} and saved["class_dropout_prob"] == 0.0
    assert saved["lr"] == 4e-3 and "DDP: 2 process(es) on cpu" in out

    # Grid: 10 rows (classes) x 2 columns of 16x16 images enlarged 4x, 2-pixel padding.
    grid = Image.open(run_dir / "samples.png")
    assert grid.size == (2 + 2 * (64 + 2), 2 + 10 * (64 + 2))
    curve = Image.open(run_dir / "loss_curve.png")
    assert curve.size == (600, 350)
    assert np.asarray(curve.convert("L")).std() > 0          # something was drawn

    figures = json.loads((run_dir / "quality.json").read_text())
    check_figures(figures, out, num_samples=20, steps=6)
    # The DDPM objective's sampler defaults are recorded, with the model calls they cost.
    assert figures["objective"] == "ddpm" and figures["sampler"] == quickstart.SAMPLER_DEFAULTS["ddpm"][0]
    assert figures["cfg_scale"] == quickstart.CFG_DEFAULTS["ddpm"] and figures["sampling_steps"] == 3
    assert figures["nfe"] == 3 and figures["precision"] in ("fp32", "bf16") and figures["processes"] == 2
    assert figures["class_dropout_prob"] == 0.0

    # The sampler sweep on this checkpoint: NFE counted per sampler, judged, tabled and plotted.
    sweep = load_bench_module("sampler_sweep")
    rows = sweep.sweep_checkpoint(str(run_dir / "checkpoints" / "0000006.pt"), samples_per_class=1, seed=0,
                                  samplers=[("ddim", 3), ("dpm-solver", 2)], log=lambda line: None)
    assert [(row["sampler"], row["nfe"], row["num_samples"]) for row in rows] == [("ddim", 3, 10), ("dpm-solver", 2, 10)]
    assert all(0 <= row["accuracy"] <= 1 and np.isfinite(row["frechet"]) for row in rows)
    assert "| ddpm | " in sweep.markdown_table(rows)
    sweep.plot(rows, str(tmp_path / "sweep.png"))
    assert Image.open(tmp_path / "sweep.png").size == (1000, 380)


def test_sampler_sweep_picks_the_cheapest_within_half_a_point_of_the_best():
    sweep = load_bench_module("sampler_sweep")
    row = lambda sampler, nfe, acc, fd: dict(objective="ddpm", sampler=sampler, steps=nfe, nfe=nfe,  # noqa: E731
                                             accuracy=acc, frechet=fd, floor=2.0, num_samples=500)
    rows = [row("ddpm", 250, 0.980, 2.5), row("ddpm", 50, 0.976, 2.6), row("ddim", 25, 0.975, 3.0),
            row("dpm-solver", 10, 0.960, 4.0)]
    assert sweep.cheapest_near_best(rows) is rows[2]          # 97.5% is within 0.5 points of 98.0%
    rows[2]["accuracy"] = 0.974                               # 0.6 points below: the next cheapest
    assert sweep.cheapest_near_best(rows) is rows[1]
    assert "**ddpm**" in sweep.markdown_table(rows)
    assert set(sweep.SWEEPS) == {"ddpm", "sit", "rf"}
    # Two models' sweeps are averaged per sampler before the pick.
    other = [dict(row, accuracy=row["accuracy"] - 0.01, frechet=row["frechet"] + 1) for row in rows]
    averaged = sweep.average_over_models(rows + other)
    assert len(averaged) == 4 and all(row["models"] == 2 for row in averaged)
    assert averaged[0]["accuracy"] == pytest.approx(0.975) and averaged[0]["frechet"] == pytest.approx(3.0)


def test_launch_plan_follows_the_machine(monkeypatch):
    """bf16 only where the device has bf16 instructions; one single-thread process per idle core (as
    many as divide the batch); one process on a GPU; --precision and --processes win."""
    import quickstart
    from helpers.utils import fastpath
    settings = {}
    monkeypatch.setattr(fastpath, "fastest_settings", lambda device: settings[device])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings["cpu"] = dict(precision="bf16", threads=2)
    assert quickstart.launch_plan("auto", None, 64) == ("bf16", 2, 1)
    settings["cpu"] = dict(precision="fp32", threads=3)
    assert quickstart.launch_plan("auto", None, 64) == ("fp32", 2, 1)     # 3 does not divide 64
    assert quickstart.launch_plan("auto", None, 48) == ("fp32", 3, 1)
    assert quickstart.launch_plan("bf16", 1, 64) == ("bf16", 1, 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    settings["cuda"] = dict(precision="bf16", threads=None)
    assert quickstart.launch_plan("auto", None, 64) == ("bf16", 1, None)
    assert quickstart.parse_args([]).precision == "auto" and quickstart.parse_args([]).processes is None


@pytest.mark.parametrize("objective", ["sit", "rf"])
def test_quickstart_trains_and_samples_flow_matching(tmp_path, objective):
    """SiT's flow and REPA's rf (t = 1 noise), guided: trained with DiT's null-label rate."""
    import quickstart
    out, run_dir = run_quickstart(tmp_path, "--objective", objective, "--steps", "4", "--log-every", "2",
                                  "--batch-size", "16", "--samples-per-class", "1", "--sampling-steps", "2",
                                  "--cfg-scale", "2", "--processes", "1")
    assert (run_dir / "checkpoints" / "0000004.pt").is_file()
    assert Image.open(run_dir / "samples.png").size == (2 + 1 * (64 + 2), 2 + 10 * (64 + 2))
    assert (run_dir / "loss_curve.png").is_file()
    figures = json.loads((run_dir / "quality.json").read_text())
    check_figures(figures, out, num_samples=10, steps=4)
    assert figures["objective"] == objective and figures["cfg_scale"] == 2.0
    assert figures["sampler"] == quickstart.SAMPLER_DEFAULTS[objective][0] and figures["sampling_steps"] == 2
    # SiT's Euler takes --sampling-steps as grid points (2: one step), REPA's as steps (2: two).
    assert figures["nfe"] == {"sit": 1, "rf": 2}[objective]
    assert figures["class_dropout_prob"] == 0.1 and figures["processes"] == 1
    assert "$ OMP_NUM_THREADS=1 python train.py --dataset digits" in out
    checkpoint = torch.load(run_dir / "checkpoints" / "0000004.pt", map_location="cpu", weights_only=True)
    assert checkpoint["objective"]["name"] == objective and checkpoint["args"]["class_dropout_prob"] == 0.1


def test_quickstart_sampler_follows_the_objective():
    import quickstart
    assert quickstart.parse_args([]).objective == "ddpm"
    for objective in ("ddpm", "sit", "rf"):
        chosen = quickstart.parse_args(["--objective", objective])
        assert (chosen.sampler, chosen.sampling_steps) == quickstart.SAMPLER_DEFAULTS[objective]
    assert quickstart.parse_args(["--objective", "rf", "--sampler", "heun"]).sampler == "heun"
    assert quickstart.parse_args(["--objective", "sit", "--sampler", "euler", "--cfg-scale", "3"]).cfg_scale == 3.0
    for wrong in (["--objective", "sit", "--sampler", "ddim"], ["--objective", "ddpm", "--sampler", "heun"]):
        with pytest.raises(SystemExit):
            quickstart.parse_args(wrong)


def test_learning_rate_and_null_label_defaults():
    """DiC-Tiny's quick start (width 16) trains at 4e-3, DiCo-Tiny at 2e-3 (77% class accuracy at 1e-3,
    99% at 2e-3), other families at 1e-3; a given --lr always wins. No null label unless guided."""
    import quickstart
    assert quickstart.parse_args([]).lr == 4e-3
    assert quickstart.parse_args(["--model", "DiT-S/2"]).lr == 1e-3
    assert quickstart.parse_args(["--model", "DiCo-Tiny"]).lr == 2e-3
    assert quickstart.parse_args(["--model", "DiCo-Tiny", "--lr", "5e-4"]).lr == 5e-4
    assert quickstart.parse_args([]).class_dropout_prob == 0.0
    assert quickstart.parse_args(["--cfg-scale", "4"]).class_dropout_prob == 0.1
    assert quickstart.parse_args(["--class-dropout-prob", "0.2"]).class_dropout_prob == 0.2
