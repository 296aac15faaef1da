"""One writer per folder.

RunLock: an exclusive advisory lock (flock on `<folder>/.lock`) held for the life of a job that
writes a folder (a run folder, a sample folder, a feature folder, a packed set). The kernel drops
it when the process dies, however it dies (kill -9 included), so a stale lock never blocks a
later job. A second job on the same folder is refused in one line naming the holder:

    with RunLock(run_dir, what="training run"):      # or lock.acquire() ... lock.release()
        ...

In a multi-process job only global rank 0 takes it (e.g. inside helpers.utils.cli.agree(...,
on_main_only=True)), so every rank hears of a refusal. flock is per node: on a network file
system the lock keeps out jobs started on the same node only.
"""
import json
import os
import socket
import sys
import time

from helpers.utils.cli import JobError

LOCK_NAME = ".lock"


def _holder_info():
    """Who holds a lock: host, pid, command and start time (written into the lock file)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)[:300],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe_holder(text):
    """One-line description of a lock file's holder record ("another process" if unreadable)."""
    try:
        info = json.loads(text)
        return (f"pid {info['pid']} on {info['host']} ({info['command']}), started "
                f"{info['started']}")
    except (ValueError, KeyError, TypeError):
        return "another process (its details are not written yet)"


class RunLock:
    """An exclusive, non-blocking lock on `folder` (created if missing) for one job's lifetime;
    `what` names the job kind in the refusal ("run", "sampling", "feature extraction", ...)."""

    def __init__(self, folder, what="run"):
        self.folder = os.path.abspath(os.fspath(folder))
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.what = what
        self._handle = None

    @property
    def held(self):
        """True while this object holds the lock."""
        return self._handle is not None

    def acquire(self):
        """Take the lock or raise a one-line JobError naming its holder. Returns self."""
        if self._handle is not None:
            return self
        try:
            import fcntl
        except ImportError:     # not POSIX: no lock (one job per folder is then up to the user)
            self._handle = False
            return self
        while True:
            try:
                os.makedirs(self.folder, exist_ok=True)
                handle = open(self.path, "a+", encoding="utf-8")
            except OSError as e:
                raise JobError(f"cannot create the lock file {self.path} ({e.strerror or e}): "
                               f"choose a writable folder") from e
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                holder = describe_holder(handle.read())
                handle.close()
                raise JobError(f"{self.folder} is being written by another {self.what} job: "
                               f"{holder}; wait for it to finish, stop it, or choose another "
                               f"folder") from None
            if self._is_current(handle):
                break
            handle.close()      # a releasing holder unlinked that file: lock the new one
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(_holder_info()) + "\n")
        handle.flush()
        self._handle = handle
        return self

    def _is_current(self, handle):
        """True if `handle` is still the file at self.path (not one a holder unlinked)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except OSError:
            return False

    def release(self):
        """Let go of the lock and remove the lock file (while still holding it: acquirers
        check they locked the file that is still there, so no two jobs hold one folder)."""
        handle, self._handle = self._handle, None
        if handle:
            if self._is_current(handle):
                try:
                    os.remove(self.path)
                except OSError:
                    pass
            handle.close()          # closing the file drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
