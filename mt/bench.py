"""`mt-bench`: training and decoding throughput, memory and the fraction of the machine's peak.

    mt-bench                                   # reference model (bench_gru) on built-in Multi30k
    mt-bench --model bench_lstm --threads 2 --out bench.json
    mt-bench --phases train --train-steps 300  # one phase, longer
    mt-bench --int8 --shortlist 1000           # also time the CPU inference options

Each phase runs in its own process, so its peak resident memory is its own. The figures are
printed one per line (`name value`) and written together as JSON (--out). Decoding can force a
fixed output length (--fixed-len, default 20: EOS blocked before, forced at it), so an untrained
model does the same work as a trained one, and as the peer toolkits in ../shared/bench/peers do.
This is a benchmark, not a test: the machine's speed drifts, so compare within one run.

The fraction of peak: with `peak` among --phases, the float32 and bf16 matmul peaks are sampled
(~0.5 s each) before the first phase, between phases, after the last, and in the train phase's
own process just before and after its timed loop. Every sample is kept
(`machine.fp32_matmul_gflops.samples`, `.sampled_at`), `machine.fp32_matmul_gflops` is the
highest, and `train.fraction_of_peak` is training's GFLOP/s over the highest sample of the
dtype it ran in (`train.fraction_of_peak.dtype`: bfloat16 for --precision bf16). A training
rate above every sample is itself a lower bound on the peak: it is counted as a sample (stderr
says so), so the fraction is never above 1.0.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from mt import version_string
from mt.precision import matmul_peak
from mt.rundir import RunDir

DEFAULT_DIR = Path("runs") / ".bench"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def prepare(args) -> Path:
    """Data and tokenizer stages of a benchmark run dir (cached between runs)."""
    from mt.config import compose_config
    from mt.pipeline import run, setup_logging

    cfg = compose_config([f"data.path={args.corpus}", f"data.src_lang={args.src}", f"data.tgt_lang={args.tgt}",
                          f"tokenizer.vocab_size={args.vocab}", "stages=[prepare,tokenizer]", "device=cpu"])
    run_dir = Path(args.dir) / f"{Path(args.corpus.replace('builtin:', '')).name}_{args.src}{args.tgt}_{args.vocab}"
    run(cfg, run_dir)
    setup_logging(None)
    return run_dir


# torch dtype -> the short name in the figures' keys (machine.fp32_matmul_gflops, ...)
PEAK_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
# per dtype and sample: short, because a run takes one before, between and after its phases and
# two inside the train phase; the highest of them is the peak, so many short ones beat one long
PEAK_SECONDS = 0.5


def sample_peaks(at: str) -> Dict[str, List[Any]]:
    """One matmul peak sample per dtype, taken here and now (`at` says where), as list-valued
    figures that merge_figures appends to the run's."""
    figures: Dict[str, List[Any]] = {}
    for dtype, short in PEAK_DTYPES.items():
        figures[f"machine.{short}_matmul_gflops.samples"] = [matmul_peak(dtype, PEAK_SECONDS)]
        figures[f"machine.{short}_matmul_gflops.sampled_at"] = [at]
    return figures


def merge_figures(figures: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """Adds `new` to `figures`: lists (peak samples) are appended to, other values set.
    Returns the non-list ones, the figures to print."""
    for k, v in new.items():
        if isinstance(v, list):
            figures.setdefault(k, []).extend(v)
        else:
            figures[k] = v
    return {k: v for k, v in new.items() if not isinstance(v, list)}


# the samples a phase takes in its own process (peak_samples_around), for _child to report
_PHASE_SAMPLES: Dict[str, List[Any]] = {}


@contextmanager
def peak_samples_around(args, phase: str) -> Iterator[None]:
    """Peak samples just before and just after the block (a phase's timed loop), when the run
    samples peaks at all: in the timed work's own process and threads, and close to it in time,
    which is what a fraction of the peak should be measured against on a drifting machine."""
    sampling = "peak" in args.phases.split(",")
    if sampling:
        merge_figures(_PHASE_SAMPLES, sample_peaks(f"{phase}: before its timed loop"))
    yield
    if sampling:
        merge_figures(_PHASE_SAMPLES, sample_peaks(f"{phase}: after its timed loop"))


def peak_summary(samples: Sequence[float], dtype: str) -> str:
    """How a peak was found: 'the highest of 7 float32 peak samples, 141-189 GFLOP/s'."""
    return f"the highest of {len(samples)} {dtype} peak samples, {min(samples):.0f}-{max(samples):.0f} GFLOP/s"


def faster_than_peak(gflops: float, samples: Sequence[float]) -> Optional[str]:
    """The note to print where training ran faster than every peak sample, else None."""
    if gflops <= max(samples):
        return None
    return f"training ran faster than every peak sample: the peak is at least {gflops:.0f} GFLOP/s"


def fraction_of_peak(gflops: float, samples: Sequence[float]) -> float:
    """`gflops` over the highest peak sample, counting `gflops` itself as one: a rate the
    machine reached is a lower bound on its peak, so the fraction is never above 1 (above it,
    the sampling missed the machine's fast moments or the FLOP count is over-estimated)."""
    return gflops / max([*samples, gflops])


# --ablate NAME: a speed-up turned off, as the training config override that turns it off
ABLATIONS = {"handwritten_decoder": "train.decoder_backward=autograd",
             "handwritten_loss": "train.loss_backward=autograd"}


def bench_config(args, extra: Sequence[str] = ()):
    """What a phase runs with: conf/ without a recipe, the --model group, the bench's batch and
    precision on the CPU, then `extra` overrides (--ablate's)."""
    from mt.config import compose_config

    return compose_config(["~recipe", f"model={args.model}", f"train.batch_size={args.batch_size}",
                           f"train.precision={args.precision}", "device=cpu", *extra])


class TrainingStep:
    """The update mt-train runs (mt.update.build_parts + optimizer_update: the same loss, clip,
    schedule, accumulation and optimizer), on the bench corpus, with --ablate's overrides."""

    def __init__(self, args, run_dir: Path, ablate: Sequence[str] = ()):
        import torch

        from mt import distributed
        from mt.batches import epoch_batches
        from mt.model import build_model
        from mt.precision import resolve_precision
        from mt.schedule import LRSchedule
        from mt.tokenizer import IdCorpus, Tokenizer
        from mt.update import build_parts

        unknown = set(ablate) - set(ABLATIONS)
        if unknown:
            raise ValueError(f"--ablate: unknown {', '.join(sorted(unknown))} (known: {', '.join(ABLATIONS)})")
        self.cfg = bench_config(args, [ABLATIONS[a] for a in ablate])
        run = RunDir(run_dir)
        self.tok = Tokenizer.from_dir(run.tokenizer)
        self.model = build_model(self.cfg.model, self.tok.src_vocab_size, self.tok.tgt_vocab_size, seed=1).train()
        ctx = distributed.Context(device=torch.device("cpu"))
        self.precision = resolve_precision(self.cfg.train.precision, ctx.device)
        self.parts = build_parts(self.cfg.train, ctx, self.model, self.precision)
        self.corpus = IdCorpus(run.ids, "train")
        self.batches = epoch_batches(self.corpus, self.cfg.train, seed=1, epoch=0)
        self.schedule = LRSchedule(self.cfg.train)

    def __call__(self, i: int) -> int:
        """Update number i (0-based); returns its target tokens."""
        from mt.schedule import teacher_forcing_ratio
        from mt.update import optimizer_update

        tcfg, n = self.cfg.train, self.cfg.train.accum_steps
        group = [self.batches[(i * n + k) % len(self.batches)] for k in range(n)]
        _, _, tokens, _, _ = optimizer_update(self.parts, self.corpus, group, tcfg, self.schedule.lr(i + 1),
                                              teacher_forcing_ratio(tcfg, i), False)
        return tokens


def phase_train(args, run_dir: Path) -> Dict[str, float]:
    from mt.model import flops_per_target_token

    ablate = sorted(filter(None, args.ablate.split(",")))
    step = TrainingStep(args, run_dir, ablate)
    tokens = 0
    with peak_samples_around(args, "train"):  # dt inside: the sample after must not be timed
        for i in range(args.warmup + args.train_steps):
            if i == args.warmup:
                t0, tokens = time.perf_counter(), 0
            tokens += step(i)
        dt = time.perf_counter() - t0
    lengths = step.corpus.lengths
    flops = flops_per_target_token(step.cfg.model, step.tok.src_vocab_size, step.tok.tgt_vocab_size,
                                   float(lengths["src"].sum() / lengths["tgt"].sum()), float(lengths["src"].mean() + 1))
    return {"train.precision": step.precision, "train.ablate": ",".join(ablate) or "none",
            "train.target_tokens_per_s": tokens / dt, "train.steps_per_s": args.train_steps / dt,
            "train.flops_per_target_token": flops, "train.gflops": tokens / dt * flops / 1e9,
            "train.peak_rss_mb": peak_rss_mb()}


# where phase_profile's timers go: (module, function) -> the share it counts toward
PROFILED = {("decoder_loop", "_attend"): "attention", ("decoder_loop", "attention_backward"): "attention",
            ("decoder_loop", "cell_step"): "cells", ("decoder_loop", "cell_backward"): "cells",
            ("decoder_loop", "_mm"): "per-step products", ("decoder_loop", "_addmm"): "per-step products",
            ("decoder_loop", "_wgrad"): "batched weight gradients"}


def phase_profile(args, run_dir: Path) -> Dict[str, float]:
    """Where a training step's time goes. Timers wrap the hand-written decoder loop's pieces
    (cells, attention, per-step products, batched weight gradients), the loop itself, the
    output layer with the loss and the optimizer's step, for this process only; the rest
    (encoder, embeddings, key projections, the attentional layer, dropout, autograd, Python) is
    the remainder."""
    import collections
    import importlib

    from mt.decoder_loop import DecoderLoop
    from mt.loss import LinearCrossEntropy

    stats: Dict[str, float] = collections.defaultdict(float)

    def timed(fn, name):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            stats[name] += time.perf_counter() - t0
            return out
        return wrapper

    for (module, fn), share in PROFILED.items():
        mod = importlib.import_module(f"mt.{module}")
        setattr(mod, fn, timed(getattr(mod, fn), share))
    for cls, name in ((DecoderLoop, "decoder loop"), (LinearCrossEntropy, "output layer + loss")):
        cls.forward = staticmethod(timed(cls.forward, name))
        cls.backward = staticmethod(timed(cls.backward, name))
    step = TrainingStep(args, run_dir)
    step.parts.optimizer.step = timed(step.parts.optimizer.step, "optimizer")
    total = 0.0
    for i in range(args.warmup + args.train_steps):
        if i == args.warmup:
            stats.clear()
            total = 0.0
        t0 = time.perf_counter()
        step(i)
        total += time.perf_counter() - t0
    inner = {k: stats[k] for k in dict.fromkeys(PROFILED.values())}
    parts = {**inner, "loop bookkeeping (stack, copies, Python)": stats["decoder loop"] - sum(inner.values()),
             "output layer + loss": stats["output layer + loss"], "optimizer": stats["optimizer"]}
    parts["everything else"] = total - sum(parts.values())
    figures = {f"profile.share.{k}": v / total for k, v in parts.items()}
    figures["profile.step_ms"] = total / args.train_steps * 1000
    figures["profile.precision"] = step.precision
    return figures


def untrained_checkpoint(args, run_dir: Path) -> Path:
    """The --model with seed-1 weights, saved under the bench run dir as training saves best.pt
    (so decoding loads it the one way there is, Translator.from_path, shortlist included)."""
    from mt import checkpoint as ckpt_io
    from mt.config import to_container
    from mt.model import build_model
    from mt.tokenizer import Tokenizer

    run = RunDir(run_dir)
    path = run.checkpoints / f"untrained_{args.model}.pt"
    if path.exists():
        return path
    cfg, tok = bench_config(args), Tokenizer.from_dir(run.tokenizer)
    model = build_model(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, seed=1)
    ckpt_io.save({"format": ckpt_io.CHECKPOINT_FORMAT, "model": model.state_dict(), "step": 0,
                  "config": to_container(cfg), "model_config": to_container(cfg.model),
                  "tokenizer": tok.checkpoint_record()}, path)
    return path


def phase_decode(args, run_dir: Path, beam: int, batch: int) -> Dict[str, float]:
    from mt.data import load_split
    from mt.translate import Translator

    fixed = dict(max_len_a=0.0, max_len_b=args.fixed_len, min_len=args.fixed_len) if args.fixed_len else {}
    translator = Translator.from_path(
        Path(args.checkpoint) if args.checkpoint else untrained_checkpoint(args, run_dir), bench_config(args).decode,
        device="cpu", method="beam" if beam > 1 else "greedy", beam_size=beam, batch_size=batch, alpha=1.0,
        int8=args.int8, bf16=args.bf16, shortlist=args.shortlist, **fixed)
    n = args.sentences if batch > 1 else max(1, args.sentences // 5)
    src = list(load_split(RunDir(run_dir).data, "test")["src"][:n])
    translator.translate_batch(src[:min(len(src), batch)])  # warm-up
    times = []
    for _ in range(args.repeat):  # the median of several runs, as the peers' harness reports
        t0 = time.perf_counter()
        results = translator.translate_batch(src)
        times.append(time.perf_counter() - t0)
    dt = sorted(times)[len(times) // 2]
    out_tokens = sum(len(r.hyps[0].tokens) + 1 for r in results)
    key = f"decode.{'beam' + str(beam) if beam > 1 else 'greedy'}.batch{batch}"
    return {f"{key}.sentences_per_s": len(src) / dt, f"{key}.tokens_per_s": out_tokens / dt,
            f"{key}.mean_len": out_tokens / len(src), f"{key}.peak_rss_mb": peak_rss_mb()}


def _child(args) -> None:
    """Run one phase (this process) and print its figures as JSON on stdout."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    if args.phase == "train":
        figures = phase_train(args, run_dir)
    elif args.phase == "profile":
        figures = phase_profile(args, run_dir)
    else:
        beam, batch = (int(x) for x in args.phase.split(":"))
        figures = phase_decode(args, run_dir, beam, batch)
    merge_figures(figures, _PHASE_SAMPLES)
    print(json.dumps(figures))


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mt-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=version_string(p.prog))
    p.add_argument("--model", default="bench_gru", help="a conf/model option (default: the peers' model)")
    p.add_argument("--corpus", default="builtin:multi30k", help="directory of <split>.<lang> files")
    p.add_argument("--src", default="en")
    p.add_argument("--tgt", default="de")
    p.add_argument("--vocab", type=int, default=8000, help="joint SentencePiece vocabulary")
    p.add_argument("--batch-size", type=int, default=64, help="training sentences per batch")
    p.add_argument("--warmup", type=int, default=10, help="training steps before the clock starts")
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--sentences", type=int, default=500, help="test sentences to decode (batch 1: a fifth)")
    p.add_argument("--fixed-len", type=int, default=20, help="output length forced in decoding; 0 = natural")
    p.add_argument("--phases", default="peak,train,1:1,1:64,5:1,5:64",
                   help="train, profile, BEAM:BATCH, ... (comma-separated); peak, anywhere among them: "
                   "sample the matmul peak before, between and after them and around the training loop")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"], help="training precision")
    p.add_argument("--ablate", default="", help="turn speed-ups off, for before/after figures: comma list of "
                   + ", ".join(f"{k} ({v})" for k, v in ABLATIONS.items()))
    p.add_argument("--repeat", type=int, default=3, help="decoding runs per phase (the median is reported)")
    p.add_argument("--checkpoint", help="decode with these weights instead of untrained ones")
    p.add_argument("--int8", action="store_true", help="decode with int8 dynamic quantization")
    p.add_argument("--shortlist", type=int, default=0, help="decode with a target vocabulary shortlist")
    p.add_argument("--bf16", action="store_true", help="decode with bf16 matrix products (autocast)")
    p.add_argument("--dir", default=str(DEFAULT_DIR), help="where the prepared corpus is cached")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _sample_in_this_process(args, figures: Dict[str, Any], at: str) -> None:
    """A peak sample between phases, here rather than in a process of its own (torch's import
    alone would take longer than the sample), with the phases' thread count."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    figures["machine.threads"] = float(torch.get_num_threads())
    merge_figures(figures, sample_peaks(at))


def report_peaks(figures: Dict[str, Any]) -> None:
    """Each dtype's peak (the highest sample) and training's fraction of the peak of the dtype
    it ran in, into `figures` and printed. A training rate above every sample of its dtype is
    counted as a sample of it (a lower bound on the peak), so no fraction is above 1."""
    dtype = "bfloat16" if figures.get("train.precision") == "bf16" else "float32"
    key = f"machine.{PEAK_DTYPES[dtype]}_matmul_gflops"
    gflops, samples = figures.get("train.gflops"), figures.get(f"{key}.samples")
    note = faster_than_peak(gflops, samples) if gflops is not None and samples else None
    if note:
        print(note, file=sys.stderr)
        merge_figures(figures, {f"{key}.samples": [gflops], f"{key}.sampled_at": ["train.gflops"]})
    for d, short in PEAK_DTYPES.items():
        each = figures.get(f"machine.{short}_matmul_gflops.samples")
        if each:
            figures[f"machine.{short}_matmul_gflops"] = max(each)
            print(f"machine.{short}_matmul_gflops {max(each):.4g} ({peak_summary(each, d)})")
    if gflops is not None and samples:
        figures["train.fraction_of_peak"] = fraction_of_peak(gflops, samples)
        figures["train.fraction_of_peak.dtype"] = dtype
        print(f"train.fraction_of_peak {figures['train.fraction_of_peak']:.3f} (of {peak_summary(samples, dtype)})")


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    if args.phase:
        return _child(args)
    run_dir = prepare(args)
    figures: Dict[str, Any] = {"config.model": args.model, "config.corpus": args.corpus, "config.precision": args.precision,
                               "config.ablate": args.ablate,
                               "config.batch_size": args.batch_size, "config.fixed_len": args.fixed_len,
                               "config.int8": args.int8, "config.shortlist": args.shortlist, "config.bf16": args.bf16}
    base = [sys.executable, "-m", "mt.bench", "--run-dir", str(run_dir)] + list(
        argv if argv is not None else sys.argv[1:])
    phases = args.phases.split(",")
    sampling = "peak" in phases
    if sampling:
        _sample_in_this_process(args, figures, "before the first phase")
    for phase in (p for p in phases if p != "peak"):
        r = subprocess.run(base + ["--phase", phase], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"mt-bench: phase {phase} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            sys.exit(1)
        new = merge_figures(figures, json.loads(r.stdout.strip().splitlines()[-1]))
        for k, v in new.items():
            print(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}", flush=True)
        if sampling:
            _sample_in_this_process(args, figures, f"after {phase}")
    report_peaks(figures)
    Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
