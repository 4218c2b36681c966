"""The calibration grid: which families (base recipe x task) and which fine-tunes of each are
trained and measured."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import SUPPORTED_BITS, QtoolsError
from ..demo.train import ALL_LINEAR, ATTENTION, BASE, MLP, MOE_ALL, MOE_ATTN_ROUTER, MOE_EXPERTS
from ..io.adapters import read_adapter_config

# Every fine-tune is measured at every bit-width MLX affine quantization supports.
BITS = SUPPORTED_BITS


# A family: one base recipe (pretraining + outlier gain) and one task. The gain sets the
# quantization step of every group, hence the base's noise where the fine-tune acts; families
# that differ only in gain share one pretraining (the gain does not change the function).
TASK = "demo"  # the tool-vs-direct + VETO/APPROVE task of suites/demo.jsonl (qtools/demo/tasks.py)
GAINS = (4.0, 12.0, 24.0, 36.0)
# and one family twice as deep (its own pretraining), at the demo's gain
DEPTHS = (8,)


def default_families(task: str = TASK) -> list[dict]:
    """The families of the calibration: the demo base recipe at four outlier gains, and at the
    demo's gain with twice the layers (g4 g12 g24 g36 l8g24), all on the demo task.

    task: the same recipes on another task of qtools/demo/tasks.py ("agent", "access"), named
    <task>-<name> (agent-g4, ...): pretrained, fine-tuned and measured on that task
    (`qtools calibrate --task agent`, or TASK=agent make calibrate)."""
    from ..demo.tasks import get_task

    task = get_task(task).name  # an unknown task is an error here, before any work
    prefix = "" if task == TASK else f"{task}-"
    fams = [{"name": f"{prefix}g{g:g}", "base": {**BASE, "outlier_gain": g}, "task": task} for g in GAINS]
    fams += [{"name": f"{prefix}l{n}g{BASE['outlier_gain']:g}", "base": {**BASE, "num_layers": n}, "task": task}
             for n in DEPTHS]
    return fams


# -- The study (issue 18): fine-tunes that are real fine-tunes, on tasks with room, across the
# families the field has. A fine-tune is used only when its float16 model passes the task's suite
# with margin (STUDY_BAR, no critical error): one case above the line is tipped by any noise.
STUDY_BAR = 0.95
STUDY_TASK = "agent"
# the demo's base recipe with the pretraining the larger task needs (docs/tasks.md: 400 iterations)
STUDY_BASE = {**BASE, "iters": 400}
# a qwen3_moe base as the Hub ships Qwen3-30B-A3B (bfloat16, un-stacked experts), tiny
MOE_BASE = {**STUDY_BASE, "arch": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 128, "layout": "hub"}


def study_families() -> list[dict]:
    """The study's families: on agent, the demo recipe at gains 4 and 24, twice as deep, twice as
    wide (hidden 256) and a qwen3_moe in the Hub's layout; on access (the second task: field access,
    conditional logic, DENY->ALLOW critical), the demo recipe at gain 24."""
    fam = []
    for task in (STUDY_TASK,):
        fam += [{"name": f"{task}-g{g:g}", "base": {**STUDY_BASE, "outlier_gain": g}, "task": task} for g in (4.0, 24.0)]
        fam.append({"name": f"{task}-l8g24", "base": {**STUDY_BASE, "num_layers": 8}, "task": task})
        fam.append({"name": f"{task}-h256g24", "base": {**STUDY_BASE, "hidden_size": 256, "intermediate_size": 512},
                    "task": task})
        fam.append({"name": f"{task}-moe-g24", "base": dict(MOE_BASE), "task": task})
    fam.append({"name": "access-g24", "base": dict(STUDY_BASE), "task": "access"})
    for f in fam:
        f["bar"] = STUDY_BAR
    return fam


def study_grid() -> list[dict]:
    """Training runs per study family, each to the end of its schedule (200-300 iterations: float16
    passes with margin, docs/tasks.md); strength varied by the LoRA scale (x0.75 to x2 of each
    trained adapter), rank, adapted modules, learning rate and data seed, never by stopping early.
    6 runs x 4 scales = 24 fine-tunes a family. Modules are named for dense models (keys_for maps
    them onto qwen3_moe)."""
    runs = [
        dict(rank=8, keys=ALL_LINEAR, lr=1e-3, seed=1, checkpoints=[200], scales=[0.75, 1.5, 2.0]),
        # attention alone learns slower (on qwen3_moe at lr 1e-3, 200 iterations: 99.3% but one
        # VETO->APPROVE; at 2e-3: 92.7%, 11): trained longer, not harder. The first run's x1.5 and
        # x2 overshoot (agent: float16 at 73-94%, below the bar): the others vary the scale nearer 1.
        dict(rank=16, keys=ATTENTION, lr=1e-3, seed=3, checkpoints=[300], scales=[0.75, 0.9, 1.25]),
        dict(rank=16, keys=MLP, lr=1e-3, seed=2, checkpoints=[300], scales=[0.75, 0.9, 1.25]),
        dict(rank=4, keys=ALL_LINEAR, lr=1.5e-3, seed=4, checkpoints=[300], scales=[0.75, 0.9, 1.25]),
        # MLP-only LoRAs miss the bar on every family at 300 iterations (agent 72-77%, access 82-84%,
        # qwen3_moe 79-86%): the fifth run is a second attention recipe (rank, rate and data of its own)
        dict(rank=8, keys=ATTENTION, lr=1.5e-3, seed=5, checkpoints=[300], scales=[0.75, 0.9, 1.25]),
        # the first run's recipe trained to 300 iterations (at 200, agent-g4 and qwen3_moe miss the bar)
        dict(rank=8, keys=ALL_LINEAR, lr=1e-3, seed=6, checkpoints=[300], scales=[0.75, 0.9, 1.25]),
    ]
    for r in runs:
        r["keys"] = list(r["keys"])
        r["scale_multipliers"] = {str(c): r.pop("scales") for c in r["checkpoints"]}
    return runs


def keys_for(keys, base: dict) -> list[str]:
    """A run's LoRA targets on a family's base: as named on a dense base; on qwen3_moe, attention
    becomes attention + router, the MLP the router + experts, everything all of them."""
    keys = list(keys)
    if base.get("arch", "qwen3") != "qwen3_moe":
        return keys
    if keys == list(ATTENTION):  # LoRA on attention and the router: the field's usual choice
        return list(MOE_ATTN_ROUTER)
    if keys == list(MLP):
        return ["mlp.gate", *MOE_EXPERTS]
    if keys == list(ALL_LINEAR):
        return list(MOE_ALL)
    raise QtoolsError(f"no qwen3_moe equivalent of LoRA keys {keys}")


def family_task(family: dict) -> str:
    """A family's task: its "task" key (the demo's when it has none)."""
    return family.get("task") or TASK


def pretraining_key(base: dict, task: str = TASK) -> str:
    """Name of the pretraining a base recipe needs on a task: everything but the outlier gain,
    and the task when it is not the demo (the demo's keys are those of every existing cache)."""
    key = "h{hidden_size}_l{num_layers}_i{intermediate_size}_s{seed}_it{iters}_b{batch_size}_lr{lr:g}".format(**base)
    if base.get("arch", "qwen3") != "qwen3":
        key += "_{arch}_e{num_experts}k{num_experts_per_tok}m{moe_intermediate_size}_{layout}".format(**base)
    return key if task == TASK else f"{key}_t{task}"


def family_suite(family: dict, work_dir, suite_path=None) -> Path:
    """The suite a family's fine-tunes are measured on: its "suite" key; else suite_path for a demo
    family (`qtools calibrate --suite`); else suites/<task>.jsonl (relative to the working
    directory, as --suite is) when it exists; else the task's suite generated from
    qtools/demo/tasks.py into work_dir/suites/<task>.jsonl (the same content)."""
    from ..io.atomic import write_text_atomic

    task = family_task(family)
    if family.get("suite"):
        return Path(family["suite"])
    if task == TASK and suite_path is not None:
        return Path(suite_path)
    path = Path("suites") / f"{task}.jsonl"
    if path.exists():
        return path
    from ..demo.data import suite_text

    gen = Path(work_dir) / "suites" / f"{task}.jsonl"
    text = suite_text(task)
    if not gen.exists() or gen.read_text() != text:
        gen.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(gen, text)
    return gen


# Every checkpoint is also measured at these multiples of its LoRA scale: the delta's strength
# varied without training (a stronger or weaker version of the same direction).
SCALE_MULTIPLIERS = [0.5, 0.75, 1.5, 2.0]


def default_grid() -> list[dict]:
    """Training runs per family; each yields several fine-tunes (checkpoints x LoRA scale multipliers).

    They span what moves the fine-tune's margin: learning rate over 32x (5e-5 to 1.6e-3),
    iterations (checkpoints), LoRA scale (0.5x to 2x), rank, adapted modules and seed.
    4 runs, 5 checkpoints, 25 fine-tunes, 330 training steps per family; the same recipes on
    every family, so families differ only in the base. Cheapest first: a calibration cut short
    keeps them.
    """
    runs = [
        dict(rank=8, keys=ALL_LINEAR, lr=2e-4, seed=1, checkpoints=[50, 100]),
        dict(rank=16, keys=MLP, lr=1.6e-3, seed=3, checkpoints=[20]),
        dict(rank=4, keys=ATTENTION, lr=6e-4, seed=2, checkpoints=[50]),
        dict(rank=8, keys=ALL_LINEAR, lr=5e-5, seed=0, checkpoints=[160]),
    ]
    for r in runs:
        r["keys"] = list(r["keys"])
        r["scale_multipliers"] = {str(c): list(SCALE_MULTIPLIERS) for c in r["checkpoints"]}
    return runs


def run_name(run: dict) -> str:
    """A training run's directory name, from its recipe: a cached run is found again when the
    grid is reordered or cut."""
    mods = "all" if list(run["keys"]) == list(ALL_LINEAR) else (
        "attn" if list(run["keys"]) == list(ATTENTION) else "mlp" if list(run["keys"]) == list(MLP)
        else "+".join(k.split(".")[-1] for k in run["keys"]))
    its = "-".join(str(c) for c in run["checkpoints"])
    return f"r{run['rank']}_{mods}_lr{run['lr']:g}_s{run['seed']}_it{its}"


def expand_run(run_dir: Path, run: dict, family: str | None = None) -> list[tuple[str, dict, Path]]:
    """(fine-tune id, config, adapter dir) for every checkpoint and scale multiplier of a run;
    the id and config name the family when one is given."""
    cfg = read_adapter_config(run_dir / "adapter_config.json")
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
            # the keys the adapter was trained on (a qwen3_moe family maps the run's: keys_for)
            conf.update(keys=cfg["lora_parameters"].get("keys", run["keys"]), iters=it,
                        scale=cfg["lora_parameters"]["scale"] * mult)
            if family is not None:
                conf["family"] = family
            prefix = f"{family}/" if family is not None else ""
            out.append((f"{prefix}{run_dir.name}-it{it}-x{mult:g}", conf, ad))
    return out
