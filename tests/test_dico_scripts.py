"""DiCo in the scripts: one registry lookup, checkpoints recognised from their keys (ours and the
official release layout, so sampling needs no --model), training with gradient checkpointing and
REPA stage taps, and a bit-exact 2-process resume."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from test_repa_training import paired, repa_args, vit_weights  # noqa: F401  (fixtures)
from test_train import assert_opt_equal, assert_state_dicts_equal, call_main, load, only_run, run_script

import sample
import sample_ddp
from dico_models import DiCo_models
from helpers.sampling.checkpoint_model import head_learns_sigma, identify_model, read_checkpoint
from helpers.sampling.flags import resolve_settings
from helpers.utils.checkpoint import identify_variant, load_model_weights
from helpers.utils.cli import JobError
from helpers.utils.models import create_model, model_names

KEYS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spec_keys")
DIGITS = ["--model", "DiCo-Tiny", "--dataset", "digits", "--global-batch-size", "8", "--num-workers", "0",
          "--no-progress", "--log-every", "1"]


def official_state_dict(name, seed=0):
    """Random tensors with exactly the official key names and shapes of `name`."""
    with open(os.path.join(KEYS_DIR, f"{name}.json")) as f:
        shapes = json.load(f)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*v, generator=g) * 0.02 for k, v in shapes.items()}


def test_every_dico_variant_is_in_the_one_lookup():
    assert model_names()[-6:] == list(DiCo_models) == ["DiCo-S", "DiCo-B", "DiCo-L", "DiCo-XL", "DiCo-H",
                                                       "DiCo-Tiny"]
    with torch.device("meta"):
        assert create_model("DiCo-XL", input_size=64, num_classes=10).hidden_size == 416
    with pytest.raises(ValueError, match=r"DiCo-Tiny does not take 'skip_stride'.*dico_models\.py"):
        create_model("DiCo-Tiny", skip_stride=1)


@pytest.mark.parametrize("name", ["DiCo-S", "DiCo-B", "DiCo-L", "DiCo-XL", "DiCo-H"])
def test_every_official_variant_is_identified_from_its_keys(name):
    with torch.device("meta"):
        shapes_only = DiCo_models[name]().state_dict()
    assert identify_variant(shapes_only, 32, 4, 1000) == name
    assert identify_variant(shapes_only, 64, 4, 1000) == name        # the 512 px model: same weights


def test_official_layout_and_bare_files_sample_without_model(tmp_path):
    ema = official_state_dict("DiCo-S")
    official = {"model": ema, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiCo-S", model_domain="dico", image_size=256, num_classes=1000,
                                           global_batch_size=256, vae="ema")}
    torch.save(official, tmp_path / "DiCo-S-400K-256x256.pt")
    torch.save(ema, tmp_path / "bare.pt")
    for path in ("DiCo-S-400K-256x256.pt", "bare.pt"):
        args = sample.parse_args(["--ckpt", str(tmp_path / path), "--out", str(tmp_path / "x.png")])
        checkpoint, state_dict = read_checkpoint(args.ckpt, args.weights)     # weights_only read
        resolve_settings(args, checkpoint, state_dict, log=None)
        assert (args.model, args.image_size, args.num_classes, args.learn_sigma) == ("DiCo-S", 256, 1000, True)
    assert identify_model(ema, 256, "ema", None, 1000, True) == "DiCo-S"
    assert head_learns_sigma(ema, None, 256, "ema", None, 1000, {}) is True
    model = create_model("DiCo-S")
    load_model_weights(model, ema, "DiCo-S")                                  # strict
    with pytest.raises(JobError, match="checkpoint holds DiCo-S weights but the model is DiC-S"):
        load_model_weights(create_model("DiC-S"), ema, "DiC-S")


def test_trains_with_grad_checkpointing_and_samples_without_model(tmp_path, capsys):
    assert call_main([*DIGITS, "--max-steps", "2", "--ckpt-every", "2", "--grad-checkpointing",
                      "--results-dir", tmp_path / "r"]) == 0
    run = only_run(tmp_path / "r")
    assert os.path.basename(run) == "000-DiCo-Tiny"
    ckpt = os.path.join(run, "checkpoints", "0000002.pt")
    common = ["--class-labels", "1", "7", "--num-sampling-steps", "3"]
    sample.main(sample.parse_args(["--ckpt", ckpt, *common, "--out", str(tmp_path / "a.png")]))
    assert "--model DiCo-Tiny" in capsys.readouterr().out                    # from the checkpoint
    torch.save(load(ckpt)["ema"], tmp_path / "bare.pt")                       # no args: named by its keys
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "bare.pt"), "--image-size", "16", "--num-classes",
                                   "10", "--vae", "none", *common, "--out", str(tmp_path / "b.png")]))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as image:
        assert image.size[1] == 16 + 4


def test_flow_matching_trains_and_sample_ddp_writes_its_npz_without_model(tmp_path):
    """--objective sit on DiCo-Tiny, then sample_ddp.py (SiT's Euler ODE, read from the checkpoint)
    with no --model: a uint8 .npz of the requested count and image shape."""
    assert call_main([*DIGITS, "--objective", "sit", "--max-steps", "2", "--ckpt-every", "2",
                      "--results-dir", tmp_path / "r"]) == 0
    ckpt = os.path.join(only_run(tmp_path / "r"), "checkpoints", "0000002.pt")
    assert load(ckpt)["objective"]["name"] == "sit"
    npz = sample_ddp.main(sample_ddp.parse_args(["--ckpt", ckpt, "--num-fid-samples", "5", "--per-proc-batch-size",
                                                 "2", "--sampling-method", "euler", "--num-sampling-steps", "3",
                                                 "--sample-dir", str(tmp_path / "s")]))
    assert "DiCo-Tiny" in os.path.basename(npz) and "ode-euler-3" in os.path.basename(npz)
    with np.load(npz) as f:
        assert f["arr_0"].shape == (5, 16, 16, 3) and f["arr_0"].dtype == np.uint8


@pytest.mark.parametrize("objective", ["ddpm", "sit"])
def test_repa_taps_u_repas_stage(tmp_path, paired, vit_weights, objective):  # noqa: F811
    """DiCo, U-shaped like DiC, starts from U-REPA's recipe: the middle stage, upsampled to the
    encoder's 4x4 grid, with the manifold term (W = 3)."""
    argv = [a if a != "DiC-Tiny" else "DiCo-Tiny" for a in repa_args(paired, vit_weights, tmp_path / "r")]
    assert call_main([*argv, "--max-steps", "2", "--objective", objective]) == 0
    checkpoint = load(os.path.join(only_run(tmp_path / "r"), "checkpoints", "0000002.pt"))
    assert checkpoint["objective"]["repa"]["tap"] == "mid"                    # 8x8 latents: mid is 2x2
    assert checkpoint["objective"]["repa"]["manifold_coeff"] == 3
    assert checkpoint["objective"]["name"] == objective
    assert checkpoint["args"]["model"] == "DiCo-Tiny"


def test_resume_is_bit_identical_with_two_processes(tmp_path):
    """4 steps in one go == 2 steps, then --resume auto to 4 (DiCo-Tiny on digits, 2 processes)."""
    common = [*DIGITS, "--ckpt-every", "2"]
    one_go = run_script([*common, "--max-steps", "4", "--results-dir", str(tmp_path / "a")], nproc=2)
    assert one_go.returncode == 0, one_go.output
    first = run_script([*common, "--max-steps", "2", "--results-dir", str(tmp_path / "b")], nproc=2)
    assert first.returncode == 0, first.output
    resumed = run_script([*common, "--max-steps", "4", "--results-dir", str(tmp_path / "b"), "--resume", "auto"],
                         nproc=2)
    assert resumed.returncode == 0, resumed.output
    a = load(os.path.join(only_run(tmp_path / "a"), "checkpoints", "0000004.pt"))
    b = load(os.path.join(only_run(tmp_path / "b"), "checkpoints", "0000004.pt"))
    assert_state_dicts_equal(a["model"], b["model"])
    assert_state_dicts_equal(a["ema"], b["ema"])
    assert_opt_equal(a["opt"], b["opt"])
    assert a["world_size"] == 2 and a["args"]["model"] == "DiCo-Tiny"
    assert not all(torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])
    assert a["loss_window"] == b["loss_window"]


def test_bench_gmacs_match_the_spec():
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from gmacs import SPEC_DICO_CONV_LINEAR_GMACS_256, SPEC_GMACS_256, count_gmacs
    for name, counted in SPEC_DICO_CONV_LINEAR_GMACS_256.items():
        gmacs, params = count_gmacs(name, 32)
        assert abs(gmacs - counted) < (0.05 if name == "DiCo-H" else 0.005), (name, gmacs)  # convs + Linears
        if name in SPEC_GMACS_256:                 # the README's torchprofile count, a little higher
            assert 0 < SPEC_GMACS_256[name] - gmacs < 0.1, (name, gmacs)
    assert params == 1_037_408_328
