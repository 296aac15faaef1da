"""The latent space: load the diffusers VAE by name or local path (or none), encode and decode.

The latent scale and the downsampling factor are read from the VAE's config, never hard-coded,
so any AutoencoderKL works (sd-vae-ft-ema/-mse: factor 8, scale 0.18215).
"""
import json
import os

import torch

VAE_HUB_NAMES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
HUB_FACTOR = 8  # sd-vae-ft-ema/-mse: 8 pixels per latent cell
DEFAULT_SCALE = 0.18215  # sd-vae's latent scale, for configs that do not carry one


def load_vae(spec, device="cpu"):
    """`ema`/`mse` (hub download), a local folder saved with save_pretrained, or `none` (pixel space)."""
    if spec is None or str(spec).lower() == "none":
        return None
    from diffusers.models import AutoencoderKL  # imported late: pixel-space runs do not need it
    source = VAE_HUB_NAMES.get(spec, spec)
    if spec not in VAE_HUB_NAMES and not os.path.isdir(spec):
        raise ValueError(f"--vae {spec!r} is neither 'ema', 'mse', 'none' nor a folder: "
                         f"pass one of those or a path saved with AutoencoderKL.save_pretrained")
    try:
        vae = AutoencoderKL.from_pretrained(source)
    except OSError as e:
        raise ValueError(f"cannot load the VAE {source!r} ({str(e).splitlines()[0]}); without "
                         f"internet, download it once and pass its local folder to --vae") from e
    vae.requires_grad_(False)
    return vae.to(device).eval()


def _factor(block_out_channels):
    """An AutoencoderKL halves the resolution once between consecutive blocks."""
    return 2 ** (len(block_out_channels) - 1)


def downsample_factor(vae):
    """Pixels per latent cell along one side (1 in pixel space)."""
    if vae is None:
        return 1
    return _factor(vae.config.block_out_channels)


def downsample_factor_of_spec(spec):
    """The same factor for a --vae spec without loading weights (a folder's config.json is read),
    so runs on precomputed latents can validate sizes offline and before any work."""
    if spec is None or str(spec).lower() == "none":
        return 1
    if spec in VAE_HUB_NAMES:
        return HUB_FACTOR
    config = os.path.join(spec, "config.json")
    if not os.path.isfile(config):
        raise ValueError(f"--vae {spec!r} is neither 'ema', 'mse', 'none' nor a folder with a "
                         f"config.json: pass one of those (a folder saved with AutoencoderKL.save_pretrained)")
    with open(config, encoding="utf-8") as f:
        return _factor(json.load(f)["block_out_channels"])


def latent_channels(vae, image_channels=3):
    """Channels the diffusion model sees: the VAE's latent channels, or the image's in pixel space."""
    return image_channels if vae is None else vae.config.latent_channels


def latent_scale(vae):
    """Factor that brings latents to about unit variance (0.18215 for sd-vae)."""
    if vae is None:
        return 1.0
    return getattr(vae.config, "scaling_factor", None) or DEFAULT_SCALE


@torch.no_grad()
def encode(vae, images, generator=None):
    """Images in [-1, 1] -> scaled latents, sampling the posterior as DiT does."""
    if vae is None:
        return images
    posterior = vae.encode(images).latent_dist
    return posterior.sample(generator=generator) * latent_scale(vae)


@torch.no_grad()
def decode(vae, latents):
    """Scaled latents -> images in about [-1, 1] (clamp before converting to uint8)."""
    if vae is None:
        return latents
    return vae.decode(latents / latent_scale(vae)).sample


def to_uint8(images):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, with DiT's rounding (x*127.5+128, clamp)."""
    images = torch.clamp(127.5 * images + 128.0, 0, 255)
    return images.permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
