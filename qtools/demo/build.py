"""Build the demo's models: the tiny base, its LoRA adapter and the suite (`qtools demo-models`)."""

import json
import sys
import time
from pathlib import Path

from .. import QtoolsError
from ..io.adapters import check_adapter_dir
from ..io.atomic import read_json_or_none

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
    from . import train

    adapter = dict(train.ADAPTER)
    if seed is not None:
        if seed < 0:
            raise QtoolsError(f"seed {seed} is negative: use 0 or more")
        adapter["seed"] = seed
    if family is None:
        return "demo", dict(train.BASE), adapter
    adapter["num_layers"] = family["base"]["num_layers"]
    return family["name"], dict(family["base"]), adapter


def _same_recipe(path, recipe) -> bool:
    return read_json_or_none(path / RECIPE_FILE) == recipe


def _trained_seed(adapter):
    """The seed an adapter records; None when its config is unreadable (it is then retrained)."""
    cfg = read_json_or_none(adapter / "adapter_config.json")
    return cfg.get("seed") if isinstance(cfg, dict) else None


def demo_models(out_dir="models", suite="suites/demo.jsonl", force=False, family=None, seed=None):
    """Build out_dir/demo_base, out_dir/demo_adapter and the suite; reuse complete ones.

    With family (a calibration family, {"name": ..., "base": recipe}, as calibrate's select_families
    gives it), out_dir/FAMILY_base is that
    family's base and out_dir/FAMILY_adapter the demo's adapter recipe trained on it (seed: the
    adapter's training seed), i.e. one of the calibration's fine-tunes: the demo's pipeline on a
    model the demo was not tuned on."""
    from ..io.atomic import atomic_output_dir, check_output, check_writable, write_text_atomic
    from . import data, train

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise QtoolsError(f"{out_dir} exists and is not a directory")
    prefix, base_recipe, adapter_recipe = _recipes(family, seed)
    base, adapter = out_dir / f"{prefix}_base", out_dir / f"{prefix}_adapter"
    built = {}
    # What the minutes of training will write is checked first; the suite never inside a model.
    for d, files in ((base, BASE_FILES), (adapter, ADAPTER_FILES)):
        if force or not _complete(d, files):
            check_writable(d)
    if suite:
        suite = check_writable(check_output(suite, [base, adapter]), file=True)

    if suite:
        text = data.suite_text()
        if force or not suite.exists() or suite.read_bytes() != text.encode():
            write_text_atomic(suite, text)
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
            _, cfg = check_adapter_dir(tmp)
            cfg["model"] = str(base)
            (Path(tmp) / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        _log(f"adapter done in {time.time() - t:.0f} s")
    else:
        _log(f"{adapter} is complete; reusing it (--force rebuilds)")
    built["adapter"] = str(adapter)
    return built
