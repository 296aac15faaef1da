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
from helpers.images import builtin_dataset
from helpers.quality import evaluate_samples, feature_frechet, train_classifier


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


def test_quickstart_writes_grid_curve_and_figures(tmp_path):
    command = [sys.executable, "quickstart.py", "--results-dir", str(tmp_path), "--steps", "6",
               "--log-every", "2", "--batch-size", "16", "--samples-per-class", "2",
               "--sampling-steps", "3"]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = tmp_path / "000-DiC-Tiny"
    assert (run_dir / "checkpoints" / "0000006.pt").is_file()

    # Grid: 10 rows (classes) x 2 columns of 16x16 images enlarged 4x, 2-pixel padding.
    grid = Image.open(run_dir / "samples.png")
    assert grid.size == (2 + 2 * (64 + 2), 2 + 10 * (64 + 2))
    curve = Image.open(run_dir / "loss_curve.png")
    assert curve.size == (600, 350)
    assert np.asarray(curve.convert("L")).std() > 0          # something was drawn

    figures = json.loads((run_dir / "quality.json").read_text())
    for key in ("classifier_test_accuracy", "sample_accuracy"):
        assert 0.0 <= figures[key] <= 1.0
    assert figures["classifier_test_accuracy"] > 0.9
    assert figures["num_samples"] == 20 and figures["steps"] == 6
    assert np.isfinite(figures["frechet_samples_vs_test"]) and figures["frechet_train_vs_test"] > 0

    out = result.stdout
    assert re.search(r"held-out accuracy: \d+\.\d%", out)
    assert re.search(r"Sample class accuracy \(cfg 4\.0\): \d+\.\d% of 20 samples", out)
    match = re.search(r"samples vs real held-out (\d+\.\d\d); floor, real train vs real held-out (\d+\.\d\d)", out)
    assert match and float(match.group(1)) == pytest.approx(figures["frechet_samples_vs_test"], abs=0.01)
    assert "(step=0000006) Train Loss:" in out
