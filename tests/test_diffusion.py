"""Tests of the `diffusion` package against closed forms computed here, independently.

Expected values are built with plain Python / numpy float64 from the formulas in
shared/spec/DIFFUSION.md (DDPM / improved-DDPM), never by calling the code under test.
Fake models (lambdas, tiny callables) keep everything fast on one CPU thread.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from diffusion import create_diffusion, gd, space_timesteps
from diffusion.diffusion_utils import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    normal_kl,
)
from diffusion.gaussian_diffusion import _extract_into_tensor
from diffusion.timestep_sampler import (
    LossSecondMomentResampler,
    UniformSampler,
    create_named_schedule_sampler,
)

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------
# Independent closed forms
# ----------------------------------------------------------------------------

def linear_betas(T):
    """Ho et al.'s linear schedule, scaled by 1000/T, evaluated point by point."""
    scale = 1000 / T
    lo, hi = scale * 1e-4, scale * 0.02
    return [lo + (hi - lo) * i / (T - 1) for i in range(T)]


def alpha_bars(betas):
    out, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        out.append(prod)
    return out


def closed_form_tables(T=1000):
    """Per-step float64 tables from the DDPM formulas (plain Python loops)."""
    b = np.array(linear_betas(T))
    ab = np.array(alpha_bars(b))
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = b * (1 - ab_prev) / (1 - ab)
    clipped = np.log(np.concatenate([[post_var[1]], post_var[1:]]))
    coef1 = b * np.sqrt(ab_prev) / (1 - ab)
    coef2 = (1 - ab_prev) * np.sqrt(1 - b) / (1 - ab)
    return dict(betas=b, abar=ab, abar_prev=ab_prev, post_var=post_var,
                post_logvar_clipped=clipped, coef1=coef1, coef2=coef2)


def section_rule(T, counts, float_accumulate=False):
    """Even spacing by sections: T cut into len(counts) near-equal sections (earlier ones
    one longer), n steps per section at start + round(k (size-1)/(n-1)).

    Exact rational arithmetic by default. DiT adds the float stride k times instead,
    which can land just below an exact .5 tie (e.g. 7 * 99/14 -> 49.4999...);
    float_accumulate=True reproduces that.
    """
    steps, start = [], 0
    for i, n in enumerate(counts):
        size = T // len(counts) + (1 if i < T % len(counts) else 0)
        if float_accumulate:
            stride, pos = ((size - 1) / (n - 1) if n > 1 else 1), 0.0
            for _ in range(n):
                steps.append(start + round(pos))
                pos += stride
        else:
            stride = Fraction(size - 1, n - 1) if n > 1 else Fraction(1)
            steps += [start + round(k * stride) for k in range(n)]
        start += size
    return sorted(set(steps))


def np_approx_cdf(x):
    return 0.5 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_decoder_nll_bits(x0, mean, logvar):
    """-log p(x0) of the discretised Gaussian (bins of width 2/255), mean over dims, bits."""
    inv_std = np.exp(-0.5 * logvar)
    plus = np_approx_cdf(inv_std * (x0 - mean + 1 / 255))
    minus = np_approx_cdf(inv_std * (x0 - mean - 1 / 255))
    p = np.where(x0 < -0.999, plus, np.where(x0 > 0.999, 1 - minus, plus - minus))
    logp = np.log(np.maximum(p, 1e-12))
    return -logp.reshape(len(x0), -1).mean(1) / LN2


def np_kl_bits(m1, lv1, m2, lv2):
    kl = 0.5 * (-1 + lv2 - lv1 + np.exp(lv1 - lv2) + (m1 - m2) ** 2 * np.exp(-lv2))
    return kl.reshape(len(m1), -1).mean(1) / LN2


def f64(t):
    return t.detach().double().numpy()


@pytest.fixture(scope="module")
def full():
    return create_diffusion("")


@pytest.fixture(scope="module")
def tab():
    return closed_form_tables(1000)


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------

def test_linear_betas_and_alpha_bars(full, tab):
    betas = gd.get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(betas, tab["betas"], rtol=1e-13, atol=0)
    # The diffusion object's betas are recomputed from alpha-bar (as in DiT): equal to
    # the schedule up to float64 round-off.
    assert full.num_timesteps == 1000 and full.betas.dtype == np.float64
    np.testing.assert_allclose(full.betas, tab["betas"], rtol=1e-10, atol=0)
    np.testing.assert_allclose(full.alphas_cumprod, tab["abar"], rtol=1e-12, atol=0)
    # Known value of DDPM's linear schedule: abar_999 ~= 4.036e-5.
    assert full.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-4)


@pytest.mark.parametrize("T", [100, 250, 4000])
def test_linear_betas_scale_with_T(T):
    betas = gd.get_named_beta_schedule("linear", T)
    assert betas.shape == (T,)
    assert betas[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-12)
    assert betas[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-12)
    np.testing.assert_allclose(betas, linear_betas(T), rtol=1e-12, atol=0)
    d = create_diffusion("", diffusion_steps=T)
    assert d.num_timesteps == T


def test_cosine_schedule():
    T = 50
    betas = gd.get_named_beta_schedule("squaredcos_cap_v2", T)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    expected = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    np.testing.assert_allclose(betas, expected, rtol=1e-14)
    assert betas[-1] == 0.999  # the cap is active at the end


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosine'"):
        create_diffusion("", noise_schedule="cosine")


# ----------------------------------------------------------------------------
# Forward process
# ----------------------------------------------------------------------------

def test_extract_gathers_float32_shaped_like_input(full):
    t = torch.tensor([0, 10, 999])
    got = _extract_into_tensor(full.sqrt_alphas_cumprod, t, (3, 2, 4, 4))
    assert got.dtype == torch.float32 and got.shape == (3, 2, 4, 4)
    # Indexed in float64, then cast: exactly float32(value).
    want = torch.tensor(full.sqrt_alphas_cumprod[[0, 10, 999]], dtype=torch.float32)
    assert torch.equal(got, want.view(3, 1, 1, 1).expand(3, 2, 4, 4))
    # The cached per-device path gives bit-identical values for every table.
    for name in ["sqrt_alphas_cumprod", "posterior_log_variance_clipped", "posterior_mean_coef2",
                 "sqrt_recipm1_alphas_cumprod", "alphas_cumprod_prev"]:
        a = full._extract(name, t, (3, 2, 4, 4))
        b = _extract_into_tensor(getattr(full, name), t, (3, 2, 4, 4))
        assert torch.equal(a, b), name


def test_q_sample_with_explicit_noise(full, tab):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    noise = torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    got = f64(full.q_sample(x0, t, noise=noise))
    ab = tab["abar"][t.numpy()].reshape(-1, 1, 1, 1)
    want = np.sqrt(ab) * f64(x0) + np.sqrt(1 - ab) * f64(noise)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_q_sample_statistics(full, tab):
    torch.manual_seed(1)
    x0 = torch.full((400, 1, 16, 16), 0.7)  # 102400 draws per timestep
    for step in (50, 300, 900):
        xt = full.q_sample(x0, torch.full((400,), step, dtype=torch.long))
        mean, var = xt.double().mean().item(), xt.double().var().item()
        ab = tab["abar"][step]
        assert mean == pytest.approx(math.sqrt(ab) * 0.7, abs=0.01)
        assert var == pytest.approx(1 - ab, rel=0.02, abs=0.002)


def test_q_sample_rejects_mismatched_noise(full):
    with pytest.raises(ValueError, match="noise shape"):
        full.q_sample(torch.zeros(2, 3, 4, 4), torch.tensor([1, 2]), noise=torch.zeros(2, 3, 4))


# ----------------------------------------------------------------------------
# Posterior and the reverse-process parametrisation
# ----------------------------------------------------------------------------

def test_posterior_tables(full, tab):
    np.testing.assert_allclose(full.posterior_variance, tab["post_var"], rtol=1e-9, atol=1e-300)
    assert full.posterior_variance[0] == 0.0
    # Entry 0 of the clipped log variance is entry 1 (log 0 would be -inf).
    assert full.posterior_log_variance_clipped[0] == full.posterior_log_variance_clipped[1]
    np.testing.assert_allclose(full.posterior_log_variance_clipped, tab["post_logvar_clipped"],
                               rtol=1e-9)
    np.testing.assert_allclose(full.posterior_mean_coef1, tab["coef1"], rtol=1e-9)
    np.testing.assert_allclose(full.posterior_mean_coef2, tab["coef2"], rtol=1e-9)
    # Step 1's posterior variance: beta_1 (1 - abar_0) / (1 - abar_1).
    b0, b1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    assert full.posterior_variance[1] == pytest.approx(b1 * b0 / (1 - (1 - b0) * (1 - b1)), rel=1e-9)


def test_q_posterior_mean_variance(full, tab):
    g = torch.Generator().manual_seed(2)
    x0, xt = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0, 7, 640])
    mean, var, logvar = full.q_posterior_mean_variance(x0, xt, t)
    idx = t.numpy()
    c1, c2 = tab["coef1"][idx].reshape(-1, 1, 1, 1), tab["coef2"][idx].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(f64(mean), c1 * f64(x0) + c2 * f64(xt), atol=2e-6)
    np.testing.assert_allclose(f64(var)[:, 0, 0, 0], tab["post_var"][idx], rtol=1e-6)
    np.testing.assert_allclose(f64(logvar)[:, 0, 0, 0], tab["post_logvar_clipped"][idx], rtol=1e-6)
    assert var.shape == logvar.shape == x0.shape


def test_learned_range_variance_and_x0_from_eps(full, tab):
    g = torch.Generator().manual_seed(3)
    N, C = 4, 2
    x = torch.randn(N, C, 3, 3, generator=g)
    eps = torch.randn(N, C, 3, 3, generator=g)
    v = torch.rand(N, C, 3, 3, generator=g) * 2 - 1  # in [-1, 1]
    t = torch.tensor([0, 1, 333, 999])
    model = lambda x_, t_: torch.cat([eps, v], 1)  # noqa: E731
    out = full.p_mean_variance(model, x, t, clip_denoised=False)

    idx = t.numpy()
    col = lambda a: a[idx].reshape(-1, 1, 1, 1)  # noqa: E731
    frac = (f64(v) + 1) / 2
    logvar = frac * col(np.log(tab["betas"])) + (1 - frac) * col(tab["post_logvar_clipped"])
    np.testing.assert_allclose(f64(out["log_variance"]), logvar, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(out["variance"]), np.exp(logvar), rtol=1e-5)

    ab = col(tab["abar"])
    x0 = np.sqrt(1 / ab) * f64(x) - np.sqrt(1 / ab - 1) * f64(eps)
    np.testing.assert_allclose(f64(out["pred_xstart"]), x0, rtol=1e-5, atol=1e-3)
    # Same as inverting q_sample: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar).
    np.testing.assert_allclose(x0, (f64(x) - np.sqrt(1 - ab) * f64(eps)) / np.sqrt(ab), rtol=1e-9)
    mean = col(tab["coef1"]) * x0 + col(tab["coef2"]) * f64(x)
    np.testing.assert_allclose(f64(out["mean"]), mean, rtol=1e-4, atol=1e-4)

    # clip_denoised clamps the x0 guess to [-1, 1].
    clipped = full.p_mean_variance(model, x, t, clip_denoised=True)["pred_xstart"]
    np.testing.assert_allclose(f64(clipped), np.clip(x0, -1, 1), rtol=1e-5, atol=1e-5)


def test_fixed_variances_without_learn_sigma(tab):
    x = torch.zeros(2, 1, 2, 2)
    t = torch.tensor([0, 500])
    model = lambda x_, t_: torch.zeros_like(x_)  # noqa: E731
    large = create_diffusion("", learn_sigma=False).p_mean_variance(model, x, t)
    small = create_diffusion("", learn_sigma=False, sigma_small=True).p_mean_variance(model, x, t)
    # FIXED_LARGE: beta_t, except t = 0 uses the posterior variance of step 1.
    np.testing.assert_allclose(f64(large["variance"])[:, 0, 0, 0],
                               [tab["post_var"][1], tab["betas"][500]], rtol=1e-6)
    np.testing.assert_allclose(f64(small["variance"])[:, 0, 0, 0],
                               [0.0, tab["post_var"][500]], rtol=1e-6)


def test_wrong_output_channels_is_a_clear_error(full):
    model = lambda x_, t_: torch.zeros_like(x_)  # noqa: E731  (C channels, not 2C)
    with pytest.raises(ValueError, match="2\\*C channels"):
        full.p_mean_variance(model, torch.zeros(2, 4, 2, 2), torch.tensor([1, 2]))


# ----------------------------------------------------------------------------
# Respacing
# ----------------------------------------------------------------------------

def test_respacing_250_matches_section_rule():
    expected = section_rule(1000, [250])
    assert len(expected) == 250 and expected[:4] == [0, 4, 8, 12]
    assert expected[-2:] == [995, 999]
    assert sorted(space_timesteps(1000, "250")) == expected
    d = create_diffusion("250")
    assert d.timestep_map == expected and d.num_timesteps == 250 and d.original_num_steps == 1000


def test_respacing_sections_and_full():
    # 250 of 1000 has no .5 ties, so both arithmetics agree there.
    assert section_rule(1000, [250], float_accumulate=True) == section_rule(1000, [250])
    # Sections of 100: 10, 15 and 20 steps; the 15-step section has a tie at 7 * 99/14 = 49.5
    # that DiT's accumulated float stride rounds down (149), the exact rule up (150).
    got = sorted(space_timesteps(300, "10,15,20"))
    assert got == section_rule(300, [10, 15, 20], float_accumulate=True)
    assert len(got) == 45 and got[:2] == [0, 11] and got[9:11] == [99, 100] and got[-1] == 299
    assert 149 in got and 150 not in section_rule(300, [10, 15, 20], float_accumulate=True)
    assert 150 in section_rule(300, [10, 15, 20])
    assert sorted(space_timesteps(1000, [1000])) == list(range(1000))
    assert create_diffusion("").timestep_map == list(range(1000))
    assert create_diffusion(None).timestep_map == list(range(1000))
    assert sorted(space_timesteps(1000, "10")) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]


def test_respacing_ddim():
    assert sorted(space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
    assert create_diffusion("ddim50").timestep_map == list(range(0, 1000, 20))
    assert sorted(space_timesteps(1000, "ddim10")) == list(range(0, 1000, 100))
    assert sorted(space_timesteps(1000, "ddim250")) == list(range(0, 1000, 4))
    with pytest.raises(ValueError, match=r"exactly 60 steps .* 1000 diffusion steps.*ddim59, ddim63"):
        create_diffusion("ddim60")


@pytest.mark.parametrize("bad", ["ddimx", "fifty", "0", "2000", "ddim0"])
def test_respacing_bad_strings(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000, bad)


def test_respaced_betas_from_kept_alpha_bars(tab):
    d = create_diffusion("10")
    kept = d.timestep_map
    ab = tab["abar"][kept]
    expected = 1 - ab / np.concatenate([[1.0], ab[:-1]])
    np.testing.assert_allclose(d.betas, expected, rtol=1e-9)
    np.testing.assert_allclose(d.alphas_cumprod, ab, rtol=1e-12)
    assert d.betas[0] == pytest.approx(1e-4, rel=1e-9)  # step 0 kept: its own beta


class RecordingModel:
    """Fake learn_sigma model: eps = 0.1 x, v = 0; records the timesteps it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append(t.clone())
        return torch.cat([0.1 * x, torch.zeros_like(x)], 1)


def test_wrapped_model_receives_original_timesteps():
    d = create_diffusion("10")
    model = RecordingModel()
    torch.manual_seed(0)
    d.p_sample_loop(model, (3, 2, 4, 4), clip_denoised=False, model_kwargs=dict(y=torch.zeros(3)))
    assert len(model.calls) == 10
    for t, orig in zip(model.calls, reversed(d.timestep_map)):
        assert t.tolist() == [orig] * 3
    # Training goes through the same mapping: respaced index 5 -> original 555.
    model.calls.clear()
    d.training_losses(model, torch.zeros(2, 2, 4, 4), torch.tensor([5, 9]))
    assert model.calls[0].tolist() == [555, 999]


# ----------------------------------------------------------------------------
# Training loss
# ----------------------------------------------------------------------------

def test_training_losses_mse_plus_vb(full, tab):
    g = torch.Generator().manual_seed(4)
    N, C = 4, 3
    x0 = torch.rand(N, C, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(N, C, 4, 4, generator=g)
    raw = (torch.randn(N, 2 * C, 4, 4, generator=g) * 0.5).requires_grad_(True)
    t = torch.tensor([0, 1, 400, 999])
    seen = {}

    def model(x, t_, **kw):
        seen["x_t"] = x
        return raw * 1.0

    terms = full.training_losses(model, x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    for k in terms:
        assert terms[k].shape == (N,)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"], rtol=0, atol=0)

    eps, v = f64(raw[:, :C]), f64(raw[:, C:])
    np.testing.assert_allclose(f64(terms["mse"]), ((f64(noise) - eps) ** 2).reshape(N, -1).mean(1),
                               rtol=1e-6)

    # vb by hand: model N(mean, exp(logvar)) vs the true posterior; decoder NLL at t = 0.
    idx = t.numpy()
    col = lambda a: a[idx].reshape(-1, 1, 1, 1)  # noqa: E731
    ab = col(tab["abar"])
    xt = np.sqrt(ab) * f64(x0) + np.sqrt(1 - ab) * f64(noise)
    np.testing.assert_allclose(f64(seen["x_t"]), xt, atol=2e-6)
    x0_hat = np.sqrt(1 / ab) * xt - np.sqrt(1 / ab - 1) * eps
    mean = col(tab["coef1"]) * x0_hat + col(tab["coef2"]) * xt
    frac = (v + 1) / 2
    logvar = frac * col(np.log(tab["betas"])) + (1 - frac) * col(tab["post_logvar_clipped"])
    true_mean = col(tab["coef1"]) * f64(x0) + col(tab["coef2"]) * xt
    kl = np_kl_bits(true_mean, col(tab["post_logvar_clipped"]) + 0 * xt, mean, logvar)
    nll = np_decoder_nll_bits(f64(x0), mean, logvar)
    vb = f64(terms["vb"])
    assert vb[0] == pytest.approx(nll[0], rel=2e-3)  # t = 0: decoder NLL
    assert vb[0] != pytest.approx(kl[0], rel=0.1)
    np.testing.assert_allclose(vb[1:], kl[1:], rtol=2e-3, atol=1e-6)  # t > 0: KL in bits

    # vb sees eps detached: its gradient reaches only the variance channels.
    grad_vb, = torch.autograd.grad(terms["vb"].sum(), raw, retain_graph=True)
    assert torch.count_nonzero(grad_vb[:, :C]) == 0
    assert torch.count_nonzero(grad_vb[:, C:]) > 0
    grad_mse, = torch.autograd.grad(terms["mse"].sum(), raw)
    assert torch.count_nonzero(grad_mse[:, C:]) == 0


def test_training_losses_without_learned_sigma():
    d = create_diffusion("", learn_sigma=False)
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([3, 4]), noise=noise)
    assert set(terms) == {"loss", "mse"}
    assert terms["loss"].tolist() == [1.0, 1.0]


def test_rescaled_kl_loss_is_T_times_vb(full):
    kl = create_diffusion("", use_kl=True)
    torch.manual_seed(5)
    raw = torch.randn(2, 4, 2, 2)
    x0, noise, t = torch.zeros(2, 2, 2, 2), torch.randn(2, 2, 2, 2), torch.tensor([10, 20])
    model = lambda x, t_: raw  # noqa: E731
    loss = kl.training_losses(model, x0, t, noise=noise)["loss"]
    x_t = full.q_sample(x0, t, noise=noise)
    vb = full._vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
    torch.testing.assert_close(loss, vb * 1000)


# ----------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------

def test_p_sample_one_step_by_hand(full, tab):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 4, 4, generator=g)
    eps, v = torch.randn(3, 2, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([600, 1, 0])
    model = lambda x_, t_: torch.cat([eps, v], 1)  # noqa: E731  (draws no random numbers)

    torch.manual_seed(123)
    out = full.p_sample(model, x, t, clip_denoised=False)
    torch.manual_seed(123)
    z = torch.randn_like(x)  # the one draw p_sample makes

    idx = t.numpy()
    col = lambda a: a[idx].reshape(-1, 1, 1, 1)  # noqa: E731
    ab = col(tab["abar"])
    x0 = np.sqrt(1 / ab) * f64(x) - np.sqrt(1 / ab - 1) * f64(eps)
    mean = col(tab["coef1"]) * x0 + col(tab["coef2"]) * f64(x)
    frac = (f64(v) + 1) / 2
    logvar = frac * col(np.log(tab["betas"])) + (1 - frac) * col(tab["post_logvar_clipped"])
    mask = (idx != 0).reshape(-1, 1, 1, 1)
    want = mean + mask * np.exp(0.5 * logvar) * f64(z)
    np.testing.assert_allclose(f64(out["sample"]), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f64(out["sample"][2]), mean[2], rtol=1e-5, atol=1e-5)  # t=0: mean
    np.testing.assert_allclose(f64(out["pred_xstart"]), x0, rtol=1e-5, atol=1e-3)


def _hand_ddpm_loop(d, tab, shape, seed, a=0.1):
    """The DDPM chain for the model eps = a x, v = 0, with DiT's random-draw order."""
    torch.manual_seed(seed)
    x = f64(torch.randn(*shape))
    kept = np.array(d.timestep_map)
    ab = tab["abar"][kept]
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    b = 1 - ab / ab_prev
    post_var = b * (1 - ab_prev) / (1 - ab)
    logvar_min = np.log(np.concatenate([[post_var[1]], post_var[1:]]))  # v = 0: frac 1/2
    logvar = 0.5 * np.log(b) + 0.5 * logvar_min
    for i in reversed(range(len(kept))):
        x0 = (x - np.sqrt(1 - ab[i]) * a * x) / np.sqrt(ab[i])
        mean = (b[i] * np.sqrt(ab_prev[i]) * x0 + (1 - ab_prev[i]) * np.sqrt(1 - b[i]) * x) / (1 - ab[i])
        z = f64(torch.randn(shape))  # drawn at every step, also at t = 0
        x = mean + (i != 0) * np.exp(0.5 * logvar[i]) * z
    return x


def test_p_sample_loop_respaced_matches_hand_chain(tab):
    d = create_diffusion("10")
    shape = (2, 2, 3, 3)
    model = RecordingModel()
    torch.manual_seed(7)
    out = d.p_sample_loop(model, shape, clip_denoised=False)
    assert out.shape == shape and out.dtype == torch.float32
    assert len(model.calls) == 10
    np.testing.assert_allclose(f64(out), _hand_ddpm_loop(d, tab, shape, seed=7), rtol=1e-4, atol=1e-4)
    # Same seed -> same samples; another seed -> different samples.
    torch.manual_seed(7)
    assert torch.equal(d.p_sample_loop(RecordingModel(), shape, clip_denoised=False), out)
    torch.manual_seed(8)
    assert not torch.allclose(d.p_sample_loop(RecordingModel(), shape, clip_denoised=False), out)


def test_progressive_yields_every_step():
    d = create_diffusion("10")
    torch.manual_seed(0)
    outs = list(d.p_sample_loop_progressive(RecordingModel(), [2, 1, 2, 2]))
    assert len(outs) == 10 and set(outs[0]) == {"sample", "pred_xstart"}
    torch.manual_seed(0)
    assert torch.equal(d.p_sample_loop(RecordingModel(), [2, 1, 2, 2]), outs[-1]["sample"])


def test_ddim_loop_eta0_is_deterministic_given_start_noise(tab):
    d = create_diffusion("ddim10")
    shape = (2, 2, 3, 3)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    model = RecordingModel()
    torch.manual_seed(1)
    a = d.ddim_sample_loop(model, shape, noise=noise.clone(), clip_denoised=False)
    assert len(model.calls) == 10 and a.shape == shape
    assert [c[0].item() for c in model.calls] == list(range(900, -1, -100))
    torch.manual_seed(2)  # later draws differ, but eta = 0 ignores them
    b = d.ddim_sample_loop(RecordingModel(), shape, noise=noise.clone(), clip_denoised=False)
    assert torch.equal(a, b)

    # Closed form for eps = 0.1 x: x0 = (x - sqrt(1-ab) eps)/sqrt(ab); x' = sqrt(ab') x0 + sqrt(1-ab') eps.
    ab = tab["abar"][d.timestep_map]
    x = f64(noise)
    for i in reversed(range(10)):
        eps = 0.1 * x
        x0 = (x - np.sqrt(1 - ab[i]) * eps) / np.sqrt(ab[i])
        ab_prev = ab[i - 1] if i > 0 else 1.0
        x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev) * eps
    np.testing.assert_allclose(f64(a), x, rtol=1e-4, atol=1e-4)

    # eta = 1 uses the draws: different seeds give different samples.
    torch.manual_seed(1)
    c = d.ddim_sample_loop(RecordingModel(), shape, noise=noise.clone(), eta=1.0, clip_denoised=False)
    torch.manual_seed(2)
    e = d.ddim_sample_loop(RecordingModel(), shape, noise=noise.clone(), eta=1.0, clip_denoised=False)
    assert not torch.allclose(c, e)


class NetWrapper(torch.nn.Module):
    """A module model(x, t): its parameters tell the sampler the device."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x)


def test_sampling_device_fallbacks():
    d = create_diffusion("ddim10")
    net = torch.nn.Conv2d(1, 2, 1)
    torch.manual_seed(0)
    # A callable without parameters (DiT would fail here): the device of noise, else CPU.
    out = d.ddim_sample_loop(lambda x, t: net(x), (1, 1, 2, 2), device=None)
    assert out.device.type == "cpu" and out.shape == (1, 1, 2, 2)
    # A module: its parameters decide the device when none is given (DiT's rule).
    out = d.ddim_sample_loop(NetWrapper(net), (1, 1, 2, 2))
    assert out.device.type == "cpu" and out.shape == (1, 1, 2, 2)


# ----------------------------------------------------------------------------
# Likelihood helpers and the bpd loop
# ----------------------------------------------------------------------------

def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    want = math.log(math.sqrt(2.0) / math.sqrt(0.5)) + (0.5 + 0.5 ** 2) / (2 * 2.0) - 0.5
    got = normal_kl(torch.tensor(m1), lv1, m2, lv2)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert normal_kl(torch.zeros(3), 0.0, 0.0, 0.0).tolist() == [0.0, 0.0, 0.0]


def test_approx_cdf_and_discretized_likelihood_sum_to_one():
    x = torch.linspace(-4, 4, 81, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (approx_standard_normal_cdf(x) - exact).abs().max() < 3e-4  # tanh approximation
    # Over all 256 pixel bins the probabilities of a Gaussian sum to 1.
    bins = (torch.arange(256, dtype=torch.float64) / 127.5 - 1).view(256, 1)
    means, log_scales = torch.full_like(bins, 0.1), torch.full_like(bins, math.log(0.3))
    logp = discretized_gaussian_log_likelihood(bins, means=means, log_scales=log_scales)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_prior_and_calc_bpd_loop(tab):
    d = create_diffusion("4")
    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(10)) * 2 - 1
    prior = d._prior_bpd(x0)
    ab = tab["abar"][999]
    m, var = math.sqrt(ab) * f64(x0), 1 - ab
    want = (0.5 * (-1 - math.log(var) + var + m ** 2)).reshape(2, -1).mean(1) / LN2
    np.testing.assert_allclose(f64(prior), want, rtol=1e-4, atol=1e-9)

    model = RecordingModel()
    torch.manual_seed(0)
    out = d.calc_bpd_loop(model, x0, clip_denoised=False)
    assert len(model.calls) == 4
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (2, 4)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])


# ----------------------------------------------------------------------------
# Timestep samplers
# ----------------------------------------------------------------------------

def test_timestep_samplers(full):
    s = create_named_schedule_sampler("uniform", full)
    assert isinstance(s, UniformSampler)
    np.random.seed(0)
    ts, w = s.sample(16, "cpu")
    assert ts.shape == (16,) and ts.dtype == torch.int64 and (w == 1).all()
    assert 0 <= ts.min() and ts.max() < 1000

    d = create_diffusion("4")
    r = create_named_schedule_sampler("loss-second-moment", d)
    assert isinstance(r, LossSecondMomentResampler)
    assert r.weights().tolist() == [1.0] * 4  # uniform until warmed up
    for _ in range(10):
        r.update_with_all_losses([0, 1, 2, 3], [1.0, 1.0, 2.0, 4.0])
    w = r.weights()
    expected = np.array([1, 1, 2, 4]) / 8 * (1 - 0.001) + 0.001 / 4
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown schedule sampler"):
        create_named_schedule_sampler("nope", d)
