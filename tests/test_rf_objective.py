"""REPA's rectified flow (--objective rf) with REPA's alignment (RepaObjective) against REPA's SILoss
re-derived here from the spec formulas (shared/spec/REPA.md): x_t = alpha_t x + sigma_t eps with t = 1
noise, target d alpha x + d sigma eps, per-sample mean squared error; proj = -cos per token, averaged
over tokens, then batch and encoders; U-REPA's manifold term by an explicit loop over token pairs.

The network is a tiny DiT from fixed seeds (weights perturbed so it predicts more than zero) with a
projector on its first block; the encoder is a stub handing back fixed tokens (no download). Both
routes see the same x, labels, noise, t and encoder tokens: given as draws, or drawn by each route
from the same seed in REPA's order (t = torch.rand((B, 1, 1, 1)) first, then noise = randn_like)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dit_models import DiT
from helpers.training.objectives import RF, per_sample_draws
from helpers.training.repa import Projector
from helpers.training.repa_objective import RepaNet, RepaObjective

B, C, SIDE, CLASSES, Z_DIM = 3, 4, 8, 5, 16
TAP, TOKENS = "block1", 16            # a /2-patch DiT on 8x8 inputs: 4x4 tokens
REL = 1e-5
MEASURED = {}                         # the largest relative difference of each test, printed at the end


class StubEncoder(nn.Module):
    """An encoder whose final-normed tokens are fixed (a CLS token first, as DINOv2's)."""
    num_prefix_tokens = 1

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens

    def forward_features(self, pixels):
        return torch.cat([torch.zeros_like(self.tokens[:, :1]), self.tokens], dim=1)


def tiny_net(seed=0, learn_sigma=False):
    """A small DiT and one projector on block 1, from fixed seeds, every weight perturbed."""
    torch.manual_seed(seed)
    model = DiT(input_size=SIDE, patch_size=2, in_channels=C, hidden_size=32, depth=2, num_heads=2,
                num_classes=CLASSES, learn_sigma=learn_sigma)
    net = RepaNet(model, TAP, [Projector(32, Z_DIM, hidden_dim=24)])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()   # no label dropout: both routes then make the same model calls


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, SIDE, SIDE, generator=g)
    y = torch.randint(0, CLASSES, (B,), generator=g)
    tokens = torch.randn(B, TOKENS, Z_DIM, generator=g)
    images = torch.rand(B, 3, 4 * SIDE, 4 * SIDE, generator=g) * 2 - 1
    return x, y, tokens, images


def reference_siloss(net, x, y, zs, path, weighting, t=None, noise=None):
    """REPA's SILoss written from the spec: returns (denoising loss (B,), proj loss scalar, zs_tilde)."""
    n = x.shape[0]
    if t is None:   # REPA's draw: t first on the default generator, then the noise
        if weighting == "uniform":
            t = torch.rand((n, 1, 1, 1))
        else:
            sigma = torch.randn((n, 1, 1, 1)).exp()
            t = sigma / (1 + sigma) if path == "linear" else 2 / math.pi * torch.atan(sigma)
    t = t.reshape(n, 1, 1, 1).to(x.dtype)
    noise = torch.randn_like(x) if noise is None else noise
    if path == "linear":
        alpha, sigma, d_alpha, d_sigma = 1 - t, t, -1.0, 1.0
    else:
        alpha, sigma = torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)
        d_alpha, d_sigma = -math.pi / 2 * torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)
    x_t = alpha * x + sigma * noise
    target = d_alpha * x + d_sigma * noise
    out, features = net.model(x_t, t.flatten(), y, return_features=(TAP,))
    zs_tilde = [projector(features[TAP]) for projector in net.projectors]
    denoise = ((out[:, :C] - target) ** 2).mean(dim=(1, 2, 3))
    proj = 0.0
    for z, z_tilde in zip(zs, zs_tilde):
        for j in range(n):
            proj = proj + (-(F.normalize(z[j], dim=-1) * F.normalize(z_tilde[j], dim=-1)).sum(dim=-1)).mean()
    return denoise, proj / (len(zs) * n), zs_tilde


def reference_manifold(z_tilde, z):
    """U-REPA's manifold loss by a loop: per sample, mean over token pairs (i, j) of (cos_h - cos_y)^2."""
    per_sample = []
    for b in range(z.shape[0]):
        total = 0.0
        for i in range(z.shape[1]):
            cos_h = F.cosine_similarity(z_tilde[b, i:i + 1], z_tilde[b], dim=-1)   # (T,)
            cos_y = F.cosine_similarity(z[b, i:i + 1], z[b], dim=-1)
            total = total + ((cos_h - cos_y) ** 2).sum()
        per_sample.append(total / z.shape[1] ** 2)
    return torch.stack(per_sample)


def rel_diff(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).abs() / b.abs().clamp_min(1e-12)).max().item()


def check_close(name, got, expected):
    diff = rel_diff(got.detach(), expected.detach())
    MEASURED[name] = max(MEASURED.get(name, 0.0), diff)
    assert diff <= REL, f"{name}: relative difference {diff:.2e}"


def objective_for(net, tokens, path, weighting, manifold_coeff=0.0):
    return RepaObjective(RF(path, weighting, learn_sigma=net.model.learn_sigma), net, [StubEncoder(tokens)], 0.5,
                         4 * SIDE, {}, manifold_coeff=manifold_coeff)


@pytest.mark.parametrize("path", ["linear", "cosine"])
@pytest.mark.parametrize("weighting", ["uniform", "lognormal"])
@pytest.mark.parametrize("given", [False, True], ids=["repa-draw-order", "per-sample-draws"])
def test_rf_with_repa_equals_repas_siloss(path, weighting, given):
    net, (x, y, tokens, images) = tiny_net(learn_sigma=given), batch()   # learned-sigma head: its half dropped
    objective = objective_for(net, tokens, path, weighting)
    draws = per_sample_draws(objective, x, [4, 9, 1], seed=7, step=3, class_dropout_prob=0)[0] if given else None
    with torch.no_grad():
        torch.manual_seed(11)
        losses = objective.training_losses(net, x, dict(y=y), draws, images=images)
        torch.manual_seed(11)
        denoise, proj, _ = reference_siloss(net, x, y, [tokens], path, weighting,
                                            t=draws and draws["t"], noise=draws and draws["noise"])
    tag = f"{path}/{weighting}/{'given' if given else 'drawn'}"
    check_close(f"denoise {tag}", losses["denoise"], denoise)
    check_close(f"proj {tag}", losses["proj"].mean(), proj)
    check_close(f"loss {tag}", losses["loss"].mean(), denoise.mean() + 0.5 * proj)
    assert losses["denoise"].min() > 0.1 and proj.abs() > 1e-3   # neither side is trivially zero
    print(f"largest relative differences so far: {max(MEASURED.values()):.2e} ({max(MEASURED, key=MEASURED.get)})")


def test_rf_draws_follow_repa_order_and_time_laws():
    """Without draws, t comes first from the default generator, then eps: a different order would
    change the loss. Given uniforms, lognormal times are sigmoid of the normal quantile (linear path)
    and 2/pi atan(exp(.)) on the cosine path (REPA's loss.py)."""
    net, (x, y, tokens, images) = tiny_net(), batch()
    objective = objective_for(net, tokens, "linear", "uniform")
    with torch.no_grad():
        torch.manual_seed(5)
        got = objective.training_losses(net, x, dict(y=y), images=images)["denoise"]
        torch.manual_seed(5)
        noise_first = torch.randn_like(x)
        t_after = torch.rand((B, 1, 1, 1))
        swapped = reference_siloss(net, x, y, [tokens], "linear", "uniform", t=t_after, noise=noise_first)[0]
    assert rel_diff(got, swapped) > 1e-2
    u = torch.tensor([0.02, 0.3, 0.5, 0.77, 0.99])
    n = torch.distributions.Normal(0.0, 1.0).icdf(u)
    torch.testing.assert_close(RF("linear", "lognormal").times(u), torch.sigmoid(n), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(RF("cosine", "lognormal").times(u), 2 / math.pi * torch.atan(n.exp()),
                               rtol=1e-5, atol=1e-6)


def test_manifold_term_and_zero_weight():
    """W = 3 adds proj_coeff * 3 * the manifold loss (equal to the pair loop) and logs it; W = 0 is
    exactly the loss without it (same draws), the same tensor values, and logs no manifold term."""
    net, (x, y, tokens, images) = tiny_net(seed=2), batch(seed=3)
    plain, urepa = objective_for(net, tokens, "linear", "uniform"), objective_for(net, tokens, "linear", "uniform", 3.0)
    draws = per_sample_draws(plain, x, [0, 1, 2], seed=0, step=0, class_dropout_prob=0)[0]
    with torch.no_grad():
        a = plain.training_losses(net, x, dict(y=y), draws, images=images)
        b = urepa.training_losses(net, x, dict(y=y), draws, images=images)
        manifold = reference_manifold(net.projected[0], tokens)
    assert plain.log_terms == ("denoise", "proj") and "manifold" not in a
    assert urepa.log_terms == ("denoise", "proj", "manifold")
    assert torch.equal(a["loss"], a["denoise"] + 0.5 * a["proj"])   # today's loss, bit for bit
    assert torch.equal(a["denoise"], b["denoise"]) and torch.equal(a["proj"], b["proj"])
    check_close("manifold", b["manifold"], manifold)
    check_close("loss with manifold", b["loss"], a["denoise"] + 0.5 * (a["proj"] + 3.0 * manifold))
    assert manifold.min() > 1e-3
    print("largest relative differences: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(MEASURED.items())))
