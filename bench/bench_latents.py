"""
How fast can training read its latents? Per-file .npy layout vs the packed layout, against what
one training step consumes.

Writes N synthetic latents (default 5,000 of 4x32x32, the latents of 256px images) in the
official per-file layout into a temp folder, packs them with helpers.data.packing.pack_latents, and
reads each layout through LatentFeatureDataset and a DataLoader the way train.py does (random
order, batches of --batch-size, no workers), timing whole epochs (best of --repeats). Then it
times DiC training steps (forward + backward + AdamW, DiT's diffusion loss) at --train-batch on
the same latent size, and prints samples/s for each with the ratios

    packed / per-file      (the target: > 1)
    packed / training      (the target: >= 10, reading must never be what training waits for)

The files were just written, so both layouts are read from the page cache: the numbers are the
per-sample CPU cost of each layout (opening and parsing one .npy per sample vs copying a row out
of a memory map), not disk speed. On a cold network file system the per-file layout is slower
still (one open per sample); the packed set reads rows of one file.

    OMP_NUM_THREADS=1 python bench/bench_latents.py                  # defaults as above
    python bench/bench_latents.py --num 20000 --device cuda --train-batch 256 --train-steps 20
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from helpers.data.latents import LatentFeatureDataset, layout_dirs  # noqa: E402
from helpers.data.packing import pack_latents  # noqa: E402


def write_per_file(root, num, shape, num_classes, prefix, seed=0):
    """`num` random latents + labels in the official layout (`<index>_0.npy`, (1, C, H, W))."""
    rng = np.random.default_rng(seed)
    features_dir, labels_dir = layout_dirs(root, prefix)
    os.makedirs(features_dir)
    os.makedirs(labels_dir)
    for i in range(num):
        np.save(os.path.join(features_dir, f"{i}_0.npy"),
                rng.standard_normal((1, *shape), dtype=np.float32))
        np.save(os.path.join(labels_dir, f"{i}_0.npy"),
                np.array([rng.integers(num_classes)], dtype=np.int64))


def read_rate(dataset, batch_size, repeats, seed=0):
    """Best samples/s over `repeats` random-order epochs through a DataLoader (no workers)."""
    best = 0.0
    for r in range(repeats):
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed + r))
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0)
        seen, start = 0, time.perf_counter()
        for latents, labels in loader:
            seen += latents.shape[0]
        best = max(best, seen / (time.perf_counter() - start))
    return best


def train_rate(model_name, shape, batch_size, steps, num_classes, device="cpu", seed=0):
    """Samples/s of DiC/DiT training steps (DiT's loss, AdamW), after one warm-up step."""
    from diffusion import create_diffusion
    from helpers.utils.models import create_model
    torch.manual_seed(seed)
    model = create_model(model_name, input_size=shape[-1], in_channels=shape[0],
                         num_classes=num_classes).to(device)
    diffusion = create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x = torch.randn(batch_size, *shape, device=device)
    y = torch.randint(0, num_classes, (batch_size,), device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (batch_size,), device=device)
        loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch_size * steps / (time.perf_counter() - start)


def main(args):
    torch.set_num_threads(args.threads)
    shape, prefix = tuple(args.shape), "imagenet256"
    root = tempfile.mkdtemp(prefix="bench_latents_", dir=args.tmp_dir)
    try:
        t0 = time.perf_counter()
        write_per_file(root, args.num, shape, args.num_classes, prefix)
        t1 = time.perf_counter()
        pack_latents(root, prefix=prefix, progress=False, log=lambda *a: None)
        t2 = time.perf_counter()
        per_file = LatentFeatureDataset(root, prefix=prefix, layout="files")
        packed = LatentFeatureDataset(root, prefix=prefix)
        assert packed.layout == "packed" and len(packed) == len(per_file) == args.num
        files_rate = read_rate(per_file, args.batch_size, args.repeats)
        packed_rate = read_rate(packed, args.batch_size, args.repeats)
    finally:
        shutil.rmtree(root)
    step_rate = train_rate(args.model, shape, args.train_batch, args.train_steps, args.num_classes,
                           args.device)

    print(f"{args.num} latents {shape} float32, random batches of {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s); written in {t1 - t0:.1f} s, packed in "
          f"{t2 - t1:.1f} s")
    rows = [("per-file .npy (LatentFeatureDataset)", files_rate),
            ("packed memmap (LatentFeatureDataset)", packed_rate),
            (f"{args.model} train step, batch {args.train_batch} ({args.device})", step_rate)]
    print(f"{'':40s} {'samples/s':>12s} {'/ per-file':>11s} {'/ training':>11s}")
    for name, rate in rows:
        print(f"{name:40s} {rate:12,.1f} {rate / files_rate:10.2f}x {rate / step_rate:10.1f}x")
    ok_files, ok_train = packed_rate > files_rate, packed_rate >= 10 * step_rate
    print(f"packed / per-file = {packed_rate / files_rate:.1f}x (target > 1: "
          f"{'met' if ok_files else 'NOT met'}); packed / training = "
          f"{packed_rate / step_rate:,.0f}x (target >= 10: {'met' if ok_train else 'NOT met'})")
    return 0 if ok_files and ok_train else 1


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--num", type=int, default=5000, help="synthetic latents to write")
    parser.add_argument("--shape", type=int, nargs=3, default=(4, 32, 32), metavar=("C", "H", "W"))
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=256, help="read batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per layout (best)")
    parser.add_argument("--model", type=str, default="DiC-S")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the train step")
    parser.add_argument("--device", type=str, default="cpu",
                        help="where the train step runs (cuda: compare with a GPU's appetite)")
    parser.add_argument("--tmp-dir", type=str, default=None, help="where to write (default: $TMPDIR)")
    return parser


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
