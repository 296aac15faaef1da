"""
Sample many images from a DiC (or DiT) checkpoint over any number of processes, then pack them in
one .npz (arr_0: uint8 (N, H, W, 3)) for FID and the other metrics, like DiT's sample_ddp.py.

    torchrun --nproc_per_node 8 sample_ddp.py --ckpt results/000-DiC-XL/checkpoints/0400000.pt
    python sample_ddp.py --ckpt ...          # one process (CPU or one GPU)

    torchrun --nproc_per_node 8 sample_ddp.py --ckpt SiT-run.pt --mode sde --num-sampling-steps 250
    torchrun --nproc_per_node 8 sample_ddp.py --model SiT-XL/2 --ckpt last.pt --mode sde --num-steps 250 \
        --cfg-scale 1.8 --guidance-high 0.7                                     # REPA's release, as REPA

The reverse process is the checkpoint's: DDPM (--sampler ddpm|ddim|dpm-solver) or, for a model
trained with flow matching, SiT's ODE (--mode ode, any torchdiffeq method) or SDE (--mode sde), or
for REPA's rectified flow (rf; REPA's files are recognised by their content) REPA's Euler ODE
(--heun) or Euler-Maruyama SDE.
Image i depends only on (--global-seed, i, the settings): its label, its initial noise and every
per-step noise (DDPM's, the SDE's) come from a generator seeded from (global seed, i). The images
are made in chunks of --per-proc-batch-size consecutive indices, chunk k on rank k mod W, the last
one padded: every model call has the same shape and a batch holds the same images whatever the
process count, so the .npz is byte-identical from 1 or 8 processes at the same batch size and
fast-path flags (also with adaptive ODE solvers, which pick their steps per batch). Another batch
size gives the same samples up to float rounding (DDPM, SDE, fixed-step ODE) or up to the adaptive
solver's tolerance (dopri5). --precision bf16 changes the samples slightly: its folder ends in -bf16.
Each PNG is written atomically, so an interrupted run, rerun with the same arguments, redoes only
its unfinished chunks and ends with the same .npz; a complete .npz is left as it is; the sample
folder is locked while a job writes it. Rank 0 packs the .npz, so on several nodes --sample-dir
must be on a shared file system (as in DiT).
"""
import argparse
import json
import os
import sys

import torch
from PIL import Image
from tqdm import tqdm

from helpers.utils.cli import JobError, Stopped, agree, run_main
from helpers.utils.distributed import cleanup_distributed, gather_objects, setup_distributed
from helpers.utils.files import atomic_write, atomic_write_text, check_writable, fsync_folder, remove_stale_temps
from helpers.utils.locks import RunLock
from helpers.utils.preemption import StopRequest
from helpers.sampling.checkpoint_model import build_model, read_checkpoint
from helpers.sampling.flags import (add_model_args, add_sampling_args, add_speed_args, check_common_args,
                                    describe_speed, model_settings, parse_with_model_overrides, resolve_settings,
                                    sampler_settings, setup_speed)
from helpers.sampling.generation import clips_denoised, generate, make_sampling, to_uint8_rgb
from helpers.sampling.noise import IndexNoise, draw_labels
from helpers.sampling.sample_files import npz_shape, png_name, write_npz_from_pngs
from helpers.sampling.samplers import sampler_name, sampler_record

SETTINGS_FILE = "sampling_settings.json"
# What older settings files implied for keys they lack (their noise came from another seed rule).
LEGACY_SETTINGS = {"precision": "tf32", "clip_denoised": False, "seed_rule": "seedsequence"}
# The .npz while rank 0 packs it: a temp name (helpers/utils/files.TMP_PATTERN) inside the locked sample folder.
STAGED_NPZ = ".tmp-packing.npz"
SEED_RULE = "derive_seed"   # helpers.utils.seeds: image i's generator is generator(global seed, i)


def folder_name(args):
    """DiT's sample folder name (model, checkpoint, size, VAE, cfg, seed), plus the other settings
    that change the images."""
    model = args.model.replace("/", "-")
    ckpt = os.path.basename(args.ckpt).replace(".pt", "")
    vae = os.path.basename(os.path.normpath(args.vae))
    name = f"{model}-{ckpt}-size-{args.image_size}-vae-{vae}-cfg-{args.cfg_scale}-seed-{args.global_seed}"
    name += f"-{sampler_name(sampler_settings(args), args.objective_config)}"
    if args.weights != "ema":
        name += f"-weights-{args.weights}"
    if args.guide_channels != "official":
        name += f"-guide-{args.guide_channels}"
    if args.balanced_classes:
        name += "-balanced"
    if args.precision != "tf32":   # the default (as DiT: TF32 allowed)
        name += f"-{args.precision}"
    return name


def image_settings(args):
    """Everything that decides the pixels of image i (not N, process count or batch size)."""
    return {"ckpt": os.path.abspath(args.ckpt), "weights": args.weights, "model": args.model,
            "model_kwargs": {k: repr(v) for k, v in sorted(args.model_kwargs.items())},
            "image_size": args.image_size, "num_classes": args.num_classes, "vae": args.vae,
            "in_channels": args.in_channels, "cfg_scale": args.cfg_scale,
            "guide_channels": args.guide_channels, **sampler_record(sampler_settings(args), args.objective_config),
            "global_seed": args.global_seed,
            "balanced_classes": args.balanced_classes, "precision": args.precision,
            "clip_denoised": clips_denoised(args.vae), "seed_rule": SEED_RULE}


def check_output(args, sample_folder, npz_path, expected_shape):
    """Rank 0, read-only: "done" when a complete .npz exists, else "go".

    A folder holding samples of other settings (same name, e.g. another run's 0400000.pt) and an
    .npz of the wrong size are errors: nothing is mixed or overwritten.
    """
    settings_path = os.path.join(sample_folder, SETTINGS_FILE)
    if os.path.exists(settings_path):
        settings = image_settings(args)
        with open(settings_path) as f:  # folders from before these keys existed: see LEGACY_SETTINGS
            previous = {**LEGACY_SETTINGS, **json.load(f)}
        changed = [k for k in sorted(set(settings) | set(previous)) if settings.get(k) != previous.get(k)]
        if changed:
            k = changed[0]
            raise JobError(f"{sample_folder} holds samples made with other settings ({k}: "
                                f"{previous.get(k)!r}, now {settings.get(k)!r}): use another --sample-dir")
    if os.path.exists(npz_path):
        shape = npz_shape(npz_path)
        if shape == expected_shape:
            return "done"
        raise JobError(f"{npz_path} exists but holds {shape if shape else 'no readable uint8 arr_0'}, "
                            f"not {expected_shape}: move it away to sample again")
    return "go"


def create_output(args, sample_folder, locks):
    """Rank 0: the sample folder, locked for this job and cleared of the temp files of writes a killed
    job left, with a record of the settings its images are made with."""
    os.makedirs(sample_folder, exist_ok=True)
    locks.append(RunLock(sample_folder, what="sampling").acquire())
    remove_stale_temps(sample_folder)
    settings_path = os.path.join(sample_folder, SETTINGS_FILE)
    if not os.path.exists(settings_path):
        atomic_write_text(settings_path, json.dumps(image_settings(args), indent=2))


def pack_npz(sample_folder, num, npz_path, image_shape):
    """Rank 0, holding the folder's lock: the PNGs packed into `npz_path`, built as STAGED_NPZ inside
    the sample folder, then renamed beside it. Every temp file of a killed packing is then in the
    locked folder, where the rerun's remove_stale_temps takes it (the sample dir, shared with other
    jobs' .npz writes, is never swept). Only a job holding this folder's lock writes its .npz, so
    the check before the rename has no race."""
    staged = os.path.join(sample_folder, STAGED_NPZ)
    write_npz_from_pngs(sample_folder, num, staged, image_shape, progress=True)
    if os.path.lexists(npz_path):
        raise JobError(f"{npz_path} appeared while this job packed its samples: move it away and rerun")
    os.replace(staged, npz_path)   # one rename: no moment with the .npz both published and staged
    fsync_folder(os.path.dirname(os.path.abspath(npz_path)))


def my_chunks(rank, world_size, total, batch_size):
    """This rank's batches: chunk k = images [k B, (k + 1) B) goes to rank k mod W. A batch then holds
    the same images whatever the process count, which adaptive ODE solvers need (they choose their
    steps for the whole batch); the last chunk is padded to B rows."""
    starts = range(rank * batch_size, total, world_size * batch_size)
    return [list(range(start, min(start + batch_size, total))) for start in starts]


@torch.no_grad()  # scoped to the run: in-process callers keep autograd
def main(args):
    # Check the flags before any work:
    check_common_args(args)
    if args.per_proc_batch_size < 1 or args.num_fid_samples < 1:
        raise JobError("--per-proc-batch-size and --num-fid-samples must be >= 1")

    # Setup DDP (one process without torchrun); the device comes from LOCAL_RANK:
    dist = setup_distributed()
    device = dist.device
    speed = setup_speed(args, device, log=print if dist.is_main else None)  # --precision, --channels-last, --compile
    log = print if dist.is_main else (lambda *a, **k: None)
    agree(lambda: check_writable(args.sample_dir, folder=True, keep_folder=False), on_main_only=True)

    # Settings left unset come from the checkpoint's saved args; they name the sample folder:
    checkpoint, state_dict = read_checkpoint(args.ckpt, args.weights)
    resolve_settings(args, checkpoint, state_dict, log=log)
    del checkpoint
    if args.likelihood:
        raise JobError("--likelihood is sample.py's (it prints each sample's NLL); drop it here")
    sample_folder = os.path.join(args.sample_dir, folder_name(args))
    npz_path = f"{sample_folder}.npz"
    expected_shape = (args.num_fid_samples, args.image_size, args.image_size, 3)

    # Rank 0 checks the output (read-only); every rank learns the outcome and fails alike:
    if agree(lambda: check_output(args, sample_folder, npz_path, expected_shape), on_main_only=True) == "done":
        log(f"{npz_path} already holds all {args.num_fid_samples} samples: nothing to do")
        cleanup_distributed()
        return npz_path

    # Load the model (EMA weights by default) and the VAE:
    model, vae = build_model(model_settings(args), state_dict, device, args.cfg_scale)
    del state_dict
    locks = []   # rank 0 holds the sample folder's lock for the whole job
    try:
        # Rank 0 creates and locks the sample folder:
        agree(lambda: create_output(args, sample_folder, locks), on_main_only=True)

        # The guided model call and the reverse process (the checkpoint's objective decides):
        model_fn, sampler = make_sampling(model, vae, args.objective_config, sampler_settings(args), speed)

        # This rank's unfinished chunks, then rank 0 packs every PNG into the .npz:
        # On SIGTERM/SIGUSR1 a rank stops after its current chunk; the job then exits 75 (a rerun resumes).
        stopped = sample_chunks(args, dist, model, vae, model_fn, sampler, sample_folder, log, speed)
        stops = [s for s in gather_objects(stopped) if s]   # also the barrier before rank 0 packs the .npz
        del model, vae
        cleanup_distributed()
        if stops:
            raise Stopped(f"{stops[0]} received: stopped between chunks, the finished samples kept in "
                          f"{sample_folder}; run the same command again to continue")
        if dist.is_main:
            pack_npz(sample_folder, args.num_fid_samples, npz_path, expected_shape[1:])
            print(f"Saved .npz file to {npz_path} [shape={expected_shape}].")
    finally:
        for lock in locks:
            lock.release()
    return npz_path


def sample_chunks(args, dist, model, vae, model_fn, sampler, sample_folder, log, speed):
    """Generate this rank's chunks that an earlier (interrupted) run did not finish; a chunk is
    redone whole (so its batch is the same) and only its missing PNGs are written."""
    done = set(os.listdir(sample_folder))
    chunks = my_chunks(dist.rank, dist.world_size, args.num_fid_samples, args.per_proc_batch_size)
    todo = [chunk for chunk in chunks if any(png_name(i) not in done for i in chunk)]
    if dist.is_main:
        already = sum(png_name(i) in done for i in range(args.num_fid_samples))
        if already:
            log(f"Resuming: {already} of {args.num_fid_samples} samples already in {sample_folder}")
        log(f"Sampling {args.num_fid_samples - already} images with {dist.world_size} process(es), "
            f"batch {args.per_proc_batch_size} per process ({describe_speed(speed)}), into {sample_folder}")
    nfes = []
    with StopRequest() as stop:
        for indices in tqdm(todo, disable=not dist.is_main, desc="batches"):
            if stop.requested:
                return stop.name
            sample_chunk(args, dist, model, vae, model_fn, sampler, sample_folder, done, indices, nfes)
    if nfes and dist.is_main:
        log(f"The ODE solver ({args.sampling_method}) made {sum(nfes) / len(nfes):.1f} function evaluations "
            f"per batch on average (min {min(nfes)}, max {max(nfes)}) on rank 0")
    return None


def sample_chunk(args, dist, model, vae, model_fn, sampler, sample_folder, done, indices, nfes):
    """One chunk: its images, and the PNGs an earlier run did not write."""
    # The last chunk is padded to the full batch size: every model call has the same shape.
    noise = IndexNoise(args.global_seed, indices, pad_to=args.per_proc_batch_size)
    labels = draw_labels(noise, args.num_classes, args.balanced_classes)
    images = generate(model, vae, sampler, model_fn, noise, labels, args.image_size, dist.device)
    images = to_uint8_rgb(images[:len(indices)])
    for index, image in zip(indices, images):
        if png_name(index) not in done:
            atomic_write(os.path.join(sample_folder, png_name(index)),
                         lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    if sampler.nfe is not None:
        nfes.append(sampler.nfe)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    add_model_args(parser)
    add_sampling_args(parser, cfg_scale=1.5, cfg_scale_source="DiT's FID setting")
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--balanced-classes", action="store_true",
                        help="image i gets class i %% num_classes (default: uniform random labels)")
    parser.add_argument("--sample-dir", type=str, default="samples")
    add_speed_args(parser)
    return parser


def parse_args(argv=None):
    """Parse flags; leftover --network_g__key=value model overrides become args.model_kwargs."""
    return parse_with_model_overrides(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(run_main(main, parse_args()))
