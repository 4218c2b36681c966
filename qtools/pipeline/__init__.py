"""The fuse -> quantize -> validate pipeline and what reports on it."""
