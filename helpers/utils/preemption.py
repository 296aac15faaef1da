"""Stop on request: SIGTERM (what SLURM and Kubernetes send before they stop a job, and what
torchrun forwards) or SIGUSR1 (SLURM's `--signal=B:USR1@<seconds>`, forwarded by
scripts/slurm_train.sh) only sets a flag; the job checks it between units of work (a training step,
a chunk of samples or features), saves what it has and ends with exit code 75
(helpers.utils.cli.EXIT_PREEMPTED), which the scheduler turns into a requeue.

    with StopRequest() as stop:
        for chunk in chunks:
            if stop.requested:
                raise Stopped(...)
            ...

A second signal while the job saves only sets the flag again; saves are atomic anyway.
"""
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs flag-only handlers for `signals` (in the main thread; elsewhere none: the signals
    keep their previous action) and puts the previous handlers back on exit."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received = None        # the last stop signal received, or None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum)

    @property
    def requested(self):
        return self.received is not None

    @property
    def name(self):
        return self.received.name if self.received is not None else None

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()
        return False
