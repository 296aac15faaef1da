"""Commands users already have: the official DiC train.py's flags, fast-DiT's extract_features.py
flags and `accelerate launch --mixed_precision fp16 train.py`."""
import os

import extract_features
from conftest import make_image_folder
from test_train import TINY, call_main, only_run, run_script

DIGITS = [*TINY, "--dataset", "digits", "--global-batch-size", "8", "--max-steps", "1"]


def test_official_dic_flags_are_accepted_or_refused_with_the_equivalent(tmp_path, capsys):
    assert call_main([*DIGITS, "--results-dir", tmp_path / "r", "--model-domain", "latent"]) == 0
    assert "--model-domain latent is the official script's flag and unused here" in capsys.readouterr().out
    assert call_main([*DIGITS, "--results-dir", tmp_path / "x", "--ckpt-iter", "400000"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --ckpt-iter 400000 is the official script's resume: use --resume {tmp_path / 'x'}/<NNN>-DiC-Tiny/"
        f"checkpoints/0400000.pt (or --resume auto for the newest)")
    assert call_main([*DIGITS, "--results-dir", tmp_path / "x", "--start-epoch", "3"]) == 2
    assert "--start-epoch 3 is the official script's resume: --resume auto restores" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_accelerate_mixed_precision_on_train_py_warns(tmp_path):
    proc = run_script([*DIGITS, "--results-dir", tmp_path / "r"], env={"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert proc.returncode == 0, proc.output
    assert ("warning: accelerate launch asked for --mixed_precision fp16, which train.py does not use: run "
            "train_accelerate.py") in proc.stderr
    assert os.listdir(os.path.join(only_run(tmp_path / "r"), "checkpoints")) == ["0000001.pt"]


def test_fast_dit_extract_features_flags(tmp_path, tiny_vae_dir, monkeypatch):
    data = make_image_folder(tmp_path / "images", num_classes=2, per_class=3, size=(40, 36))
    monkeypatch.chdir(tmp_path)
    args = extract_features.build_parser().parse_args(
        ["--data-path", data, "--model", "DiT-XL/2", "--image-size", "32", "--vae", tiny_vae_dir,
         "--global-batch-size", "4", "--num-workers", "0", "--num-classes", "2", "--epochs", "1"])
    assert args.features_path == "features"   # fast-DiT's default
    assert extract_features.run_main(extract_features.main, args) == 0
    assert args.batch_size == 4               # one process: the whole global batch
    assert sorted(os.listdir(tmp_path / "features" / "imagenet32_features")) == [f"{i}.npy" for i in range(6)]
