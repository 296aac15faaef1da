"""ADM's evaluator command (openai/guided-diffusion, evaluations/evaluator.py), as DiT and DiC
use it, backed by evaluate.py: same metrics, same printed lines.

    python evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz \\
        [--inception-weights pt_inception-2015-12-05.pth] [--batch-size 64] [--device cuda]

prints "computing reference batch activations...", ..., then ADM's five result lines
"Inception Score: ...", "FID: ...", "sFID: ...", "Precision: ...", "Recall: ...".
Everything else (--json, --make-ref, --is-split-size) is evaluate.py's.
"""
import argparse
import sys

import evaluate
from helpers.utils.cli import run_main


def build_parser():
    """ADM's two positional batches plus the evaluate.py flags that matter for a plain run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref_batch", help="reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0 uint8 (N, H, W, 3))")
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity InceptionV3 weights .pth (default: download)")
    parser.add_argument("--batch-size", type=int, default=None, help="Inception batch (ADM: 64)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--fid-method", choices=("sqrtm", "eigh"), default=None,
                        help="sqrtm (ADM's, default) or eigh (same value, faster on CPU)")
    return parser


def evaluate_args(args):
    """evaluate.py's arguments for the same run: its parser supplies every default."""
    argv = [args.ref_batch, args.sample_batch]
    for flag, value in (("--inception-weights", args.inception_weights),
                        ("--batch-size", args.batch_size), ("--device", args.device),
                        ("--fid-method", args.fid_method)):
        if value is not None:
            argv += [flag, str(value)]
    return evaluate.build_parser().parse_args(argv)


def main(args, extractor=None):
    """Run evaluate.py's evaluation (its input errors are the project's one-line JobError)."""
    return evaluate.main(evaluate_args(args), extractor=extractor)


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser().parse_args()))
