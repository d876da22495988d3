"""What a training run shows while it runs: metrics.jsonl and TensorBoard scalars (`MetricsLog`),
and a progress bar over whichever limit ends the run first (`LimitBar`).

    metrics = MetricsLog(run_dir, enabled=ctx.main, resume_step=step)   # drops rows after `step`
    metrics.write("train", step, {"loss": 3.2, "lr": 1e-3})
    bar = LimitBar(ctx, cfg.train, progress, updates_per_epoch); bar.update(progress, loss="3.2")
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from mt.rundir import RunDir, write_text_atomic

log = logging.getLogger("mt.train")


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
        run = RunDir(run_dir)
        self.enabled, self.path, self.writer = enabled, run.metrics, None
        if enabled and resume_step is not None and self.path.exists():
            rows = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [r for r, step in zip(rows, map(_row_step, rows)) if step is not None and step <= resume_step]
            if kept != rows:
                write_text_atomic(self.path, "".join(kept))
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(run.tb), purge_step=purge)
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
