"""Run the calibration: train, fuse, predict and measure every fine-tune of the grid (cached per
fine-tune), fit and judge the rule, write the report and the rule file delta-survival reads.

A family's "task" (qtools/demo/tasks.py; grid.family_task) reaches everything: its pretraining
data and tokenizer (cached under a key naming the task unless it is the demo's), its fine-tune
data and the suite it is measured on (grid.family_suite: suites/<task>.jsonl or generated). The
default families are the demo's; `select_families(task="agent")` (`qtools calibrate --task agent`,
`TASK=agent make calibrate`) picks the same recipes on another task."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

from .. import BadValue, QtoolsError
from ..io.atomic import read_json_or_none, write_json_atomic
from ..pipeline.scoring import DEFAULT_MIN_ACCURACY
from .grid import (
    BITS,
    default_families,
    default_grid,
    expand_run,
    family_suite,
    family_task,
    keys_for,
    pretraining_key,
    run_name,
    study_families,
    study_grid,
)
from .measure import behaviour, model_weights, passes, true_threshold
from .report import write_report

# Where the study's per-fine-tune results are kept: in the repository, so a study carries across
# sessions and machines, and a refit (--from-cache) needs nothing else.
STUDY_RESULTS = Path("calibration") / "results"
# The study's fitted rule and bracket with their evidence, beside its results (calibration/rule.json);
# delta-survival's rule file gets them once the study has the fine-tunes its goals ask for.
STUDY_RULE = "rule.json"

# What a cached result.json holds (2: the weight statistic is named delta_retention; 3: it
# records its family); an entry of another format is measured again, not migrated.
CACHE_FORMAT = 3


def run_grid(suite_path, work_dir, families=None, grid=None, bits_list=BITS, group_size=64, min_accuracy=DEFAULT_MIN_ACCURACY,
             jobs=1, exact_delta=False, from_cache=False, log=sys.stderr, results_dir=None, truth=False) -> list[dict]:
    """Build each family's base, then train, fuse, predict and measure every fine-tune of the
    grid on it, each family on its task (its data, tokenizer and suite: grid.family_suite;
    suite_path is the demo task's suite).

    Runs are independent: `jobs` processes share them. Resumable: the shared pretraining, each
    family's base and each fine-tune's result are cached in work_dir. exact_delta: also measure
    each fine-tune with the base quantized and the delta kept exactly (what sets the threshold;
    doubles the measuring time). from_cache: train and measure nothing; use what is cached (a
    refit, or a calibration cut short). results_dir: each fine-tune's result is kept there
    (<family>/<run>-it<iters>-x<scale>.json.gz, ~40 KB: a results directory under version control
    carries a study across machines) instead of beside its adapter in work_dir. truth: also
    measure each usable fine-tune with real quantized models (truth.real_threshold) and the
    probe (truth.probe_prediction). A family's "bar" is the float16 accuracy (and no critical
    error) a fine-tune needs to be used; min_accuracy by default.
    """
    from ..io.suite import load_suite

    work = Path(work_dir)
    families = families or default_families()
    if any(family_task(f) == "demo" and not f.get("suite") for f in families):
        load_suite(suite_path)  # fail early on a bad suite, before any work
    work.mkdir(parents=True, exist_ok=True)
    suites = {f["name"]: family_suite(f, work, suite_path) for f in families}
    suite_objs = {path: load_suite(path) for path in set(suites.values())}  # every one, before any work
    grid = grid or default_grid()
    bases = {}
    for fam in families:
        if from_cache and not _complete_model(work / "bases" / fam["name"]):
            if results_dir is not None:  # a study carried by its results alone: refit from them
                bases[fam["name"]] = (None, None, str(suites[fam["name"]]), family_task(fam),
                                      {"bar": fam.get("bar", min_accuracy), "truth": truth, "results": str(results_dir)})
            continue
        base_dir = build_base(work, fam, log)
        fam_dir = work / fam["name"]
        fam_dir.mkdir(exist_ok=True)
        _check_same_base(fam_dir, base_dir)
        base_beh_path = fam_dir / "base_behaviour.json"
        if not isinstance(read_json_or_none(base_beh_path), dict):  # missing or damaged: measured again
            write_json_atomic(base_beh_path,
                              behaviour(base_dir, suite_objs[suites[fam["name"]]], [], group_size)["16"])
        bases[fam["name"]] = (fam_dir, base_dir, str(suites[fam["name"]]), family_task(fam),
                              {"bar": fam.get("bar", min_accuracy), "truth": truth,
                               "results": str(results_dir) if results_dir is not None else None})
    # run by run across families: a run cut short leaves every family with its first runs
    args = [(str(fam_dir / run_name(run)) if fam_dir else None, name, run, str(base_dir) if base_dir else None, suite,
             list(bits_list),
             group_size, min_accuracy, exact_delta, from_cache, task, opts) for run in grid
            for name, (fam_dir, base_dir, suite, task, opts) in bases.items()]
    if jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        from ..compat import BLAS_THREADS_ENV

        # each worker's BLAS on its share of the cores (the spawned workers inherit the variable):
        # two probes at once, each on both cores, took 36 s each; on one core each, 18 s
        old = os.environ.get(BLAS_THREADS_ENV)
        os.environ[BLAS_THREADS_ENV] = str(max(1, (os.cpu_count() or 1) // jobs))
        try:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                chunks = list(pool.map(_run_one, args))
        finally:
            if old is None:
                os.environ.pop(BLAS_THREADS_ENV, None)
            else:
                os.environ[BLAS_THREADS_ENV] = old
    else:
        chunks = [_run_one(a) for a in args]
    return [r for chunk in chunks for r in chunk]


def _complete_model(path: Path) -> bool:
    """A saved model directory: its config and its weights (one file, or the Hub's shards' index)."""
    return (path / "config.json").exists() and ((path / "model.safetensors").exists()
                                                or (path / "model.safetensors.index.json").exists())


def build_base(work: Path, family: dict, log=sys.stderr) -> Path:
    """A family's base model (work/bases/NAME), from the pretraining it shares with the other
    families of the same recipe and task but another outlier gain (work/pretrained/KEY); both
    cached. Pretraining data and tokenizer are the family's task's."""
    from ..demo.train import pretrain_base, with_outlier_gain
    from ..io.atomic import atomic_output_dir

    base, task = family["base"], family_task(family)
    pre = work / "pretrained" / pretraining_key(base, task)
    if not _complete_model(pre):
        print(f"[calibrate] pretraining {pre.name} (shared by every gain of this recipe)", file=log, flush=True)
        tic = time.perf_counter()
        with atomic_output_dir(pre, force=True) as tmp:
            pretrain_base(tmp, **base, task=task)
        print(f"[calibrate] pretraining {pre.name} done in {time.perf_counter() - tic:.0f} s", file=log, flush=True)
    out = work / "bases" / family["name"]
    recipe = work / "bases" / f"{family['name']}.json"
    if _complete_model(out) and read_json_or_none(recipe) == family:
        return out
    # a family renamed to another recipe gets a new base; its cached fine-tunes are then refused
    with atomic_output_dir(out, force=True) as tmp:
        with_outlier_gain(pre, tmp, base["outlier_gain"], base["seed"], task=task)
    write_json_atomic(recipe, family)
    return out


def _check_same_base(work: Path, base_dir) -> None:
    """Cached fine-tunes belong to the base they were trained on; a rebuilt base invalidates them."""
    from ..io.weights import fingerprint

    path = work / "base_fingerprint.json"
    fp = {"base": fingerprint(base_dir)}
    if path.exists():
        if read_json_or_none(path) != fp:
            raise QtoolsError(f"{work} holds fine-tunes of a different base than {base_dir}; "
                              f"remove it (rm -rf {work}) or pass another --work-dir")
    elif any(work.iterdir()):
        raise QtoolsError(f"{work} holds results of an unknown base; remove it (rm -rf {work}) "
                          "or pass another --work-dir")
    else:
        write_json_atomic(path, fp)


def _cached(path: Path, ft_id: str, log):
    """The cached result of a fine-tune, or None when there is none or it is of another format."""
    if not path.exists():
        return None
    res = read_json_or_none(path)
    if not isinstance(res, dict):
        print(f"[calibrate] {ft_id}: {path} is damaged; re-measuring it", file=log, flush=True)
        return None
    if res.get("format") != CACHE_FORMAT:
        print(f"[calibrate] {ft_id}: {path} is a cache entry of another qtools (format "
              f"{res.get('format', 'unrecorded')}, this one writes {CACHE_FORMAT}); re-measuring it",
              file=log, flush=True)
        return None
    return res


def _run_one(args) -> list[dict]:
    """One training run: train (with checkpoints), then measure each of its fine-tunes."""
    import shutil

    from ..demo.train import ADAPTER, finetune_data, train_adapter
    from ..io.modeldir import read_config
    from ..io.suite import load_suite
    from ..pipeline.fuse import fuse
    from ..survival.analyze import delta_survival

    (run_dir, family, run, base_dir, suite_path, bits_list, group_size, min_accuracy, exact_delta, from_cache, task,
     opts) = args
    log = sys.stderr
    results_dir = Path(opts["results"]) if opts.get("results") else None
    if results_dir is not None and (from_cache or base_dir is None):  # refit from the results alone
        return _stored_results(results_dir, family, run, bits_list, min_accuracy, opts["bar"], log)
    run_dir = Path(run_dir)
    suite_obj = load_suite(suite_path)
    base_beh = read_json_or_none(run_dir.parent / "base_behaviour.json")  # written by run_grid first
    cfg_path = run_dir / "adapter_config.json"
    if results_dir is not None and not cfg_path.exists():
        stored = _stored_results(results_dir, family, run, bits_list, min_accuracy, opts["bar"], log)
        if len(stored) == len(_run_ids(family, run)):  # every fine-tune of the run measured: nothing to train
            return stored
    if from_cache and (not cfg_path.exists() or trained_on_other_data(run_dir, run["seed"], task)):
        return []
    if trained_on_other_data(run_dir, run["seed"], task):
        # its validation cases may have been trained on: neither the run nor its results are kept
        print(f"[calibrate] {family}/{run_dir.name} was trained on other data than "
              f"{finetune_data(run['seed'], task)}; "
              "retraining", file=log, flush=True)
        shutil.rmtree(run_dir)
    if not cfg_path.exists():
        params = {**ADAPTER, **{k: v for k, v in run.items() if k in ADAPTER}}
        # every layer of the family's base is adapted, whatever its depth
        params["num_layers"] = read_config(base_dir)["num_hidden_layers"]
        print(f"[calibrate] training {family}/{run_dir.name}: {run}", file=log, flush=True)
        tic = time.perf_counter()
        train_adapter(base_dir, run_dir, rank=params["rank"], scale=params["scale"],
                      keys=keys_for(params["keys"], {"arch": read_config(base_dir).get("model_type")}),
                      num_layers=params["num_layers"], iters=max(run["checkpoints"]),
                      batch_size=params["batch_size"], lr=params["lr"], seed=params["seed"],
                      save_every=math.gcd(*run["checkpoints"]), task=task)
        print(f"[calibrate] trained {family}/{run_dir.name} in {time.perf_counter() - tic:.0f} s", file=log, flush=True)
    results = []
    base_weights = None  # loaded once per run, when a fine-tune first needs them
    for ft_id, cfg, adapter in expand_run(run_dir, run, family):
        cached = adapter / "result.json" if results_dir is None else results_dir / f"{ft_id}.json.gz"
        res = _cached(cached, ft_id, log)
        if res is not None:
            res = refreshed(res, bits_list, min_accuracy, opts["bar"])
            if not (opts["truth"] and res["usable"] and "probe" not in res):
                results.append(res)
                continue
            # measured before the study measured real models and the probe: measured again
        if from_cache:
            continue
        tic = time.perf_counter()
        # beside the adapter, never inside it: fuse refuses an output inside its input (check_output)
        fused = adapter.parent / f"{adapter.name}.fused_f16"
        fuse(base_dir, adapter, fused, force=True)
        rep = delta_survival(fused, bits_list, group_size, adapter=adapter, progress=False)
        # a float16 model below the bar is not measured at any bit-width: it is not used
        beh = behaviour(fused, suite_obj, bits_list, group_size, min_accuracy=max(min_accuracy, opts["bar"]))
        beh_exact = None  # left out of the study anyway when float16 fails
        if exact_delta and passes(beh["16"], min_accuracy):
            # what the threshold would be if only the base's noise counted (the delta kept exactly)
            base_weights = base_weights or model_weights(base_dir)
            beh_exact = behaviour(fused, suite_obj, bits_list, group_size, exact_delta_from=base_weights)
        usable = passes(beh["16"], opts["bar"]) and beh["16"]["critical_errors"] == 0
        fake_t = _threshold(beh, bits_list, min_accuracy)
        real = probe = None
        if opts["truth"] and usable:
            from .truth import probe_prediction, real_threshold

            real, real_t = real_threshold(fused, suite_path, bits_list, group_size, min_accuracy, fake_t,
                                          adapter.parent)
            try:
                probe = probe_prediction(fused, suite_path, bits_list, group_size, min_accuracy)
            except QtoolsError as exc:  # recorded (the report counts it), not the end of an hours-long study
                probe = {"error": str(exc), "predicted_min_bits": None}
        shutil.rmtree(fused)  # only the statistics are kept
        res = {
            "format": CACHE_FORMAT,
            "id": ft_id,
            "family": family,
            "config": cfg,
            "base_accuracy": base_beh["accuracy"],
            "behaviour": beh,
            "behaviour_exact_delta": beh_exact,
            "true_min_bits": fake_t,
            "float16_passes": passes(beh["16"], min_accuracy),
            "bar": opts["bar"],
            "usable": usable,
            **({"real": real, "real_min_bits": real_t, "probe": probe} if real is not None else {}),
            "summary": rep["summary"],
            "layers": rep["layers"],
            "tensors": [{k: t[k] for k in ("name", "shape", "layer", "kind", "by_bits")} for t in rep["tensors"]],
            "seconds": time.perf_counter() - tic,
        }
        cached.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cached, res)
        results.append(res)
        extra = (f", real {res['real_min_bits']}, probe {res['probe']['predicted_min_bits']}" if real is not None
                 else "" if usable else f" (below the bar {opts['bar']:.0%}: not used)")
        print(f"[calibrate] {ft_id}: float16 acc {beh['16']['accuracy']:.3f} (base {base_beh['accuracy']:.2f}), "
              f"true min bits {res['true_min_bits']}{extra} ({res['seconds']:.0f} s)", file=log, flush=True)
    return results


def refreshed(res: dict, bits_list, min_accuracy, bar) -> dict:
    """A cached result with what the current code derives from it: statistics re-pooled, verdicts
    under the current min_accuracy and bar."""
    from ..survival.analyze import reaggregate

    if res.get("tensors"):  # re-pooled from the per-tensor statistics; a result without them keeps its own
        res["summary"], res["layers"] = reaggregate(res["tensors"], bits_list)
    res["true_min_bits"] = _threshold(res["behaviour"], bits_list, min_accuracy)
    res["float16_passes"] = passes(res["behaviour"]["16"], min_accuracy)
    res["usable"] = passes(res["behaviour"]["16"], bar) and res["behaviour"]["16"]["critical_errors"] == 0
    if res.get("real") is not None:
        res["real_min_bits"] = _real_threshold(res["real"], bits_list, min_accuracy)
    return res


def _real_threshold(real: dict, bits_list, min_accuracy):
    """The real threshold from the real models measured (a run of neighbouring bit-widths down
    to the first failure): the smallest bit-width passing with every measured one above it."""
    t = None
    for b in sorted((b for b in bits_list if str(b) in real), reverse=True):
        if not passes(real[str(b)], min_accuracy):
            break
        t = b
    return t


def _run_ids(family: str, run: dict) -> list[str]:
    """The fine-tune ids expand_run gives a run (without building them)."""
    name = run_name(run)
    return [f"{family}/{name}-it{it}-x{mult:g}" for it in run["checkpoints"]
            for mult in [1.0, *run.get("scale_multipliers", {}).get(str(it), [])]]


def _stored_results(results_dir: Path, family: str, run: dict, bits_list, min_accuracy, bar, log) -> list[dict]:
    """The run's fine-tunes found in results_dir, refreshed (refreshed)."""
    out = []
    for ft_id in _run_ids(family, run):
        res = _cached(results_dir / f"{ft_id}.json.gz", ft_id, log)
        if res is not None:
            out.append(refreshed(res, bits_list, min_accuracy, bar))
    return out


def _threshold(beh: dict, bits_list, min_accuracy):
    """The true threshold; None for a fine-tune whose float16 model fails (not measured further)."""
    if not passes(beh["16"], min_accuracy) or any(str(b) not in beh for b in bits_list):
        return None
    return true_threshold(beh, bits_list, min_accuracy)


def trained_on_other_data(run_dir: Path, seed: int, task: str = "demo") -> bool:
    """Whether a cached training run's adapter_config records other data than the grid trains on
    (the task's fine-tune data for this seed)."""
    from ..demo.train import finetune_data

    cfg_path = Path(run_dir) / "adapter_config.json"
    if not cfg_path.exists():
        return False
    cfg = read_json_or_none(cfg_path)  # damaged: retrained, as for other data
    return not isinstance(cfg, dict) or cfg.get("data") != finetune_data(seed, task)


def write_rule_file(path, s: dict) -> None:
    """The fitted rule, with its evidence, where delta-survival reads it."""
    # delta-survival reads this file: never leave it half-written
    write_json_atomic(path, {**s["rule"].to_dict(), "families": s["families"], "train": s["train"],
                             "held_out": s["held_out"], "held_out_constant": s["baseline"],
                             "held_out_ceiling": round(s["ceiling"], 4)})


def select_families(names=None, task=None, study=False) -> list[dict]:
    """The default families (the demo task's; with task, grid.default_families(task): the same
    recipes on that task; with study, grid.study_families()), or those of them named (a quick or
    partial run); an unknown name is an error."""
    fams = study_families() if study else default_families() if task is None else default_families(task)
    if not names:
        return fams
    by_name = {f["name"]: f for f in fams}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise BadValue(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                       f"the calibration's families are {', '.join(by_name)}", "--family")
    return [by_name[n] for n in names]


def calibrate(suite_path, rule_file, work_dir="models/calibration", docs_dir="docs", min_accuracy=DEFAULT_MIN_ACCURACY, jobs=1,
              families=None, exact_delta=False, from_cache=False, log=sys.stderr, task=None, study=False,
              results_dir=None) -> dict:
    """Run the grid on every family, judge the rule leave-one-family-out, fit it on all families;
    write the report to docs_dir and the rule to rule_file (delta-survival's is
    qtools/survival/calibration.json). families: names (select_families); task: the families of
    that task (default: the demo's); suite_path: the demo task's suite (see grid.family_suite)."""
    from ..io.atomic import check_output, check_writable

    if study and task is not None:
        raise BadValue("the study has its own families and tasks; give --study or --task, not both", "--task")
    fams = select_families(families, task, study)
    grid = study_grid() if study else None
    if study and results_dir is None:
        results_dir = STUDY_RESULTS
    # What the hours of work end by writing is checked before them (writable, never the suite).
    docs = Path(docs_dir)
    outs = (docs / "study.md", Path(results_dir).parent / STUDY_RULE, Path(rule_file)) if study else (
        docs / "calibration.md", docs / "calibration.png", Path(rule_file))
    for out in outs:
        check_writable(check_output(out, [suite_path]), file=True)
    check_writable(Path(work_dir) / "bases")
    if results_dir is not None:
        check_writable(Path(results_dir))  # each fine-tune's result is written there as it completes
    results = run_grid(suite_path, work_dir, fams, grid, min_accuracy=min_accuracy, jobs=jobs, exact_delta=exact_delta,
                       from_cache=from_cache, log=log, results_dir=results_dir, truth=study)
    usable = [r for r in results if r["usable"]]
    excluded = [r for r in results if not r["usable"]]
    if len({r["family"] for r in usable}) < 2 or len(usable) < 4:
        raise QtoolsError(f"only {len(usable)} fine-tunes of {len({r['family'] for r in usable})} famil(ies) learned "
                          "the task; leave-one-family-out needs at least 2 families and 4 fine-tunes")
    docs.mkdir(parents=True, exist_ok=True)
    suites = {family_task(f): str(family_suite(f, work_dir, suite_path)) for f in fams}
    if study:
        return _study_outputs(usable, excluded, fams, docs, rule_file, min_accuracy, suites, len(results),
                              Path(results_dir).parent / STUDY_RULE, Path(results_dir).parent / "timing")
    s = study(usable, min_accuracy)
    write_report(usable, s, docs / "calibration.md", docs / "calibration.png", min_accuracy, excluded, fams,
                 suites=suites)
    write_rule_file(rule_file, s)
    return {"rule": s["rule"].to_dict(), "train": s["train"], "held_out": s["held_out"], "fine_tunes": len(results),
            "families": [f["name"] for f in fams], "constant": s["baseline"],
            "reliability": s["reliability"], "rule_file": str(rule_file)}


def fitted_on(rule_file) -> int:
    """How many fine-tunes the rule in rule_file was fitted on (a study's usable ones, or the one-task
    calibration's held-out count); 0 where there is no readable rule."""
    d = read_json_or_none(Path(rule_file))
    if not isinstance(d, dict):
        return 0
    try:
        return int(d["study"]["usable"]) if "study" in d else int(d["held_out"]["n"])
    except (KeyError, TypeError, ValueError):
        return 0


def _study_outputs(usable, excluded, fams, docs: Path, rule_file, min_accuracy, suites, n, study_rule: Path,
                   timing_dir: Path) -> dict:
    """The study's report (study_report) and rule file: the point rule fitted on the real
    thresholds, and the bracket delta-survival reports; provisional unless every goal is met.
    timing_dir: the fine-tunes timed alone (qtools.calibrate.timing), for the probe's cost."""
    from dataclasses import replace

    from .fit import constant_guess, fit
    from .study_report import write_study_report
    from .tiers import truth
    from .timing import read_timings

    timed = read_timings(timing_dir)
    usable = [{**r, "timed_alone": timed[r["id"]]} if r["id"] in timed else r for r in usable]

    a = write_study_report(usable, excluded, fams, docs / "study.md", min_accuracy, suites)
    rule, train = fit([{**r, "true_min_bits": truth(r)} for r in usable])
    w, p, c = a["weights"], a["probe"], a["constant"]
    evidence = (f"docs/study.md: {len(usable)} usable fine-tunes of {len(a['families'])} families; "
                f"held out by family the bracket is optimistic for {w['held_out']['optimistic']}/{w['held_out']['n']}, "
                f"exact for {w['held_out']['exact']}, leaves {w['held_out']['mean_between']:.2f} bit-widths to the probe; "
                f"with the probe of its check set exact {a['bracket_probe']['exact']}/{a['bracket_probe']['n']}, "
                f"optimistic {a['bracket_probe']['optimistic']}; "
                f"probe exact {p['held_out']['exact']}/{p['held_out']['n']}, optimistic {p['held_out']['optimistic']}; "
                f"constant guess exact {c['exact']}/{c['n']}")
    rule = replace(rule, provisional=not a["goals_met"], evidence=evidence)
    record = {**rule.to_dict(), "bracket": w["bracket"], "study": {
        "weights_held_out": w["held_out"], "probe_held_out": p["held_out"], "probe_margin": p["margin"],
        "bracket_probe_held_out": a["bracket_probe"],
        "constant_held_out": c, "point_held_out": a["point"], "goals_met": a["goals_met"], "usable": len(usable),
        # what a guess without the weights or the model says, for fine-tunes outside the study
        "constant_guess": constant_guess([{**r, "true_min_bits": truth(r)} for r in usable])}}
    write_json_atomic(study_rule, record)
    # delta-survival's rule changes only for one fitted on at least as many fine-tunes: a few
    # fine-tunes of a study cut short never replace a rule fitted on more
    replaced = len(usable) >= fitted_on(rule_file)
    if replaced:
        write_json_atomic(rule_file, record)
    return {"rule": rule.to_dict(), "train": train, "held_out": w["held_out"], "fine_tunes": n,
            "families": [f["name"] for f in fams], "constant": c, "study": a,
            "rule_file": str(rule_file if replaced else study_rule), "rule_replaced": replaced}
