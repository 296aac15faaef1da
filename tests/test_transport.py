"""Tests of the `transport` package (SiT's flow matching) against closed forms computed here.

Paths are written out independently from shared/spec/SIT.md (t = 0 noise, t = 1 data).
For Gaussian data x1 ~ N(mu, diag(s^2)) every path x_t = a x1 + b x0 is Gaussian with mean
m = a mu and variance V = a^2 s^2 + b^2, so the exact velocity E[x1' - x0' | x_t = x] =
a' mu + (a a' s^2 + b b') / V (x - m), score -(x - m) / V and noise b (x - m) / V are known;
the probability-flow map keeps (x - m) / sqrt(V) fixed. Fake "models" return these fields.
All float64, tiny shapes: the file runs in a few seconds on one thread.
"""
import math

import pytest
import torch

from transport import ModelType, PathType, Sampler, WeightType, create_transport
from transport.integrators import per_sample_noise

DT = torch.float64
PATHS = ["Linear", "GVP", "VP"]
PREDICTIONS = ["velocity", "noise", "score"]


def coeffs(path, t):
    """(a, a', b, b') of x_t = a x1 + b x0, written out from SIT.md."""
    t = torch.as_tensor(t, dtype=DT)
    if path == "Linear":
        return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
    if path == "GVP":
        h = math.pi / 2
        return torch.sin(h * t), h * torch.cos(h * t), torch.cos(h * t), -h * torch.sin(h * t)
    # VP: sigma_min 0.1, sigma_max 20
    lm = -0.25 * (1 - t) ** 2 * 19.9 - 0.5 * (1 - t) * 0.1
    dlm = 0.5 * (1 - t) * 19.9 + 0.05
    a = torch.exp(lm)
    b = torch.sqrt(1 - a ** 2)
    return a, a * dlm, b, -a * a * dlm / b


def gauss(path, x, t, mu, s):
    """(m_t, V_t, velocity, score, noise) of N(mu, s^2) data on `path`, at x of shape (B, D)."""
    a, da, b, db = coeffs(path, t.to(DT).reshape(-1, *[1] * (x.dim() - 1)))
    m, V = a * mu, a ** 2 * s ** 2 + b ** 2
    v = da * mu + (a * da * s ** 2 + b * db) / V * (x - m)
    return m, V, v, -(x - m) / V, b * (x - m) / V


def exact_model(path, prediction, mu, s):
    """A 'network' predicting the exact field of Gaussian data (what a perfect model learns)."""
    index = {"velocity": 2, "score": 3, "noise": 4}[prediction]
    return lambda x, t: gauss(path, x, t, mu, s)[index].to(x.dtype)


MU2 = torch.tensor([0.7, -1.2], dtype=DT)
S2 = torch.tensor([0.5, 1.5], dtype=DT)


# ------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("path", PATHS)
def test_plan_matches_closed_form_and_ut_is_dxt_dt(path):
    plan = create_transport(path).path_sampler
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 3, generator=g, dtype=DT), torch.randn(4, 3, generator=g, dtype=DT)
    t = torch.tensor([0.1, 0.35, 0.6, 0.9], dtype=DT)
    h = 1e-6
    _, xt, ut = plan.plan(t, x0, x1)
    a, _, b, _ = coeffs(path, t[:, None])
    torch.testing.assert_close(xt, a * x1 + b * x0, rtol=1e-12, atol=1e-12)
    fd = (plan.plan(t + h, x0, x1)[1] - plan.plan(t - h, x0, x1)[1]) / (2 * h)
    torch.testing.assert_close(ut, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", PATHS)
def test_conversions_between_velocity_score_noise(path):
    plan = create_transport(path).path_sampler
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=DT)
    _, _, v, score, noise = gauss(path, x, t, MU2, S2)
    torch.testing.assert_close(plan.get_score_from_velocity(v, x, t), score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(plan.get_noise_from_velocity(v, x, t), noise, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(plan.get_velocity_from_score(score, x, t), v, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- eps defaults
# (path, prediction) -> (train_eps, sample_eps, training [t0, t1], ODE sampling [t0, t1])
EPS_TABLE = {
    ("Linear", "velocity"): (0, 0, (0, 1), (0, 1)),
    ("GVP", "velocity"): (0, 0, (0, 1), (0, 1)),
    ("VP", "velocity"): (1e-5, 1e-3, (0, 1 - 1e-5), (0, 1 - 1e-3)),
}
for _p in ["Linear", "GVP"]:
    for _q in ["noise", "score"]:
        EPS_TABLE[(_p, _q)] = (1e-3, 1e-3, (1e-3, 1 - 1e-3), (1e-3, 1 - 1e-3))
for _q in ["noise", "score"]:
    EPS_TABLE[("VP", _q)] = (1e-5, 1e-3, (0, 1 - 1e-5), (0, 1 - 1e-3))


@pytest.mark.parametrize("path,prediction", sorted(EPS_TABLE))
def test_eps_defaults_table(path, prediction):
    tr = create_transport(path, prediction)
    train_eps, sample_eps, train_iv, sample_iv = EPS_TABLE[(path, prediction)]
    assert (tr.train_eps, tr.sample_eps) == (train_eps, sample_eps)
    assert tr.check_interval(tr.train_eps, tr.sample_eps) == pytest.approx(train_iv)
    assert tr.check_interval(tr.train_eps, tr.sample_eps, eval=True) == pytest.approx(sample_iv)
    assert tr.model_type == {"velocity": ModelType.VELOCITY, "noise": ModelType.NOISE,
                             "score": ModelType.SCORE}[prediction]
    assert tr.loss_type == WeightType.NONE


def test_eps_quirks_kept_from_sit():
    # sample_eps defaults only when train_eps is None: passing train_eps alone leaves it None
    assert create_transport("VP", train_eps=1e-4).sample_eps is None
    assert create_transport("Linear", "noise", train_eps=1e-2).sample_eps is None
    tr = create_transport("GVP", "score", train_eps=1e-2, sample_eps=2e-2)
    assert (tr.train_eps, tr.sample_eps) == (1e-2, 2e-2)
    # velocity on Linear/GVP ignores given eps
    tr = create_transport("Linear", "velocity", train_eps=0.1, sample_eps=0.2)
    assert (tr.train_eps, tr.sample_eps) == (0, 0)
    # SDE interval: SBDM starts at eps even for velocity; last step moves t1
    tr = create_transport("Linear", "noise")
    assert tr.check_interval(0, 1e-3, sde=True, eval=True, last_step_size=0.04) == pytest.approx((1e-3, 0.96))
    assert tr.check_interval(0, 1e-3, eval=True, reverse=True) == pytest.approx((1 - 1e-3, 1e-3))
    assert create_transport("VP").path_sampler.__class__.__name__ == "VPCPlan"
    assert PathType.GVP.name == "GVP"


# ------------------------------------------------------------------------------- losses
T_HAND = torch.tensor([0.25, 0.5], dtype=DT)
X0_HAND = torch.tensor([[1.0, -1.0], [0.0, 2.0]], dtype=DT)
X1_HAND = torch.tensor([[2.0, 0.0], [1.0, -1.0]], dtype=DT)
OUT_HAND = torch.tensor([[0.5, 0.0], [1.0, 1.0]], dtype=DT)


class Recorder:
    """Fake model: records its inputs and returns a fixed output."""

    def __init__(self, out):
        self.out, self.calls = out, []

    def __call__(self, x, t, **kw):
        self.calls.append((x.clone(), t.clone(), kw))
        return self.out.clone()


def test_velocity_loss_hand_case():
    tr = create_transport("Linear", "velocity")
    model = Recorder(OUT_HAND)
    terms = tr.training_losses(model, X1_HAND, dict(y=3), noise=X0_HAND, t=T_HAND)
    xt, t, kw = model.calls[0]
    torch.testing.assert_close(xt, torch.tensor([[1.25, -0.75], [0.5, 0.5]], dtype=DT))
    torch.testing.assert_close(t, T_HAND)
    assert kw == dict(y=3)
    # u_t = x1 - x0 = [[1, 1], [1, -3]]; mean of (out - u)^2 per sample
    torch.testing.assert_close(terms["loss"], torch.tensor([(0.25 + 1) / 2, (0 + 16) / 2], dtype=DT))
    torch.testing.assert_close(terms["pred"], OUT_HAND)


# Linear at t = 1/4: sigma 3/4, drift_var (1/t) sigma^2 - sigma d_sigma = 9/4 + 3/4 = 3;
# at t = 1/2: sigma 1/2, drift_var 1/2 + 1/2 = 1. Weights: velocity (drift_var/sigma)^2 =
# 16, 4; likelihood drift_var / sigma^2 = 16/3, 4.
# noise MSE (out - x0)^2: (0.25 + 1)/2 = 0.625, (1 + 1)/2 = 1.
# score MSE (out sigma + x0)^2: (1.375^2 + 1)/2 = 1.4453125, (0.25 + 6.25)/2 = 3.25.
HAND = {
    ("noise", None): [0.625, 1.0],
    ("noise", "velocity"): [16 * 0.625, 4 * 1.0],
    ("noise", "likelihood"): [16 / 3 * 0.625, 4 * 1.0],
    ("score", None): [1.4453125, 3.25],
    ("score", "velocity"): [16 * 1.4453125, 4 * 3.25],
    ("score", "likelihood"): [16 / 3 * 1.4453125, 4 * 3.25],
}


@pytest.mark.parametrize("prediction,weight", sorted(HAND, key=str))
def test_noise_score_loss_weights_hand_case(prediction, weight):
    tr = create_transport("Linear", prediction, loss_weight=weight)
    terms = tr.training_losses(Recorder(OUT_HAND), X1_HAND, noise=X0_HAND, t=T_HAND)
    torch.testing.assert_close(terms["loss"], torch.tensor(HAND[(prediction, weight)], dtype=DT))


@pytest.mark.parametrize("path", ["GVP", "VP"])
@pytest.mark.parametrize("weight", [None, "velocity", "likelihood"])
def test_loss_weights_other_paths(path, weight):
    a, da, b, db = coeffs(path, T_HAND[:, None])
    drift_var = 0.5 * (0.1 + (1 - T_HAND[:, None]) * 19.9) if path == "VP" else da / a * b ** 2 - b * db
    w = {None: 1.0, "velocity": (drift_var / b) ** 2, "likelihood": drift_var / b ** 2}[weight]
    for prediction, err in [("noise", OUT_HAND - X0_HAND), ("score", OUT_HAND * b + X0_HAND)]:
        tr = create_transport(path, prediction, loss_weight=weight)
        loss = tr.training_losses(Recorder(OUT_HAND), X1_HAND, noise=X0_HAND, t=T_HAND)["loss"]
        torch.testing.assert_close(loss, (w * err ** 2).mean(1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_default_draws_x0_first_then_t(prediction):
    tr = create_transport("Linear", prediction)
    x1 = torch.randn(3, 2, 2, dtype=DT)
    model = lambda x, t: x * t[:, None, None] + 0.3  # noqa: E731 (depends on both x_t and t)
    torch.manual_seed(123)
    x0 = torch.randn_like(x1)
    t0, t1 = (0.0, 1.0) if prediction == "velocity" else (1e-3, 1 - 1e-3)
    t = (torch.rand((3,)) * (t1 - t0) + t0).to(x1)
    want = tr.training_losses(model, x1, noise=x0, t=t)["loss"]
    torch.manual_seed(123)
    got = tr.training_losses(model, x1)["loss"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the order matters: drawing t first would give other numbers
    torch.manual_seed(123)
    t_first = (torch.rand((3,)) * (t1 - t0) + t0).to(x1)
    other = tr.training_losses(model, x1, noise=torch.randn_like(x1), t=t_first)["loss"]
    assert not torch.allclose(other, got)
    # by hand from the seeded draws (Linear path, no weight)
    tt = t[:, None, None]
    xt = tt * x1 + (1 - tt) * x0
    out = xt * tt + 0.3
    err = {"velocity": out - (x1 - x0), "noise": out - x0, "score": out * (1 - tt) + x0}[prediction]
    torch.testing.assert_close(got, (err ** 2).mean((1, 2)), rtol=1e-12, atol=1e-12)


def test_same_seed_same_loss_and_passed_draws_leave_default_rng_alone():
    tr = create_transport("GVP", "noise", loss_weight="likelihood")
    x1 = torch.randn(4, 3)
    model = lambda x, t: 0.5 * x  # noqa: E731
    torch.manual_seed(7)
    a = tr.training_losses(model, x1)["loss"]
    torch.manual_seed(7)
    b = tr.training_losses(model, x1)["loss"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # passing noise and t draws nothing from the default generator
    torch.manual_seed(7)
    tr.training_losses(model, x1, noise=torch.zeros_like(x1), t=torch.full((4,), 0.5))
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(3))


# ----------------------------------------------------------------------------- ODE
def flow_map(path, x, ta, tb, mu, s):
    """Exact probability-flow map of Gaussian data from time ta to tb."""
    ta, tb = torch.full((x.size(0),), ta, dtype=DT), torch.full((x.size(0),), tb, dtype=DT)
    ma, Va = gauss(path, x, ta, mu, s)[:2]
    mb, Vb = gauss(path, x, tb, mu, s)[:2]
    return mb + torch.sqrt(Vb / Va) * (x - ma)


def ode_error(method, num_steps, z):
    sampler = Sampler(create_transport("Linear", "velocity"))
    x = sampler.sample_ode(sampling_method=method, num_steps=num_steps)(z, exact_model("Linear", "velocity", MU2, S2))
    assert sampler.last_nfe == {"euler": 1, "heun2": 2}[method] * (num_steps - 1)
    return (x[-1] - flow_map("Linear", z, 0.0, 1.0, MU2, S2)).abs().max().item()


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun2", 2)])
def test_fixed_step_ode_converges_at_its_order(method, order):
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    errs = [ode_error(method, n + 1, z) for n in (20, 40, 80)]  # 20, 40, 80 steps
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    for r in ratios:
        assert 0.85 * 2 ** order < r < 1.15 * 2 ** order, (errs, ratios)


@pytest.mark.parametrize("path,prediction", [("Linear", "velocity"), ("Linear", "noise"), ("GVP", "score"),
                                             ("GVP", "velocity"), ("VP", "velocity"), ("VP", "noise")])
def test_ode_reaches_exact_flow_map(path, prediction):
    # dopri5 steps past the last grid time and interpolates back; VP's sigma_t is undefined
    # past t = 1 (NaN in the plan, as in SiT, and in the exact field), so VP uses rk4.
    method, num_steps, tol = ("rk4", 201, 1e-5) if path == "VP" else ("dopri5", 3, 1e-6)
    sampler = Sampler(create_transport(path, prediction))
    t0, t1 = sampler.transport.check_interval(sampler.transport.train_eps, sampler.transport.sample_eps, eval=True)
    model = exact_model(path, prediction, MU2, S2)
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=DT)
    traj = sampler.sample_ode(sampling_method=method, num_steps=num_steps, atol=1e-10, rtol=1e-10)(z, model)
    assert traj.shape == (num_steps, 16, 2) and sampler.last_nfe > 0
    torch.testing.assert_close(traj[-1], flow_map(path, z, t0, t1, MU2, S2), rtol=tol, atol=tol)
    if path != "VP":  # reverse=True integrates the same drift from t1 back to t0 (data -> noise)
        back = sampler.sample_ode(num_steps=2, atol=1e-10, rtol=1e-10, reverse=True)
        torch.testing.assert_close(back(traj[-1], model)[-1], z, rtol=1e-6, atol=1e-6)


def test_nfe_counts():
    sampler = Sampler(create_transport("Linear", "velocity"))
    model = exact_model("Linear", "velocity", MU2, S2)
    z = torch.randn(4, 2, dtype=DT)
    for n in (2, 5, 17):
        sampler.sample_ode(sampling_method="euler", num_steps=n)(z, model)
        assert sampler.last_nfe == n - 1
    sampler.sample_ode()(z, model)
    assert isinstance(sampler.last_nfe, int) and sampler.last_nfe > 0


def test_ode_likelihood_of_gaussian_data():
    # Rademacher Hutchinson eps^T J eps is exact when J is diagonal (eps_i^2 = 1), and the
    # exact field of independent dimensions has a diagonal Jacobian: the only error left is
    # dopri5's, held at 1e-9 here, so 1e-6 on log p is generous.
    sampler = Sampler(create_transport("Linear", "velocity"))
    x = MU2 + S2 * torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=DT)
    logp, z = sampler.sample_ode_likelihood(atol=1e-9, rtol=1e-9)(x, exact_model("Linear", "velocity", MU2, S2))
    want = (-0.5 * ((x - MU2) / S2) ** 2 - torch.log(S2) - 0.5 * math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(logp, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, (x - MU2) / S2, rtol=1e-6, atol=1e-6)  # data -> its noise
    assert sampler.last_nfe > 0


# ----------------------------------------------------------------------------- SDE
MU1, S1 = torch.tensor([0.7], dtype=DT), torch.tensor([0.5], dtype=DT)


def chain_moments(method, ts, mu, s, path="Linear"):
    """Exact mean/variance of the discrete Euler-Maruyama/Heun chain for Gaussian data
    (all maps are affine in 1-D), to bound the discretisation bias of the sampler test."""
    def f(x, t):  # SDE drift v + w score with w = sigma_t (form "sigma", norm 1)
        _, _, v, score, _ = gauss(path, x, t.reshape(1), mu, s)
        return v + coeffs(path, t)[2] * score

    M, P = torch.zeros(1, 1, dtype=DT), torch.ones(1, 1, dtype=DT)
    for i in range(len(ts) - 1):
        t, dt = ts[i], ts[i + 1] - ts[i]
        w = coeffs(path, t)[2]
        if method == "Euler":
            step = lambda x: x + dt * f(x, t)  # noqa: E731
            B = step(torch.zeros(1, 1, dtype=DT))
            A = step(torch.ones(1, 1, dtype=DT)) - B
            M, P = A * M + B, A ** 2 * P + 2 * w * dt
        else:  # Heun: noise first, then the trapezoidal drift step from x_hat
            def step(x):
                k1 = f(x, t)
                return x + 0.5 * dt * (k1 + f(x + dt * k1, t + dt))
            B = step(torch.zeros(1, 1, dtype=DT))
            A = step(torch.ones(1, 1, dtype=DT)) - B
            M, P = A * M + B, A ** 2 * (P + 2 * w * dt)
    return M.item(), P.item()


@pytest.mark.parametrize("method", ["Euler", "Heun"])
def test_sde_samples_match_data_moments(method):
    # Linear velocity, w = sigma_t, no last step: the grid runs over all of [0, 1]. The
    # chain's exact bias (chain_moments) is ~2e-4 (Euler, 1000 steps) and ~1e-4 (Heun, 250
    # steps) on the variance, < 0.1 of its standard error 2.5e-3; zero on the mean.
    n, num_steps = 20000, {"Euler": 1000, "Heun": 250}[method]
    sampler = Sampler(create_transport("Linear", "velocity"))
    fn = sampler.sample_sde(sampling_method=method, diffusion_form="sigma", last_step=None, num_steps=num_steps)
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=DT)
    xs = fn(z, exact_model("Linear", "velocity", MU1, S1), generator=torch.Generator().manual_seed(1))
    assert len(xs) == num_steps
    x = xs[-1].squeeze(1)
    mean, var = x.mean().item(), x.var().item()
    se_mean, se_var = S1.item() / math.sqrt(n), S1.item() ** 2 * math.sqrt(2 / (n - 1))
    # the chain's own bias at these settings is far below the sampling error
    cm, cv = chain_moments(method, torch.linspace(0, 1, num_steps, dtype=DT), MU1, S1)
    assert abs(cm - MU1.item()) < 0.1 * se_mean and abs(cv - S1.item() ** 2) < 0.1 * se_var, (cm, cv)
    assert abs(mean - MU1.item()) < 3 * se_mean, (mean, se_mean)
    assert abs(var - S1.item() ** 2) < 3 * se_var, (var, se_var)


def test_sde_same_seed_same_sample_and_per_sample_noise():
    sampler = Sampler(create_transport("Linear", "noise"))
    model = exact_model("Linear", "noise", MU2, S2)
    fn = sampler.sample_sde(num_steps=20)  # SiT defaults otherwise: Euler, SBDM, Mean 0.04
    z = torch.randn(3, 2, dtype=DT)
    torch.manual_seed(11)
    a = fn(z, model)[-1]
    torch.manual_seed(11)
    b = fn(z, model)[-1]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # default noise is torch.randn(x.size()) on the default generator: same as passing it
    torch.manual_seed(11)
    c = fn(z, model, generator=lambda shape: torch.randn(shape))[-1]
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    # one generator per sample: a row's result does not depend on its batch-mates
    full = fn(z, model, generator=per_sample_noise([torch.Generator().manual_seed(i) for i in (0, 1, 2)]))[-1]
    alone = fn(z[1:2], model, generator=per_sample_noise([torch.Generator().manual_seed(1)]))[-1]
    torch.testing.assert_close(full[1:2], alone, rtol=0, atol=0)
    g1 = fn(z, model, generator=torch.Generator().manual_seed(9))[-1]
    g2 = sampler.sample_sde(num_steps=20, generator=torch.Generator().manual_seed(9))(z, model)[-1]
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
