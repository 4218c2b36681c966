"""mlx-lm model directories: check, size, quantization, provenance, load."""

from __future__ import annotations

import json
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


def quantization_info(config: dict) -> dict:
    """bits/group size from a model config; per-layer overrides make it 'mixed'."""
    q = config.get("quantization") or config.get("quantization_config")
    if not q or "bits" not in q:
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
        return {"quantized": False, "bits": 32 if "32" in dtype else 16, "group_size": None,
                "mixed": False, "dtype": dtype}
    layer_bits = {v.get("bits") for v in q.values() if isinstance(v, dict) and "bits" in v}
    # Mixed precision is reported by its lowest bit-width (where the delta dies first).
    return {"quantized": True, "bits": min(layer_bits | {q["bits"]}), "group_size": q.get("group_size"),
            "mixed": bool(layer_bits - {q["bits"]}), "mode": q.get("mode", "affine")}


def check_model_dir(model: str | Path, what: str = "model") -> Path:
    path = Path(model)
    if not path.exists():
        raise QtoolsError(f"{what} {path} does not exist")
    if not path.is_dir():
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


def quantized_provenance(src: str | Path, **fields) -> dict:
    """A quantized model's provenance: the source's record (where it was fused from), unreadable
    treated as none, updated with how it was quantized and by which versions."""
    import datetime as _dt

    from .. import versions

    try:
        prov = dict(read_provenance(src) or {})
    except QtoolsError:
        prov = {}
    prov.update({"kind": "quantized", "quantized_from": str(Path(src).resolve()), **fields,
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
