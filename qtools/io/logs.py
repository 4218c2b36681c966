"""Where qtools writes its logs: one naming for every command, so compare finds them all."""

from __future__ import annotations

from pathlib import Path


def log_path(model: str | Path, suite: str | None = None, logs_dir: str | Path = "logs",
             kind: str | None = None) -> Path:
    """<logs>/<model>-<suite>.json for a validate log, <logs>/<kind>-<model>.json for another
    kind (retention); `model` is a name or a directory (its resolved name)."""
    name = Path(model).resolve().name if isinstance(model, Path) else str(model)
    stem = f"{kind}-{name}" if kind else name
    return Path(logs_dir) / (f"{stem}-{suite}.json" if suite else f"{stem}.json")
