"""The train stage: teacher forcing, validation, checkpoints, resume, several processes.

    mt-train recipe=multi30k_en_de stages=[train]              # resumes from checkpoints/last.pt
    mt-train recipe=multi30k_en_de train.max_time=10           # 10 minutes (summed over resumes)
    torchrun --nproc_per_node=2 -m mt.pipeline recipe=multi30k_en_de   # DDP: gloo on CPU, nccl on GPU
    train(cfg, run_dir)                                        # what the pipeline and tests call

Writes run_dir/checkpoints/{last,best}.pt, metrics.jsonl (one JSON object per log line), tb/
(TensorBoard) and log lines to run_dir/mt.log. Kill it at any moment and run it again: it goes
on from the last checkpoint, with the same batches, RNG states and optimizer state.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.contrib.logging import logging_redirect_tqdm

from mt import checkpoint as ckpt_io
from mt import distributed
from mt.batches import collate, epoch_batches, eval_batches, n_target_tokens
from mt.config import to_container
from mt.fused import LinearCrossEntropy
from mt.interrupt import Interrupted, StopRequest
from mt.model import Seq2Seq, build_model, count_parameters
from mt.precision import autocast, resolve_precision
from mt.tokenizer import PAD_ID, IdCorpus, Tokenizer

log = logging.getLogger("mt.train")

# Validation decodes greedily with a generous length cap: it measures the model, not the search.
VALID_MAX_LEN_A, VALID_MAX_LEN_B = 1.5, 10
VALID_BATCH_TOKENS = 8000


# --- helpers ------------------------------------------------------------------------------------

class LRSchedule:
    """lr(step) = lr * warmup/decay shape * plateau scale; the scale halves (plateau_factor)
    after more than plateau_patience validations without improvement, floored at min_lr."""

    def __init__(self, cfg):
        self.cfg, self.scale, self.best, self.bad = cfg, 1.0, None, 0

    def lr(self, step: int) -> float:
        c, step = self.cfg, max(1, step)
        if c.schedule == "inverse_sqrt":
            warm = max(1, c.warmup_steps)
            shape = min(step / warm, math.sqrt(warm / step))
        else:
            shape = min(1.0, step / c.warmup_steps) if c.warmup_steps else 1.0
        return max(c.lr * shape * self.scale, min(c.min_lr, c.lr * shape)) if c.schedule == "plateau" \
            else c.lr * shape

    def observe(self, improved: bool) -> None:
        if self.cfg.schedule != "plateau":
            return
        self.bad = 0 if improved else self.bad + 1
        if self.bad > self.cfg.plateau_patience:
            self.scale *= self.cfg.plateau_factor
            self.bad = 0
            log.info("lr scale now %.4g (no improvement for %d validations)", self.scale,
                     self.cfg.plateau_patience + 1)

    def state_dict(self) -> Dict[str, Any]:
        return {"scale": self.scale, "bad": self.bad}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.scale, self.bad = state["scale"], state["bad"]


def teacher_forcing_ratio(cfg, step: int) -> float:
    """Scheduled sampling (Bengio et al. 2015): the probability of feeding the reference token."""
    start, end, d = cfg.teacher_forcing, cfg.tf_min, max(1, cfg.tf_decay_steps)
    if cfg.tf_schedule == "constant":
        return start
    if cfg.tf_schedule == "linear":
        return max(end, start - (start - end) * step / d)
    if cfg.tf_schedule == "exponential":  # falls to 1% of the way by d steps
        return end + (start - end) * 0.01 ** (step / d)
    return end + (start - end) / (1.0 + math.exp((step - d / 2) / (d / 10)))  # inverse sigmoid


class LossModel(nn.Module):
    """Wraps the model so that DistributedDataParallel sees the loss inside forward()."""

    def __init__(self, model: Seq2Seq, label_smoothing: float):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor, tgt_out: Tensor,
                tf_ratio: float = 1.0) -> Tensor:
        """Returns [smoothed loss sum, NLL sum] over the target tokens (padding excluded)."""
        att, _ = self.model(src, src_len, tgt_in, tf_ratio)  # B x T x D
        mask = tgt_out != PAD_ID  # the output layer never sees padding
        out = self.model.decoder.output_layer
        device = att.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else out.weight.dtype
        loss, nll = LinearCrossEntropy.apply(att[mask], out.weight, out.bias, tgt_out[mask], self.label_smoothing,
                                             compute)
        return torch.stack([loss, nll.detach()])


@torch.no_grad()
def validate(model: Seq2Seq, corpus: IdCorpus, refs: List[str], tok: Tokenizer, device: torch.device,
             precision: str, limit: int = 0) -> Dict[str, float]:
    """Valid loss, perplexity and greedy BLEU/chrF (sacreBLEU) against the raw references."""
    from mt.evaluate import score_lines
    from mt.search import greedy_search

    was_training = model.training
    model.eval()
    idx = np.arange(len(corpus) if not limit else min(limit, len(corpus)))
    nll = tokens = 0.0
    hyps: List[str] = [""] * len(idx)
    for batch_idx in eval_batches(corpus, VALID_BATCH_TOKENS, indices=idx):
        b = collate(corpus, batch_idx, device)
        with autocast(device, precision):
            att, _ = model(b.src, b.src_len, b.tgt_in)
            mask = b.tgt_out != PAD_ID
            logits = model.logits(att[mask]).float()
            nll += float(F.cross_entropy(logits, b.tgt_out[mask], reduction="sum"))
            tokens += b.n_tokens
            for i, h in zip(batch_idx, greedy_search(model, b.src, b.src_len, VALID_MAX_LEN_A, VALID_MAX_LEN_B)):
                hyps[i] = tok.decode_tgt(h[0].tokens)
    scores = {r["name"]: r for r in score_lines(hyps, [refs[:len(idx)]], ("bleu", "chrf"))}
    model.train(was_training)
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bleu": scores["BLEU"]["score"],
            "chrf": scores["chrF2"]["score"], "bleu_signature": scores["BLEU"]["signature"]}


def improved(metric: str, value: float, best: Optional[float]) -> bool:
    if not math.isfinite(value):  # a diverged model never becomes best.pt
        return False
    return best is None or (value < best if metric == "loss" else value > best)


def stop_reason(cfg, progress: Dict[str, Any]) -> Optional[str]:
    if cfg.max_steps and progress["step"] >= cfg.max_steps:
        return f"reached train.max_steps={cfg.max_steps}"
    if cfg.max_epochs and progress["epoch"] >= cfg.max_epochs:
        return f"reached train.max_epochs={cfg.max_epochs}"
    if cfg.max_time and progress["elapsed"] >= cfg.max_time * 60:
        return f"reached train.max_time={cfg.max_time} minutes"
    if cfg.patience and progress["bad_validations"] >= cfg.patience:
        return f"early stopping: no improvement in {cfg.patience} validations"
    return None


def _row_step(row: str) -> Optional[int]:
    """The step of a metrics.jsonl row; None for a line that a kill or a full disk cut short."""
    try:
        return json.loads(row)["step"] if row.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl and TensorBoard scalars (main process only). On resume from step N, rows
    and scalars after N (written before the interruption, redone now) are dropped, so each
    step is there once."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: Optional[int] = None):
        self.enabled, self.path, self.writer = enabled, run_dir / "metrics.jsonl", None
        if enabled and resume_step is not None and self.path.exists():
            rows = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [r for r, step in zip(rows, map(_row_step, rows)) if step is not None and step <= resume_step]
            if kept != rows:
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(kept), encoding="utf-8")
                os.replace(tmp, self.path)
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency; keep training if it is broken
                log.warning("tensorboard unavailable: no curves in tb/")

    def write(self, kind: str, step: int, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def average_last(tcfg, model: Seq2Seq, ckpt_dir: Path, progress: Dict[str, Any], validate_fn) -> None:
    """When training has stopped: average the weights of the last `train.average_last`
    validations (checkpoints/step_*.pt), validate the average, and make it best.pt when it beats
    the best single checkpoint. checkpoints/averaged.json records that it was done (and how it
    scored), so a rerun does not repeat it."""
    marker = ckpt_dir / "averaged.json"
    paths = ckpt_io.RunCheckpoints(ckpt_dir, tcfg.average_last).step_files()[-tcfg.average_last:]
    if marker.exists() or len(paths) < 2:
        return
    states = []
    for p in paths:  # full states: kept off the device
        try:
            states.append(ckpt_io.load(p, map_location="cpu"))
        except ckpt_io.CheckpointError as e:  # e.g. a corrupt newer file that resume fell back past
            log.warning("average_last: %s; left out", e)
    if len(states) < 2:
        return
    model.load_state_dict(ckpt_io.average([s["model"] for s in states]))
    result = validate_fn()
    metric, steps = tcfg.valid_metric, [s["step"] for s in states]
    better = improved(metric, result[metric], progress["best"])
    log.info("valid, average of steps %s: loss %.3f BLEU %.2f chrF %.2f (best single checkpoint: %s %.2f)%s",
             ",".join(map(str, steps)), result["loss"], result["bleu"], result["chrf"], metric, progress["best"],
             "; saved as best.pt" if better else "; best.pt kept")
    if better:
        best = {k: v for k, v in states[-1].items() if k not in ("optimizer", "schedule", "rng")}
        best.update(model=model.state_dict(), best=result[metric], best_step=progress["step"], averaged_steps=steps)
        ckpt_io.save(best, ckpt_dir / "best.pt")
    marker.write_text(json.dumps({"steps": steps, "better": better,
                                  **{k: v for k, v in result.items() if k != "bleu_signature"}}) + "\n")


def limit_fraction(cfg, progress: Dict[str, Any], per_epoch: int) -> Optional[Tuple[float, str]]:
    """(fraction done, limit) of the limit that ends the run first: train.max_steps, max_epochs
    (with the current epoch's share) or max_time; None when no limit is set (patience alone)."""
    done = []
    if cfg.max_steps:
        done.append((progress["step"] / cfg.max_steps, "max_steps"))
    if cfg.max_epochs:
        done.append(((progress["epoch"] + progress["epoch_step"] / max(per_epoch, 1)) / cfg.max_epochs, "max_epochs"))
    if cfg.max_time:
        done.append((progress["elapsed"] / (cfg.max_time * 60), "max_time"))
    return max(done) if done else None


class LimitBar:
    """tqdm over the fraction of the binding limit (its percentage and ETA), or over bare steps
    when nothing bounds the run; shown on a terminal, on the main process only."""

    SCALE = 1000  # the bar counts thousandths of the limit

    def __init__(self, ctx, cfg, progress: Dict[str, Any], per_epoch: int, file=None):
        from tqdm import tqdm

        self.cfg, self.per_epoch = cfg, per_epoch
        first = limit_fraction(cfg, progress, per_epoch)
        fmt = ("{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]" if first
               else "{desc}{n_fmt} steps [{elapsed}, {rate_fmt}{postfix}]")
        self.bar = tqdm(total=self.SCALE if first else None, initial=self._n(progress) if first else progress["step"],
                        bar_format=fmt, dynamic_ncols=True, file=file or sys.stderr,
                        disable=not ctx.main or not (file or sys.stderr).isatty())
        self.disable = self.bar.disable

    def _n(self, progress: Dict[str, Any]) -> float:
        fraction, _ = limit_fraction(self.cfg, progress, self.per_epoch)
        return min(fraction, 1.0) * self.SCALE

    def update(self, progress: Dict[str, Any], **postfix: str) -> None:
        found = limit_fraction(self.cfg, progress, self.per_epoch)
        self.bar.update((progress["step"] if found is None else self._n(progress)) - self.bar.n)
        self.bar.set_description(f"step {progress['step']}" + (f" ({found[1]})" if found else ""), refresh=False)
        if postfix:
            self.bar.set_postfix(**postfix, refresh=False)

    def close(self) -> None:
        self.bar.close()


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite (or a model to be saved was): the run stops."""


@dataclass
class Parts:
    """What one update touches, built once by train()."""
    ctx: distributed.Context
    model: Seq2Seq
    step_fn: nn.Module  # the LossModel, or its DistributedDataParallel wrapper
    ddp: Optional[nn.parallel.DistributedDataParallel]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str


def optimizer_update(p: Parts, corpus: IdCorpus, group: List[np.ndarray], tcfg, lr: float, tf: float,
                     stop: bool) -> Tuple[float, float, int, bool, bool]:
    """One update from the micro-batches `group` (each rank takes its share): returns (loss sum,
    NLL sum, target tokens, finite, stop requested on some rank), the same on every rank. A
    non-finite loss or gradient norm skips the parameter update (fp16: GradScaler's own skip)."""
    ctx, device = p.ctx, next(p.model.parameters()).device
    update_tokens = sum(n_target_tokens(corpus, g) for g in group)
    mine = group[ctx.rank::ctx.world]
    sums = torch.zeros(2, device=device)
    for k, idx in enumerate(mine):
        b = collate(corpus, idx, device)
        sync = p.ddp.no_sync() if p.ddp is not None and k < len(mine) - 1 else nullcontext()
        with sync:
            with autocast(device, p.precision):
                out = p.step_fn(b.src, b.src_len, b.tgt_in, b.tgt_out, tf)
            p.scaler.scale(out[0] * (ctx.world / update_tokens)).backward()
        sums += out.detach().float()
    for group_ in p.optimizer.param_groups:
        group_["lr"] = lr
    p.scaler.unscale_(p.optimizer)
    params = [q for q in p.model.parameters() if q.grad is not None]
    norm = (torch.nn.utils.clip_grad_norm_(params, tcfg.clip_norm) if tcfg.clip_norm > 0
            else torch.nn.utils.get_total_norm([q.grad for q in params]))
    # one all-reduce carries the losses, the stop requests and the norm's verdict: ranks agree
    loss_sum, nll_sum, stops, bad_norm = distributed.all_reduce_sum(
        ctx, sums.tolist() + [float(stop), float(not math.isfinite(float(norm)))])
    finite = math.isfinite(loss_sum) and (p.scaler.is_enabled() or bad_norm == 0)
    if finite or p.scaler.is_enabled():
        p.scaler.step(p.optimizer)
        p.scaler.update()
    p.optimizer.zero_grad(set_to_none=True)
    return loss_sum, nll_sum, update_tokens, finite, stops > 0


def start_over_or_resume(cfg, ctx, ckpts: "ckpt_io.RunCheckpoints", run_dir: Path, device):
    """force=true moves the old checkpoints (and metrics, curves) aside; stale temporary files
    go; then the newest loadable full checkpoint, or None for a new run."""
    if ctx.main:
        if cfg.force:
            moved = ckpts.move_aside()
            if moved is not None:
                for extra in ("metrics.jsonl", "tb"):
                    if (run_dir / extra).exists():
                        os.replace(run_dir / extra, moved / extra)
                log.info("train: force=true: the previous checkpoints, metrics and curves moved to %s", moved)
        for stale in ckpts.remove_temp_files():
            log.info("train: removed %s (a save that was interrupted)", stale)
    distributed.barrier(ctx)
    state, path, warnings = ckpts.resume_point(device)
    for w in warnings:
        log.warning("train: %s", w)
    return state, path


# --- the loop -----------------------------------------------------------------------------------

def train(cfg, run_dir: Path) -> Dict[str, Any]:
    """Train (or resume) the model of a run; returns the final progress record."""
    tcfg, run_dir = cfg.train, Path(run_dir)
    ctx = distributed.init(cfg.device)
    device = ctx.device
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    ckpt_dir = run_dir / "checkpoints"
    ckpts = ckpt_io.RunCheckpoints(ckpt_dir, keep=max(tcfg.keep_checkpoints, tcfg.average_last))
    state, resumed_from = start_over_or_resume(cfg, ctx, ckpts, run_dir, device)
    # decided once per run: a resumed run keeps the precision it started with (exact resume)
    precision = (state.get("precision") if state and tcfg.precision == "auto" else None) \
        or resolve_precision(tcfg.precision, device)
    precision = distributed.broadcast_object(ctx, precision)  # measured per rank: rank 0's decides

    tok = Tokenizer.from_dir(run_dir / "tokenizer")
    ids = run_dir / "tokenizer" / "ids"
    train_corpus, valid_corpus = IdCorpus(ids, "train"), IdCorpus(ids, "valid")
    from mt.data import load_split
    valid_refs = list(load_split(run_dir / "data", "valid")["tgt_raw"])
    model = build_model(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, seed=cfg.seed).to(device)
    loss_model = LossModel(model, tcfg.label_smoothing)
    opt_class = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for all parameters (4x less optimizer time than the per-op version on CPU)
    optimizer = opt_class(model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay,
                          fused=True)
    schedule = LRSchedule(tcfg)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")
    progress: Dict[str, Any] = {"step": 0, "epoch": 0, "epoch_step": 0, "elapsed": 0.0, "tokens": 0,
                                "best": None, "best_step": None, "bad_validations": 0,
                                "skipped": 0, "nonfinite": 0,  # skipped updates: in all, in a row now
                                "validated_at": -1}  # the step of the latest validation
    model_cfg, tokenizer_info = to_container(cfg.model), {
        "src": tok.src_proto, "tgt": tok.tgt_proto, "fingerprint": tok.fingerprint(),
        "src_vocab": tok.src_vocab_size, "tgt_vocab": tok.tgt_vocab_size}
    torch.manual_seed(cfg.seed * 1000 + ctx.rank)  # dropout differs between ranks
    if state is not None:
        ckpt_io.check_compatible(state, resumed_from, model_cfg, tok.fingerprint())
        ckpt_io.load_weights(model, state, resumed_from)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        progress.update({k: state.get(k, v) for k, v in progress.items()})
        progress["validated_at"] = state.get("validated_at", state["step"])  # older files: saved at validations
        if scaler.is_enabled() and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == ctx.world:
            ckpt_io.set_rng_state(state["rng"][ctx.rank])
        log.info("train: resumed from %s at step %d (epoch %d), precision %s", resumed_from, progress["step"],
                 progress["epoch"], precision)
    else:
        log.info("train: %s model, %d parameters, vocabulary %d -> %d, device %s x%d, precision %s",
                 cfg.model.cell, count_parameters(model), tok.src_vocab_size, tok.tgt_vocab_size,
                 device, ctx.world, precision)
    saved_step = progress["step"] if state is not None else None
    del state  # its tensors now live in the model and optimizer
    reason = stop_reason(tcfg, progress)
    validate_here = lambda: validate(model, valid_corpus, valid_refs, tok, device, precision,  # noqa: E731
                                     tcfg.valid_max_sentences)
    if reason:
        log.info("train: done (%s), skipped", reason)
        if tcfg.average_last > 1 and ctx.main:
            average_last(tcfg, model, ckpt_dir, progress, validate_here)
        return progress
    ddp = None
    if ctx.distributed:
        ddp = nn.parallel.DistributedDataParallel(loss_model, device_ids=[device.index] if device.type == "cuda" else None)
    parts = Parts(ctx, model, ddp if ddp is not None else loss_model, ddp, optimizer, scaler, precision)
    metrics = MetricsLog(run_dir, ctx.main, resume_step=saved_step or 0)

    def save(with_best: bool, step_file: bool = True) -> None:
        """Every rank calls it and ends it alike (a rank that raised alone would hang the others)."""
        nonlocal saved_step
        rng_states = distributed.gather_objects(ctx, ckpt_io.rng_state())
        bad = ckpt_io.first_nonfinite(model.state_dict())  # the replicas are identical
        if bad is not None:
            raise TrainingDiverged(f"training diverged at step {progress['step']}: {bad} is not finite, not saved; "
                                   f"{diverged_hint()}")
        failure = None
        if ctx.main:
            try:
                ckpts.save({"format": ckpt_io.CHECKPOINT_FORMAT, "model": model.state_dict(), **progress,
                            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                            "scaler": scaler.state_dict(), "rng": rng_states, "precision": precision,
                            "config": to_container(cfg), "model_config": model_cfg, "tokenizer": tokenizer_info},
                           best=with_best, step_file=step_file)
            except ckpt_io.CheckpointWriteError as e:
                failure = (e.errno, e.strerror)
        failure = distributed.broadcast_object(ctx, failure)
        if failure is not None:
            raise ckpt_io.CheckpointWriteError(*failure)
        saved_step = progress["step"]

    def diverged_hint() -> str:
        lower = [f"train.lr (now {tcfg.lr:g})"] + ([f"train.precision=fp32 (now {precision})"]
                                                   if precision != "fp32" else [])
        kept = f"{ckpts.last} (step {saved_step}) is the last finite state" if saved_step is not None \
            else "no checkpoint was saved"
        return f"try a lower {' or '.join(lower)}; {kept}"

    latest_valid_loss = [0.0]  # of the latest validation: a model that failed it is never saved

    def run_validation() -> None:
        t0, result = time.perf_counter(), None
        if ctx.main:
            result = validate_here()
        result = distributed.broadcast_object(ctx, result)
        value, latest_valid_loss[0] = result[tcfg.valid_metric], result["loss"]
        progress["validated_at"] = progress["step"]
        ok = savable(result["loss"])
        better = ok and improved(tcfg.valid_metric, value, progress["best"])
        if better:
            progress.update(best=value, best_step=progress["step"], bad_validations=0)
        else:
            progress["bad_validations"] += 1
        schedule.observe(better)
        progress["elapsed"] += time.perf_counter() - t0  # max_time bounds the wall clock
        metrics.write("valid", progress["step"], {k: v for k, v in result.items() if k != "bleu_signature"})
        log.info("valid step %d: loss %.3f ppl %.2f BLEU %.2f chrF %.2f%s  (greedy; %s)", progress["step"],
                 result["loss"], result["ppl"], result["bleu"], result["chrf"], " *" if better else "",
                 result["bleu_signature"])
        if ok:
            save(with_best=better)

    def savable(valid_loss: float = 0.0) -> bool:
        """Checkpoints hold models that trained finitely: never one right after a skipped update,
        nor one whose valid loss is not finite (huge but finite weights), so last.pt stays good."""
        if progress["nonfinite"] == 0 and math.isfinite(valid_loss):
            return True
        log.warning("step %d: not saved (%s); %s is kept", progress["step"], "the last update was not finite"
                    if progress["nonfinite"] else "the valid loss is not finite", ckpts.last)
        return False

    # Training loop, in pseudo-code:
    #   for each epoch, from the checkpoint's (epoch, epoch_step):
    #     batches = the epoch's batch list (a function of seed and epoch); skip the updates done
    #     for each update: accum_steps micro-batches on each of the world's ranks
    #       loss = label-smoothed cross-entropy summed / target tokens of the whole update
    #       backward (DDP averages over ranks), clip the gradient norm, set the lr, optimizer step
    #         (a non-finite loss or gradient norm skips it; train.max_nonfinite in a row stop the run)
    #       every log_every updates: log loss, perplexity, lr, target tokens/s
    #       every valid_every updates: validate, adjust the lr on plateau, save last (and best)
    #       on SIGINT/SIGTERM: save last, exit 130/143 (run again to resume)
    #       stop at max_steps / max_epochs / max_time / patience
    #   validate and save at the end if the last update was not validated
    per_update = ctx.world * tcfg.accum_steps
    # the bar shows the share done of whichever limit ends the run first, hence a true ETA
    batches = epoch_batches(train_corpus, tcfg, cfg.seed, progress["epoch"])  # the loop's first epoch
    bar = LimitBar(ctx, tcfg, progress, len(batches) // per_update)
    window = {"loss": 0.0, "nll": 0.0, "tokens": 0, "time": 0.0}
    model.train()
    redirect = nullcontext() if bar.disable else logging_redirect_tqdm([logging.getLogger("mt")])
    with redirect, StopRequest() as stop:
        while not reason:
            if batches is None:
                batches = epoch_batches(train_corpus, tcfg, cfg.seed, progress["epoch"])
            n_updates = len(batches) // per_update
            if n_updates == 0:
                raise ValueError(f"the train split makes {len(batches)} batches, fewer than one update needs "
                                 f"({per_update}): lower train.batch_tokens or train.accum_steps")
            for u in range(progress["epoch_step"], n_updates):
                t0 = time.perf_counter()
                lr, tf = schedule.lr(progress["step"] + 1), teacher_forcing_ratio(tcfg, progress["step"])
                loss_sum, nll_sum, update_tokens, finite, stopping = optimizer_update(
                    parts, train_corpus, batches[u * per_update:(u + 1) * per_update], tcfg, lr, tf,
                    stop.signum is not None)
                progress["step"] += 1
                progress["epoch_step"] = u + 1
                progress["tokens"] += update_tokens
                dt = time.perf_counter() - t0
                progress["elapsed"] += dt
                window["time"] += dt
                step = progress["step"]
                if finite:
                    progress["nonfinite"] = 0
                    window["loss"] += loss_sum
                    window["nll"] += nll_sum
                    window["tokens"] += update_tokens
                else:
                    progress["nonfinite"] += 1
                    progress["skipped"] += 1
                    log.warning("step %d: loss or gradient not finite, update skipped (%d in a row, %d in all)",
                                step, progress["nonfinite"], progress["skipped"])
                    metrics.write("train", step, {"skipped_updates": progress["skipped"]})
                    if progress["nonfinite"] >= tcfg.max_nonfinite:
                        raise TrainingDiverged(
                            f"training diverged at step {step}: the loss or gradients were not finite in "
                            f"{progress['nonfinite']} updates in a row (train.max_nonfinite={tcfg.max_nonfinite}); "
                            f"{diverged_hint()}")
                bar.update(progress)
                if (step % tcfg.log_every == 0 or step == 1) and window["tokens"]:
                    tps = window["tokens"] / max(window["time"], 1e-9)
                    loss, ppl = window["loss"] / window["tokens"], math.exp(min(window["nll"] / window["tokens"], 50))
                    bar.update(progress, loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    metrics.write("train", step, {"loss": loss, "ppl": ppl, "lr": lr, "tokens_per_s": tps,
                                                  "epoch": progress["epoch"], "tf_ratio": tf,
                                                  "skipped_updates": progress["skipped"]})
                    log.info("step %d epoch %d: loss %.3f ppl %.2f lr %.2e %s target tokens/s",
                             step, progress["epoch"], loss, ppl, lr, f"{tps:,.0f}")
                    window = {"loss": 0.0, "nll": 0.0, "tokens": 0, "time": 0.0}
                reason = stop_reason(tcfg, progress)
                if step % tcfg.valid_every == 0 or (reason and not reason.startswith("early")):
                    run_validation()
                    reason = stop_reason(tcfg, progress)
                if stopping:
                    bar.close()
                    signum = stop.signum or signal.SIGTERM  # another rank's signal
                    done = f"interrupted ({signal.Signals(signum).name}) at step {step}"
                    again = "run the same command without force=true to resume" if cfg.force \
                        else "run the same command to resume"
                    if saved_step != step and not savable(latest_valid_loss[0]):
                        kept = f"{ckpts.last} (step {saved_step}) kept" if saved_step is not None \
                            else "no checkpoint yet"
                        raise Interrupted(signum, f"{done}; not saved, {kept}; {again}")
                    if saved_step != step:
                        save(with_best=False, step_file=False)
                    raise Interrupted(signum, f"{done}; checkpoint saved; {again}")
                if reason:
                    break
            else:
                progress["epoch"] += 1
                progress["epoch_step"] = 0
                batches = None  # the next epoch's list
                reason = stop_reason(tcfg, progress)
    bar.close()
    if progress["validated_at"] != progress["step"]:
        run_validation()
    if tcfg.average_last > 1 and ctx.main:
        average_last(tcfg, model, ckpt_dir, progress, validate_here)
    metrics.close()
    log.info("train: stopped at step %d (%s); best valid %s %.2f at step %s; %.1f min, %d target tokens%s",
             progress["step"], reason, tcfg.valid_metric, progress["best"], progress["best_step"],
             progress["elapsed"] / 60, progress["tokens"],
             f"; {progress['skipped']} updates skipped (non-finite)" if progress["skipped"] else "")
    return progress
