# python recipes/bench/ab_summary.py runs/ab-train runs/ab-decode ...
"""Markdown rows from recipes/bench/ab.sh output folders: for each throughput and memory figure,
the old and the new side's value in every round and the median over rounds of new / old within a
round (the sides alternate, so a round's pair shares the machine's speed of the moment)."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SHOWN = ("target_tokens_per_s", "sentences_per_s", "peak_rss_mb")


def rows(folder: Path):
    rounds = sorted(int(p.stem.split("_")[1]) for p in folder.glob("old_*.json"))
    rounds = [r for r in rounds if (folder / f"new_{r}.json").exists()]  # complete rounds only
    old = [json.loads((folder / f"old_{r}.json").read_text()) for r in rounds]
    new = [json.loads((folder / f"new_{r}.json").read_text()) for r in rounds]
    for key in old[0]:
        if not key.endswith(SHOWN) or any(key not in d for d in old + new):
            continue
        a, b = [d[key] for d in old], [d[key] for d in new]
        ratio = statistics.median(n / o for n, o in zip(b, a))
        yield key, a, b, ratio


def main() -> None:
    for arg in sys.argv[1:]:
        folder = Path(arg)
        print(f"\n{folder.name}\n\n| figure | old, per round | new, per round | new / old (median) |\n|---|---|---|---|")
        for key, a, b, ratio in rows(folder):
            print(f"| {key} | {', '.join(f'{x:,.0f}' for x in a)} | {', '.join(f'{x:,.0f}' for x in b)} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
