"""The hand-written decoder loop (mt/fused.py) against the autograd step loop: same outputs,
same gradient for every parameter and input, for every cell, attention and style it covers."""
import itertools

import pytest
import torch

from mt.config import ModelConfig, structured
from mt.model import build_model
from mt.tokenizer import BOS_ID, PAD_ID

V = 23
CASES = [dict(cell=c, decoder=d, attention=a, input_feeding=True, tie_embeddings=tie)
         for c, (d, a), tie in itertools.product(
             ["gru", "lstm", "rnn_tanh", "rnn_relu"],
             [("bahdanau", "bahdanau"), ("bahdanau", "general"), ("bahdanau", "dot"),
              ("luong", "general"), ("luong", "bahdanau"), ("luong", "dot")],
             ["none"])] + [dict(cell="gru", decoder="luong", attention="general", tie_embeddings="decoder")]


def setup(arch, dtype=torch.float64):
    torch.manual_seed(0)
    cfg = dict(emb_size=6, enc_hidden=5, dec_hidden=10, attn_size=4, dropout=0.0, emb_dropout=0.0)
    cfg.update(arch)
    model = build_model(structured(ModelConfig(**cfg)), V, V).to(dtype)
    g = torch.Generator().manual_seed(1)
    src_len = torch.tensor([6, 3, 5])
    src = torch.randint(4, V, (3, 6), generator=g)
    src[torch.arange(6)[None] >= src_len[:, None]] = PAD_ID
    tgt_in = torch.randint(4, V, (3, 5), generator=g)
    tgt_in[:, 0] = BOS_ID
    return model, src, src_len, tgt_in


def run(model, src, src_len, tgt_in, fused):
    model.zero_grad()
    model.decoder.use_fused = fused
    att, weights = model(src, src_len, tgt_in)
    g = torch.Generator().manual_seed(2)
    loss = (model.logits(att) * torch.randn(att.shape[:2] + (V,), generator=g, dtype=att.dtype)).sum() \
        + (weights * torch.randn(weights.shape, generator=g, dtype=att.dtype)).sum()
    loss.backward()
    return att.detach(), weights.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", CASES, ids=lambda a: "-".join(v for v in a.values() if isinstance(v, str)))
def test_fused_loop_matches_autograd(arch):
    model, src, src_len, tgt_in = setup(arch)
    a_ref, w_ref, g_ref = run(model, src, src_len, tgt_in, fused=False)
    a, w, g = run(model, src, src_len, tgt_in, fused=True)
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(w, w_ref)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=name)


def test_fused_luong_dropout_mask_is_applied_in_training():
    model, src, src_len, tgt_in = setup(dict(cell="gru", decoder="luong", attention="general", dropout=0.5))
    model.train()
    torch.manual_seed(3)
    a1, _ = model(src, src_len, tgt_in)
    torch.manual_seed(4)
    a2, _ = model(src, src_len, tgt_in)
    assert not torch.allclose(a1, a2)
    model.eval()
    assert torch.allclose(model(src, src_len, tgt_in)[0], model(src, src_len, tgt_in)[0])


@pytest.mark.parametrize("arch", [dict(cell="gru", decoder="bahdanau", attention="bahdanau"),
                                  dict(cell="lstm", decoder="luong", attention="general")], ids=["gru", "lstm"])
def test_fused_loop_under_bf16_autocast_is_as_accurate_as_autograd(arch):
    """bf16 matrix products (autocast) with float32 states: outputs close to float32, and every
    gradient at least as close to the float32 one as autograd's under the same autocast."""
    _, src, src_len, tgt_in = setup(arch, dtype=torch.float32)
    torch.manual_seed(0)
    model = build_model(structured(ModelConfig(emb_size=32, enc_hidden=32, dec_hidden=64, attn_size=32,
                                               dropout=0.0, emb_dropout=0.0, **arch)), V, V)
    a_ref, _, g_ref = run(model, src, src_len, tgt_in, fused=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _, g = run(model, src, src_len, tgt_in, fused=True)
        _, _, g_autograd = run(model, src, src_len, tgt_in, fused=False)
    torch.testing.assert_close(a.float(), a_ref, atol=0.01, rtol=0.01)
    cos = lambda x, y: float(torch.nn.functional.cosine_similarity(x.flatten().float(), y.flatten(), dim=0))  # noqa: E731
    for name in g_ref:
        assert cos(g[name], g_ref[name]) >= min(0.99, cos(g_autograd[name], g_ref[name]) - 0.02), name


@pytest.mark.parametrize("arch", [dict(cell=c, enc_layers=n, bidirectional=bi)
                                  for c in ("gru", "lstm", "rnn_tanh", "rnn_relu") for n in (1, 2) for bi in (True, False)],
                         ids=lambda a: "-".join(str(v) for v in a.values()))
def test_fused_encoder_matches_packed_torch_rnn(arch):
    """mt.fused.EncoderLoop equals the packed nn.GRU/LSTM/RNN: outputs, final states, gradients."""
    model, src, src_len, _ = setup(arch)
    enc = model.encoder

    def go(fused):
        enc.zero_grad()
        enc.use_fused = fused
        outputs, summary, cell = enc(src, src_len)
        g = torch.Generator().manual_seed(5)
        loss = (outputs * torch.randn(outputs.shape, generator=g, dtype=outputs.dtype)).sum() + \
            (summary * torch.randn(summary.shape, generator=g, dtype=summary.dtype)).sum()
        if cell is not None:
            loss = loss + (cell * torch.randn(cell.shape, generator=g, dtype=cell.dtype)).sum()
        loss.backward()
        return outputs.detach(), summary.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}

    out_ref, sum_ref, g_ref = go(False)
    out, summ, g = go(True)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(summ, sum_ref)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=name)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_linear_cross_entropy_matches_autograd(eps, with_bias, monkeypatch):
    """Output layer + label-smoothed loss in row chunks == F.linear + F.cross_entropy (float64),
    across chunk boundaries; gradients for the input, the weight and the bias."""
    from mt.fused import LinearCrossEntropy

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
    from mt.fused import LinearCrossEntropy

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
