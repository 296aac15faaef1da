"""The sampling scripts' flags (sample.py, sample_ddp.py) and the one place that reads them: the
parser pieces, the checks that need no checkpoint, the settings left unset filled from the
checkpoint's saved training args (else defaults), and the typed settings the helpers take.

    args = parse_with_model_overrides(parser)             # add_model_args, add_sampling_args, ...
    resolve_settings(args, checkpoint, state_dict)        # fills args in place
    model_settings(args), sampler_settings(args)          # -> ModelSettings, SamplerSettings
"""
import argparse
import sys
from dataclasses import fields

from helpers.data.images import BUILTIN_DATASETS
from helpers.data.vae import downsample_factor_of_spec
from helpers.sampling.checkpoint_model import (ModelSettings, check_label, check_model_name, head_learns_sigma,
                                               identify_model)
from helpers.sampling.dpm_solver import check_num_steps
from helpers.sampling.guidance import GUIDE_CHANNELS
from helpers.sampling.rf_samplers import RF_ODE_METHODS, RF_SDE_METHOD
from helpers.sampling.samplers import (DDPM_SAMPLERS, DEFAULT_STEPS, DIFFUSION_FORMS, LAST_STEPS, SDE_METHODS,
                                       SIT_MODES, SamplerSettings)
from helpers.training.objectives import add_objective_args, objective_from_args, objective_of_checkpoint
from helpers.training.runs import saved_args
from helpers.utils.cli import JobError, one_line
from helpers.utils.fastpath import PRECISION_CHOICES, bf16_support, choose_precision, configure_tf32, precision_line
from helpers.utils.models import canonical_name, parse_args_with_overrides
from helpers.utils.releases import release_objective, sampling_args

# The labels DiT's sample.py conditions on (ImageNet ids).
DIT_DEFAULT_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
DEFAULTS = {"model": "DiC-XL", "image_size": 256, "num_classes": 1000, "vae": "ema"}

#################################################################################
#                       Command-line flags both scripts take                    #
#################################################################################

def add_model_args(parser):
    """The checkpoint and the model/VAE settings (unset ones come from the checkpoint's args)."""
    parser.add_argument("--ckpt", type=str, required=True,
                        help="checkpoint: ours, an official DiC/DiT file, or a bare state_dict")
    parser.add_argument("--weights", type=str, choices=["ema", "model"], default="ema",
                        help="which weights of our/DiT's checkpoint to use (default: ema)")
    parser.add_argument("--model", type=str, default=None,
                        help="model name, e.g. DiC-XL or DiT-XL/2 (SiT-XL/2: the same network; default: "
                             "checkpoint's, else DiC-XL)")
    parser.add_argument("--image-size", "--resolution", dest="image_size", type=int, default=None,
                        help="image side in pixels (--resolution: REPA's name; default: checkpoint's, else 256)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="number of classes (default: checkpoint's, else 1000)")
    parser.add_argument("--vae", type=str, default=None,
                        help="ema, mse, a local AutoencoderKL folder, or none for pixel space "
                             "(default: checkpoint's, else ema)")
    parser.add_argument("--in-channels", type=int, default=None,
                        help="image channels of a pixel-space model (--vae none); default: checkpoint's")
    return parser


def add_sampling_args(parser, cfg_scale, cfg_scale_source):
    """Guidance, the reverse process and the objective of files that do not record it; each script
    keeps its own --cfg-scale default (and says whose)."""
    parser.add_argument("--cfg-scale", type=float, default=cfg_scale,
                        help=f"classifier-free guidance scale; 1 = no guidance (default: {cfg_scale}, {cfg_scale_source})")
    parser.add_argument("--guide-channels", type=str, choices=list(GUIDE_CHANNELS), default=None,
                        help="official: guide the first 3 latent channels as DiT/DiC/SiT; all: every channel "
                             "(default: all for REPA's rf checkpoints, as REPA; official otherwise)")
    add_sampler_args(parser)
    add_objective_args(parser, sampling=True)
    return parser


def add_sampler_args(parser):
    """The reverse-process flags of both sampling scripts (which apply depends on the objective)."""
    parser.add_argument("--num-sampling-steps", "--num-steps", dest="num_sampling_steps", type=int, default=None,
                        help="steps (--num-steps: REPA's name; default: ddpm 250, ddim 50, dpm-solver 20, ode 50, "
                             "sde 250)")
    parser.add_argument("--sampler", type=str, choices=DDPM_SAMPLERS, default="ddpm",
                        help="DDPM checkpoints: ddpm (ancestral), ddim (eta 0) or dpm-solver (DPM-Solver++)")
    sit = parser.add_argument_group("flow-matching (SiT's sit and REPA's rf) checkpoints")
    sit.add_argument("--mode", type=str.lower, choices=SIT_MODES, default="ode",
                     help="ode or sde sampling (SiT's ODE / SDE too, also as the first argument, as SiT's scripts)")
    sit.add_argument("--sampling-method", type=str, default=None,
                     help="sit ode: a torchdiffeq method (default dopri5); sit sde: Euler (default) or Heun; rf: "
                          "euler (ode), euler-maruyama (sde)")
    sit.add_argument("--heun", action="store_true",
                     help="rf, --mode ode: Heun's correction on every step but the last (REPA's --heun)")
    sit.add_argument("--atol", type=float, default=1e-6, help="ode: absolute tolerance")
    sit.add_argument("--rtol", type=float, default=1e-3, help="ode: relative tolerance")
    sit.add_argument("--reverse", action="store_true", help="ode: integrate data -> noise (SiT's flag)")
    sit.add_argument("--likelihood", action="store_true", help="ode: also report each sample's NLL (bits/dim)")
    sit.add_argument("--diffusion-form", type=str, choices=DIFFUSION_FORMS, default="sigma",
                     help="sde: the diffusion coefficient w(t)")
    sit.add_argument("--diffusion-norm", type=float, default=1.0, help="sde: scale of w(t)")
    sit.add_argument("--last-step", type=str, choices=LAST_STEPS, default="Mean", help="sde: the last step")
    sit.add_argument("--last-step-size", type=float, default=0.04, help="sde: size of the last step")
    sit.add_argument("--guidance-low", type=float, default=0.0,
                     help="guide only where REPA's time (1 = noise) is >= this (default 0)")
    sit.add_argument("--guidance-high", type=float, default=1.0,
                     help="guide only where REPA's time (1 = noise) is <= this (default 1)")
    for flag, kind in (("--encoder-depth", int), ("--projector-embed-dims", str)):   # so REPA's commands run as typed
        sit.add_argument(flag, type=kind, default=None,
                         help="REPA's generate.py flag: it shapes the projectors, which sampling drops (not used)")
    return parser


def add_speed_args(parser):
    """The fast path, with the trainers' meanings. What changes the numbers (bf16, compile) is opt-in."""
    parser.add_argument("--precision", type=str, choices=PRECISION_CHOICES, default="auto",
                        help="auto (default: tf32, TF32 matmuls on GPU as DiT, plain fp32 on CPU), tf32, fp32 "
                             "(strict) or bf16 (autocast; refused where the device has no bf16 instructions)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                        help="NHWC weights and activations (default off)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the model call (default off)")
    return parser


def parse_with_model_overrides(parser, argv=None):
    """Parse flags; leftover official --network_g__key=value overrides become args.model_kwargs.
    SiT's scripts take the mode first (`sample.py SDE ...`): that is --mode sde here."""
    argv = mode_first(argv)
    if argv[:1] == ["--mode"] and any(arg == "--mode" or arg.startswith("--mode=") for arg in argv[2:]):
        parser.error(f"the mode is given twice ({argv[1].upper()} first, then --mode): give it once")
    args, overrides = parse_args_with_overrides(parser, argv)
    args.model_kwargs = overrides
    return args


def mode_first(argv):
    """argv with SiT's leading mode (ODE or SDE, any case) spelled as --mode: SiT's scripts read their
    mode from the first argument, so that is the one place it can be."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].lower() in SIT_MODES:
        return ["--mode", argv[0].lower(), *argv[1:]]
    return argv


def setup_speed(args, device, log=print):
    """Settle --precision on `device` (auto -> tf32; bf16 refused where the device has no bf16
    instructions), say it in one line through `log` (None: silent), apply TF32 for tf32/bf16;
    returns make_model_fn's fast-path keyword arguments."""
    args.precision = choose_precision(args.precision, device)
    if log is not None:
        log(precision_line(args.precision, bf16_support(device)))
    configure_tf32(args.precision in ("tf32", "bf16"))
    return dict(precision=args.precision, channels_last=bool(args.channels_last), compile=bool(args.compile))


def describe_speed(speed):
    """'fp32, channels_last off, compile off' for the logs."""
    return (f"{speed['precision']}, channels_last {'on' if speed['channels_last'] else 'off'}, "
            f"compile {'on' if speed['compile'] else 'off'}")


#################################################################################
#                  Checks, and the unset settings from the checkpoint            #
#################################################################################

def check_common_args(args):
    """Checks that need no checkpoint: fail before any work is done."""
    if args.cfg_scale < 1.0:
        raise JobError(f"--cfg-scale must be >= 1 (1 = no guidance), got {args.cfg_scale}")
    if args.num_sampling_steps is not None and args.num_sampling_steps < 2:   # DiT's respacing needs 2
        raise JobError(f"--num-sampling-steps must be >= 2, got {args.num_sampling_steps}")
    if args.model is not None:
        check_model_name(args.model)
    seed = getattr(args, "seed", getattr(args, "global_seed", 0))
    if seed < 0:
        raise JobError(f"the seed must be >= 0, got {seed}")
    for flag, value in (("--in-channels", args.in_channels), ("--image-size", args.image_size),
                        ("--num-classes", args.num_classes)):
        if value is not None and value < 1:
            raise JobError(f"{flag} must be >= 1, got {value}")
    if args.vae is not None:
        try:   # a folder's config.json read, nothing loaded
            downsample_factor_of_spec(args.vae)
        except ValueError as e:
            raise JobError(one_line(e)) from e
    negative = [label for label in getattr(args, "class_labels", None) or [] if label < 0]
    if negative:   # the upper bound is the checkpoint's class count (resolve_settings)
        raise JobError(f"class label {negative[0]} is negative: labels are class indices 0, 1, ...")


def _saved_in_channels(saved):
    """Image channels a pixel-space run trained on, if its saved args say so."""
    for key in ("in_channels", "channels", "image_channels"):
        if isinstance(saved.get(key), int):
            return saved[key]
    dataset = saved.get("dataset")
    info = BUILTIN_DATASETS.get(dataset) if isinstance(dataset, str) else None  # (channels, side, classes)
    return info[0] if info else None


def _saved_model_kwargs(saved):
    """Constructor overrides the run was trained with (e.g. --network_g__skip_stride=1)."""
    for key in ("model_overrides", "model_kwargs", "network_g"):
        if isinstance(saved.get(key), dict):
            return dict(saved[key])
    return {}


def resolve_settings(args, checkpoint, state_dict, log=print):
    """Fill the settings the user left unset (None) from the checkpoint's saved args, else defaults.

    Modifies `args` in place: model, image_size, num_classes, vae, in_channels (pixel space),
    model_kwargs (constructor overrides: saved ones, then the command line's), objective_config
    (recorded, else a release's convention recognised from the file: helpers/utils/releases.py), the
    model's registered name (SiT-XL/2 -> DiT-XL/2), guide_channels and the reverse-process flags
    (resolve_sampler_args). Says what it took and what it recognised.
    """
    saved = sampling_args(saved_args(checkpoint), checkpoint)
    taken = []
    for name, default in DEFAULTS.items():
        if getattr(args, name) is not None:
            continue
        if name == "model" and saved.get("model") is None:
            continue   # identified from the weights below
        value = saved.get(name)
        if name == "vae" and value is None and saved:
            value = saved.get("vae_path")
        if value is not None:
            setattr(args, name, value)
            taken.append(f"--{name.replace('_', '-')} {value}")
        else:
            setattr(args, name, default)
    if str(args.vae).lower() == "none":
        args.vae = "none"
        if args.in_channels is None:
            args.in_channels = _saved_in_channels(saved)
            if args.in_channels is not None:
                taken.append(f"--in-channels {args.in_channels}")
            else:  # the first conv's input channels (DiC's Conv3x3 and DiT's patch conv alike)
                weight = state_dict.get("x_embedder.proj.weight")
                args.in_channels = int(weight.shape[1]) if weight is not None and weight.ndim == 4 else 3
    args.model_kwargs = {**_saved_model_kwargs(saved), **getattr(args, "model_kwargs", {})}
    recorded, recognised = objective_of_checkpoint(checkpoint), None
    if recorded is None:   # a release (REPA's layout, SiT's under its name) says it by its content
        recorded, recognised = release_objective(checkpoint, state_dict, args.model)
    sizes = dict(image_size=args.image_size, vae=args.vae, in_channels=args.in_channels,   # fix the weights' shapes
                 num_classes=args.num_classes)
    if recorded is None and args.learn_sigma is None:   # official/bare files: the head says it
        args.learn_sigma = head_learns_sigma(state_dict, args.model, model_kwargs=args.model_kwargs, **sizes)
    args.objective_config = objective_from_args(args, base=recorded)
    if args.model is None:
        args.model = identify_model(state_dict, learn_sigma=args.objective_config["learn_sigma"], **sizes) \
            or DEFAULTS["model"]
    check_model_name(args.model)
    args.model = canonical_name(args.model)
    if args.guide_channels is None:   # REPA guides every channel; DiT, DiC and SiT the first 3
        args.guide_channels = "all" if args.objective_config["name"] == "rf" else "official"
    resolve_sampler_args(args, args.objective_config)
    for label in getattr(args, "class_labels", None) or []:
        check_label(label, args.num_classes)
    if taken and log is not None:
        log(f"Using the checkpoint's training settings: {' '.join(taken)} (pass them to override)")
    if recognised and recorded["name"] == args.objective_config["name"] and log is not None:
        log(recognised)
    return args


def resolve_sampler_args(args, objective_config):
    """Check the flags against the checkpoint's objective (one line for a wrong combination) and
    fill the step count and ODE/SDE method defaults."""
    name, heun = objective_config["name"], getattr(args, "heun", False)
    if heun and not (name == "rf" and args.mode == "ode"):
        raise JobError("--heun is REPA's ODE option (--mode ode on an rf checkpoint)" +
                       (": REPA's SDE has no Heun step" if name == "rf" else
                        "; for SiT's checkpoints use --sampling-method heun2 (ODE) or Heun (SDE)" if name == "sit" else
                        f"; this checkpoint was trained with {name}"))
    if name == "rf":
        resolve_rf_sampler(args)
        kind = args.mode
    elif name == "sit":
        if args.sampler != "ddpm":
            raise JobError(f"--sampler {args.sampler} is for DDPM checkpoints; this one was trained with flow "
                           f"matching (sit): use --mode ode or --mode sde")
        method = args.sampling_method or ("dopri5" if args.mode == "ode" else "Euler")
        if args.mode == "sde" and method not in SDE_METHODS:
            raise JobError(f"--sampling-method {method} is not an SDE method: choose one of {', '.join(SDE_METHODS)}")
        if args.mode == "ode" and method in SDE_METHODS:
            raise JobError(f"--sampling-method {method} is an SDE method: add --mode sde, or pick an ODE "
                           f"method (dopri5, euler, heun2, rk4, ...)")
        if args.likelihood and (args.mode != "ode" or args.cfg_scale != 1.0):
            raise JobError("--likelihood needs --mode ode and --cfg-scale 1 (a guided field has no likelihood)")
        args.sampling_method = method
        kind = args.mode
    else:
        sit_flags = [flag for flag, value, default in (
            ("--mode", args.mode, "ode"), ("--sampling-method", args.sampling_method, None),
            ("--likelihood", args.likelihood, False), ("--reverse", args.reverse, False),
            ("--guidance-low", args.guidance_low, 0.0), ("--guidance-high", args.guidance_high, 1.0))
            if value != default]
        if sit_flags:
            raise JobError(f"{sit_flags[0]} is for flow-matching (sit) checkpoints; this one was trained with "
                           f"DDPM: use --sampler ddpm|ddim|dpm-solver")
        kind = args.sampler
    if not 0 <= args.guidance_low <= args.guidance_high <= 1:
        raise JobError(f"the guidance interval needs 0 <= --guidance-low <= --guidance-high <= 1, got "
                       f"{args.guidance_low}, {args.guidance_high}")
    if args.num_sampling_steps is None:
        args.num_sampling_steps = DEFAULT_STEPS[kind]
    if args.num_sampling_steps < 2:
        raise JobError(f"--num-sampling-steps must be >= 2, got {args.num_sampling_steps}")
    if kind == "dpm-solver":
        check_num_steps(args.num_sampling_steps)
    return args


def resolve_rf_sampler(args):
    """REPA's samplers for an rf checkpoint: sampling_method euler or heun (--heun) for --mode ode,
    euler-maruyama for sde; SiT's solver settings are refused (REPA's samplers have none)."""
    if args.sampler != "ddpm":
        raise JobError(f"--sampler {args.sampler} is for DDPM checkpoints; this one was trained with REPA's "
                       f"rectified flow (rf): use --mode ode or --mode sde")
    sit_only = [flag for flag, value, default in (
        ("--atol", args.atol, 1e-6), ("--rtol", args.rtol, 1e-3), ("--reverse", args.reverse, False),
        ("--likelihood", args.likelihood, False), ("--diffusion-form", args.diffusion_form, "sigma"),
        ("--diffusion-norm", args.diffusion_norm, 1.0), ("--last-step", args.last_step, "Mean"),
        ("--last-step-size", args.last_step_size, 0.04)) if value != default]
    if sit_only:
        raise JobError(f"{sit_only[0]} is a setting of SiT's samplers; this checkpoint was trained with REPA's "
                       f"rectified flow (rf) and samples with REPA's: --mode ode (Euler, --heun) or --mode sde "
                       f"(Euler-Maruyama, last step 0.04)")
    methods = RF_ODE_METHODS if args.mode == "ode" else (RF_SDE_METHOD,)
    method = "heun" if getattr(args, "heun", False) else (args.sampling_method or methods[0]).lower()
    if method not in methods or (args.sampling_method and args.sampling_method.lower() != method):
        raise JobError(f"--sampling-method {args.sampling_method}: REPA's {args.mode.upper()} sampler is "
                       f"{' or '.join(methods)} (--heun for heun)")
    args.sampling_method = method


#################################################################################
#                       The typed settings the helpers take                     #
#################################################################################

def sampler_settings(args):
    """SamplerSettings (guidance and the reverse process) of resolved flags."""
    return SamplerSettings(**{field.name: getattr(args, field.name) for field in fields(SamplerSettings)})


def model_settings(args):
    """ModelSettings (what build_model reads) of resolved flags."""
    return ModelSettings(model=args.model, image_size=args.image_size, num_classes=args.num_classes, vae=args.vae,
                         in_channels=args.in_channels, model_kwargs=args.model_kwargs,
                         learn_sigma=args.objective_config["learn_sigma"])
