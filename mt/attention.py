"""Attention: additive (Bahdanau; Luong's `concat` has the same form) and multiplicative (Luong's
`dot` and `general`), with padding masks.

Keys are projected once per batch (`project_keys`, called by the encoder wrapper), so a decoder
step only projects its query. Every call returns the weights so they can be inspected and plotted.

    keys = attn.project_keys(values)                       # values: batch x src_len x value_size
    context, weights = attn(query, keys, values, bias)     # query: batch x q or batch x T x q
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


def float32_decode_attention(device_type: str) -> bool:
    """True while decoding (no autograd) under autocast: a step's attention is matrix-vector work,
    bound by memory, not arithmetic; bf16 there only adds casts (and bf16 tanh is slow on CPUs),
    so it runs in the parameters' dtype. Seq2Seq.encode casts keys and values for it once per
    batch; Attention.forward runs the step with autocast off."""
    return not torch.is_grad_enabled() and torch.is_autocast_enabled(device_type)


class Attention(nn.Module):
    """Base class: subclasses define `project_keys` and `scores`; `forward` masks and mixes."""

    def project_keys(self, values: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, query: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
        """query: B x Q (one step) or B x T x Q (all steps); bias: B x S from `mask_bias`."""
        if query.dim() == 2 and float32_decode_attention(query.device.type):
            with torch.autocast(query.device.type, enabled=False):
                return self.forward(query.to(values.dtype), keys.to(values.dtype), values, bias.to(values.dtype))
        if query.dim() == 2 and query.shape[0] != keys.shape[0]:
            # decoding with `group` rows per source (EncoderOut.group, beam search): each source's
            # rows are its queries, so keys and values are read once per source, not per beam
            sources, width = keys.shape[0], query.shape[1]
            context, weights = self.forward(query.view(sources, -1, width), keys, values, bias)
            return context.reshape(query.shape[0], -1), weights.reshape(query.shape[0], -1)
        batch, src_len = bias.shape
        assert query.shape[0] == batch and keys.shape[:2] == (batch, src_len), (
            f"attention shapes: query {tuple(query.shape)}, keys {tuple(keys.shape)}, mask {tuple(bias.shape)}")
        scores = self.scores(query, keys)  # B x S  or  B x T x S
        if query.dim() == 2:
            weights = F.softmax(scores + bias, dim=-1)
            context = torch.bmm(weights.unsqueeze(1), values).squeeze(1)  # B x C
        else:
            weights = F.softmax(scores + bias.unsqueeze(1), dim=-1)
            context = torch.bmm(weights, values)  # B x T x C
        return context, weights


class AdditiveAttention(Attention):
    """score(q, k) = v . tanh(W_q q + W_k k)  (Bahdanau et al. 2015; Luong's `concat`)."""

    def __init__(self, query_size: int, value_size: int, attn_size: int):
        super().__init__()
        self.key_layer = nn.Linear(value_size, attn_size, bias=False)
        self.query_layer = nn.Linear(query_size, attn_size, bias=False)
        self.energy_layer = nn.Linear(attn_size, 1, bias=False)

    def project_keys(self, values: Tensor) -> Tensor:
        return self.key_layer(values)  # B x S x A

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        q = self.query_layer(query)
        if not (torch.is_grad_enabled() and (q.requires_grad or keys.requires_grad)):  # no autograd
            w = self.energy_layer.weight
            w = w if isinstance(w, Tensor) else w().dequantize()  # int8 (mt.inference): a method
            return additive_scores(keys, q.to(keys.dtype), w[0])
        if query.dim() == 2:
            energy = torch.tanh(keys + q.unsqueeze(1))  # B x S x A
        else:
            energy = torch.tanh(keys.unsqueeze(1) + q.unsqueeze(2))  # B x T x S x A
        return self.energy_layer(energy).squeeze(-1)


class MultiplicativeAttention(Attention):
    """Luong et al. 2015: `dot` score(q, k) = q . k; `general` score(q, k) = q . W k."""

    def __init__(self, query_size: int, value_size: int, general: bool):
        super().__init__()
        if not general and query_size != value_size:
            raise ValueError(f"dot attention needs query size {query_size} == value size {value_size}")
        self.key_layer = nn.Linear(value_size, query_size, bias=False) if general else None

    def project_keys(self, values: Tensor) -> Tensor:
        return values if self.key_layer is None else self.key_layer(values)  # B x S x Q

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        if query.dim() == 2:
            return torch.bmm(keys, query.unsqueeze(2)).squeeze(2)  # B x S
        return torch.bmm(query, keys.transpose(1, 2))  # B x T x S


def build_attention(kind: str, query_size: int, value_size: int, attn_size: int) -> Attention:
    if kind in ("bahdanau", "concat"):
        return AdditiveAttention(query_size, value_size, attn_size)
    if kind in ("dot", "general"):
        return MultiplicativeAttention(query_size, value_size, general=kind == "general")
    raise ValueError(f"model.attention: unknown kind {kind!r}")
