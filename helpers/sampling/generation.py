"""From a built model to images: the guided model call and the reverse process for the resolved
settings, latents for an IndexNoise's rows, decoded and turned into uint8 RGB.

    model_fn, sampler = make_sampling(model, vae, objective_config, sampler_settings, speed)
    images = generate(model, vae, sampler, model_fn, noise, labels, image_size, device)   # ~[-1, 1]
"""
from helpers.data.vae import decode, downsample_factor, to_uint8
from helpers.sampling.guidance import make_model_fn
from helpers.sampling.samplers import ReverseProcess


def clips_denoised(vae):
    """Whether the predicted x_0 is clipped to [-1, 1] at every step: yes for a pixel-space model,
    as ADM does for pixel models (images lie in [-1, 1]); no for latents, as DiT (latents are not
    bounded by 1). `vae`: the loaded VAE (None in pixel space) or the resolved --vae setting."""
    return vae is None or (isinstance(vae, str) and vae.lower() == "none")


def make_sampling(model, vae, objective_config, settings, speed):
    """(model_fn, sampler) for the resolved settings (helpers.sampling.samplers.SamplerSettings) of the
    checkpoint's objective: the guided model call and the reverse process. `speed`: make_model_fn's
    fast-path keyword arguments. REPA's samplers (rf) guide themselves, as REPA's code does (they
    decide where from their float64 time grid), so their model_fn is the plain call."""
    name = objective_config["name"]
    interval = (settings.guidance_low, settings.guidance_high) if name == "sit" else None
    cfg_scale = 1.0 if name == "rf" else settings.cfg_scale
    model_fn = make_model_fn(model, cfg_scale, settings.guide_channels, **speed, guidance_interval=interval)
    sampler = ReverseProcess(settings, objective_config, model.in_channels, clip_denoised=clips_denoised(vae),
                             null_label=model.num_classes)
    return model_fn, sampler


def latent_shape(model, vae, image_size):
    """(C, H, W) of the model's input for images of side `image_size`."""
    size = image_size // downsample_factor(vae)
    return (model.in_channels, size, size)


def generate(model, vae, sampler, model_fn, noise, labels, image_size, device, progress=False):
    """Latents for `noise`'s indices from `sampler` (helpers.sampling.samplers.ReverseProcess), decoded to
    images of side `image_size` in about [-1, 1]: (N, C_img, H, W)."""
    latents = sampler(model_fn, noise, labels, latent_shape(model, vae, image_size), device, progress)
    return decode(vae, latents)


def to_uint8_rgb(images):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8 numpy with DiT's rounding (helpers.data.vae.to_uint8);
    grey repeated to RGB, as the .npz batches of the metrics are RGB."""
    images = to_uint8(images)
    if images.shape[-1] == 1:
        images = images.repeat(1, 1, 1, 3)
    return images.numpy()
