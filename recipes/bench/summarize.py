"""python recipes/bench/summarize.py OUT_DIR

Tables (Markdown) from a side_by_side.sh run: every peer's RESULT lines and our figures, with our
figures as ratios to each peer's. For each peer, "ours" is the mean of our runs just before and
just after it in the sitting (the machine drifts), and the range of those runs is shown too.
"""
import json
import re
import sys
from pathlib import Path

ORDER = [("1", "joeynmt", "2"), ("2", "onmt", "3"), ("4", "fairseq", "5")]
NAMES = {"joeynmt": "Joey NMT 2.3.0", "onmt": "OpenNMT-py 3.5.1", "fairseq": "fairseq 0.12.2"}


def peer_results(out: Path, peer: str):
    rows = {}
    path = out / peer / "results.txt"
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        if not line.startswith("RESULT") or "FAILED" in line:
            continue
        kv = dict(re.findall(r"(\w+)=([^\s]+)", line))
        if kv.get("phase") == "train":
            rows["train"] = (float(kv["tgt_tok_s"]), float(kv["peak_rss_mb"]))
        elif kv.get("phase") == "decode" and "fixed" in line:
            rows[f"{kv['mode']}.batch{kv['batch']}"] = (float(kv["sents_s"]), float(kv["peak_rss_mb"]))
    return rows


def ours(out: Path, tag: str):
    f = {}
    for prec in ("fp32", "bf16"):
        p = out / f"ours_{tag}_{prec}.json"
        if p.is_file():
            d = json.loads(p.read_text())
            f[f"train.{prec}"] = (d["train.target_tokens_per_s"], d["train.peak_rss_mb"])
            if prec == "fp32":
                f["peak"] = d.get("machine.fp32_matmul_gflops")
                f["peak_bf16"] = d.get("machine.bf16_matmul_gflops")
                f["flops"] = d.get("train.flops_per_target_token")
                for mode, key in (("greedy", "decode.greedy.batch64"), ("beam5", "decode.beam5.batch64")):
                    if f"{key}.sentences_per_s" in d:
                        f[f"{mode}.batch64"] = (d[f"{key}.sentences_per_s"], d[f"{key}.peak_rss_mb"])
    p = out / f"ours_{tag}_fast.json"  # decoding with side_by_side.sh's $FAST options
    if p.is_file():
        d = json.loads(p.read_text())
        options = [f"--{o}" for o in ("int8", "bf16") if d.get(f"config.{o}")]
        if d.get("config.shortlist"):
            options.append(f"--shortlist {d['config.shortlist']}")
        f["fast_label"] = " ".join(options)
        for mode, key in (("greedy", "decode.greedy.batch64"), ("beam5", "decode.beam5.batch64")):
            if f"{key}.sentences_per_s" in d:
                f[f"{mode}.batch64.fast"] = (d[f"{key}.sentences_per_s"], d[f"{key}.peak_rss_mb"])
    return f


def main(out: Path) -> None:
    print("| peer | figure | peer | ours (before / after) | ours / peer |")
    print("|---|---|---|---|---|")
    for before, peer, after in ORDER:
        p, a, b = peer_results(out, peer), ours(out, before), ours(out, after)
        fast = a.get("fast_label") or b.get("fast_label") or "fast options"
        for key, label, our_key in (("train", "training, target tokens/s (fp32)", "train.fp32"),
                                    ("train", "training, target tokens/s (ours bf16)", "train.bf16"),
                                    ("greedy.batch64", "greedy, sentences/s (batch 64, 20 tokens)", "greedy.batch64"),
                                    ("beam5.batch64", "beam 5, sentences/s (batch 64, 20 tokens)", "beam5.batch64"),
                                    ("greedy.batch64", f"greedy, sentences/s (ours {fast})", "greedy.batch64.fast"),
                                    ("beam5.batch64", f"beam 5, sentences/s (ours {fast})", "beam5.batch64.fast"),
                                    ("train", "training peak RSS, MB", "rss")):
            if key not in p:
                continue
            if our_key == "rss":
                vals = [x["train.fp32"][1] for x in (a, b) if "train.fp32" in x]
                theirs = p["train"][1]
                mean = sum(vals) / len(vals) if vals else float("nan")
                print(f"| {NAMES[peer]} | {label} | {theirs:,.0f} | {' / '.join(f'{v:,.0f}' for v in vals)} | "
                      f"{mean / theirs:.2f} |")
                continue
            vals = [x[our_key][0] for x in (a, b) if our_key in x]
            if not vals:
                continue
            mean = sum(vals) / len(vals)
            theirs = p[key][0]
            print(f"| {NAMES[peer]} | {label} | {theirs:,.0f} | {' / '.join(f'{v:,.1f}' for v in vals)} | "
                  f"**{mean / theirs:.2f}x** |")
    first = ours(out, "1")
    if first.get("peak"):
        frac = [ours(out, t)["train.fp32"][0] * first["flops"] / 1e9 / first["peak"] for t in "123" if ours(out, t)]
        print(f"\nfloat32 matmul peak {first['peak']:.0f} GFLOP/s, bf16 {first['peak_bf16']:.0f}; bench_gru "
              f"{first['flops'] / 1e6:.1f} MFLOP per target token; fp32 training reaches "
              f"{', '.join(f'{x:.0%}' for x in frac)} of the float32 peak.")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
