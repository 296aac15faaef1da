"""Checkpoints that load safely: no script runs code hidden in a checkpoint, what train.py writes
loads with torch.load's defaults, and export.py's .safetensors samples as the checkpoint's EMA."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import REPO_ROOT, subprocess_env

import export
from helpers.utils.checkpoint import load_checkpoint_file
from helpers.utils.cli import JobError
from test_sample import make_checkpoint


class CreatesAFile:
    """Unpickling this object calls builtins.open(path, "w"): a stand-in for arbitrary code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_checkpoint(folder, name="evil.pt"):
    """A checkpoint-shaped pickle whose loading would create `folder/pwned`."""
    marker = os.path.join(folder, "pwned")
    path = os.path.join(folder, name)
    weights = {"w": torch.zeros(2)}
    torch.save({"model": weights, "ema": weights, "payload": CreatesAFile(marker)}, path)
    return path, marker


def run(script, *argv):
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, script), *map(str, argv)], cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    proc.output = proc.stdout + proc.stderr
    return proc


def test_the_payload_really_runs_under_full_unpickling(tmp_path):
    """Guard for the tests below: the file is dangerous when loaded the old way."""
    path, marker = malicious_checkpoint(str(tmp_path))
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


@pytest.mark.parametrize("script,argv", [
    ("sample.py", ["--ckpt", "{ckpt}", "--out", "{tmp}/grid.png"]),
    ("sample_ddp.py", ["--ckpt", "{ckpt}", "--sample-dir", "{tmp}/samples"]),
    ("train.py", ["--dataset", "digits", "--model", "DiC-Tiny", "--resume", "{ckpt}", "--results-dir", "{tmp}/r"]),
    ("train.py", ["--dataset", "digits", "--model", "DiC-Tiny", "--ckpt", "{ckpt}", "--results-dir", "{tmp}/r"]),
    ("export.py", ["--ckpt", "{ckpt}", "--out", "{tmp}/w.safetensors"]),
])
def test_a_malicious_pickle_runs_no_code_in_any_script(tmp_path, script, argv):
    ckpt, marker = malicious_checkpoint(str(tmp_path))
    proc = run(script, *[a.format(ckpt=ckpt, tmp=tmp_path) for a in argv])
    assert proc.returncode == 2, proc.output
    assert not os.path.exists(marker)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: checkpoint {ckpt} was refused: it is not a plain weights file (")
    assert "(it holds io.open, which loading would call); " in lines[0]
    assert lines[0].endswith(f"if you trust its source, convert it once with: python export.py --trust-pickle "
                             f"--ckpt {ckpt} --out {ckpt[:-3]}-safe.pt")
    assert sorted(os.listdir(tmp_path)) == ["evil.pt"]   # nothing else written


def test_trusted_conversion_gives_a_plain_checkpoint(tmp_path):
    """--trust-pickle is the one explicit way to read a full pickle: the legacy test checkpoint
    (argparse.Namespace args) becomes one that torch.load reads with weights_only=True."""
    import argparse
    legacy = tmp_path / "legacy.pt"
    torch.save({"ema": {"w": torch.ones(3)}, "args": argparse.Namespace(model="DiC-Tiny", image_size=16)}, legacy)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(legacy, weights_only=True)
    out = tmp_path / "plain.pt"
    export.main(export.build_parser().parse_args(["--trust-pickle", "--ckpt", str(legacy), "--out", str(out)]))
    plain = torch.load(out)
    assert plain["args"] == {"model": "DiC-Tiny", "image_size": 16} and torch.equal(plain["ema"]["w"], torch.ones(3))
    with pytest.raises(JobError, match="already exists"):
        export.main(export.build_parser().parse_args(["--trust-pickle", "--ckpt", str(legacy), "--out", str(out)]))


def test_export_writes_ema_and_metadata_and_samples_like_the_checkpoint(tmp_path):
    ckpt = make_checkpoint(tmp_path / "0000010.pt")
    out = tmp_path / "DiC-Tiny.safetensors"
    proc = run("export.py", "--ckpt", ckpt, "--out", out)
    assert proc.returncode == 0, proc.output
    source = load_checkpoint_file(ckpt)
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == sorted(source["ema"])        # the EMA weights, nothing else (no opt)
        assert all(torch.equal(f.get_tensor(k), source["ema"][k]) for k in f.keys())
        metadata = f.metadata()
    assert metadata["model"] == '"DiC-Tiny"' and '"image_size": 16' in metadata["args"]
    assert '"name": "ddpm"' in metadata["objective"]

    # sample.py from the .safetensors (no --model) == from the checkpoint's EMA, byte for byte.
    grid = ["--class-labels", "1", "2", "--num-sampling-steps", "3", "--out"]
    a = run("sample.py", "--ckpt", out, *grid, tmp_path / "a.png")
    b = run("sample.py", "--ckpt", ckpt, *grid, tmp_path / "b.png")
    assert a.returncode == 0 and b.returncode == 0, a.output + b.output
    assert "--model DiC-Tiny --image-size 16 --num-classes 10 --vae none" in a.stdout
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # ... and a second export never replaces the first.
    again = run("export.py", "--ckpt", ckpt, "--out", out)
    assert again.returncode == 2 and again.stderr.strip() == (f"error: {out} already exists: choose another "
                                                              f"--out or move it away")
