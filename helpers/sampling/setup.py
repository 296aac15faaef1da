"""What sample.py and sample_ddp.py share: the model and objective from a checkpoint, labels,
per-sample noise, the guided model function and decoding to uint8 (the reverse processes of each
objective are in helpers/sampling/samplers.py).

Determinism: every sample index i owns a CPU torch.Generator seeded from (seed, i). It draws, in
this order, the random class label, the initial noise x_T and every per-step noise of the reverse
process. So the randomness of image i depends only on (seed, i), never on its batch-mates, the batch
size or the number of processes; the diffusion arithmetic itself is DiT's (p_mean_variance,
p_sample's update, ddim_sample). Bit-exact pixels also need the same batch shape for every model
call (see IndexNoise's pad_to): batched kernels round a row the same way at any position of a
batch of one shape, but not necessarily at another batch size. Each fast-path setting
(--precision, --channels-last, --compile) keeps this guarantee as long as every process
uses the same setting; only --precision bf16 changes the numbers beyond float rounding.
"""
import argparse

import torch

from helpers.utils.checkpoint import extract_state_dict, identify_variant, load_checkpoint_file, load_model_weights
from helpers.utils.cli import JobError
from helpers.utils.fastpath import (PRECISIONS, autocast_forward, channels_last_input, configure_tf32,
                              maybe_compile, to_channels_last)
from helpers.data.images import BUILTIN_DATASETS
from helpers.utils.models import create_model, model_names, parse_args_with_overrides
from helpers.training.objectives import add_objective_args, objective_from_args, objective_of_checkpoint
from helpers.training.runs import saved_args
from helpers.sampling.samplers import ReverseProcess, add_sampler_args, resolve_sampler_args
from helpers.utils.seeds import generator
from helpers.data.vae import decode, downsample_factor, downsample_factor_of_spec, latent_channels, load_vae, to_uint8

# The labels DiT's sample.py conditions on (ImageNet ids).
DIT_DEFAULT_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
DEFAULTS = {"model": "DiC-XL", "image_size": 256, "num_classes": 1000, "vae": "ema"}
GUIDE_CHANNELS = {"official": None, "all": "all"}  # --guide-channels -> forward_with_cfg's argument

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
                        help="model name, e.g. DiC-XL or DiT-XL/2 (default: checkpoint's, else DiC-XL)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image side in pixels (default: checkpoint's, else 256)")
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
    parser.add_argument("--guide-channels", type=str, choices=list(GUIDE_CHANNELS), default="official",
                        help="official: guide the first 3 latent channels as DiT/DiC/SiT; all: every channel")
    add_sampler_args(parser)
    add_objective_args(parser, sampling=True)
    return parser


def add_speed_args(parser):
    """The fast path, with the trainers' meanings. What changes the numbers (bf16, compile) is opt-in."""
    parser.add_argument("--precision", type=str, choices=PRECISIONS, default="tf32",
                        help="tf32 (TF32 matmuls on GPU, as DiT), fp32 (strict) or bf16 (autocast)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                        help="NHWC weights and activations (default off)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the model call (default off)")
    return parser


def parse_with_model_overrides(parser, argv=None):
    """Parse flags; leftover official --network_g__key=value overrides become args.model_kwargs."""
    args, overrides = parse_args_with_overrides(parser, argv)
    args.model_kwargs = overrides
    return args


def setup_speed(args):
    """Apply TF32 for --precision tf32/bf16; returns make_model_fn's fast-path keyword arguments."""
    configure_tf32(args.precision in ("tf32", "bf16"))
    return dict(precision=args.precision, channels_last=bool(args.channels_last), compile=bool(args.compile))


def describe_speed(speed):
    """'fp32, channels_last off, compile off' for the logs."""
    return (f"{speed['precision']}, channels_last {'on' if speed['channels_last'] else 'off'}, "
            f"compile {'on' if speed['compile'] else 'off'}")


#################################################################################
#                           Checkpoint -> settings -> model                     #
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
    if args.in_channels is not None and args.in_channels < 1:
        raise JobError(f"--in-channels must be >= 1, got {args.in_channels}")


def read_checkpoint(path, weights):
    """(checkpoint, state_dict) with `weights` ("ema" or "model") picked out of ours/DiT's/bare files."""
    checkpoint = load_checkpoint_file(path)
    try:
        state_dict = extract_state_dict(checkpoint, which=weights)
    except JobError as e:
        if weights == "ema" and isinstance(checkpoint, dict) and "model" in checkpoint:
            raise JobError(f"checkpoint {path} has no 'ema' weights: use --weights model "
                                  f"to sample with its raw training weights") from e
        raise
    return checkpoint, state_dict


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

    Modifies `args` in place: model, image_size, num_classes, vae, in_channels (pixel space) and
    model_kwargs (constructor overrides: saved ones, then the command line's). Says what it took.
    """
    saved = saved_args(checkpoint)
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
    recorded = objective_of_checkpoint(checkpoint)
    if recorded is None and args.learn_sigma is None:   # official/bare files: the head says it
        args.learn_sigma = head_learns_sigma(args, state_dict)
    args.objective_config = objective_from_args(args, base=recorded)
    if args.model is None:
        args.model = identify_model(args, state_dict) or DEFAULTS["model"]
    resolve_sampler_args(args, args.objective_config)
    check_model_name(args.model)
    for label in getattr(args, "class_labels", None) or []:
        check_label(label, args.num_classes)
    if taken and log is not None:
        log(f"Using the checkpoint's training settings: {' '.join(taken)} (pass them to override)")
    return args


def _shapes_of(name, args, learn_sigma):
    """Key -> shape of `name` built on the meta device for these settings (None if it cannot be)."""
    factor = downsample_factor_of_spec(args.vae)
    kwargs = dict(input_size=args.image_size // factor, in_channels=args.in_channels or 4,
                  num_classes=args.num_classes, **{**args.model_kwargs, "learn_sigma": learn_sigma})
    try:
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in create_model(name, **kwargs).state_dict().items()}
    except (ValueError, TypeError, AssertionError):
        return None


def head_learns_sigma(args, state_dict):
    """Whether a file without a recorded objective has a learned-sigma head (twice the input channels
    out, as DiT's and SiT's releases) or not; None when the model cannot tell."""
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    names = [args.model] if args.model else model_names()
    for learn_sigma in (True, False):
        if any(_shapes_of(name, args, learn_sigma) == shapes for name in names):
            return learn_sigma
    return None


def identify_model(args, state_dict):
    """The registered variant a file without a model name holds (e.g. DiT-XL/2 for SiT's release)."""
    learn_sigma = args.objective_config["learn_sigma"]
    factor = downsample_factor_of_spec(args.vae)
    return identify_variant(state_dict, args.image_size // factor, args.in_channels or 4, args.num_classes,
                            learn_sigma)


def check_model_name(name):
    if name not in model_names():
        raise JobError(f"unknown model {name!r}: choose one of {', '.join(model_names())}")


def check_label(label, num_classes):
    if not 0 <= label < num_classes:
        raise JobError(f"class label {label} is out of range for a {num_classes}-class model "
                            f"(valid: 0..{num_classes - 1})")


def build_model(args, state_dict, device):
    """(model, vae) ready to sample, from resolved settings: VAE first (it fixes the latent shape)."""
    vae = load_vae(args.vae, device)
    factor = downsample_factor(vae)
    if args.image_size % factor:
        raise JobError(f"--image-size {args.image_size} is not a multiple of the VAE's "
                            f"downsampling factor {factor}")
    if vae is not None and args.in_channels is not None and args.in_channels != latent_channels(vae):
        raise JobError(f"--in-channels {args.in_channels} does not match the VAE's "
                            f"{latent_channels(vae)} latent channels (--in-channels is for --vae none)")
    in_channels = latent_channels(vae, args.in_channels or 3)
    kwargs = dict(input_size=args.image_size // factor, in_channels=in_channels, num_classes=args.num_classes,
                  learn_sigma=args.objective_config["learn_sigma"], **args.model_kwargs)
    try:
        model = create_model(args.model, **kwargs)
    except TypeError as e:  # an override the constructor does not take
        raise JobError(f"cannot build {args.model} with {kwargs}: {e}") from e
    load_model_weights(model, state_dict, args.model)
    model.to(device).eval()
    if args.cfg_scale > 1.0 and getattr(model, "class_dropout_prob", 0.1) <= 0:
        raise JobError(f"this {args.model} has no null label (trained without class dropout), "
                            f"so it cannot use classifier-free guidance: pass --cfg-scale 1")
    return model, vae


#################################################################################
#                           Per-sample randomness                               #
#################################################################################

class IndexNoise:
    """One CPU generator per sample index; every draw is stacked over the batch in index order.

    Drawing on the CPU makes the numbers the same on any device and any process count.
    `pad_to` adds filler rows (zero noise, label 0, no generator) up to a fixed batch size, so
    every model call of a run has the same shape: batched kernels (BLAS, cuDNN) may round a row
    differently at another batch size, but not at another position in a batch of the same shape.
    """

    def __init__(self, global_seed, indices, pad_to=None):
        self.indices = list(indices)
        self.generators = [generator(global_seed, i) for i in self.indices]
        self.rows = max(len(self.indices), pad_to or 0)

    def _pad(self, rows):
        filler = torch.zeros_like(rows[0])
        return torch.stack(rows + [filler] * (self.rows - len(rows)))

    def labels(self, num_classes):
        """(rows,) random labels, uniform over the classes as in DiT's sample_ddp.py."""
        return self._pad([torch.randint(0, num_classes, (), generator=g) for g in self.generators])

    def randn(self, shape, device="cpu"):
        """(rows, *shape) standard normal noise, each row from its own sample's generator."""
        return self._pad([torch.randn(shape, generator=g) for g in self.generators]).to(device)


def grid_noise(seed, count, num_classes):
    """IndexNoise for images 0..count-1 whose labels the caller chooses: each index's random label
    is drawn and discarded, so image j gets the same noise stream as image j of sample_ddp.py."""
    noise = IndexNoise(seed, range(count))
    noise.labels(num_classes)
    return noise


def draw_labels(noise, num_classes, balanced=False):
    """Labels for noise's rows. The random draw happens even when `balanced`, so switching
    --balanced-classes changes labels only, never the noise of an index."""
    labels = noise.labels(num_classes)
    if balanced:
        labels[:len(noise.indices)] = torch.tensor([i % num_classes for i in noise.indices])
    return labels


#################################################################################
#                           Guidance and the reverse process                    #
#################################################################################

def make_model_fn(model, cfg_scale, guide_channels="official", precision="fp32", channels_last=False,
                  compile=False, guidance_interval=None):
    """The callable the sampler calls, model_fn(x, t, y) -> model output for x's rows, in fp32.

    cfg_scale > 1: DiT's classifier-free guidance via model.forward_with_cfg on [x; x] with labels
    [y; null] (null = num_classes), keeping the conditional half (the halves are identical).
    guide_channels "official" guides the first 3 latent channels as DiT/DiC/SiT do, "all" every one.
    cfg_scale == 1: the plain forward, as DiT's sample_ddp.py. guidance_interval (low, high), for
    SiT's time t in [0, 1]: guide only where REPA's time 1 - t lies in [low, high], as REPA's sampler.

    Fast path (helpers/utils/fastpath.py): precision "bf16" runs the call (network and guidance) under
    bf16 autocast and casts its output back to fp32; channels_last stores the model's weights NHWC
    (in place) and feeds it NHWC input; compile wraps the whole call in torch.compile.
    """
    if guide_channels not in GUIDE_CHANNELS:
        raise JobError(f"--guide-channels must be one of {', '.join(GUIDE_CHANNELS)}, got {guide_channels!r}")
    if precision not in PRECISIONS:
        raise JobError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if cfg_scale <= 1.0:
        fn = model.forward
    else:
        null_label = model.num_classes

        def fn(x, t, y):
            n = x.shape[0]
            if guidance_interval is not None and not (guidance_interval[0] <= 1 - float(t[0])
                                                      <= guidance_interval[1]):
                return model.forward(x, t, y)                              # outside the interval
            x_in = torch.cat([x, x], dim=0)                                # (2N, C, H, W)
            y_in = torch.cat([y, torch.full_like(y, null_label)], dim=0)
            out = model.forward_with_cfg(x_in, torch.cat([t, t], dim=0), y_in, cfg_scale,
                                         guide_channels=GUIDE_CHANNELS[guide_channels])
            return out[:n]                                                 # (N, out_channels, H, W)

    if channels_last:
        to_channels_last(model)
        nchw_fn = fn

        def fn(x, t, y):
            return nchw_fn(channels_last_input(x), t, y)

    device = next(model.parameters()).device
    return maybe_compile(autocast_forward(fn, device, precision), compile)


def clips_denoised(vae):
    """Whether the predicted x_0 is clipped to [-1, 1] at every step: yes for a pixel-space model,
    as ADM does for pixel models (images lie in [-1, 1]); no for latents, as DiT (latents are not
    bounded by 1). `vae`: the loaded VAE (None in pixel space) or the resolved --vae setting."""
    return vae is None or (isinstance(vae, str) and vae.lower() == "none")


def latent_shape(model, vae, args):
    """(C, H, W) of the model's input for --image-size."""
    size = args.image_size // downsample_factor(vae)
    return (model.in_channels, size, size)


def generate(model, vae, sampler, model_fn, noise, labels, args, device, progress=False):
    """Latents for `noise`'s indices from `sampler` (helpers.sampling.samplers.ReverseProcess), decoded to
    images in about [-1, 1]: (N, C_img, H, W)."""
    latents = sampler(model_fn, noise, labels, latent_shape(model, vae, args), device, progress)
    return decode(vae, latents)


def make_sampling(model, vae, args, speed):
    """(model_fn, sampler) for the resolved settings: the guided model call and the reverse process."""
    sit = args.objective_config["name"] == "sit"
    interval = (args.guidance_low, args.guidance_high) if sit else None
    model_fn = make_model_fn(model, args.cfg_scale, args.guide_channels, **speed, guidance_interval=interval)
    sampler = ReverseProcess(args, args.objective_config, model.in_channels, clip_denoised=clips_denoised(vae))
    return model_fn, sampler


def to_uint8_rgb(images):
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3) uint8 numpy with DiT's rounding (helpers.data.vae.to_uint8);
    grey repeated to RGB, as the .npz batches of the metrics are RGB."""
    images = to_uint8(images)
    if images.shape[-1] == 1:
        images = images.repeat(1, 1, 1, 3)
    return images.numpy()
