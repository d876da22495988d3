"""Teacher forcing through the decoder with a hand-written backward (`train.decoder_backward`).

Autograd through a Python loop of T decoder steps records some forty small operations per step,
and computes every weight gradient T times as a thin product (inner dimension = batch) that it
then sums. Here the forward loop runs without recording and keeps what the backward pass needs;
the backward loop propagates only what flows from step to step; and each weight gradient is then
one large product over all T x batch rows, as cuDNN's RNN kernels do. The forward calls the same
cell and attention functions as RecurrentDecoder.step (mt/cells.py, mt/attention.py); the
backward is their derivative (`cell_backward`, `attention_backward`).

Covered (`covers`): one decoder layer, every cell, every attention, and both styles that need a
loop (Bahdanau; Luong with input feeding). tests/test_decoder_loop.py checks outputs and every
gradient against autograd through `step`.

Shapes: T steps, B batch, H hidden, G = gates * H, S source length, C encoder size, A attention
size (additive), D attentional vector size. Time-major stacks (T x B x ...) throughout.

    bahdanau:  q = h W_q^T;  c, a = attend(q);  gx = GX[t] + c W_f^T;  h = cell(gx, h W_hh^T + b_hh)
               -> outputs H (T x B x H), contexts (T x B x C), attention A (T x B x S)
    luong+if:  gx = GX[t] + f W_f^T;  h = cell(gx, h W_hh^T + b_hh);  c, a = attend(h [W_q^T])
               f = tanh((m * [h; c]) W_o^T + b_o)   (m: the dropout mask)  -> F (T x B x D), A
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from mt.attention import AdditiveAttention, additive_scores, energy_block_rows, mix, multiplicative_scores
from mt.cells import cell_backward, cell_step
from mt.dropout import dropout_mask


def covers(decoder) -> bool:
    """True where DecoderLoop computes what `step` in a loop computes."""
    return decoder.layers == 1 and not decoder.parallel


def teacher_forced(decoder, tgt_in: Tensor, state, enc):
    """RecurrentDecoder.forward through DecoderLoop: attentional vectors B x T x D, attention B x T x S."""
    p = decoder.products()
    gx = p.embed(tgt_in.t())  # T x B x G, one product for all steps
    empty = gx.new_empty(0)
    additive = isinstance(decoder.attention, AdditiveAttention)
    w_q = decoder.attention.query_layer.weight if additive else empty
    v = decoder.attention.energy_layer.weight.view(-1) if additive else empty
    c0 = state.cell[0] if state.cell is not None else empty
    rnn, device = decoder.rnn, tgt_in.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rnn.weight_hh_l0.dtype
    spec = (decoder.cell_kind, decoder.style, additive, compute)
    w_feed = rnn.weight_ih_l0[:, decoder.emb_size:]
    if decoder.style == "bahdanau":
        hidden, context, weights = DecoderLoop.apply(
            spec, gx, state.hidden[0], c0, empty, enc.keys, enc.outputs, enc.bias, rnn.weight_hh_l0,
            rnn.bias_hh_l0, w_feed, w_q, v, empty, empty, empty)
        att = torch.tanh(decoder.att_layer(decoder.dropout(torch.cat([hidden, context], dim=2))))
    else:
        mask = empty
        if decoder.training and decoder.dropout.p > 0:
            width = decoder.hidden_size + enc.outputs.shape[2]
            mask = dropout_mask((gx.shape[0], gx.shape[1], width), decoder.dropout.p, gx)
        att, _, weights = DecoderLoop.apply(
            spec, gx, state.hidden[0], c0, state.feed, enc.keys, enc.outputs, enc.bias, rnn.weight_hh_l0,
            rnn.bias_hh_l0, w_feed, w_q, v, decoder.att_layer.weight, decoder.att_layer.bias, mask)
    return att.transpose(0, 1), weights.transpose(0, 1)


# --- products in the compute dtype (bf16 under autocast); everything else in float32 -----------

def _mm(a: Tensor, w: Tensor) -> Tensor:
    """a @ w with w already in the compute dtype; the result in a's dtype."""
    return torch.mm(a, w) if w.dtype == a.dtype else torch.mm(a.to(w.dtype), w).to(a.dtype)


def _addmm(bias: Tensor, a: Tensor, w: Tensor) -> Tensor:
    return torch.addmm(bias, a, w) if w.dtype == a.dtype else torch.mm(a.to(w.dtype), w).to(a.dtype).add_(bias)


def _wgrad(d: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """d^T x over all rows (a weight gradient), in the compute dtype; result in d's dtype."""
    if dtype == d.dtype:
        return torch.mm(d.t(), x)
    return torch.mm(d.t().to(dtype), x.to(dtype)).to(d.dtype)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def attention_backward(additive: bool, dctx: Tensor, da_extra: Optional[Tensor], a: Tensor, q: Tensor,
                       keys: Tensor, values: Tensor, v: Tensor, dkeys: Optional[Tensor], dv: Optional[Tensor]):
    """The derivative of `mix(scores(q, keys), bias, values)` for one step: returns (d q, d scores)
    and accumulates the additive attention's dkeys and dv. The products that only accumulate over
    steps (d values = sum_t a_t^T dctx_t; the multiplicative d keys = sum_t ds_t^T q_t) are left to
    the caller, as one batched product over all steps. The additive energy (B x S x A per step) is
    recomputed in cache-sized row blocks, as additive_scores makes it, rather than kept from the
    forward pass: keeping it for every step was the largest part of a training step's memory."""
    da = torch.bmm(values, dctx.unsqueeze(2)).squeeze(2)  # B x S
    if da_extra is not None:
        da = da + da_extra
    ds = a * (da - (a * da).sum(dim=1, keepdim=True))
    if not additive:
        return torch.bmm(ds.unsqueeze(1), keys).squeeze(1), ds
    batch, src_len, size = keys.shape
    rows = energy_block_rows(src_len, size)
    buf = keys.new_empty(min(rows, batch), src_len, size)
    dq = q.new_empty(batch, size)
    for i in range(0, batch, rows):
        j = min(batch, i + rows)
        energy = torch.add(keys[i:j], q[i:j].unsqueeze(1), out=buf[:j - i]).tanh_()
        dv.add_(torch.mm(ds[i:j].reshape(1, -1), energy.reshape(-1, size)).squeeze(0))
        dpre = energy.mul_(energy).neg_().add_(1).mul_(v).mul_(ds[i:j].unsqueeze(2))  # ds v (1 - e^2)
        dkeys[i:j].add_(dpre)
        torch.sum(dpre, dim=1, out=dq[i:j])
    return dq, ds


def _attend(additive: bool, q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, v: Tensor):
    scores = additive_scores(keys, q, v) if additive else multiplicative_scores(keys, q)
    return mix(scores, bias, values)


class DecoderLoop(torch.autograd.Function):
    """See the module docstring. `spec` = (cell, style, additive, compute dtype); unused inputs
    are empty tensors."""

    @staticmethod
    def forward(ctx, spec, gx_emb, h0, c0, feed0, keys, values, bias, w_hh, b_hh, w_f, w_q, v, w_o, b_o, mask):
        wdt = w_hh.dtype  # states and elementwise work stay in the parameters' dtype
        with torch.autocast(gx_emb.device.type, enabled=False):
            cast = [t.to(wdt) for t in (gx_emb, h0, c0, feed0, keys, values, bias)]
            return DecoderLoop._forward(ctx, spec, *cast, w_hh, b_hh, w_f, w_q, v, w_o, b_o, mask)

    @staticmethod
    def _forward(ctx, spec, gx_emb, h0, c0, feed0, keys, values, bias, w_hh, b_hh, w_f, w_q, v, w_o, b_o, mask):
        cell, style, additive, cdt = spec
        luong = style == "luong"
        # one product per step for everything that reads h_prev (bahdanau + additive: the query too)
        fuse_q = additive and not luong
        w1 = torch.cat([w_hh, w_q]) if fuse_q else w_hh
        b1 = torch.cat([b_hh, b_hh.new_zeros(w_q.shape[0])]) if fuse_q else b_hh
        w1_t, w_f_t = w1.to(cdt).t(), w_f.to(cdt).t()
        w_q_t = w_q.to(cdt).t() if additive else None
        w_o_t = w_o.to(cdt).t() if luong else None
        h, c, feed = h0, (c0 if cell == "lstm" else None), feed0
        hs, outs, attns, feeds, saved, queries, units = [], [], [], [], [], [], []
        for t in range(gx_emb.shape[0]):
            g1 = _addmm(b1, h, w1_t)
            gh = g1[:, :w_hh.shape[0]]
            if not luong:
                q = g1[:, w_hh.shape[0]:] if additive else h
                context, a = _attend(additive, q, keys, values, bias, v)
                gx = _addmm(gx_emb[t], context, w_f_t)
            else:
                gx = _addmm(gx_emb[t], feed, w_f_t)
            h_new, c_new, kept = cell_step(cell, gx, gh, h, c)
            if luong:
                q = _mm(h_new, w_q_t) if additive else h_new
                context, a = _attend(additive, q, keys, values, bias, v)
                unit = torch.cat([h_new, context], dim=1)
                unit = unit * mask[t] if mask.numel() else unit
                feeds.append(feed)
                feed = torch.tanh(_addmm(b_o, unit, w_o_t))
                units.append(unit)
                outs.append(feed)  # the output of a luong step is its attentional vector
            else:
                outs.append(context)
            hs.append(h)
            saved.append(kept)
            queries.append(q)
            attns.append(a)
            h, c = h_new, c_new
        hs.append(h)
        H, A, out = torch.stack(hs), torch.stack(attns), torch.stack(outs)  # H: h_0 .. h_T
        ctx.spec, ctx.cells, ctx.queries = spec, saved, queries
        stack = lambda xs: torch.stack(xs) if luong else out.new_empty(0)  # noqa: E731
        ctx.save_for_backward(H, A, out, keys, values, w_hh, w_f, w_q, v, w_o, mask, stack(feeds), stack(units))
        return (out, out.new_empty(0), A) if luong else (H[1:], out, A)

    @staticmethod
    def backward(ctx, d_first, d_second, d_attn):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return DecoderLoop._backward(ctx, d_first, d_second, d_attn)

    @staticmethod
    def _backward(ctx, d_first, d_second, d_attn):
        cell, style, additive, cdt = ctx.spec
        H, A, out, keys, values, w_hh32, w_f32, w_q32, v, w_o32, mask, feeds, units = ctx.saved_tensors
        wdt = w_hh32.dtype
        g = _Grads(ctx.spec, H, A, keys, values, v, feeds)
        g.d_first = d_first.to(wdt) if d_first is not None else None
        g.d_second = d_second.to(wdt) if d_second is not None and d_second.numel() else None
        g.d_attn = d_attn.to(wdt) if d_attn is not None else None
        w_hh, w_f = w_hh32.to(cdt), w_f32.to(cdt)
        w_q = w_q32.to(cdt) if additive else w_q32
        w_o = w_o32.to(cdt) if style == "luong" else w_o32
        w1 = torch.cat([w_hh, w_q]) if additive and style != "luong" else None
        for t in reversed(range(A.shape[0])):
            if style == "luong":
                g.luong_step(t, ctx.cells[t], ctx.queries[t], out[t], mask, w_hh, w_f, w_q, w_o)
            else:
                g.bahdanau_step(t, ctx.cells[t], ctx.queries[t], w_hh, w_f, w1)
        grads = g.weight_grads(ctx.queries, out, units, cdt)
        ctx.cells = ctx.queries = None
        return (None, g.dgx, g.dh, g.dc, g.dfeed) + grads


class _Grads:
    """What DecoderLoop's backward carries between steps and collects for the batched products."""

    def __init__(self, spec, H: Tensor, A: Tensor, keys: Tensor, values: Tensor, v: Tensor, feeds: Tensor):
        cell, style, additive, _ = spec
        self.cell, self.additive, self.H, self.A, self.keys, self.values, self.v = cell, additive, H, A, keys, values, v
        self.feeds = feeds
        steps, batch = A.shape[0], H.shape[1]
        self.dkeys = torch.zeros_like(keys) if additive else None  # multiplicative: one product after
        self.d_v = torch.zeros_like(v) if additive else None
        self.dh = torch.zeros_like(H[0])
        self.dc = torch.zeros_like(H[0]) if cell == "lstm" else None
        self.dfeed = torch.zeros_like(feeds[0]) if style == "luong" else None
        self.gate_rows = (steps, batch)
        self.dgx: Optional[Tensor] = None
        self.dgh: Optional[Tensor] = None
        self.dctx = torch.empty(steps, batch, values.shape[2], dtype=H.dtype, device=H.device)  # T x B x C
        self.ds = None if additive else torch.empty_like(A)  # T x B x S
        self.dq: List[Tensor] = []
        self.dpo: List[Tensor] = []
        self.d_first = self.d_second = self.d_attn = None  # the incoming gradients (T x B x ...)

    def _store(self, t: int, dgx: Tensor, dgh: Tensor, dctx: Tensor, ds: Tensor, dq: Tensor) -> None:
        if self.dgx is None:
            self.dgx = dgx.new_empty(*self.gate_rows, dgx.shape[1])
            self.dgh = torch.empty_like(self.dgx)
        self.dgx[t], self.dgh[t], self.dctx[t] = dgx, dgh, dctx
        if self.ds is not None:
            self.ds[t] = ds
        if self.additive:
            self.dq.append(dq)

    def _attention(self, t: int, dctx: Tensor, q: Tensor):
        da_extra = self.d_attn[t] if self.d_attn is not None else None
        return attention_backward(self.additive, dctx, da_extra, self.A[t], q, self.keys, self.values, self.v,
                                  self.dkeys, self.d_v)

    def bahdanau_step(self, t: int, saved, q: Tensor, w_hh: Tensor, w_f: Tensor, w1: Optional[Tensor]) -> None:
        dh_new = self.dh + (self.d_first[t] if self.d_first is not None else 0)
        dgx, dgh, dh_cell, self.dc = cell_backward(self.cell, dh_new, self.dc, saved)
        dctx = _mm(dgx, w_f) + (self.d_second[t] if self.d_second is not None else 0)
        dq, ds = self._attention(t, dctx, q)
        self.dh = _mm(torch.cat([dgh, dq], dim=1), w1) if self.additive else _mm(dgh, w_hh) + dq
        if dh_cell is not None:
            self.dh = self.dh + dh_cell
        self._store(t, dgx, dgh, dctx, ds, dq)

    def luong_step(self, t: int, saved, q: Tensor, out_t: Tensor, mask: Tensor, w_hh: Tensor, w_f: Tensor,
                   w_q: Tensor, w_o: Tensor) -> None:
        dfo = self.dfeed + (self.d_first[t] if self.d_first is not None else 0)
        dpo = dfo * (1 - out_t * out_t)  # through tanh
        self.dpo.append(dpo)
        dunit = _mm(dpo, w_o)
        if mask.numel():
            dunit = dunit * mask[t]
        n_h = self.H.shape[2]
        dh_top, dctx = dunit[:, :n_h], dunit[:, n_h:]
        dq, ds = self._attention(t, dctx, q)
        dh_new = self.dh + dh_top + (_mm(dq, w_q) if self.additive else dq)
        dgx, dgh, dh_cell, self.dc = cell_backward(self.cell, dh_new, self.dc, saved)
        self.dfeed = _mm(dgx, w_f)
        self.dh = _mm(dgh, w_hh) if dh_cell is None else _addmm(dh_cell, dgh, w_hh)
        self._store(t, dgx, dgh, dctx, ds, dq)

    def weight_grads(self, queries: List[Tensor], out: Tensor, units: Tensor, cdt: torch.dtype):
        """What only accumulates over steps, as one large product each over all T x B rows:
        d values = A^T DCTX per sentence (S x T times T x C); multiplicative d keys = DS^T Q."""
        A, H, luong = self.A, self.H, self.dfeed is not None
        dvalues = torch.bmm(A.permute(1, 2, 0), self.dctx.transpose(0, 1))
        dkeys = self.dkeys
        if self.ds is not None:
            dkeys = torch.bmm(self.ds.permute(1, 2, 0), torch.stack(queries).transpose(0, 1))
        d_w_hh = _wgrad(_flat(self.dgh), _flat(H[:-1]), cdt)
        d_b_hh = _flat(self.dgh).sum(0)
        d_w_f = _wgrad(_flat(self.dgx), _flat(self.feeds if luong else out), cdt)  # what W_f multiplied
        d_w_q = d_w_o = d_b_o = None
        if self.additive:
            d_w_q = _wgrad(_flat(torch.stack(self.dq[::-1])), _flat(H[1:] if luong else H[:-1]), cdt)
        if luong:
            dpo = torch.stack(self.dpo[::-1])
            d_w_o, d_b_o = _wgrad(_flat(dpo), _flat(units), cdt), _flat(dpo).sum(0)
        return (dkeys, dvalues, None, d_w_hh, d_b_hh, d_w_f, d_w_q, self.d_v, d_w_o, d_b_o, None)
