"""train.py and helpers/training/setup.py: exact resume, data order, bad inputs, NaN stop, checkpoint layout.

Multi-process behaviour runs through real `torchrun --nproc_per_node 2` (gloo on CPU); single-process
checks call train.main() in-process (same code path, no interpreter start-up).
"""
import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, make_image_folder, subprocess_env

import sample
import train
from helpers.data import order as data_order
from helpers.training import runs
from helpers.training.setup import DataConfig, build_dataset
from helpers.utils.cli import JobError, run_main
from helpers.data.images import ImageFolderDataset
from helpers.data.per_file_writer import write_latent
from helpers.utils.log import read_losses
from helpers.utils.models import create_model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TINY = ["--model", "DiC-Tiny", "--num-workers", "0", "--no-progress"]
N_LATENTS = 32          # 4 steps per epoch at global batch 8
LATENT_SHAPE = (4, 8, 8)  # sd-vae latents of 64x64 images (factor 8)


def make_latents(root, n=N_LATENTS, shape=LATENT_SHAPE, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        write_latent(root, str(i), rng.standard_normal(shape).astype(np.float32), i % num_classes,
                     prefix="imagenet64")
    return str(root)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return make_latents(tmp_path_factory.mktemp("latents"))


def latent_args(latents, results, *extra):
    return [*TINY, "--feature-path", latents, "--image-size", "64", "--num-classes", "3",
            "--global-batch-size", "8", "--results-dir", str(results), *map(str, extra)]


def run_script(argv, nproc=1, script="train.py", env=None, timeout=300, hooks=None):
    """Run a script (under torchrun for nproc > 1); `hooks`: tests/hooked.py's test-only variables."""
    launch = [os.path.join(REPO_ROOT, "tests", "hooked.py"), script] if hooks else [os.path.join(REPO_ROOT, script)]
    cmd = (TORCHRUN if nproc > 1 else [sys.executable]) + launch + list(argv)
    env = {**(env or {}), **(hooks or {})}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    return proc


def call_main(argv):
    """train.main in this process, as `python train.py` runs it; returns the exit code."""
    return run_main(train.main, train.parse_args([str(a) for a in argv]))


def only_run(results):
    runs = sorted(os.listdir(results))
    assert len(runs) == 1, runs
    return os.path.join(results, runs[0])


def load(path):
    return torch.load(path, map_location="cpu")   # torch's default weights_only=True reads our checkpoints


def assert_state_dicts_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_opt_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def read_sample_log(run_dir):   # written by tests/hooked.py's DIC_TEST_LOG_SAMPLES
    """{step: set(indices)} over all ranks, plus {(rank, step): [indices]}."""
    per_step, per_rank = {}, {}
    for name in os.listdir(run_dir):
        m = re.match(r"debug_samples_rank(\d+)\.txt$", name)
        if not m:
            continue
        for line in open(os.path.join(run_dir, name)):
            step, epoch, *idx = map(int, line.split())
            per_rank[(int(m.group(1)), step)] = idx
            per_step.setdefault(step, []).extend(idx)
    return per_step, per_rank


def logged_losses(text):
    return re.findall(r"\(step=(\d{7})\) Train Loss: ([0-9.]+)", text)


#################################################################################
#                          Exact resume, two processes                          #
#################################################################################

def test_resume_is_bit_identical_with_two_processes(tmp_path, latents):
    """6 steps in one go == 3 steps, then --resume auto to 6: model, EMA, optimizer and losses."""
    common = ["--log-every", "1", "--ckpt-every", "2"]
    log_a, log_b = {"DIC_TEST_LOG_SAMPLES": tmp_path / "log_a"}, {"DIC_TEST_LOG_SAMPLES": tmp_path / "log_b"}
    os.makedirs(tmp_path / "log_a"), os.makedirs(tmp_path / "log_b")
    one_go = run_script(latent_args(latents, tmp_path / "a", *common, "--max-steps", "6"), nproc=2, hooks=log_a)
    assert one_go.returncode == 0, one_go.output
    first = run_script(latent_args(latents, tmp_path / "b", *common, "--max-steps", "3"), nproc=2, hooks=log_b)
    assert first.returncode == 0, first.output
    resumed = run_script(latent_args(latents, tmp_path / "b", *common, "--max-steps", "6", "--resume", "auto"),
                         nproc=2, hooks=log_b)
    assert resumed.returncode == 0, resumed.output

    run_a, run_b = only_run(tmp_path / "a"), only_run(tmp_path / "b")   # resume stays in the same folder
    assert os.path.basename(run_a) == os.path.basename(run_b) == "000-DiC-Tiny"
    assert sorted(os.listdir(os.path.join(run_a, "checkpoints"))) == ["0000002.pt", "0000004.pt", "0000006.pt"]
    assert sorted(os.listdir(os.path.join(run_b, "checkpoints"))) == [
        "0000002.pt", "0000003.pt", "0000004.pt", "0000006.pt"]
    a, b = load(os.path.join(run_a, "checkpoints", "0000006.pt")), load(os.path.join(run_b, "checkpoints", "0000006.pt"))
    assert_state_dicts_equal(a["model"], b["model"])
    assert_state_dicts_equal(a["ema"], b["ema"])
    assert_opt_equal(a["opt"], b["opt"])
    assert not all(torch.equal(a["model"][k], a["ema"][k]) for k in a["model"])   # EMA really lags
    # The checkpoint at the resume point is mid-epoch: epoch 0, 3 of 4 batches done.
    mid = load(os.path.join(run_b, "checkpoints", "0000003.pt"))
    assert (mid["step"], mid["epoch"], mid["batch_in_epoch"]) == (3, 0, 3)
    assert (a["step"], a["epoch"], a["batch_in_epoch"]) == (6, 1, 2)
    # Layout and keys: DiT's four plus the resume state, with one RNG state per process.
    assert {"model", "ema", "opt", "args", "step", "epoch", "batch_in_epoch", "rng", "scaler",
            "world_size", "global_batch_size", "loss_window"} <= set(a)
    assert a["world_size"] == 2 and len(a["rng"]) == 2
    assert set(a["rng"][0]) >= {"torch", "numpy", "python"}
    assert not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])   # per-process streams differ
    assert a["args"]["model"] == "DiC-Tiny" and a["args"]["in_channels"] == 4 and a["scaler"] is None
    assert a["objective"] == {"name": "ddpm", "learn_sigma": True, "noise_schedule": "linear",
                              "diffusion_steps": 1000} and a["format"] == "dic-train-2"

    # Identical logged losses (stdout and losses.csv), every step.
    assert logged_losses(one_go.stdout) == logged_losses(first.stdout) + logged_losses(resumed.stdout)
    assert len(logged_losses(one_go.stdout)) == 6
    steps_a, losses_a = read_losses(os.path.join(run_a, "losses.csv"))
    steps_b, losses_b = read_losses(os.path.join(run_b, "losses.csv"))
    assert steps_a == steps_b == [1, 2, 3, 4, 5, 6] and losses_a == losses_b
    assert "Resuming from" in open(os.path.join(run_b, "log.txt")).read()

    # Same samples on the same ranks at every step; each sample exactly once in epoch 0 (steps 1-4).
    per_step_a, per_rank_a = read_sample_log(tmp_path / "log_a")
    per_step_b, per_rank_b = read_sample_log(tmp_path / "log_b")
    assert per_rank_a == per_rank_b
    assert all(len(per_rank_a[(r, s)]) == 4 for r in (0, 1) for s in range(1, 7))
    epoch0 = sorted(i for s in range(1, 5) for i in per_step_a[s])
    assert epoch0 == list(range(N_LATENTS))
    epoch1 = [i for s in (5, 6) for i in per_step_a[s]]
    assert len(set(epoch1)) == 16 and epoch1 != [i for s in (1, 2) for i in per_step_a[s]]


def test_one_process_sees_each_sample_once_and_same_batches_as_two(tmp_path, latents):
    """One process over one epoch: every sample exactly once, and each step's global batch is the
    one two processes share between them (same seed, same order)."""
    proc = run_script(latent_args(latents, tmp_path / "r", "--max-steps", "4", "--log-every", "2",
                                  "--ckpt-every", "2"), hooks={"DIC_TEST_LOG_SAMPLES": tmp_path})
    assert proc.returncode == 0, proc.output
    per_step, per_rank = read_sample_log(tmp_path)
    assert sorted(i for s in per_step for i in per_step[s]) == list(range(N_LATENTS))
    sampler = data_order.ResumableDistributedSampler(list(range(N_LATENTS)), 2, 0, 8, seed=0)
    order = sampler.epoch_order()
    for s in range(1, 5):
        assert per_rank[(0, s)] == order[(s - 1) * 8: s * 8]   # one process walks the global order


#################################################################################
#                              Sampler and seeding                              #
#################################################################################

@pytest.mark.parametrize("n", [32, 37])
def test_sampler_partitions_every_epoch_and_resumes_by_offset(n):
    gb = 8
    for world in (1, 2, 4):
        samplers = [data_order.ResumableDistributedSampler(list(range(n)), world, r, gb, seed=3) for r in range(world)]
        for epoch in (0, 1):
            shards = []
            for s in samplers:
                s.set_epoch(epoch)
                shards.append(list(s))
                assert len(shards[-1]) == len(s) == n // gb * gb // world
            seen = sorted(i for shard in shards for i in shard)
            assert seen == sorted(samplers[0].epoch_order()) and len(set(seen)) == n // gb * gb
            # Starting 2 global batches in == each process skipping its first 2 local batches.
            for s, shard in zip(samplers, shards):
                s.set_epoch(epoch, start=2 * gb)
                assert list(s) == shard[2 * gb // world:]
    a = data_order.ResumableDistributedSampler(list(range(n)), 1, 0, gb, seed=3)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first


def test_random_flips_depend_only_on_seed_epoch_and_index(tmp_path):
    folder = make_image_folder(tmp_path / "img", num_classes=1, per_class=6, size=(20, 20))
    data = data_order.SeededSamples(ImageFolderDataset(folder, 16), seed=5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    forward = [data[i][0] for i in range(6)]
    assert torch.equal(torch.get_rng_state(), before)        # the training RNG stream is untouched
    torch.manual_seed(123)
    backward = {i: data[i][0] for i in reversed(range(6))}
    assert all(torch.equal(forward[i], backward[i]) for i in range(6))
    flipped = [not torch.equal(forward[i], data.dataset.load(i)) for i in range(6)]
    data.set_epoch(1)
    flipped1 = [not torch.equal(data[i][0], data.dataset.load(i)) for i in range(6)]
    assert any(flipped) and not all(flipped) and flipped != flipped1


#################################################################################
#                    Image folders through a (tiny) VAE, with workers           #
#################################################################################

def test_vae_image_folder_with_workers_and_corrupt_image_resumes_exactly(tmp_path, tiny_vae_dir, capsys):
    folder = make_image_folder(tmp_path / "img", num_classes=2, per_class=4, size=(40, 36))
    os.remove(os.path.join(folder, "n00000001", "img_1_3.png"))
    with open(os.path.join(folder, "n00000001", "img_1_3.png"), "wb") as f:
        f.write(b"not a png")    # one corrupt image: skipped with a warning, counted
    common = ["--model", "DiC-Tiny", "--data-path", folder, "--vae", tiny_vae_dir, "--image-size", "16",
              "--num-classes", "2", "--global-batch-size", "2", "--num-workers", "2", "--log-every", "2",
              "--ckpt-every", "100", "--no-progress"]
    assert call_main([*common, "--results-dir", tmp_path / "a", "--max-steps", "4"]) == 0
    out_a = capsys.readouterr().out
    assert call_main([*common, "--results-dir", tmp_path / "b", "--max-steps", "2"]) == 0
    assert call_main([*common, "--results-dir", tmp_path / "b", "--max-steps", "4", "--resume", "auto"]) == 0
    out_b = capsys.readouterr().out
    a = load(os.path.join(only_run(tmp_path / "a"), "checkpoints", "0000004.pt"))
    b = load(os.path.join(only_run(tmp_path / "b"), "checkpoints", "0000004.pt"))
    assert_state_dicts_equal(a["model"], b["model"])
    assert_state_dicts_equal(a["ema"], b["ema"])
    assert_opt_equal(a["opt"], b["opt"])
    assert a["args"]["in_channels"] == 4 and a["model_kwargs"]["input_size"] == 8   # tiny VAE: factor 2
    assert logged_losses(out_a) == logged_losses(out_b) and len(logged_losses(out_a)) == 2
    # 8 files, one epoch of 4 steps (resumed mid-epoch): the corrupt one is met once.
    assert "Skipped Corrupt Images: 1" in out_a and a["skipped_images"] == 1


#################################################################################
#                     Bad input: one line, non-zero, nothing written            #
#################################################################################

def _bad(tmp_path, capsys, argv, message):
    results = tmp_path / "results"
    code = call_main([*argv, "--results-dir", results, "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert message in err, err
    assert err.strip().count("\n") == 0 and err.startswith("error: "), err   # one line
    assert not os.path.exists(results)
    return err


def test_bad_data_paths(tmp_path, capsys):
    _bad(tmp_path, capsys, [*TINY, "--data-path", tmp_path / "missing", "--vae", "none"], "does not exist")
    (tmp_path / "empty").mkdir()
    _bad(tmp_path, capsys, [*TINY, "--data-path", tmp_path / "empty", "--vae", "none"], "no class sub-folders")
    _bad(tmp_path, capsys, [*TINY, "--image-size", "16"], "pass exactly one data source")
    _bad(tmp_path, capsys, [*TINY, "--dataset", "digits", "--vae", "ema"], "drop --vae ema")
    _bad(tmp_path, capsys, ["--model", "DiC-Nope", "--dataset", "digits"], "unknown model 'DiC-Nope'")
    _bad(tmp_path, capsys, [*TINY, "--dataset", "digits", "--global-batch-size", "4096"],
         "fewer than --global-batch-size 4096")


def test_bad_latents(tmp_path, capsys):
    root = make_latents(tmp_path / "lat", n=16)
    _bad(tmp_path, capsys, latent_args(root, tmp_path / "x", "--image-size", "128"),
         "are 4x8x8 but --image-size 128 with --vae ema (factor 8) needs 4x16x16: pass --image-size 64")
    _bad(tmp_path, capsys, [*latent_args(root, tmp_path / "x"), "--num-classes", "2"],
         "imagenet64_labels/2.npy holds label 2, outside [0, 2): fix the file, or pass a --num-classes above every label")
    os.remove(os.path.join(root, "imagenet64_labels", "5.npy"))
    _bad(tmp_path, capsys, latent_args(root, tmp_path / "x"), "1 feature files have no label file (e.g. 5.npy)")
    no_labels = make_latents(tmp_path / "lat2", n=4)
    import shutil
    shutil.rmtree(os.path.join(no_labels, "imagenet64_labels"))
    _bad(tmp_path, capsys, latent_args(no_labels, tmp_path / "x"), "imagenet64_labels is missing")


def test_bad_sizes_and_labels(tmp_path, capsys):
    _bad(tmp_path, capsys, [*TINY, "--dataset", "digits", "--image-size", "18"],
         "DiC-Tiny cannot take: it downsamples by 4, so use an image size divisible by 4")
    _bad(tmp_path, capsys, ["--model", "DiT-S/8", "--dataset", "digits", "--image-size", "12"],
         "not divisible by patch_size 8; use an image size divisible by 8 (e.g. 8)")
    _bad(tmp_path, capsys, [*TINY, "--dataset", "digits", "--network_g__skip_stride=0"], "skip_stride must be >= 1")
    _bad(tmp_path, capsys, [*TINY, "--dataset", "digits", "--num-classes", "5"], "10 classes")
    folder = make_image_folder(tmp_path / "img", num_classes=3, per_class=1)
    _bad(tmp_path, capsys, [*TINY, "--data-path", folder, "--vae", "none", "--image-size", "16", "--num-classes",
                            "2"], f"{folder} has 3 class folders (n00000000, n00000001, n00000002), labels 0..2, but "
                                  f"--num-classes is 2: pass --num-classes 3 or more (or leave it out: the folders "
                                  f"set it)")
    _bad(tmp_path, capsys, [*TINY, "--dataset", "digits", "--class-dropout-prob", "1"],
         "--class-dropout-prob must be in [0, 1) (0.1 as DiT; 0 for a model never sampled with guidance), got 1.0")
    _bad(tmp_path, capsys, [*TINY, "--dataset", "digits", "--class-dropout-prob", "0", "--sample-cfg-scale", "4"],
         "--sample-cfg-scale 4.0 needs a null label, which --class-dropout-prob 0 does not train")
    _bad(tmp_path, capsys, [*TINY, "--data-path", folder, "--image-size", "16", "--num-classes", "3",
                            "--vae", str(tmp_path / "novae")], "--vae")


def test_class_folders_set_the_classes_a_resume_keeps_them_and_samplers_draw_only_those(tmp_path, capsys):
    """A user's 2 class folders train a 2-class model (said in the log), not DiT's 1000; --num-classes
    overrides and --class-dropout-prob 0 builds a model without a null label; a resume keeps both;
    sample.py then draws the checkpoint's classes and refuses guidance."""
    folder = make_image_folder(tmp_path / "img", num_classes=2, per_class=2, size=(20, 20))
    common = [*TINY, "--data-path", folder, "--vae", "none", "--image-size", "16", "--global-batch-size", "4"]
    assert call_main([*common, "--results-dir", tmp_path / "a", "--max-steps", "1"]) == 0
    assert (f"2 classes from {folder} (class folders n00000000, n00000001); --num-classes overrides"
            in open(os.path.join(only_run(tmp_path / "a"), "log.txt")).read())
    assert load(os.path.join(only_run(tmp_path / "a"), "checkpoints", "0000001.pt"))["args"]["num_classes"] == 2

    argv = [*common, "--results-dir", tmp_path / "b"]
    assert call_main([*argv, "--max-steps", "1", "--num-classes", "3", "--class-dropout-prob", "0"]) == 0
    capsys.readouterr()
    assert call_main([*argv, "--max-steps", "2", "--resume", "auto"]) == 0   # neither flag: the run's own
    out = capsys.readouterr().out
    assert "classes from" not in out and "resuming with" not in out
    ckpt_path = os.path.join(only_run(tmp_path / "b"), "checkpoints", "0000002.pt")
    ckpt = load(ckpt_path)
    assert (ckpt["args"]["num_classes"], ckpt["args"]["class_dropout_prob"]) == (3, 0)
    assert ckpt["model"]["y_embedder_ls.0.embedding_table.weight"].shape[0] == 3      # no null-label row

    grid = tmp_path / "grid.png"
    with pytest.raises(JobError, match="has no null label .* pass --cfg-scale 1"):
        sample.main(sample.parse_args(["--ckpt", ckpt_path, "--out", str(grid)]))
    with pytest.raises(JobError, match=r"class label 3 is out of range for a 3-class model \(valid: 0..2\)"):
        sample.main(sample.parse_args(["--ckpt", ckpt_path, "--out", str(grid), "--class-labels", "3"]))
    assert not grid.exists()
    sample.main(sample.parse_args(["--ckpt", ckpt_path, "--out", str(grid), "--cfg-scale", "1",
                                   "--num-sampling-steps", "2"]))
    assert "(labels 0 1 2 0 1 2 0 1)" in capsys.readouterr().out


def test_latents_set_the_classes_from_their_labels(tmp_path):
    """--feature-path without --num-classes: max label + 1 (their labels are the class indices)."""
    root = make_latents(tmp_path / "lat", n=8, num_classes=5)
    config = DataConfig(data_path=None, feature_path=root, dataset=None, image_size=64, num_classes=None, vae="ema",
                        skip_nonfinite=False, allow_empty_classes=False, repa=False)
    dataset, channels, side, classes = build_dataset(config, 8)
    assert (channels, side, classes.count) == (4, 8, 5) and dataset.num_classes == 5
    assert classes.note == f"5 classes from {root} (labels 0..4 of its 8 latents); --num-classes overrides"
    assert build_dataset(dataclasses.replace(config, num_classes=7), 8)[3] == (7, None)   # --num-classes 7


def test_resume_errors_write_nothing(tmp_path, capsys, latents):
    assert call_main(latent_args(latents, tmp_path / "r", "--max-steps", "4", "--ckpt-every", "2")) == 0
    run = only_run(tmp_path / "r")
    capsys.readouterr()
    snapshot = {name: os.path.getmtime(os.path.join(run, name)) for name in os.listdir(run)}
    log_before = open(os.path.join(run, "log.txt")).read()

    def refused(argv, message):
        code = call_main(argv)
        err = capsys.readouterr().err
        assert code != 0 and message in err, err
        assert {n: os.path.getmtime(os.path.join(run, n)) for n in os.listdir(run)} == snapshot
        assert open(os.path.join(run, "log.txt")).read() == log_before
        assert sorted(os.listdir(tmp_path / "r")) == [os.path.basename(run)]

    ckpt2 = os.path.join(run, "checkpoints", "0000002.pt")
    refused([*latent_args(latents, tmp_path / "r"), "--model", "DiC-S", "--resume", ckpt2],
            "checkpoint holds DiC-Tiny weights but the model is DiC-S")
    refused([*latent_args(latents, tmp_path / "r"), "--max-steps", "6", "--resume", ckpt2],
            "0000004.pt is newer than")
    refused([*latent_args(latents, tmp_path / "r"), "--resume", str(tmp_path / "nope.pt")],
            "no such checkpoint or run folder")
    bare = tmp_path / "bare.pt"
    torch.save(load(ckpt2)["ema"], bare)
    refused([*latent_args(latents, tmp_path / "r"), "--resume", bare], "use --ckpt")
    refused([*latent_args(latents, tmp_path / "r"), "--resume", "auto", "--ckpt", bare], "do not mix")

    # Resuming a finished run to its own target does nothing and writes no checkpoint.
    assert call_main([*latent_args(latents, tmp_path / "r"), "--resume", run]) == 0
    assert "Nothing to do" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000002.pt", "0000004.pt"]
    # --ckpt starts a new run (new folder, step 0) from the weights of a bare state_dict.
    assert call_main([*latent_args(latents, tmp_path / "r"), "--ckpt", bare, "--max-steps", "1"]) == 0
    assert "Initialised model and EMA weights" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "r")) == ["000-DiC-Tiny", "001-DiC-Tiny"]


def test_batch_not_divisible_by_processes_two_processes(tmp_path, latents):
    proc = run_script(latent_args(latents, tmp_path / "r", "--global-batch-size", "7"), nproc=2)
    assert proc.returncode != 0
    assert "--global-batch-size 7 is not divisible by the 2 processes: use a multiple of 2" in proc.stderr
    assert proc.stderr.count("error: --global-batch-size") == 1     # printed once, by rank 0
    assert not os.path.exists(tmp_path / "r")


#################################################################################
#                        NaN stop and run folders                               #
#################################################################################

def test_nan_loss_stops_all_processes_and_keeps_last_good_checkpoint(tmp_path, latents):
    proc = run_script(latent_args(latents, tmp_path / "r", "--max-steps", "6", "--ckpt-every", "2",
                                  "--log-every", "1"), nproc=2, hooks={"DIC_TEST_NAN_AT_STEP": 3})
    run = only_run(tmp_path / "r")
    good = os.path.join(run, "checkpoints", "0000002.pt")
    assert proc.returncode != 0
    assert f"error: loss became nan at step 3; last good checkpoint: {good}" in proc.stderr, proc.output
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["0000002.pt"]
    ckpt = load(good)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert "loss became nan at step 3" in open(os.path.join(run, "log.txt")).read()
    assert [s for s, _ in logged_losses(proc.stdout)] == ["0000001", "0000002"]


def test_new_runs_never_reuse_a_folder(tmp_path, capsys):
    results = tmp_path / "results"
    (results / "000-DiC-Tiny").mkdir(parents=True)
    (results / "000-DiC-Tiny" / "keep.txt").write_text("mine")
    (results / "003-DiT-XL-2").mkdir()
    assert call_main([*TINY, "--dataset", "digits", "--global-batch-size", "8", "--max-steps", "1",
                      "--results-dir", results, "--network_g__skip_stride=1"]) == 0
    assert sorted(os.listdir(results)) == ["000-DiC-Tiny", "003-DiT-XL-2", "004-DiC-Tiny"]
    assert os.listdir(results / "000-DiC-Tiny") == ["keep.txt"]
    assert sorted(os.listdir(results / "004-DiC-Tiny")) == ["args.json", "checkpoints", "log.txt", "losses.csv"]
    assert os.listdir(results / "004-DiC-Tiny" / "checkpoints") == ["0000001.pt"]
    ckpt = load(results / "004-DiC-Tiny" / "checkpoints" / "0000001.pt")   # the override reached the model
    assert ckpt["model_kwargs"] == {"input_size": 16, "in_channels": 1, "num_classes": 10, "learn_sigma": True,
                                    "class_dropout_prob": 0.1, "skip_stride": 1}
    assert ckpt["args"]["model_overrides"] == {"skip_stride": 1} and ckpt["args"]["dataset"] == "digits"
    # DiT's number (count of entries), moved past every number in use.
    assert os.path.basename(runs.create_run_dir(str(results), "DiT-XL/2")) == "005-DiT-XL-2"


def test_script_runs_as_plain_python_and_exits_nonzero_on_error(tmp_path):
    proc = run_script([*TINY, "--dataset", "digits", "--num-classes", "3", "--results-dir", tmp_path / "r"])
    assert proc.returncode == 2 and proc.stderr.startswith("error: built-in digits has 10 classes"), proc.output
    assert not os.path.exists(tmp_path / "r")


def test_unknown_flags_are_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--dataset", "digits", "--modle", "DiC-S"])
    assert e.value.code == 2 and "unrecognised argument '--modle'" in capsys.readouterr().err


#################################################################################
#                                   Fast path                                   #
#################################################################################

FAST_DEFAULT = {"precision": "tf32", "adamw": "fused", "ema": "foreach", "channels_last": False, "compile": False}


def weights_rel_err(a, b):
    """||a - b|| / ||b|| over every tensor of two state_dicts together."""
    assert a.keys() == b.keys()
    diff = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)
    return (diff / sum((b[k].double() ** 2).sum() for k in b)).sqrt().item()


def fit(latents, results, *extra, steps=4):
    """train.main for `steps` steps (checkpoint every 2, loss every step): (last checkpoint, losses, run dir)."""
    argv = latent_args(latents, results, "--max-steps", steps, "--ckpt-every", "2", "--log-every", "1", *extra)
    assert call_main(argv) == 0
    run = only_run(results)
    return load(os.path.join(run, "checkpoints", f"{steps:07d}.pt")), read_losses(os.path.join(run, "losses.csv"))[1], run


def test_fast_path_flags_keep_the_numbers(tmp_path, latents, capsys):
    """--channels-last on and --fused-adamw off train the same model as the defaults, up to float
    rounding: 4 steps, every loss and the final model/EMA weights."""
    base, base_losses, _ = fit(latents, tmp_path / "base")
    out = capsys.readouterr().out
    assert ("fast path: precision tf32 (plain fp32 on cpu), AdamW fused, EMA foreach, channels_last off, "
            "compile off") in out
    assert base["fast_path"] == FAST_DEFAULT and base["opt"]["param_groups"][0]["fused"] is True

    # channels_last: same math, other summation order. Measured 1e-8 relative on the weights; bound 1e-5.
    cl, cl_losses, _ = fit(latents, tmp_path / "cl", "--channels-last")
    assert "AdamW fused, EMA foreach, channels_last on, compile off" in capsys.readouterr().out
    assert cl["fast_path"] == {**FAST_DEFAULT, "channels_last": True}
    assert weights_rel_err(cl["model"], base["model"]) < 1e-5
    assert weights_rel_err(cl["ema"], base["ema"]) < 1e-5
    np.testing.assert_allclose(cl_losses, base_losses, rtol=1e-5)
    # ... and its checkpoint is a plain one: default layout, loads exactly into a default model.
    assert all(v.is_contiguous() for v in cl["model"].values())
    assert all(v.is_contiguous() for s in cl["opt"]["state"].values() for v in s.values() if torch.is_tensor(v))
    plain = create_model("DiC-Tiny", **cl["model_kwargs"])
    plain.load_state_dict(cl["ema"], strict=True)
    assert all(torch.equal(v, cl["ema"][k]) for k, v in plain.state_dict().items())

    # torch's for-loop AdamW instead of the fused kernel: float rounding only. Measured 6e-9
    # relative (max |diff| 6e-8) on the weights; bound 1e-6.
    loop, loop_losses, _ = fit(latents, tmp_path / "loop", "--fused-adamw", "off")
    assert "AdamW for-loop" in capsys.readouterr().out
    assert loop["fast_path"] == {**FAST_DEFAULT, "adamw": "for-loop"}
    assert not loop["opt"]["param_groups"][0]["fused"]
    assert weights_rel_err(loop["model"], base["model"]) < 1e-6
    assert weights_rel_err(loop["ema"], base["ema"]) < 1e-6
    np.testing.assert_allclose(loop_losses, base_losses, rtol=1e-6)


def test_channels_last_resume_is_exact_and_old_checkpoints_resume_with_the_fused_kernel(tmp_path, latents, capsys):
    # channels_last: 2 steps, then --resume auto to 4 (the flag comes from the checkpoint) == 4 in one go.
    one_go, one_go_losses, _ = fit(latents, tmp_path / "a", "--channels-last")
    fit(latents, tmp_path / "b", "--channels-last", steps=2)
    capsys.readouterr()
    resumed, resumed_losses, _ = fit(latents, tmp_path / "b", "--resume", "auto")
    assert "channels_last on" in capsys.readouterr().out
    assert_state_dicts_equal(one_go["model"], resumed["model"])
    assert_state_dicts_equal(one_go["ema"], resumed["ema"])
    assert_opt_equal(one_go["opt"], resumed["opt"])
    assert one_go_losses == resumed_losses

    # A checkpoint in the format earlier versions wrote (format 1: argparse.Namespace args without the
    # fast-path flags, NumPy/Python RNG states as tuples, no objective, optimizer groups saying
    # fused=None as torch's default AdamW writes them) still resumes exactly, read with
    # weights_only=True (those exact types allow-listed), and with the fused kernel: torch's
    # load_state_dict alone would take the saved flags and run the for-loop AdamW.
    base, base_losses, base_run = fit(latents, tmp_path / "base")
    old_results = tmp_path / "old"
    old_run = old_results / os.path.basename(base_run)
    os.makedirs(old_run / "checkpoints")
    old = write_format_1_checkpoint(os.path.join(base_run, "checkpoints", "0000002.pt"),
                                    old_run / "checkpoints" / "0000002.pt")
    with pytest.raises(Exception, match="Unsupported global"):   # really not a weights-only file
        torch.load(old, weights_only=True)
    capsys.readouterr()
    continued, continued_losses, _ = fit(latents, old_results, "--resume", "auto")
    assert "AdamW fused" in capsys.readouterr().out
    assert continued["opt"]["param_groups"][0]["fused"] is True
    assert_state_dicts_equal(continued["model"], base["model"])   # bit for bit: the same kernel as before
    assert_state_dicts_equal(continued["ema"], base["ema"])
    assert continued_losses == base_losses[2:]   # the copied run folder had no losses.csv: steps 3-4


def write_format_1_checkpoint(source, path):
    """A checkpoint as this project wrote it before the safe format, made from a current one."""
    import argparse
    import random as _random
    old = load(source)
    old["args"] = argparse.Namespace(**{k: v for k, v in old["args"].items()
                                        if k not in ("fused_adamw", "channels_last", "compile", "objective")},
                                     grad_clip=False, debug_nan_at_step=None, debug_log_samples=False)
    for state in old["rng"]:
        n = state["numpy"]
        state["numpy"] = ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                          n["cached_gaussian"])
        p = state["python"]
        state["python"] = (p["version"], tuple(p["state"].tolist()), p["gauss"])
        _random.Random().setstate(state["python"])   # a valid Python RNG state
    for key in ("fast_path", "objective"):
        del old[key]
    old["format"] = "dic-train-1"
    for group in old["opt"]["param_groups"]:
        group["fused"], group["foreach"] = None, None
    torch.save(old, path)
    return str(path)


@pytest.mark.slow
def test_compile_two_processes_trains_resumes_and_saves_plain_checkpoints(tmp_path, latents):
    """--compile with DDP on 2 processes: 2 steps, then resume to 4 (--compile comes from the
    checkpoint); checkpoint keys as eager (no `_orig_mod.`/`module.`), and the same training as
    eager up to float rounding (random label dropout drawn from the eager generator; measured
    ~1e-8 relative on the weights, bound 1e-5)."""
    common = ["--log-every", "1", "--ckpt-every", "2"]
    first = run_script(latent_args(latents, tmp_path / "c", *common, "--max-steps", "2", "--compile"), nproc=2)
    assert first.returncode == 0, first.output
    assert "AdamW fused, EMA foreach, channels_last off, compile on" in first.stdout
    resumed = run_script(latent_args(latents, tmp_path / "c", *common, "--max-steps", "4", "--resume", "auto"),
                         nproc=2)
    assert resumed.returncode == 0, resumed.output
    assert "compile on" in resumed.stdout and "Resuming from" in resumed.stdout
    eager = run_script(latent_args(latents, tmp_path / "e", *common, "--max-steps", "4"), nproc=2)
    assert eager.returncode == 0, eager.output
    c = load(os.path.join(only_run(tmp_path / "c"), "checkpoints", "0000004.pt"))
    e = load(os.path.join(only_run(tmp_path / "e"), "checkpoints", "0000004.pt"))
    assert c["fast_path"] == {**FAST_DEFAULT, "compile": True}
    for key in ("model", "ema"):
        assert list(c[key]) == list(e[key])   # same names, same order
        assert weights_rel_err(c[key], e[key]) < 1e-5
    plain = create_model("DiC-Tiny", **c["model_kwargs"])
    plain.load_state_dict(c["ema"], strict=True)
    steps_c, losses_c = read_losses(os.path.join(only_run(tmp_path / "c"), "losses.csv"))
    steps_e, losses_e = read_losses(os.path.join(only_run(tmp_path / "e"), "losses.csv"))
    assert steps_c == steps_e == [1, 2, 3, 4]
    np.testing.assert_allclose(losses_c, losses_e, rtol=1e-5)
