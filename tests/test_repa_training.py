"""REPA in the trainers: exact 2-process resume (projector included) for both trainers and the
objectives (rf with U-REPA's manifold term among them), each family's recipe (REPA's for DiT, U-REPA's
for DiC/DiCo), a frozen encoder, latents paired with their own images, and checkpoints that sample and
export as plain ones. The encoder is a DINOv2-shaped ViT-S/14 with random weights saved to a file
(no download); at 64 px it sees 56 px inputs, a 4 x 4 token grid."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from test_train import (assert_opt_equal, assert_state_dicts_equal, call_main, load, only_run,  # noqa: F401
                        run_script)

import export
import sample
from helpers.data.per_file_writer import write_latent
from helpers.utils.models import create_model
from helpers.training.objectives import DDPM
from helpers.training.repa_objective import RepaConfig, build_repa

N_PER_CLASS, CLASSES = 6, 3       # 18 images: 2 steps per epoch at global batch 8


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory):
    import timm
    torch.manual_seed(0)
    encoder = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_random.pth"
    torch.save(encoder.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """Class folders of 64 px images whose colour encodes their index, and 4x8x8 latents named by that
    index (extract_features.py's rule) whose values equal the index, labelled with the image's class."""
    root = tmp_path_factory.mktemp("paired")
    index = 0
    for c in range(CLASSES):
        os.makedirs(root / "images" / f"class{c}")
        for i in range(N_PER_CLASS):
            Image.fromarray(np.full((64, 64, 3), 10 * index, np.uint8)).save(root / "images" / f"class{c}" / f"{i}.png")
            write_latent(root / "latents", str(index), np.full((4, 8, 8), index, np.float32), c, prefix="imagenet64")
            index += 1
    return str(root / "images"), str(root / "latents")


def repa_args(paired, weights, results, *extra):
    images, latents = paired
    return ["--model", "DiC-Tiny", "--num-workers", "0", "--no-progress", "--feature-path", latents, "--data-path",
            images, "--image-size", "64", "--num-classes", str(CLASSES), "--global-batch-size", "8",
            "--results-dir", str(results), "--repa", "--enc-type", "dinov2-vit-s", "--enc-weights", weights,
            "--log-every", "1", "--ckpt-every", "2", *map(str, extra)]


@pytest.mark.parametrize("script,objective,flags", [
    pytest.param("train.py", "rf", ("--manifold-coeff", "3"), id="train.py-rf-manifold3"),   # U-REPA's recipe
    pytest.param("train_accelerate.py", "sit", (), id="train_accelerate.py-sit"),           # (the default)
    pytest.param("train.py", "sit", (), marks=pytest.mark.slow, id="train.py-sit"),   # the others: slow (CI time)
    pytest.param("train_accelerate.py", "ddpm", (), marks=pytest.mark.slow, id="train_accelerate.py-ddpm"),
    pytest.param("train.py", "ddpm", ("--repa-stage", "auto", "--manifold-coeff", "0"), marks=pytest.mark.slow,
                 id="train.py-ddpm-repa-auto")])
def test_repa_two_process_resume_is_bit_identical(tmp_path, paired, vit_weights, script, objective, flags):
    env = {"ACCELERATE_USE_CPU": "true"} if script == "train_accelerate.py" else None
    common = ["--objective", objective, *flags]
    one_go = run_script(repa_args(paired, vit_weights, tmp_path / "a", *common, "--max-steps", 4), nproc=2,
                        script=script, env=env)
    first = run_script(repa_args(paired, vit_weights, tmp_path / "b", *common, "--max-steps", 2), nproc=2,
                       script=script, env=env)
    resumed = run_script(repa_args(paired, vit_weights, tmp_path / "b", "--max-steps", 4, "--resume", "auto"),
                         nproc=2, script=script, env=env)
    assert one_go.returncode == first.returncode == resumed.returncode == 0, resumed.output[-3000:]
    assert "Denoise Loss: " in one_go.stdout and "Proj Loss: " in one_go.stdout
    urepa = "--repa-stage" not in flags   # DiC-Tiny's default: U-REPA's mid stage (2x2), manifold w = 3
    assert ("Manifold Loss: " in one_go.stdout) == urepa and "grad clip 1.0" in one_go.stdout
    a = load(os.path.join(only_run(tmp_path / "a"), "checkpoints", "0000004.pt"))
    b = load(os.path.join(only_run(tmp_path / "b"), "checkpoints", "0000004.pt"))
    for key in ("model", "ema", "projector"):
        assert_state_dicts_equal(a[key], b[key])
    assert_opt_equal(a["opt"], b["opt"])
    assert len(a["opt"]["state"]) == len(list(create_model("DiC-Tiny", input_size=8, num_classes=3).parameters())) + 6
    repa = a["objective"]["repa"]
    assert a["args"]["max_grad_norm"] == 1.0 and a["args"]["manifold_coeff"] == repa["manifold_coeff"]
    assert a["objective"]["name"] == objective and repa["recipe"] == "U-REPA" and repa["token_grid"] == [4, 4]
    assert repa["proj_coeff"] == 0.25
    if urepa:   # the mid stage's 2x2 projected, then upsampled to the encoder's 4x4 tokens
        assert repa["tap"] == "mid" and repa["manifold_coeff"] == 3.0 and repa["upsample"] == "bilinear"
        assert "'recipe': 'U-REPA'" in one_go.stdout
    else:       # auto: enc1 is on the 4x4 grid already
        assert repa["tap"] == "enc1" and repa["manifold_coeff"] == 0.0 and repa["upsample"] is None


def test_latents_are_paired_with_their_own_images(tmp_path, paired, vit_weights):
    from helpers.data.images import ImageFolderDataset
    from helpers.data.latents import LatentFeatureDataset
    from helpers.training.repa_objective import LatentsWithImages
    images, latents = paired
    pairs = LatentsWithImages(LatentFeatureDataset(latents), ImageFolderDataset(images, 64, random_flip=False))
    for row in range(len(pairs)):
        latent, label, image = pairs[row]
        index = int(latent[0, 0, 0])
        assert label == index // N_PER_CLASS                                   # the image's class
        assert round(((image[0, 0, 0].item() + 1) / 2 * 255) / 10) == index   # the image's own colour
    # Fewer images than the latents name: refused before anything is written.
    short = tmp_path / "short"
    shutil.copytree(images, short)
    os.remove(short / "class2" / "5.png")
    assert call_main(repa_args((str(short), latents), vit_weights, tmp_path / "r", "--max-steps", 1)) == 2
    assert not os.path.exists(tmp_path / "r")
    # Latents alone cannot feed the encoder.
    argv = repa_args(paired, vit_weights, tmp_path / "r", "--max-steps", 1)
    i = argv.index("--data-path")
    del argv[i:i + 2]
    assert call_main(argv) == 2 and not os.path.exists(tmp_path / "r")


def test_the_encoder_is_frozen_and_unchanged_by_training(vit_weights):
    torch.manual_seed(0)
    model = create_model("DiC-Tiny", input_size=8, in_channels=4, num_classes=3)
    args = RepaConfig(enc_type="dinov2-vit-s", enc_weights=vit_weights, image_size=64, proj_coeff=0.5,
                      projector_embed_dims=None, repa_stage="auto", encoder_depth=8, model="DiC-Tiny")
    net, objective = build_repa(args, model, DDPM(), torch.device("cpu"))
    (encoder,) = objective.encoders
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert {id(p) for p in encoder.parameters()}.isdisjoint({id(p) for g in opt.param_groups for p in g["params"]})
    for _ in range(2):
        x, y, images = torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), torch.rand(2, 3, 64, 64) * 2 - 1
        loss = objective.training_losses(net, x, dict(y=y), images=images)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in encoder.parameters())
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert all(p.grad is not None for p in net.projectors.parameters())


def test_a_repa_checkpoint_samples_and_exports_as_a_plain_one(tmp_path, vit_weights, capsys):
    digits = ["--model", "DiC-Tiny", "--dataset", "digits", "--global-batch-size", "8", "--no-progress",
              "--max-steps", "2", "--ckpt-every", "2", "--results-dir", tmp_path / "r"]
    repa = ["--repa", "--enc-type", "dinov2-vit-s", "--enc-weights", vit_weights]
    assert call_main([*digits, *repa]) == 0
    ckpt = os.path.join(only_run(tmp_path / "r"), "checkpoints", "0000002.pt")
    checkpoint = load(ckpt)
    assert checkpoint["objective"]["repa"]["tap"] == "mid"   # 16 px digits: a 1 x 1 token grid, mid resized
    os.makedirs(tmp_path / "plain" / "000-DiC-Tiny" / "checkpoints")
    plain = tmp_path / "plain" / "000-DiC-Tiny" / "checkpoints" / "0000002.pt"
    torch.save({k: v for k, v in checkpoint.items() if k != "projector"}, plain)
    common = ["--class-labels", "1", "2", "--num-sampling-steps", "3"]
    sample.main(sample.parse_args(["--ckpt", ckpt, *common, "--out", str(tmp_path / "a.png")]))
    sample.main(sample.parse_args(["--ckpt", str(plain), *common, "--out", str(tmp_path / "b.png")]))
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()   # the projector is ignored
    out = tmp_path / "w.safetensors"
    export.main(export.build_parser().parse_args(["--ckpt", ckpt, "--out", str(out)]))
    from safetensors import safe_open
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == sorted(checkpoint["ema"])                         # no projector weights
    capsys.readouterr()
    assert call_main([*digits[:-2], "--max-steps", "3", "--resume", str(plain), *repa]) == 2
    assert f"{plain} was trained without --repa: it has no projector to resume" in capsys.readouterr().err


class Warnings:
    def __init__(self):
        self.lines = []

    def warning(self, message):
        self.lines.append(message)


def resolved(*argv, saved=None):
    """The trainers' flags as resolve_args leaves them (after inherit_args when `saved` is given)."""
    from helpers.training import flags
    args = flags.parse_args(flags.build_parser("test"), ["--dataset", "digits", *map(str, argv)])
    if saved is not None:
        flags.inherit_args(args, saved)
    return flags.resolve_args(args, world_size=1)


def test_each_family_starts_from_its_authors_recipe():
    """--repa: U-REPA's for the U-shaped DiC and DiCo (mid stage, lambda 0.25, w = 3), REPA's for DiT
    (block --encoder-depth, lambda 0.5, w = 0), gradient clipping at 1.0 for both; each flag overrides;
    no --repa, no change."""
    for model in ("DiC-Tiny", "DiCo-Tiny"):
        args = resolved("--model", model, "--repa")
        assert (args.repa_stage, args.proj_coeff, args.manifold_coeff, args.max_grad_norm) == ("mid", 0.25, 3.0, 1.0)
    args = resolved("--model", "DiT-S/2", "--repa")
    assert (args.encoder_depth, args.proj_coeff, args.manifold_coeff, args.max_grad_norm) == (8, 0.5, 0.0, 1.0)
    args = resolved("--model", "DiC-Tiny", "--repa", "--repa-stage", "auto", "--manifold-coeff", "0",
                    "--max-grad-norm", "inf", "--proj-coeff", "0.5")
    assert (args.repa_stage, args.proj_coeff, args.manifold_coeff, args.max_grad_norm) == ("auto", 0.5, 0.0,
                                                                                           float("inf"))
    args = resolved("--model", "DiC-Tiny")
    assert (args.repa_stage, args.manifold_coeff, args.max_grad_norm) == (None, None, None)
    from helpers.utils.cli import JobError
    with pytest.raises(JobError, match="--manifold-coeff must be >= 0, got -1.0"):
        resolved("--model", "DiC-Tiny", "--repa", "--manifold-coeff", "-1")


def test_a_run_from_before_the_recipes_resumes_as_it_started():
    """A saved --repa run without manifold_coeff (made before the recipes) keeps no manifold term, its
    auto stage and no clipping (inf: scales by exactly 1), without a spurious max_grad_norm warning."""
    from helpers.training import flags
    old = vars(resolved("--model", "DiC-Tiny", "--repa", "--repa-stage", "auto", "--max-grad-norm", "inf"))
    old = {k: v for k, v in old.items() if k not in ("manifold_coeff", "explicit")}
    old["max_grad_norm"], old["proj_coeff"] = None, 0.5
    args = resolved(saved=old)
    assert (args.repa_stage, args.proj_coeff, args.manifold_coeff, args.max_grad_norm) == ("auto", 0.5, 0.0,
                                                                                           float("inf"))
    log = Warnings()
    flags.warn_changed_settings(args, old, log)
    assert log.lines == []
    args = resolved("--manifold-coeff", "3", "--max-grad-norm", "1", saved=old)   # asked for: taken
    assert (args.manifold_coeff, args.max_grad_norm) == (3.0, 1.0)
    flags.warn_changed_settings(args, old, log)
    assert [line.split("=")[0] for line in log.lines] == ["resuming with max_grad_norm"]
