"""Write a model directory all at once or not at all.

`atomic_output_dir` hands out a temporary directory beside the target (same
filesystem, so the final rename is atomic) and renames it into place only when
the body finishes. Any failure, Ctrl-C included, removes the temporary
directory, so no half-written model is ever left where validate would find it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import IO, Callable, Iterator

from .. import QtoolsError

TMP_PREFIX = ".qtools-tmp-"


def check_output_free(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing output unless force; return the path."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise QtoolsError(
            f"{path} already exists; pass --force (make: FORCE=1) to overwrite it"
        )
    return path


def _existing_ancestor(path: Path) -> Path:
    """The nearest directory above `path` that exists (what must accept the new entries)."""
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    return anc


def check_writable(path: str | os.PathLike, need_bytes: int | None = None, file: bool = False) -> Path:
    """Before long work, the checks a write to `path` will meet: its directory (or the nearest
    existing one above it) accepts a new file, created and removed here, and holds `need_bytes`
    free when an estimate is known; a `file` must not be an existing directory. Nothing is left
    behind; returns the path."""
    from ..format import human_bytes

    path = Path(path)
    if file and path.is_dir():
        raise QtoolsError(f"cannot write {path}: it is a directory")
    anc = _existing_ancestor(path)
    if not anc.is_dir():
        raise QtoolsError(f"cannot write {path}: {anc} is not a directory")
    probe = anc / f"{TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise QtoolsError(f"cannot write {path}: {anc} is not writable ({exc.strerror or exc})") from None
    if need_bytes:
        free = shutil.disk_usage(anc).free
        if free < need_bytes:
            raise QtoolsError(f"not enough free space for {path}: it needs about {human_bytes(need_bytes)}, "
                              f"{anc} has {human_bytes(free)} free")
    return path


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_error(exc: BaseException, target: Path, free: int | None = None) -> QtoolsError | None:
    """The one-line error for a failed write, or None if `exc` is not one. MLX reports its own
    write failures as RuntimeError ("[write] Unable to write N bytes"), without an errno: a
    filesystem left with less free space than the write needed was full."""
    if isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        detail = exc.strerror or str(exc)
    elif isinstance(exc, RuntimeError) and re.match(r"\[(write|save\w*)\] (Unable to write|File|Failed to open)",
                                                  str(exc)):
        m = re.search(r"Unable to write (\d+) bytes", str(exc))
        full = m is not None and free is not None and free < int(m.group(1)) + (1 << 20)
        detail = str(exc)
    else:
        return None
    if full:
        return QtoolsError(f"no space left on device while writing {target}; the partial output was removed")
    return QtoolsError(f"could not write {target}: {detail}; the partial output was removed")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the body succeeds."""
    target = check_output_free(path, force)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QtoolsError(f"cannot create {parent}: {exc.strerror or exc}") from None
    tmp = parent / f"{TMP_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise QtoolsError(f"cannot write {target}: {parent} is not writable ({exc.strerror or exc})") from None
    # SIGTERM (kill, a closed terminal) cleans up like Ctrl-C instead of leaving tmp behind.
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield tmp
        # Move any old output aside first so the target never holds a mix.
        old = None
        if target.exists() or target.is_symlink():
            old = parent / f"{TMP_PREFIX}{target.name}-old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _remove(old)
    except BaseException as exc:
        free = _free_bytes(parent)  # measured before the partial output frees its space
        _remove(tmp)
        err = write_error(exc, target, free)
        if err is not None:
            raise err from None
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """A temporary name beside `path`, renamed onto it when the body succeeds, removed otherwise;
    an OSError (a full disk) is one `Error:` line."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QtoolsError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file through a temporary name and a rename: `write(f)` fills the open binary file."""
    path = Path(path)
    with _temp_beside(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with _temp_beside(path) as tmp:
        tmp.write_text(text)
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as JSON to `path` through a temporary file and a rename."""
    import json

    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json_or_none(path: str | os.PathLike):
    """A JSON file written by qtools as a cache or record: None when it is missing, unreadable or
    not JSON (the caller rebuilds it), never a traceback."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
