"""One training update, as mt-train runs it and mt-bench times it: the loss (mt/loss.py), the
optimizer, the gradient scaler and the DDP wrapper (`build_parts`), and `optimizer_update`:
forward and backward over an update's micro-batches, clip, set the lr, step.

    parts = build_parts(cfg.train, ctx, model, precision)
    loss_sum, nll_sum, tokens, finite, stop = optimizer_update(parts, corpus, group, cfg.train, lr, tf, False)
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from mt import distributed
from mt.batches import collate, n_target_tokens
from mt.loss import LossModel
from mt.model import Seq2Seq
from mt.precision import autocast
from mt.tokenizer import IdCorpus


def resolve_backward(choice: str, device: torch.device) -> str:
    """train.decoder_backward / loss_backward: auto -> handwritten on CPU (measured to pay there,
    BENCHMARKS.md), autograd elsewhere."""
    if choice != "auto":
        return choice
    return "handwritten" if device.type == "cpu" else "autograd"


@dataclass
class Parts:
    """What one update touches (`build_parts`): the same for training and for mt-bench."""
    ctx: distributed.Context
    model: Seq2Seq
    step_fn: nn.Module  # the LossModel, or its DistributedDataParallel wrapper
    ddp: Optional[nn.parallel.DistributedDataParallel]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: str


def build_parts(tcfg, ctx: distributed.Context, model: Seq2Seq, precision: str) -> Parts:
    """The loss, optimizer, gradient scaler and DDP wrapper of a model on ctx.device."""
    device = ctx.device
    loss_model = LossModel(model, tcfg.label_smoothing, resolve_backward(tcfg.decoder_backward, device),
                           resolve_backward(tcfg.loss_backward, device))
    opt_class = torch.optim.AdamW if tcfg.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for all parameters (4x less optimizer time than the per-op version on CPU)
    optimizer = opt_class(model.parameters(), lr=tcfg.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay,
                          fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16" and device.type == "cuda")
    ddp = None
    if ctx.distributed:
        ddp = nn.parallel.DistributedDataParallel(loss_model, device_ids=[device.index] if device.type == "cuda" else None)
    return Parts(ctx, model, ddp if ddp is not None else loss_model, ddp, optimizer, scaler, precision)


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
