"""Checks of output paths, run by every public writer before it does any work, so that a bad
path gives a typed error that says what to do, and nothing is half-written; and the one atomic
writer every output goes through (temporary file, fsync, rename)."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Union

from .errors import GraphPeftError

__all__ = ["atomic_write", "check_output_file", "check_output_folder"]


def atomic_write(path: str, content: Union[bytes, Callable[[str], None]]) -> None:
    """Write ``path`` atomically: ``content`` (bytes, or a function that writes a file at the
    path it is given) goes to a temporary file in the same folder, is fsynced and renamed into
    place, so a reader sees the old file or the whole new one, never half of it."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, (bytes, bytearray)):
                f.write(content)
        if not isinstance(content, (bytes, bytearray)):
            content(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _fspath(path: Any, what: str, error: type[GraphPeftError]) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise error(f"{what}: the path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    p = os.fspath(path)
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    if not p:
        raise error(f"{what}: the path is empty; give a file or folder path")
    return p


def _check_writable_parent(folder: str, path: str, what: str, error: type[GraphPeftError]) -> None:
    """``folder`` (which may not exist yet) can be created and written into."""
    cur = folder
    while not os.path.exists(cur):
        parent = os.path.dirname(cur)
        if parent == cur:
            break
        cur = parent
    if not os.path.isdir(cur):
        raise error(f"{what}: cannot write {path}: {cur} is a file, not a folder; choose another path "
                    "or move that file away")
    try:  # a real probe: permissions, read-only mounts, /proc ... (removed at once)
        with tempfile.TemporaryFile(dir=cur):
            pass
    except OSError as e:
        raise error(f"{what}: cannot write {path}: the folder {cur} is not writable ({e.strerror or e}); "
                    "choose a writable path") from e


def check_output_file(path: Any, what: str, error: type[GraphPeftError]) -> str:
    """Raise ``error`` unless ``path`` can be written as a file (its folders are created by the
    writer); returns it as a str."""
    p = _fspath(path, what, error)
    if os.path.isdir(p):
        raise error(f"{what}: {p} is a folder; give a file path such as {os.path.join(p, 'model.onnx')}")
    _check_writable_parent(os.path.dirname(os.path.abspath(p)), p, what, error)
    return p


def check_output_folder(path: Any, what: str, error: type[GraphPeftError]) -> str:
    """Raise ``error`` unless ``path`` is (or can be created as) a writable folder; returns it."""
    p = _fspath(path, what, error)
    if os.path.exists(p) and not os.path.isdir(p):
        raise error(f"{what}: {p} is a file, not a folder; give a folder path (it is created if missing)")
    _check_writable_parent(os.path.abspath(p), p, what, error)
    return p
