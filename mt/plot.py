"""`mt-plot`: pictures of a run, as PNG files in the run directory.

    mt-plot runs/multi30k_en_de                      # curves.png: train loss, valid loss, BLEU
    mt-plot runs/multi30k_en_de --sentence 12        # + attention_test_12.png
    mt-plot runs/multi30k_en_de --text "A dog runs through the grass ."
    mt-plot runs/a runs/b runs/c -o compare.png      # valid BLEU against training minutes, one figure
    mt-plot runs/a joeynmt.tsv fairseq.tsv -o c.png  # with other toolkits' curves: minutes<TAB>bleu

The attention matrix is the model's own: the sentence is translated with the run's decoding
settings, then the translation is fed back with teacher forcing to collect the weights of every
target piece over the source pieces.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mt import version_string  # noqa: E402
from mt.rundir import RunDir  # noqa: E402


def read_metrics(run_dir: Path) -> Dict[str, List[dict]]:
    """metrics.jsonl by kind; a step logged twice (a resumed run redid it) keeps its last entry."""
    rows: Dict[str, Dict[int, dict]] = {}
    path = RunDir(run_dir).metrics
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train the run first")
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows.setdefault(row["kind"], {})[row["step"]] = row
    return {k: [v[s] for s in sorted(v)] for k, v in rows.items()}


def plot_curves(run_dir: Path) -> Path:
    m = read_metrics(run_dir)
    # rows of skipped (non-finite) updates carry no loss
    train, valid = [r for r in m.get("train", []) if "loss" in r], m.get("valid", [])
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (label-smoothed)", lw=1)
    ax_loss.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="valid (NLL)", ms=3)
    ax_loss.set(xlabel="update", ylabel="loss per target token", title="loss")
    ax_loss.legend()
    ax_bleu.plot([r["step"] for r in valid], [r["bleu"] for r in valid], "o-", ms=3, label="BLEU")
    ax_bleu.plot([r["step"] for r in valid], [r["chrf"] for r in valid], "s-", ms=3, label="chrF")
    ax_bleu.set(xlabel="update", ylabel="score", title="valid (greedy, sacreBLEU)")
    ax_bleu.legend()
    for ax in (ax_loss, ax_bleu):
        ax.grid(alpha=0.3)
    run = RunDir(run_dir)
    fig.suptitle(run.root.name)
    fig.tight_layout()
    out = run.curves
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def read_curve(path: Path) -> List[tuple]:
    """[(minutes, valid BLEU)] from a tab-separated file with the header `minutes<TAB>valid_bleu`:
    another toolkit's curve (recipes/bench/peers/parse_quality.py writes them from their logs)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    if not lines or lines[0].split("\t") != ["minutes", "valid_bleu"]:
        raise ValueError(f"{path}: not a curve file (its first line must be 'minutes<TAB>valid_bleu')")
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        try:
            minutes, bleu = (float(x) for x in line.split("\t"))
        except ValueError:
            raise ValueError(f"{path}:{n}: expected two numbers separated by a tab, got {line!r}") from None
        rows.append((minutes, bleu))
    return rows


def run_curve(run_dir: Path) -> List[tuple]:
    valid = read_metrics(run_dir).get("valid", [])
    if valid and "minutes" not in valid[-1]:
        raise ValueError(f"{RunDir(run_dir).metrics}: its validations carry no training minutes "
                         "(written by an older mt): retrain, or plot it alone")
    return [(r["minutes"], r["bleu"]) for r in valid]


def plot_compare(sources: List[Path], out: Path) -> Path:
    """Valid BLEU (greedy) against training minutes (summed over resumes, validation included:
    what train.max_time counts) on one figure: run directories, and curve files (read_curve) of
    other toolkits, labelled by file name."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for src in sources:
        src = Path(src)
        rows = run_curve(src) if src.is_dir() else read_curve(src)
        label = src.name if src.is_dir() else src.stem
        ax.plot([m for m, _ in rows], [b for _, b in rows], "o-", ms=3, label=label)
    ax.set(xlabel="training minutes", ylabel="valid BLEU (greedy, sacreBLEU)", title="valid BLEU by wall clock")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)


@torch.no_grad()
def attention_matrix(translator, text: str):
    """(source pieces, target pieces, weights: target x source) for one sentence."""
    from mt.batches import pad
    from mt.data import normalize
    from mt.tokenizer import BOS_ID, EOS_ID

    result = translator.translate_batch([text])[0]
    src_ids = translator.tok.encode_src([normalize(text)])[0]
    tgt_ids = result.hyps[0].tokens
    model = translator.decoding.model
    src = pad([src_ids], suffix=EOS_ID).to(translator.device)
    tgt_in = pad([tgt_ids], prefix=BOS_ID).to(translator.device)
    _, weights = model(src, torch.tensor([len(src_ids) + 1]), tgt_in)
    src_pieces = translator.tok.src_pieces(src_ids) + ["</s>"]
    tgt_pieces = translator.tok.tgt_pieces(tgt_ids) + ["</s>"]
    # the weights at step t belong to the piece predicted at t (tgt_in is shifted by BOS)
    return src_pieces, tgt_pieces, weights[0, :len(tgt_pieces), :len(src_pieces)].float().cpu(), result.text


def plot_attention(translator, text: str, out: Path) -> Path:
    src, tgt, w, translation = attention_matrix(translator, text)
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(src) + 2), max(3, 0.4 * len(tgt) + 1.5)))
    ax.imshow(w.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(src)), src, rotation=90)
    ax.set_yticks(range(len(tgt)), tgt)
    ax.set(xlabel="source", ylabel="translation")
    ax.set_title(f"{text}\n-> {translation}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="mt-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=version_string(p.prog))
    p.add_argument("run", nargs="+", help="run directory; several (or curve files minutes<TAB>valid_bleu of other toolkits): "
                   "one figure of valid BLEU by minutes (-o)")
    p.add_argument("-o", "--output", default="compare.png", help="with several runs: the figure to write")
    p.add_argument("--sentence", type=int, help="plot the attention of this line (1-based) of --split")
    p.add_argument("--split", default="test")
    p.add_argument("--text", help="plot the attention for this source sentence")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if len(args.run) > 1:
        if args.sentence or args.text:
            p.error("--sentence and --text take one run")
        try:
            print(plot_compare([Path(r) for r in args.run], Path(args.output)))
        except (OSError, ValueError) as e:
            print(f"mt-plot: error: {e}", file=sys.stderr)
            sys.exit(1)
        return
    run = RunDir(args.run[0])
    try:
        print(plot_curves(run.root))
        if args.sentence or args.text:
            from mt.translate import Translator

            translator = Translator.from_path(run.root, device=args.device)
            text, name = args.text, "text"
            if args.sentence:
                from mt.data import load_split

                text, name = load_split(run.data, args.split)[args.sentence - 1]["src"], f"{args.split}_{args.sentence}"
            print(plot_attention(translator, text, run.attention(name)))
    except (FileNotFoundError, ValueError, IndexError) as e:
        print(f"mt-plot: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
