"""`mt-evaluate`: BLEU, chrF and TER the way the `sacrebleu` command computes and prints them.

    mt-evaluate ref.de -i hyp.de                       # BLEU, JSON with its signature
    mt-translate -m runs/x < src.en | mt-evaluate ref.de -m bleu chrf ter -f text
    mt-evaluate ref.de -i hyp.de -b                    # the score alone
    mt-evaluate --run runs/multi30k_en_de --split test # translate a prepared split, then score
    mt-evaluate --run runs/a --run runs/b --split valid   # the same with an ensemble of two runs

References are positional (several files = several references), hypotheses come from `-i` or
stdin, and the scores are sacreBLEU's own objects, so the numbers and signatures are the ones
`sacrebleu ref.de -i hyp.de` prints. Lines must match in number: a mismatch is an error.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from argparse import Namespace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.utils import print_single_results

from mt import rundir, version_string
from mt.rundir import RunDir

log = logging.getLogger(__name__)
METRICS = {"bleu": BLEU, "chrf": CHRF, "ter": TER}


def make_metric(name: str, tokenize: Optional[str] = None, lowercase: bool = False):
    name = name.lower()
    if name == "bleu":
        return BLEU(tokenize=tokenize, lowercase=lowercase)
    if name == "chrf":
        return CHRF()
    if name == "ter":  # case-insensitive, as the sacrebleu command's default
        return TER(case_sensitive=False)
    raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")


def compute(hyps: Sequence[str], refs: Sequence[Sequence[str]], metrics: Sequence[str] = ("bleu", "chrf"),
            tokenize: Optional[str] = None, lowercase: bool = False):
    """[(metric, score)] from sacreBLEU, in sacreBLEU's order (sorted by name)."""
    for i, r in enumerate(refs):
        if len(r) != len(hyps):
            raise ValueError(f"line counts differ: {len(hyps)} hypotheses, {len(r)} lines in reference {i + 1}")
    out = []
    for name in sorted(m.lower() for m in metrics):
        metric = make_metric(name, tokenize, lowercase)
        out.append((metric, metric.corpus_score(list(hyps), [list(r) for r in refs])))
    return out


def score_lines(hyps: Sequence[str], refs: Sequence[Sequence[str]], metrics: Sequence[str] = ("bleu", "chrf"),
                tokenize: Optional[str] = None, lowercase: bool = False, width: int = 1) -> List[Dict]:
    """sacreBLEU's JSON result (name, score, signature, ...) for each metric."""
    return [json.loads(score.format(width, False, str(metric.get_signature()), True))
            for metric, score in compute(hyps, refs, metrics, tokenize, lowercase)]


def score(hyps: Sequence[str], refs: Sequence, metrics: Sequence[str] = ("bleu", "chrf", "ter")) -> List[Dict]:
    """The Python API's scorer: `refs` is one reference per hypothesis, or a list of such
    reference streams; returns sacreBLEU's result (name, score, signature, ...) per metric."""
    streams = [refs] if refs and isinstance(refs[0], str) else refs
    return score_lines(hyps, streams, metrics)


def summary(results: List[Dict]) -> str:
    """One line per metric: `BLEU = 36.1 (nrefs:1|case:mixed|...)`."""
    return "; ".join(f"{r['name']} = {r['score']} ({r['signature']})" for r in results)


# --- pipeline stage -----------------------------------------------------------------------------

TEST_METRICS = ("bleu", "chrf", "ter")


def score_test(cfg, run_dir: Path) -> List[Dict]:
    """Score run_dir/test.hyp against the untouched test references into test.scores.json;
    skipped when its stamp names these hypotheses and this prepared data."""
    from mt.data import load_split

    run = RunDir(run_dir)
    data = rundir.read_stamp(run.data_stamp) or {}  # the references are the prepared test split's
    stamp = rundir.fingerprint([rundir.file_digest(run.hyp), data.get("fingerprint"), TEST_METRICS])
    if not cfg.force and run.scores.exists() and rundir.is_done(run.scores_stamp, stamp):
        results = json.loads(run.scores.read_text())
        log.info("score: up to date, skipped; test: %s", summary(results))
        return results
    hyps = read_text(run.hyp)
    refs = load_split(run.data, "test")["tgt_raw"]
    results = score_lines(hyps, [refs], TEST_METRICS)
    rundir.write_text_atomic(run.scores, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    rundir.write_stamp(run.scores_stamp, stamp)
    log.info("score: test: %s", summary(results))
    return results


# --- command line -------------------------------------------------------------------------------

def read_text(path: Path) -> List[str]:
    """Lines of a UTF-8 file, split on LF only (like `mt.data.read_lines`)."""
    from mt.data import read_lines

    return list(read_lines(Path(path)))


def format_results(scored, args: argparse.Namespace) -> List[str]:
    """Each metric's line (or JSON object) exactly as the sacrebleu command formats it."""
    lines = []
    for metric, score in scored:
        sig = metric.get_signature().format(False if args.format == "json" else args.short)
        lines.append(score.format(args.width, args.score_only, sig, args.format == "json"))
    return lines


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mt-evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=version_string(p.prog))
    p.add_argument("refs", nargs="*", help="reference files (one per reference set)")
    p.add_argument("-i", "--input", help="hypotheses (default: stdin)")
    p.add_argument("-m", "--metrics", nargs="+", default=["bleu"], choices=sorted(METRICS))
    p.add_argument("-f", "--format", choices=["json", "text"], default="json")
    p.add_argument("-b", "--score-only", action="store_true", help="print the score alone")
    p.add_argument("-w", "--width", type=int, default=1, help="decimal digits")
    p.add_argument("-tok", "--tokenize", default=None, help="BLEU tokenizer (default 13a)")
    p.add_argument("-lc", "--lowercase", action="store_true", help="lowercased BLEU")
    p.add_argument("--short", action="store_true", help="short signatures (text format)")
    g = p.add_argument_group("translate and score a prepared split of a run")
    g.add_argument("--run", action="append",
                   help="run directory (runs/<name>); several --run: an ensemble of their best.pt (or of "
                        "checkpoint files), on the split prepared for the first")
    g.add_argument("--split", default="test")
    g.add_argument("--beam", type=int, default=None, help="beam size (default: the run's config)")
    g.add_argument("--alpha", type=float, default=None, help="length penalty (default: the run's config)")
    g.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a filter: Ctrl-C ends it quietly, status 130
    sys.stdout.reconfigure(encoding="utf-8")  # type: ignore[union-attr]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        if args.run:
            hyps, refs = _translate_split(args)
        else:
            if not args.refs:
                raise ValueError("give at least one reference file (or --run)")
            if args.input:
                hyps = read_text(Path(args.input))
            else:
                sys.stdin.reconfigure(encoding="utf-8", errors="strict")  # type: ignore[union-attr]
                hyps = [line.rstrip("\n") for line in sys.stdin]
            refs = [read_text(Path(r)) for r in args.refs]
            for path, r in zip(args.refs, refs):
                if len(r) != len(hyps):
                    raise ValueError(f"line counts differ: {args.input or 'stdin'} has {len(hyps)} lines, "
                                     f"{path} has {len(r)}")
        scored = compute(hyps, refs, args.metrics, args.tokenize, args.lowercase)
        print_single_results(format_results(scored, args), Namespace(format=args.format))
    except (ValueError, OSError, UnicodeDecodeError) as e:
        print(f"mt-evaluate: error: {e}", file=sys.stderr)
        sys.exit(1)


def _translate_split(args: argparse.Namespace):
    from mt.data import load_split
    from mt.translate import Translator

    run = RunDir(args.run[0])
    translator = Translator.from_path([run.root] + [Path(p) for p in args.run[1:]], device=args.device,
                                      beam_size=args.beam, alpha=args.alpha)
    ds = load_split(run.data, args.split)
    if "tgt_raw" not in ds.column_names:
        raise ValueError(f"split {args.split!r} was filtered when prepared: score a valid or test split")
    hyps = list(translator.translate_lines(ds["src"]))
    return hyps, [ds["tgt_raw"]]


if __name__ == "__main__":
    main()
