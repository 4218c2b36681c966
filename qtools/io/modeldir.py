"""mlx-lm model directories: check, size, quantization, provenance, load."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import QtoolsError
from .atomic import TMP_PREFIX

# Written by `qtools fuse` and carried on by `qtools quantize`: where the model came from.
PROVENANCE = "qtools_provenance.json"
# An mlx-lm adapter shipped inside a model directory (qtools quantize --recipe adapter/compensated):
# loaded with the model, counted in its size and bits per weight.
SHIPPED_ADAPTER = "adapters"


def shipped_adapter(model: str | Path) -> Path | None:
    """MODEL/adapters if the model directory ships an mlx-lm adapter, else None."""
    path = Path(model) / SHIPPED_ADAPTER
    return path if (path / "adapter_config.json").is_file() else None


def dir_size(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def weights_bytes(model: str | Path) -> int:
    """Bytes of the weight files alone (what loading the model maps into memory), a shipped adapter's included."""
    files = list(Path(model).glob("*.safetensors"))
    if (adapter := shipped_adapter(model)) is not None:
        files += list(adapter.glob("*.safetensors"))
    return sum(p.stat().st_size for p in files if p.is_file())


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _shown(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


# Fields of config.json qtools reads (in it or its text_config): field -> (check, what it must be).
CONFIG_FIELDS = {
    "vocab_size": (_positive_int, "a positive integer"),
    "num_hidden_layers": (_positive_int, "a positive integer"),
    "hidden_size": (_positive_int, "a positive integer"),
    "torch_dtype": (lambda v: isinstance(v, str), "a dtype name"),
    "dtype": (lambda v: isinstance(v, str), "a dtype name"),
}


def config_problem(config: dict) -> str | None:
    """What is wrong with a model config's fields qtools reads, or None: the quantization entry
    (an object with a positive integer bits and group_size, a string mode, per-layer overrides
    {bits, group_size} or true/false) and the sizes and dtype (CONFIG_FIELDS)."""
    for key in ("quantization", "quantization_config"):
        q = config.get(key)
        if q is None:
            continue
        if not isinstance(q, dict):
            return f"{key!r} is {_shown(q)}, not an object {{bits, group_size, ...}}"
        entries = [(f"{key}.{k}", q) for k in ("bits", "group_size")]
        if key == "quantization":  # mlx-lm's own: per-layer overrides beside the defaults
            entries += [(f"{key}.{name}.{k}", v) for name, v in q.items() if isinstance(v, dict)
                        for k in ("bits", "group_size")]
        for name, obj in entries:
            k = name.rsplit(".", 1)[1]
            if k in obj and not _positive_int(obj[k]):
                return f"{name!r} is {_shown(obj[k])}, not a positive integer"
        if "mode" in q and not isinstance(q["mode"], str):
            return f"'{key}.mode' is {_shown(q['mode'])}, not a mode name"
    for where, cfg in (("", config), ("text_config.", config.get("text_config"))):
        if where and cfg is not None and not isinstance(cfg, dict):
            return f"'text_config' is {_shown(cfg)}, not an object"
        for k, (check, want) in CONFIG_FIELDS.items():
            if isinstance(cfg, dict) and cfg.get(k) is not None and not check(cfg[k]):
                return f"'{where}{k}' is {_shown(cfg[k])}, not {want}"
    return None


def quantization_info(config: dict, where: str | Path = "config.json") -> dict:
    """bits/group size from a model config; per-layer overrides make it 'mixed'."""
    problem = config_problem(config)
    if problem:
        raise QtoolsError(f"{where}: {problem}")
    q = config.get("quantization") or config.get("quantization_config")
    if not q or "bits" not in q:
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
        return {"quantized": False, "bits": 32 if "32" in dtype else 16, "group_size": None,
                "mixed": False, "dtype": dtype}
    overrides = {p: v for p, v in q.items() if isinstance(v, dict) and "bits" in v}
    layer_bits = {v.get("bits") for v in overrides.values()}
    # Mixed precision is reported by its lowest bit-width (where the delta dies first).
    return {"quantized": True, "bits": min(layer_bits | {q["bits"]}), "group_size": q.get("group_size"),
            "mixed": _mixed(config, q, overrides), "mode": q.get("mode", "affine")}


def _mixed(config: dict, q: dict, overrides: dict) -> bool:
    """Whether a layer departs from the model's bit-width other than where the model's own
    quant_predicate puts it (qwen3_moe's router at 8 bits: mlx-lm's uniform quantization)."""
    departs = {p: v for p, v in overrides.items() if v.get("bits") != q["bits"]}
    if not departs:
        return False
    from .predicate import own_choices

    own = own_choices(config, q.get("group_size") or 64)
    return any(not isinstance(own.get(p), dict) or own[p].get("bits") != v.get("bits")
               or own[p].get("group_size", q.get("group_size")) != v.get("group_size", q.get("group_size"))
               for p, v in departs.items())


def check_model_dir(model: str | Path, what: str = "model") -> Path:
    path = Path(model)
    if not os.path.exists(path):  # os.path: a name too long for the file system does not exist either
        raise QtoolsError(f"{what} {path} does not exist")
    if not os.path.isdir(path):
        raise QtoolsError(f"{what} {path} is not a directory")
    if path.resolve().name.startswith(TMP_PREFIX):
        raise QtoolsError(f"{what} {path} is an unfinished qtools output (an interrupted write): delete it")
    if not (path / "config.json").is_file():
        raise QtoolsError(f"{what} {path} has no config.json (not an mlx-lm model directory)")
    if not list(path.glob("*.safetensors")):
        raise QtoolsError(f"{what} {path} has no weights (*.safetensors)")
    return path


def read_config(model: str | Path, required: bool = True) -> dict:
    """The model's config.json; a missing one is an error unless not `required` ({}), a corrupt
    one always is. The one reader of config.json."""
    path = Path(model) / "config.json"
    if not required and not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise QtoolsError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise QtoolsError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise QtoolsError(f"{path} is not a JSON object")
    problem = config_problem(config)  # checked here, so no reader meets a list where an object belongs
    if problem:
        raise QtoolsError(f"{path}: {problem}")
    return config


def text_config(config: dict) -> dict:
    """The language model's part of a config (a multimodal config nests it in text_config)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, dict) else config


def read_provenance(model: str | Path) -> dict | None:
    """The model's provenance record, None if it has none; a corrupt one is an error."""
    path = Path(model) / PROVENANCE
    if not path.is_file():
        return None
    try:
        prov = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise QtoolsError(f"{path}: not valid JSON") from None
    if not isinstance(prov, dict):
        raise QtoolsError(f"{path}: not a JSON object")
    return prov


def provenance_inputs(model: str | Path) -> list:
    """The base and adapter a fused model's provenance names (what a recipe reading the fine-tune
    reads besides the model); none for an unreadable record."""
    try:
        prov = read_provenance(model) or {}
    except QtoolsError:
        return []
    return [prov[k] for k in ("base", "adapter") if isinstance(prov.get(k), str) and prov[k]]


def quantized_provenance(src: str | Path, record: dict | None = None, **fields) -> dict:
    """A quantized model's provenance: the source's record (where it was fused from; `record` when
    the fused model was never written), unreadable treated as none, updated with how it was
    quantized and by which versions."""
    import datetime as _dt

    from .. import versions

    try:
        prov = dict(record if record is not None else read_provenance(src) or {})
    except QtoolsError:
        prov = {}
    src = "base + adapter, fused on the fly" if record is not None else str(Path(src).resolve())
    prov.update({"kind": "quantized", "quantized_from": src, **fields,
                 "quantized": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "quantize_versions": versions()})
    return prov


def load_model(path: Path):
    """mlx_lm.load with clean errors; returns (model, tokenizer, config, seconds)."""
    import mlx.core as mx
    from mlx_lm import load

    mx.reset_peak_memory()
    tic = time.perf_counter()
    adapter = shipped_adapter(path)
    if adapter is not None:
        from .adapters import read_adapter_config

        read_adapter_config(adapter / "adapter_config.json")  # one clear error, not mlx-lm's KeyError
    try:
        model, tokenizer, config = load(str(path), return_config=True,
                                        adapter_path=str(adapter) if adapter else None)
    except Exception as exc:  # mlx-lm raises many kinds for a broken directory
        raise QtoolsError(f"cannot load model {path}: {exc}") from None
    return model, tokenizer, config, time.perf_counter() - tic


def load_tokenizer(path: Path):
    """The model's tokenizer as mlx_lm.load gives it, without the weights (a streamed model)."""
    from mlx_lm.utils import load_config
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    try:
        config = load_config(Path(path))
        return mlx_lm_load_tokenizer(Path(path), eos_token_ids=config.get("eos_token_id", None))
    except Exception as exc:  # a broken tokenizer.json / tokenizer_config.json
        raise QtoolsError(f"cannot load the tokenizer of {path}: {exc}") from None
