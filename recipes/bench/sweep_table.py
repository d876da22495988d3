"""Summarise Hydra multirun sweeps of `mt-train` as a markdown table, valid split only.

    mt-train -m recipe=multi30k_en_de_quick name=sweep 'stages=[prepare,tokenizer,train]' \
        train.average_last=5 model.dec_hidden=256,512 train.lr=0.003,0.004
    python recipes/bench/sweep_table.py runs/sweep/multirun [more multirun dirs ...]

One row per job (runs/<name>/multirun/<n>): the overrides that differ between jobs, steps and
minutes trained, the best single validation's greedy BLEU (metrics.jsonl) and the BLEU of the
average of the last validations' weights (checkpoints/averaged.json, train.average_last), sorted
by the better of the two. Test scores are never read: sweeps choose on valid.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional


def job_row(job: Path) -> Optional[Dict]:
    """The overrides and valid results of one multirun job directory (None before its first validation)."""
    overrides = (job / ".hydra" / "overrides.yaml").read_text(encoding="utf-8").splitlines()
    overrides = [o[2:] for o in overrides if o.startswith("- ")]
    valid = [json.loads(line) for line in (job / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip() and json.loads(line).get("kind") == "valid"]
    if not valid:
        return None
    avg_file = job / "checkpoints" / "averaged.json"
    averaged = json.loads(avg_file.read_text(encoding="utf-8")).get("bleu") if avg_file.exists() else None
    best = max(v["bleu"] for v in valid)
    return {"job": str(job), "overrides": overrides, "steps": valid[-1]["step"], "minutes": valid[-1]["minutes"],
            "best": best, "averaged": averaged, "score": max(best, averaged or best)}


def table(rows: List[Dict]) -> str:
    """Markdown: the overrides shared by every job go above the table, the rest in it."""
    common = set.intersection(*(set(r["overrides"]) for r in rows))
    lines = ["all jobs: `" + " ".join(o for o in rows[0]["overrides"] if o in common) + "`", "",
             "| job | overrides | steps | minutes | best valid BLEU | averaged | ",
             "|---|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["score"]):
        own = " ".join(o for o in r["overrides"] if o not in common and not o.startswith("name="))  # the job's path says it
        avg = "-" if r["averaged"] is None else f"{r['averaged']:.1f}"
        lines.append(f"| {r['job']} | `{own}` | {r['steps']} | {r['minutes']:.1f} | {r['best']:.1f} | {avg} |")
    return "\n".join(lines)


def main(argv: List[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    missing = [d for d in argv if not Path(d).is_dir()]
    if missing:
        raise SystemExit(f"{missing[0]}: no such multirun directory")
    by_number = lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)
    jobs = [j for d in map(Path, argv) for j in sorted(Path(d).iterdir(), key=by_number)
            if (j / ".hydra" / "overrides.yaml").exists() and (j / "metrics.jsonl").exists()]
    if not jobs:
        raise SystemExit(f"{', '.join(argv)}: no multirun job with metrics.jsonl")
    rows = []
    for job in jobs:
        row = job_row(job)
        if row is None:
            print(f"{job}: no validation yet, left out", file=sys.stderr)
        else:
            rows.append(row)
    if rows:
        print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
