"""Dropout whose random numbers are cheap on the CPU.

torch's dropout draws one random number per element (bernoulli_), and on the CPU the drawing
is most of its cost: for a 20 x 64 x 1024 tensor (a training step's worth of the Luong loop's
mask for bench_gru) 10.4 ms for bernoulli_, 13.0 for F.dropout, against 1.7 ms when one random
64-bit word masks eight elements (2 threads; BENCHMARKS.md, 2026-12-02). Elsewhere (GPUs draw
cheaply) both are torch's own.

    mask = dropout_mask(shape, p, like)    # 0 or 1 / keep, as a tensor to multiply by
    layer = Dropout(p)                     # nn.Dropout with that mask on the CPU
    tokens = word_dropout(tokens, p)       # pieces -> <unk> with probability p (specials kept)
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor, nn

from mt.tokenizer import EOS_ID, UNK_ID


def keep_mask(shape, p: float, device) -> Tuple[Tensor, float]:
    """A keep mask (bool) and its scale, one random 64-bit word per eight elements; the keep
    probability is rounded to a multiple of 1/256."""
    n = int(torch.Size(shape).numel())
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=device)
    threshold = max(1, round((1 - p) * 256))  # keep probability in steps of 1/256
    return words.view(torch.uint8)[:n].view(shape) < threshold, 256.0 / threshold


def dropout_mask(shape, p: float, like: Tensor) -> Tensor:
    """nn.Dropout's mask as a tensor (like's dtype and device) to multiply by: 0 or 1 / keep."""
    if like.device.type != "cpu":
        return torch.empty(shape, device=like.device, dtype=like.dtype).bernoulli_(1 - p).div_(1 - p)
    keep, scale = keep_mask(shape, p, like.device)
    return keep.to(like.dtype).mul_(scale)


class Dropout(nn.Dropout):
    """nn.Dropout; in training on the CPU, with keep_mask's cheap mask (autograd multiplies the
    gradient by the same bool mask; it keeps one byte per element, as torch's does)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        keep, scale = keep_mask(x.shape, self.p, x.device)
        return x.mul(keep).mul_(scale)


def word_dropout(tokens: Tensor, p: float) -> Tensor:
    """tokens: batch x len ids -> a copy where each piece (an id above the specials: padding,
    BOS and EOS stay) is <unk> with probability p. A new tensor; `tokens` is not changed."""
    if p == 0:
        return tokens
    drop = (torch.rand(tokens.shape, device=tokens.device) < p) & (tokens > EOS_ID)
    return tokens.masked_fill(drop, UNK_ID)
