"""Attention: additive (Bahdanau; Luong's `concat` has the same form) and multiplicative (Luong's
`dot` and `general`), with padding masks.

Keys are projected once per batch (`project_keys`, Seq2Seq.encode), so a decoder step only
projects its query. The score and mixing functions are module-level, so the decoder's
hand-written loop (mt/decoder_loop.py) calls the same ones. Every call returns the weights, so
they can be inspected and plotted.

    keys = attn.project_keys(values)                       # values: batch x src_len x value_size
    context, weights = attn(query, keys, values, bias)     # query: batch x q or batch x T x q
    q = attn.project_query(query); attn.attend(q, keys, values, bias)   # the same, in two parts
    # context: batch [x T] x value_size; weights: batch [x T] x src_len, each row sums to 1
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive score bias from a validity mask: 0 where valid, -inf at padding (batch x src_len)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def energy_block_rows(src_len: int, size: int) -> int:
    """Rows of a B x S x A additive energy per block: about 1 MB of float32, so it stays in cache."""
    return max(1, (1 << 18) // max(1, src_len * size))


def additive_scores(keys: Tensor, q: Tensor, v: Tensor) -> Tensor:
    """v . tanh(keys + q) without autograd: keys B x S x A, q B x A (one projected query per
    source) or B x T x A (several: a sentence's beams), v A -> B x S or B x T x S. The energy
    is made a block of sources at a time, in place, in a buffer that stays in cache: written
    whole, it makes three passes over memory and was 4x slower (in beam search, this was a
    fifth of the time)."""
    batch, src_len, size = keys.shape
    q3 = q if q.dim() == 3 else q.unsqueeze(1)  # B x T x A
    per_source = q3.shape[1]
    rows = energy_block_rows(src_len * per_source, size)
    v = v.to(keys.dtype)
    out = keys.new_empty(batch, per_source, src_len)
    buf = keys.new_empty(min(rows, batch), per_source, src_len, size)
    for i in range(0, batch, rows):
        j = min(batch, i + rows)
        energy = torch.add(keys[i:j].unsqueeze(1), q3[i:j].unsqueeze(2), out=buf[:j - i]).tanh_()
        torch.matmul(energy, v, out=out[i:j])
    return out if q.dim() == 3 else out.squeeze(1)


def multiplicative_scores(keys: Tensor, q: Tensor) -> Tensor:
    """q . k for every source position: keys B x S x Q, q B x Q or B x T x Q -> B x S or B x T x S."""
    if q.dim() == 2:
        return torch.bmm(keys, q.unsqueeze(2)).squeeze(2)
    return torch.bmm(q, keys.transpose(1, 2))


def mix(scores: Tensor, bias: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
    """Masked softmax over the source and the weighted sum of the values: scores B x S or
    B x T x S, bias B x S (`mask_bias`), values B x S x C -> context B [x T] x C, weights B [x T] x S."""
    if scores.dim() == 2:
        weights = F.softmax(scores + bias, dim=-1)
        return torch.bmm(weights.unsqueeze(1), values).squeeze(1), weights
    weights = F.softmax(scores + bias.unsqueeze(1), dim=-1)
    return torch.bmm(weights, values), weights


class Attention(nn.Module):
    """Base class: subclasses define `project_keys`, `project_query` and `scores` (of a projected
    query); `attend` masks and mixes; `forward` = project the query, then attend."""

    def project_keys(self, values: Tensor) -> Tensor:
        raise NotImplementedError

    def project_query(self, query: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, q: Tensor, keys: Tensor) -> Tensor:
        raise NotImplementedError

    def attend(self, q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
        """q: a projected query, B x A (one step) or B x T x A (all steps); bias: B x S."""
        if q.dim() == 2 and q.shape[0] != keys.shape[0]:
            # decoding with `group` rows per source (EncoderOut.group, beam search): each source's
            # rows are its queries, so keys and values are read once per source, not per beam
            context, weights = self.attend(q.view(keys.shape[0], -1, q.shape[1]), keys, values, bias)
            return context.reshape(q.shape[0], -1), weights.reshape(q.shape[0], -1)
        batch, src_len = bias.shape
        assert q.shape[0] == batch and keys.shape[:2] == (batch, src_len), (
            f"attention shapes: query {tuple(q.shape)}, keys {tuple(keys.shape)}, mask {tuple(bias.shape)}")
        return mix(self.scores(q, keys), bias, values)

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
        return self.attend(self.project_query(query), keys, values, bias)


class AdditiveAttention(Attention):
    """score(q, k) = v . tanh(W_q q + W_k k)  (Bahdanau et al. 2015; Luong's `concat`)."""

    def __init__(self, query_size: int, value_size: int, attn_size: int):
        super().__init__()
        self.key_layer = nn.Linear(value_size, attn_size, bias=False)
        self.query_layer = nn.Linear(query_size, attn_size, bias=False)
        self.energy_layer = nn.Linear(attn_size, 1, bias=False)

    def project_keys(self, values: Tensor) -> Tensor:
        return self.key_layer(values)  # B x S x A

    def project_query(self, query: Tensor) -> Tensor:
        return self.query_layer(query)  # B [x T] x A

    def scores(self, q: Tensor, keys: Tensor) -> Tensor:
        v = self.energy_layer.weight[0]  # A
        if not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad or v.requires_grad)):
            return additive_scores(keys, q.to(keys.dtype), v)  # no autograd: blocked, in place
        if q.dim() == 2:
            return torch.tanh(keys + q.unsqueeze(1)) @ v.to(keys.dtype)  # B x S
        return torch.tanh(keys.unsqueeze(1) + q.unsqueeze(2)) @ v.to(keys.dtype)  # B x T x S


class MultiplicativeAttention(Attention):
    """Luong et al. 2015: `dot` score(q, k) = q . k; `general` score(q, k) = q . W k (W applied
    to the keys, once per batch)."""

    def __init__(self, query_size: int, value_size: int, general: bool):
        super().__init__()
        if not general and query_size != value_size:
            raise ValueError(f"dot attention needs query size {query_size} == value size {value_size}")
        self.key_layer = nn.Linear(value_size, query_size, bias=False) if general else None

    def project_keys(self, values: Tensor) -> Tensor:
        return values if self.key_layer is None else self.key_layer(values)  # B x S x Q

    def project_query(self, query: Tensor) -> Tensor:
        return query

    def scores(self, q: Tensor, keys: Tensor) -> Tensor:
        return multiplicative_scores(keys, q)


def build_attention(kind: str, query_size: int, value_size: int, attn_size: int) -> Attention:
    if kind in ("bahdanau", "concat"):
        return AdditiveAttention(query_size, value_size, attn_size)
    if kind in ("dot", "general"):
        return MultiplicativeAttention(query_size, value_size, general=kind == "general")
    raise ValueError(f"model.attention: unknown kind {kind!r}")
