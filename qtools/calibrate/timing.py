"""The probe's time against the sweep's, each study fine-tune timed alone (`make calibrate-timing`).

The study measures two fine-tunes at a time on this 2-core machine (`JOBS=2`); its probe's
scoring pass multiplies with numpy's BLAS on every core, so two at once oversubscribe the cores
and its seconds say more about the neighbour than about the probe. Here one fine-tune at a time,
nothing else running: fuse it again from its base and adapter (models/calibration), run `qtools
probe` at every bit-width as the study did, and quantize + validate (`--batch`) the bit-widths
the study measured for real. The seconds go to calibration/timing/<family>/<fine-tune>.json, one
file per fine-tune, written whole; a run stops anywhere and resumes. Fine-tunes are taken a
family at a time in turn, so a run cut short leaves a sample of every family. The study report
reads these files (`make calibrate FROM_CACHE=1`) for the probe's cost goal.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
from pathlib import Path

from .. import QtoolsError, script_exit
from ..io.atomic import read_json_or_none, write_json_atomic

TIMING_DIR = Path("calibration") / "timing"  # beside run.STUDY_RESULTS, where the study report looks
WORK_DIR = Path("models/calibration")
GROUP_SIZE = 64  # the study's: run.run_grid's default


def timing_path(timing_dir, ft_id: str) -> Path:
    return Path(timing_dir) / f"{ft_id}.json"


def read_timings(timing_dir) -> dict:
    """{fine-tune id: its timing record} of every whole record under timing_dir ({} when none)."""
    out = {}
    for p in sorted(Path(timing_dir).glob("*/*.json")):
        d = read_json_or_none(p)
        if isinstance(d, dict) and isinstance(d.get("probe_seconds"), (int, float)) and d.get("real_seconds"):
            out[d["id"]] = d
    return out


def _adapter_dir(work: Path, ft_id: str) -> Path:
    """models/calibration/<family>/<run>/it<NNNN>_x<scale> of a fine-tune id <family>/<run>-it<N>-x<scale>."""
    family, rest = ft_id.split("/", 1)
    run, it, scale = rest.rsplit("-", 2)
    return work / family / run / f"it{int(it[2:]):04d}_{scale}"


def _in_turn(results: list) -> list:
    """The fine-tunes a family at a time in turn (each family's in id order)."""
    by: dict = {}
    for r in sorted(results, key=lambda r: r["id"]):
        by.setdefault(r["family"], []).append(r)
    out, queues = [], list(by.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def retime(results_dir=None, work=WORK_DIR, timing_dir=TIMING_DIR, limit: int | None = None,
           log=sys.stderr) -> int:
    """Time every usable study fine-tune of results_dir (the study's: run.STUDY_RESULTS) not timed
    yet (at most `limit`); returns how many it timed."""
    from ..pipeline.fuse import fuse
    from ..pipeline.scoring import DEFAULT_MIN_ACCURACY as MIN_ACCURACY
    from .grid import BITS, STUDY_BAR, family_suite, study_families
    from .run import STUDY_RESULTS, refreshed
    from .truth import probe_prediction, real_behaviour

    results_dir = STUDY_RESULTS if results_dir is None else results_dir
    fams = {f["name"]: f for f in study_families()}
    results = []
    for p in sorted(Path(results_dir).glob("*/*.json.gz")):
        with gzip.open(p, "rt") as fh:
            r = refreshed(json.load(fh), BITS, MIN_ACCURACY, STUDY_BAR)
        if r.get("usable") and r.get("real"):
            results.append(r)
    if not results:
        raise QtoolsError(f"{results_dir}: no measured study fine-tunes to time (make calibrate writes them)")
    work, done, missing = Path(work), 0, []
    for r in _in_turn(results):
        out = timing_path(timing_dir, r["id"])
        if out.exists() or (limit is not None and done >= limit):
            continue
        adapter, base = _adapter_dir(work, r["id"]), work / "bases" / r["family"]
        if not (adapter / "adapters.safetensors").exists() or not (base / "config.json").exists():
            missing.append(r["id"])
            continue
        suite = family_suite(fams[r["family"]], work)
        scratch = work / "timing_scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            load = os.getloadavg()[0]
            fuse(base, adapter, scratch / "fused_f16", force=True)
            probe = probe_prediction(scratch / "fused_f16", suite, BITS, GROUP_SIZE, MIN_ACCURACY)
            real = {b: real_behaviour(scratch / "fused_f16", suite, int(b), GROUP_SIZE, scratch)
                    for b in sorted(r["real"], key=int)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rec = {"id": r["id"], "family": r["family"], "probe_seconds": probe["seconds"],
               "probe_parts": probe["seconds_parts"], "probed": len(probe["by_bits"]),
               "probe_predicted": probe["predicted_min_bits"],
               "real_seconds": {b: v["seconds"] for b, v in real.items()},
               # the verdicts agree with the study's own: the same models, run again
               "same_verdicts": probe["predicted_min_bits"] == r["probe"]["predicted_min_bits"] and all(
                   (v["accuracy"], v["critical_errors"]) == (r["real"][b]["accuracy"], r["real"][b]["critical_errors"])
                   for b, v in real.items()),
               "load_before": round(load, 2), "cpus": os.cpu_count(), "alone": True}
        write_json_atomic(out, rec)
        done += 1
        one = sum(rec["real_seconds"].values()) / len(rec["real_seconds"])
        print(f"[timing] {r['id']}: probe {rec['probe_seconds']:.1f} s, one bit-width {one:.1f} s "
              f"({rec['probe_seconds'] / (one * len(BITS)):.0%} of a {len(BITS)}-bit-width sweep)"
              + ("" if rec["same_verdicts"] else "; verdicts differ from the study's"), file=log, flush=True)
    if missing:
        print(f"[timing] {len(missing)} fine-tunes have no adapter or base under {work} (e.g. {missing[0]}): "
              "not timed (their adapters are not kept here)", file=log, flush=True)
    return done


def _main(argv: list) -> None:
    if argv and (argv[0] != "--limit" or len(argv) != 2 or not argv[1].isdigit()):
        raise QtoolsError("usage: python -m qtools.calibrate.timing [--limit N] (N a whole number)")
    n = retime(limit=int(argv[1]) if argv else None)
    print(f"[timing] timed {n}; every record: {TIMING_DIR}/ (make calibrate FROM_CACHE=1 reads them)")


def main(argv: list) -> int:
    return script_exit(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
