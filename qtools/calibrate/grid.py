"""The calibration grid: which fine-tunes of the demo family are trained and measured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import SUPPORTED_BITS, QtoolsError
from ..demo.train import ALL_LINEAR, ATTENTION, MLP

# Every fine-tune is measured at every bit-width MLX affine quantization supports.
BITS = SUPPORTED_BITS


def default_grid() -> list[dict]:
    """Training runs; each yields several fine-tunes (checkpoints x LoRA scale multipliers).

    They differ in what moves the threshold: delta size (learning rate, iterations,
    LoRA scale), rank, which modules are adapted, and seed. 8 runs x 3 checkpoints
    plus a 1.5x LoRA-scale variant of the last two: 40 fine-tunes.
    """
    runs = [
        dict(rank=8, keys=ALL_LINEAR, lr=2e-4, seed=0),
        dict(rank=8, keys=ALL_LINEAR, lr=2e-4, seed=1),
        dict(rank=8, keys=ALL_LINEAR, lr=1e-4, seed=2),
        dict(rank=8, keys=ALL_LINEAR, lr=4e-4, seed=3),
        dict(rank=4, keys=ALL_LINEAR, lr=2e-4, seed=4),
        dict(rank=16, keys=ALL_LINEAR, lr=2e-4, seed=5),
        dict(rank=8, keys=ATTENTION, lr=3e-4, seed=6),
        dict(rank=8, keys=MLP, lr=3e-4, seed=7),
    ]
    for r in runs:
        r["keys"] = list(r["keys"])
        r.update(checkpoints=[60, 120, 180], scale_multipliers={"120": [1.5], "180": [1.5]})
    return runs


def expand_run(run_dir: Path, run: dict) -> list[tuple[str, dict, Path]]:
    """(fine-tune id, config, adapter dir) for every checkpoint and scale multiplier of a run."""
    cfg = json.loads((run_dir / "adapter_config.json").read_text())
    out = []
    for it in run["checkpoints"]:
        ckpt = run_dir / f"{it:07d}_adapters.safetensors"
        if not ckpt.exists():
            raise QtoolsError(f"{run_dir}: checkpoint {ckpt.name} is missing")
        for mult in [1.0, *run.get("scale_multipliers", {}).get(str(it), [])]:
            ad = run_dir / f"it{it:04d}_x{mult:g}"
            if not (ad / "adapters.safetensors").exists():
                ad.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ckpt, ad / "adapters.safetensors")
                c = json.loads(json.dumps(cfg))
                c["lora_parameters"]["scale"] = cfg["lora_parameters"]["scale"] * mult
                c["iters"] = it
                (ad / "adapter_config.json").write_text(json.dumps(c, indent=2))
            conf = {k: run[k] for k in ("rank", "lr", "seed")}
            conf.update(keys=run["keys"], iters=it, scale=cfg["lora_parameters"]["scale"] * mult)
            out.append((f"{run_dir.name}-it{it}-x{mult:g}", conf, ad))
    return out
