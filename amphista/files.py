"""Writing files atomically, with the permissions a plain open() or mkdir would give them.

tempfile.mkstemp/mkdtemp create owner-only files (0600) and folders (0700), and so does safetensors'
save_file, whatever the umask. Everything amphista writes goes through here so that a checkpoint,
a drafter or a converted model comes out 0644/0755 under the usual umask 022, like any other file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading

_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    os.umask can only be read by setting it, and for that instant another thread creating a file would
    get a world-writable one, so Linux's /proc is preferred; the fallback at least keeps our own threads
    out of the window."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def default_permissions(root) -> None:
    """Give `root` (a file, or a folder and everything under it) the modes open() and mkdir would."""
    umask = current_umask()
    root = os.fspath(root)
    os.chmod(root, (0o777 if os.path.isdir(root) else 0o666) & ~umask)
    for folder, dirs, files in os.walk(root):  # does not descend into symlinked folders
        for name in dirs + files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):  # chmod would follow it to a file that is not ours
                os.chmod(path, (0o777 if name in dirs else 0o666) & ~umask)


def fsync_dir(folder) -> None:
    """Make a rename in `folder` durable; a no-op where folders cannot be opened (Windows) or synced."""
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


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write by name; on success it is fsynced, given the
    default file mode and renamed over `path`; on any error it is removed and `path` is untouched."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:  # the writer may have replaced the file, so sync what is there now
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write(path, write) -> None:
    """Call write(binary file object) on a temporary file beside `path`, then rename it over `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)


def atomic_write_bytes(path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
