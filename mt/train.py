"""The train stage: teacher forcing, validation (mt/validation.py), checkpoints, resume, several processes.

    mt-train recipe=multi30k_en_de stages=[train]              # resumes from checkpoints/last.pt
    mt-train recipe=multi30k_en_de train.max_time=10           # 10 minutes (summed over resumes)
    torchrun --nproc_per_node=2 -m mt.pipeline recipe=multi30k_en_de   # DDP: gloo on CPU, nccl on GPU
    train(cfg, run_dir)                                        # what the pipeline and tests call

Writes a run's (mt/rundir.py) checkpoints/{last,best,step_N}.pt, metrics.jsonl (one JSON object
per log line), tb/ (TensorBoard) and log lines to mt.log. Kill it at any moment and run it
again: it goes on from the last checkpoint, with the same batches, RNG states and optimizer state.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from mt import checkpoint as ckpt_io
from mt import distributed
from mt.batches import epoch_batches
from mt.config import to_container
from mt.interrupt import Interrupted, StopRequest
from mt.progress import LimitBar, MetricsLog
from mt.rundir import RunDir
from mt.model import build_model, count_parameters
from mt.precision import resolve_precision
from mt.schedule import LRSchedule, teacher_forcing_ratio
from mt.tokenizer import IdCorpus, Tokenizer
from mt.update import build_parts, optimizer_update
from mt.validation import average_last, improved, valid_scores

log = logging.getLogger("mt.train")

# --- helpers ------------------------------------------------------------------------------------

@dataclass
class Stop:
    """Why a run stops: `limit` for a budget (steps, epochs, time: the final update is validated
    then), not for early stopping (which a validation itself decided)."""
    why: str
    limit: bool = True


def stop_reason(cfg, progress: Dict[str, Any]) -> Optional[Stop]:
    if cfg.max_steps and progress["step"] >= cfg.max_steps:
        return Stop(f"reached train.max_steps={cfg.max_steps}")
    if cfg.max_epochs and progress["epoch"] >= cfg.max_epochs:
        return Stop(f"reached train.max_epochs={cfg.max_epochs}")
    if cfg.max_time and progress["elapsed"] >= cfg.max_time * 60:
        return Stop(f"reached train.max_time={cfg.max_time} minutes")
    if cfg.patience and progress["bad_validations"] >= cfg.patience:
        return Stop(f"early stopping: no improvement in {cfg.patience} validations", limit=False)
    return None


class TrainingDiverged(RuntimeError):
    """The loss or gradients stayed non-finite (or a model to be saved was): the run stops."""


def start_over_or_resume(cfg, ctx, ckpts: "ckpt_io.RunCheckpoints", run_dir: Path, device):
    """force=true moves the old checkpoints (and metrics, curves) aside; stale temporary files
    go; then the newest loadable full checkpoint, or None for a new run."""
    if ctx.main:
        if cfg.force:
            moved = ckpts.move_aside()
            if moved is not None:
                for extra in (RunDir.metrics, RunDir.tb):  # relative to a run's root
                    if (run_dir / extra).exists():
                        os.replace(run_dir / extra, moved / extra.name)
                log.info("train: force=true: the previous checkpoints, metrics and curves moved to %s", moved)
        for stale in ckpts.remove_temp_files():
            log.info("train: removed %s (a save that was interrupted)", stale)
    distributed.barrier(ctx)
    state, path, warnings = ckpts.resume_point(device)
    for w in warnings:
        log.warning("train: %s", w)
    return state, path


# --- one run ------------------------------------------------------------------------------------

class Trainer:
    """One run's training, in the pieces the loop below calls: setup (here), `step` (one update
    and its bookkeeping), `validate_and_save`, `interrupt` and `finish`."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.tcfg, self.run = cfg, cfg.train, RunDir(run_dir)
        tcfg = self.tcfg
        self.ctx = ctx = distributed.init(cfg.device)
        device = ctx.device
        if tcfg.threads:
            torch.set_num_threads(tcfg.threads)
        if tcfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.ckpts = ckpt_io.RunCheckpoints(self.run.checkpoints, keep=max(tcfg.keep_checkpoints, tcfg.average_last))
        state, resumed_from = start_over_or_resume(cfg, ctx, self.ckpts, self.run.root, device)
        # decided once per run: a resumed run keeps the precision it started with (exact resume)
        precision = (state.get("precision") if state and tcfg.precision == "auto" else None) \
            or resolve_precision(tcfg.precision, device)
        self.precision = distributed.broadcast_object(ctx, precision)  # measured per rank: rank 0's decides
        self.tok = tok = Tokenizer.from_dir(self.run.tokenizer)
        self.train_corpus, self.valid_corpus = IdCorpus(self.run.ids, "train"), IdCorpus(self.run.ids, "valid")
        from mt.data import load_split
        self.valid_refs = list(load_split(self.run.data, "valid")["tgt_raw"])
        self.model = build_model(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, seed=cfg.seed).to(device)
        self.parts = build_parts(tcfg, ctx, self.model, self.precision)
        self.schedule = LRSchedule(tcfg)
        self.progress: Dict[str, Any] = {
            "step": 0, "epoch": 0, "epoch_step": 0, "elapsed": 0.0, "tokens": 0,
            "best": None, "best_step": None, "bad_validations": 0,
            "skipped": 0, "nonfinite": 0,  # skipped updates: in all, in a row now
            "validated_at": -1}  # the step of the latest validation
        self.model_cfg = to_container(cfg.model)
        self.tokenizer_info = tok.checkpoint_record()
        torch.manual_seed(cfg.seed * 1000 + ctx.rank)  # dropout differs between ranks
        self.saved_step: Optional[int] = None  # the step last.pt holds
        if state is not None:
            self._restore(state, resumed_from)
        else:
            log.info("train: %s model, %d parameters, vocabulary %d -> %d, device %s x%d, precision %s",
                     cfg.model.cell, count_parameters(self.model), tok.src_vocab_size, tok.tgt_vocab_size,
                     device, ctx.world, self.precision)
        del state  # its tensors now live in the model and optimizer
        self.reason = stop_reason(tcfg, self.progress)
        self.per_update = ctx.world * tcfg.accum_steps
        self.latest_valid_loss = 0.0  # of the latest validation: a model that failed it is never saved
        self.window = {"loss": 0.0, "nll": 0.0, "tokens": 0, "time": 0.0}  # since the last log line
        self.metrics: Optional[MetricsLog] = None  # made by start(): a finished run writes none
        self.bar: Optional[LimitBar] = None

    def start(self, updates_per_epoch: int) -> None:
        """Before the first update: the metrics log (rows after the resumed step dropped) and the bar."""
        self.metrics = MetricsLog(self.run.root, self.ctx.main, resume_step=self.saved_step or 0)
        # the bar shows the share done of whichever limit ends the run first, hence a true ETA
        self.bar = LimitBar(self.ctx, self.tcfg, self.progress, updates_per_epoch)
        self.model.train()

    def _restore(self, state: Dict[str, Any], path: Path) -> None:
        ckpt_io.check_compatible(state, path, self.model_cfg, self.tok.fingerprint())
        ckpt_io.load_weights(self.model, state, path)
        p = self.parts
        p.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.progress.update({k: state.get(k, v) for k, v in self.progress.items()})
        self.progress["validated_at"] = state.get("validated_at", state["step"])  # older files: saved at validations
        if p.scaler.is_enabled() and "scaler" in state:
            p.scaler.load_state_dict(state["scaler"])
        if len(state["rng"]) == self.ctx.world:
            ckpt_io.set_rng_state(state["rng"][self.ctx.rank])
        self.saved_step = self.progress["step"]
        log.info("train: resumed from %s at step %d (epoch %d), precision %s", path, self.progress["step"],
                 self.progress["epoch"], self.precision)

    # --- checkpoints ------------------------------------------------------------------------------

    def save(self, with_best: bool, step_file: bool = True) -> None:
        """Every rank calls it and ends it alike (a rank that raised alone would hang the others)."""
        ctx, p = self.ctx, self.parts
        rng_states = distributed.gather_objects(ctx, ckpt_io.rng_state())
        bad = ckpt_io.first_nonfinite(self.model.state_dict())  # the replicas are identical
        if bad is not None:
            raise TrainingDiverged(f"training diverged at step {self.progress['step']}: {bad} is not finite, "
                                   f"not saved; {self.diverged_hint()}")
        failure = None
        if ctx.main:
            try:
                self.ckpts.save({"format": ckpt_io.CHECKPOINT_FORMAT, "model": self.model.state_dict(), **self.progress,
                                 "optimizer": p.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                                 "scaler": p.scaler.state_dict(), "rng": rng_states, "precision": self.precision,
                                 "config": to_container(self.cfg), "model_config": self.model_cfg,
                                 "tokenizer": self.tokenizer_info}, best=with_best, step_file=step_file)
            except ckpt_io.CheckpointWriteError as e:
                failure = (e.errno, e.strerror)
        failure = distributed.broadcast_object(ctx, failure)
        if failure is not None:
            raise ckpt_io.CheckpointWriteError(*failure)
        self.saved_step = self.progress["step"]

    def savable(self, valid_loss: float = 0.0) -> bool:
        """Checkpoints hold models that trained finitely: never one right after a skipped update,
        nor one whose valid loss is not finite (huge but finite weights), so last.pt stays good."""
        if self.progress["nonfinite"] == 0 and math.isfinite(valid_loss):
            return True
        log.warning("step %d: not saved (%s); %s is kept", self.progress["step"], "the last update was not finite"
                    if self.progress["nonfinite"] else "the valid loss is not finite", self.ckpts.last)
        return False

    def diverged_hint(self) -> str:
        lower = [f"train.lr (now {self.tcfg.lr:g})"] + ([f"train.precision=fp32 (now {self.precision})"]
                                                        if self.precision != "fp32" else [])
        kept = f"{self.ckpts.last} (step {self.saved_step}) is the last finite state" if self.saved_step is not None \
            else "no checkpoint was saved"
        return f"try a lower {' or '.join(lower)}; {kept}"

    # --- validation -------------------------------------------------------------------------------

    def scores(self) -> Dict[str, Any]:
        return valid_scores(self.model, self.valid_corpus, self.valid_refs, self.tok, self.ctx.device,
                            self.precision, self.tcfg.valid_max_sentences)

    def validate_and_save(self) -> None:
        """Validate (rank 0; every rank gets its result), adjust the lr on a plateau, save."""
        tcfg, progress = self.tcfg, self.progress
        t0, result = time.perf_counter(), None
        if self.ctx.main:
            result = self.scores()
        result = distributed.broadcast_object(self.ctx, result)
        value, self.latest_valid_loss = result[tcfg.valid_metric], result["loss"]
        progress["validated_at"] = progress["step"]
        ok = self.savable(result["loss"])
        better = ok and improved(tcfg.valid_metric, value, progress["best"])
        if better:
            progress.update(best=value, best_step=progress["step"], bad_validations=0)
        else:
            progress["bad_validations"] += 1
        self.schedule.observe(better)
        progress["elapsed"] += time.perf_counter() - t0  # max_time bounds the wall clock
        self.metrics.write("valid", progress["step"], {**{k: v for k, v in result.items() if k != "bleu_signature"},
                                                       "minutes": round(progress["elapsed"] / 60, 3)})
        log.info("valid step %d: loss %.3f ppl %.2f BLEU %.2f chrF %.2f%s  (greedy; %s)", progress["step"],
                 result["loss"], result["ppl"], result["bleu"], result["chrf"], " *" if better else "",
                 result["bleu_signature"])
        if ok:
            self.save(with_best=better)
        self.reason = stop_reason(tcfg, progress)

    # --- the update -------------------------------------------------------------------------------

    def step(self, group: List[np.ndarray], epoch_step: int, stop_requested: bool) -> bool:
        """One update from `group` and its bookkeeping; True when some rank was asked to stop."""
        progress, tcfg = self.progress, self.tcfg
        t0 = time.perf_counter()
        lr, tf = self.schedule.lr(progress["step"] + 1), teacher_forcing_ratio(tcfg, progress["step"])
        loss_sum, nll_sum, tokens, finite, stopping = optimizer_update(
            self.parts, self.train_corpus, group, tcfg, lr, tf, stop_requested)
        dt = time.perf_counter() - t0
        progress.update(step=progress["step"] + 1, epoch_step=epoch_step + 1, tokens=progress["tokens"] + tokens,
                        elapsed=progress["elapsed"] + dt)
        self.window["time"] += dt
        if finite:
            progress["nonfinite"] = 0
            for k, v in (("loss", loss_sum), ("nll", nll_sum), ("tokens", tokens)):
                self.window[k] += v
        else:
            self._skipped()
        self.bar.update(progress)
        if (progress["step"] % tcfg.log_every == 0 or progress["step"] == 1) and self.window["tokens"]:
            self._log_window(lr, tf)
        self.reason = stop_reason(tcfg, progress)
        return stopping

    def _skipped(self) -> None:
        progress, step = self.progress, self.progress["step"]
        progress["nonfinite"] += 1
        progress["skipped"] += 1
        log.warning("step %d: loss or gradient not finite, update skipped (%d in a row, %d in all)",
                    step, progress["nonfinite"], progress["skipped"])
        self.metrics.write("train", step, {"skipped_updates": progress["skipped"]})
        if progress["nonfinite"] >= self.tcfg.max_nonfinite:
            raise TrainingDiverged(
                f"training diverged at step {step}: the loss or gradients were not finite in "
                f"{progress['nonfinite']} updates in a row (train.max_nonfinite={self.tcfg.max_nonfinite}); "
                f"{self.diverged_hint()}")

    def _log_window(self, lr: float, tf: float) -> None:
        w, progress = self.window, self.progress
        tps = w["tokens"] / max(w["time"], 1e-9)
        loss, ppl = w["loss"] / w["tokens"], math.exp(min(w["nll"] / w["tokens"], 50))
        self.bar.update(progress, loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        self.metrics.write("train", progress["step"], {"loss": loss, "ppl": ppl, "lr": lr, "tokens_per_s": tps,
                                                       "epoch": progress["epoch"], "tf_ratio": tf,
                                                       "skipped_updates": progress["skipped"]})
        log.info("step %d epoch %d: loss %.3f ppl %.2f lr %.2e %s target tokens/s",
                 progress["step"], progress["epoch"], loss, ppl, lr, f"{tps:,.0f}")
        self.window = {"loss": 0.0, "nll": 0.0, "tokens": 0, "time": 0.0}

    def epoch_batches(self) -> List[np.ndarray]:
        batches = epoch_batches(self.train_corpus, self.tcfg, self.cfg.seed, self.progress["epoch"])
        if len(batches) < self.per_update:
            raise ValueError(f"the train split makes {len(batches)} batches, fewer than one update needs "
                             f"({self.per_update}): lower train.batch_tokens or train.accum_steps")
        return batches

    def next_epoch(self) -> None:
        self.progress.update(epoch=self.progress["epoch"] + 1, epoch_step=0)
        self.reason = stop_reason(self.tcfg, self.progress)

    # --- the end ----------------------------------------------------------------------------------

    def interrupt(self, signum: Optional[int]) -> None:
        """SIGINT/SIGTERM (on some rank): save last.pt unless it would hold a bad model; raise Interrupted."""
        self.bar.close()
        signum = signum or signal.SIGTERM  # another rank's signal
        step = self.progress["step"]
        done = f"interrupted ({signal.Signals(signum).name}) at step {step}"
        again = "run the same command without force=true to resume" if self.cfg.force else "run the same command to resume"
        if self.saved_step != step and not self.savable(self.latest_valid_loss):
            kept = f"{self.ckpts.last} (step {self.saved_step}) kept" if self.saved_step is not None else "no checkpoint yet"
            raise Interrupted(signum, f"{done}; not saved, {kept}; {again}")
        if self.saved_step != step:
            self.save(with_best=False, step_file=False)
        raise Interrupted(signum, f"{done}; checkpoint saved; {again}")

    def finish(self) -> Dict[str, Any]:
        """Validate the last update if it was not, average the last checkpoints, close the logs."""
        progress = self.progress
        if progress["validated_at"] != progress["step"]:
            self.validate_and_save()
        if self.tcfg.average_last > 1 and self.ctx.main:
            average_last(self.tcfg, self.model, self.run, progress, self.scores)
        self.metrics.close()
        log.info("train: stopped at step %d (%s); best valid %s %.2f at step %s; %.1f min, %d target tokens%s",
                 progress["step"], self.reason.why if self.reason else "", self.tcfg.valid_metric, progress["best"],
                 progress["best_step"], progress["elapsed"] / 60, progress["tokens"],
                 f"; {progress['skipped']} updates skipped (non-finite)" if progress["skipped"] else "")
        return progress


def train(cfg, run_dir: Path) -> Dict[str, Any]:
    """Train (or resume) the model of a run; returns the final progress record.

    for each epoch, from the checkpoint's (epoch, epoch_step):
      batches = the epoch's batch list (a function of seed and epoch); skip the updates done
      for each update (Trainer.step): accum_steps micro-batches on each of the world's ranks
        loss = label-smoothed cross-entropy summed / target tokens of the whole update
        backward (DDP averages over ranks), clip the gradient norm, set the lr, optimizer step
          (a non-finite loss or gradient norm skips it; train.max_nonfinite in a row stop the run)
        every log_every updates: log loss, perplexity, lr, target tokens/s
      every valid_every updates, and at a budget limit: validate, adjust the lr, save last (and best)
      on SIGINT/SIGTERM: save last, exit 130/143 (run again to resume)
      stop at max_steps / max_epochs / max_time / patience
    at the end: validate if the last update was not; average the last checkpoints (average_last)
    """
    t = Trainer(cfg, run_dir)
    if t.reason:
        log.info("train: done (%s), skipped", t.reason.why)
        if t.tcfg.average_last > 1 and t.ctx.main:
            average_last(t.tcfg, t.model, t.run, t.progress, t.scores)
        return t.progress
    per_update, valid_every = t.per_update, t.tcfg.valid_every
    batches = t.epoch_batches()
    t.start(len(batches) // per_update)
    redirect = nullcontext() if t.bar.disable else logging_redirect_tqdm([logging.getLogger("mt")])
    with redirect, StopRequest() as stop:
        while not t.reason:
            for u in range(t.progress["epoch_step"], len(batches) // per_update):
                stopping = t.step(batches[u * per_update:(u + 1) * per_update], u, stop.signum is not None)
                if t.progress["step"] % valid_every == 0 or (t.reason and t.reason.limit):
                    t.validate_and_save()
                if stopping:
                    t.interrupt(stop.signum)
                if t.reason:
                    break
            else:
                t.next_epoch()
                batches = t.epoch_batches() if not t.reason else batches
    t.bar.close()
    return t.finish()
