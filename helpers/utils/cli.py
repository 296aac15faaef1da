"""The one error type of every script, how it ends a job (one line, an exit code), and how the
processes of a job agree on an outcome so that none is left waiting for another.

    def main(args):
        ...
        raise JobError("--image-size 30 is not divisible by 8: use a multiple of 8")

    if __name__ == "__main__":
        sys.exit(run_main(main, parse_args()))
"""
import os
import sys

import torch.distributed as dist

from helpers.utils.distributed import broadcast_object, gather_objects, is_distributed

EXIT_BAD_INPUT = 2    # the user must change a flag or a file (argparse uses 2 too)
EXIT_RUN_FAILED = 1   # the job itself failed (e.g. a NaN loss); the input was fine
# Stopped by SIGTERM/SIGUSR1 (preemption) after saving its state: run it again to continue. 75 is
# EX_TEMPFAIL of sysexits.h ("temporary failure, retry later"); not 143 (128 + SIGTERM: killed
# without saving), not 124 (timeout(1)'s), not 1 or 2 (a failed run, a bad input).
EXIT_PREEMPTED = 75


def one_line(message, default=None):
    """The first line of a message or exception (`default`, else the exception's type, if empty)."""
    text = str(message).strip()
    return text.splitlines()[0] if text else (default or type(message).__name__)


class JobError(ValueError):
    """A problem the user must fix, said in one line (what, which file, the fix); ends the job with
    exit code `code`. A ValueError, so library code that raises it reads naturally to callers.
    `label` starts the printed line; `rank` is the global rank that prints it (rank 0, unless rank 0
    may be the one that cannot, e.g. a hung rank)."""

    label = "error"

    def __init__(self, message, code=EXIT_BAD_INPUT, rank=0):
        text = str(message)
        marker = f"{__name__}.JobError: "   # re-raised by a DataLoader worker: the original's line
        if text.startswith("Caught JobError") and marker in text:
            text = text.rsplit(marker, 1)[1]
        super().__init__(one_line(text, default="error"))
        self.code, self.rank = code, rank


class Stopped(JobError):
    """A job stopped on request (a preemption signal) with its state saved: exit code 75."""

    label = "stopped"

    def __init__(self, message):
        super().__init__(message, code=EXIT_PREEMPTED)


def global_rank():
    """This process's rank in the whole job (0 without a process group or torchrun)."""
    if is_distributed():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def agree(fn, on_main_only=False):
    """Run `fn()` (on global rank 0 only, or on every rank) and share the outcome.

    When any process fails with a JobError (or a one-line ValueError/OSError from a helper), every
    process raises the same JobError, so no process hangs in a collective that another has left.
    With on_main_only, rank 0's result is returned on every rank.
    """
    result, error = None, None
    if global_rank() == 0 or not on_main_only:
        try:
            result = fn()
        except JobError as e:
            error = (str(e), e.code)
        except (ValueError, OSError) as e:
            error = (one_line(e), EXIT_BAD_INPUT)
    if on_main_only:
        result, error = broadcast_object((result, error))
    else:
        error = next((e for e in gather_objects(error) if e is not None), None)
    if error is not None:
        raise JobError(error[0], error[1])
    return result


def run_main(main, args):
    """Call `main(args)`; a JobError becomes `error: <one line>` on stderr (on one rank, its `rank`)
    and its exit code. Returns the exit code for sys.exit."""
    try:
        main(args)
        return 0
    except JobError as e:
        if global_rank() == e.rank:
            print(f"{e.label}: {e}", file=sys.stderr, flush=True)
        return e.code
