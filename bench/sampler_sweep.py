"""Samplers of the quick-start model ranked by quality per model call.

    python bench/sampler_sweep.py          # trains the quick start's DDPM, SiT and rf models (2 seeds each) first
    python bench/sampler_sweep.py --ckpt A.pt --ckpt B.pt --out-dir sweeps/ddpm    # given checkpoints
    python bench/sampler_sweep.py --rows sweeps/ddpm/sweep.json --rows sweeps/sit/sweep.json   # table + plot

Every sampler of a checkpoint's objective (SWEEPS) samples the same classes from the same per-index
noise through the quick start's own code (quickstart.sample_every_class, i.e. sample.py's samplers),
and the quick start's judge (helpers/evaluation/quality.py) scores the images: class accuracy and
Fréchet distance to real held-out digits, against the model calls per image (NFE), counted rather
than assumed (Heun's and the SDE's last step cost what they cost). The figures are averaged over
the checkpoints of an objective (models from other seeds differ by about a point). Prints a
markdown table, names the cheapest sampler within 0.5 points of the best accuracy (the quick
start's default sampler), writes sweep.json (every checkpoint's rows) in --out-dir and the plot
(--plot, default docs/sampler_sweep.png). Sweeps of several objectives can run in parallel, one
process each, and be tabled together with --rows.
"""
import argparse
import itertools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import quickstart  # noqa: E402

# (quick-start --sampler, --sampling-steps) of each objective, cheapest last within a sampler.
SWEEPS = {
    "ddpm": [("ddpm", 250), ("ddpm", 100), ("ddpm", 50), ("ddim", 100), ("ddim", 50), ("ddim", 25),
             ("ddim", 10), ("dpm-solver", 25), ("dpm-solver", 20), ("dpm-solver", 10), ("dpm-solver", 5)],
    "sit": [("euler", 100), ("euler", 50), ("euler", 25), ("euler", 10), ("heun", 50), ("heun", 25),
            ("heun", 10), ("heun", 5), ("sde", 250), ("sde", 100), ("sde", 50), ("sde", 25), ("dopri5", 50)],
    "rf": [("euler", 100), ("euler", 50), ("euler", 25), ("euler", 10), ("heun", 50), ("heun", 25),
           ("heun", 10), ("heun", 5), ("sde", 250), ("sde", 100), ("sde", 50), ("sde", 25)],
}
TOLERANCE = 0.005   # "within 0.5 points of the best class accuracy"


def checkpoint_objective(path):
    """The objective name a checkpoint was trained with ("ddpm" for files that record none)."""
    from helpers.training.objectives import objective_of_checkpoint
    from helpers.utils.checkpoint import load_checkpoint_file
    return (objective_of_checkpoint(load_checkpoint_file(path)) or {"name": "ddpm"})["name"]


def sweep_checkpoint(path, samples_per_class, seed, samplers=None, log=print):
    """One row per sampler of the checkpoint's objective: NFE, accuracy, Fréchet, floor, seconds.
    The judge is fitted once per checkpoint (it is the same deterministic fit every time)."""
    from helpers.data.images import builtin_dataset
    from helpers.evaluation.quality import train_classifier
    objective = checkpoint_objective(path)
    train = builtin_dataset("digits", "train", 16)
    judge = train_classifier(train.images, train.labels, seed=seed)
    rows = []
    for sampler, steps in samplers or SWEEPS[objective]:
        args = quickstart.parse_args(["--objective", objective, "--sampler", sampler, "--sampling-steps", str(steps),
                                      "--samples-per-class", str(samples_per_class), "--seed", str(seed)])
        start = time.time()
        images, labels, nfe = quickstart.sample_every_class(path, args)
        seconds = time.time() - start
        figures = quickstart.judge(images, labels, args, classifier=judge)
        rows.append(dict(objective=objective, sampler=sampler, steps=steps, nfe=nfe,
                         accuracy=figures["sample_accuracy"], frechet=figures["frechet_samples_vs_test"],
                         floor=figures["frechet_train_vs_test"], num_samples=figures["num_samples"],
                         seconds=round(seconds, 1), checkpoint=path))
        log(f"  {objective} {sampler:10s} {steps:4d} steps: NFE {nfe:4d}, accuracy {100 * rows[-1]['accuracy']:5.1f}%, "
            f"Frechet {rows[-1]['frechet']:6.2f} (floor {rows[-1]['floor']:.2f}), {seconds:.0f} s")
    return rows


def cheapest_near_best(rows, tolerance=TOLERANCE):
    """The row with the fewest model calls among those within `tolerance` of the best accuracy (ties:
    the lower Fréchet distance): the cheapest sampler that gives up nothing measurable."""
    best = max(row["accuracy"] for row in rows)
    near = [row for row in rows if row["accuracy"] >= best - tolerance - 1e-9]
    return min(near, key=lambda row: (row["nfe"], row["frechet"]))


def markdown_table(rows):
    """The sweep as a README table, one line per sampler, the picked default in bold."""
    lines = ["| objective | sampler | steps | NFE | class accuracy | Fréchet (floor) |",
             "|---|---|---:|---:|---:|---:|"]
    for objective in dict.fromkeys(row["objective"] for row in rows):
        mine = [row for row in rows if row["objective"] == objective]
        pick = cheapest_near_best(mine)
        for row in sorted(mine, key=lambda r: (r["sampler"], -r["nfe"])):
            mark = "**" if row is pick else ""
            lines.append(f"| {objective} | {mark}{row['sampler']}{mark} | {row['steps']} | {row['nfe']} | "
                         f"{100 * row['accuracy']:.1f}% | {row['frechet']:.2f} ({row['floor']:.2f}) |")
    return "\n".join(lines)


def plot(rows, path):
    """Accuracy and Fréchet distance against NFE (log scale), a line per sampler, the floor dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    groups = dict.fromkeys((row["objective"], row["sampler"]) for row in rows)
    for objective, sampler in groups:
        mine = sorted((r for r in rows if (r["objective"], r["sampler"]) == (objective, sampler)), key=lambda r: r["nfe"])
        style = {"ddpm": "-", "sit": "--"}.get(objective, ":")
        label = f"{objective}: {sampler}"
        left.plot([r["nfe"] for r in mine], [100 * r["accuracy"] for r in mine], style, marker="o", label=label)
        right.plot([r["nfe"] for r in mine], [r["frechet"] for r in mine], style, marker="o", label=label)
    right.axhline(rows[0]["floor"], color="grey", linestyle=":", label="floor (real vs real)")
    for axis, name in ((left, "class accuracy (%)"), (right, "Fréchet distance (judge's features)")):
        axis.set_xscale("log")
        axis.set_xlabel("model calls per image (NFE)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    right.legend(fontsize=7, ncol=2)
    figure.suptitle(f"Quick-start samplers, {rows[0]['num_samples']} samples each (cfg 1)"
                    + (f", over {rows[0]['models']} models per objective" if rows[0].get("models", 1) > 1 else ""),
                    fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def train_quickstart_models(results_dir, seed):
    """The quick start's models (DDPM, SiT and REPA's rf, its default recipe, seeds `seed` and
    `seed` + 1), trained as `python quickstart.py` does."""
    paths = []
    for objective, model_seed in itertools.product(SWEEPS, (seed, seed + 1)):
        args = quickstart.parse_args(["--objective", objective, "--results-dir", results_dir, "--seed", str(model_seed)])
        run_dir, _ = quickstart.train_model(args)
        paths.append(os.path.join(run_dir, "checkpoints", f"{args.steps:07d}.pt"))
    return paths


def average_over_models(rows):
    """One row per (objective, sampler, steps): accuracy, Fréchet, floor and NFE averaged over the
    checkpoints swept (each judged on as many samples), `models` counting them. Models trained
    from other seeds differ by about a point of accuracy, as much as the samplers do: averaging
    over them is what makes "within 0.5 points" mean something."""
    groups = {}
    for row in rows:
        groups.setdefault((row["objective"], row["sampler"], row["steps"]), []).append(row)
    mean = lambda rows, key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
    return [dict(objective=objective, sampler=sampler, steps=steps, nfe=round(mean(group, "nfe")),
                 accuracy=mean(group, "accuracy"), frechet=mean(group, "frechet"), floor=mean(group, "floor"),
                 num_samples=sum(row["num_samples"] for row in group), models=len(group))
            for (objective, sampler, steps), group in groups.items()]


def main(args):
    rows = []
    for path in args.rows or []:
        with open(path) as f:
            rows += json.load(f)
    paths = args.ckpt or ([] if args.rows else train_quickstart_models(os.path.join(args.out_dir, "runs"), args.seed))
    for path in paths:
        print(f"Sampler sweep of {path} ({args.samples_per_class} samples per class, cfg 1):", flush=True)
        rows += sweep_checkpoint(path, args.samples_per_class, args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=2)
    averaged = average_over_models(rows)
    print(markdown_table(averaged))
    for objective in dict.fromkeys(row["objective"] for row in averaged):
        pick = cheapest_near_best([row for row in averaged if row["objective"] == objective])
        print(f"{objective}: cheapest within {100 * TOLERANCE:.1f} points of the best accuracy: "
              f"{pick['sampler']} {pick['steps']} steps ({pick['nfe']} NFE)")
    plot(averaged, args.plot)
    print(f"Wrote {os.path.join(args.out_dir, 'sweep.json')} and {args.plot}")
    return averaged


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Quick-start samplers: class accuracy and Fréchet distance vs NFE.")
    parser.add_argument("--ckpt", action="append", default=None,
                        help="a quick-start checkpoint (repeat for DDPM and SiT); default: train both first")
    parser.add_argument("--samples-per-class", type=int, default=50,
                        help="more than the quick start's 10, so 0.5 points are resolved (500 samples: 0.2)")
    parser.add_argument("--rows", action="append", default=None,
                        help="a sweep.json of an earlier sweep to include (repeat): sweeps run in parallel, tabled once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="results/sampler_sweep")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "sampler_sweep.png"))
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
