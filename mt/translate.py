"""`mt-translate`: a Unix filter. One output line per input line, logs on stderr only.

    mt-translate -m runs/multi30k_en_de < test.en > test.hyp          # beam 5 (the run's config)
    echo "A dog runs." | mt-translate -m runs/multi30k_en_de/checkpoints/best.pt --greedy
    mt-translate -m runs/x -i in.txt -o out.txt --beam 10 --alpha 1.0 --batch-size 128
    mt-translate -m runs/x --n-best 5 --format jsonl                   # scores and alternatives
    mt-translate -m runs/x --sample --top-p 0.9 --seed 7               # sampling
    mt-translate -m runs/x                                             # on a terminal: a prompt
    mt-translate -m runs/a -m runs/b -m runs/c < test.en               # an ensemble (mt/ensemble.py)

Input is read in batches of --buffer-size lines as it arrives (output for a batch appears
before the rest is read); when a live writer pauses (a FIFO, `tail -f`, a chat loop), the lines
that have arrived are translated at once instead of waiting for a full buffer. An empty line
gives an empty line; a line longer than what the model was trained on is translated
anyway, with a warning. stdout is UTF-8 and SIGPIPE is the default, so `| head` works.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import torch

from mt import checkpoint as ckpt_io
from mt import version_string
from mt.batches import pad
from mt.config import DecodeConfig, structured, to_container
from mt.data import normalize
from mt.decoding import DecodingModel
from mt.ensemble import Ensemble
from mt.rundir import BEST, RunDir
from mt.search import Hypothesis
from mt.shortlist import Shortlist
from mt.tokenizer import EOS_ID, Tokenizer

log = logging.getLogger("mt.translate")


@dataclass
class Result:
    text: str  # the best hypothesis, detokenised
    hyps: List[Hypothesis] = field(default_factory=list)
    texts: List[str] = field(default_factory=list)  # every hypothesis, detokenised


def decode_config(saved: Dict[str, Any], decode: Any = None, overrides: Optional[Dict[str, Any]] = None):
    """The DecodeConfig to decode with: `decode` (a DecodeConfig or its dict) if given, else the
    checkpoint's saved settings, then `overrides` (decode.* keys; None = keep), ranges checked.
    Checkpoints written before decode.int8 and decode.bf16 existed carry `quantize` (never read then: off)."""
    base = to_container(decode) if decode is not None else {k: v for k, v in saved.items() if k != "quantize"}
    base.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return structured(DecodeConfig(**base))


def find_checkpoint(path: Path) -> Path:
    """A checkpoint file as given; a run directory's best.pt; a folder's best.pt."""
    path = Path(path)
    if path.is_dir():
        return RunDir(path).best if RunDir(path).checkpoints.is_dir() else path / BEST
    return path


def load_shortlist(ckpt_path: Path, size: int, tok: Tokenizer) -> Shortlist:
    """The shortlist of `size` from the training data of the run a checkpoint belongs to."""
    run = RunDir.of_checkpoint(ckpt_path)
    ids = run.ids if run else None
    if ids is None or not (ids / "train.src.bin").is_file():
        raise ValueError("--shortlist needs the model's run directory (it reads the training data's ids)")
    return Shortlist.build(ids, size, tok.src_vocab_size, tok.tgt_vocab_size)


class Translator:
    """A decoding model (mt/decoding.py) or an ensemble of them (mt/ensemble.py) and its
    tokenizer: lines in, translations out.
    Build it with `Translator.from_path`."""

    def __init__(self, decoding: DecodingModel, tok: Tokenizer, max_train_len: int = 0):
        self.decoding, self.tok, self.max_train_len = decoding, tok, max_train_len
        self.decode = decoding.decode
        self.device = decoding.device

    @classmethod
    def from_path(cls, path, decode: Any = None, device: str = "auto", **overrides: Any) -> "Translator":
        """Load a checkpoint (a run directory means its checkpoints/best.pt), or a list of them
        (an ensemble: mt/ensemble.py; they must share one tokenizer), and decode with `decode`
        (default: the first checkpoint's decode settings) and `overrides` (decode.* keys)."""
        from mt.distributed import resolve_device

        dev = resolve_device(device)
        paths = [find_checkpoint(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path)]
        if not paths:
            raise ValueError("no model given")
        models, first = [], None
        for ckpt_path in paths:
            model, ckpt = ckpt_io.load_model(ckpt_path, dev)
            if first is None:
                first = ckpt
            ckpt_io.check_same_vocabulary(ckpt, ckpt_path, first, paths[0])
            models.append(model)
            log.info("loaded %s (step %d)", ckpt_path, ckpt["step"])
        t = first["tokenizer"]
        tok = Tokenizer(t["src"], None if t["tgt"] == t["src"] else t["tgt"])  # after: its bytes were checked
        decode = decode_config(first["config"]["decode"], decode, overrides)
        shortlist = load_shortlist(paths[0], decode.shortlist, tok) if decode.shortlist else None
        on = [name for name, value in (("int8", decode.int8), ("bf16", decode.bf16),
                                       (f"shortlist {decode.shortlist}", decode.shortlist)) if value]
        log.info("%s search%s%s", decode.method, f", an ensemble of {len(models)} models" if len(models) > 1 else "",
                 f", with {', '.join(on)}" if on else "")
        if len(models) == 1:
            decoding: Any = DecodingModel(models[0], decode, shortlist)
        else:
            decoding = Ensemble([DecodingModel(m, decode) for m in models], shortlist)
        return cls(decoding, tok, first["config"]["train"]["max_len"])

    @torch.no_grad()
    def translate_batch(self, lines: Sequence[str], first_line: int = 1) -> List[Result]:
        """Translate a list of lines (any length, empty lines included), in order."""
        results: List[Optional[Result]] = [None] * len(lines)
        todo = []
        for i, line in enumerate(lines):
            text = normalize(line)
            if text:
                todo.append((i, text))
            else:
                results[i] = Result("", [Hypothesis([], 0.0, 0.0)], [""])
        ids = self.tok.encode_src([t for _, t in todo])
        for (i, _), x in zip(todo, ids):
            if self.max_train_len and len(x) + 1 > self.max_train_len:
                log.warning("line %d: %d pieces, longer than the %d the model was trained on; translated anyway",
                            first_line + i, len(x) + 1, self.max_train_len)
        order = sorted(range(len(todo)), key=lambda j: len(ids[j]))  # similar lengths together
        bs = max(1, self.decode.batch_size)
        for start in range(0, len(order), bs):
            chunk = order[start:start + bs]
            src = pad([ids[j] for j in chunk], suffix=EOS_ID).to(self.device)
            src_len = torch.tensor([len(ids[j]) + 1 for j in chunk])
            for j, hyps in zip(chunk, self.decoding.search(src, src_len)):
                texts = [self.tok.decode_tgt(h.tokens) for h in hyps]
                results[todo[j][0]] = Result(texts[0], hyps, texts)
        return [r for r in results if r is not None]

    def translate(self, lines: Sequence[str]) -> List[str]:
        """The best translation of each line, in order (the Python API's call)."""
        if isinstance(lines, str):
            raise TypeError("translate() takes a list of lines; for one line: translate([line])[0]")
        return list(self.translate_lines(lines))

    def translate_lines(self, lines: Iterable[str], buffer: int = 0) -> Iterator[str]:
        """Best translation of each line, streamed in buffers of `buffer` lines."""
        for results in self.stream(lines, buffer):
            for r in results:
                yield r.text

    def stream(self, lines: Iterable[str], buffer: int = 0) -> Iterator[List[Result]]:
        buffer = buffer or max(1, self.decode.batch_size) * 4
        chunk: List[str] = []
        done = 0
        for line in lines:
            chunk.append(line)
            if len(chunk) >= buffer:
                yield self.translate_batch(chunk, done + 1)
                done += len(chunk)
                chunk = []
        if chunk:
            yield self.translate_batch(chunk, done + 1)


# --- pipeline stage -----------------------------------------------------------------------------

def translate_test(cfg, run_dir: Path) -> Path:
    """Translate the prepared test split with cfg.decode into run_dir/test.hyp (skipped when its
    stamp names the same best.pt content, decoding settings and prepared data)."""
    from mt import rundir
    from mt.data import load_split

    run = rundir.RunDir(run_dir)
    out = run.hyp
    data = rundir.read_stamp(run.data_stamp) or {}  # the sources are the prepared test split's
    stamp = rundir.fingerprint([to_container(cfg.decode), rundir.file_digest(run.best), data.get("fingerprint")])
    if not cfg.force and out.exists() and rundir.is_done(run.hyp_stamp, stamp):
        log.info("translate: %s is up to date, skipped", out)
        return out
    translator = Translator.from_path(run.best, cfg.decode, cfg.device)
    src = load_split(run.data, "test")["src"]
    tmp = out.with_suffix(".hyp.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for line in translator.translate_lines(src):
            f.write(line + "\n")
    os.replace(tmp, out)
    rundir.write_stamp(run.hyp_stamp, stamp)
    log.info("translate: %d lines -> %s (%s, beam %d)", len(src), out, cfg.decode.method, cfg.decode.beam_size)
    return out


# --- command line -------------------------------------------------------------------------------

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mt-translate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=version_string(p.prog))
    p.add_argument("-m", "--model", required=True, action="append",
                   help="run directory or checkpoint file; several -m: an ensemble (one tokenizer)")
    p.add_argument("-i", "--input", help="input file (default: stdin)")
    p.add_argument("-o", "--output", help="output file (default: stdout)")
    s = p.add_mutually_exclusive_group()
    s.add_argument("--beam", type=int, help="beam size (default: the run's decode config)")
    s.add_argument("--greedy", action="store_true")
    s.add_argument("--sample", action="store_true", help="sample instead of searching")
    p.add_argument("--alpha", type=float, help="length penalty ((5+len)/6)**alpha")
    p.add_argument("--max-len-a", type=float)
    p.add_argument("--max-len-b", type=int)
    p.add_argument("--n-best", type=int, help="hypotheses per line (needs --format tsv or jsonl)")
    p.add_argument("--format", choices=["text", "tsv", "jsonl"], default="text",
                   help="text: one line per input; tsv: id, rank, score, text per hypothesis; "
                        "jsonl: one JSON object per input with every hypothesis")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="sentences per batch")
    p.add_argument("--buffer-size", type=int, default=0, help="at most this many lines per read (default 4 batches); fewer when the input pauses")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--int8", action=argparse.BooleanOptionalAction,
                   help="int8 dynamic quantization (CPU; small BLEU cost; default: the run's decode.int8)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 matrix products (autocast; small BLEU cost; default: the run's decode.bf16)")
    p.add_argument("--shortlist", type=int, metavar="N",
                   help="score only the N most frequent target pieces plus likely translations of the "
                        "batch's source pieces (needs the run directory; small BLEU cost; 0 = off; "
                        "default: the run's decode.shortlist)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    args = p.parse_args(argv)
    if args.buffer_size < 0:
        p.error(f"--buffer-size must be >= 0 (0 = four batches), got {args.buffer_size}")
    return args


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    method = "greedy" if args.greedy else "sample" if args.sample else "beam" if args.beam is not None else None
    beam = args.beam if args.beam is not None else (1 if args.greedy or args.sample else None)
    return {"method": method, "beam_size": beam,
            "alpha": args.alpha, "max_len_a": args.max_len_a, "max_len_b": args.max_len_b, "n_best": args.n_best,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
            "batch_size": args.batch_size, "int8": args.int8, "bf16": args.bf16, "shortlist": args.shortlist}


def _write(out, results: List[Result], fmt: str, first_id: int, sources: List[str]) -> None:
    for k, r in enumerate(results):
        if fmt == "text":
            out.write(r.text + "\n")
        elif fmt == "tsv":
            for rank, (h, text) in enumerate(zip(r.hyps, r.texts), start=1):
                out.write(f"{first_id + k}\t{rank}\t{h.score:.4f}\t{text}\n")
        else:
            hyps = [{"text": t, "score": round(h.score, 4), "logprob": round(h.logprob, 4)} for h, t in zip(r.hyps, r.texts)]
            out.write(json.dumps({"id": first_id + k, "src": sources[k], "hyps": hyps}, ensure_ascii=False) + "\n")
    out.flush()


def main(argv: Optional[List[str]] = None) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="mt-translate: %(levelname)s %(message)s")
    out, done = None, 0
    try:
        overrides = _overrides(args)
        if args.format == "text" and (args.n_best or 1) > 1:
            raise ValueError("--n-best > 1 needs --format tsv or jsonl (text keeps one line per input)")
        if (args.n_best or 1) > (args.beam or args.n_best or 1) and not args.sample:
            raise ValueError("--n-best cannot exceed --beam")
        translator = Translator.from_path([Path(m) for m in args.model], device=args.device, **overrides)
        name = args.input or "stdin"
        inp = open(args.input, "rb", buffering=0) if args.input else sys.stdin.buffer
        out = open(args.output, "w", encoding="utf-8") if args.output else \
            open(sys.stdout.fileno(), "w", encoding="utf-8", closefd=False)
        if not args.input and sys.stdin.isatty():
            chunks: Iterable[List[bytes]] = ([line] for line in _prompted(inp))
        else:
            chunks = read_chunks(inp.fileno(), args.buffer_size or 4 * translator.decode.batch_size)
        for chunk in chunks:
            lines = [_decode(raw, name, done + k) for k, raw in enumerate(chunk, start=1)]
            _write(out, translator.translate_batch(lines, done + 1), args.format, done + 1, lines)
            done += len(chunk)
        log.info("translated %d lines", done)
    except KeyboardInterrupt:  # Ctrl-C: what was translated stays written, then the shell's 130
        if out is not None:
            out.flush()
        print(f"mt-translate: interrupted (SIGINT) after {done} lines", file=sys.stderr)
        sys.exit(130)
    except (ValueError, OSError, UnicodeDecodeError, ckpt_io.CheckpointError) as e:
        print(f"mt-translate: error: {e}", file=sys.stderr)
        sys.exit(1)


PAUSE_S = 0.1  # a live writer that is quiet this long has its lines translated now


def read_chunks(fd: int, max_lines: int, pause: float = PAUSE_S) -> Iterator[List[bytes]]:
    """Lines of a file descriptor (split on LF only, never on U+2028 or form feeds), in lists of
    at most `max_lines`. A list is handed on when it is full, at the end of the input, or when
    the input pauses for `pause` seconds with complete lines waiting: a file or a fast pipe is
    translated in full batches, a line written into a pipe that stays open (a FIFO, `tail -f`, a
    chat loop) is translated as soon as its writer pauses."""
    lines: List[bytes] = []
    pending = b""
    while True:
        if lines and not _readable(fd, pause):
            yield lines  # the writer paused: translate what has arrived
            lines = []
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            break
        *complete, pending = (pending + data).split(b"\n")
        lines += complete
        while len(lines) >= max_lines:
            yield lines[:max_lines]
            lines = lines[max_lines:]
    if pending:
        lines.append(pending)  # a last line without a newline is still a line
    for start in range(0, len(lines), max_lines):
        yield lines[start:start + max_lines]


def _readable(fd: int, timeout: float) -> bool:
    import select

    try:
        return bool(select.select([fd], [], [], timeout)[0])
    except (OSError, ValueError):  # not selectable here: block on read, batches stay full
        return True


def _decode(raw: bytes, name: str, number: int) -> str:
    """One input line as text; invalid UTF-8 is an error naming the line."""
    try:
        return raw.decode("utf-8").rstrip("\n").rstrip("\r")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}:{number}: invalid UTF-8 ({e.reason})") from None


def _prompted(inp) -> Iterator[bytes]:
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = inp.readline()
        if not line:
            return
        yield line


if __name__ == "__main__":
    main()
