"""The decoder's training loop with a hand-written backward pass (the speed path).

Autograd through a Python loop of T decoder steps records some forty small operations per step,
and computes every weight gradient T times as a thin product (inner dimension = batch) that it
then sums. Here the forward loop runs without recording and keeps what the backward pass needs;
the backward loop propagates only what flows from step to step; and each weight gradient is then
one large product over all T x batch rows, as cuDNN's RNN kernels do.

Covered: one decoder layer, every cell, every attention, and both styles that need a loop
(Bahdanau; Luong with input feeding). RecurrentDecoder.forward falls back to the autograd loop
for anything else, and tests/test_fused.py checks outputs and every gradient against it.

Shapes: T steps, B batch, H hidden, G = gates * H, S source length, C encoder size, A attention
size (additive), D attentional vector size. Time-major stacks (T x B x ...) throughout.

    bahdanau:  q = h W_q^T;  a = softmax(score(q, K) + bias);  c = a V;  gx = GX[t] + c W_f^T
               h = cell(gx, h W_hh^T + b_hh)            -> outputs H (T x B x H), CTX (T x B x C), A
    luong+if:  gx = GX[t] + f W_f^T;  h = cell(gx, h W_hh^T + b_hh);  a, c = attn(h)
               f = tanh((m * [h; c]) W_o^T + b_o)       -> outputs F (T x B x D), A
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from mt.attention import additive_scores, energy_block_rows


# --- matrix products in the compute dtype (bf16 under autocast), everything else in float32 -----

def _mm(a: Tensor, w: Tensor) -> Tensor:
    """a @ w with w already in the compute dtype; the result in a's dtype."""
    if w.dtype == a.dtype:
        return torch.mm(a, w)
    return torch.mm(a.to(w.dtype), w).to(a.dtype)


def _addmm(bias: Tensor, a: Tensor, w: Tensor) -> Tensor:
    if w.dtype == a.dtype:
        return torch.addmm(bias, a, w)
    return torch.mm(a.to(w.dtype), w).to(a.dtype).add_(bias)


def _wgrad(d: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """d^T x over all rows (a weight gradient), in the compute dtype; result in d's dtype."""
    if dtype == d.dtype:
        return torch.mm(d.t(), x)
    return torch.mm(d.t().to(dtype), x.to(dtype)).to(d.dtype)


# --- cells: forward keeps what backward needs ---------------------------------------------------

def cell_forward(kind: str, gx: Tensor, gh: Tensor, h: Tensor, c: Optional[Tensor]):
    """Returns h', c' and the saved tensors of one step."""
    if kind == "gru":
        n_h = h.shape[1]
        rz = torch.sigmoid(gx[:, :2 * n_h] + gh[:, :2 * n_h])
        r, z = rz[:, :n_h], rz[:, n_h:]
        gh_n = gh[:, 2 * n_h:]
        n = torch.tanh(torch.addcmul(gx[:, 2 * n_h:], r, gh_n))
        h_new = torch.addcmul(n, z, h - n)
        return h_new, None, (rz, n, gh_n, h)
    if kind == "lstm":  # gate order i, f, g, o
        pre = gx + gh
        n_h = h.shape[1]
        gates = torch.sigmoid(pre)
        i, f, o = gates[:, :n_h], gates[:, n_h:2 * n_h], gates[:, 3 * n_h:]
        g = torch.tanh(pre[:, 2 * n_h:3 * n_h])
        c_new = torch.addcmul(f * c, i, g)
        tc = torch.tanh(c_new)
        return o * tc, c_new, (i, f, g, o, c, tc)
    pre = gx + gh
    h_new = torch.tanh(pre) if kind == "rnn_tanh" else torch.relu(pre)
    return h_new, None, (h_new,)


def cell_backward(kind: str, dh: Tensor, dc: Optional[Tensor], saved):
    """Gradients of one step: (d gx, d gh, d h_prev through the cell's own path or None, d c_prev)."""
    if kind == "gru":
        rz, n, gh_n, h = saved
        n_h = h.shape[1]
        r, z = rz[:, :n_h], rz[:, n_h:]
        dn = dh * (1 - z) * (1 - n * n)
        dr = dn * gh_n * r * (1 - r)
        dz = dh * (h - n) * z * (1 - z)
        dgx = torch.cat([dr, dz, dn], dim=1)
        dgh = torch.cat([dr, dz, dn * r], dim=1)
        return dgx, dgh, dh * z, None
    if kind == "lstm":
        i, f, g, o, c, tc = saved
        dc = dc + dh * o * (1 - tc * tc)
        dpre = torch.cat([dc * g * i * (1 - i), dc * c * f * (1 - f), dc * i * (1 - g * g),
                          dh * tc * o * (1 - o)], dim=1)
        return dpre, dpre, None, dc * f
    (h_new,) = saved
    dpre = dh * (1 - h_new * h_new) if kind == "rnn_tanh" else dh * (h_new > 0)
    return dpre, dpre, None, None


# --- attention ----------------------------------------------------------------------------------

def attn_forward(additive: bool, q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, v: Optional[Tensor]):
    """q: B x A (additive: the projected query) or B x H; returns context and weights."""
    if additive:
        scores = additive_scores(keys, q, v) + bias  # B x S
    else:
        scores = torch.baddbmm(bias.unsqueeze(1), q.unsqueeze(1), keys.transpose(1, 2)).squeeze(1)
    a = torch.softmax(scores, dim=1)
    ctx = torch.bmm(a.unsqueeze(1), values).squeeze(1)  # B x C
    return ctx, a


def attn_backward(additive: bool, dctx: Tensor, da_extra: Optional[Tensor], a: Tensor, q: Tensor, keys: Tensor,
                  values: Tensor, v: Optional[Tensor], dkeys: Optional[Tensor], dv: Optional[Tensor]):
    """Returns (d q, d scores); accumulates the additive attention's dkeys and dv. The products
    that only accumulate over steps (d values = sum_t a_t^T dctx_t, and the multiplicative
    attention's d keys = sum_t ds_t^T q_t) are left to the caller, as one batched product over
    all steps: per step they were a batch of B rank-1 updates (B small products). The additive
    energy (B x S x A per step) is recomputed here rather than kept from the forward pass:
    keeping it for every step was the largest part of a training step's memory."""
    da = torch.bmm(values, dctx.unsqueeze(2)).squeeze(2)  # B x S
    if da_extra is not None:
        da = da + da_extra
    ds = a * (da - (a * da).sum(dim=1, keepdim=True))
    if additive:  # in row blocks that stay in cache, as additive_scores does
        batch, src_len, size = keys.shape
        rows = energy_block_rows(src_len, size)
        buf = keys.new_empty(min(rows, batch), src_len, size)
        dq = q.new_empty(batch, size)
        for i in range(0, batch, rows):
            j = min(batch, i + rows)
            energy = torch.add(keys[i:j], q[i:j].unsqueeze(1), out=buf[:j - i]).tanh_()  # as in forward
            dv.add_(torch.mm(ds[i:j].reshape(1, -1), energy.reshape(-1, size)).squeeze(0))
            dpre = energy.mul_(energy).neg_().add_(1).mul_(v).mul_(ds[i:j].unsqueeze(2))  # ds v (1 - e^2)
            dkeys[i:j].add_(dpre)
            torch.sum(dpre, dim=1, out=dq[i:j])
        return dq, ds
    return torch.bmm(ds.unsqueeze(1), keys).squeeze(1), ds


# --- the loop -----------------------------------------------------------------------------------

class DecoderLoop(torch.autograd.Function):
    """See the module docstring. `spec` = (cell, style, additive); unused tensors are empty."""

    @staticmethod
    def forward(ctx, spec, gx_emb, h0, c0, feed0, keys, values, bias, w_hh, b_hh, w_f, w_q, v, w_o, b_o, mask):
        cell, style, additive, cdt = spec
        wdt = w_hh.dtype  # states and elementwise work stay in the parameters' dtype
        with torch.autocast(gx_emb.device.type, enabled=False):
            return DecoderLoop._forward(ctx, cell, style, additive, cdt, gx_emb.to(wdt), h0.to(wdt), c0.to(wdt),
                                        feed0.to(wdt), keys.to(wdt), values.to(wdt), bias.to(wdt),
                                        w_hh, b_hh, w_f, w_q, v, w_o, b_o, mask)

    @staticmethod
    def _forward(ctx, cell, style, additive, cdt, gx_emb, h0, c0, feed0, keys, values, bias, w_hh, b_hh, w_f,
                 w_q, v, w_o, b_o, mask):
        steps, n_h = gx_emb.shape[0], h0.shape[1]
        lstm, luong = cell == "lstm", style == "luong"
        # one product per step for everything that reads h_prev (bahdanau + additive: the query too)
        fuse_q = additive and not luong
        w1 = torch.cat([w_hh, w_q]) if fuse_q else w_hh
        b1 = torch.cat([b_hh, b_hh.new_zeros(w_q.shape[0])]) if fuse_q else b_hh
        w1_t, w_f_t = w1.to(cdt).t(), w_f.to(cdt).t()
        w_q_t = w_q.to(cdt).t() if additive else None
        w_o_t = w_o.to(cdt).t() if luong else None
        h, c, feed = h0, (c0 if lstm else None), feed0
        hs, ctxs, attns, feeds, cells, queries, units = [], [], [], [], [], [], []
        for t in range(steps):
            g1 = _addmm(b1, h, w1_t)
            gh = g1[:, :w_hh.shape[0]]
            if not luong:
                q = g1[:, w_hh.shape[0]:] if additive else h
                context, a = attn_forward(additive, q, keys, values, bias, v)
                gx = _addmm(gx_emb[t], context, w_f_t)
            else:
                gx = _addmm(gx_emb[t], feed, w_f_t)
            h_new, c_new, saved = cell_forward(cell, gx, gh, h, c)
            if luong:
                q = _mm(h_new, w_q_t) if additive else h_new
                context, a = attn_forward(additive, q, keys, values, bias, v)
                unit = torch.cat([h_new, context], dim=1)
                if mask.numel():
                    unit = unit * mask[t]
                feeds.append(feed)
                feed = torch.tanh(_addmm(b_o, unit, w_o_t))
                units.append(unit)
                ctxs.append(feed)  # the output of a luong step is its attentional vector
            else:
                ctxs.append(context)
            hs.append(h)
            cells.append(saved)
            queries.append(q)
            attns.append(a)
            h, c = h_new, c_new
        hs.append(h)
        H = torch.stack(hs)  # (T+1) x B x H: h_0 .. h_T
        A = torch.stack(attns)
        out = torch.stack(ctxs)  # bahdanau: contexts; luong: attentional vectors
        ctx.spec = (cell, style, additive, cdt)
        ctx.cells, ctx.queries = cells, queries
        ctx.save_for_backward(H, A, out, keys, values, w_hh, w_f, w_q, v, w_o, mask,
                              torch.stack(feeds) if luong else out.new_empty(0),
                              torch.stack(units) if luong else out.new_empty(0))
        if luong:
            return out, out.new_empty(0), A
        return H[1:], out, A

    @staticmethod
    def backward(ctx, d_first, d_second, d_attn):
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return DecoderLoop._backward(ctx, d_first, d_second, d_attn)

    @staticmethod
    def _backward(ctx, d_first, d_second, d_attn):
        cell, style, additive, cdt = ctx.spec
        H, A, out, keys, values, w_hh32, w_f32, w_q32, v, w_o32, mask, feeds, units = ctx.saved_tensors
        wdt = w_hh32.dtype
        d_first = d_first.to(wdt) if d_first is not None else None
        d_second = d_second.to(wdt) if d_second is not None and d_second.numel() else None
        d_attn = d_attn.to(wdt) if d_attn is not None else None
        w_hh, w_f = w_hh32.to(cdt), w_f32.to(cdt)
        w_q = w_q32.to(cdt) if additive else w_q32
        w_o = w_o32.to(cdt) if style == "luong" else w_o32
        luong, lstm = style == "luong", cell == "lstm"
        steps = A.shape[0]
        dkeys = torch.zeros_like(keys) if additive else None  # multiplicative: one product after the loop
        dh = torch.zeros_like(H[0])
        dc = torch.zeros_like(H[0]) if lstm else None
        dfeed = torch.zeros_like(feeds[0]) if luong else None
        w1 = torch.cat([w_hh, w_q]) if additive and not luong else None
        dgx_all = torch.empty(steps, H.shape[1], w_hh.shape[0], dtype=H.dtype, device=H.device)
        dgh_all = torch.empty_like(dgx_all)
        dctx_all = torch.empty(steps, *values.shape[::2], dtype=H.dtype, device=H.device)  # T x B x C
        ds_all = None if additive else torch.empty_like(A)  # T x B x S
        dq_all: List[Tensor] = []
        dpo_all: List[Tensor] = []
        d_v = torch.zeros_like(v) if additive else None
        for t in reversed(range(steps)):
            saved, q = ctx.cells[t], ctx.queries[t]
            da_extra = d_attn[t] if d_attn is not None else None
            if luong:
                dfo = dfeed + (d_first[t] if d_first is not None else 0)
                dpo = dfo * (1 - out[t] * out[t])  # through tanh
                dpo_all.append(dpo)
                dunit = _mm(dpo, w_o)
                if mask.numel():
                    dunit = dunit * mask[t]
                n_h = H.shape[2]
                dh_top, dctx = dunit[:, :n_h], dunit[:, n_h:]
                dq, ds = attn_backward(additive, dctx, da_extra, A[t], q, keys, values, v, dkeys, d_v)
                dh_new = dh + dh_top + (_mm(dq, w_q) if additive else dq)
                if additive:
                    dq_all.append(dq)
                dgx, dgh, dh_cell, dc = cell_backward(cell, dh_new, dc, saved)
                dfeed = _mm(dgx, w_f)
                dh = _mm(dgh, w_hh) if dh_cell is None else _addmm(dh_cell, dgh, w_hh)
            else:
                dh_new = dh + (d_first[t] if d_first is not None else 0)
                dgx, dgh, dh_cell, dc = cell_backward(cell, dh_new, dc, saved)
                dctx = _mm(dgx, w_f) + (d_second[t] if d_second is not None else 0)
                dq, ds = attn_backward(additive, dctx, da_extra, A[t], q, keys, values, v, dkeys, d_v)
                if additive:
                    dq_all.append(dq)
                    dh = _mm(torch.cat([dgh, dq], dim=1), w1)
                else:
                    dh = _mm(dgh, w_hh) + dq
                if dh_cell is not None:
                    dh = dh + dh_cell
            dgx_all[t], dgh_all[t], dctx_all[t] = dgx, dgh, dctx
            if ds_all is not None:
                ds_all[t] = ds
        # what only accumulates over steps, as one batched product each: per sentence,
        # d values = A^T DCTX (S x T times T x C); multiplicative d keys = DS^T Q
        dvalues = torch.bmm(A.permute(1, 2, 0), dctx_all.transpose(0, 1))
        if ds_all is not None:
            dkeys = torch.bmm(ds_all.permute(1, 2, 0), torch.stack(ctx.queries).transpose(0, 1))
        # weight gradients: one large product each over all T*B rows
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        h_prev = H[:-1]
        d_w_hh = _wgrad(flat(dgh_all), flat(h_prev), cdt)
        d_b_hh = flat(dgh_all).sum(0)
        fed = feeds if luong else out  # what W_f multiplied
        d_w_f = _wgrad(flat(dgx_all), flat(fed), cdt)
        d_w_q = d_w_o = d_b_o = None
        if additive:
            dq_stack = torch.stack(dq_all[::-1])
            d_w_q = _wgrad(flat(dq_stack), flat(H[1:] if luong else h_prev), cdt)
        if luong:
            dpo = torch.stack(dpo_all[::-1])
            d_w_o = _wgrad(flat(dpo), flat(units), cdt)
            d_b_o = flat(dpo).sum(0)
        d_h0 = dh
        d_c0 = dc if lstm else None
        d_feed0 = dfeed if luong else None
        ctx.cells = ctx.queries = None
        return (None, dgx_all, d_h0, d_c0, d_feed0, dkeys, dvalues, None, d_w_hh, d_b_hh, d_w_f,
                d_w_q, d_v, d_w_o, d_b_o, None)


# --- the loss over the vocabulary ---------------------------------------------------------------

class LinearCrossEntropy(torch.autograd.Function):
    """The output layer and the label-smoothed cross-entropy in one pass over row chunks: the
    N x V logits never exist at once (memory O(chunk x V)), and the gradients are computed
    while each chunk's softmax is in cache (then only scaled in backward).

    For rows x_i (N x D), weights W (V x D), bias b:  z_i = W x_i + b,  lse_i = logsumexp(z_i),
        loss = sum_i (1 - eps) (lse_i - z_i[t_i]) + eps (lse_i - mean_j z_ij)   (and the NLL sum)
        d loss / d z = softmax(z) - (1 - eps) onehot(t) - eps / V   (PyTorch's label smoothing)
    Matrix products run in the autocast dtype (bf16 under autocast), the softmax in float32."""

    CHUNK = 256  # rows per chunk: 256 x 8000 float32 = 8 MB

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, eps: float, cdt: torch.dtype):
        """Each pass over a chunk's rows x V values costs about as much as a third of its matrix
        products, so there are few: the product (with the bias), max, subtract, exp, sum, and the
        three products of the gradients. The rest is folded into vectors of size D or rows:
            sum_j z_ij = x_i . sum_j W_j + sum_j b_j                       (the smoothing term)
            d z = r q - eps / V,  q = exp(z - m) - (1 - eps) total onehot(t),  r = 1 / total
            dx = r (q W) - eps / V sum_j W_j;   dW = q^T (r x) - eps / V 1 (sum_i x_i)^T;
            db = q^T r - eps N / V"""
        with torch.autocast(x.device.type, enabled=False):
            n, v = x.shape[0], weight.shape[0]
            wdt = weight.dtype
            acc = torch.float64 if wdt == torch.float64 else torch.float32  # softmax and sums
            same = cdt == acc  # float32 (or float64) products: accumulate in place
            w = weight.to(cdt)
            w_sum = weight.to(acc).sum(0)  # D
            b_acc = bias.to(acc) if bias is not None else None
            dx = torch.empty(n, x.shape[1], dtype=wdt, device=x.device)
            dw = torch.zeros(v, x.shape[1], dtype=acc, device=x.device)
            db = torch.zeros(v, dtype=acc, device=x.device) if bias is not None else None
            nll = torch.zeros((), dtype=acc, device=x.device)
            smooth = torch.zeros((), dtype=acc, device=x.device)
            for r in range(0, n, LinearCrossEntropy.CHUNK):
                rows = slice(r, r + LinearCrossEntropy.CHUNK)
                xc, xa = x[rows].to(cdt), x[rows].to(acc)
                if same and bias is not None:
                    z = torch.addmm(b_acc, xc, w.t())
                else:
                    z = torch.mm(xc, w.t()).to(acc)
                    if bias is not None:
                        z += b_acc
                t = target[rows, None]
                z_t = z.gather(1, t).squeeze(1)
                m = z.amax(dim=1, keepdim=True)
                q = z.sub_(m).exp_()  # in place: z is not needed any more
                total = q.sum(dim=1, keepdim=True)
                lse = (m + total.log()).squeeze(1)
                nll += (lse - z_t).sum()
                if eps > 0:
                    z_sum = torch.mv(xa, w_sum) + (b_acc.sum() if bias is not None else 0.0)
                    smooth += (lse - z_sum / v).sum()
                q.scatter_add_(1, t, total * -(1 - eps))
                rcp = total.reciprocal_()  # chunk x 1
                xr = xa * rcp
                if same:
                    dx[rows] = torch.mm(q, w).mul_(rcp)
                    dw.addmm_(q.t(), xr)
                else:
                    qc = q.to(cdt)
                    dx[rows] = torch.mm(qc, w).to(acc).mul_(rcp)
                    dw.add_(torch.mm(qc.t(), xr.to(cdt)).to(acc))
                if db is not None:
                    db.addmv_(q.t(), rcp.squeeze(1))
            if eps > 0:
                dx.sub_((eps / v) * w_sum.to(wdt))
                dw.sub_((eps / v) * x.to(acc).sum(0))
                if db is not None:
                    db.sub_(eps * n / v)
            ctx.save_for_backward(dx, dw.to(wdt), db.to(wdt) if db is not None else None)
            loss = (1 - eps) * nll + eps * smooth if eps > 0 else nll.clone()
            return loss, nll

    @staticmethod
    def backward(ctx, d_loss, d_nll):
        dx, dw, db = ctx.saved_tensors
        return dx * d_loss, dw * d_loss, (db * d_loss if db is not None else None), None, None, None


# --- dropout with 8x fewer random draws (CPU) ---------------------------------------------------

def keep_mask(shape, p: float, device) -> Tuple[Tensor, float]:
    """Dropout's keep mask (bool) and scale, drawing one random 64-bit word per eight elements
    (torch's bernoulli_ draws one per element, ~15 ns each on the CPU); the keep probability
    is rounded to a multiple of 1/256."""
    n = int(torch.Size(shape).numel())
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=device)
    threshold = max(1, round((1 - p) * 256))  # keep probability in steps of 1/256
    return words.view(torch.uint8)[:n].view(shape) < threshold, 256.0 / threshold


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, p: float):
        keep, ctx.scale = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        return x.mul(keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None


def dropout_mask(shape, p: float, device, dtype: torch.dtype) -> Tensor:
    """A scaled dropout mask (0 or 1 / keep probability) to multiply by: keep_mask's on the
    CPU, torch's bernoulli_ elsewhere (GPUs draw random numbers cheaply)."""
    if torch.device(device).type == "cpu":
        keep, scale = keep_mask(shape, p, device)
        return keep.to(dtype).mul_(scale)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1 - p).div_(1 - p)


class Dropout(torch.nn.Dropout):
    """nn.Dropout, but on the CPU each random 64-bit word masks eight elements: drawing random
    numbers is most of dropout's cost there (the keep probability is rounded to 1/256)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        return _Dropout.apply(x, self.p)


# --- the encoder's recurrence -------------------------------------------------------------------

class EncoderLoop(torch.autograd.Function):
    """One direction of one encoder layer over padded sequences, in the manner of DecoderLoop.

    gx: S x B x G input pre-activations (x W_ih^T + b_ih, one product for all steps, computed by
    the caller); mask: S x B x 1, 1 at tokens. At padding the state is carried unchanged and the
    output is zero, which is what torch's packed sequences give: the final state of a sentence
    is the state after its last token. Returns outputs S x B x H, final h, final c (LSTM)."""

    @staticmethod
    def forward(ctx, spec, gx, mask, w_hh, b_hh):
        cell, cdt = spec
        wdt = w_hh.dtype
        with torch.autocast(gx.device.type, enabled=False):
            gx, mask = gx.to(wdt), mask.to(wdt)
            w_t = w_hh.to(cdt).t()
            n_b, n_h = gx.shape[1], w_hh.shape[1]
            h = gx.new_zeros(n_b, n_h)
            c = gx.new_zeros(n_b, n_h) if cell == "lstm" else None
            outs, prev, saved = [], [], []
            for t in range(gx.shape[0]):
                m = mask[t]
                h_new, c_new, sv = cell_forward(cell, gx[t], _addmm(b_hh, h, w_t), h, c)
                prev.append(h)
                saved.append(sv)
                outs.append(h_new * m)
                h = torch.addcmul(h, m, h_new - h)
                if c is not None:
                    c = torch.addcmul(c, m, c_new - c)
            ctx.spec, ctx.saved = spec, saved
            ctx.save_for_backward(torch.stack(prev), mask, w_hh)
            return torch.stack(outs), h, (c if c is not None else h.new_empty(0))

    @staticmethod
    def backward(ctx, d_out, d_h, d_c):
        cell, cdt = ctx.spec
        prev, mask, w_hh32 = ctx.saved_tensors
        with torch.autocast(prev.device.type, enabled=False):
            wdt = w_hh32.dtype
            w_hh = w_hh32.to(cdt)
            d_out = d_out.to(wdt) if d_out is not None else torch.zeros_like(prev)
            dh = d_h.to(wdt) if d_h is not None else torch.zeros_like(prev[0])
            lstm = cell == "lstm"
            dc = (d_c.to(wdt) if d_c is not None and d_c.numel() else torch.zeros_like(prev[0])) if lstm else None
            steps = prev.shape[0]
            dgx_all = torch.empty(steps, prev.shape[1], w_hh.shape[0], dtype=wdt, device=prev.device)
            dgh_all = torch.empty_like(dgx_all)
            for t in reversed(range(steps)):
                m = mask[t]
                dh_new = m * (dh + d_out[t])
                dc_new = m * dc if lstm else None
                dgx, dgh, dh_cell, dc_prev = cell_backward(cell, dh_new, dc_new, ctx.saved[t])
                dgx_all[t], dgh_all[t] = dgx, dgh
                dh = torch.addcmul(_mm(dgh, w_hh), 1 - m, dh)
                if dh_cell is not None:
                    dh = dh + dh_cell
                if lstm:
                    dc = torch.addcmul(dc_prev, 1 - m, dc)
            flat_dgh = dgh_all.reshape(-1, dgh_all.shape[-1])
            d_w = _wgrad(flat_dgh, prev.reshape(-1, prev.shape[-1]), cdt)
            ctx.saved = None
            return None, dgx_all, None, d_w, flat_dgh.sum(0)
