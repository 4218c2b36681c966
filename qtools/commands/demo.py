"""`qtools demo-models`: build the demo base model, its LoRA adapter and suite."""

import json
import sys
import time
from pathlib import Path

import click

from .. import QtoolsError

BASE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")


def _complete(path, files):
    return path.is_dir() and all((path / f).is_file() for f in files)


def _log(msg):
    print(f"[demo-models] {msg}", file=sys.stderr, flush=True)


def demo_models(out_dir="models", suite="suites/demo.jsonl", force=False):
    """Build out_dir/demo_base, out_dir/demo_adapter and the suite; reuse complete ones."""
    from ..io.atomic import atomic_output_dir
    from ..demo import data, train

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QtoolsError(f"{out_dir} exists and is not a directory")
    base, adapter = out_dir / "demo_base", out_dir / "demo_adapter"
    built = {}

    if suite:
        suite = Path(suite)
        text = "\n".join(json.dumps(r) for r in data.suite_records()) + "\n"
        if force or not suite.exists() or suite.read_text() != text:
            suite.parent.mkdir(parents=True, exist_ok=True)
            suite.write_text(text)
            _log(f"wrote {suite}")
        built["suite"] = str(suite)

    if force or not _complete(base, BASE_FILES):
        _log(f"training the base model -> {base} (about 2-3 min on 2 CPU cores)")
        t = time.time()
        with atomic_output_dir(base, force=True) as tmp:
            train.train_base(tmp, **train.BASE)
        _log(f"base done in {time.time() - t:.0f} s")
        force = True  # a new base invalidates the old adapter
    else:
        _log(f"{base} is complete; reusing it (--force rebuilds)")
    built["base"] = str(base)

    if force or not _complete(adapter, ADAPTER_FILES):
        _log(f"LoRA fine-tuning -> {adapter}")
        t = time.time()
        with atomic_output_dir(adapter, force=True) as tmp:
            train.train_adapter(base, tmp, **train.ADAPTER)
            # The config names the base by its final path, not the temp dir.
            cfg_path = Path(tmp) / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["model"] = str(base)
            cfg_path.write_text(json.dumps(cfg, indent=2))
        _log(f"adapter done in {time.time() - t:.0f} s")
    else:
        _log(f"{adapter} is complete; reusing it (--force rebuilds)")
    built["adapter"] = str(adapter)
    return built


@click.command("demo-models")
@click.option("--output", "-o", "out_dir", default="models", show_default=True, type=click.Path(file_okay=False),
              help="Directory that receives demo_base/ and demo_adapter/.")
@click.option("--suite", default="suites/demo.jsonl", show_default=True, type=click.Path(dir_okay=False),
              help="Where to (re)write the demo suite; '' to skip.")
@click.option("--force", is_flag=True, help="Rebuild even if complete outputs exist.")
@click.option("--json", "as_json", is_flag=True, help="Print the built paths as JSON.")
def demo_models_cmd(out_dir, suite, force, as_json):
    """Train the tiny demo base model and its LoRA adapter (deterministic, CPU, a few minutes)."""
    built = demo_models(out_dir=out_dir, suite=suite or None, force=force)
    if as_json:
        click.echo(json.dumps(built))
    else:
        for k, v in built.items():
            click.echo(f"{k:8s} {v}")
