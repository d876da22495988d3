"""Schedules over training steps: the learning rate (warmup, decay, reduce on plateau) and the
teacher-forcing ratio of scheduled sampling.

    schedule = LRSchedule(cfg.train); lr = schedule.lr(step); schedule.observe(improved)
    tf = teacher_forcing_ratio(cfg.train, step)   # 1.0 = always feed the reference token

torch.optim.lr_scheduler has the pieces, but not plateau halving applied on top of a warmup
shape with its floor; this is that, with its state saved in checkpoints (exact resume).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict

log = logging.getLogger("mt.train")


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
