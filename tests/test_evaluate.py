"""evaluate.py and helpers/evaluation/metrics.py: ADM's metric math against independent computations,
the Inception taps, and the script end to end on a randomly initialised InceptionV3 (no network).
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from conftest import REPO_ROOT, make_image_folder, subprocess_env

import evaluate
from helpers.utils.cli import JobError
from helpers.evaluation.inception import SPATIAL_DIM, InceptionV3Features
from helpers.evaluation.metrics import (RunningStatistics, compute_statistics, frechet_distance,
                                        inception_score, manifold_radii, precision_recall)
from helpers.data.images import center_crop_arr


def random_spd(rng, dim, rank=None):
    a = rng.standard_normal((rank or 2 * dim, dim))
    return a.T @ a / len(a)


def run_main(*argv, extractor=None):
    return evaluate.main(evaluate.build_parser().parse_args([str(a) for a in argv]),
                         extractor=extractor)


#################################################################################
#                         Statistics and Fréchet distance                       #
#################################################################################

def test_compute_statistics_is_mean_and_unbiased_covariance():
    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    mu, sigma = compute_statistics(x)
    x64 = x.astype(np.float64)
    centred = x64 - x64.mean(0)
    np.testing.assert_allclose(mu, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)


def test_running_statistics_equal_one_shot_statistics():
    rng = np.random.default_rng(1)
    x = 100.0 + rng.standard_normal((37, 5)) * np.array([1e-2, 1, 2, 3, 4])  # large offset
    running = RunningStatistics()
    for chunk in (x[:10], x[10:11], x[11:]):
        running.update(chunk)
    mu, sigma = running.finalize()
    mu_ref, sigma_ref = compute_statistics(x)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_direct_scipy(method):
    rng = np.random.default_rng(2)
    dim = 16
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    s1, s2 = random_spd(rng, dim), random_spd(rng, dim)
    direct = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(linalg.sqrtm(s1 @ s2)).real)
    assert direct > 1
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_of_identical_statistics_is_zero(method):
    rng = np.random.default_rng(3)
    mu, sigma = rng.standard_normal(12), random_spd(rng, 12)
    assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-9 * np.trace(sigma)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_diagonal_closed_form(method):
    # sum (sqrt(a) - sqrt(b))^2 + ||mu1 - mu2||^2 = (1 + 1 + 1) + (1 + 4 + 4) = 12
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 16.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, -2.0])
    fd = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert fd == pytest.approx(12.0, abs=1e-10)


def test_frechet_methods_agree_on_rank_deficient_covariances():
    # like FID on few images: covariances of 10 points in 40 dimensions
    rng = np.random.default_rng(4)
    f1, f2 = rng.standard_normal((10, 40)), rng.standard_normal((10, 40)) + 0.5
    (m1, s1), (m2, s2) = compute_statistics(f1), compute_statistics(f2)
    fd_sqrtm = frechet_distance(m1, s1, m2, s2, method="sqrtm")
    fd_eigh = frechet_distance(m1, s1, m2, s2, method="eigh")
    assert fd_sqrtm == pytest.approx(fd_eigh, rel=1e-6)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(JobError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(JobError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


#################################################################################
#                                Inception Score                                #
#################################################################################

def test_inception_score_uniform_predictions_is_one():
    assert inception_score(np.zeros((10, 7))) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_confident_balanced_predictions_is_num_classes():
    k = 4
    probs = np.eye(k)[np.arange(12) % k]                        # one-hot, 3 per class
    assert inception_score(probs, kind="probs") == pytest.approx(k, rel=1e-12)
    logits = 60.0 * np.eye(k)[np.arange(12) % k]                # softmax ~ one-hot
    assert inception_score(logits) == pytest.approx(k, rel=1e-9)


def test_inception_score_hand_computed_case():
    # p(y) = (0.75, 0.25); KL rows: 0.5 ln(4/3) and ln(4/3); IS = exp(0.75 ln(4/3)) = (4/3)^0.75
    probs = np.array([[0.5, 0.5], [1.0, 0.0]])
    assert inception_score(probs, kind="probs") == pytest.approx((4 / 3) ** 0.75, rel=1e-12)
    logits = np.log(np.array([[0.2, 0.8], [0.6, 0.4]]))
    p, py = np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([0.4, 0.6])
    expected = math.exp(np.mean(np.sum(p * np.log(p / py), axis=1)))
    assert inception_score(logits) == pytest.approx(expected, rel=1e-12)


def test_inception_score_splits_as_adm():
    confident = np.eye(2)                                        # IS 2 on its own
    uniform = np.full((2, 2), 0.5)                               # IS 1 on its own
    probs = np.concatenate([confident, uniform])
    assert inception_score(probs, split_size=2, kind="probs") == pytest.approx(1.5, rel=1e-12)
    # ADM's loop keeps a short last split: splits of 2, 2, 1 -> (2 + 1 + 1) / 3
    probs5 = np.concatenate([confident, uniform, uniform[:1]])
    assert inception_score(probs5, split_size=2, kind="probs") == pytest.approx(4 / 3, rel=1e-12)
    # fewer samples than one split: a single split of all of them
    assert inception_score(probs, split_size=5000, kind="probs") == pytest.approx(
        inception_score(probs, split_size=4, kind="probs"), rel=1e-12)


#################################################################################
#                               Precision / recall                              #
#################################################################################

def brute_force_precision_recall(real, fake, k):
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]                         # index 0 is the point itself
    d = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))     # (real, fake)
    precision = np.mean((d <= radii(real)[:, None]).any(axis=0))
    recall = np.mean((d <= radii(fake)[None, :]).any(axis=1))
    return precision, recall


def test_precision_recall_identical_sets_are_one():
    x = np.random.default_rng(5).standard_normal((20, 8))
    assert precision_recall(x, x.copy()) == (1.0, 1.0)


def test_precision_recall_far_apart_sets_are_zero():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((15, 8))
    assert precision_recall(real, rng.standard_normal((12, 8)) + 1000.0) == (0.0, 0.0)


def test_precision_recall_hand_computed_one_dimensional_k1():
    # real radii (k=1): 0->1, 1->1, 2->1, 10->8, -20->20; fake radii: 0.5->4.5, 5->4.5, 11->6, 20->9
    real = np.array([[0.0], [1.0], [2.0], [10.0], [-20.0]])
    fake = np.array([[0.5], [5.0], [11.0], [20.0]])
    # fake 20 lies in no real ball (10 away from 10 > 8); real -20 in no fake ball
    expected = (0.75, 0.8)
    assert brute_force_precision_recall(real, fake, k=1) == pytest.approx(expected)
    got = precision_recall(real, fake, k=1, dtype=torch.float64)
    assert got == pytest.approx(expected, abs=0)
    radii = manifold_radii(real, k=1, dtype=torch.float64)
    np.testing.assert_allclose(radii.numpy(), [1, 1, 1, 8, 20])


def test_precision_recall_k3_matches_brute_force_with_small_batches():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((41, 5))
    fake = 0.8 * rng.standard_normal((33, 5)) + 0.6
    expected = brute_force_precision_recall(real, fake, k=3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = precision_recall(real, fake, k=3, row_batch_size=7, col_batch_size=10,
                           dtype=torch.float64)
    assert got == pytest.approx(expected, abs=0)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=0)  # float32, ADM's batches


def test_precision_recall_needs_k_plus_one_points():
    with pytest.raises(JobError, match="at least 4"):
        precision_recall(np.zeros((3, 2)), np.zeros((5, 2)))


#################################################################################
#                              InceptionV3 features                             #
#################################################################################

@pytest.fixture(scope="module")
def inception_weights(random_inception_weights):   # conftest: save_random_inception_weights(path, seed=0)
    return random_inception_weights


@pytest.fixture(scope="module")
def inception(inception_weights):
    return InceptionV3Features(inception_weights, device="cpu")


def test_inception_taps_match_adm_layers(inception):
    images = np.random.default_rng(8).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    out = inception(images)
    assert out["pool"].shape == (1, 2048) and out["logits"].shape == (1, 1008)
    assert out["spatial"].shape == (1, SPATIAL_DIM) == (1, 7 * 17 * 17)
    assert all(np.isfinite(v).all() and v.std() > 1e-3 for v in out.values())
    model = inception.model
    # ADM's softmax input: pool_3 times the softmax weights, without the bias
    np.testing.assert_allclose(out["logits"], out["pool"] @ model.fc.weight.numpy().T,
                               rtol=1e-4, atol=1e-5)
    # mixed_6/conv:0[..., :7] in TF's (H, W, C) order, recomputed layer by layer
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                     "Mixed_6b", "Mixed_6c"):
            x = getattr(model, name)(x)
        unit = model.Mixed_6d.branch1x1(x)                           # (1, 192, 17, 17)
    expected = unit[0, :7].permute(1, 2, 0).numpy()                  # (17, 17, 7)
    np.testing.assert_allclose(out["spatial"].reshape(17, 17, 7), expected, rtol=1e-5, atol=1e-6)


#################################################################################
#                                 Script end to end                             #
#################################################################################

def run_script(*argv):
    return subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "evaluate.py"),
                             *[str(a) for a in argv]], cwd=REPO_ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_make_ref_and_evaluate_end_to_end(tmp_path, inception_weights):
    folder = make_image_folder(tmp_path / "real", num_classes=2, per_class=3, size=(40, 36))
    ref = tmp_path / "ref.npz"
    run_main("--make-ref", folder, "--out", ref, "--image-size", 32, "--num-ref-images", 0,
             "--num-workers", 0, "--inception-weights", inception_weights)
    with np.load(ref) as z:
        assert sorted(z.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
        arr = z["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (6, 32, 32, 3)
        assert z["mu"].shape == (2048,) and z["sigma"].shape == (2048, 2048)
        assert z["mu_s"].shape == (2023,) and z["sigma_s"].shape == (2023, 2023)
    first = sorted(os.listdir(os.path.join(folder, "n00000000")))[0]
    with Image.open(os.path.join(folder, "n00000000", first)) as img:
        np.testing.assert_array_equal(arr[0], np.asarray(center_crop_arr(img.convert("RGB"), 32)))

    samples, itself = tmp_path / "samples.npz", tmp_path / "itself.npz"
    np.savez(samples, np.random.default_rng(9).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    np.savez(itself, arr)
    jobs = {name: run_script(ref, batch, "--inception-weights", inception_weights, "--fid-method",
                             "eigh", "--batch-size", 4, "--json", tmp_path / f"{name}.json")
            for name, batch in (("other", samples), ("itself", itself))}
    outputs = {name: job.communicate(timeout=300) for name, job in jobs.items()}
    for name, job in jobs.items():
        assert job.returncode == 0, outputs[name][1][-2000:]
    assert "FID: " in outputs["other"][0] and "Recall: " in outputs["other"][0]
    other = json.loads((tmp_path / "other.json").read_text())
    same = json.loads((tmp_path / "itself.json").read_text())
    for result in (other, same):
        assert all(math.isfinite(result[k]) for k in evaluate.METRIC_NAMES)
        assert result["num_samples"] == 6 and result["ref_statistics"] == "from file"
    assert other["FID"] > 1 and other["sFID"] > 1 and other["Inception Score"] >= 1
    assert 0 <= other["Precision"] <= 1 and 0 <= other["Recall"] <= 1
    # a set against its own reference statistics: FID/sFID vanish, every point is covered
    assert abs(same["FID"]) < 1e-3 * other["FID"]
    assert abs(same["sFID"]) < 1e-3 * other["sFID"]
    assert same["Precision"] == 1.0 and same["Recall"] == 1.0


def fake_extractor(images):
    """Deterministic stand-in for InceptionV3: features from pixel values, ADM's dimensions."""
    flat = images.reshape(len(images), -1).astype(np.float32) / 255.0
    rng = np.random.default_rng(0)
    return {key: flat @ rng.standard_normal((flat.shape[1], dim)).astype(np.float32)
            for key, dim in (("pool", 2048), ("spatial", SPATIAL_DIM), ("logits", 1008))}


def test_make_ref_keeps_a_seeded_subset_from_an_npz(tmp_path):
    images = np.random.default_rng(10).integers(0, 256, (9, 20, 24, 3), dtype=np.uint8)
    source = tmp_path / "real.npz"
    np.savez(source, images)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.npz"
        run_main("--make-ref", source, "--out", out, "--image-size", 16, "--num-ref-images", 5,
                 "--batch-size", 4, extractor=fake_extractor)
        outs.append(np.load(out))
    crops = np.stack([np.asarray(center_crop_arr(Image.fromarray(im), 16)) for im in images])
    arr = outs[0]["arr_0"]
    assert arr.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(arr, outs[1]["arr_0"])                  # same seed, same subset
    assert all(any((row == crop).all() for crop in crops) for row in arr)
    mu, sigma = compute_statistics(fake_extractor(crops)["pool"])           # stats over all 9
    # (features of batches of 4 vs of all 9 differ at float32 round-off)
    np.testing.assert_allclose(outs[0]["mu"], mu, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(outs[0]["sigma"], sigma, rtol=1e-5, atol=1e-3)


#################################################################################
#                                   Bad input                                   #
#################################################################################

@pytest.fixture
def good_batch(tmp_path):
    path = tmp_path / "good.npz"
    np.savez(path, np.zeros((5, 8, 8, 3), dtype=np.uint8))
    return path


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.zeros((5, 8, 8, 3), np.uint8)), "has no arr_0 \\(keys: images\\)"),
    (dict(arr_0=np.zeros((5, 8, 8, 3), np.float32)), "dtype float32, expected uint8"),
    (dict(arr_0=np.zeros((5, 3, 8, 8), np.uint8)), "shape \\(5, 3, 8, 8\\).*channels first"),
    (dict(arr_0=np.zeros((5, 8, 8), np.uint8)), "shape \\(5, 8, 8\\), expected \\(N, H, W, 3\\)"),
    (dict(arr_0=np.zeros((3, 8, 8, 3), np.uint8)), "holds 3 images; at least 4"),
    (dict(arr_0=np.zeros((5, 8, 8, 3), np.uint8), mu=np.zeros(2048), sigma=np.eye(2048)),
     "has mu but not mu_s, sigma_s"),
])
def test_bad_batches_are_refused_before_any_work(tmp_path, good_batch, arrays, message):
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(JobError, match=message):
        run_main(bad, good_batch, extractor=fake_extractor)
    if "mu" not in arrays:
        with pytest.raises(JobError, match="sample batch .*" + message):
            run_main(good_batch, bad, extractor=fake_extractor)


def test_truncated_batch_is_refused_before_any_work(tmp_path, good_batch):
    import zipfile
    bad = tmp_path / "short.npz"                 # header says 10 images, data holds 5
    with zipfile.ZipFile(bad, "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                                 "shape": (10, 8, 8, 3)})
        f.write(np.zeros((5, 8, 8, 3), np.uint8).tobytes())
    with pytest.raises(JobError, match="arr_0 is truncated"):
        run_main(good_batch, bad, extractor=fake_extractor)


def test_bad_arguments_and_outputs_are_refused(tmp_path, good_batch):
    with pytest.raises(JobError, match="reference batch .*missing.npz does not exist"):
        run_main(tmp_path / "missing.npz", good_batch)
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(JobError, match="is not an .npz file"):
        run_main(not_npz, good_batch)
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    with pytest.raises(JobError, match="results.json already exists"):
        run_main(good_batch, good_batch, "--json", existing)
    assert existing.read_text() == "{}"
    with pytest.raises(JobError, match="already exists"):
        run_main("--make-ref", good_batch, "--out", good_batch)
    with pytest.raises(JobError, match="Inception weights .*nowhere.pth do not exist"):
        run_main(good_batch, good_batch, "--inception-weights", tmp_path / "nowhere.pth")
    with pytest.raises(JobError, match="--make-ref takes no REF/SAMPLE"):
        run_main(good_batch, "--make-ref", good_batch, "--out", tmp_path / "r.npz")
    with pytest.raises(JobError, match="needs --out"):
        run_main("--make-ref", good_batch)
    with pytest.raises(JobError, match="pass a reference batch and a sample batch"):
        run_main(good_batch)
    with pytest.raises(JobError, match="holds 2 images; at least 4"):
        folder = make_image_folder(tmp_path / "two", num_classes=1, per_class=2)
        run_main("--make-ref", folder, "--out", tmp_path / "r.npz", "--num-workers", 0)


def test_script_reports_bad_input_in_one_line(tmp_path, good_batch):
    job = run_script(tmp_path / "missing.npz", good_batch)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 2
    assert err.strip().splitlines() == [f"error: reference batch {tmp_path / 'missing.npz'} does not exist"]


#################################################################################
#                                    Slow                                       #
#################################################################################

@pytest.mark.slow
def test_default_sqrtm_path_end_to_end(tmp_path, inception_weights):
    """ADM's default scipy.linalg.sqrtm on 2048-d products (about a minute on one CPU thread)."""
    rng = np.random.default_rng(11)
    ref, samples = tmp_path / "ref.npz", tmp_path / "samples.npz"
    np.savez(ref, rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    np.savez(samples, rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    for method in ("sqrtm", "eigh"):
        run_main(ref, samples, "--inception-weights", inception_weights, "--fid-method", method,
                 "--json", tmp_path / f"{method}.json")
    a = json.loads((tmp_path / "sqrtm.json").read_text())
    b = json.loads((tmp_path / "eigh.json").read_text())
    for key in evaluate.METRIC_NAMES:
        assert a[key] == pytest.approx(b[key], rel=1e-4)
