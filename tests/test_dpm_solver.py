"""helpers/sampling/dpm_solver.py on Gaussian data, where the exact epsilon and the exact probability-flow
ODE solution are known in closed form, against the repo's DDIM (diffusion package)."""
import numpy as np
import pytest
import torch

from diffusion import create_diffusion, gaussian_diffusion as gd
from diffusion.respace import SpacedDiffusion
from helpers.utils.cli import JobError
from helpers.sampling.dpm_solver import (check_num_steps, dit_betas, dpm_solver_sample,
                                eps_from_model_output, make_scheduler, model_eps_fn)

MU, S = 0.5, 0.3                                   # data x0 ~ N(MU, S^2) in every dimension
ABAR = torch.tensor(np.cumprod(1.0 - dit_betas()), dtype=torch.float64)


def exact_eps(x, t):
    """eps*(x_t, t) = E[eps | x_t] for Gaussian data under q(x_t | x0)."""
    a = ABAR[t.cpu()].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    return (x - a.sqrt() * MU) * (1 - a).sqrt() / (a * S * S + 1 - a)


def exact_sample(x_T, t_T):
    """The probability-flow ODE from x_T at timestep t_T to t = 0 (an affine map for Gaussians)."""
    a = ABAR[t_T].item()
    return MU + S * (x_T - a ** 0.5 * MU) / (a * S * S + 1 - a) ** 0.5


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def ddim_on(timesteps, x_T):
    """The repo's DDIM (eta 0, no clipping) over the given original timesteps, exact eps."""
    diffusion = SpacedDiffusion(use_timesteps=timesteps, betas=dit_betas(),
                                model_mean_type=gd.ModelMeanType.EPSILON,
                                model_var_type=gd.ModelVarType.LEARNED_RANGE,
                                loss_type=gd.LossType.MSE)
    return ddim_loop(diffusion, x_T)


def ddim_loop(diffusion, x_T):
    def model(x, t):
        return torch.cat([exact_eps(x, t), torch.zeros_like(x)], dim=1)
    with torch.random.fork_rng(devices=[]):        # DiT's DDIM draws (unused) noise per step
        return diffusion.ddim_sample_loop(model, x_T.shape, noise=x_T, clip_denoised=False)


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))


def test_scheduler_is_the_repo_process():
    scheduler = make_scheduler(num_steps=20)
    repo = create_diffusion("")
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), repo.alphas_cumprod, rtol=2e-6)
    assert scheduler.timesteps.tolist() == [999, 949, 899, 849, 799, 749, 699, 649, 599, 549,
                                            500, 450, 400, 350, 300, 250, 200, 150, 100, 50]
    assert scheduler.config.algorithm_type == "dpmsolver++" and not scheduler.config.thresholding


def test_closed_form_target_is_the_ode_limit(x_T):
    """Many solver steps converge to the closed-form affine map (checks the target itself)."""
    fine = dpm_solver_sample(exact_eps, x_T, num_steps=200)
    assert rms(fine, exact_sample(x_T, 999)) < 1e-3


def test_first_order_is_the_repo_ddim_on_the_same_timesteps(x_T):
    grid = make_scheduler(num_steps=20).timesteps.tolist()
    first = dpm_solver_sample(exact_eps, x_T, timesteps=grid, solver_order=1)
    torch.testing.assert_close(first, ddim_on(grid, x_T), rtol=0, atol=2e-5)


def test_twenty_steps_beat_ddim_on_gaussian_data(x_T):
    seen = []

    def eps_fn(x, t):
        seen.append(t.tolist())
        return exact_eps(x, t)

    dpm = dpm_solver_sample(eps_fn, x_T, num_steps=20)
    grid = [ts[0] for ts in seen]
    assert len(seen) == 20 and all(len(set(ts)) == 1 and len(ts) == 4 for ts in seen)
    assert grid[0] == 999 and grid[-1] == 50 and grid == sorted(grid, reverse=True)
    err_dpm = rms(dpm, exact_sample(x_T, 999))
    err_ddim_same_grid = rms(ddim_on(grid, x_T), exact_sample(x_T, 999))
    err_ddim20 = rms(ddim_loop(create_diffusion("ddim20"), x_T), exact_sample(x_T, 950))
    assert err_ddim_same_grid > 0.05 and err_ddim20 > 0.05      # 20 steps are far from exact
    assert err_dpm < 0.75 * err_ddim_same_grid and err_dpm < 0.75 * err_ddim20


def test_sampling_uses_no_global_rng_and_each_row_only_depends_on_its_noise(x_T):
    state = torch.get_rng_state()
    batch = dpm_solver_sample(exact_eps, x_T, num_steps=10)
    assert torch.equal(torch.get_rng_state(), state)
    alone = dpm_solver_sample(exact_eps, x_T[2:3], num_steps=10)
    torch.testing.assert_close(alone, batch[2:3], rtol=0, atol=1e-6)


def test_model_adapter_keeps_the_epsilon_channels():
    out = torch.arange(2 * 6 * 3 * 3, dtype=torch.float32).view(2, 6, 3, 3)
    assert torch.equal(eps_from_model_output(out, 3), out[:, :3])
    assert torch.equal(eps_from_model_output(out, 6), out)
    with pytest.raises(JobError, match=r"^the model outputs 6 channels but the latents have 4: "):
        eps_from_model_output(out, 4)
    calls = []

    def model(x, t, y, cfg_scale):
        calls.append((t.tolist(), y, cfg_scale))
        return torch.cat([x * 2, x * 0 - 1], dim=1)

    eps_fn = model_eps_fn(model, 1, y="labels", cfg_scale=4.0)
    x = torch.ones(2, 1, 2, 2)
    assert torch.equal(eps_fn(x, torch.tensor([7, 7])), 2 * x)
    assert calls == [([7, 7], "labels", 4.0)]


def test_bad_step_count_is_one_line():
    with pytest.raises(JobError, match=r"^--num-sampling-steps 0 does not suit --sampler "
                                       r"dpm-solver: use 1\.\.1000"):
        check_num_steps(0)
