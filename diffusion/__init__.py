"""Gaussian diffusion for DiC / DiT: same public API and numbers as DiT's `diffusion`.

    from diffusion import create_diffusion
    diffusion = create_diffusion(timestep_respacing="")      # training: all 1000 steps
    sampler = create_diffusion("250")                        # 250 evenly spaced steps
    sampler = create_diffusion("ddim50")                     # DDIM stride 20
"""

from . import gaussian_diffusion as gd
from .respace import SpacedDiffusion, space_timesteps


def create_diffusion(
    timestep_respacing,
    noise_schedule="linear",
    use_kl=False,
    sigma_small=False,
    predict_xstart=False,
    learn_sigma=True,
    rescale_learned_sigmas=False,
    diffusion_steps=1000,
):
    """Build the (respaced) diffusion DiT and DiC train and sample with.

    :param timestep_respacing: "" or None for all `diffusion_steps` steps; "250" (or
        "a,b,c" sections) for evenly spaced steps; "ddimN" for DDIM's fixed stride.
    :param noise_schedule: "linear" (DiT/DiC) or "squaredcos_cap_v2".
    :param use_kl: train on the rescaled variational bound alone.
    :param sigma_small: with learn_sigma=False, use the posterior variance instead of beta.
    :param predict_xstart: the model predicts x_0 instead of eps.
    :param learn_sigma: the model outputs 2C channels, the second C interpolating the
        log-variance (LEARNED_RANGE); loss = eps MSE + VB (DiT/DiC default).
    :param rescale_learned_sigmas: scale the VB term by T / 1000 (RESCALED_MSE).
    :param diffusion_steps: T of the base process the model is trained on.
    Note: even with no respacing the result is a SpacedDiffusion over all steps, whose
    betas are recomputed from alpha-bar (they equal the schedule's up to ~1e-16), as in DiT.
    """
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )


__all__ = ["create_diffusion", "gd", "SpacedDiffusion", "space_timesteps"]
