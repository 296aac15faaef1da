"""The trainers' command line: DiT/DiC-compatible flags and defaults, the checks each flag gets
on its own (no file touched), what a resumed run takes from its checkpoint's saved flags, and the
small typed configs the training helpers take (the one place outside the scripts that reads `args`)."""
import argparse
from dataclasses import fields

from helpers.utils import fastpath
from helpers.utils.cli import JobError
from helpers.data.images import BUILTIN_DATASETS
from helpers.utils.models import (canonical_name, is_dit, is_model_name, model_names, parse_args_with_overrides,
                                  unknown_model_message)
from helpers.training.monitor import MonitorConfig, add_monitor_args
from helpers.training.objectives import add_objective_args
from helpers.training.repa_objective import RepaConfig, add_repa_args, repa_recipe
from helpers.training.setup import DataConfig


#################################################################################
#                                   Arguments                                   #
#################################################################################

# A step, a checkpoint save or a live-sample/FID pass takes minutes at most; NCCL's default (10 min,
# 30 with some builds) and gloo's (30 min) keep a hung job holding every GPU for that long.
DIST_TIMEOUT_MINUTES = 10.0


def build_parser(description):
    """The command line of both trainers (DiT/DiC-compatible names and defaults)."""
    p = argparse.ArgumentParser(description=description,
                                epilog="Model constructor overrides: --network_g__<keyword>=<value> "
                                       "(e.g. --network_g__skip_stride=1), as in the official DiC script.")
    data = p.add_argument_group("data (exactly one of --data-path, --feature-path, --dataset)")
    data.add_argument("--data-path", type=str, default=None,
                      help="class folders, VAE-encoded on the fly (with --feature-path and --repa: their images)")
    data.add_argument("--feature-path", type=str, default=None, help="precomputed latents (extract_features.py)")
    data.add_argument("--dataset", type=str, default=None, choices=sorted(BUILTIN_DATASETS),
                      help="a built-in pixel-space dataset (no download)")
    data.add_argument("--image-size", type=int, default=None, help="pixels (default 256; 16 for --dataset)")
    data.add_argument("--num-classes", type=int, default=None,
                      help="default: the data's (one per class folder, the latents' max label + 1, the "
                           "built-in dataset's; a resumed run's own)")
    data.add_argument("--vae", type=str, default=None,
                      help="ema | mse | a local AutoencoderKL folder | none (default ema; none for --dataset)")
    data.add_argument("--num-workers", type=int, default=None, help="DataLoader workers per process (default 4)")
    data.add_argument("--skip-nonfinite", action="store_true", help="skip and count latents holding NaN/inf")
    data.add_argument("--allow-empty-classes", action="store_true",
                      help="let empty class folders keep their label index (as torchvision's ImageFolder)")

    model = p.add_argument_group("model and optimisation")
    model.add_argument("--model", type=str, default="DiC-XL", help=f"one of {', '.join(model_names())}")
    model.add_argument("--global-batch-size", type=int, default=256, help="processes x micro-batch x accumulation")
    model.add_argument("--class-dropout-prob", type=float, default=0.1,
                       help="share of labels dropped to the null class in training, which classifier-free "
                            "guidance needs (DiT's 0.1); 0: no null class, sample with --cfg-scale 1")
    model.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    model.add_argument("--draws", type=str, default="per-sample", choices=["per-sample", "global"],
                       help="per-sample: noise/time/label dropout from (seed, step, index), the same on any layout; "
                            "global: DiT's draws from each process's RNG")
    model.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (weight decay 0)")
    model.add_argument("--lr-schedule", type=str, default="constant", choices=["constant", "cosine"],
                       help="constant (DiT's), or cosine: from --lr down to 0 at the run's last step "
                            "(--max-steps, else --epochs)")
    model.add_argument("--precision", type=str, default="auto", choices=list(fastpath.PRECISION_CHOICES),
                       help="auto (default: tf32, the official TF32 on GPU, plain fp32 on CPU), tf32, fp32 (strict) "
                            "or bf16 (autocast; refused where the device has no bf16 instructions)")
    model.add_argument("--max-grad-norm", type=float, default=None,
                       help="clip the gradient norm (default off; 1.0 with --repa, REPA's; inf: never clip)")
    model.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    model.add_argument("--ema-warmup", action="store_true",
                       help="EMA decay min(--ema-decay, (1 + step) / (10 + step)): short runs average less early")
    model.add_argument("--global-seed", type=int, default=0)
    add_objective_args(p)

    fast = p.add_argument_group("fast path (bench/README.md has the timings)")
    fast.add_argument("--fused-adamw", type=str, default="auto", choices=["auto", "on", "off"],
                      help="AdamW kernel: fused where available (auto), or not")
    fast.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                      help="NHWC weights and activations (default off)")
    fast.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                      help="torch.compile the training forward (default off)")

    run = p.add_argument_group("run length, checkpoints and logging")
    run.add_argument("--results-dir", type=str, default="results")
    run.add_argument("--epochs", type=int, default=1400)
    run.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    run.add_argument("--log-every", type=int, default=100)
    run.add_argument("--ckpt-every", type=int, default=50_000)
    run.add_argument("--ckpt", type=str, default=None, help="start a new run from these weights")
    run.add_argument("--resume", type=str, default=None,
                     help="continue a run exactly: a checkpoint, a run folder, or auto")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--dist-timeout", type=float, default=DIST_TIMEOUT_MINUTES,
                     help=f"minutes a process waits for the others in a collective before the job stops, "
                          f"naming the ranks that did not arrive (default {DIST_TIMEOUT_MINUTES:g})")
    add_monitor_args(p)
    add_repa_args(p)
    official = p.add_argument_group("the official DiC train.py's flags (accepted so its commands run)")
    official.add_argument("--model-domain", type=str, default=None, help="unused here (the model comes from --model)")
    official.add_argument("--ckpt-iter", type=int, default=None, help="refused: use --resume with that checkpoint")
    official.add_argument("--start-epoch", type=int, default=None, help="refused: --resume restores the epoch")
    return p


_UNSET = object()


def parse_args(parser, argv=None):
    """Parse known flags plus `--network_g__key=value` overrides; remember which flags were given."""
    args, overrides = parse_args_with_overrides(parser, argv)
    args.model_overrides = overrides
    probe = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != "help"})
    probe, _ = parser.parse_known_args(argv, namespace=probe)
    args.explicit = sorted(k for k, v in vars(probe).items() if v is not _UNSET)
    if args.model_overrides:
        args.explicit.append("model_overrides")
    return args


def resolve_args(args, world_size):
    """Fill dataset-dependent defaults and check every flag on its own (no file is touched)."""
    sources = [name for name, value in (("--data-path", args.data_path and not (args.repa and args.feature_path)),
                                        ("--feature-path", args.feature_path), ("--dataset", args.dataset)) if value]
    if len(sources) != 1:
        raise JobError(f"pass exactly one data source, got {', '.join(sources) or 'none'}: --data-path "
                       f"<class folders>, --feature-path <latents> or --dataset {'|'.join(sorted(BUILTIN_DATASETS))}")
    if args.dataset:
        channels, _, classes = BUILTIN_DATASETS[args.dataset]
        args.vae = "none" if args.vae is None else args.vae
        if str(args.vae).lower() != "none":
            raise JobError(f"--dataset {args.dataset} is {channels}-channel pixel data: drop --vae {args.vae} "
                           f"(built-in datasets train in pixel space)")
        args.image_size = 16 if args.image_size is None else args.image_size
        args.num_classes = classes if args.num_classes is None else args.num_classes
        args.num_workers = 0 if args.num_workers is None else args.num_workers  # data is in memory
    args.num_workers = 4 if args.num_workers is None else args.num_workers
    args.vae = "ema" if args.vae is None else ("none" if str(args.vae).lower() == "none" else args.vae)
    args.image_size = 256 if args.image_size is None else args.image_size
    # --num-classes left unset with --data-path/--feature-path: build_dataset counts the data's classes
    if not is_model_name(args.model):
        raise JobError(unknown_model_message(args.model))
    args.model = canonical_name(args.model)   # SiT-XL/2 (SiT's and REPA's name) trains DiT-XL/2
    for flag, value, low in (("--image-size", args.image_size, 1), ("--num-classes", args.num_classes, 1),
                             ("--global-batch-size", args.global_batch_size, 1), ("--epochs", args.epochs, 1),
                             ("--log-every", args.log_every, 1), ("--ckpt-every", args.ckpt_every, 1),
                             ("--num-workers", args.num_workers, 0), ("--max-steps", args.max_steps, 1),
                             ("--global-seed", args.global_seed, 0), ("--grad-accum-steps", args.grad_accum_steps, 1)):
        if value is not None and value < low:
            raise JobError(f"{flag} must be >= {low}, got {value}")
    if not args.lr > 0:
        raise JobError(f"--lr must be positive, got {args.lr}")
    check_class_dropout(args)
    if not 0 <= args.ema_decay < 1:
        raise JobError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.max_grad_norm is not None and not args.max_grad_norm > 0:
        raise JobError(f"--max-grad-norm must be positive, got {args.max_grad_norm}")
    if args.global_batch_size % world_size:
        raise JobError(f"--global-batch-size {args.global_batch_size} is not divisible by the {world_size} "
                       f"processes: use a multiple of {world_size}")
    if args.global_batch_size % (world_size * args.grad_accum_steps):
        raise JobError(f"--global-batch-size {args.global_batch_size} is not divisible by {world_size} processes x "
                       f"--grad-accum-steps {args.grad_accum_steps}: use a multiple of "
                       f"{world_size * args.grad_accum_steps}")
    monitor_config(args).check()
    if args.repa:
        fill_repa_recipe(args)
        repa_config(args).check()
        if args.feature_path and not args.data_path:
            raise JobError("--repa with --feature-path needs --data-path too: the encoder sees each latent's own image "
                           "(the class folders the latents were extracted from)")
    if args.ckpt_iter is not None:
        raise JobError(f"--ckpt-iter {args.ckpt_iter} is the official script's resume: use --resume "
                       f"{args.results_dir}/<NNN>-{args.model.replace('/', '-')}/checkpoints/{args.ckpt_iter:07d}.pt "
                       f"(or --resume auto for the newest)")
    if args.start_epoch is not None:
        raise JobError(f"--start-epoch {args.start_epoch} is the official script's resume: --resume auto "
                       f"restores the epoch, the position in it and every RNG from the checkpoint")
    if args.resume and args.ckpt:
        raise JobError("--resume and --ckpt do not mix: --resume continues a run (weights, optimizer, data "
                       "position), --ckpt starts a new run from weights")
    return args


def check_class_dropout(args):
    """--class-dropout-prob in [0, 1) (1 would never show the model a label), and one value with a
    --network_g__class_dropout_prob override: runs from before the flag set it that way, so the
    override wins unless the flag says otherwise. 0 leaves the model without a null label, so
    guided live samples are refused here rather than at their first step."""
    override = args.model_overrides.get("class_dropout_prob")
    if override is not None:
        if "class_dropout_prob" in args.explicit and override != args.class_dropout_prob:
            raise JobError(f"--class-dropout-prob {args.class_dropout_prob} and --network_g__class_dropout_prob="
                           f"{override} disagree: pass one of them")
        args.class_dropout_prob = override
    if not isinstance(args.class_dropout_prob, (int, float)) or not 0 <= args.class_dropout_prob < 1:
        raise JobError(f"--class-dropout-prob must be in [0, 1) (0.1 as DiT; 0 for a model never sampled with "
                       f"guidance), got {args.class_dropout_prob!r}")
    if args.class_dropout_prob == 0 and args.sample_cfg_scale > 1:   # live samples and FID guide with the null label
        raise JobError(f"--sample-cfg-scale {args.sample_cfg_scale} needs a null label, which --class-dropout-prob 0 "
                       f"does not train: pass --sample-cfg-scale 1 or a positive --class-dropout-prob")


def fill_repa_recipe(args):
    """--repa's flags left unset take the model family's recipe (repa_recipe: REPA's for DiT, U-REPA's
    for DiC/DiCo; gradient clipping at 1.0), so args.json and the checkpoints record the values used."""
    for key, value in repa_recipe(is_dit(args.model)).items():
        if key in vars(args) and getattr(args, key) is None:
            setattr(args, key, value)


# Flags a resumed run does not take from its checkpoint.
_NOT_INHERITED = {"resume", "ckpt", "explicit", "no_progress", "mixed_precision", "ckpt_iter", "start_epoch"}
# Flags that change the training itself: changed on resume, the run goes on, but not as it would have.
_EXACTNESS = ("data_path", "feature_path", "dataset", "image_size", "vae", "global_batch_size", "global_seed", "draws",
              "lr", "lr_schedule", "precision", "mixed_precision", "max_grad_norm", "model_overrides", "fused_adamw",
              "channels_last", "compile", "objective", "repa", "proj_coeff", "manifold_coeff")

_EXACTNESS += ("class_dropout_prob",)   # how often the null label trains (0: the model has none)


def inherit_args(args, saved):
    """Options not given on the command line come from the resumed run's saved args."""
    if saved and "draws" not in saved and "draws" not in args.explicit:
        args.draws = "global"   # runs from before per-sample draws continue as they started
    for key, value in saved.items():
        if key in vars(args) and key not in args.explicit and key not in _NOT_INHERITED:
            if key == "channels_last" and isinstance(value, str):   # format 1 saved auto|on|off
                value = value == "on"
            setattr(args, key, value)
    if saved.get("repa") and "manifold_coeff" not in saved:
        keep_pre_recipe_repa(args)
    return args


def keep_pre_recipe_repa(args):
    """A --repa run saved before the family recipes went on as it started: no manifold term, its own
    stage choice (auto) and no gradient clipping (inf: clip_grad_norm_ then scales by exactly 1),
    unless the command line says otherwise."""
    for key, value in (("manifold_coeff", 0.0), ("repa_stage", "auto"), ("max_grad_norm", float("inf"))):
        if key not in args.explicit and getattr(args, key) is None:
            setattr(args, key, value)


def warn_changed_settings(args, saved, log):
    for key in _EXACTNESS:
        now, then = getattr(args, key, None), saved.get(key)
        if key == "max_grad_norm" and {now, then} <= {None, float("inf")}:
            continue   # both mean "no clipping"
        if key in saved and then != now:
            log.warning(f"resuming with {key}={getattr(args, key, None)!r} where the run used {saved[key]!r}: "
                        f"training goes on, but not as the uninterrupted run would have")


#################################################################################
#                          Typed configs of the flags                           #
#################################################################################

def config_of(config_class, args):
    """A config dataclass filled from the flags of the same names."""
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})


def data_config(args):
    return config_of(DataConfig, args)


def monitor_config(args):
    return config_of(MonitorConfig, args)


def repa_config(args):
    return config_of(RepaConfig, args)


def run_flags(args):
    """The run's flags as a dict (all but the bookkeeping `explicit`): args.json, the checkpoints'
    "args" (as plain values), the trackers' config."""
    return {k: v for k, v in vars(args).items() if k != "explicit"}
