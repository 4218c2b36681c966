"""Formatting helpers shared by the pipeline commands."""

from ..validate import human_bytes  # noqa: F401
