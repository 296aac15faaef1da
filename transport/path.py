"""Interpolation paths ("coupling plans") x_t = alpha_t * x1 + sigma_t * x0, as in SiT.

t = 0 is noise (x0 ~ N(0, I)), t = 1 is data (x1). Each plan gives alpha_t, sigma_t and
their time derivatives, the target velocity u_t, the drift/variance pair the SDE and the
score conversions use, and conversions between velocity, score and noise predictions.
Same formulas and numbers as SiT's `transport/path.py`.
"""

import numpy as np
import torch as th


def expand_t_like_x(t, x):
    """Reshape a (B,) time vector to (B, 1, ..., 1) so it broadcasts against x."""
    return t.view(t.size(0), *([1] * (x.dim() - 1)))


class ICPlan:
    """Linear path ("Linear"): alpha = t, sigma = 1 - t."""

    def __init__(self, sigma=0.0):
        self.sigma = sigma

    def compute_alpha_t(self, t):
        """(alpha_t, d alpha_t / dt); the derivative is the constant 1, as in SiT."""
        return t, 1

    def compute_sigma_t(self, t):
        """(sigma_t, d sigma_t / dt)."""
        return 1 - t, -1

    def compute_d_alpha_alpha_ratio_t(self, t):
        """d_alpha / alpha in closed form (1 / t) so GVP/VP can give stable versions."""
        return 1 / t

    def compute_drift(self, x, t):
        """(-f(x, t), g2(t)): minus the linear drift (d_alpha/alpha) x and the variance term
        (d_alpha/alpha) sigma^2 - sigma d_sigma; velocity = g2 * score - (-f)."""
        t = expand_t_like_x(t, x)
        ratio = self.compute_d_alpha_alpha_ratio_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        return -(ratio * x), ratio * (sigma_t ** 2) - sigma_t * d_sigma_t

    def compute_diffusion(self, x, t, form="constant", norm=1.0):
        """SDE diffusion coefficient w(t); "inccreasing-decreasing" keeps SiT's spelling."""
        t = expand_t_like_x(t, x)
        if form == "constant":
            return norm
        if form == "SBDM":
            return norm * self.compute_drift(x, t)[1]
        if form == "sigma":
            return norm * self.compute_sigma_t(t)[0]
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * th.cos(np.pi * t) + 1) ** 2
        if form == "inccreasing-decreasing":
            return norm * th.sin(np.pi * t) ** 2
        raise NotImplementedError(f"Diffusion form {form} not implemented")

    def get_score_from_velocity(self, velocity, x, t):
        """score = ((alpha/d_alpha) v - x) / (sigma^2 - (alpha/d_alpha) d_sigma sigma)."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_ratio = alpha_t / d_alpha_t
        var = sigma_t ** 2 - reverse_ratio * d_sigma_t * sigma_t
        return (reverse_ratio * velocity - x) / var

    def get_noise_from_velocity(self, velocity, x, t):
        """noise (x0 estimate) = ((alpha/d_alpha) v - x) / ((alpha/d_alpha) d_sigma - sigma)."""
        t = expand_t_like_x(t, x)
        alpha_t, d_alpha_t = self.compute_alpha_t(t)
        sigma_t, d_sigma_t = self.compute_sigma_t(t)
        reverse_ratio = alpha_t / d_alpha_t
        var = reverse_ratio * d_sigma_t - sigma_t
        return (reverse_ratio * velocity - x) / var

    def get_velocity_from_score(self, score, x, t):
        """velocity = g2 * score - (-f): the probability-flow drift of a score model."""
        t = expand_t_like_x(t, x)
        drift, var = self.compute_drift(x, t)
        return var * score - drift

    def compute_mu_t(self, t, x0, x1):
        """Mean of x_t given (x0, x1): alpha_t x1 + sigma_t x0."""
        t = expand_t_like_x(t, x1)
        alpha_t, _ = self.compute_alpha_t(t)
        sigma_t, _ = self.compute_sigma_t(t)
        return alpha_t * x1 + sigma_t * x0

    def compute_xt(self, t, x0, x1):
        """The interpolant x_t (deterministic given x0 and x1)."""
        return self.compute_mu_t(t, x0, x1)

    def compute_ut(self, t, x0, x1, xt):
        """Conditional velocity d x_t / dt = d_alpha x1 + d_sigma x0 (the training target)."""
        t = expand_t_like_x(t, x1)
        _, d_alpha_t = self.compute_alpha_t(t)
        _, d_sigma_t = self.compute_sigma_t(t)
        return d_alpha_t * x1 + d_sigma_t * x0

    def plan(self, t, x0, x1):
        """(t, x_t, u_t) for a batch of times, noises and data points."""
        xt = self.compute_xt(t, x0, x1)
        ut = self.compute_ut(t, x0, x1, xt)
        return t, xt, ut


class VPCPlan(ICPlan):
    """Variance-preserving path of score SDEs (beta linear from sigma_max at noise to
    sigma_min at data): alpha = exp(log_mean), sigma = sqrt(1 - alpha^2)."""

    def __init__(self, sigma_min=0.1, sigma_max=20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def log_mean_coeff(self, t):
        """log alpha_t = -0.25 (1-t)^2 (sigma_max - sigma_min) - 0.5 (1-t) sigma_min."""
        return -0.25 * ((1 - t) ** 2) * (self.sigma_max - self.sigma_min) - 0.5 * (1 - t) * self.sigma_min

    def d_log_mean_coeff(self, t):
        """d log alpha_t / dt = 0.5 (1-t) (sigma_max - sigma_min) + 0.5 sigma_min."""
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def compute_alpha_t(self, t):
        alpha_t = th.exp(self.log_mean_coeff(t))
        return alpha_t, alpha_t * self.d_log_mean_coeff(t)

    def compute_sigma_t(self, t):
        p_sigma_t = 2 * self.log_mean_coeff(t)
        sigma_t = th.sqrt(1 - th.exp(p_sigma_t))
        d_sigma_t = th.exp(p_sigma_t) * (2 * self.d_log_mean_coeff(t)) / (-2 * sigma_t)
        return sigma_t, d_sigma_t

    def compute_d_alpha_alpha_ratio_t(self, t):
        """d_alpha / alpha = d log alpha / dt, finite everywhere."""
        return self.d_log_mean_coeff(t)

    def compute_drift(self, x, t):
        """(-0.5 beta_t x, beta_t / 2) with beta_t = sigma_min + (1-t)(sigma_max - sigma_min)."""
        t = expand_t_like_x(t, x)
        beta_t = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
        return -0.5 * beta_t * x, beta_t / 2


class GVPCPlan(ICPlan):
    """Generalised variance-preserving path: alpha = sin(pi t / 2), sigma = cos(pi t / 2)."""

    def __init__(self, sigma=0.0):
        super().__init__(sigma)

    def compute_alpha_t(self, t):
        return th.sin(t * np.pi / 2), np.pi / 2 * th.cos(t * np.pi / 2)

    def compute_sigma_t(self, t):
        return th.cos(t * np.pi / 2), -np.pi / 2 * th.sin(t * np.pi / 2)

    def compute_d_alpha_alpha_ratio_t(self, t):
        """d_alpha / alpha = pi / (2 tan(pi t / 2))."""
        return np.pi / (2 * th.tan(t * np.pi / 2))
