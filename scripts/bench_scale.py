#!/usr/bin/env python
"""`make bench-scale`: wall time and peak memory of each command on a model shaped like Qwen3-30B-A3B.

Writes (scripts/bigmodel.py --moe) a qwen3_moe model in Hub layout (bfloat16, shards, un-stacked
experts) with an mlx-lm LoRA on attention, router and experts under ROOT, by default with enough
layers to be 1.1x this machine's RAM (--layers N for a small one), then runs every command in
COMMANDS under `/usr/bin/time -v` and prints a table: wall time, CPU time (user + system: what a
shared machine's load does not inflate), peak RSS, peak RSS against the
model's size, wall time against a plain read + write of the model's bytes. mlx-lm's own
`mlx_lm.fuse` (which loads the whole model) runs only where it surely fits in memory.
Free disk is checked before anything is written; outputs are deleted at the end (--keep keeps them).

    python scripts/bench_scale.py --layers 2          # ~3.7 GB model, minutes
    python scripts/bench_scale.py                     # > RAM (~28 GB here); ~60 GB of disk, long
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tabulate import tabulate

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import bigmodel  # noqa: E402

PY = sys.executable
QTOOLS = [PY, "-m", "qtools.cli"]

# command name -> argv, formatted with {base} {adapter} {fused} {work} {py}. None: a slot for a
# command this branch does not have yet (issue 17): fill in its argv when it lands.
PROBE = "qtools probe --base --adapter --bits 4 5 6 (8 cases)"
PROBE_TOKENS = 4  # the decision of suite8's cases is in an answer's first tokens
COMMANDS = {
    "read (cat > /dev/null)": ["sh", "-c", "cat {base}/*.safetensors > /dev/null"],
    "read + write (cat > file)": ["sh", "-c", "cat {base}/*.safetensors > {work}/copy.bin && rm {work}/copy.bin"],
    "qtools fuse": [*QTOOLS, "fuse", "{base}", "--adapter", "{adapter}", "--output", "{fused}", "--force"],
    "qtools delta-survival --base --adapter": [*QTOOLS, "delta-survival", "--base", "{base}", "--adapter", "{adapter}",
                                               "--bits", "4", "5", "6", "--json"],
    "qtools delta-survival FUSED --adapter": [*QTOOLS, "delta-survival", "{fused}", "--adapter", "{adapter}",
                                              "--bits", "4", "5", "6", "--json"],
    # the whole decision from base + adapter, no fused model read: quantize, probe, validate
    "qtools quantize --base --adapter 4-bit uniform": [*QTOOLS, "quantize", "--base", "{base}", "--adapter", "{adapter}",
                                                       "--bits", "4", "--output", "{work}/q4u", "--force"],
    "qtools quantize --base --adapter 4-bit survival": [*QTOOLS, "quantize", "--base", "{base}", "--adapter",
                                                        "{adapter}", "--bits", "4", "--recipe", "survival",
                                                        "--output", "{work}/q4s", "--force"],
    # the float answers from the probe's own streamed greedy pass (one read of the model per generated
    # token, each tensor fused on the fly): PROBE_TOKENS tokens, then one scoring read for every precision
    PROBE: [*QTOOLS, "probe", "--base", "{base}", "--adapter", "{adapter}", "--suite", "{work}/suite8.jsonl",
            "--bits", "4", "5", "6", "--max-tokens", str(PROBE_TOKENS), "--json"],
    "qtools validate 4-bit (8 cases)": [*QTOOLS, "validate", "{work}/q4u", "--suite", "{work}/suite8.jsonl",
                                        "--output", "{work}/validate.json"],
}
# exit statuses of a command that completed: validate exits 3 when the model fails its suite (a
# random synthetic model does), which is a result, not a failure of the command
COMPLETED = {"qtools validate 4-bit (8 cases)": {0: "", 3: "completed: verdict FAIL (exit 3)"}}
# outputs no later command reads, removed after the command that last needs them (disk: the
# fused model and the quantized ones are never on disk together), unless --keep
DROP_AFTER = {"qtools delta-survival FUSED --adapter": "{fused}"}
# the quantized outputs (4-bit uniform and survival) against the bfloat16 model: 4.5+4.6 bits of 16
QUANTIZED_SHARE = 0.6
# mlx-lm's own fuse loads the whole model: run only where it surely fits.
MLX_LM_FUSE = [PY, "-m", "mlx_lm", "fuse", "--model", "{base}", "--adapter-path", "{adapter}",
               "--save-path", "{work}/mlx_lm_fused"]
MLX_LM_FUSE_PEAK = 2.5  # its peak as a multiple of the model's size, with margin (measured ~2x)


def write_suite8(path: Path) -> None:
    """The demo suite's header and 8 of its decision cases, the kinds in turn (the probe's and validate's suite)."""
    import json

    lines = (REPO / "suites" / "demo.jsonl").read_text().splitlines()
    header = [ln for ln in lines if "\"suite\"" in ln and "\"expect\"" not in ln][:1]
    by_type: dict = {}
    for ln in lines:
        t = json.loads(ln).get("expect", {}).get("type")
        if t in ("tool_call", "direct", "label"):
            by_type.setdefault(t, []).append(ln)
    cases = [c for group in zip(*by_type.values()) for c in group][:8]  # the decision kinds in turn
    path.write_text("\n".join(header + cases) + "\n")


def meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"Error: cannot read {key} from /proc/meminfo")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def timed(argv: list[str], log: Path) -> dict:
    """Run argv under /usr/bin/time -v (stdout to the log); wall seconds, peak RSS bytes, exit status."""
    with open(log, "w") as out:
        p = subprocess.run(["/usr/bin/time", "-v", *argv], stdout=out, stderr=subprocess.PIPE, text=True, cwd=REPO)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", p.stderr)
    secs = 0.0
    for part in (wall.group(1).split(":") if wall else []):
        secs = secs * 60 + float(part)
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", p.stderr))
    tail = [line for line in p.stderr.splitlines() if line.strip() and not line.startswith("\t")]
    return {"rc": p.returncode, "wall": secs, "cpu": cpu, "rss": int(rss.group(1)) * 1024 if rss else None,
            "err": tail[-1] if tail else ""}


def probe_times(log: Path, read_s) -> None:
    """The probe's time per pass (from its --json report) beside one plain read of the model."""
    import json

    try:
        rep = json.loads(log.read_text())
    except (OSError, ValueError):
        return
    sec, n = rep["seconds"], len(rep["bits"])
    per_read = f" (one plain read: {read_s:.1f} s)" if read_s else ""
    print(f"probe: float answers, {PROBE_TOKENS} tokens (a streamed read each), {sec['generate']:.1f} s; "
          f"scoring, one read for float + {n} bit-widths, {sec['score']:.1f} s "
          f"({sec['score'] / (n + 1):.1f} s per precision){per_read}; total {sec['total']:.1f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=REPO / "bench_data" / "scale")
    ap.add_argument("--layers", type=int, default=None, help="layers (default: enough for 1.1x MemTotal)")
    ap.add_argument("--keep", action="store_true", help="keep the model and every output")
    args = ap.parse_args()
    if not Path("/usr/bin/time").exists():
        sys.exit("Error: /usr/bin/time is needed (GNU time: apt-get install time)")
    if args.layers is not None and args.layers < 1:
        sys.exit("Error: --layers must be at least 1")

    import math

    fixed, per_layer, ad_layer = bigmodel.moe_sizes(8)
    layers = args.layers or max(1, math.ceil((1.1 * bigmodel.mem_total() - fixed) / per_layer))
    model_bytes = fixed + layers * per_layer
    base, adapter = args.root / "model", args.root / "adapter"
    work = args.root / "work"
    fused = work / "fused_f16"
    fits_mlx_lm = MLX_LM_FUSE_PEAK * model_bytes < 0.8 * meminfo("MemAvailable")
    # the model (unless there), then at most two model-sized outputs at once (a copy or a fused model;
    # mlx-lm's fused model beside qtools')
    have = (base / "config.json").exists()
    # at most on disk at once besides the model: the fused model (fuse), then the quantized ones, then
    # mlx-lm's fused model beside them (the fused model stays too with --keep)
    outputs = max(1.0, QUANTIZED_SHARE + (1 if args.keep else 0) + (1 if fits_mlx_lm else 0))
    need = (0 if have else model_bytes + layers * ad_layer) + int(model_bytes * outputs) + (1 << 30)
    bigmodel.check_free(args.root, need)
    if have:
        import json

        layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
        print(f"using the model in {base} ({layers} layers)")
    else:
        subprocess.run([PY, str(REPO / "scripts" / "bigmodel.py"), str(args.root), "--moe", "--layers", str(layers)],
                       check=True)
    model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    work.mkdir(parents=True, exist_ok=True)
    write_suite8(work / "suite8.jsonl")

    runs = dict(COMMANDS)
    runs["mlx_lm.fuse (whole model in memory)"] = MLX_LM_FUSE if fits_mlx_lm else None
    fields = {"base": base, "adapter": adapter, "fused": fused, "work": work, "py": PY}
    results = {}
    for name, argv in runs.items():
        if argv is None:
            continue
        print(f"running {name} ...", flush=True)
        results[name] = r = timed([a.format(**fields) for a in argv], work / (re.sub(r"\W+", "_", name) + ".log"))
        # each result as it completes (a long run cut short keeps what it measured)
        print(f"  {name}: exit {r['rc']}, {r['wall']:.1f} s wall, {r['cpu']:.1f} s CPU, peak RSS "
              f"{gb(r['rss']) if r['rss'] else '-'}", flush=True)
        shutil.rmtree(work / "mlx_lm_fused", ignore_errors=True)
        if name in DROP_AFTER and not args.keep:
            shutil.rmtree(DROP_AFTER[name].format(**fields), ignore_errors=True)

    ref = results.get("read + write (cat > file)", {}).get("wall")
    rows = []
    for name, argv in runs.items():
        r = results.get(name)
        if r is None:
            why = "skipped: the model does not surely fit in memory"
            rows.append([name, "-", "-", "-", "-", "-", why])
        elif r["rc"] not in COMPLETED.get(name, {0: ""}):
            rows.append([name, f"{r['wall']:.1f}", f"{r['cpu']:.1f}", "-", "-", "-",
                         f"failed (exit {r['rc']}): {r['err']}"])
        else:
            rows.append([name, f"{r['wall']:.1f}", f"{r['cpu']:.1f}", gb(r["rss"]), f"{r['rss'] / model_bytes:.2f}",
                         f"{r['wall'] / ref:.1f}" if ref else "-", COMPLETED.get(name, {}).get(r["rc"], "")])
    print(f"\nqwen3_moe (Qwen3-30B-A3B's shape), {layers} layers, {gb(model_bytes)} bfloat16 in {base}; "
          f"RAM {gb(meminfo('MemTotal'))}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(tabulate(rows, headers=["command", "wall s", "cpu s", "peak RSS", "RSS / model", "wall / read+write", "note"],
                   tablefmt="github"))
    probe_times(work / (re.sub(r"\W+", "_", PROBE) + ".log"), results.get("read (cat > /dev/null)", {}).get("wall"))
    if not args.keep:
        shutil.rmtree(work if have else args.root, ignore_errors=True)  # a model that was there stays
        print(f"removed {work if have else args.root} (--keep keeps it)")
    failed = [n for n, r in results.items() if r["rc"] not in COMPLETED.get(n, {0: ""})]
    if failed:
        sys.exit(f"Error: {len(failed)} command(s) failed: {', '.join(failed)} (logs in {work} with --keep)")


if __name__ == "__main__":
    main()
