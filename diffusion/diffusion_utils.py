"""Log-likelihood helpers for the variational bound.

Same formulas and numbers as the `diffusion_utils.py` that DiT, fast-DiT and DiC ship
(itself taken from OpenAI's guided-diffusion / improved-diffusion). All functions are
elementwise on tensors, so they work in any dtype and on any device.
"""

import math

import torch as th

# sqrt(2 / pi), the constant of the tanh approximation of the normal CDF.
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

# Half a bin of an 8-bit image rescaled to [-1, 1]: bins are 2/255 wide.
_HALF_BIN = 1.0 / 255.0


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast, and any of them may be a Python number as long as at least
    one is a tensor (the prior KL compares against the scalar N(0, 1)). Log-variances
    given as numbers are turned into tensors because `th.exp` needs a tensor.
    """
    ref = next((v for v in (mean1, logvar1, mean2, logvar2) if isinstance(v, th.Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = [
        v if isinstance(v, th.Tensor) else th.tensor(v).to(ref) for v in (logvar1, logvar2)
    ]
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + th.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Standard normal CDF via the tanh approximation (the one OpenAI's code uses).

    Kept instead of the exact erf so that bits-per-dim numbers match DiT's.
    """
    return 0.5 * (1.0 + th.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * th.pow(x, 3))))


def continuous_gaussian_log_likelihood(x, *, means, log_scales):
    """Log density (nats) of x under N(means, exp(log_scales)^2), after standardising."""
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    normalized_x = centered_x * inv_stdv
    return th.distributions.Normal(th.zeros_like(x), th.ones_like(x)).log_prob(normalized_x)


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log probability (nats) of 8-bit data x in [-1, 1] under a discretised Gaussian.

    Each value owns the bin [x - 1/255, x + 1/255]; the two end bins extend to -inf and
    +inf, which is why the edges (|x| > 0.999) use a one-sided CDF. Probabilities are
    clamped at 1e-12 before the log so that a confident wrong model gives a large but
    finite loss. This is the decoder term L_0 of the variational bound.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}"
        )
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + _HALF_BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - _HALF_BIN))
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))  # lowest bin: P(X <= x + half bin)
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))  # highest bin
    log_cdf_delta = th.log((cdf_plus - cdf_min).clamp(min=1e-12))  # inner bins
    return th.where(
        x < -0.999,
        log_cdf_plus,
        th.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta),
    )
