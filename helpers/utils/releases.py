"""Public releases recognised from their content, so they load and sample as their authors did with no
extra flag (facts: /work/shared/spec/REPA.md, SIT.md):

    REPA     {'model', 'ema', 'opt', 'args'} (args: argparse.Namespace, model 'SiT-XL/2', resolution,
             path_type, encoder_depth, projector_embed_dims, ...) or the released bare EMA state_dict;
             the weights are DiT's keys plus `projectors.<k>.<0|2|4>.{weight,bias}`, the head has
             in_channels outputs. Trained with REPA's rectified flow (t = 1 noise): objective rf on
             args.path_type (linear without args). Recognised by the projector keys or by REPA's args.
    SiT      a bare DiT-XL/2-shaped state_dict (learned-sigma head, 8 channels), indistinguishable
             from DiT's own release: `--model SiT-XL/2` says it is SiT's (flow matching, t = 1 data).

A file that records its objective (ours) is never second-guessed; an explicit --objective wins over all.
The projectors are training state: sampling and export drop them; train.py --ckpt with --repa keeps
them (REPA's `projectors.K.J` is our RepaNet's `projectors.K.mlp.J`).
"""
import argparse

import torch

from helpers.utils.checkpoint import (extract_state_dict, load_checkpoint_file, load_model_weights,
                                     strip_wrapper_prefixes)
from helpers.utils.cli import JobError
from helpers.utils.models import canonical_name, is_sit_name

PROJECTOR_PREFIX = "projectors."
REPA_ARG_FIELDS = ("enc_type", "proj_coeff", "encoder_depth", "projector_embed_dims")   # only REPA's args hold these
RF_PATHS = ("linear", "cosine")
SIT_OBJECTIVE = {"name": "sit", "path_type": "Linear", "prediction": "velocity", "loss_weight": None,
                 "train_eps": None, "sample_eps": None, "learn_sigma": True}


def split_projectors(state_dict):
    """(the model's weights, REPA's projector weights keyed `<k>.<j>.<weight|bias>`) of one weight set."""
    weights, projectors = {}, {}
    for key, value in strip_wrapper_prefixes(state_dict).items():
        if key.startswith(PROJECTOR_PREFIX):
            projectors[key[len(PROJECTOR_PREFIX):]] = value
        else:
            weights[key] = value
    return weights, projectors


def _weight_sets(checkpoint):
    """Every state_dict a checkpoint holds: itself when bare, else its values that are state_dicts."""
    if not isinstance(checkpoint, dict):
        return []
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return [checkpoint]
    return [v for v in checkpoint.values() if isinstance(v, dict) and v and all(torch.is_tensor(t) for t in v.values())]


def repa_args(checkpoint):
    """REPA's training args as a dict ({} if the file has none of REPA's fields)."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    return dict(args) if isinstance(args, dict) and any(k in args for k in REPA_ARG_FIELDS) else {}


def recognise_repa(checkpoint):
    """None, or what says a file is REPA's: {"projectors": projector tensors of its first weight set,
    "args": its REPA args (maybe {})}. Checks REPA's options this codebase cannot build."""
    args = repa_args(checkpoint)
    projectors = max((len(split_projectors(s)[1]) for s in _weight_sets(checkpoint)), default=0)
    if not args and not projectors:
        return None
    if args.get("qk_norm"):
        raise JobError("this REPA checkpoint was trained with --qk-norm (normalised queries and keys), which "
                       "DiT's architecture here does not have")
    path_type = args.get("path_type", "linear")
    if path_type not in RF_PATHS:
        raise JobError(f"this REPA checkpoint's path_type {path_type!r} is not one of REPA's {', '.join(RF_PATHS)}")
    return {"projectors": projectors, "args": args}


def repa_objective(repa):
    """The rf objective config of a recognised REPA file (REPA's heads have no learned sigma)."""
    args = repa["args"]
    weighting = args.get("weighting") if args.get("weighting") in ("uniform", "lognormal") else "uniform"
    return {"name": "rf", "path_type": args.get("path_type", "linear"), "weighting": weighting, "learn_sigma": False}


def sampling_args(saved, checkpoint):
    """The saved training args (a dict) in this codebase's names: REPA's resolution is our
    image_size, its model name is a SiT alias kept as written (the caller makes it canonical)."""
    saved = dict(saved)
    if repa_args(checkpoint) and "image_size" not in saved and isinstance(saved.get("resolution"), int):
        saved["image_size"] = saved["resolution"]
    return saved


def dit_head_learns_sigma(state_dict):
    """For a DiT-shaped state_dict: True when the head outputs twice the input channels (DiT's and
    SiT's releases), False when as many (REPA's), None when it is not DiT-shaped."""
    embed, head = state_dict.get("x_embedder.proj.weight"), state_dict.get("final_layer.linear.weight")
    if embed is None or head is None or embed.ndim != 4:
        return None
    out_channels, rem = divmod(head.shape[0], embed.shape[-1] * embed.shape[-2])
    return None if rem else {2 * embed.shape[1]: True, embed.shape[1]: False}.get(out_channels)


def release_objective(checkpoint, state_dict, model_name):
    """(objective config, one line saying why) for a file that does not record its objective, else
    (None, None): REPA's layout -> rf on its path; a DiT-shaped file named SiT-*/* -> SiT's flow
    (8-channel head, SiT's release) or REPA's rf (in_channels head)."""
    repa = recognise_repa(checkpoint)
    if repa is not None:
        args = repa["args"]
        what = [f"{repa['projectors']} projector tensors (dropped)"] if repa["projectors"] else []
        if args:
            what.append(f"REPA's args (model {args.get('model')}, path_type {args.get('path_type', 'linear')})")
        config = repa_objective(repa)
        return config, (f"Recognised a REPA checkpoint ({', '.join(what)}): sampling with REPA's rectified flow "
                        f"(objective rf, t = 1 noise, {config['path_type']} path), guidance on all channels")
    if model_name and is_sit_name(model_name):
        learns_sigma = dit_head_learns_sigma(state_dict)
        if learns_sigma is False:
            return ({"name": "rf", "path_type": "linear", "weighting": "uniform", "learn_sigma": False},
                    f"--model {model_name} with an in_channels head (REPA's SiT): REPA's rectified flow (objective "
                    f"rf, t = 1 noise, linear path)")
        if learns_sigma:
            return dict(SIT_OBJECTIVE), (f"--model {model_name} with a learned-sigma head (SiT's release): SiT's flow "
                                         f"matching (objective sit, t = 1 data, Linear path)")
    return None, None


def load_initial_weights(path, model_name, model, ema, projectors=None):
    """train.py --ckpt: the model's weights from "model" (else the file's one set), the EMA's from "ema"
    (else the same), from ours, official or REPA files; REPA's projectors go into `projectors` (our
    RepaNet's ModuleList, with --repa) as `<k>.mlp.<j>`, and are dropped without --repa.
    Returns a line saying what was loaded."""
    init = load_checkpoint_file(path)
    sets = [key for key in ("model", "ema") if isinstance(init, dict) and isinstance(init.get(key), dict)]
    weights, model_projectors = split_projectors(extract_state_dict(init, "model" if "model" in sets else "ema"))
    load_model_weights(model, weights, canonical_name(model_name))
    ema_weights = split_projectors(extract_state_dict(init, "ema"))[0] if "ema" in sets else weights
    load_model_weights(ema, ema_weights, canonical_name(model_name))
    if projectors is None or not model_projectors:
        dropped = f"; its {len(model_projectors)} REPA projector tensors are not used (no --repa)" \
            if model_projectors else ""
        return f"Initialised model and EMA weights from {path}{dropped}"
    load_repa_projectors(projectors, model_projectors, path)
    return f"Initialised model, EMA and REPA projector weights from {path}"


def load_repa_projectors(projectors, repa_weights, path):
    """REPA's `<k>.<j>.<weight|bias>` into our projectors (`<k>.mlp.<j>...`), with one line on a mismatch."""
    ours = {}
    for key, value in repa_weights.items():
        k, rest = key.split(".", 1)
        ours[f"{k}.mlp.{rest}"] = value
    expected = {k: tuple(v.shape) for k, v in projectors.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or sorted(k for k in expected if expected[k] != got[k])
        raise JobError(f"the REPA projectors in {path} do not fit this run's (e.g. {diff[0]}: file "
                       f"{got.get(diff[0])}, run {expected.get(diff[0])}): pass the --enc-type and "
                       f"--projector-embed-dims it was trained with, or start from its weights without --repa")
    projectors.load_state_dict(ours, strict=True)
