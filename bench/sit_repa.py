"""Flow matching and REPA: the SiT training step vs DDPM's, SiT's ODE/SDE sampling latency (NFE
counted), and the cost of a REPA step and of its encoder. Part of bench/bench.py (which puts the
repository root and this folder on sys.path).
"""
import copy
import math

import torch

from helpers.utils.fastpath import autocast_forward
from helpers.utils.models import create_model
from measuring import release_memory, time_alternating, time_calls
from sampling_speed import CFG_SCALE
from training_step import make_trainer, train_batch


def bench_sit_train(name, cfg, args, device):
    """DDPM step (learned sigma, as train.py) vs SiT flow-matching step (Linear, velocity,
    learn_sigma=False), same batch and config, timed in turns."""
    from helpers.training.objectives import DDPM, SiT
    torch.manual_seed(args.seed)
    steps = {}
    for label, objective, learn_sigma in (("DDPM", DDPM(), True), ("SiT", SiT("Linear", "velocity"), False)):
        model = create_model(name, input_size=args.latent_size, learn_sigma=learn_sigma)
        forward, step = make_trainer(model, cfg, device)
        x, y = train_batch(args, device, args.batch_size, cfg["channels_last"])
        loss_fn = (lambda obj, x, y: lambda f: obj.training_losses(f, x, dict(y=y))["loss"].mean())(objective, x, y)
        steps[label] = (lambda step, loss_fn: lambda: step(loss_fn))(step, loss_fn)
    times = time_alternating(steps, device, args.warmup, args.iters)
    n = args.batch_size
    result = {k: dict(step_s=w, cpu_s=c, images_per_s=n / w, images_per_cpu_s=n / c) for k, (w, c) in times.items()}
    del steps
    release_memory(device)
    print(f"  sit-train {name:9s} {cfg['name']}: DDPM {result['DDPM']['images_per_s']:.2f} img/s, "
          f"SiT {result['SiT']['images_per_s']:.2f} img/s", flush=True)
    return result


SIT_SOLVERS = (("ODE dopri5", "ode", "dopri5", 50), ("ODE euler-50", "ode", "euler", 50),
               ("ODE heun2-50", "ode", "heun2", 50), ("SDE Euler-250", "sde", "Euler", 250))


def sit_sampler_args(mode, method, steps):
    """The ReverseProcess settings of sample.py's SiT defaults for one solver."""
    from types import SimpleNamespace
    return SimpleNamespace(sampler="ddpm", mode=mode, sampling_method=method, num_sampling_steps=steps,
                           atol=1e-6, rtol=1e-3, reverse=False, diffusion_form="sigma", diffusion_norm=1.0,
                           last_step="Mean", last_step_size=0.04)


def count_calls(fn):
    """fn wrapped to count its calls in .calls."""
    def counted(*a, **k):
        counted.calls += 1
        return fn(*a, **k)
    counted.calls = 0
    return counted


def bench_sit_sample(name, cfg, args, device):
    """Latency per image of SiT's ODE/SDE solvers (helpers.sampling.samplers.ReverseProcess, CFG as the DDPM
    rows) for a learn_sigma=False model; with --sample-steps-scale < 1 a short solve is timed and
    scaled by the NFE of the full one (counted on a free zero field where the model's is zero)."""
    from helpers.training.objectives import SiT
    from helpers.sampling.samplers import ReverseProcess
    from helpers.sampling.guidance import make_model_fn
    from helpers.sampling.noise import IndexNoise
    torch.manual_seed(args.seed)
    model = create_model(name, input_size=args.latent_size, learn_sigma=False).to(device).eval()
    model_fn = make_model_fn(model, CFG_SCALE, precision=cfg["precision"], channels_last=cfg["channels_last"],
                             compile=cfg["compile"])
    n, shape, objective = args.sample_batch, (4, args.latent_size, args.latent_size), SiT("Linear", "velocity").config()
    noise = IndexNoise(args.seed, range(n))
    labels = noise.labels(1000)
    result = dict(images=n)
    with torch.no_grad():
        x0 = noise.randn(shape, device=device)
        t0 = torch.zeros(n, device=device)
        result["zero_field"] = bool(model_fn(x0, t0, labels.to(device)).abs().max() == 0)   # also the warm-up
        zero_fn = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
        per_nfe = None
        for label, mode, method, steps in sorted(SIT_SOLVERS, key=lambda s: s[2] == "dopri5"):  # euler first
            adaptive = method == "dopri5"
            full = args.sample_steps_scale >= 1
            counter = count_calls(model_fn if (full or (adaptive and not result["zero_field"])) else zero_fn)
            sampler = ReverseProcess(sit_sampler_args(mode, method, steps), objective, 4)
            solve = lambda s=sampler, f=counter: s(f, noise, labels, shape, device)  # noqa: E731
            if full or (adaptive and not result["zero_field"]):
                wall, cpu, _ = time_calls(solve, device, 0, 1)
                nfe = counter.calls
                result[label] = dict(nfe=nfe, timed_nfe=nfe, batch_latency_s=wall, cpu_s=cpu, extrapolated=False)
            else:
                solve()
                nfe = counter.calls                                            # the full solve's NFE
                if adaptive:                                                   # per-NFE cost of euler's short run
                    wall, cpu, timed = per_nfe[0] * nfe, per_nfe[1] * nfe, 0
                else:
                    k = max(args.min_sample_steps, math.ceil(args.sample_steps_scale * (steps - 1)))
                    short = ReverseProcess(sit_sampler_args(mode, method, k + 1), objective, 4)
                    counter_short = count_calls(model_fn)
                    w, c, _ = time_calls(lambda: short(counter_short, noise, labels, shape, device), device, 0, 1)
                    timed = counter_short.calls
                    wall, cpu = w / timed * nfe, c / timed * nfe
                    if method == "euler":
                        per_nfe = (w / timed, c / timed)
                result[label] = dict(nfe=nfe, timed_nfe=timed, batch_latency_s=wall, cpu_s=cpu, extrapolated=True)
            r = result[label]
            r.update(per_image_s=r["batch_latency_s"] / n, per_image_cpu_s=r["cpu_s"] / n,
                     ms_per_nfe=1000 * r["batch_latency_s"] / r["nfe"])
    del model, model_fn
    release_memory(device)
    print(f"  sit-sample {name:9s} {cfg['name']}: " + "  ".join(
        f"{label} {result[label]['per_image_s']:.2f} s/img (NFE {result[label]['nfe']})" for label, *_ in SIT_SOLVERS),
        flush=True)
    return result


def repa_stage(name):
    """REPA's alignment point: DiC's enc1 stage (16x16 at 32x32 latents), DiT's block 4."""
    return "block4" if name.startswith("DiT") else "enc1"


def bench_repa(name, cfg, args, device):
    """SiT step vs SiT + REPA step (encoder on the batch's images, 256 px -> 224, projector on the
    stage's features from the same forward, projection loss x 0.5, backward through model and
    projector), and the encoder forward alone, timed in turns on the same batch."""
    import timm

    from helpers.training.objectives import SiT
    from helpers.training.repa import ENCODERS, Projector, encoder_input_size, encoder_tokens, preprocess, projection_loss
    timm_name, z_dim, _ = ENCODERS[args.repa_encoder]
    side = args.image_size                                   # encoder input 224 px per 256 px of image
    encoder = timm.create_model(timm_name, pretrained=False, img_size=encoder_input_size(side),
                                num_classes=0)               # random weights: the same cost as DINOv2's
    encoder = encoder.to(device).eval().requires_grad_(False)
    encode = autocast_forward(lambda im: encoder_tokens(encoder, preprocess(im, side)).float(), device,
                              cfg["precision"])
    objective, stage, n = SiT("Linear", "velocity"), repa_stage(name), args.repa_batch
    x, y = train_batch(args, device, n, cfg["channels_last"])
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(args.seed)).to(device)
    torch.manual_seed(args.seed)
    base = create_model(name, input_size=args.latent_size, learn_sigma=False)
    _, plain_step = make_trainer(copy.deepcopy(base), cfg, device)
    model = copy.deepcopy(base)
    projector = Projector(model.feature_channels(stage), z_dim, conv=stage.startswith(("enc", "mid", "dec")))
    projector.to(device).train()
    _, repa_step = make_trainer(model, cfg, device, extra_params=projector.parameters())
    project = autocast_forward(projector, device, cfg["precision"])
    del base

    def plain_loss(f):
        return objective.training_losses(f, x, dict(y=y))["loss"].mean()

    feats = {}

    def tapped(x_t, t, y):                      # one forward: output for the loss, features for REPA
        out, feats["h"] = model(x_t, t, y, return_features=(stage,))
        return out
    tapped = autocast_forward(tapped, device, cfg["precision"])

    def repa_loss(_):
        loss = objective.training_losses(tapped, x, dict(y=y))["loss"].mean()
        z = encode(images)
        proj, _ = projection_loss([project(feats.pop("h")[stage])], [z])
        return loss + 0.5 * proj

    times = time_alternating({"plain": lambda: plain_step(plain_loss), "REPA": lambda: repa_step(repa_loss),
                              "encoder": lambda: encode(images)}, device, args.warmup, args.iters)
    result = {k: dict(step_s=w, cpu_s=c) for k, (w, c) in times.items()}
    result.update(batch=n, encoder_name=f"{args.repa_encoder} ({timm_name}, random weights)", stage=stage,
                  projector_params=sum(p.numel() for p in projector.parameters()),
                  encoder_precision="bf16 autocast" if cfg["precision"] == "bf16" else "fp32")
    encoder = encode = model = projector = tapped = plain_step = repa_step = project = None   # frees them
    release_memory(device)
    print(f"  repa {name:9s} {cfg['name']}: plain {result['plain']['step_s'] * 1000:.0f} ms, REPA "
          f"{result['REPA']['step_s'] * 1000:.0f} ms, encoder {result['encoder']['step_s'] * 1000:.0f} ms "
          f"(batch {n})", flush=True)
    return result
