"""The training loss: the output layer and label-smoothed cross-entropy over the target tokens.

    loss_sum, nll_sum = LossModel(model, 0.1, loss_backward="handwritten")(src, src_len, tgt_in, tgt_out)

Two implementations of the same function (`train.loss_backward`): `plain_loss`, as autograd
writes it (logits, log_softmax, gather), and `LinearCrossEntropy`, which never makes the N x V
logits at once and computes the gradients while each chunk's softmax is in cache.
tests/test_loss.py checks one against the other.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt.tokenizer import PAD_ID


def plain_loss(x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, eps: float):
    """(label-smoothed loss sum, NLL sum) of rows x (N x D) through the output layer, by autograd
    (PyTorch's label smoothing: (1 - eps) NLL + eps * mean over the vocabulary of -log p)."""
    logits = F.linear(x, weight, bias)  # N x V; the softmax in float32 at least (bf16 under autocast)
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    nll = -logp.gather(1, target.unsqueeze(1)).sum()
    return (1 - eps) * nll - eps * logp.mean(dim=-1).sum(), nll


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


class LossModel(nn.Module):
    """Wraps the model so that DistributedDataParallel sees the loss inside forward().
    decoder_backward / loss_backward: "autograd" or "handwritten" (train.resolve_backward)."""

    def __init__(self, model, label_smoothing: float, decoder_backward: str = "autograd",
                 loss_backward: str = "autograd"):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing
        self.decoder_backward, self.loss_backward = decoder_backward, loss_backward

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor, tgt_out: Tensor,
                tf_ratio: float = 1.0) -> Tensor:
        """Returns [smoothed loss sum, NLL sum] over the target tokens (padding excluded)."""
        att, _ = self.model(src, src_len, tgt_in, tf_ratio, self.decoder_backward)  # B x T x D
        mask = tgt_out != PAD_ID  # the output layer never sees padding
        out = self.model.decoder.output_layer
        if self.loss_backward == "handwritten":
            device = att.device.type
            compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else out.weight.dtype
            loss, nll = LinearCrossEntropy.apply(att[mask], out.weight, out.bias, tgt_out[mask],
                                                 self.label_smoothing, compute)
        else:
            loss, nll = plain_loss(att[mask], out.weight, out.bias, tgt_out[mask], self.label_smoothing)
        return torch.stack([loss, nll.detach()])
