"""The recurrent cells' equations, written once: every path that runs a recurrence step by step
(RecurrentDecoder.step in training and decoding, and mt.decoder_loop's hand-written backward)
calls `cell_step`; the whole-sequence paths use torch's own nn.GRU / nn.LSTM / nn.RNN (cuDNN on
CUDA), built by `make_rnn`, whose gate layout these functions follow.

    gx = x W_ih^T + b_ih;  gh = h W_hh^T + b_hh                    # batch x gates*hidden each
    gru  (gates r, z, n):  r, z = sigmoid(gx_rz + gh_rz);  n = tanh(gx_n + r * gh_n)
                           h' = (1 - z) n + z h
    lstm (gates i, f, g, o): c' = sigmoid(f) c + sigmoid(i) tanh(g);  h' = sigmoid(o) tanh(c')
    rnn_tanh / rnn_relu:   h' = tanh(gx + gh) / relu(gx + gh)

    h, c, saved = cell_step("gru", gx, gh, h, None)
    dgx, dgh, dh_direct, dc = cell_backward("gru", dh, None, saved)   # its derivative
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

GATES = {"gru": 3, "lstm": 4, "rnn_tanh": 1, "rnn_relu": 1}  # gate blocks per hidden unit


def make_rnn(cell: str, input_size: int, hidden: int, layers: int, dropout: float,
             bidirectional: bool = False) -> nn.RNNBase:
    """torch's fused recurrent layer for a `model.cell` name (it also holds the step's weights)."""
    kwargs = dict(num_layers=layers, batch_first=True, bidirectional=bidirectional,
                  dropout=dropout if layers > 1 else 0.0)
    if cell == "gru":
        return nn.GRU(input_size, hidden, **kwargs)
    if cell == "lstm":
        return nn.LSTM(input_size, hidden, **kwargs)
    if cell in ("rnn_tanh", "rnn_relu"):
        return nn.RNN(input_size, hidden, nonlinearity=cell[4:], **kwargs)
    raise ValueError(f"model.cell: unknown cell {cell!r}")


def cell_step(kind: str, gx: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]
              ) -> Tuple[Tensor, Optional[Tensor], tuple]:
    """One step from the pre-activations gx, gh (batch x gates*hidden) and the state h, c
    (batch x hidden; c for LSTM only). Returns h', c' and what `cell_backward` needs (references
    to tensors made anyway, so the forward-only paths pay nothing for it)."""
    n_h = h.shape[1]
    if kind == "gru":
        rz = torch.sigmoid(gx[:, :2 * n_h] + gh[:, :2 * n_h])
        r, z = rz[:, :n_h], rz[:, n_h:]
        gh_n = gh[:, 2 * n_h:]
        n = torch.tanh(torch.addcmul(gx[:, 2 * n_h:], r, gh_n))
        return torch.addcmul(n, z, h - n), None, (rz, n, gh_n, h)
    if kind == "lstm":
        pre = gx + gh
        gates = torch.sigmoid(pre)
        i, f, o = gates[:, :n_h], gates[:, n_h:2 * n_h], gates[:, 3 * n_h:]
        g = torch.tanh(pre[:, 2 * n_h:3 * n_h])
        c_new = torch.addcmul(f * c, i, g)
        tc = torch.tanh(c_new)
        return o * tc, c_new, (i, f, g, o, c, tc)
    if kind not in ("rnn_tanh", "rnn_relu"):
        raise ValueError(f"model.cell: unknown cell {kind!r}")
    pre = gx + gh
    h_new = torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)
    return h_new, None, (h_new,)


def cell_backward(kind: str, dh: Tensor, dc: Optional[Tensor], saved: tuple
                  ) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """The derivative of `cell_step`: from d h' (and d c' for LSTM) to (d gx, d gh, the part of
    d h that bypasses gh (GRU's z h; None otherwise), d c)."""
    if kind == "gru":
        rz, n, gh_n, h = saved
        n_h = h.shape[1]
        r, z = rz[:, :n_h], rz[:, n_h:]
        dn = dh * (1 - z) * (1 - n * n)
        dr = dn * gh_n * r * (1 - r)
        dz = dh * (h - n) * z * (1 - z)
        return torch.cat([dr, dz, dn], dim=1), torch.cat([dr, dz, dn * r], dim=1), dh * z, None
    if kind == "lstm":
        i, f, g, o, c, tc = saved
        dc = dc + dh * o * (1 - tc * tc)
        dpre = torch.cat([dc * g * i * (1 - i), dc * c * f * (1 - f), dc * i * (1 - g * g),
                          dh * tc * o * (1 - o)], dim=1)
        return dpre, dpre, None, dc * f
    (h_new,) = saved
    dpre = dh * (1 - h_new * h_new) if kind == "rnn_tanh" else dh * (h_new > 0)
    return dpre, dpre, None, None
