"""REPA's samplers (rf checkpoints) against an independent implementation of REPA's samplers.py, and
REPA's and SiT's releases loaded and sampled as their authors type the commands."""
import argparse
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, subprocess_env

import export
import sample
import sample_ddp
from dit_models import DiT
from helpers.sampling.checkpoint_model import read_checkpoint
from helpers.sampling.flags import resolve_settings
from helpers.sampling.generation import make_sampling
from helpers.sampling.noise import IndexNoise, draw_labels
from helpers.sampling.rf_samplers import GuidedCall
from helpers.sampling.samplers import SamplerSettings
from helpers.training.repa import Projector
from helpers.utils.checkpoint import load_checkpoint_file
from helpers.utils.cli import JobError
from helpers.utils.models import create_model
from helpers.utils.releases import load_initial_weights

NUM_CLASSES, SHAPE = 10, (4, 8, 8)


def tiny_net(seed=0, hidden=32):
    """A small DiT (4 channels in and out, as REPA's SiT) whose zero-initialised weights are re-drawn."""
    torch.manual_seed(seed)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=hidden, depth=2, num_heads=2,
              num_classes=NUM_CLASSES, learn_sigma=False)
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.1)
    return net.eval()


#################################################################################
#          REPA's samplers.py, written here from its definitions                #
#################################################################################

def path_coefficients(path_type, t):
    """alpha, sigma, d alpha, d sigma of REPA's path (t = 1 noise), t shaped like x."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    return (torch.cos(t * np.pi / 2), torch.sin(t * np.pi / 2), -np.pi / 2 * torch.sin(t * np.pi / 2),
            np.pi / 2 * torch.cos(t * np.pi / 2))


def reference_score(v, x, t, path_type):
    alpha, sigma, d_alpha, d_sigma = path_coefficients(path_type, t.view(-1, 1, 1, 1).expand_as(x))
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


def reference_drift(net, x, t_cur, y, cfg, low, high, sde=False, path_type="linear"):
    """REPA's model call: x, t cast to float32, output back to float64, guidance on all channels."""
    guided = cfg > 1.0 and low <= t_cur <= high
    inp = torch.cat([x, x]) if guided else x
    labels = torch.cat([y, torch.full_like(y, NUM_CLASSES)]) if guided else y
    t_in = torch.ones(inp.size(0), dtype=torch.float64) * t_cur
    v = net(inp.to(torch.float32), t_in.to(torch.float32), labels).to(torch.float64)
    d = v - 0.5 * (2 * t_cur) * reference_score(v, inp, t_in, path_type) if sde else v
    if guided:
        cond, uncond = d.chunk(2)
        d = uncond + cfg * (cond - uncond)
    return d


def reference_euler(net, z, y, steps, cfg, low, high, heun=False):
    t_steps = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x_next = z.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = reference_drift(net, x_cur, t_cur, y, cfg, low, high)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < steps - 1:
            guided_at_start = cfg > 1.0 and low <= t_cur <= high     # REPA decides the correction's guidance by t_cur
            d_prime = reference_drift(net, x_next, t_next, y, cfg if guided_at_start else 1.0, 0.0, 1.0)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)


def reference_euler_maruyama(net, z, y, steps, cfg, low, high, path_type, step_noise):
    t_steps = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64),
                         torch.tensor([0.0], dtype=torch.float64)])
    x_next = z.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt, x_cur = t_next - t_cur, x_next
        diffusion = 2 * t_cur
        deps = step_noise().to(torch.float64) * torch.sqrt(torch.abs(dt))
        d_cur = reference_drift(net, x_cur, t_cur, y, cfg, low, high, sde=True, path_type=path_type)
        x_next = x_cur + d_cur * dt + torch.sqrt(diffusion) * deps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    d_cur = reference_drift(net, x_next, t_cur, y, cfg, low, high, sde=True, path_type=path_type)
    return (x_next + (t_next - t_cur) * d_cur).to(torch.float32)


LARGEST = {}


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("cfg, interval", [(1.0, (0.0, 1.0)), (1.8, (0.0, 0.7))])
@pytest.mark.parametrize("mode, heun, steps", [("ode", False, 8), ("ode", True, 8), ("sde", False, 10)])
@torch.no_grad()
def test_repa_samplers_match_an_independent_implementation(mode, heun, steps, cfg, interval, path_type):
    """Same initial noise, same per-step noise (per sample, from IndexNoise), same tiny network: our
    sampler through make_sampling and REPA's, written above, agree to 1e-5 relative."""
    net = tiny_net()
    settings = SamplerSettings(cfg_scale=cfg, guide_channels="all", mode=mode, num_sampling_steps=steps,
                               sampling_method={"ode": "heun" if heun else "euler", "sde": "euler-maruyama"}[mode],
                               guidance_low=interval[0], guidance_high=interval[1])
    objective = {"name": "rf", "path_type": path_type, "weighting": "uniform", "learn_sigma": False}
    model_fn, sampler = make_sampling(net, None, objective, settings, dict(precision="fp32", channels_last=False,
                                                                            compile=False))
    noise = IndexNoise(3, range(3))
    labels = draw_labels(noise, NUM_CLASSES)
    ours = sampler(model_fn, noise, labels, SHAPE, "cpu")

    theirs_noise = IndexNoise(3, range(3))                  # the same draws, in the same order
    assert torch.equal(draw_labels(theirs_noise, NUM_CLASSES), labels)
    z = theirs_noise.randn(SHAPE)
    if mode == "ode":
        theirs = reference_euler(net, z, labels, steps, cfg, *interval, heun=heun)
    else:
        theirs = reference_euler_maruyama(net, z, labels, steps, cfg, *interval, path_type,
                                          lambda: theirs_noise.randn(SHAPE))
    relative = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    LARGEST[(mode, heun, cfg, path_type)] = relative
    print(f"largest relative difference {mode}{' heun' if heun else ''} cfg {cfg} {path_type}: {relative:.2e}")
    assert relative < 1e-5
    unguided = reference_euler(net, z, labels, steps, 1.0, 0.0, 1.0) if mode == "ode" else None
    if cfg > 1.0 and unguided is not None:     # the guidance does something (so the comparison can fail)
        assert (ours - unguided).abs().max() > 1e-2


def test_the_guidance_interval_includes_its_boundaries_in_repas_time():
    call = GuidedCall(lambda x, t, y: x, 4, cfg_scale=1.8, null_label=NUM_CLASSES, interval=(0.0, 0.7))
    grid = torch.linspace(1, 0, 11, dtype=torch.float64)
    assert [call.guided_at(t) for t in grid] == [float(t) <= 0.7 for t in grid]
    assert call.guided_at(torch.tensor(0.7, dtype=torch.float64)) and call.guided_at(torch.tensor(0.0))
    assert not call.guided_at(torch.tensor(0.7 + 1e-12, dtype=torch.float64))
    assert not GuidedCall(lambda x, t, y: x, 4, cfg_scale=1.0, interval=(0.0, 1.0)).guided_at(0.5)


#################################################################################
#                    REPA's and SiT's files, as typed                           #
#################################################################################

def repa_args(**overrides):
    """REPA's train.py args (argparse.Namespace) as it saves them, for a SiT-S/2 on 16 px images."""
    fields = dict(output_dir="exps", exp_name="linear-dinov2-b-enc1", logging_dir="logs", report_to="wandb",
                  sampling_steps=10000, resume_step=0, model="SiT-S/2", num_classes=NUM_CLASSES, encoder_depth=1,
                  fused_attn=True, qk_norm=False, projector_embed_dims="32", projector_dim=64, data_dir="../data/",
                  resolution=16, batch_size=256, allow_tf32=True, mixed_precision="fp16", epochs=1400,
                  max_train_steps=400000, checkpointing_steps=50000, gradient_accumulation_steps=1,
                  learning_rate=1e-4, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8,
                  max_grad_norm=1.0, seed=0, num_workers=4, path_type="linear", prediction="v", cfg_prob=0.1,
                  enc_type="dinov2-vit-b", proj_coeff=0.5, weighting="uniform", legacy=False)
    return argparse.Namespace(**{**fields, **overrides})


def repa_weights(seed=0):
    """A SiT-S/2 (DiT-S/2 with an in_channels head) on 8x8 latents plus REPA's projector keys
    (projector_dim 64, z 32), stored in fp16 to halve the file (REPA saves fp32; loading casts)."""
    torch.manual_seed(seed)
    net = create_model("SiT-S/2", input_size=8, in_channels=4, num_classes=NUM_CLASSES, learn_sigma=False)
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.02)
    projector = Projector(384, 32, hidden_dim=64)
    state = {**net.state_dict(), **{f"projectors.0.{k[len('mlp.'):]}": v for k, v in projector.state_dict().items()}}
    return {k: v.half() for k, v in state.items()}


@pytest.fixture(scope="module")
def repa_file(tmp_path_factory):
    """REPA's layout {'model', 'ema', 'opt', 'args', 'steps'} (args a Namespace), written by torch.save.
    "ema" shares the tensors of "model" but its head and first projector layer (torch.save stores a
    shared tensor once: the file stays one weight set)."""
    model = repa_weights()
    ema = dict(model)
    for key in ("final_layer.linear.weight", "projectors.0.0.weight"):
        ema[key] = model[key] + 0.01
    opt = {"state": {}, "param_groups": [{"lr": 1e-4, "params": list(range(len(model)))}]}
    path = tmp_path_factory.mktemp("repa") / "repa-0050000.pt"
    torch.save({"model": model, "ema": ema, "opt": opt, "args": repa_args(), "steps": 50000}, path)
    return str(path)


def test_a_repa_checkpoint_samples_with_no_flag(repa_file, tiny_vae_dir, tmp_path, capsys):
    """No --model, --objective or guidance flag: the projectors and args say REPA; sampled with its
    ODE (the default mode) in REPA's convention, all channels guided (--vae: REPA's files do not
    name theirs)."""
    out = tmp_path / "grid.png"
    args = sample.parse_args(["--ckpt", repa_file, "--vae", tiny_vae_dir,
                              "--class-labels", "1", "2", "--num-steps", "3", "--out", str(out)])
    sample.main(args)
    log = capsys.readouterr().out
    assert "Using the checkpoint's training settings: --model SiT-S/2 --image-size 16 --num-classes 10" in log
    assert ("Recognised a REPA checkpoint (6 projector tensors (dropped), REPA's args (model SiT-S/2, path_type "
            "linear)): sampling with REPA's rectified flow (objective rf, t = 1 noise, linear path)") in log
    assert args.objective_config == {"name": "rf", "path_type": "linear", "weighting": "uniform", "learn_sigma": False}
    assert (args.model, args.guide_channels, args.mode, args.sampling_method) == ("DiT-S/2", "all", "ode", "euler")
    assert out.is_file()


def test_repa_generate_flags_give_the_same_npz_from_one_and_two_processes(repa_file, tiny_vae_dir, tmp_path):
    """REPA's generate.py flags as typed (SDE, cfg 1.8 up to t = 0.7) through sample_ddp.py; 5 images in
    batches of 2: one process in-process, then two under torchrun (gloo), byte-identical .npz."""
    flags = ["--model", "SiT-S/2", "--ckpt", repa_file, "--num-steps", "4", "--cfg-scale", "1.8", "--guidance-high",
             "0.7", "--mode", "sde", "--path-type=linear", "--encoder-depth=1", "--projector-embed-dims=32",
             "--per-proc-batch-size", "2", "--num-fid-samples", "5", "--vae", tiny_vae_dir]
    one = sample_ddp.main(sample_ddp.parse_args([*flags, "--sample-dir", str(tmp_path / "one")]))
    assert os.path.basename(one).endswith("-sde-euler-maruyama-4-guide-all.npz")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             os.path.join(REPO_ROOT, "sample_ddp.py"), *flags, "--sample-dir", str(tmp_path / "two")],
                            capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Recognised a REPA checkpoint" in result.stdout
    two = os.path.join(tmp_path / "two", os.path.basename(one))
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == (5, 16, 16, 3) and np.array_equal(a["arr_0"], b["arr_0"])
        assert len({image.tobytes() for image in a["arr_0"]}) == 5


def resolved(state, *flags, checkpoint=None):
    """resolve_settings of sample.py's flags for an in-memory file (no sampling)."""
    args = sample.parse_args([*flags, "--ckpt", "unused.pt", "--vae", "none", "--in-channels", "4", "--image-size",
                              "8", "--num-classes", str(NUM_CLASSES)])
    messages = []
    resolve_settings(args, state if checkpoint is None else checkpoint,
                     {k: v for k, v in state.items() if not k.startswith("projectors.")}, log=messages.append)
    return args, messages


def meta_state(learn_sigma, projectors=False):
    with torch.device("meta"):
        state = create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=NUM_CLASSES,
                             learn_sigma=learn_sigma).state_dict()
        if projectors:
            state.update({f"projectors.0.{k[len('mlp.'):]}": v for k, v in Projector(384, 32).state_dict().items()})
    return state


def test_the_file_decides_the_convention_and_a_sit_name_decides_only_what_the_file_cannot():
    sit_release = meta_state(learn_sigma=True)                       # SiT's and DiT's releases look alike
    args, log = resolved(sit_release, "SDE", "--model", "SiT-S/2")    # SiT's README command
    assert args.objective_config["name"] == "sit" and args.objective_config["path_type"] == "Linear"
    assert (args.model, args.mode, args.sampling_method, args.guide_channels) == ("DiT-S/2", "sde", "Euler", "official")
    assert "learned-sigma head (SiT's release): SiT's flow matching" in log[-1]
    args, _ = resolved(sit_release, "--model", "DiT-S/2")
    assert args.objective_config["name"] == "ddpm"                    # DiT's own name: DiT's DDPM
    repa_release = meta_state(learn_sigma=False, projectors=True)    # REPA's bare EMA state_dict
    for name in ("SiT-S/2", "DiT-S/2"):
        args, log = resolved(repa_release, "--model", name, "--mode", "SDE")
        assert args.objective_config["name"] == "rf" and args.mode == "sde" and args.guide_channels == "all"
        assert log[-1].startswith("Recognised a REPA checkpoint (6 projector tensors (dropped))")
    cosine = {"ema": meta_state(False, True), "args": repa_args(path_type="cosine")}
    args, _ = resolved(cosine["ema"], checkpoint=cosine)
    assert args.objective_config["path_type"] == "cosine" and args.num_sampling_steps == 50
    args, _ = resolved(meta_state(learn_sigma=False), "--model", "SiT-S/2", "--heun", "--num-steps", "7")
    assert (args.objective_config["name"], args.sampling_method, args.num_sampling_steps) == ("rf", "heun", 7)


@pytest.mark.parametrize("flags, message", [
    (["--mode", "sde", "--heun"], "--heun is REPA's ODE option .*: REPA's SDE has no Heun step"),
    (["--diffusion-form", "SBDM"], "--diffusion-form is a setting of SiT's samplers; .* REPA's rectified flow"),
    (["--sampling-method", "dopri5"], "--sampling-method dopri5: REPA's ODE sampler is euler or heun"),
])
def test_sit_only_settings_on_a_repa_file_are_one_line_errors(flags, message):
    with pytest.raises(JobError, match=message):
        resolved(meta_state(False, True), "--model", "SiT-S/2", *flags)


def test_sits_leading_mode_and_repas_flag_names_parse():
    assert sample.parse_args(["SDE", "--ckpt", "a.pt"]).mode == "sde"
    args = sample_ddp.parse_args(["ODE", "--ckpt", "a.pt", "--num-steps", "9", "--resolution", "512"])
    assert (args.mode, args.num_sampling_steps, args.image_size) == ("ode", 9, 512)
    assert sample_ddp.parse_args(["--mode", "SDE", "--ckpt", "a.pt"]).mode == "sde"
    with pytest.raises(SystemExit):
        sample.parse_args(["SDE", "--ckpt", "a.pt", "--mode", "ode"])


def test_export_writes_repa_weights_with_objective_rf_and_no_projectors(repa_file, tmp_path):
    out = str(tmp_path / "repa.safetensors")
    export.main(export.build_parser().parse_args(["--ckpt", repa_file, "--out", out]))
    exported = load_checkpoint_file(out)
    assert exported["metadata"]["model"] == "DiT-S/2" and exported["metadata"]["args"]["image_size"] == 16
    assert exported["metadata"]["objective"] == {"name": "rf", "path_type": "linear", "weighting": "uniform",
                                                 "learn_sigma": False}
    _, ema = read_checkpoint(repa_file, "ema")
    assert exported["ema"].keys() == ema.keys() and all(torch.equal(exported["ema"][k], ema[k]) for k in ema)


def test_train_ckpt_takes_repa_weights_and_its_projectors_with_repa(repa_file):
    """train.py --ckpt's loader: "model" into the model, "ema" into the EMA, REPA's projectors.0.J into
    our RepaNet's projectors.0.mlp.J with --repa (from "model", the trained ones), dropped without."""
    file = load_checkpoint_file(repa_file)

    def build():   # no init (every weight is loaded): built on the meta device, then given CPU memory
        with torch.device("meta"):
            net = create_model("SiT-S/2", input_size=8, in_channels=4, num_classes=NUM_CLASSES, learn_sigma=False)
        return net.to_empty(device="cpu")
    model, ema, projectors = build(), build(), torch.nn.ModuleList([Projector(384, 32, hidden_dim=64)])
    line = load_initial_weights(repa_file, "SiT-S/2", model, ema, projectors)
    assert line == f"Initialised model, EMA and REPA projector weights from {repa_file}"
    head = "final_layer.linear.weight"
    assert torch.equal(model.final_layer.linear.weight, file["model"][head].float())
    assert torch.equal(ema.final_layer.linear.weight, file["ema"][head].float())
    assert not torch.equal(file["model"][head], file["ema"][head])
    assert torch.equal(projectors[0].mlp[0].weight, file["model"]["projectors.0.0.weight"].float())
    assert torch.equal(projectors[0].mlp[4].bias, file["model"]["projectors.0.4.bias"].float())
    line = load_initial_weights(repa_file, "DiT-S/2", model, ema)
    assert line.endswith("its 6 REPA projector tensors are not used (no --repa)")
    with pytest.raises(JobError, match=r"the REPA projectors in .* do not fit this run's \(e.g. 0.mlp.4.bias"):
        load_initial_weights(repa_file, "DiT-S/2", model, ema, torch.nn.ModuleList([Projector(384, 16, hidden_dim=64)]))


def test_repa_files_are_read_without_unpickling_code(repa_file, tmp_path):
    """weights_only: argparse.Namespace is the one object a REPA file holds besides tensors and plain values."""
    assert isinstance(load_checkpoint_file(repa_file)["args"], argparse.Namespace)
    evil = tmp_path / "evil.pt"
    torch.save({"ema": {"w": torch.zeros(2)}, "args": repa_args(), "hook": math.sqrt}, evil)
    with pytest.raises(JobError, match="was refused: it is not a plain weights file"):
        load_checkpoint_file(str(evil))
