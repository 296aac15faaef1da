"""FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch.

The metrics are those of ADM's evaluation suite (openai/guided-diffusion, evaluations/
evaluator.py), which DiT and DiC report, computed in PyTorch with torch-fidelity's port of the
same TF InceptionV3; see helpers/evaluation/metrics.py and helpers/evaluation/inception.py for
how each maps to ADM and where it differs.

Evaluate (prints ADM's five lines; --json also writes them, atomically, never over a file):
    python evaluate.py VIRTUAL_imagenet256_labeled.npz samples.npz \\
        [--inception-weights pt_inception-2015-12-05.pth] [--batch-size 64] [--device cuda] \\
        [--json results.json] [--overwrite]

Make a reference batch (arr_0 + ADM's mu, sigma, mu_s, sigma_s) from real images:
    python evaluate.py --make-ref /path/to/imagenet/train --out ref256.npz [--image-size 256]
    python evaluate.py --make-ref real_images.npz --out ref.npz

Batches are .npz files whose `arr_0` is uint8 (N, H, W, 3) (what sample_ddp.py writes). A
reference batch that carries `mu`/`sigma`/`mu_s`/`sigma_s` is used as is (ADM's reference batches
hold statistics of the whole dataset plus 10,000 images for precision/recall); otherwise the
statistics come from its arr_0. The same holds for a sample batch, as in ADM.

Few images: the Inception Score uses ADM's splits of 5000 (--is-split-size); with fewer samples
it is one split of all of them (lower and not comparable with papers' 50k/10-split numbers).
Precision/recall need at least 4 images per batch (k=3 neighbours). --fid-method eigh gives the
same Fréchet distance as ADM's scipy sqrtm up to round-off, several times faster on CPU.

Inception weights: without --inception-weights torch-fidelity downloads its converted TF weights
(weights-inception-2015-12-05-6726825d.pth) into the torch hub cache; offline, pass that file.
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from helpers.utils.cli import JobError, run_main
from helpers.evaluation.inception import compute_activations, load_extractor
from helpers.evaluation.metrics import (IS_SPLIT_SIZE, PR_BATCH_SIZE, PR_NEIGHBOURS, RunningStatistics,
                                        compute_statistics, frechet_distance, inception_score,
                                        precision_recall)
from helpers.evaluation.npz_files import NpzImages, read_npz_statistics, save_json_atomic, save_npz_atomic
from helpers.utils.files import check_writable
from helpers.data.images import IMG_EXTENSIONS, center_crop_arr, load_image

METRIC_NAMES = ("Inception Score", "FID", "sFID", "Precision", "Recall")  # ADM's printed names
MIN_IMAGES = PR_NEIGHBOURS + 1   # a k=3 manifold needs 4 points; covariances need 2


#################################################################################
#                                   Evaluation                                  #
#################################################################################

def _check_output(path, overwrite):
    """Errors before work: an existing output (without --overwrite) or an unwritable place."""
    if path is not None and os.path.exists(path) and not overwrite:
        raise JobError(f"{path} already exists: refusing to overwrite it (pass --overwrite "
                              f"or choose another output)")
    if path is not None:
        check_writable(path, folder=False, keep_folder=False)


def evaluate(args, extractor):
    """ADM's evaluator main(): activations of both batches, their statistics, the five metrics."""
    bs = args.batch_size
    ref = NpzImages(args.ref_batch, "reference batch", min_images=MIN_IMAGES)
    sample = NpzImages(args.sample_batch, "sample batch", min_images=MIN_IMAGES)
    ref_stats = read_npz_statistics(ref.path, "reference batch")
    ref_from_file = ref_stats is not None
    sample_stats = read_npz_statistics(sample.path, "sample batch")
    if ref.shape[1:3] != sample.shape[1:3]:
        print(f"warning: reference images are {ref.shape[1]}x{ref.shape[2]} but samples are "
              f"{sample.shape[1]}x{sample.shape[2]} (both are resized to 299 for Inception)")
    if extractor is None:
        extractor = load_extractor(args.inception_weights, args.device)

    print("computing reference batch activations...")
    ref_acts = compute_activations(ref.batches(bs), extractor, ref.num_batches(bs), "reference")
    print("computing/reading reference batch statistics...")
    if ref_stats is None:
        ref_stats = compute_statistics(ref_acts["pool"]), compute_statistics(ref_acts["spatial"])
    print("computing sample batch activations...")
    sample_acts = compute_activations(sample.batches(bs), extractor, sample.num_batches(bs), "samples")
    print("computing/reading sample batch statistics...")
    sample_from_file = sample_stats is not None
    if sample_stats is None:
        sample_stats = (compute_statistics(sample_acts["pool"]),
                        compute_statistics(sample_acts["spatial"]))
    else:
        print(f"note: {sample.path} carries mu/sigma; using them for FID/sFID as ADM does")

    print("Computing evaluations...")
    if len(sample) < args.is_split_size:
        print(f"note: {len(sample)} samples < Inception Score split size {args.is_split_size}: "
              f"one split of {len(sample)} (papers use 50,000 samples in 10 splits)")
    results = {
        "Inception Score": inception_score(sample_acts["logits"], args.is_split_size),
        "FID": frechet_distance(*sample_stats[0], *ref_stats[0], method=args.fid_method),
        "sFID": frechet_distance(*sample_stats[1], *ref_stats[1], method=args.fid_method),
    }
    results["Precision"], results["Recall"] = precision_recall(
        ref_acts["pool"], sample_acts["pool"], k=PR_NEIGHBOURS, row_batch_size=args.pr_batch_size,
        col_batch_size=args.pr_batch_size, device=args.device)
    for name in METRIC_NAMES:
        print(f"{name}: {results[name]}")

    if args.json is not None:
        record = dict(results)
        record.update(
            ref_batch=os.path.abspath(ref.path), sample_batch=os.path.abspath(sample.path),
            num_ref_images=len(ref), num_samples=len(sample),
            ref_statistics="from file" if ref_from_file else "from arr_0",
            sample_statistics="from file" if sample_from_file else "from arr_0",
            inception_weights=(os.path.abspath(args.inception_weights) if args.inception_weights
                               else "torch-fidelity download"),
            is_split_size=args.is_split_size, fid_method=args.fid_method,
            precision_recall_k=PR_NEIGHBOURS)
        save_json_atomic(args.json, record, overwrite=args.overwrite)
        print(f"wrote {args.json}")
    return results


#################################################################################
#                              Reference batches                                #
#################################################################################

def list_images(root):
    """Image files under `root` (recursively, sorted; flat folders and class folders alike, unlike
    helpers.data.images.find_images, which needs class folders)."""
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs.sort()
        files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(IMG_EXTENSIONS)]
    return files


class _FolderImages(torch.utils.data.Dataset):
    """(index, ADM-center-cropped uint8 (S, S, 3)) per file; None for an unreadable file."""

    def __init__(self, paths, image_size):
        self.paths, self.image_size = paths, image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = load_image(self.paths[index])                  # warns and gives None if corrupt
        return None if image is None else (index, np.asarray(center_crop_arr(image, self.image_size)))


def _collate_images(items):
    items = [item for item in items if item is not None]
    if not items:
        return np.zeros(0, dtype=np.int64), None
    return np.array([i for i, _ in items]), np.stack([image for _, image in items])


def _npz_image_batches(reader, batch_size, image_size):
    """(indices, images) from an .npz, ADM-center-cropped to image_size where the size differs."""
    start = 0
    for batch in reader.batches(batch_size):
        if batch.shape[1:3] != (image_size, image_size):
            batch = np.stack([np.asarray(center_crop_arr(Image.fromarray(image), image_size))
                              for image in batch])
        yield np.arange(start, start + len(batch)), batch
        start += len(batch)


def make_reference(args, extractor):
    """A reference batch: statistics over all source images, arr_0 = a seeded random subset."""
    _check_output(args.out, args.overwrite)
    source, size = args.make_ref, args.image_size
    if os.path.isdir(source):
        paths = list_images(source)
        total = len(paths)
        loader = torch.utils.data.DataLoader(_FolderImages(paths, size), batch_size=args.batch_size,
                                             num_workers=args.num_workers, collate_fn=_collate_images)
    elif os.path.isfile(source):
        reader = NpzImages(source, "real-image batch")
        total = len(reader)
        if reader.shape[1:3] != (size, size):
            print(f"note: center-cropping {reader.shape[1]}x{reader.shape[2]} images to "
                  f"{size}x{size} (ADM's crop); pass --image-size to keep another size")
        loader = _npz_image_batches(reader, args.batch_size, size)
    else:
        raise JobError(f"--make-ref {source} does not exist: pass a folder of images or an "
                              f".npz whose arr_0 is uint8 (N, H, W, 3)")
    if total < MIN_IMAGES:
        raise JobError(f"--make-ref {source} holds {total} images; at least {MIN_IMAGES} are "
                              f"needed")
    keep = total if args.num_ref_images <= 0 else min(args.num_ref_images, total)
    chosen = np.zeros(total, dtype=bool)
    chosen[np.random.default_rng(args.seed).permutation(total)[:keep]] = True
    if extractor is None:
        extractor = load_extractor(args.inception_weights, args.device)

    pool_stats, spatial_stats = RunningStatistics(), RunningStatistics()
    kept, seen = [], 0
    for indices, images in tqdm(loader, total=-(-total // args.batch_size), desc="reference",
                                file=sys.stderr, disable=None):
        if images is None:
            continue
        features = extractor(images)
        pool_stats.update(features["pool"])
        spatial_stats.update(features["spatial"])
        kept.append(images[chosen[indices]])
        seen += len(images)
    if seen < MIN_IMAGES:
        raise JobError(f"only {seen} of {total} images in {source} could be read")
    if seen < total:
        print(f"warning: skipped {total - seen} unreadable images of {total}")
    mu, sigma = pool_stats.finalize()
    mu_s, sigma_s = spatial_stats.finalize()
    arr = np.concatenate(kept)
    save_npz_atomic(args.out, overwrite=args.overwrite, arr_0=arr, mu=mu, sigma=sigma,
                    mu_s=mu_s, sigma_s=sigma_s)
    print(f"wrote {args.out}: arr_0 {arr.shape} (random subset, seed {args.seed}) and statistics "
          f"of {seen} images")
    return args.out


#################################################################################
#                                      Main                                     #
#################################################################################

def main(args, extractor=None):
    """Evaluate (REF SAMPLE) or build a reference batch (--make-ref); `extractor` is for tests."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise JobError(f"--device {args.device} but CUDA is not available: use --device cpu")
    if args.batch_size < 1 or args.is_split_size < 1 or args.pr_batch_size < 1:
        raise JobError("--batch-size, --is-split-size and --pr-batch-size must be >= 1")
    if args.make_ref is not None:
        if args.ref_batch is not None or args.sample_batch is not None:
            raise JobError("--make-ref takes no REF/SAMPLE batches: run the evaluation "
                                  "separately")
        if args.out is None:
            raise JobError("--make-ref needs --out REF.npz")
        return make_reference(args, extractor)
    if args.ref_batch is None or args.sample_batch is None:
        raise JobError("pass a reference batch and a sample batch (REF.npz SAMPLE.npz), or "
                              "--make-ref SOURCE --out REF.npz")
    if args.out is not None:
        raise JobError("--out belongs to --make-ref; results go to --json")
    _check_output(args.json, args.overwrite)
    return evaluate(args, extractor)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_batch", nargs="?", help="reference batch .npz (arr_0 [+ mu, sigma, "
                        "mu_s, sigma_s]), e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("sample_batch", nargs="?", help="sample batch .npz (arr_0 uint8 (N, H, W, 3))")
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity InceptionV3 weights .pth (default: download)")
    parser.add_argument("--batch-size", type=int, default=64, help="Inception batch (ADM: 64)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json/--out")
    parser.add_argument("--is-split-size", type=int, default=IS_SPLIT_SIZE,
                        help="Inception Score split size (ADM: 5000; fewer samples: one split)")
    parser.add_argument("--fid-method", choices=("sqrtm", "eigh"), default="sqrtm",
                        help="sqrtm: ADM's scipy.linalg.sqrtm; eigh: same trace, faster")
    parser.add_argument("--pr-batch-size", type=int, default=PR_BATCH_SIZE,
                        help="row/column batch of the precision/recall distances (ADM: 10000)")
    parser.add_argument("--make-ref", default=None, metavar="FOLDER_OR_NPZ",
                        help="build a reference batch from real images instead of evaluating")
    parser.add_argument("--out", default=None, help="output .npz of --make-ref")
    parser.add_argument("--image-size", type=int, default=256,
                        help="--make-ref: ADM center crop to this size")
    parser.add_argument("--num-ref-images", type=int, default=10000,
                        help="--make-ref: images kept in arr_0 (ADM: 10000; <= 0: all)")
    parser.add_argument("--seed", type=int, default=0, help="--make-ref: seed of the arr_0 subset")
    parser.add_argument("--num-workers", type=int, default=4,
                        help="--make-ref: image decoding workers for a folder")
    return parser


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser().parse_args()))
