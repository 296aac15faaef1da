"""Flow-matching training losses and ODE/SDE samplers: same API and numbers as SiT's
`transport/transport.py` (t = 0 noise, t = 1 data; the model gets t in [0, 1] unscaled).

    transport = create_transport("Linear", "velocity")
    loss = transport.training_losses(model, x1, dict(y=y))["loss"].mean()
    sampler = Sampler(transport)
    x = sampler.sample_ode()(z, model, y=y)[-1]            # sampler.last_nfe: drift calls
    x = sampler.sample_sde(generator=g)(z, model, y=y)[-1]  # g: Generator or shape -> noise
"""

import enum

import numpy as np
import torch as th

from . import path
from .integrators import ode, sde


class ModelType(enum.Enum):
    """What the network predicts."""

    NOISE = enum.auto()  # x0 (epsilon)
    SCORE = enum.auto()  # grad log p_t(x)
    VELOCITY = enum.auto()  # d x_t / dt


class PathType(enum.Enum):
    """Which interpolation path x_t uses."""

    LINEAR = enum.auto()
    GVP = enum.auto()
    VP = enum.auto()


class WeightType(enum.Enum):
    """Loss weighting for noise/score predictions."""

    NONE = enum.auto()
    VELOCITY = enum.auto()
    LIKELIHOOD = enum.auto()


def mean_flat(x):
    """Mean over all non-batch dimensions."""
    return th.mean(x, dim=list(range(1, x.dim())))


class Transport:
    """A path plus what the model predicts: training losses, drift and score functions."""

    def __init__(self, *, model_type, path_type, loss_type, train_eps, sample_eps):
        path_options = {
            PathType.LINEAR: path.ICPlan,
            PathType.GVP: path.GVPCPlan,
            PathType.VP: path.VPCPlan,
        }
        self.loss_type = loss_type
        self.model_type = model_type
        self.path_sampler = path_options[path_type]()
        self.train_eps = train_eps
        self.sample_eps = sample_eps

    def prior_logp(self, z):
        """Per-sample log-density of z under the N(0, I) prior."""
        n = th.prod(th.tensor(z.size())[1:])  # SiT's float32 constant, same rounding
        return -n / 2.0 * np.log(2 * np.pi) - th.sum(z.reshape(z.size(0), -1) ** 2, dim=1) / 2.0

    def check_interval(self, train_eps, sample_eps, *, diffusion_form="SBDM", sde=False,
                       reverse=False, eval=False, last_step_size=0.0):
        """[t0, t1] for training or sampling: eps away from the ends where a prediction is
        singular there (noise/score on Linear/GVP, t = 1 on VP, SBDM SDEs), else [0, 1]."""
        t0, t1 = 0, 1
        eps = train_eps if not eval else sample_eps
        if isinstance(self.path_sampler, path.VPCPlan):
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        elif isinstance(self.path_sampler, (path.ICPlan, path.GVPCPlan)) and (
            self.model_type != ModelType.VELOCITY or sde
        ):
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.model_type != ModelType.VELOCITY else 0
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if reverse:
            t0, t1 = 1 - t0, 1 - t1
        return t0, t1

    def sample(self, x1, noise=None, t=None):
        """(t, x0, x1) for a training batch: x0 = randn_like(x1) drawn FIRST, then
        t = rand(B) * (t1 - t0) + t0 on the default generator, moved to x1 (SiT's order).
        Passing `noise` and/or `t` skips that draw (e.g. per-sample keyed draws)."""
        x0 = th.randn_like(x1) if noise is None else noise.to(x1)
        if t is None:
            t0, t1 = self.check_interval(self.train_eps, self.sample_eps)
            t = th.rand((x1.shape[0],)) * (t1 - t0) + t0
        return t.to(x1), x0, x1

    def training_losses(self, model, x1, model_kwargs=None, noise=None, t=None):
        """{"loss": per-sample loss (B,), "pred": model output} on x_t = alpha x1 + sigma x0.

        velocity: |v - u_t|^2; noise: w |out - x0|^2; score: w |out sigma_t + x0|^2, with
        w = 1, (g2 / sigma_t)^2 ("velocity") or g2 / sigma_t^2 ("likelihood"). `noise`
        (x0, shape of x1) and `t` ((B,)) replace the default draws when given.
        """
        if model_kwargs is None:
            model_kwargs = {}
        t, x0, x1 = self.sample(x1, noise=noise, t=t)
        t, xt, ut = self.path_sampler.plan(t, x0, x1)
        model_output = model(xt, t, **model_kwargs)
        assert model_output.shape == xt.shape, f"model output {tuple(model_output.shape)} != {tuple(xt.shape)}"

        terms = {"pred": model_output}
        if self.model_type == ModelType.VELOCITY:
            terms["loss"] = mean_flat((model_output - ut) ** 2)
            return terms
        _, drift_var = self.path_sampler.compute_drift(xt, t)
        sigma_t, _ = self.path_sampler.compute_sigma_t(path.expand_t_like_x(t, xt))
        if self.loss_type == WeightType.VELOCITY:
            weight = (drift_var / sigma_t) ** 2
        elif self.loss_type == WeightType.LIKELIHOOD:
            weight = drift_var / (sigma_t ** 2)
        elif self.loss_type == WeightType.NONE:
            weight = 1
        else:
            raise NotImplementedError(self.loss_type)
        if self.model_type == ModelType.NOISE:
            terms["loss"] = mean_flat(weight * ((model_output - x0) ** 2))
        else:
            terms["loss"] = mean_flat(weight * ((model_output * sigma_t + x0) ** 2))
        return terms

    def get_drift(self):
        """drift(x, t, model, **kw): the probability-flow ODE velocity from any prediction."""
        sampler = self.path_sampler

        def score_ode(x, t, model, **model_kwargs):
            drift_mean, drift_var = sampler.compute_drift(x, t)
            return -drift_mean + drift_var * model(x, t, **model_kwargs)

        def noise_ode(x, t, model, **model_kwargs):
            drift_mean, drift_var = sampler.compute_drift(x, t)
            sigma_t, _ = sampler.compute_sigma_t(path.expand_t_like_x(t, x))
            score = model(x, t, **model_kwargs) / -sigma_t
            return -drift_mean + drift_var * score

        def velocity_ode(x, t, model, **model_kwargs):
            return model(x, t, **model_kwargs)

        drift_fn = {ModelType.NOISE: noise_ode, ModelType.SCORE: score_ode}.get(self.model_type, velocity_ode)

        def body_fn(x, t, model, **model_kwargs):
            out = drift_fn(x, t, model, **model_kwargs)
            assert out.shape == x.shape, "Output shape from ODE solver must match input shape"
            return out

        return body_fn

    def get_score(self):
        """score(x, t, model, **kw): grad log p_t(x) from any prediction."""
        sampler = self.path_sampler
        if self.model_type == ModelType.NOISE:
            return lambda x, t, model, **kw: model(x, t, **kw) / -sampler.compute_sigma_t(path.expand_t_like_x(t, x))[0]
        if self.model_type == ModelType.SCORE:
            return lambda x, t, model, **kw: model(x, t, **kw)
        if self.model_type == ModelType.VELOCITY:
            return lambda x, t, model, **kw: sampler.get_score_from_velocity(model(x, t, **kw), x, t)
        raise NotImplementedError(self.model_type)


class Sampler:
    """Builds sampling functions fn(z, model, **model_kwargs) for a Transport.

    `last_nfe` is the number of drift evaluations of the latest ODE or likelihood solve
    (the likelihood's each evaluate the model once, with a vector-Jacobian product).
    """

    def __init__(self, transport):
        self.transport = transport
        self.drift = transport.get_drift()
        self.score = transport.get_score()
        self.last_nfe = None

    def _sde_drift_and_diffusion(self, *, diffusion_form="SBDM", diffusion_norm=1.0, paper_w=False):
        """SDE drift = ODE drift + w(t) score and w(t); paper_w halves w (see `sample_sde`)."""

        def diffusion_fn(x, t):
            w = self.transport.path_sampler.compute_diffusion(x, t, form=diffusion_form, norm=diffusion_norm)
            return 0.5 * w if paper_w else w

        def sde_drift(x, t, model, **kwargs):
            return self.drift(x, t, model, **kwargs) + diffusion_fn(x, t) * self.score(x, t, model, **kwargs)

        return sde_drift, diffusion_fn

    def _last_step(self, sde_drift, *, last_step, last_step_size):
        """Final jump from t1 to 1: Mean (SDE drift), Euler (ODE drift), Tweedie, or None."""
        if last_step is None:
            return lambda x, t, model, **kw: x
        if last_step == "Mean":
            return lambda x, t, model, **kw: x + sde_drift(x, t, model, **kw) * last_step_size
        if last_step == "Euler":
            return lambda x, t, model, **kw: x + self.drift(x, t, model, **kw) * last_step_size
        if last_step == "Tweedie":
            plan = self.transport.path_sampler

            def tweedie(x, t, model, **kw):
                alpha = plan.compute_alpha_t(t)[0][0]  # all t equal t1 here, as in SiT
                sigma = plan.compute_sigma_t(t)[0][0]
                return x / alpha + (sigma ** 2) / alpha * self.score(x, t, model, **kw)

            return tweedie
        raise NotImplementedError(last_step)

    def sample_sde(self, *, sampling_method="Euler", diffusion_form="SBDM", diffusion_norm=1.0,
                   last_step="Mean", last_step_size=0.04, num_steps=250, generator=None, paper_w=False):
        """fn(z, model, generator=None, **model_kwargs) -> list of num_steps states (last =
        sample): num_steps - 1 Euler-Maruyama/Heun steps on linspace(t0, t1, num_steps),
        then `last_step` from t1 = 1 - last_step_size.

        Noise is drawn as torch.randn(x.size()) on the default generator (SiT) unless
        `generator` (here or per call) is a torch.Generator or a callable shape -> noise,
        e.g. `integrators.per_sample_noise(gens)` for one generator per image.
        SiT issue #14: the noise is sqrt(2 w dt) with drift v + w score (SiT's code, kept by
        default; right marginals); the paper writes sqrt(w dt) with v + w score / 2, which
        paper_w=True gives (w halved in both).
        """
        if last_step is None:
            last_step_size = 0.0
        sde_drift, sde_diffusion = self._sde_drift_and_diffusion(
            diffusion_form=diffusion_form, diffusion_norm=diffusion_norm, paper_w=paper_w)
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, diffusion_form=diffusion_form,
            sde=True, eval=True, reverse=False, last_step_size=last_step_size)
        _sde = sde(sde_drift, sde_diffusion, t0=t0, t1=t1, num_steps=num_steps,
                   sampler_type=sampling_method, generator=generator)
        last_step_fn = self._last_step(sde_drift, last_step=last_step, last_step_size=last_step_size)

        def _sample(init, model, generator=None, **model_kwargs):
            xs = _sde.sample(init, model, generator=generator, **model_kwargs)
            ts = th.ones(init.size(0), device=init.device) * t1
            xs.append(last_step_fn(xs[-1], ts, model, **model_kwargs))
            assert len(xs) == num_steps, "Samples does not match the number of steps"
            return xs

        return _sample

    def sample_ode(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3, reverse=False):
        """fn(z, model, **model_kwargs) -> trajectory (num_steps, *z.shape), last = sample;
        reverse=True integrates data -> noise. Sets `self.last_nfe`."""
        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True,
            reverse=reverse, last_step_size=0.0)
        _ode = ode(self.drift, t0=t0, t1=t1, sampler_type=sampling_method, num_steps=num_steps,
                   atol=atol, rtol=rtol)

        def _sample(x, model, **model_kwargs):
            out = _ode.sample(x, model, **model_kwargs)
            self.last_nfe = _ode.nfe
            return out

        return _sample

    def sample_ode_likelihood(self, *, sampling_method="dopri5", num_steps=50, atol=1e-6, rtol=1e-3):
        """fn(x, model, **model_kwargs) -> (logp (B,), z): integrates data x to noise z with
        the divergence (Hutchinson, one Rademacher probe per evaluation, as SiT) and adds
        the N(0, I) prior log-density of z. Sets `self.last_nfe`."""

        def _likelihood_drift(x, t, model, **model_kwargs):
            x, _ = x
            eps = (th.randint(2, x.size(), dtype=th.float, device=x.device) * 2 - 1).to(x)
            t = th.ones_like(t) * (1 - t)
            with th.enable_grad():
                x = x.detach().requires_grad_(True)
                drift = self.drift(x, t, model, **model_kwargs)
                grad = th.autograd.grad(th.sum(drift * eps), x)[0]
                logp_grad = th.sum(grad * eps, dim=tuple(range(1, x.dim())))
            return (-drift.detach(), logp_grad)

        t0, t1 = self.transport.check_interval(
            self.transport.train_eps, self.transport.sample_eps, sde=False, eval=True,
            reverse=False, last_step_size=0.0)
        _ode = ode(_likelihood_drift, t0=t0, t1=t1, sampler_type=sampling_method,
                   num_steps=num_steps, atol=atol, rtol=rtol)

        def _sample_fn(x, model, **model_kwargs):
            init_logp = th.zeros(x.size(0)).to(x)
            z, delta_logp = _ode.sample((x, init_logp), model, **model_kwargs)
            self.last_nfe = _ode.nfe
            z, delta_logp = z[-1], delta_logp[-1]
            return self.transport.prior_logp(z) - delta_logp, z

        return _sample_fn
