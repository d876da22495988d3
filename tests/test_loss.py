"""The loss (mt/loss.py): the chunked output layer + label-smoothed cross-entropy against
autograd's, and LossModel in every combination of train.decoder_backward and loss_backward."""
import itertools

import pytest
import torch

from mt.loss import LinearCrossEntropy, LossModel, plain_loss


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_linear_cross_entropy_matches_autograd(eps, with_bias, monkeypatch):
    """Output layer + label-smoothed loss in row chunks == F.linear + F.cross_entropy (float64),
    across chunk boundaries; gradients for the input, the weight and the bias."""
    monkeypatch.setattr(LinearCrossEntropy, "CHUNK", 7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    t = torch.randint(0, 11, (30,), generator=g)
    params = (x, w, b) if with_bias else (x, w)
    loss, nll = LinearCrossEntropy.apply(x, w, b, t, eps, torch.float64)
    (2.5 * loss).backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    logits = torch.nn.functional.linear(x, w, b)
    ref = torch.nn.functional.cross_entropy(logits, t, label_smoothing=eps, reduction="sum")
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(nll, torch.nn.functional.cross_entropy(logits, t, reduction="sum"))
    for got, p in zip(grads, params, strict=True):
        torch.testing.assert_close(got, p.grad)


def test_linear_cross_entropy_in_bf16_products_stays_within_bf16_rounding(monkeypatch):
    monkeypatch.setattr(LinearCrossEntropy, "CHUNK", 16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 32, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(50, 32, generator=g)).requires_grad_()
    b = torch.randn(50, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (40,), generator=g)
    results = {}
    for cdt in (torch.float32, torch.bfloat16):
        loss, _ = LinearCrossEntropy.apply(x, w, b, t, 0.1, cdt)
        loss.backward()
        results[cdt] = [loss.detach()] + [p.grad.clone() for p in (x, w, b)]
        for p in (x, w, b):
            p.grad = None
    for full, half in zip(results[torch.float32], results[torch.bfloat16]):
        assert (half - full).abs().max() <= 0.02 * full.abs().max()


def test_plain_loss_is_pytorchs_label_smoothed_cross_entropy():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(9, 5, generator=g), torch.randn(13, 5, generator=g), torch.randn(13, generator=g)
    t = torch.randint(0, 13, (9,), generator=g)
    loss, nll = plain_loss(x, w, b, t, 0.1)
    logits = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, t, label_smoothing=0.1, reduction="sum"))
    torch.testing.assert_close(nll, torch.nn.functional.cross_entropy(logits, t, reduction="sum"))


@pytest.mark.parametrize("arch", [dict(cell="gru", decoder="bahdanau", attention="bahdanau"),
                                  dict(cell="lstm", decoder="luong", attention="general")], ids=["gru", "lstm"])
def test_loss_model_is_the_same_function_for_every_backward(arch):
    from test_decoder_loop import setup

    model, src, src_len, tgt_in = setup(arch)
    tgt_out = torch.roll(tgt_in, -1, 1)
    tgt_out[1, 3:] = 0  # padding is excluded
    results = []
    for dec, loss in itertools.product(["autograd", "handwritten"], repeat=2):
        model.zero_grad()
        out = LossModel(model, 0.1, dec, loss)(src, src_len, tgt_in, tgt_out)
        out[0].backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    ref, ref_grads = results[0]
    for out, grads in results[1:]:
        torch.testing.assert_close(out, ref)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
