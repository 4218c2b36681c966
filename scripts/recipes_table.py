"""One row per model of a `make recipes` run: recipe, bits/weight, accuracy, critical errors,
logit retention, verdict, quantize seconds. Usage: recipes_table.py LOGS_DIR MODEL..."""

import json
import sys
from pathlib import Path

from tabulate import tabulate


def main(logs, models):
    logs = Path(logs)
    seconds = {}
    if (logs / "quantize-seconds.tsv").is_file():
        for line in (logs / "quantize-seconds.tsv").read_text().splitlines():
            name, _, s = line.partition("\t")
            seconds[name] = s  # the last run of a model wins
    rows = []
    for m in models:
        name = Path(m).resolve().name
        val = next((json.loads(p.read_text()) for p in logs.glob(f"{name}-*.json")), None)
        ret = logs / f"retention-{name}.json"
        ret = json.loads(ret.read_text()).get("logit_retention") if ret.is_file() else None
        prov = Path(m) / "qtools_provenance.json"
        prov = json.loads(prov.read_text()) if prov.is_file() else {}
        recipe = prov.get("recipe", "float") + (f" {prov['bits']}" if prov.get("bits") else "")
        if val is None:
            rows.append([name, recipe, "-", "-", "-", "-", "no log", seconds.get(name, "-")])
            continue
        rows.append([name, recipe, f"{val['bits_per_weight']:.2f}", f"{val['accuracy']:.1%}",
                     val["critical_errors"], "-" if ret is None else f"{ret:.3f}", val["verdict"],
                     seconds.get(name, "-")])
    print(tabulate(rows, headers=["model", "recipe", "bits/weight", "accuracy", "critical", "retention",
                                  "verdict", "quantize s"], disable_numparse=True))  # as formatted: -6.190


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
