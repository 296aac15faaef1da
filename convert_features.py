"""
Pack a per-file latent set (the official DiT/DiC layout) into one memory-mapped array per set.

Reads   <feature-path>/<prefix>_features/*.npy  + <prefix>_labels/*.npy   (one file per sample)
Writes  <out>/<prefix>_packed/latents.npy  (N, C, H, W) float32
        <out>/<prefix>_packed/labels.npy   (N,) int64
        <out>/<prefix>_packed/names.txt    the file each row came from (row order = read order)
        <out>/<prefix>_packed/info.json    format, count, latent shape, source
Rows follow the order the training dataset reads the files in (names sorted naturally, so
`10_0.npy` after `9_1.npy`); flipped copies (`<index>_flip.npy`) are rows like any other. train.py
reads the packed set with the same --feature-path (a root holding both layouts is read packed).

The set is built in <out>/.partial-<prefix>_packed and renamed into place when complete, so an
interrupted run never leaves a packed set that would be read; running the same command again
resumes from the last saved chunk. An existing packed set is never replaced without --overwrite.
Once packed, the per-file folders are no longer read (keep them to resume or extend an
extraction; extract_features.py refuses to change a per-file set that has a packed copy).

Examples:
    python convert_features.py --feature-path features                  # features/imagenet256_packed
    python convert_features.py --feature-path features --prefix imagenet512 --out /fast/features
"""
import argparse
import sys

from helpers.utils.cli import JobError, one_line, run_main
from helpers.data.latents import read_packed_info
from helpers.data.packing import PackedSetExistsError, pack_latents


def main(args):
    """Check the flags, pack (or find the set already packed), print a one-line summary."""
    if args.workers < 1:
        raise JobError(f"--workers must be at least 1, got {args.workers}")
    if args.chunk_size < 1:
        raise JobError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    try:
        final = pack_latents(args.feature_path, prefix=args.prefix, out_root=args.out,
                             overwrite=args.overwrite, workers=args.workers,
                             chunk_size=args.chunk_size, progress=not args.quiet)
    except PackedSetExistsError as e:
        raise JobError(f"{e.path} already holds a packed set: refusing to overwrite it; pass "
                       f"--overwrite to replace it, or choose another --out") from e
    except JobError:
        raise
    except ValueError as e:         # the latent helpers' one-line messages about bad input
        raise JobError(one_line(e)) from e
    except OSError as e:
        raise JobError(f"{e.filename or args.feature_path}: {e.strerror or e}") from e
    info = read_packed_info(final)
    print(f"done: {info['count']} latents {tuple(info['latent_shape'])} with labels < "
          f"{info['num_classes_seen']} packed into {final}", flush=True)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--feature-path", type=str, required=True,
                        help="root holding <prefix>_features/ and <prefix>_labels/")
    parser.add_argument("--prefix", type=str, default=None,
                        help="which set, e.g. imagenet256 (needed only when the root holds several)")
    parser.add_argument("--out", type=str, default=None,
                        help="root for <prefix>_packed/ (default: --feature-path)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing <prefix>_packed/ (only once the new one is complete)")
    parser.add_argument("--workers", type=int, default=4,
                        help="threads reading the per-file set (helps on network file systems)")
    parser.add_argument("--chunk-size", type=int, default=4096,
                        help="rows between saved resume points")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser().parse_args()))
