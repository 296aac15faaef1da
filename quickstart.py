"""
Quick start: DiC learns a class-conditional distribution on a laptop CPU, measured.

    python quickstart.py

Trains the tiny DiC (DiC-Tiny, not a paper variant, at width 16) with the real train.py on
scikit-learn's built-in digits (16x16 grey, 10 classes, pixel space: no VAE, no download) with DDPM
(the default), SiT's flow matching (--objective sit) or REPA's rectified flow (--objective rf), in
bf16 where the machine has bf16 instructions and one process per idle core (torchrun), samples
every class through the same code as sample.py (no guidance by default; --cfg-scale adds it), and
judges the samples with a classifier that never saw a generated image
(helpers/evaluation/quality.py). It writes, in the run folder `<results-dir>/<NNN>-DiC-Tiny/`:
    samples.png       one row per class (0..9), --samples-per-class images each
    loss_curve.png    the training loss logged by train.py
    quality.json      the figures printed at the end
and prints the judge's held-out accuracy, the class accuracy of the samples and the Fréchet
distance (judge's feature space) of the samples to real held-out digits, next to the same
distance between two real splits (the floor), and how close the samples lie to their nearest
training digit next to real held-out digits (copies of the training set would lie much closer).
Every step is seeded: a rerun prints the same figures on the same machine.
`--model DiCo-Tiny` runs the same recipe on the tiny DiCo (also not a paper variant, its own width).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

from helpers.utils.files import atomic_write_text

HERE = os.path.dirname(os.path.abspath(__file__))


# The quick start's recipe for DiC-Tiny on digits (see parse_args for the tunable flags).
# Objective-dependent defaults: the sampler and its steps, and the guidance scale. Each sampler is
# the cheapest within 0.5 points of the best class accuracy of its objective (bench/sampler_sweep.py,
# 1,000 samples over two models: README "Samplers ranked by quality per model call").
SAMPLER_DEFAULTS = {"ddpm": ("ddpm", 50), "sit": ("euler", 10), "rf": ("euler", 10)}
CFG_DEFAULTS = {"ddpm": 1.0, "sit": 1.0, "rf": 1.0}
# Model-family recipes (2-core CPU, the judge below, 1,000 steps at batch 64; README "Quick start"):
# DiC-Tiny at half its width (hidden 16, not 32: 0.25 M parameters, a quarter) trains 1.6x faster per
# step (bf16, 2 processes) and learns the digits as well at lr 4e-3. DiCo zero-initialises every block's
# modulation, so its blocks start as identities: at 1e-3 DiCo-Tiny reached 77%, at 2e-3 99%.
MODEL_OVERRIDES = {"DiC": ["--network_g__hidden_size=16"]}
LR_DEFAULTS = {"DiC": 4e-3, "DiCo": 2e-3}
DEFAULT_LR = 1e-3   # other families
# --sampler for each objective, as sample.py's flags: DDPM checkpoints use sample.py's --sampler;
# SiT's flow matching its ODE (--mode ode --sampling-method ...) or SDE (--mode sde) sampler;
# REPA's rectified flow (rf) REPA's Euler ODE, with --heun its Heun ODE, or its Euler-Maruyama SDE.
SAMPLERS = {"ddpm": {name: ["--sampler", name] for name in ("ddpm", "ddim", "dpm-solver")},
            "sit": {"euler": ["--mode", "ode", "--sampling-method", "euler"],
                    "heun": ["--mode", "ode", "--sampling-method", "heun2"],
                    "dopri5": ["--mode", "ode", "--sampling-method", "dopri5"],
                    "sde": ["--mode", "sde", "--sampling-method", "Euler"]},
            "rf": {"euler": ["--mode", "ode"], "heun": ["--mode", "ode", "--heun"], "sde": ["--mode", "sde"]}}


def family(model):
    """The model family of a variant name ("DiC-Tiny" -> "DiC")."""
    return model.split("-")[0]


def launch_plan(precision, processes, batch_size):
    """(train.py's --precision, processes, threads per process) for this machine.

    fastest_settings measures what is fast here: bf16 where the CPU or GPU has bf16 instructions
    (else fp32: emulated bf16 is a trap), and the idle cores. On a CPU the quick start runs one
    single-thread process per idle core under torchrun (as many as divide the batch): a model this
    small keeps one thread busy and no more (2 threads per step were slower than 1), while DDP over
    gloo splits the batch at little cost (1.5x with 2 processes on 2 cores: README). Per-sample
    draws make the run the same on any number of processes. On a GPU: one process."""
    from helpers.utils import fastpath
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fastest = fastpath.fastest_settings(device)
    precision = fastest["precision"] if precision == "auto" else precision
    if processes is None:
        idle = 1 if device == "cuda" else fastest["threads"]
        processes = max(n for n in range(1, idle + 1) if batch_size % n == 0)
    print(f"This machine: {fastest.get('why', device)} -> {precision}, {processes} process(es)", flush=True)
    return precision, processes, 1 if device == "cpu" else None


def train_model(args):
    """Run train.py exactly as a user would; returns the new run folder and how it ran."""
    from helpers.training.runs import list_runs
    before = set(list_runs(args.results_dir))
    precision, processes, threads = launch_plan(args.precision, args.processes, args.batch_size)
    flags = ["--dataset", args.dataset, "--model", args.model, "--image-size", str(args.image_size),
             "--objective", args.objective, "--global-batch-size", str(args.batch_size), "--lr", str(args.lr),
             "--class-dropout-prob", str(args.class_dropout_prob),
             "--ema-decay", str(args.ema_decay), "--ema-warmup", "--max-steps", str(args.steps),
             "--ckpt-every", str(args.steps), "--log-every", str(args.log_every),
             "--results-dir", args.results_dir, "--global-seed", str(args.seed),
             "--num-workers", "0", "--precision", precision, *MODEL_OVERRIDES.get(family(args.model), [])]
    typed = ["torchrun", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else ["python"]
    launcher = [sys.executable] + (["-m", "torch.distributed.run", *typed[1:]] if processes > 1 else [])
    command = [*launcher, os.path.join(HERE, "train.py"), *flags]
    environment = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    print(f"$ {'OMP_NUM_THREADS=' + str(threads) + ' ' if threads else ''}" + " ".join([*typed, "train.py", *flags]),
          flush=True)
    subprocess.run(command, check=True, env=environment)
    new_runs = [run for run in list_runs(args.results_dir) if run not in before]
    if len(new_runs) != 1:
        raise RuntimeError(f"expected one new run folder in {args.results_dir}, found {new_runs}")
    return new_runs[0], dict(precision=precision, processes=processes)


@torch.no_grad()
def sample_every_class(checkpoint_path, args):
    """(images (N, C, H, W) in [-1, 1], labels (N,), nfe): --samples-per-class of each class,
    class-major, and the model calls each image cost (NFE: what a sampler's speed is measured in)."""
    import sample
    from helpers.sampling.checkpoint_model import build_model, read_checkpoint
    from helpers.sampling.flags import model_settings, resolve_settings, sampler_settings
    from helpers.sampling.generation import generate, make_sampling
    from helpers.sampling.noise import grid_noise
    settings = sample.parse_args(["--ckpt", checkpoint_path, "--cfg-scale", str(args.cfg_scale),
                                  *sampler_flags(args), "--num-sampling-steps", str(args.sampling_steps)])
    checkpoint, state_dict = read_checkpoint(checkpoint_path, "ema")
    resolve_settings(settings, checkpoint, state_dict, log=lambda message: None)
    model, vae = build_model(model_settings(settings), state_dict, torch.device("cpu"), settings.cfg_scale)
    model_fn, sampler = make_sampling(model, vae, settings.objective_config, sampler_settings(settings),
                                      dict(precision="fp32", channels_last=False, compile=False))
    labels = torch.arange(settings.num_classes).repeat_interleave(args.samples_per_class)
    noise = grid_noise(args.seed, len(labels), settings.num_classes)  # sample.py's per-index noise
    counted = CountedCalls(model_fn)
    images = generate(model, vae, sampler, counted, noise, labels, settings.image_size, torch.device("cpu"),
                      progress=sys.stdout.isatty())
    return images.clamp(-1, 1), labels, counted.calls


class CountedCalls:
    """A model function that counts its calls. Every image is sampled in one batch, so the count is
    the number of function evaluations (NFE) per image, whatever the sampler (an adaptive ODE
    solver's or an SDE's included), which is what samplers are compared at."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def sampler_flags(args):
    """sample.py's flags for the quick start's --sampler."""
    return SAMPLERS[args.objective][args.sampler]


def nearest_neighbours(images, args):
    """Memorisation check: median L2 distance (pixels in [-1, 1]) from each sample to its nearest
    training digit, next to the same for real held-out digits. Samples much closer to the
    training set than held-out digits are would be copies of it."""
    from helpers.data.images import builtin_dataset
    train = builtin_dataset(args.dataset, "train", args.image_size).images
    test = builtin_dataset(args.dataset, "test", args.image_size).images
    flat = lambda x: torch.as_tensor(x).reshape(len(x), -1).double()  # noqa: E731
    nearest = lambda x: torch.cdist(flat(x), flat(train)).min(dim=1).values.median().item()  # noqa: E731
    return {"nn_train_distance_samples": round(nearest(images), 4),
            "nn_train_distance_heldout": round(nearest(test), 4)}


def save_grid(images, samples_per_class, path, upscale=4):
    """One row per class, each image enlarged `upscale` times (nearest) so digits are visible."""
    from torchvision.utils import save_image
    big = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    save_image(big, path, nrow=samples_per_class, normalize=True, value_range=(-1, 1), padding=2,
               pad_value=1.0)


def plot_losses(losses_csv, path, objective="ddpm", model="DiC-Tiny"):
    """The loss logged by train.py (averaged over each --log-every window), on a log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from helpers.utils.log import read_losses
    steps, losses = read_losses(losses_csv)
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot(steps, losses, marker=".")
    axis.set_xlabel("step")
    axis.set_ylabel("train loss (mse + vb)" if objective == "ddpm" else "train loss (velocity mse)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.set_title(f"{model} on digits ({objective})")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def judge(images, labels, args, classifier=None):
    """Quality figures of the samples against the real digits (helpers/evaluation/quality.py);
    `classifier`: the judge already fitted (bench/sampler_sweep.py judges many sample sets)."""
    from helpers.data.images import builtin_dataset
    from helpers.evaluation.quality import evaluate_samples
    train = builtin_dataset(args.dataset, "train", args.image_size)
    test = builtin_dataset(args.dataset, "test", args.image_size)
    return evaluate_samples(images, labels, train.images, train.labels, test.images, test.labels,
                            seed=args.seed, classifier=classifier)


def main(args):
    start = time.time()
    run_dir, launch = train_model(args)
    checkpoint_path = os.path.join(run_dir, "checkpoints", f"{args.steps:07d}.pt")
    trained = time.time()

    print(f"Sampling {args.samples_per_class} images of each class "
          f"({args.objective}: {args.sampler}, {args.sampling_steps} steps, cfg {args.cfg_scale}) ...", flush=True)
    images, labels, nfe = sample_every_class(checkpoint_path, args)
    grid_path = os.path.join(run_dir, "samples.png")
    save_grid(images, args.samples_per_class, grid_path)
    curve_path = os.path.join(run_dir, "loss_curve.png")
    plot_losses(os.path.join(run_dir, "losses.csv"), curve_path, args.objective, args.model)
    sampled = time.time()

    figures = judge(images, labels, args)
    figures.update(nearest_neighbours(images, args))
    figures.update(train_seconds=round(trained - start, 1), sample_seconds=round(sampled - trained, 1),
                   total_seconds=round(time.time() - start, 1), objective=args.objective, steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, cfg_scale=args.cfg_scale,
                   sampler=args.sampler, sampling_steps=args.sampling_steps, nfe=nfe,
                   class_dropout_prob=args.class_dropout_prob, **launch)
    quality_path = os.path.join(run_dir, "quality.json")
    atomic_write_text(quality_path, json.dumps(figures, indent=2) + "\n")

    print(f"Judge (MLP on real training digits), held-out accuracy: "
          f"{100 * figures['classifier_test_accuracy']:.1f}%")
    print(f"Sample class accuracy (cfg {args.cfg_scale}): {100 * figures['sample_accuracy']:.1f}% "
          f"of {figures['num_samples']} samples")
    print(f"Frechet distance in the judge's features: samples vs real held-out "
          f"{figures['frechet_samples_vs_test']:.2f}; floor, real train vs real held-out "
          f"{figures['frechet_train_vs_test']:.2f}")
    print(f"Nearest training digit (median L2 distance): samples "
          f"{figures['nn_train_distance_samples']:.2f}; real held-out {figures['nn_train_distance_heldout']:.2f} "
          f"(samples much closer than held-out digits would be copies)")
    print(f"Wrote {grid_path}, {curve_path} and {quality_path} "
          f"({figures['total_seconds']:.0f} s in all)")
    return figures


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train, sample and judge DiC-Tiny on built-in digits.")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="DiC-Tiny")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--objective", choices=list(SAMPLERS), default="ddpm",
                        help="ddpm: DiT's diffusion; sit: SiT's flow matching; rf: REPA's rectified flow "
                             "(t = 1 is noise; without --repa, which needs an encoder) (the sampler follows)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=None,
                        help="higher than the paper's 1e-4: a 0.25-1.3 M parameter model on 1,438 images "
                             f"(default {DEFAULT_LR:g}; " + ", ".join(f"{k}-*: {v:g}" for k, v in LR_DEFAULTS.items())
                             + ")")
    parser.add_argument("--ema-decay", type=float, default=0.999,
                        help="shorter than the paper's 0.9999, which averages over ~10k steps")
    parser.add_argument("--class-dropout-prob", type=float, default=None,
                        help="train.py's; default 0 at cfg 1 (a model that is never guided needs no null "
                             "label, and learns the classes better without one: README), else DiT's 0.1")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--samples-per-class", type=int, default=10)
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance; 1 = none (default: " +
                             ", ".join(f"{k} {v}" for k, v in CFG_DEFAULTS.items()) + ")")
    parser.add_argument("--sampler", default=None,
                        help="; ".join(f"{k}: {'|'.join(v)}" for k, v in SAMPLERS.items()) + " (ODE, or SDE) "
                             "(default: " + ", ".join(f"{k} {v[0]}" for k, v in SAMPLER_DEFAULTS.items()) + ")")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="default: " + ", ".join(f"{k} {v[1]}" for k, v in SAMPLER_DEFAULTS.items()))
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="training precision; auto: bf16 where the CPU/GPU runs it natively, else fp32 "
                             "(sampling stays fp32)")
    parser.add_argument("--processes", type=int, default=None,
                        help="training processes (default: one per idle CPU core, one on a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sampler, steps = SAMPLER_DEFAULTS[args.objective]
    args.sampler = args.sampler or sampler
    args.sampling_steps = args.sampling_steps or steps
    args.cfg_scale = CFG_DEFAULTS[args.objective] if args.cfg_scale is None else args.cfg_scale
    if args.lr is None:
        args.lr = LR_DEFAULTS.get(family(args.model), DEFAULT_LR)
    if args.class_dropout_prob is None:
        args.class_dropout_prob = 0.0 if args.cfg_scale == 1 else 0.1
    allowed = tuple(SAMPLERS[args.objective])
    if args.sampler not in allowed:
        parser.error(f"--sampler {args.sampler} does not sample --objective {args.objective}: "
                     f"choose one of {', '.join(allowed)}")
    return args


if __name__ == "__main__":
    main(parse_args())
