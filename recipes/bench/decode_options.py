# python recipes/bench/decode_options.py runs/multi30k_en_de [--out decode_options.json]
"""Speed and BLEU of mt-translate's CPU inference options on a trained run's test split.

Every option translates the same prepared test split with the run's own decoding settings (beam
search, batch size); the options take turns round by round (the machine's speed drifts within
minutes) and the median time of the rounds is reported. BLEU and chrF come from sacreBLEU against
the untouched references, with their signatures. Prints one table row per option (markdown) and
writes all figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mt.data import load_split
from mt.evaluate import score_lines
from mt.translate import Translator

OPTIONS = {  # name -> (int8, shortlist size, bf16)
    "float32": (False, 0, False),
    "bf16": (False, 0, True),
    "int8": (True, 0, False),
    "shortlist 1000": (False, 1000, False),
    "int8 + shortlist 1000": (True, 1000, False),
    "bf16 + shortlist 1000": (False, 1000, True),
}


def load(run: Path, int8: bool, shortlist: int, bf16: bool, beam: int) -> Translator:
    return Translator.from_path(run, device="cpu", beam_size=beam, int8=int8, shortlist=shortlist, bf16=bf16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--split", default="test")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the run's)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--options", default=",".join(OPTIONS), help="comma list of: " + ", ".join(OPTIONS))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    data = load_split(args.run / "data", args.split)
    src, refs = list(data["src"]), list(data["tgt_raw"])
    names = args.options.split(",")
    translators = {n: load(args.run, *OPTIONS[n], args.beam) for n in names}
    times = {n: [] for n in names}
    hyps = {}
    for t in translators.values():  # warm-up: first calls allocate, quantized kernels initialise
        t.translate_batch(src[:64])
    for r in range(args.rounds):
        for n in names:
            t0 = time.perf_counter()
            out = translators[n].translate_batch(src)
            times[n].append(time.perf_counter() - t0)
            hyps[n] = [res.text for res in out]
            print(f"round {r + 1} {n}: {times[n][-1]:.1f} s", file=sys.stderr, flush=True)
    base = names[0]
    figures = {"run": str(args.run), "split": args.split, "sentences": len(src),
                         "threads": torch.get_num_threads(), "options": {}}
    print(f"| option | BLEU | chrF2 | sentences/s | speed-up vs {base} |")
    print("|---|---|---|---|---|")
    for n in names:
        bleu, chrf = score_lines(hyps[n], [refs], ("bleu", "chrf"))
        dt = sorted(times[n])[len(times[n]) // 2]
        speed = len(src) / dt
        figures["options"][n] = {"bleu": bleu["score"], "chrf": chrf["score"], "sentences_per_s": speed,
                                 "seconds": times[n], "bleu_signature": bleu["signature"],
                                 "changed_lines_vs_" + base: sum(a != b for a, b in zip(hyps[n], hyps[base]))}
        base_dt = sorted(times[base])[len(times[base]) // 2]
        print(f"| {n} | {bleu['score']} | {chrf['score']} | {speed:.1f} | {base_dt / dt:.2f}x |", flush=True)
    sig = figures["options"][base]["bleu_signature"]
    print(f"\nBLEU signature: {sig}; beam {translators[base].decode.beam_size}, batch "
          f"{translators[base].decode.batch_size}, {len(src)} sentences, {figures['threads']} threads")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
