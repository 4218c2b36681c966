"""`qtools demo-models`: build the demo base model, its LoRA adapter and suite."""

import json
import sys
import time
from pathlib import Path

import click

from .. import QtoolsError

BASE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")
RECIPE_FILE = "qtools_base_recipe.json"  # a family base's recipe, to rebuild it when the family changes


def _complete(path, files):
    return path.is_dir() and all((path / f).is_file() for f in files)


def _log(msg):
    print(f"[demo-models] {msg}", file=sys.stderr, flush=True)


def _recipes(family, seed):
    """(name prefix, base recipe, adapter recipe): the demo's, or a calibration family's base with
    the demo's adapter recipe adapting every layer; seed None keeps the demo adapter's seed."""
    from ..demo import train

    adapter = dict(train.ADAPTER)
    if seed is not None:
        adapter["seed"] = seed
    if family is None:
        return "demo", dict(train.BASE), adapter
    from ..calibrate.run import select_families

    fam = select_families([family])[0]
    adapter["num_layers"] = fam["base"]["num_layers"]
    return family, dict(fam["base"]), adapter


def _same_recipe(path, recipe) -> bool:
    return (path / RECIPE_FILE).is_file() and json.loads((path / RECIPE_FILE).read_text()) == recipe


def _trained_seed(adapter):
    """The seed an adapter records; None when its config is unreadable (it is then retrained)."""
    try:
        return json.loads((adapter / "adapter_config.json").read_text()).get("seed")
    except (OSError, ValueError, AttributeError):
        return None


def demo_models(out_dir="models", suite="suites/demo.jsonl", force=False, family=None, seed=None):
    """Build out_dir/demo_base, out_dir/demo_adapter and the suite; reuse complete ones.

    With family (a calibration family, `qtools calibrate`'s names), out_dir/FAMILY_base is that
    family's base and out_dir/FAMILY_adapter the demo's adapter recipe trained on it (seed: the
    adapter's training seed), i.e. one of the calibration's fine-tunes: the demo's pipeline on a
    model the demo was not tuned on."""
    from ..demo import data, train
    from ..io.atomic import atomic_output_dir

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QtoolsError(f"{out_dir} exists and is not a directory")
    prefix, base_recipe, adapter_recipe = _recipes(family, seed)
    base, adapter = out_dir / f"{prefix}_base", out_dir / f"{prefix}_adapter"
    built = {}

    if suite:
        suite = Path(suite)
        text = "\n".join(json.dumps(r) for r in data.suite_records()) + "\n"
        if force or not suite.exists() or suite.read_text() != text:
            suite.parent.mkdir(parents=True, exist_ok=True)
            suite.write_text(text)
            _log(f"wrote {suite}")
        built["suite"] = str(suite)

    # The demo's own models predate the recipe file: theirs is implied.
    if force or not _complete(base, BASE_FILES) or (family is not None and not _same_recipe(base, base_recipe)):
        _log(f"training the base model -> {base} (about 2-3 min on 2 CPU cores per 4 layers)")
        t = time.time()
        with atomic_output_dir(base, force=True) as tmp:
            train.train_base(tmp, **base_recipe)
            if family is not None:
                (Path(tmp) / RECIPE_FILE).write_text(json.dumps(base_recipe, indent=1))
        _log(f"base done in {time.time() - t:.0f} s")
        force = True  # a new base invalidates the old adapter
    else:
        _log(f"{base} is complete; reusing it (--force rebuilds)")
    built["base"] = str(base)

    if force or not _complete(adapter, ADAPTER_FILES) or _trained_seed(adapter) != adapter_recipe["seed"]:
        _log(f"LoRA fine-tuning -> {adapter}")
        t = time.time()
        with atomic_output_dir(adapter, force=True) as tmp:
            train.train_adapter(base, tmp, **adapter_recipe)
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
@click.option("--family", default=None,
              help="A calibration family (g4, g12, g24, g36, l8g24): build FAMILY_base and FAMILY_adapter instead.")
@click.option("--seed", type=int, default=None,
              help="The adapter's training seed (default the demo's, 0); 1 gives the calibration's first run.")
@click.option("--json", "as_json", is_flag=True, help="Print the built paths as JSON.")
def demo_models_cmd(out_dir, suite, force, family, seed, as_json):
    """Train the tiny demo base model and its LoRA adapter (deterministic, CPU, a few minutes)."""
    built = demo_models(out_dir=out_dir, suite=suite or None, force=force, family=family, seed=seed)
    if as_json:
        click.echo(json.dumps(built))
    else:
        for k, v in built.items():
            click.echo(f"{k:8s} {v}")
