"""REPA in the trainers: the projector beside the model, and the alignment term added to any
objective through the same training_losses interface (helpers/training/repa.py holds the encoders, the
projector and the loss itself).

    --repa --enc-type dinov2-vit-b --enc-weights dinov2_vitb14_pretrain.pth
    loss = denoising loss (DDPM's, SiT's or RF's) + proj_coeff * (REPA + manifold_coeff * manifold)
    REPA: mean over tokens and encoders of -cos; manifold: U-REPA's token-pair similarity term

Each model family starts from its authors' recipe (repa_recipe): DiT aligns its tokens after block
--encoder-depth without the manifold term (REPA); the U-shaped DiC/DiCo align the middle stage,
projected then upsampled to the encoder's token grid, proj_coeff 0.25, manifold_coeff 3 (U-REPA); both clip the
gradient norm at 1.0. Any of these can be overridden by its flag. The projectors train with the model
(optimizer, DDP, checkpoints under "projector", exact resume); sampling and export.py leave them out.
The encoders are frozen, in eval mode, get no gradient, run in bf16 on a GPU and are never saved.
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn as nn

from helpers.utils.cli import JobError
from helpers.training.repa import (ENCODERS, Projector, encoder_tokens, load_encoder, manifold_loss, preprocess,
                                   projection_loss)

REPA_MAX_GRAD_NORM = 1.0   # REPA's train.py --max-grad-norm (U-REPA trains with REPA's script)
U_REPA_STAGE = "mid"        # U-REPA: the lowest-resolution stage aligns best (FID 6.25 vs 9.35 at layer 8)
U_REPA_MANIFOLD = 3.0       # U-REPA's best w (w = 0: 6.25, 2: 5.81, 3: 5.72, 4: 5.79 FID at 100K)
REPA_PROJ_COEFF = 0.5       # REPA's lambda
U_REPA_PROJ_COEFF = 0.25    # U-REPA's lambda is not stated; its sweep holding lambda * w fixed suggests 0.25


def repa_recipe(transformer):
    """The settings --repa starts from, by family: REPA's for a transformer (DiT: no manifold term, its
    --encoder-depth block), U-REPA's for a U-shaped network (DiC, DiCo: the mid stage, manifold w = 3).
    Both clip at REPA's gradient norm. Values for flags left unset (None)."""
    if transformer:
        return {"recipe": "REPA", "max_grad_norm": REPA_MAX_GRAD_NORM, "proj_coeff": REPA_PROJ_COEFF,
                "manifold_coeff": 0.0, "repa_stage": None}
    return {"recipe": "U-REPA", "max_grad_norm": REPA_MAX_GRAD_NORM, "proj_coeff": U_REPA_PROJ_COEFF,
            "manifold_coeff": U_REPA_MANIFOLD, "repa_stage": U_REPA_STAGE}


def add_repa_args(parser):
    g = parser.add_argument_group("REPA (representation alignment; off by default)")
    g.add_argument("--repa", action="store_true", help="add REPA's projection loss to the objective")
    g.add_argument("--proj-coeff", type=float, default=None,
                   help=f"weight lambda of the projection term (default {REPA_PROJ_COEFF:g} for DiT, REPA's; "
                        f"{U_REPA_PROJ_COEFF:g} for DiC/DiCo, inferred for U-REPA)")
    g.add_argument("--enc-type", type=str, default="dinov2-vit-b", help=f"encoders, comma-separated: {', '.join(ENCODERS)}")
    g.add_argument("--enc-weights", type=str, default=None,
                   help="local weights of each encoder, comma-separated (default: download through timm)")
    g.add_argument("--projector-embed-dims", type=str, default=None,
                   help="projector output dims, comma-separated (default: each encoder's token width)")
    g.add_argument("--encoder-depth", type=int, default=8, help="DiT: align the tokens after this block")
    g.add_argument("--repa-stage", type=str, default=None,
                   help="DiC/DiCo: the aligned stage, enc0, enc1, mid, dec1, dec0 or auto (the stage on the encoder's "
                        f"grid, else mid) (default {U_REPA_STAGE}, U-REPA's: projected, then upsampled bilinearly)")
    g.add_argument("--manifold-coeff", type=float, default=None,
                   help=f"weight w of U-REPA's manifold loss inside the projection term (default {U_REPA_MANIFOLD:g} "
                        f"for DiC/DiCo, U-REPA's; 0 for DiT, REPA's)")
    return g


class RepaNet(nn.Module):
    """The model and its projectors as one module (what DDP wraps and the optimizer trains): the
    forward returns the model's output and keeps the projected features for the loss."""

    def __init__(self, model, tap, projectors):
        super().__init__()
        self.model, self.tap, self.projectors = model, tap, nn.ModuleList(projectors)
        self.projected = None

    def forward(self, x, t, y, **kwargs):
        out, features = self.model(x, t, y, return_features=(self.tap,), **kwargs)
        self.projected = [projector(features[self.tap]) for projector in self.projectors]
        return out


class RepaObjective:
    """A base objective (DDPM, SiT, RF) plus proj_coeff x (REPA's projection loss + manifold_coeff x
    U-REPA's manifold loss); the config a checkpoint records is the base's (what samplers need) with
    the REPA settings beside it. With manifold_coeff 0 the manifold term is not computed at all."""

    def __init__(self, base, net, encoders, coeff, resolution, settings, manifold_coeff=0.0):
        self.base, self.net, self.encoders, self.coeff = base, net, encoders, coeff
        self.resolution, self.settings = resolution, settings
        self.manifold_coeff = float(manifold_coeff)
        self.learn_sigma = base.learn_sigma
        # loss terms the trainers log beside the loss
        self.log_terms = ("denoise", "proj", "manifold") if self.manifold_coeff else ("denoise", "proj")

    def times(self, u):
        return self.base.times(u)

    def training_losses(self, model, x, model_kwargs=None, draws=None, images=None):
        """The base objective's losses through `model` (the wrapped RepaNet), plus the alignment of
        the features that forward projected with the encoders' tokens of the clean `images`."""
        if images is None:
            raise JobError("REPA needs each sample's clean image: train with --data-path (and --feature-path "
                           "for latents)")
        losses = self.base.training_losses(model, x, model_kwargs, draws)
        rgb = images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)   # grey -> RGB
        pixels = preprocess(rgb, self.resolution)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=pixels.is_cuda):
            targets = [encoder_tokens(encoder, pixels).float() for encoder in self.encoders]
        _, proj = projection_loss(self.net.projected, targets)
        if not self.manifold_coeff:
            return {**losses, "denoise": losses["loss"], "proj": proj, "loss": losses["loss"] + self.coeff * proj}
        _, manifold = manifold_loss(self.net.projected, targets)
        return {**losses, "denoise": losses["loss"], "proj": proj, "manifold": manifold,
                "loss": losses["loss"] + self.coeff * (proj + self.manifold_coeff * manifold)}

    def config(self):
        return {**self.base.config(), "repa": dict(self.settings)}


def _split(text):
    return [part.strip() for part in str(text).split(",") if part.strip()] if text else []


@dataclass(frozen=True)
class RepaConfig:
    """REPA's settings, from the trainers' flags of the same names (flags.repa_config)."""
    enc_type: str                          # encoders, comma-separated
    enc_weights: Optional[str]             # their local weights, comma-separated (None: timm download)
    proj_coeff: Optional[float]            # lambda (None: the recipe's, 0.5 for DiT, 0.25 for DiC/DiCo)
    projector_embed_dims: Optional[str]    # comma-separated (None: each encoder's token width)
    encoder_depth: int                     # DiT: the aligned block
    repa_stage: Optional[str]              # DiC/DiCo: the aligned stage, or auto (None: the recipe's, mid)
    image_size: int                        # the encoders see the images at this resolution
    model: str                             # the model's name, for errors
    manifold_coeff: Optional[float] = None   # U-REPA's w (None: the recipe's, 3 for DiC/DiCo, 0 for DiT)

    def check(self):
        """Errors before work: encoder names, weights count, coefficient."""
        names = _split(self.enc_type)
        unknown = [n for n in names if n not in ENCODERS]
        if not names or unknown:
            raise JobError(f"--enc-type {self.enc_type}: unknown encoder {unknown[0] if unknown else '(none)'}; use "
                           f"one or more of {', '.join(ENCODERS)}")
        weights = _split(self.enc_weights)
        if weights and len(weights) != len(names):
            raise JobError(f"--enc-weights names {len(weights)} files for {len(names)} encoders (--enc-type "
                           f"{self.enc_type}): pass one per encoder, comma-separated")
        if self.proj_coeff is not None and not self.proj_coeff >= 0:
            raise JobError(f"--proj-coeff must be >= 0, got {self.proj_coeff}")
        if self.manifold_coeff is not None and not self.manifold_coeff >= 0:
            raise JobError(f"--manifold-coeff must be >= 0, got {self.manifold_coeff}")


def build_repa(config, model, base_objective, device):
    """(RepaNet, RepaObjective) for --repa (`config` a RepaConfig): encoders loaded (frozen), one
    projector per encoder on the chosen tap, sized for the encoder's token grid."""
    names, weights = _split(config.enc_type), _split(config.enc_weights)
    encoders = [load_encoder(name, weights[i] if weights else None, config.image_size, device)
                for i, name in enumerate(names)]
    grid = tuple(encoders[0].patch_embed.grid_size)
    dims = [int(d) for d in _split(config.projector_embed_dims)] or [e.embed_dim for e in encoders]
    if len(dims) != len(encoders) or any(d != e.embed_dim for d, e in zip(dims, encoders)):
        raise JobError(f"--projector-embed-dims {config.projector_embed_dims} must be each encoder's token width "
                       f"({', '.join(str(e.embed_dim) for e in encoders)}): the loss compares them")
    recipe = repa_recipe(is_transformer(model))
    config = replace(config, **{key: recipe[key] for key in ("repa_stage", "proj_coeff", "manifold_coeff")
                                if getattr(config, key) is None})
    tap, out_grid, conv = choose_tap(config, model, grid)
    projectors = [Projector(model.feature_channels(tap), dim, conv=conv, out_grid=out_grid).to(device)
                  for dim in dims]
    net = RepaNet(model, tap, projectors)
    settings = dict(enc_type=config.enc_type, proj_coeff=config.proj_coeff, tap=tap, token_grid=list(grid),
                    upsample=projectors[0].upsample if out_grid else None, manifold_coeff=config.manifold_coeff,
                    recipe=recipe["recipe"])
    return net, RepaObjective(base_objective, net, encoders, config.proj_coeff, config.image_size, settings,
                              manifold_coeff=config.manifold_coeff)


def is_transformer(model):
    """True for a model with a constant-resolution token stream (DiT: taps block1..N), False for a
    U-shaped one (DiC, DiCo: stage taps)."""
    return model.feature_names()[0].startswith("block")


def choose_tap(config, model, grid):
    """(tap name, projector out_grid or None, conv projector?) for DiT (--encoder-depth) or DiC (--repa-stage)."""
    names = model.feature_names()
    if is_transformer(model):   # DiT: tokens after block k
        tap = f"block{config.encoder_depth}"
        if tap not in names:
            raise JobError(f"--encoder-depth {config.encoder_depth}: {config.model} has blocks 1..{len(names)}")
        if tuple(model.feature_grid(tap)) != grid:
            raise JobError(f"{config.model}'s {model.feature_grid(tap)} token grid differs from the encoder's {grid}: "
                           f"REPA compares token by token (use --image-size 256 with 32x32 latents and /2 patches)")
        return tap, None, False
    if config.repa_stage == "auto":
        matching = [n for n in names if tuple(model.feature_grid(n)) == grid]
        tap = matching[0] if matching else "mid"
    elif config.repa_stage in names:
        tap = config.repa_stage
    else:
        raise JobError(f"--repa-stage {config.repa_stage}: choose auto or one of {', '.join(names)}")
    return tap, (None if tuple(model.feature_grid(tap)) == grid else grid), True


class LatentsWithImages(torch.utils.data.Dataset):
    """--feature-path latents each with the image it was extracted from (--data-path): item i is
    (latent, label, image). extract_features.py names a latent by its image's index in the class
    folders (<index>.npy, <index>_flip.npy for the flipped image); a name that is no such index or
    a label that differs from the folder's class is refused at start-up."""

    def __init__(self, latents, images):
        self.latents, self.images, self.rows = latents, images, []
        labels = latents.labels
        for row, name in enumerate(latents.names):
            stem = name[:-len(".npy")] if name.endswith(".npy") else name
            base, flip = (stem[:-len("_flip")], True) if stem.endswith("_flip") else (stem, False)
            if not base.isdigit() or int(base) >= len(images):
                raise JobError(f"latent {name} of {latents.root} names no image of {images.root} (it has "
                               f"{len(images)}): pass the --data-path the latents were extracted from")
            if int(labels[row]) != images.targets[int(base)]:
                raise JobError(f"latent {name} has label {int(labels[row])} but image {int(base)} of {images.root} is "
                               f"class {images.targets[int(base)]}: pass the --data-path the latents were extracted from")
            self.rows.append((int(base), flip))

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, row):
        item = self.latents[row]
        index, flip = self.rows[row]
        image = self.images.load(index, flip=flip) if item is not None else None
        return None if item is None or image is None else (*item, image)
