"""REPA's samplers (rf checkpoints) against an independent implementation of REPA's samplers.py."""
import numpy as np
import pytest
import torch

from dit_models import DiT
from helpers.sampling.generation import make_sampling
from helpers.sampling.noise import IndexNoise, draw_labels
from helpers.sampling.rf_samplers import GuidedCall
from helpers.sampling.samplers import SamplerSettings

NUM_CLASSES, SHAPE = 10, (4, 8, 8)


def tiny_net(seed=0, hidden=32):
    """A small DiT (4 channels in and out, as REPA's SiT) whose zero-initialised weights are re-drawn."""
    torch.manual_seed(seed)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=hidden, depth=2, num_heads=2,
              num_classes=NUM_CLASSES, learn_sigma=False)
    for p in net.parameters():
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.1)
    return net.eval()


#################################################################################
#          REPA's samplers.py, written here from its definitions                #
#################################################################################

def path_coefficients(path_type, t):
    """alpha, sigma, d alpha, d sigma of REPA's path (t = 1 noise), t shaped like x."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    return (torch.cos(t * np.pi / 2), torch.sin(t * np.pi / 2), -np.pi / 2 * torch.sin(t * np.pi / 2),
            np.pi / 2 * torch.cos(t * np.pi / 2))


def reference_score(v, x, t, path_type):
    alpha, sigma, d_alpha, d_sigma = path_coefficients(path_type, t.view(-1, 1, 1, 1).expand_as(x))
    ratio = alpha / d_alpha
    return (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)


def reference_drift(net, x, t_cur, y, cfg, low, high, sde=False, path_type="linear"):
    """REPA's model call: x, t cast to float32, output back to float64, guidance on all channels."""
    guided = cfg > 1.0 and low <= t_cur <= high
    inp = torch.cat([x, x]) if guided else x
    labels = torch.cat([y, torch.full_like(y, NUM_CLASSES)]) if guided else y
    t_in = torch.ones(inp.size(0), dtype=torch.float64) * t_cur
    v = net(inp.to(torch.float32), t_in.to(torch.float32), labels).to(torch.float64)
    d = v - 0.5 * (2 * t_cur) * reference_score(v, inp, t_in, path_type) if sde else v
    if guided:
        cond, uncond = d.chunk(2)
        d = uncond + cfg * (cond - uncond)
    return d


def reference_euler(net, z, y, steps, cfg, low, high, heun=False):
    t_steps = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    x_next = z.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = reference_drift(net, x_cur, t_cur, y, cfg, low, high)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < steps - 1:
            guided_at_start = cfg > 1.0 and low <= t_cur <= high     # REPA decides the correction's guidance by t_cur
            d_prime = reference_drift(net, x_next, t_next, y, cfg if guided_at_start else 1.0, 0.0, 1.0)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)


def reference_euler_maruyama(net, z, y, steps, cfg, low, high, path_type, step_noise):
    t_steps = torch.cat([torch.linspace(1.0, 0.04, steps, dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)])
    x_next = z.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1]):
        dt, x_cur = t_next - t_cur, x_next
        diffusion = 2 * t_cur
        deps = step_noise().to(torch.float64) * torch.sqrt(torch.abs(dt))
        d_cur = reference_drift(net, x_cur, t_cur, y, cfg, low, high, sde=True, path_type=path_type)
        x_next = x_cur + d_cur * dt + torch.sqrt(diffusion) * deps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    d_cur = reference_drift(net, x_next, t_cur, y, cfg, low, high, sde=True, path_type=path_type)
    return (x_next + (t_next - t_cur) * d_cur).to(torch.float32)


LARGEST = {}


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
@pytest.mark.parametrize("cfg, interval", [(1.0, (0.0, 1.0)), (1.8, (0.0, 0.7))])
@pytest.mark.parametrize("mode, heun, steps", [("ode", False, 8), ("ode", True, 8), ("sde", False, 10)])
@torch.no_grad()
def test_repa_samplers_match_an_independent_implementation(mode, heun, steps, cfg, interval, path_type):
    """Same initial noise, same per-step noise (per sample, from IndexNoise), same tiny network: our
    sampler through make_sampling and REPA's, written above, agree to 1e-5 relative."""
    net = tiny_net()
    settings = SamplerSettings(cfg_scale=cfg, guide_channels="all", mode=mode, num_sampling_steps=steps,
                               sampling_method={"ode": "heun" if heun else "euler", "sde": "euler-maruyama"}[mode],
                               guidance_low=interval[0], guidance_high=interval[1])
    objective = {"name": "rf", "path_type": path_type, "weighting": "uniform", "learn_sigma": False}
    model_fn, sampler = make_sampling(net, None, objective, settings, dict(precision="fp32", channels_last=False,
                                                                            compile=False))
    noise = IndexNoise(3, range(3))
    labels = draw_labels(noise, NUM_CLASSES)
    ours = sampler(model_fn, noise, labels, SHAPE, "cpu")

    theirs_noise = IndexNoise(3, range(3))                  # the same draws, in the same order
    assert torch.equal(draw_labels(theirs_noise, NUM_CLASSES), labels)
    z = theirs_noise.randn(SHAPE)
    if mode == "ode":
        theirs = reference_euler(net, z, labels, steps, cfg, *interval, heun=heun)
    else:
        theirs = reference_euler_maruyama(net, z, labels, steps, cfg, *interval, path_type,
                                          lambda: theirs_noise.randn(SHAPE))
    relative = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    LARGEST[(mode, heun, cfg, path_type)] = relative
    print(f"largest relative difference {mode}{' heun' if heun else ''} cfg {cfg} {path_type}: {relative:.2e}")
    assert relative < 1e-5
    unguided = reference_euler(net, z, labels, steps, 1.0, 0.0, 1.0) if mode == "ode" else None
    if cfg > 1.0 and unguided is not None:     # the guidance does something (so the comparison can fail)
        assert (ours - unguided).abs().max() > 1e-2


def test_the_guidance_interval_includes_its_boundaries_in_repas_time():
    call = GuidedCall(lambda x, t, y: x, 4, cfg_scale=1.8, null_label=NUM_CLASSES, interval=(0.0, 0.7))
    grid = torch.linspace(1, 0, 11, dtype=torch.float64)
    assert [call.guided_at(t) for t in grid] == [float(t) <= 0.7 for t in grid]
    assert call.guided_at(torch.tensor(0.7, dtype=torch.float64)) and call.guided_at(torch.tensor(0.0))
    assert not call.guided_at(torch.tensor(0.7 + 1e-12, dtype=torch.float64))
    assert not GuidedCall(lambda x, t, y: x, 4, cfg_scale=1.0, interval=(0.0, 1.0)).guided_at(0.5)
