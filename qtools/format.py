"""Formatting shared by every command's human output."""


def human_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def progress(iterable, desc: str, enabled: bool = True, **kwargs):
    """A tqdm bar on stderr, shown only when stderr is a terminal (tqdm's disable=None):
    logs, pipes and `2>file` captures get no carriage-return bars."""
    if not enabled:
        return iterable
    import sys

    from tqdm import tqdm

    return tqdm(iterable, desc=desc, file=sys.stderr, leave=False, disable=None, **kwargs)
