"""The hand-written decoder loop (mt/decoder_loop.py) against autograd through `step`: same
outputs, same gradient for every parameter and input, for every cell, attention and style it
covers, with and without a dropout mask, in float64 and under bf16 autocast."""
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
    att, weights = model(src, src_len, tgt_in, decoder_backward="handwritten" if fused else "autograd")
    g = torch.Generator().manual_seed(2)
    loss = (model.logits(att) * torch.randn(att.shape[:2] + (V,), generator=g, dtype=att.dtype)).sum() \
        + (weights * torch.randn(weights.shape, generator=g, dtype=att.dtype)).sum()
    loss.backward()
    return att.detach(), weights.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", CASES, ids=lambda a: "-".join(v for v in a.values() if isinstance(v, str)))
def test_decoder_loop_loop_matches_autograd(arch):
    model, src, src_len, tgt_in = setup(arch)
    a_ref, w_ref, g_ref = run(model, src, src_len, tgt_in, fused=False)
    a, w, g = run(model, src, src_len, tgt_in, fused=True)
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(w, w_ref)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], msg=name)


def test_decoder_loop_luong_dropout_mask_is_applied_in_training():
    model, src, src_len, tgt_in = setup(dict(cell="gru", decoder="luong", attention="general", dropout=0.5))
    model.train()
    torch.manual_seed(3)
    a1, _ = model(src, src_len, tgt_in)
    torch.manual_seed(4)
    a2, _ = model(src, src_len, tgt_in)
    assert not torch.allclose(a1, a2)
    model.eval()
    assert torch.allclose(model(src, src_len, tgt_in)[0], model(src, src_len, tgt_in)[0])


class StepMask(torch.nn.Module):
    """Dropout whose t-th call multiplies by mask[t]: autograd's step loop with the loop's mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask, self.calls = mask, 0

    def forward(self, x):
        self.calls += 1
        return x * self.mask[self.calls - 1]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_luong_dropout_masked_backward_matches_autograd(cell, monkeypatch):
    """In training, the Luong loop multiplies [h; c] by a dropout mask: with the same mask in
    autograd's step loop, outputs and every gradient agree."""
    from mt import decoder_loop

    model, src, src_len, tgt_in = setup(dict(cell=cell, decoder="luong", attention="general", dropout=0.5))
    model.train()
    model.encoder.dropout.p = 0.0  # only the decoder's mask is under test
    width = model.decoder.hidden_size + model.encoder.output_size
    g = torch.Generator().manual_seed(7)
    mask = (torch.rand(tgt_in.shape[1], tgt_in.shape[0], width, generator=g) > 0.5).double() * 2
    monkeypatch.setattr(decoder_loop, "dropout_mask", lambda shape, p, like: mask)
    a, w, grads = run(model, src, src_len, tgt_in, fused=True)
    model.decoder.dropout = StepMask(mask)
    a_ref, w_ref, g_ref = run(model, src, src_len, tgt_in, fused=False)
    assert model.decoder.dropout.calls == tgt_in.shape[1]
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(w, w_ref)
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], msg=name)


@pytest.mark.parametrize("arch", [dict(cell="gru", decoder="bahdanau", attention="bahdanau"),
                                  dict(cell="lstm", decoder="luong", attention="general")], ids=["gru", "lstm"])
def test_decoder_loop_loop_under_bf16_autocast_is_as_accurate_as_autograd(arch):
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


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_cpu_dropout_keeps_1_minus_p_and_rescales(p):
    """Eight elements per random word: still a keep rate of 1 - p (to 1/256), values 0 or
    1 / keep rate, so the mask's mean is 1, as nn.Dropout's."""
    from mt.dropout import Dropout, dropout_mask

    torch.manual_seed(0)
    mask = dropout_mask((20, 64, 512), p, torch.empty(0))
    kept = mask > 0
    assert abs(float(kept.float().mean()) - (1 - p)) < 0.01
    assert torch.allclose(mask[kept], torch.full_like(mask[kept], float(mask[kept][0])))
    assert abs(float(mask[kept][0]) - 1 / (1 - p)) < 0.02 and abs(float(mask.mean()) - 1) < 0.02
    layer = Dropout(p).train()  # the module: the same mask, and the gradient is masked alike
    x = torch.randn(64, 300, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    dropped = y == 0
    assert abs(float(dropped.float().mean()) - p) < 0.02
    assert torch.equal(x.grad == 0, dropped) and torch.allclose(y[~dropped], x[~dropped] * x.grad[~dropped])
    assert torch.equal(layer.eval()(x), x)
