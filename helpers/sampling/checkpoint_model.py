"""The model a checkpoint holds: its weights read out of ours/DiT's/bare files, the variant and head
of files that do not name them, and the model (with its VAE) built and loaded, ready to sample.

    checkpoint, state_dict = read_checkpoint(path, "ema")
    model, vae = build_model(ModelSettings(...), state_dict, device, cfg_scale)
"""
from dataclasses import dataclass

import torch

from helpers.data.vae import downsample_factor, downsample_factor_of_spec, latent_channels, load_vae
from helpers.utils.checkpoint import (extract_state_dict, identify_variant, load_checkpoint_file, load_model_weights,
                                     strip_wrapper_prefixes)
from helpers.utils.cli import JobError, one_line
from helpers.utils.models import all_models, create_model, is_model_name, unknown_model_message
from helpers.utils.releases import split_projectors
from helpers.training import setup as training

# The class-label table of DiC, DiT and DiCo: num_classes rows, plus the null label's when trained with dropout.
LABEL_TABLES = ("y_embedder_ls.0.embedding_table.weight", "y_embedder.embedding_table.weight",
                "y_embedder.embedding_table_0.weight")


@dataclass(frozen=True)
class ModelSettings:
    """The resolved model flags build_model reads (helpers.sampling.flags.model_settings makes them)."""
    model: str            # a registered name, e.g. DiC-XL or DiT-XL/2 (or its SiT alias)
    image_size: int       # image side in pixels
    num_classes: int
    vae: str              # ema, mse, a local AutoencoderKL folder, or "none" (pixel space)
    in_channels: int      # image channels of a pixel-space model (None: 3); must match a VAE's latents
    model_kwargs: dict    # constructor overrides (--network_g__key=value)
    learn_sigma: bool     # the objective's output head: twice the input channels out


def read_checkpoint(path, weights):
    """(checkpoint, state_dict) with `weights` ("ema" or "model") picked out of ours/DiT's/REPA's/bare
    files; REPA's projectors (training state) are left out of state_dict, the checkpoint keeps them
    (helpers/utils/releases.py recognises REPA's files by them)."""
    checkpoint = load_checkpoint_file(path)
    try:
        state_dict = extract_state_dict(checkpoint, which=weights)
    except JobError as e:
        if weights == "ema" and isinstance(checkpoint, dict) and "model" in checkpoint:
            raise JobError(f"checkpoint {path} has no 'ema' weights: use --weights model "
                                  f"to sample with its raw training weights") from e
        raise
    return checkpoint, split_projectors(state_dict)[0]


def _shapes_of(name, image_size, vae, in_channels, num_classes, model_kwargs, learn_sigma):
    """Key -> shape of `name` built on the meta device for these settings (None if it cannot be)."""
    factor = downsample_factor_of_spec(vae)
    kwargs = dict(input_size=image_size // factor, in_channels=in_channels or 4,
                  num_classes=num_classes, **{**model_kwargs, "learn_sigma": learn_sigma})
    try:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in create_model(name, **kwargs).state_dict().items()}
    except (ValueError, TypeError, AssertionError):
        return None


def head_learns_sigma(state_dict, model, image_size, vae, in_channels, num_classes, model_kwargs):
    """Whether a file without a recorded objective has a learned-sigma head (twice the input channels
    out, as DiT's and SiT's releases) or not; None when the model cannot tell. `model`: the model's
    name, or None to try every registered one."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    names = [model] if model else list(all_models())
    for learn_sigma in (True, False):
        if any(_shapes_of(name, image_size, vae, in_channels, num_classes, model_kwargs, learn_sigma) == shapes
               for name in names):
            return learn_sigma
    return None


def identify_model(state_dict, image_size, vae, in_channels, num_classes, learn_sigma):
    """The registered variant a file without a model name holds (e.g. DiT-XL/2 for SiT's release)."""
    factor = downsample_factor_of_spec(vae)
    return identify_variant(state_dict, image_size // factor, in_channels or 4, num_classes, learn_sigma)


def check_model_name(name):
    """One line for a --model that names no registered variant (nor a SiT alias of one)."""
    if not is_model_name(name):
        raise JobError(unknown_model_message(name))


def check_label(label, num_classes):
    if not 0 <= label < num_classes:
        raise JobError(f"class label {label} is out of range for a {num_classes}-class model "
                            f"(valid: 0..{num_classes - 1})")


def null_label_kwargs(state_dict, num_classes):
    """{"class_dropout_prob": 0} for weights whose label table has no null row (trained with
    --class-dropout-prob 0), so the model is built to their shapes; {} otherwise (any positive
    value builds the same model, and sampling never drops labels). Read from the weights, so
    ours, exported and bare files alike."""
    weights = strip_wrapper_prefixes(state_dict)
    rows = next((weights[key].shape[0] for key in LABEL_TABLES if key in weights), None)
    return {"class_dropout_prob": 0.0} if rows == num_classes else {}


def check_settings(settings, model_kwargs, cfg_scale):
    """Every setting the model must take, each refused in one line before any work (the VAE
    loaded, a file written): a --vae spec, the image size against the VAE's factor and the
    model's own multiple (DiC's and DiCo's downsampling, DiT's patch: the trainer's rule, on the
    meta device), and guidance for a model without a null label."""
    try:
        vae_factor = downsample_factor_of_spec(settings.vae)
    except ValueError as e:
        raise JobError(one_line(e)) from e
    side = settings.image_size // vae_factor
    if settings.image_size % vae_factor:
        raise JobError(f"--image-size {settings.image_size} is not a multiple of the VAE's downsampling factor "
                       f"{vae_factor}: use a multiple of {vae_factor}")
    kwargs = dict(input_size=side, in_channels=settings.in_channels or 4, num_classes=settings.num_classes,
                  learn_sigma=settings.learn_sigma, **model_kwargs)
    with torch.device("meta"):
        model = training.build_model(settings.model, kwargs, settings.image_size, vae_factor)
    if cfg_scale > 1.0 and getattr(model, "class_dropout_prob", 0.1) <= 0:
        raise JobError(f"this {settings.model} has no null label (trained without class dropout), "
                       f"so it cannot use classifier-free guidance: pass --cfg-scale 1")


def build_model(settings, state_dict, device, cfg_scale):
    """(model, vae) ready to sample, from resolved ModelSettings: every setting checked first
    (check_settings), then the VAE (it fixes the latent shape). `cfg_scale` > 1 needs a model
    trained with class dropout (it has a null label)."""
    model_kwargs = {**null_label_kwargs(state_dict, settings.num_classes), **settings.model_kwargs}
    check_settings(settings, model_kwargs, cfg_scale)
    vae = load_vae(settings.vae, device)
    factor = downsample_factor(vae)
    if vae is not None and settings.in_channels is not None and settings.in_channels != latent_channels(vae):
        raise JobError(f"--in-channels {settings.in_channels} does not match the VAE's "
                            f"{latent_channels(vae)} latent channels (--in-channels is for --vae none)")
    in_channels = latent_channels(vae, settings.in_channels or 3)
    kwargs = dict(input_size=settings.image_size // factor, in_channels=in_channels,
                  num_classes=settings.num_classes, learn_sigma=settings.learn_sigma, **model_kwargs)
    try:
        model = create_model(settings.model, **kwargs)
    except TypeError as e:  # an override the constructor does not take
        raise JobError(f"cannot build {settings.model} with {kwargs}: {e}") from e
    load_model_weights(model, state_dict, settings.model)
    model.to(device).eval()
    return model, vae
