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
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Iterator

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
    tmp.mkdir()
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
        _remove(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, QtoolsError):
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise QtoolsError(
                    f"no space left on device while writing {target}; "
                    "the partial output was removed"
                ) from None
            raise QtoolsError(
                f"could not write {target}: {exc.strerror or exc}; "
                "the partial output was removed"
            ) from None
        raise
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as JSON to `path` through a temporary file and a rename."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise QtoolsError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
