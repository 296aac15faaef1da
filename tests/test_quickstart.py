"""The quick start path end to end (few steps), and its judge on known inputs."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, subprocess_env
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
                                  "--samples-per-class", "2", "--sampling-steps", "3")
    assert (run_dir / "checkpoints" / "0000006.pt").is_file()

    # Grid: 10 rows (classes) x 2 columns of 16x16 images enlarged 4x, 2-pixel padding.
    grid = Image.open(run_dir / "samples.png")
    assert grid.size == (2 + 2 * (64 + 2), 2 + 10 * (64 + 2))
    curve = Image.open(run_dir / "loss_curve.png")
    assert curve.size == (600, 350)
    assert np.asarray(curve.convert("L")).std() > 0          # something was drawn

    figures = json.loads((run_dir / "quality.json").read_text())
    check_figures(figures, out, num_samples=20, steps=6)
    # The DDPM objective's sampler defaults are recorded.
    assert figures["objective"] == "ddpm" and figures["sampler"] == quickstart.SAMPLER_DEFAULTS["ddpm"][0]
    assert figures["cfg_scale"] == quickstart.CFG_DEFAULTS["ddpm"] and figures["sampling_steps"] == 3


def test_quickstart_trains_and_samples_flow_matching(tmp_path):
    import quickstart
    out, run_dir = run_quickstart(tmp_path, "--objective", "sit", "--steps", "4", "--log-every", "2",
                                  "--batch-size", "16", "--samples-per-class", "1", "--sampling-steps", "2",
                                  "--cfg-scale", "2")
    assert (run_dir / "checkpoints" / "0000004.pt").is_file()
    assert Image.open(run_dir / "samples.png").size == (2 + 1 * (64 + 2), 2 + 10 * (64 + 2))
    assert (run_dir / "loss_curve.png").is_file()
    figures = json.loads((run_dir / "quality.json").read_text())
    check_figures(figures, out, num_samples=10, steps=4)
    assert figures["objective"] == "sit" and figures["cfg_scale"] == 2.0
    assert figures["sampler"] == quickstart.SAMPLER_DEFAULTS["sit"][0] and figures["sampling_steps"] == 2
    checkpoint = torch.load(run_dir / "checkpoints" / "0000004.pt", map_location="cpu", weights_only=False)
    assert checkpoint["objective"]["name"] == "sit"


def test_quickstart_sampler_follows_the_objective():
    import quickstart
    assert quickstart.parse_args([]).objective == "ddpm"
    ddpm, sit = quickstart.parse_args(["--objective", "ddpm"]), quickstart.parse_args(["--objective", "sit"])
    assert (ddpm.sampler, ddpm.sampling_steps) == quickstart.SAMPLER_DEFAULTS["ddpm"]
    assert (sit.sampler, sit.sampling_steps) == quickstart.SAMPLER_DEFAULTS["sit"]
    assert quickstart.parse_args(["--objective", "sit", "--sampler", "euler", "--cfg-scale", "3"]).cfg_scale == 3.0
    for wrong in (["--objective", "sit", "--sampler", "ddim"], ["--objective", "ddpm", "--sampler", "heun"]):
        with pytest.raises(SystemExit):
            quickstart.parse_args(wrong)


def test_learning_rate_default_follows_the_model_family():
    """DiCo-Tiny's quick start trains at 2e-3 (77% class accuracy at DiC-Tiny's 1e-3, 99% at 2e-3);
    DiC and DiT keep 1e-3; a given --lr always wins."""
    import quickstart
    assert quickstart.parse_args([]).lr == 1e-3
    assert quickstart.parse_args(["--model", "DiT-S/2"]).lr == 1e-3
    assert quickstart.parse_args(["--model", "DiCo-Tiny"]).lr == 2e-3
    assert quickstart.parse_args(["--model", "DiCo-Tiny", "--lr", "5e-4"]).lr == 5e-4
