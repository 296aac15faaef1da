"""Atomic file writes: a crash or a full disk never leaves half a file under the final name,
nothing is replaced unless the caller says so, and two writers can never both publish one name.

Published files get the permissions a plain open() would give them under the process's umask
(a temp file from mkstemp is 0600, and a rename keeps that mode).
"""
import errno
import fnmatch
import os
import tempfile
import threading

from helpers.utils.cli import EXIT_RUN_FAILED, JobError

TMP_PATTERN = ".tmp-*"          # atomic_write's temp files: hidden, so readers never list them
_UMASK_LOCK = threading.Lock()
# errors of os.link on file systems without hard links (FAT, some network and FUSE mounts)
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK,
                  errno.ENOSYS, errno.EACCES}


# A full disk: ENOSPC, or a quota (EDQUOT). torch.save reports it as a RuntimeError ("unexpected
# pos ...") without an errno: a failed write with less than LOW_SPACE left counts as a full disk.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
LOW_SPACE = 1 << 20
MB = 1 << 20


class NoSpaceError(JobError):
    """A write that failed for lack of space, in one line (exit code 1)."""

    def __init__(self, message):
        super().__init__(message, code=EXIT_RUN_FAILED)


def free_bytes(folder):
    """Bytes an unprivileged writer can still put in `folder`'s file system."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def is_out_of_space(error, folder):
    """Whether a failed write into `folder` failed for lack of space (checked on the disk when the
    error carries no errno, as torch.save's does)."""
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    if "No space left" in str(error) or "quota exceeded" in str(error).lower():
        return True
    try:
        return free_bytes(folder) < LOW_SPACE
    except OSError:
        return False


def no_space_error(folder, path, needed, partial=0):
    """The one line for a write that did not fit (`needed`: bytes, an estimate), its temp file of
    `partial` bytes being removed (space a still-open handle may hold a moment longer)."""
    try:
        free = f"{megabytes(free_bytes(folder) + partial)} MB free"
    except OSError:
        free = "free space unknown"
    return NoSpaceError(f"no space left on {folder} while writing {path} (needed about "
                        f"{megabytes(needed)} MB, {free})")


def reserve_space(path, folder):
    """Allocate the blocks of `path` (a sparse file just sized, e.g. a new memory map) now, so that a
    full disk is the one-line NoSpaceError here and not a SIGBUS when a page is written later.
    File systems without fallocate keep the sparse file."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise no_space_error(folder, path, size) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)


def megabytes(nbytes):
    """'16', '0.3': MB to two significant digits below 10."""
    value = nbytes / MB
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _size_quietly(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class OutputExistsError(JobError, FileExistsError):
    """An output is already there and overwriting was not asked for (a JobError, exit code 2;
    also a FileExistsError for callers that catch that)."""


def current_umask():
    """The process's umask, read without changing it where Linux allows (thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:           # elsewhere: set and restore, serialised among our threads
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def plain_file_mode():
    """The mode a plain open(path, "w") gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def fsync_folder(folder):
    """Make a rename or link inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_path(path):
    """Flush a file (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path):
    """Remove a temp file of ours if it is still there."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def exists_error(path):
    """The one-line error for an output that is already there."""
    return OutputExistsError(f"{path} already exists: refusing to overwrite it "
                             f"(move it away or choose another output)")


def _publish(tmp, path, overwrite):
    """Move the complete `tmp` to `path`: os.replace if overwriting, else a hard link, which
    fails atomically if `path` exists (no check-then-rename race between two writers)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise exists_error(path) from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        # No hard links here: the best we can do is check, then rename (racy between writers).
        if os.path.lexists(path):
            raise exists_error(path) from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def atomic_write(path, write, overwrite=False, size_hint=0):
    """Call `write(tmp_path)` for a temp file beside `path`, fsync it, then publish it as `path`.

    The temp file is hidden (".tmp-*", see remove_stale_temps) and keeps `path`'s extension, so
    writers that pick a format from the name (PIL, np.savez) work and readers never list it.
    Refuses to replace an existing `path` (OutputExistsError, a JobError) unless `overwrite`;
    the refusal is atomic. The file gets the mode a plain open() would give it. A full disk is a
    NoSpaceError (one line; `size_hint`, the expected size in bytes, goes into it), the temp file
    removed and any previous file intact. Returns `path`.
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise exists_error(path)           # early and cheap; _publish is the atomic check
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, plain_file_mode())
        fsync_path(tmp)
        _publish(tmp, path, overwrite)
    except BaseException as e:
        full = isinstance(e, Exception) and not isinstance(e, JobError) and is_out_of_space(e, folder)
        written = _size_quietly(tmp)
        error = no_space_error(folder, path, max(size_hint, written), written) if full else None
        _remove_quietly(tmp)
        if error is not None:
            raise error from e
        raise
    fsync_folder(folder)
    return path


def atomic_write_text(path, text, overwrite=False):
    """`atomic_write` for a UTF-8 text file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write, overwrite)


def remove_stale_temps(folder, pattern=TMP_PATTERN):
    """Delete the temp files (names matching `pattern`) that killed writers left in `folder`;
    returns how many. Call it only while holding the folder's lock (helpers.utils.locks.RunLock), so
    no live writer's temp file is taken."""
    removed = 0
    if not os.path.isdir(folder):
        return 0
    for entry in os.scandir(folder):
        if fnmatch.fnmatchcase(entry.name, pattern) and not entry.is_dir(follow_symlinks=False):
            try:
                os.remove(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def check_writable(path, folder=None, keep_folder=True):
    """Errors before work: make sure files can be written at `path` (a folder if it is one or
    `folder` is True, else the folder of the file `path`), creating the folder if missing, by
    writing and fsyncing a small probe file. A read-only, full or impossible destination is a
    one-line JobError naming it. With keep_folder=False, folders it had to create are removed
    again (a job that stops later on bad input then leaves nothing behind). Returns the folder."""
    path = os.fspath(path)
    if folder is None:
        folder = os.path.isdir(path)
    target = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    created, parent = [], target
    while parent and not os.path.exists(parent) and os.path.dirname(parent) != parent:
        created.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(target, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=target, prefix=".tmp-probe-")
    except OSError as e:
        raise JobError(f"cannot write to {target} ({e.strerror or e}): choose a writable output "
                       f"location") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise JobError(f"cannot write to {target} ({e.strerror or e}): free some space or choose "
                       f"another output location") from e
    finally:
        _remove_quietly(probe)
        for made in created if not keep_folder else ():
            try:
                os.rmdir(made)
            except OSError:
                break
    return target
