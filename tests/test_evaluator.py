"""evaluator.py: ADM's command line prints evaluate.py's numbers, in ADM's lines."""
import numpy as np
import pytest

import evaluate
import evaluator
from helpers.utils.cli import run_main
from helpers.evaluation.inception import InceptionV3Features


@pytest.fixture(scope="module")
def batches(tmp_path_factory, random_inception_weights):
    folder = tmp_path_factory.mktemp("evaluator")
    rng = np.random.default_rng(0)
    ref, sample = folder / "ref.npz", folder / "sample.npz"
    np.savez(ref, rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    np.savez(sample, rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8))
    weights = random_inception_weights          # conftest: save_random_inception_weights(path, seed=0)
    return str(ref), str(sample), str(weights)


def cached(extractor):
    """The extractor, computed once per distinct batch (both runs see the same images)."""
    memory = {}

    def extract(images):
        key = images.tobytes()
        if key not in memory:
            memory[key] = extractor(images)
        return memory[key]
    return extract


def test_prints_adm_lines_with_evaluate_numbers(batches, capsys):
    ref, sample, weights = batches
    extractor = cached(InceptionV3Features(weights, device="cpu"))
    flags = ["--batch-size", "4", "--device", "cpu", "--fid-method", "eigh"]
    args = evaluator.build_parser().parse_args([ref, sample, *flags])
    assert run_main(lambda a: evaluator.main(a, extractor=extractor), args) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = evaluate.main(evaluate.build_parser().parse_args([ref, sample, *flags]),
                             extractor=extractor)
    assert lines[0] == "computing reference batch activations..."
    assert lines[-5:] == [f"{name}: {expected[name]}" for name in evaluate.METRIC_NAMES]
    assert [name for name in evaluate.METRIC_NAMES] == ["Inception Score", "FID", "sFID",
                                                        "Precision", "Recall"]
    assert expected["FID"] > 0 and 0 <= expected["Recall"] <= 1


def test_flags_pass_through(batches):
    ref, sample, weights = batches
    args = evaluator.build_parser().parse_args([ref, sample, "--inception-weights", weights,
                                                "--batch-size", "8", "--device", "cpu",
                                                "--fid-method", "eigh"])
    ours = evaluator.evaluate_args(args)
    assert (ours.ref_batch, ours.sample_batch, ours.inception_weights) == (ref, sample, weights)
    assert (ours.batch_size, ours.device, ours.fid_method) == (8, "cpu", "eigh")
    assert ours.make_ref is None and ours.json is None


def test_defaults_are_evaluate_defaults(batches):
    ref, sample, _ = batches
    ours = evaluator.evaluate_args(evaluator.build_parser().parse_args([ref, sample]))
    assert vars(ours) == vars(evaluate.build_parser().parse_args([ref, sample]))


def test_bad_batch_is_one_line_with_exit_code_2(batches, tmp_path, capsys):
    _, sample, weights = batches
    missing = str(tmp_path / "missing.npz")
    args = evaluator.build_parser().parse_args([missing, sample, "--inception-weights", weights])
    assert run_main(evaluator.main, args) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: reference batch {missing} does not "
                                                    f"exist"]
