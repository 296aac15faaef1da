"""REPA's samplers (REPA's samplers.py, generate.py) for checkpoints trained with the rf objective, in
REPA's time (t = 1 NOISE, t = 0 data; helpers/training/objectives.py RF):

    --mode ode   euler_sampler: t on linspace(1, 0, N + 1), x_next = x + (t_next - t) v, N model calls
                 per guided branch; --heun adds Heun's correction on every step but the last
    --mode sde   euler_maruyama_sampler: t on linspace(1, 0.04, N) then 0; diffusion 2 t; the drift
                 d = v - diffusion / 2 * score (the score from the velocity and the path); noise of
                 each step per sample; the last step (0.04 -> 0) is x + dt d, without noise

The state is float64 and the model is called with x and t cast to float32, as REPA's samplers (their
latents are float32). Guidance is REPA's: the batch [x; x] with labels [y; null] (null = num_classes),
only where guidance_low <= t <= guidance_high in REPA's time (boundaries included), combined as
uncond + cfg (cond - uncond) on v (ODE) or on the drift d (SDE), on all channels by default. The
sampler guides, so its model_fn is the plain network call (make_model_fn with cfg 1).
"""
import torch
from tqdm import tqdm

from helpers.training.objectives import RF

RF_ODE_METHODS = ("euler", "heun")
RF_SDE_METHOD = "euler-maruyama"
LAST_STEP_TIME = 0.04   # REPA's SDE grid ends here, then one noiseless step to t = 0


class GuidedCall:
    """The model called as REPA's samplers call their SiT: float64 state in, float64 velocity (or a
    function of it) out, with REPA's classifier-free guidance where the sampler asks for it.

    `guided_channels`: how many leading channels the guidance combines (REPA: all of them); the
    others keep the conditional output."""

    def __init__(self, model_fn, in_channels, cfg_scale=1.0, guided_channels=None, null_label=None,
                 interval=(0.0, 1.0)):
        if cfg_scale > 1.0 and null_label is None:
            raise ValueError("classifier-free guidance needs the null label (the model's num_classes)")
        self.model_fn, self.in_channels, self.cfg_scale = model_fn, in_channels, cfg_scale
        self.guided_channels = in_channels if guided_channels is None else guided_channels
        self.null_label, self.interval = null_label, interval
        self.calls = 0

    def guided_at(self, t_cur):
        """REPA's test: cfg > 1 and guidance_low <= t_cur <= guidance_high, t_cur the float64 grid time."""
        return self.cfg_scale > 1.0 and self.interval[0] <= float(t_cur) <= self.interval[1]

    def __call__(self, x, t, y, guide, transform=None):
        """transform(v, x_in): what is guided (REPA's SDE guides the drift, not v); float64 (N, C, H, W)."""
        x_in, y_in = (torch.cat([x, x]), torch.cat([y, torch.full_like(y, self.null_label)])) if guide else (x, y)
        t_in = torch.full((x_in.shape[0],), float(t), dtype=torch.float64, device=x.device)
        out = self.model_fn(x_in.float(), t_in.float(), y_in)[:, :self.in_channels].double()
        self.calls += 1
        out = transform(out, x_in) if transform is not None else out
        if not guide:
            return out
        cond, uncond = out.chunk(2)
        k = self.guided_channels
        guided = uncond[:, :k] + self.cfg_scale * (cond[:, :k] - uncond[:, :k])
        return guided if k == out.shape[1] else torch.cat([guided, cond[:, k:]], dim=1)


def euler_sampler(call, x, y, num_steps, heun=False, progress=False):
    """REPA's ODE sampler from noise x (t = 1) to data (t = 0); Heun's correction (`heun`) is guided
    when the step's start is, as REPA decides it from t_cur."""
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = x.double()
    for i in tqdm(range(num_steps), desc="ode steps", disable=not progress):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur, guide = x_next, call.guided_at(t_cur)
        d_cur = call(x_cur, t_cur, y, guide)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            d_prime = call(x_next, t_next, y, guide)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def score_from_velocity(v, x, t, path):
    """REPA's get_score_from_velocity: ((alpha / d_alpha) v - x) / (sigma^2 - (alpha / d_alpha) d_sigma sigma)."""
    alpha, sigma, d_alpha, d_sigma = path.interpolant(t)
    ratio = alpha / d_alpha
    var = sigma ** 2 - ratio * d_sigma * sigma
    return (ratio * v - x) / var


def sde_drift(t_cur, path):
    """transform(v, x) -> d = v - 0.5 diffusion score at REPA's time t_cur, diffusion = 2 t_cur."""
    diffusion = 2 * t_cur

    def drift(v, x):
        return v - 0.5 * diffusion * score_from_velocity(v, x, t_cur, path)
    return drift


def euler_maruyama_sampler(call, x, y, num_steps, path, draw_noise, progress=False):
    """REPA's SDE sampler: num_steps - 1 Euler-Maruyama steps on linspace(1, 0.04, num_steps), each
    with its own noise draw_noise() (per sample), then the mean step from 0.04 to 0. N model calls."""
    t_steps = torch.cat([torch.linspace(1.0, LAST_STEP_TIME, num_steps, dtype=torch.float64),
                         torch.tensor([0.0], dtype=torch.float64)])
    x_next = x.double()
    for t_cur, t_next in tqdm(list(zip(t_steps[:-2], t_steps[1:-1])), desc="sde steps", disable=not progress):
        dt, x_cur = t_next - t_cur, x_next
        diffusion = 2 * t_cur
        deps = draw_noise().double() * torch.sqrt(torch.abs(dt))
        d_cur = call(x_cur, t_cur, y, call.guided_at(t_cur), transform=sde_drift(t_cur, path))
        x_next = x_cur + d_cur * dt + torch.sqrt(diffusion) * deps
    t_cur, t_next = t_steps[-2], t_steps[-1]
    d_cur = call(x_next, t_cur, y, call.guided_at(t_cur), transform=sde_drift(t_cur, path))
    return x_next + (t_next - t_cur) * d_cur


def rf_sample(settings, objective_config, model_fn, noise, x, y, in_channels, null_label, device, progress=False):
    """Latents (float32) of REPA's sampler for `settings` (mode, sampling_method, num_sampling_steps,
    cfg_scale, guide_channels, guidance_low/high) from the initial noise x; the SDE's per-step noise
    is drawn from `noise` (an IndexNoise) per sample."""
    cfg = getattr(settings, "cfg_scale", 1.0)
    guided_channels = None if getattr(settings, "guide_channels", "all") == "all" else min(3, in_channels)
    interval = (getattr(settings, "guidance_low", 0.0), getattr(settings, "guidance_high", 1.0))
    call = GuidedCall(model_fn, in_channels, cfg, guided_channels, null_label, interval)
    if settings.mode == "ode":
        heun = settings.sampling_method in ("heun", "heun2")   # heun2: SiT's name (the trainers' live samples)
        return euler_sampler(call, x, y, settings.num_sampling_steps, heun, progress).float()
    path = RF(path_type=objective_config.get("path_type", "linear"))
    draw = lambda: noise.randn(tuple(x.shape[1:]), device=device)  # noqa: E731
    return euler_maruyama_sampler(call, x, y, settings.num_sampling_steps, path, draw, progress).float()
