"""Atomic file writes: a crash or a full disk never leaves half a file under the final name,
and nothing is replaced unless the caller says so."""
import os
import tempfile


def atomic_write(path, write, overwrite=False):
    """Call `write(tmp_path)` for a temp file beside `path`, fsync it, then rename it into place.

    The temp file is hidden (starts with ".") and keeps `path`'s extension, so writers that pick
    a format from the name (PIL, np.savez) work and readers that list files never see it.
    Refuses to replace an existing `path` unless `overwrite` is set. Returns `path`.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: refusing to overwrite it "
                              f"(move it away or choose another output)")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path, text, overwrite=False):
    """`atomic_write` for a UTF-8 text file."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, write, overwrite)
