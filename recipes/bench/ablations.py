# python recipes/bench/ablations.py [--model bench_gru] [--rounds 2] [--out runs/bench-ablations]
"""Before/after figures for each training speed-up: `mt-bench --phases train --ablate X` with
each optimisation turned off in turn, all of them off, and none off, in float32 and bf16.

The machine's speed drifts by 10-30% within minutes, so the variants take turns round by round
and each variant's figure is the median over rounds of its ratio to the "none off" run of the
same round. Prints a markdown table (target tokens/s, peak RSS, speed-up that the optimisation
buys = none-off / this-one-off) and writes each run's JSON under --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = ["none", "handwritten_decoder", "handwritten_loss", "handwritten_decoder,handwritten_loss"]
WHAT = {"none": "everything on (as shipped: train.decoder_backward=auto, loss_backward=auto)",
        "handwritten_decoder": "decoder loop with a hand-written backward (mt/decoder_loop.py)",
        "handwritten_loss": "output layer + label-smoothed loss in one chunked pass (mt/loss.py LinearCrossEntropy)",
        "handwritten_decoder,handwritten_loss": "both off: autograd everywhere"}


def run(args, variant: str, precision: str, r: int) -> dict:
    out = args.out / f"{precision}_{variant.replace(',', '+')}_{r}.json"
    cmd = [args.mt_bench, "--model", args.model, "--phases", "train", "--precision", precision,
           "--train-steps", str(args.steps), "--warmup", "10", "--out", str(out)]
    if variant != "none":
        cmd += ["--ablate", variant]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fig = json.loads(out.read_text())
    print(f"round {r} {precision} {variant}: {fig['train.target_tokens_per_s']:.0f} tok/s, "
          f"{fig['train.peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bench_gru")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--variants", default=",".join(v if "," not in v else "all" for v in VARIANTS),
                   help="which to run (all = every speed-up off); 'none' is always run")
    p.add_argument("--out", type=Path, default=Path("runs/bench-ablations"))
    p.add_argument("--mt-bench", default=str(Path(sys.executable).parent / "mt-bench"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = {"all" if "," in v else v for v in VARIANTS} & (set(args.variants.split(",")) | {"none"})
    variants = [v for v in VARIANTS if ("all" if "," in v else v) in chosen]
    figs = {}
    for r in range(1, args.rounds + 1):
        for precision in args.precisions.split(","):
            for v in variants:
                figs[precision, v, r] = run(args, v, precision, r)
    print(f"model {args.model}, {args.steps} timed steps after 10 warm-up, batches of 64 sentences, "
          f"{args.rounds} rounds (median of per-round ratios)\n")
    print("| turned off | what it is | precision | target tokens/s | peak RSS, MB | speed-up it buys |")
    print("|---|---|---|---|---|---|")
    for precision in args.precisions.split(","):
        for v in variants:
            tps = [figs[precision, v, r]["train.target_tokens_per_s"] for r in range(1, args.rounds + 1)]
            base = [figs[precision, "none", r]["train.target_tokens_per_s"] for r in range(1, args.rounds + 1)]
            rss = statistics.median(figs[precision, v, r]["train.peak_rss_mb"] for r in range(1, args.rounds + 1))
            gain = statistics.median(b / t for b, t in zip(base, tps))
            label = "all" if "," in v else v
            print(f"| {label} | {WHAT[v]} | {precision} | {statistics.median(tps):,.0f} | {rss:,.0f} | "
                  f"{'—' if v == 'none' else f'{gain:.2f}x'} |")


if __name__ == "__main__":
    main()
