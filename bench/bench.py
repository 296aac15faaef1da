"""Speed benchmark for DiC and DiT: training throughput, sampling latency, peak memory, GMACs and
latent loading, in one run, with markdown tables (and --json).

    python bench/bench.py                          # CPU quick set: DiC-S vs DiT-S/2, batch 4, 32x32 latents
    python bench/bench.py --models all             # DiC-S/B/XL/H, DiT-S/2, B/2, L/2, XL/2, DiCo-S/B/L/XL/H
    python bench/bench.py --models dico            # DiCo vs DiC vs DiT at the S and XL shapes
    python bench/bench.py --device cuda --compile  # GPU defaults (batch 32, full sampling chains)
    python bench/bench.py --no-train --no-sample --no-data --grad-checkpointing-memory  # new sections + XL

What is timed (warm-up iterations excluded, median of the timed ones):
- training: one step as train.py does it: t ~ U{0..999}, diffusion.training_losses (eps MSE + VB,
  learned sigma), backward, AdamW step, EMA update. "eager" is DiT's recipe (fp32, NCHW,
  torch.optim.AdamW defaults, per-parameter EMA); "fast" is helpers/utils/fastpath.py's path (bf16
  autocast + fused AdamW + foreach EMA; + channels_last with --channels-last; + a
  torch.compile row with --compile). The ablation rows add one component at a time to eager,
  and time the fast path with the other memory format.
- sampling: DDPM-250 and DDIM-50 with classifier-free guidance (scale 1.5; the batch holds n images
  + n null-label rows, as DiT's sample.py). With --sample-steps-scale < 1 only a few steps are
  timed and the per-step median is multiplied by the step count: such latencies are marked
  "extrapolated".
- memory: CUDA: torch.cuda.max_memory_allocated over the config (model, EMA, optimizer state and
  activations). CPU: the rise of the process's peak resident set (VmHWM, reset through
  /proc/self/clear_refs before each config) over the resident set before it.
- GMACs: one forward at batch 1 on the meta device under torch.utils.flop_counter.FlopCounterMode
  (conv, linear and attention matmuls; MACs = FLOPs / 2), checked against the papers' numbers.
- flow matching: the SiT step (Linear path, velocity, learn_sigma=False model) vs the DDPM step,
  same batch and config, timed in turns (--extra-configs picks the configs of this and the next two).
- SiT sampling: helpers.sampling.samplers.ReverseProcess, ODE dopri5 / euler-50 / heun2-50 and SDE
  Euler-250, CFG as above; NFE counted; on CPU a short solve is timed and scaled by the full NFE.
  With random weights dopri5's NFE says nothing about a trained model's.
- REPA: SiT step vs SiT + REPA step (DINOv2 encoder with random weights on the batch's images,
  projector on DiC's enc1 / DiT's block4, projection loss), and the encoder forward alone.
- gradient checkpointing: peak memory and time of one fp32 forward + backward with and without
  set_grad_checkpointing(True) (--grad-checkpointing-memory adds DiC-XL and DiT-XL/2).
- data: random-order batches of latents from the official per-file .npy layout vs one packed,
  memory-mapped .npy array, both written to a temp dir (warm page cache), compared with the
  training step's consumption rate.

The sections live beside this file, one module each: measuring.py (machine, timing, memory),
configs.py, gmacs.py, training_step.py, sampling_speed.py, sit_repa.py (flow matching, SiT
sampling, REPA), grad_checkpointing.py, latent_reading.py, and report.py + report_extras.py (the
markdown); this file is the command line and the run that assembles them.
"""
import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))   # the section modules beside this file
for _path in (BENCH_DIR, REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from configs import fast_precision, sample_configs, train_configs  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from gmacs import SPEC_GMACS_256, count_gmacs  # noqa: E402
from grad_checkpointing import bench_grad_checkpointing  # noqa: E402
from helpers.utils.fastpath import autocast_forward, configure_tf32  # noqa: E402
from helpers.utils.cli import JobError  # noqa: E402
from helpers.utils.files import atomic_write_text  # noqa: E402
from helpers.utils.models import create_model, model_names  # noqa: E402
from latent_reading import bench_data  # noqa: E402
from measuring import describe_machine, fmt, release_memory  # noqa: E402
from report import markdown_report, timing_basis, train_rate  # noqa: E402
from sampling_speed import bench_sample  # noqa: E402
from sit_repa import bench_repa, bench_sit_sample, bench_sit_train  # noqa: E402
from training_step import bench_train_rows  # noqa: E402

QUICK_MODELS = ["DiC-S", "DiT-S/2"]
ALL_MODELS = ["DiC-S", "DiC-B", "DiC-XL", "DiC-H", "DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2",
              "DiCo-S", "DiCo-B", "DiCo-L", "DiCo-XL", "DiCo-H"]
DICO_MODELS = ["DiCo-S", "DiC-S", "DiT-S/2", "DiCo-XL", "DiC-XL", "DiT-XL/2"]   # the three families, S and XL


def build_parser():
    """The command line: the sections to run, their sizes, and where the numbers go."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--models", default="quick",
                   help="'quick' (DiC-S, DiT-S/2), 'all' (DiC-S/B/XL/H, DiT-S/2, B/2, L/2, XL/2, "
                        "DiCo-S/B/L/XL/H), 'dico' (DiCo, DiC and DiT at the S and XL shapes) "
                        "or a comma list of registry names")
    p.add_argument("--image-size", type=int, default=256, help="image side; latents are image/8")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default cpu 4, cuda 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default cpu 1, cuda 5)")
    p.add_argument("--iters", type=int, default=None, help="timed steps, median reported (default cpu 3, cuda 20)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling batch (default cpu 2, cuda 32)")
    p.add_argument("--sample-steps-scale", type=float, default=None,
                   help="fraction of each chain's steps to time, then extrapolate per-step x steps "
                        "(default cpu 0.01, cuda 1 = whole chains, nothing extrapolated)")
    p.add_argument("--min-sample-steps", type=int, default=5, help="timed steps at least, when extrapolating")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 1 on cpu for steady numbers; torch's default on cuda)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="channels_last in the fast path (default off; the ablation rows time the other choice)")
    p.add_argument("--compile", action="store_true", help="also time fast path + torch.compile")
    p.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the one-component-at-a-time training rows")
    p.add_argument("--no-sample", dest="sample", action="store_false", help="skip sampling")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip training")
    p.add_argument("--no-data", dest="data", action="store_false", help="skip the latent loading benchmark")
    p.add_argument("--data-samples", type=int, default=5000, help="synthetic latents for the loading benchmark")
    p.add_argument("--data-batch", type=int, default=256, help="batch of the loading benchmark")
    p.add_argument("--extra-configs", default=None,
                   help="comma list of training configs (names of the training rows) for the flow-matching, "
                        "SiT sampling and REPA sections (default cpu 'eager fp32': bf16 is emulated, so "
                        "slow, on CPUs without AVX512-BF16; cuda 'eager fp32,fast')")
    p.add_argument("--no-sit", dest="sit", action="store_false",
                   help="skip the flow-matching (SiT) training step and ODE/SDE sampling sections")
    p.add_argument("--no-repa", dest="repa", action="store_false", help="skip the REPA step cost section")
    p.add_argument("--repa-encoder", default=None,
                   help="REPA encoder (helpers.training.repa.ENCODERS; random weights, same cost; default cpu "
                        "dinov2-vit-s, cuda dinov2-vit-b as REPA)")
    p.add_argument("--repa-batch", type=int, default=None, help="REPA section batch (default cpu 2, cuda 32)")
    p.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_false",
                   help="skip the gradient checkpointing section")
    p.add_argument("--grad-checkpointing-memory", action="store_true",
                   help="also measure gradient checkpointing on DiC-XL and DiT-XL/2 (CPU: ~3 GB and "
                        "~10 s per step each; --models all includes them)")
    p.add_argument("--gc-batch", type=int, default=None,
                   help="batch of the gradient checkpointing forward + backward (default cpu 1, cuda 32)")
    p.add_argument("--gc-iters", type=int, default=None,
                   help="timed forward + backward pairs of the gradient checkpointing rows (default cpu 2, cuda 5)")
    p.add_argument("--precision", choices=["tf32", "fp32"], default="tf32",
                   help="the eager rows' precision, as the trainers' --precision (fast rows: --fast-precision)")
    p.add_argument("--fast-precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="the fast rows' precision: auto = bf16 where the device has bf16 instructions, else fp32 "
                        "(bf16 on an AVX2 CPU runs reference kernels, ~40x slower: refused unless DIC_FORCE_BF16=1)")
    p.add_argument("--in-turns", action=argparse.BooleanOptionalAction, default=None,
                   help="time one model's training configs in turns, one step of each per round (default: on "
                        "for cpu, where other jobs share the cores; off for cuda); each alone where they do not "
                        "all fit in memory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the device for the MFU column (default: known GPUs, e.g. H100 989)")
    p.add_argument("--json", default=None, help="also write all numbers to this .json (refuses to overwrite)")
    return p


def apply_device_defaults(p, args):
    """Settle the device, then fill every size left unset with that device's default (small on
    CPU, GPU-sized on CUDA)."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    cuda = args.device == "cuda"
    defaults = dict(batch_size=32 if cuda else 4, warmup=5 if cuda else 1, iters=20 if cuda else 3,
                    sample_batch=32 if cuda else 2, sample_steps_scale=1.0 if cuda else 0.01,
                    threads=None if cuda else 1, extra_configs="eager fp32,fast" if cuda else "eager fp32",
                    repa_encoder="dinov2-vit-b" if cuda else "dinov2-vit-s", repa_batch=32 if cuda else 2,
                    gc_batch=32 if cuda else 1, gc_iters=5 if cuda else 2, in_turns=not cuda)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:   # the fast rows' precision on this device, said in one line at the start of the run
        args.fast_precision, args.precision_line = fast_precision(args.fast_precision, torch.device(args.device))
    except JobError as e:
        p.error(str(e))


def resolve_and_check(p, args):
    """Model lists, latent size and section configs from the flags; a parser error for anything
    out of range, and for a --json that exists (results are never overwritten)."""
    if args.models == "quick":
        args.model_list = QUICK_MODELS
    elif args.models == "all":
        args.model_list = ALL_MODELS
    elif args.models == "dico":
        args.model_list = DICO_MODELS
    else:
        args.model_list = [s.strip() for s in args.models.split(",") if s.strip()]
    unknown = [m for m in args.model_list if m not in model_names()]
    if unknown:
        p.error(f"unknown model(s) {unknown}: choose from {', '.join(model_names())}")
    if args.image_size % 8:
        p.error(f"--image-size {args.image_size} is not a multiple of 8 (the VAE downsamples by 8)")
    args.latent_size = args.image_size // 8
    args.fast_channels_last = bool(args.channels_last)
    args.extra_config_list = [c.strip() for c in args.extra_configs.split(",") if c.strip()]
    known = [c for c in train_configs(args) if c != "fast + compile"]
    if any(c not in known for c in args.extra_config_list):
        p.error(f"--extra-configs {args.extra_configs!r}: choose from {', '.join(known)}")
    from helpers.training.repa import ENCODERS
    if args.repa_encoder not in ENCODERS:
        p.error(f"--repa-encoder {args.repa_encoder!r}: choose from {', '.join(ENCODERS)}")
    args.gc_model_list = list(args.model_list) + [m for m in ("DiC-XL", "DiT-XL/2") if
                                                  args.grad_checkpointing_memory and m not in args.model_list]
    for key in ("batch_size", "iters", "sample_batch", "data_samples", "data_batch", "repa_batch", "gc_batch",
                "gc_iters"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or not 0 < args.sample_steps_scale:
        p.error("--warmup must be >= 0 and --sample-steps-scale > 0")
    if args.json and os.path.exists(args.json):
        p.error(f"--json {args.json} exists: choose a new file (results are never overwritten)")


def parse_args(argv=None):
    """The flags, with the device's defaults filled in and checked (see build_parser)."""
    p = build_parser()
    args = p.parse_args(argv)
    apply_device_defaults(p, args)
    resolve_and_check(p, args)
    return args


def warm_up_libraries(device, diffusion, precision):
    """One throwaway DiC-Tiny step in fp32 and the fast rows' precision, so one-time library set-up
    (oneDNN/cuDNN initialisation, first allocations) is not charged to the first measured config."""
    model = create_model("DiC-Tiny", input_size=16, num_classes=10).to(device)
    x = torch.randn(2, 4, 16, 16, device=device)
    y = torch.zeros(2, dtype=torch.long, device=device)
    t = torch.zeros(2, dtype=torch.long, device=device)
    for p in sorted({"fp32", precision}):
        diffusion.training_losses(autocast_forward(model, device, p), x, t, dict(y=y))["loss"].mean().backward()
    del model
    release_memory(device)


def bench_model(name, args, device, diffusion):
    """Every per-model section for one model: GMACs, training and sampling rows, then the
    flow-matching, SiT sampling and REPA rows under --extra-configs; returns its result entry."""
    gmacs, params = count_gmacs(name, args.latent_size)
    paper = SPEC_GMACS_256.get(name) if args.image_size == 256 else None
    print(f"{name}: {params / 1e6:.1f} M parameters, {gmacs:.2f} GMACs (paper {fmt(paper)})", flush=True)
    torch.manual_seed(args.seed)
    base = create_model(name, input_size=args.latent_size)   # built once on CPU, copied per config
    entry = {"params": params, "gmacs": gmacs, "gmacs_paper": paper, "train": {}, "sample": {}}
    if args.train:
        entry["train"] = bench_train_rows(name, base, train_configs(args), args, device, diffusion)
    if args.sample:
        for cfg_name, cfg in sample_configs(args).items():
            entry["sample"][cfg_name] = bench_sample(name, base, cfg, args, device)
    del base
    release_memory(device)
    configs = train_configs(args)
    for key, bench, wanted in (("sit_train", bench_sit_train, args.sit),
                               ("sit_sample", bench_sit_sample, args.sit),
                               ("repa", bench_repa, args.repa)):
        if wanted:
            entry[key] = {c: bench(name, {**configs[c], "name": c}, args, device) for c in args.extra_config_list}
    return entry


def training_consumption(res, args):
    """The fastest measured training row of the first model: what a loader has to keep up with
    (None with --no-train)."""
    first = res["models"][args.model_list[0]]["train"]  # empty with --no-train
    basis = timing_basis(res)
    rows = [(cfg, train_rate(r, basis)) for cfg, r in first.items() if train_rate(r, basis)]
    if rows:
        cfg, rate = max(rows, key=lambda kv: kv[1])
        return dict(model=args.model_list[0], config=cfg, images_per_s=rate, basis=basis)
    return None


def main(argv=None):
    """Run the chosen sections, print the markdown report, and with --json write every number."""
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configure_tf32(args.precision == "tf32")
    print(args.precision_line, flush=True)
    machine = describe_machine(device, torch.get_num_threads())
    res = {"command": " ".join(["python", "bench/bench.py"] + (sys.argv[1:] if argv is None else list(argv))),
           "machine": machine,
           "settings": {k: v for k, v in vars(args).items() if k not in ("model_list", "extra_config_list")}
           | {"models": args.model_list},
           "models": {}}
    print(f"machine: {machine}", flush=True)
    diffusion = create_diffusion(timestep_respacing="")
    warm_up_libraries(device, diffusion, args.fast_precision)
    for name in args.model_list:
        res["models"][name] = bench_model(name, args, device, diffusion)
    if args.grad_checkpointing:
        res["grad_checkpointing"] = {name: bench_grad_checkpointing(name, args, device) for name in args.gc_model_list}
    consumption = training_consumption(res, args)
    if consumption:
        res["consumption"] = consumption
    if args.data:
        res["data"] = bench_data(args)
    res["elapsed_s"] = time.perf_counter() - start
    report = markdown_report(res)
    res["markdown"] = report
    print()
    print(report)
    if args.json:
        atomic_write_text(args.json, json.dumps(res, indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
