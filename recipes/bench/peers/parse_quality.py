#!/usr/bin/env python3
"""parse_quality.py OUT_DIR: valid-BLEU curves from each toolkit's log, and the quality table.

Reads what quality.sh left in OUT_DIR:
  <peer>/train.log   runlog.py's log: every line prefixed with the seconds since the process began
  results.txt        one `QUALITY peer=... BLEU|...= 34.2 ... chrF2|...= 60.1 TER|...= 48.0` per toolkit
Writes OUT_DIR/curves/<peer>.tsv (`minutes<TAB>valid_bleu`, one row per validation the toolkit
ran: each one's greedy BLEU on detokenised valid text with sacreBLEU), which `mt-plot` draws next
to our runs, and prints a markdown table of the test results to stdout.
"""
import json
import re
import sys
from pathlib import Path

# the line each toolkit logs after a validation, and where its BLEU is in it
PATTERNS = {
    # 12.345 2026-12-03 ... - Evaluation result (greedy): bleu:  12.34, loss: ...
    "joeynmt": re.compile(r"^(?P<s>[0-9.]+) .*Evaluation result \(greedy\): bleu:\s*(?P<bleu>[0-9.]+)"),
    # 12.345 [2026-12-03 ... INFO] validation BLEU: 12.34
    "onmt": re.compile(r"^(?P<s>[0-9.]+) .*validation BLEU: (?P<bleu>[0-9.]+)"),
    # 12.345 2026-12-03 ... | INFO | valid | {"epoch": 1, ..., "valid_bleu": "12.34", ...}
    "fairseq": re.compile(r"^(?P<s>[0-9.]+) .*\| valid \| (?P<json>\{.*\})"),
}


def curve(peer: str, log: Path):
    """[(minutes, valid BLEU)] in the order the toolkit logged them."""
    rows = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = PATTERNS[peer].match(line)
        if not m:
            continue
        if peer == "fairseq":
            bleu = json.loads(m["json"]).get("valid_bleu")
            if bleu is None:
                continue
        else:
            bleu = m["bleu"]
        rows.append((float(m["s"]) / 60, float(bleu)))
    return rows


def table(results: Path):
    print("| toolkit | training wall-clock min | test2016 BLEU | chrF2 | TER |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for line in results.read_text(encoding="utf-8").splitlines():
        if not line.startswith("QUALITY"):
            continue
        fields = dict(re.findall(r"(\w+)=(\S+)", line.split(" BLEU|")[0]))
        scores = {k: v for k, v in re.findall(r"(BLEU|chrF2|TER)\|\S+ = ([0-9.]+)", line)}
        if "status" in fields:
            print(f"| {fields['peer']} | | {fields['status']} | | |")
            continue
        wall = float(fields.get("train_wall_s") or "nan") / 60
        print(f"| {fields['peer']} | {wall:.1f} | {scores.get('BLEU', '-')} | "
              f"{scores.get('chrF2', '-')} | {scores.get('TER', '-')} |")
    sig = re.search(r"BLEU\|(\S+)", results.read_text(encoding="utf-8"))
    if sig:
        print(f"\nBLEU signature: `{sig[1]}`")


def main():
    out = Path(sys.argv[1])
    (out / "curves").mkdir(exist_ok=True)
    for log in sorted(out.glob("*/train.log")):
        peer = log.parent.name
        toolkit = peer.split("_")[0]  # joeynmt_small: Joey NMT's log
        if toolkit in PATTERNS:
            rows = curve(toolkit, log)
            with open(out / "curves" / f"{peer}.tsv", "w", encoding="utf-8") as f:
                f.write("minutes\tvalid_bleu\n")
                f.writelines(f"{m:.2f}\t{b:.2f}\n" for m, b in rows)
            print(f"[parse_quality] {peer}: {len(rows)} validations", file=sys.stderr)
    if (out / "results.txt").exists():
        table(out / "results.txt")


if __name__ == "__main__":
    main()
