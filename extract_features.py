"""
Encode an ImageNet-style class-folder dataset into VAE latents ("features") for fast training.

Writes the official DiT/DiC per-file layout that train.py reads with --feature-path:
    <features-path>/imagenet<size>_features/<index>.npy   (1, C, H/f, W/f) float32, scaled latent
    <features-path>/imagenet<size>_labels/<index>.npy     (1,) int64 class index
`<index>` is the image's index in the dataset (sorted class folders, sorted files, as
torchvision's ImageFolder), so every image has one file pair whatever the number of processes.
With --flip the horizontally flipped image is encoded too, as `<index>_flip.npy` in the same
folders: the latent dataset reads those as extra samples. Images get ADM's center crop and no
random flip; latents are a posterior sample times the VAE's scaling factor (0.18215 for sd-vae),
and the downsampling factor f comes from the VAE's config.

Runs resume: files already complete are kept, missing or truncated ones are (re)written, and the
posterior noise of each image comes from its own generator seeded by (--global-seed, index), so
a resumed or re-sharded run writes the same bytes as one uninterrupted run. Images are encoded
in fixed blocks of --batch-size consecutive indices (a block is always encoded whole), because
batched convolutions round differently for different batch compositions; the same
--batch-size therefore gives identical files for any number of processes. Corrupt images are
skipped with a warning (no file pair; counted in the summary) and retried on every run.
`<features-path>/imagenet<size>_extract.json` records the settings; a resumed run with another
VAE, image size, seed or dataset is refused rather than mixed in. Run one job per folder at a time.

With --packed, the finished per-file set is also packed into `<features-path>/imagenet<size>_packed/`
(one memory-mapped latents.npy + labels.npy, see convert_features.py), which train.py then reads
instead of the files; the packed rows are exactly the per-file latents in the dataset's order.
A packed set never goes stale silently: a run that changes the per-file set beside a packed copy
re-packs it with --packed (saying so) and otherwise stops with an error, and a packed set made
from another folder is never replaced.

Examples:
    # one process (CPU or one GPU)
    python extract_features.py --data-path /data/imagenet/train --features-path features --vae ema
    # ... then also pack them for fast reading (features/imagenet256_packed)
    python extract_features.py --data-path /data/imagenet/train --features-path features --packed
    # 8 GPUs on one node
    torchrun --nproc_per_node=8 extract_features.py --data-path /data/imagenet/train \\
        --features-path features --image-size 256 --vae ema
    # a local VAE folder (saved with AutoencoderKL.save_pretrained), also flipped copies
    torchrun --nproc_per_node=2 extract_features.py --data-path images --features-path features \\
        --image-size 32 --vae path/to/vae --flip
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from helpers.utils.cli import JobError, Stopped, agree, one_line, run_main
from helpers.utils.distributed import barrier, cleanup_distributed, is_distributed, setup_distributed
from helpers.utils.files import atomic_write_text, check_writable, remove_stale_temps
from helpers.data.images import ImageFolderDataset
from helpers.utils.locks import RunLock
from helpers.utils.preemption import StopRequest
from helpers.utils.seeds import generator
from helpers.data.latents import PACKED_INFO, file_names, layout_dirs, layout_prefix, packed_dir, \
    read_packed_names
from helpers.data.packing import pack_latents
from helpers.data.per_file_writer import pair_is_complete, remove_partial_files, write_latent
from helpers.data.vae import downsample_factor, encode, latent_channels, latent_scale, load_vae

META_SUFFIX = "_extract.json"   # <features-path>/<prefix>_extract.json: what the latents were made with
# Settings that change the latents: a resumed run must use the same ones.
META_KEYS = ("seed_rule", "vae", "image_size", "global_seed", "latent_shape", "latent_scale",
             "num_images", "classes")
SEED_RULE = "derive_seed"       # each image's noise: helpers.utils.seeds.generator(seed, index, flipped)


#################################################################################
#                                  Helpers                                      #
#################################################################################

def image_generator(global_seed, index, flipped):
    """A CPU generator for one image's posterior noise, the same on every run and device (the
    project's one seed rule, helpers.utils.seeds.derive_seed)."""
    return generator(global_seed, index, int(flipped))


def plain_name(index):
    return str(index)


def flip_name(index):
    return f"{index}_flip"


class BlockDataset(Dataset):
    """Item k: the images of block k (indices [k*B, (k+1)*B)), center-cropped, unflipped."""

    def __init__(self, images, block_size):
        self.images = images
        self.block_size = block_size

    def __len__(self):
        return (len(self.images) + self.block_size - 1) // self.block_size

    def __getitem__(self, block):
        start = block * self.block_size
        indices, tensors, labels, corrupt = [], [], [], []
        for index in range(start, min(start + self.block_size, len(self.images))):
            image = self.images.load(index)
            if image is None:
                corrupt.append(index)
                continue
            indices.append(index)
            tensors.append(image)
            labels.append(self.images.targets[index])
        stacked = torch.stack(tensors) if tensors else None  # (n, 3, H, W) in [-1, 1]
        return {"indices": indices, "images": stacked, "labels": labels, "corrupt": corrupt}


def check_metadata(path, meta, resuming):
    """Error text if an earlier run into this folder used other settings, else None."""
    if not os.path.exists(path):
        if resuming:
            return (f"{os.path.dirname(path)} already holds latents without {os.path.basename(path)}: "
                    f"they were not written by this script, so they cannot be resumed; choose "
                    f"another --features-path")
        return None
    with open(path) as f:
        old = json.load(f)
    for key in META_KEYS:
        if old.get(key) != meta[key]:
            shown = "class list" if key == "classes" else f"{old.get(key)!r} -> {meta[key]!r}"
            return (f"{path} says the latents there were made with another {key} ({shown}): "
                    f"mixing them would corrupt the set; choose another --features-path")
    return None


def check_packed(features_path, prefix, repack):
    """Error text if a packed set beside the per-file set makes this run unsafe, else None:
    one made from another folder (never replaced), or, without --packed, one that is already
    stale (the per-file set differs from it)."""
    packed = packed_dir(features_path, prefix)
    if not os.path.isdir(packed):
        return None
    source = packed_source(packed)
    own = layout_dirs(features_path, prefix)[0]
    if source is None or os.path.realpath(source) != os.path.realpath(own):
        return (f"{packed} is a packed set made from {source}, not from this folder's latents: "
                f"move it away or choose another --features-path")
    if not repack and read_packed_names(packed) != file_names(features_path, prefix):
        return (f"{packed} no longer matches the per-file latents beside it, and train.py reads "
                f"the packed set: pass --packed to re-pack it, or delete it")
    return None


def packed_source(packed):
    """The per-file features folder a packed set was made from (None if unreadable)."""
    try:
        with open(os.path.join(packed, PACKED_INFO)) as f:
            return json.load(f).get("source")
    except (OSError, ValueError, AttributeError):
        return None


def finish_packed(args, prefix):
    """After extraction, on rank 0: pack the per-file set (--packed) and keep a packed set
    beside it in step with it."""
    packed = packed_dir(args.features_path, prefix)
    exists = os.path.isdir(packed)
    if exists and read_packed_names(packed) == file_names(args.features_path, prefix):
        print(f"packed set {packed} is up to date", flush=True)
        return
    if exists and not args.packed:
        raise JobError(f"the per-file latents changed, so {packed} (which train.py reads first) is stale: "
             f"re-pack it with --packed (or convert_features.py --overwrite), or delete it")
    if not args.packed:
        return
    if exists:
        print(f"re-packing: the per-file latents changed since {packed} was written; the new "
              f"packed set replaces it once complete", flush=True)
    try:
        final = pack_latents(args.features_path, prefix=prefix, overwrite=exists,
                             workers=max(1, args.num_workers))
    except JobError:
        raise
    except (ValueError, OSError) as e:
        raise JobError(one_line(e)) from e
    print(f"packed into {final}", flush=True)


#################################################################################
#                                    Main                                       #
#################################################################################

@torch.no_grad()  # scoped, not torch.set_grad_enabled(False): main() is also called in-process
def main(args):
    # Validate everything before joining the job, so a bad argument writes nothing anywhere.
    if args.batch_size < 1:
        raise JobError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise JobError(f"--max-images must be at least 1, got {args.max_images}")
    images = ImageFolderDataset(args.data_path, args.image_size, random_flip=False,
                                allow_empty_classes=args.allow_empty_classes)
    if str(args.vae).lower() == "none":
        raise JobError("--vae none: there is nothing to extract in pixel space; train on the "
                       "images directly, or pass ema, mse or a VAE folder")
    check_writable(args.features_path, folder=True, keep_folder=False)   # before the VAE loads
    try:
        vae = load_vae(args.vae, "cpu")
    except (ValueError, OSError) as e:
        raise JobError(one_line(e)) from e
    factor = downsample_factor(vae)
    if args.image_size % factor != 0:
        raise JobError(f"--image-size {args.image_size} is not divisible by the VAE's "
                       f"downsampling factor {factor}: choose a multiple of {factor}")

    info = setup_distributed()
    if args.global_batch_size is not None:   # fast-DiT's flag: the global batch over the processes
        if args.global_batch_size < info.world_size or args.global_batch_size % info.world_size:
            raise JobError(f"--global-batch-size {args.global_batch_size} is not a multiple of the "
                           f"{info.world_size} processes: use a multiple of {info.world_size}")
        args.batch_size = args.global_batch_size // info.world_size
    vae = vae.to(info.device)
    side = args.image_size // factor
    latent_shape = (latent_channels(vae), side, side)
    prefix = args.prefix or layout_prefix(args.image_size)
    num_images = len(images) if args.max_images is None else min(args.max_images, len(images))
    vae_name = os.path.abspath(args.vae) if os.path.isdir(args.vae) else args.vae
    meta = {"seed_rule": SEED_RULE, "vae": vae_name, "image_size": args.image_size,
            "global_seed": args.global_seed, "latent_shape": list(latent_shape), "latent_scale": float(latent_scale(vae)),
            "num_images": len(images), "classes": images.classes,
            "data_path": os.path.abspath(args.data_path), "batch_size": args.batch_size}
    meta_path = os.path.join(args.features_path, prefix + META_SUFFIX)

    # Rank 0 locks the folder, checks an earlier run's settings and clears its temp files.
    lock = RunLock(args.features_path, what="feature extraction")
    try:
        agree(lambda: prepare_folder(args, prefix, meta, meta_path, lock), on_main_only=True)
        barrier()
        extract(args, info, images, vae, prefix, latent_shape, num_images)
        # Pack after the job is torn down: every rank has written its files (they all reached
        # the all_reduce), and a long packing cannot time out the others' teardown barrier.
        cleanup_distributed()
        if info.is_main:
            finish_packed(args, prefix)
    except JobError:
        cleanup_distributed()       # every rank raised it (agree): none is left waiting
        raise
    finally:
        lock.release()


def prepare_folder(args, prefix, meta, meta_path, lock):
    """On rank 0: take the folder's lock, refuse other settings or a foreign packed set, record
    the settings and remove temp files of killed writes (ours only, under the lock)."""
    lock.acquire()
    features_dir, _ = layout_dirs(args.features_path, prefix)
    resuming = os.path.isdir(features_dir) and any(
        name.endswith(".npy") for name in os.listdir(features_dir))
    error = check_metadata(meta_path, meta, resuming) or check_packed(args.features_path, prefix,
                                                                      args.packed)
    if error is not None:
        raise JobError(error)
    atomic_write_text(meta_path, json.dumps(meta, indent=1), overwrite=True)
    for folder in layout_dirs(args.features_path, prefix):
        os.makedirs(folder, exist_ok=True)
    removed = remove_partial_files(args.features_path, prefix)
    removed += remove_stale_temps(args.features_path)
    if removed:
        print(f"removed {removed} half-written temp files of an interrupted run", flush=True)


def extract(args, info, images, vae, prefix, latent_shape, num_images):
    """Encode this rank's blocks that miss files, then print the job's totals (rank 0)."""

    # Blocks of --batch-size consecutive indices; rank r takes blocks r, r+W, r+2W, ...
    # A block is encoded whole if any of its wanted files is missing; `missing` (column 0 plain,
    # 1 flipped) records which, so the files are checked once here and only those are written.
    blocks = BlockDataset(images, args.batch_size)
    names = [plain_name] + ([flip_name] if args.flip else [])
    missing = np.zeros((num_images, len(names)), dtype=bool)
    todo_blocks, todo_images, present = [], 0, 0
    for block in range(info.rank, len(blocks), info.world_size):
        start = block * args.batch_size
        wanted = range(start, min(start + args.batch_size, num_images))
        for i in wanted:
            for variant, name in enumerate(names):
                missing[i, variant] = not pair_is_complete(args.features_path, name(i),
                                                           latent_shape, prefix)
        incomplete = int(missing[wanted.start:wanted.stop].any(axis=1).sum())
        present += len(wanted) - incomplete
        if incomplete:
            todo_blocks.append(block)
            todo_images += len(wanted)

    loader = DataLoader(torch.utils.data.Subset(blocks, todo_blocks), batch_size=None,
                        shuffle=False, num_workers=args.num_workers,
                        pin_memory=info.device.type == "cuda")
    counts = {"encoded": 0, "flipped": 0, "corrupt": 0}
    progress = tqdm(total=todo_images, unit="img", disable=not info.is_main,
                    desc=f"rank 0 of {info.world_size}")
    with StopRequest() as stop:   # SIGTERM/SIGUSR1: stop after this block, agreed below; exit 75
        for item in loader:
            if stop.requested:
                break
            counts["corrupt"] += sum(index < num_images for index in item["corrupt"])
            progress.update(sum(i < num_images for i in item["indices"] + item["corrupt"]))
            if item["images"] is None:
                continue
            indices, labels = item["indices"], item["labels"]
            x = item["images"].to(info.device, non_blocking=True)
            variants = [(x, False)] + ([(torch.flip(x, dims=[-1]), True)] if args.flip else [])
            for batch, flipped in variants:
                gens = [image_generator(args.global_seed, i, flipped) for i in indices]
                latents = encode(vae, batch, generator=gens).float().cpu()   # (n, C, H/f, W/f)
                for index, latent, label in zip(indices, latents, labels):
                    if index >= num_images or not missing[index, int(flipped)]:
                        continue
                    write_latent(args.features_path, names[int(flipped)](index), latent, label,
                                 prefix=prefix)
                    counts["flipped" if flipped else "encoded"] += 1
    progress.close()

    # On the job's device: NCCL (GPU jobs) reduces CUDA tensors only.
    totals = torch.tensor([counts["encoded"], counts["flipped"], present, counts["corrupt"], stop.requested],
                          dtype=torch.int64, device=info.device)
    if is_distributed():
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    encoded, flipped, present, corrupt, stops = totals.tolist()
    if stops:
        del loader
        raise Stopped(f"{stop.name or 'a stop signal'} received: stopped between blocks, {encoded} images "
                      f"encoded and kept; run the same command again to continue")
    if info.is_main:
        flips = f" (+{flipped} flipped copies)" if args.flip else ""
        print(f"done: {encoded} images encoded{flips}, {present} already present (skipped), "
              f"{corrupt} corrupt images skipped (no file written); latents {latent_shape} in "
              f"{os.path.join(args.features_path, prefix + '_features')}", flush=True)
    del loader


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data-path", type=str, required=True,
                        help="class-folder dataset (root/<class>/<image>), e.g. ImageNet's train")
    parser.add_argument("--features-path", type=str, default="features",
                        help="output root; latents go to <root>/imagenet<size>_features (default: features)")
    parser.add_argument("--image-size", type=int, default=256, help="center-crop side in pixels")
    parser.add_argument("--vae", type=str, default="ema",
                        help="ema | mse (sd-vae-ft-*, from the hub) | a local AutoencoderKL folder")
    parser.add_argument("--batch-size", type=int, default=32, help="images per process and step")
    parser.add_argument("--num-workers", type=int, default=4, help="data loader workers per process")
    parser.add_argument("--global-seed", type=int, default=0,
                        help="seed of the posterior noise (each image's own stream)")
    parser.add_argument("--flip", action="store_true",
                        help="also encode the flipped images, as <index>_flip.npy")
    parser.add_argument("--max-images", type=int, default=None,
                        help="encode only the first N images (a quick try; rerun without it to finish)")
    parser.add_argument("--packed", action="store_true",
                        help="also pack the latents into <features-path>/<prefix>_packed/ "
                             "(memory-mapped; what train.py then reads)")
    parser.add_argument("--allow-empty-classes", action="store_true",
                        help="let an empty class folder keep its label index (ImageFolder's "
                             "indices) instead of refusing it")
    parser.add_argument("--prefix", type=str, default=None,
                        help="folder prefix (default: imagenet<image-size>, the official name)")
    fast_dit = parser.add_argument_group("fast-DiT's flags (accepted so its commands run)")
    fast_dit.add_argument("--global-batch-size", type=int, default=None,
                          help="images per step over all processes (sets --batch-size to it / processes)")
    for flag in ("--model", "--num-classes", "--results-dir", "--epochs", "--log-every", "--ckpt-every"):
        fast_dit.add_argument(flag, type=str, default=None, help="unused here (extraction needs no model)")
    return parser


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser().parse_args()))
