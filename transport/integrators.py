"""ODE and SDE integrators for transport sampling, with SiT's grids and numbers.

ODE: any `torchdiffeq.odeint` method on the grid linspace(t0, t1, num_steps); `ode.nfe`
counts right-hand-side evaluations of the last solve. SDE: Euler-Maruyama or Heun on the
same kind of grid; noise comes from `torch.randn(x.size())` on the default generator (as
SiT) unless a `generator` (torch.Generator or callable shape -> noise) is given.
"""

import torch as th


def make_noise_fn(generator=None):
    """Turn None / torch.Generator / callable(shape) -> tensor into a callable(shape)."""
    if generator is None:
        return lambda shape: th.randn(shape)  # SiT: CPU default generator, then .to(x)
    if isinstance(generator, th.Generator):
        return lambda shape: th.randn(shape, generator=generator, device=generator.device)
    if callable(generator):
        return generator
    raise TypeError(f"generator must be None, a torch.Generator or a callable, got {type(generator)}")


def per_sample_noise(generators):
    """noise_fn drawing row i of each noise tensor from generators[i] alone, so a sample's
    noise depends only on its own generator (e.g. one seeded per image index), not on the
    batch it lands in."""
    generators = list(generators)

    def noise_fn(shape):
        assert shape[0] == len(generators), f"batch {shape[0]} != {len(generators)} generators"
        return th.stack([th.randn(tuple(shape[1:]), generator=g, device=g.device) for g in generators])

    return noise_fn


class sde:
    """Fixed-step SDE solver dX = drift dt + sqrt(2 w) dW, forward in time.

    Note (SiT issue #14): the noise term is sqrt(2 w dt) while SiT's paper writes sqrt(w dt).
    With drift = v + w * score this pair has the right marginals (it is the paper's SDE with
    w doubled), and it is SiT's code, so it is kept; `Sampler.sample_sde(paper_w=True)` gives
    the paper's w instead.
    """

    def __init__(self, drift, diffusion, *, t0, t1, num_steps, sampler_type, generator=None):
        assert t0 < t1, "SDE sampler has to be in forward time"
        self.num_timesteps = num_steps
        self.t = th.linspace(t0, t1, num_steps)
        self.dt = self.t[1] - self.t[0]
        self.drift = drift
        self.diffusion = diffusion
        self.sampler_type = sampler_type
        self.generator = generator

    def _euler_maruyama_step(self, x, mean_x, t, model, noise_fn, **model_kwargs):
        """x_mean = x + drift dt; x = x_mean + sqrt(2 w) sqrt(dt) noise (noise drawn first)."""
        w_cur = noise_fn(x.size()).to(x)
        t = th.ones(x.size(0)).to(x) * t
        dw = w_cur * th.sqrt(self.dt)
        drift = self.drift(x, t, model, **model_kwargs)
        diffusion = self.diffusion(x, t)
        mean_x = x + drift * self.dt
        x = mean_x + th.sqrt(2 * diffusion) * dw
        return x, mean_x

    def _heun_step(self, x, _, t, model, noise_fn, **model_kwargs):
        """Noise first (x_hat), then a Heun (trapezoidal) step of the drift from x_hat."""
        w_cur = noise_fn(x.size()).to(x)
        dw = w_cur * th.sqrt(self.dt)
        t_cur = th.ones(x.size(0)).to(x) * t
        diffusion = self.diffusion(x, t_cur)
        xhat = x + th.sqrt(2 * diffusion) * dw
        k1 = self.drift(xhat, t_cur, model, **model_kwargs)
        xp = xhat + self.dt * k1
        k2 = self.drift(xp, t_cur + self.dt, model, **model_kwargs)
        return xhat + 0.5 * self.dt * (k1 + k2), xhat

    def sample(self, init, model, generator=None, **model_kwargs):
        """States after each step from grid point t[i] to t[i+1] (num_steps - 1 of them)."""
        steps = {"Euler": self._euler_maruyama_step, "Heun": self._heun_step}
        if self.sampler_type not in steps:
            raise NotImplementedError(f"Sampler type {self.sampler_type} not implemented.")
        step = steps[self.sampler_type]
        noise_fn = make_noise_fn(generator if generator is not None else self.generator)
        x, mean_x, samples = init, init, []
        for ti in self.t[:-1]:
            with th.no_grad():
                x, mean_x = step(x, mean_x, ti, model, noise_fn, **model_kwargs)
                samples.append(x)
        return samples


class ode:
    """ODE solver: torchdiffeq.odeint of drift on linspace(t0, t1, num_steps).

    Fixed-grid methods (euler, midpoint, rk4, heun2, ...) take num_steps - 1 steps; adaptive
    ones (dopri5, ...) only report at those points. After `sample`, `self.nfe` holds the
    number of drift evaluations that solve made (Euler: num_steps - 1).
    """

    def __init__(self, drift, *, t0, t1, sampler_type, num_steps, atol, rtol):
        self.drift = drift
        self.t = th.linspace(t0, t1, num_steps)
        self.atol = atol
        self.rtol = rtol
        self.sampler_type = sampler_type
        self.nfe = 0

    def sample(self, x, model, **model_kwargs):
        """Trajectory at the grid points: a tensor (num_steps, *x.shape), or a tuple of such
        tensors when x is a tuple (the likelihood solve)."""
        is_tuple = isinstance(x, tuple)
        ref = x[0] if is_tuple else x
        self.nfe = 0

        def _fn(t, x):
            self.nfe += 1
            t = th.ones(ref.size(0)).to(ref) * t
            return self.drift(x, t, model, **model_kwargs)

        # tolerances as lists, as SiT: plain floats change dopri5's float32 results (~1e-7)
        atol = [self.atol] * (len(x) if is_tuple else 1)
        rtol = [self.rtol] * (len(x) if is_tuple else 1)
        from torchdiffeq import odeint   # here: it imports scipy.integrate (~0.3 s), which training never needs
        return odeint(_fn, x, self.t.to(ref.device), method=self.sampler_type, atol=atol, rtol=rtol)
