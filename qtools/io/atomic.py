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
    if os.path.lexists(path) and not force:
        raise QtoolsError(
            f"{path} already exists; pass --force (make: FORCE=1) to overwrite it"
        )
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either missing, or a name the file system refuses
        return False


def _real(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def check_output(out: str | os.PathLike, inputs=(), force: bool | None = None) -> Path:
    """The one check every writer makes of its output against its inputs: an output that is,
    contains or lies inside an input (a model directory, an adapter, a suite, a log) is refused,
    through symlinks, so the user's input is never replaced or written into. `force` None: a
    file the command overwrites as a matter of course (a log); True/False: an existing output is
    refused unless forced (check_output_free). Returns the output path."""
    out = Path(out)
    real_out = _real(out)
    for given in inputs:
        if given is None:
            continue
        real_in = _real(Path(given))
        if real_out == real_in or _same_file(real_out, real_in):
            how = "is"
        elif real_out in real_in.parents:
            how = "contains"
        elif real_in in real_out.parents:
            how = "lies inside"
        else:
            continue
        raise QtoolsError(f"the output {out} {how} the input {given}: writing it would destroy the input; "
                          "choose another output")
    if force is not None:
        check_output_free(out, force)
    return out


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _path_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def _fit(name: str, room: int) -> str:
    """`name` cut to at most `room` bytes of the file system's encoding (whole characters)."""
    while name and len(os.fsencode(name)) > room:
        name = name[:-1]
    return name or "x"


def temp_dir_name(target: Path, tag: str = "") -> str:
    """The temporary name a directory output is written under, beside it: never longer than the
    file system allows a name (the target's name is shortened in it if need be)."""
    tail = f"-{tag}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    room = _name_max(_existing_ancestor(target)) - len(TMP_PREFIX) - len(tail)
    return f"{TMP_PREFIX}{_fit(target.name, room)}{tail}"


def temp_file_name(target: Path) -> str:
    """The temporary name a file is written under beside it, as short as the file system needs."""
    tail = f".{uuid.uuid4().hex[:8]}.tmp"
    room = _name_max(_existing_ancestor(target)) - 1 - len(tail)
    return f".{_fit(target.name, room)}{tail}"


# Longest name mlx-lm's save writes inside a model directory (adapters/adapter_config.json,
# model-00001-of-00002.safetensors, model.safetensors.index.json), with room to spare.
_INNER_NAME_BYTES = 64


def _existing_ancestor(path: Path) -> Path:
    """The nearest directory above `path` that exists (what must accept the new entries)."""
    anc = path.parent
    while not os.path.exists(anc) and anc != anc.parent:
        anc = anc.parent
    return anc


def _check_names(path: Path, anc: Path, file: bool, mlx: bool) -> None:
    """What the file system (and MLX's writer) will refuse of a path, its temporary name included:
    a name longer than NAME_MAX, a path longer than PATH_MAX, a path that is not UTF-8 (MLX)."""
    if mlx:
        try:
            str(path.absolute()).encode("utf-8")
        except UnicodeEncodeError:
            raise QtoolsError(f"cannot write {os.fsdecode(os.fsencode(path))!r}: MLX writes only paths "
                              "that are valid UTF-8; choose another name") from None
    name_max = _name_max(anc)
    created = [p.name for p in [path, *path.parents] if p != anc and anc in p.parents]
    tmp = temp_file_name(path) if file else temp_dir_name(path, "old-")
    for name in [*created, tmp]:
        if len(os.fsencode(name)) > name_max:
            raise QtoolsError(f"cannot write {path}: the name {name[:40]}... is {len(os.fsencode(name))} bytes, "
                              f"longer than the file system allows ({name_max}); choose a shorter name")
    longest = len(os.fsencode(str(path.parent.absolute() / tmp)))
    longest = max(longest, len(os.fsencode(str(path.absolute())))) + (0 if file else 1 + _INNER_NAME_BYTES)
    if longest >= _path_max(anc):
        raise QtoolsError(f"cannot write {path}: the path is longer than the file system allows "
                          f"({_path_max(anc)} bytes); choose a shorter one")


def check_writable(path: str | os.PathLike, need_bytes: int | None = None, file: bool = False,
                   mlx: bool | None = None) -> Path:
    """Before long work, the checks a write to `path` will meet, for the final name and the
    temporary one it is written under: every name fits the file system (NAME_MAX, PATH_MAX), MLX
    can write the path (UTF-8; `mlx` defaults to directory outputs, the models mlx-lm saves), its
    directory (or the nearest existing one above it) accepts a new file, created and removed here,
    and holds `need_bytes` free when an estimate is known; a `file` must not be an existing
    directory, nor a directory output an existing file. Nothing is left behind; returns the path."""
    from ..format import human_bytes

    path = Path(path)
    # os.path's tests, not pathlib's: a name too long for the file system is not an exception here
    if file and os.path.isdir(path):
        raise QtoolsError(f"cannot write {path}: it is a directory")
    if not file and os.path.exists(path) and not os.path.isdir(path):
        raise QtoolsError(f"cannot write {path}: it is a file, not a directory")
    anc = _existing_ancestor(path)
    if not os.path.isdir(anc):
        raise QtoolsError(f"cannot write {path}: {anc} is not a directory")
    _check_names(path, anc, file, (not file) if mlx is None else mlx)
    probe = anc / f"{TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with signals_deferred():  # created and removed as one step: Ctrl-C cannot leave it behind
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


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then act as they would have: a rename that
    must not be torn in two, a cleanup that must finish. Python-level handlers hold them (a
    signal mask would not: any of MLX's threads may receive the signal). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in DEFERRED_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if caught:
            handler = old[caught[0]]
            if callable(handler):
                handler(caught[0], None)  # Python's default_int_handler or ours: KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (kill, a closed terminal) raises KeyboardInterrupt as Ctrl-C does, so every cleanup
    that Ctrl-C runs runs for it too; the previous handler comes back after the block."""
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the body succeeds."""
    target = check_output_free(path, force)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QtoolsError(f"cannot create {parent}: {exc.strerror or exc}") from None
    with sigterm_interrupts():
        tmp = parent / temp_dir_name(target)
        try:  # made inside the try whose cleanup removes it: an interrupt right after mkdir leaves nothing
            try:
                tmp.mkdir()
            except OSError as exc:
                raise QtoolsError(f"cannot write {target}: {parent} is not writable ({exc.strerror or exc})") from None
            yield tmp
            # Move any old output aside first so the target never holds a mix; no signal may come
            # between the renames (the old output would be left under its temporary name).
            with signals_deferred():
                old = None
                if os.path.lexists(target):
                    old = parent / temp_dir_name(target, "old-")
                    os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    if old is not None:
                        os.replace(old, target)
                    raise
                if old is not None:
                    _remove(old)
        except BaseException as exc:
            free = _free_bytes(parent)  # measured before the partial output frees its space
            with signals_deferred():
                _remove(tmp)
            err = write_error(exc, target, free)
            if err is not None:
                raise err from None
            raise


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """A temporary name beside `path`, renamed onto it when the body succeeds, removed otherwise;
    an OSError (a full disk) is one `Error:` line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QtoolsError(f"cannot write {path}: {exc.strerror or exc}") from None
    tmp = path.with_name(temp_file_name(path))
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        with signals_deferred():
            _unlink_quietly(tmp)
        raise QtoolsError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with signals_deferred():
            _unlink_quietly(tmp)
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
    """Write `obj` as JSON to `path` through a temporary file and a rename; a name ending in .gz is
    gzipped (compact, no timestamp: the same object gives the same bytes, as a committed record needs)."""
    import json

    if Path(path).suffix == ".gz":
        import gzip

        data = gzip.compress(json.dumps(obj, separators=(",", ":")).encode(), mtime=0)
        return write_atomic(path, lambda f: f.write(data))
    return write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json_or_none(path: str | os.PathLike):
    """A JSON file written by qtools as a cache or record (gzipped when its name ends in .gz): None
    when it is missing, unreadable or not JSON (the caller rebuilds it), never a traceback."""
    import gzip
    import json

    try:
        raw = Path(path).read_bytes()
        return json.loads(gzip.decompress(raw) if Path(path).suffix == ".gz" else raw)
    except (OSError, EOFError, UnicodeDecodeError, ValueError):
        return None
