"""Encoder, attention, decoder and model: properties, not seeded constants."""
import itertools

import pytest
import torch

from mt.attention import build_attention, mask_bias
from mt.config import ConfigError, ModelConfig, structured
from mt.decoding import DecodingModel
from mt.model import build_model, count_parameters
from mt.tokenizer import BOS_ID, PAD_ID

V = 37


def model_cfg(**kw):
    base = dict(emb_size=12, enc_hidden=10, dec_hidden=14, attn_size=9, dropout=0.0, emb_dropout=0.0)
    base.update(kw)
    return structured(ModelConfig(**base))


def batch(b=4, s=7, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    src_len = torch.randint(1, s + 1, (b,), generator=g)
    src_len[0] = s
    src = torch.randint(4, V, (b, s), generator=g)
    src[torch.arange(s)[None, :] >= src_len[:, None]] = PAD_ID
    tgt_in = torch.randint(4, V, (b, t), generator=g)
    tgt_in[:, 0] = BOS_ID
    return src, src_len, tgt_in


ARCHS = [
    dict(cell=c, decoder=d, attention=a, input_feeding=f, dec_layers=n)
    for c, (d, a, f), n in itertools.product(
        ["gru", "lstm", "rnn_tanh", "rnn_relu"],
        [("bahdanau", "bahdanau", True), ("luong", "general", True), ("luong", "general", False),
         ("luong", "concat", False), ("luong", "bahdanau", True)],
        [1, 2])
]


def stepwise(model, src, src_len, tgt_in):
    """Logits and attention, one DecodingModel step at a time: B x T x V, B x T x S."""
    decoding = DecodingModel(model)
    enc = decoding.encode(src, src_len)
    state = decoding.init_state(enc)
    logits, weights = [], []
    for t in range(tgt_in.shape[1]):
        out, state, w = decoding.step(tgt_in[:, t], state, enc)
        logits.append(out)
        weights.append(w)
    return torch.stack(logits, 1), torch.stack(weights, 1)


WHOLE_SEQUENCE = [a for a in ARCHS if a["dec_layers"] == 1 or (a["decoder"] == "luong" and not a["input_feeding"])]


@pytest.mark.parametrize("arch", WHOLE_SEQUENCE, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_whole_sequence_teacher_forcing_equals_step_by_step(arch):
    """The paths that run the whole target (one nn.GRU/LSTM/RNN call; the hand-written loop)
    give what `step` gives, one token at a time."""
    torch.manual_seed(0)
    model = build_model(model_cfg(**arch), V, V).eval()
    src, src_len, tgt_in = batch()
    with torch.no_grad():
        att, weights = model(src, src_len, tgt_in, decoder_backward="handwritten")
        step_logits, step_weights = stepwise(model, src, src_len, tgt_in)
    torch.testing.assert_close(step_logits, model.logits(att), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step_weights, weights, atol=1e-6, rtol=1e-5)


def reference_step(model, y, state, outputs, mask):
    """One decoder step written out from the papers' equations with torch's own cell functions:
    what `step` must compute. Returns logits, attention, (hidden, cell, feed)."""
    dec, rnn, att_mod = model.decoder, model.decoder.rnn, model.decoder.attention
    hidden, cell = list(state.hidden), list(state.cell) if state.cell else None

    def attend(query):
        if hasattr(att_mod, "query_layer"):  # v . tanh(W_q q + W_k k)
            energy = torch.tanh(outputs @ att_mod.key_layer.weight.t() + (query @ att_mod.query_layer.weight.t())[:, None])
            scores = energy @ att_mod.energy_layer.weight[0]
        else:  # q . k  or  q . W k
            keys = outputs if att_mod.key_layer is None else outputs @ att_mod.key_layer.weight.t()
            scores = (keys * query[:, None]).sum(-1)
        w = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return (w[:, :, None] * outputs).sum(1), w

    x = dec.embedding(y)
    if dec.style == "bahdanau":
        context, w = attend(hidden[-1])
        x = torch.cat([x, context], 1)
    elif state.feed is not None:
        x = torch.cat([x, state.feed], 1)
    for layer in range(dec.layers):
        args = [getattr(rnn, f"{k}_l{layer}") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        if dec.cell_kind == "lstm":
            hidden[layer], cell[layer] = torch.lstm_cell(x, (hidden[layer], cell[layer]), *args)
        else:
            hidden[layer] = getattr(torch, f"{dec.cell_kind}_cell")(x, hidden[layer], *args)
        x = hidden[layer]
    if dec.style == "luong":
        context, w = attend(hidden[-1])
    att = torch.tanh(dec.att_layer(torch.cat([hidden[-1], context], 1)))
    return dec.output_layer(att), w, (hidden, cell, att)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_step_equals_torch_cells_and_the_attention_formulas(arch):
    """`step`, through the module's own products and through DecodingModel's, against the
    equations written out with torch.gru_cell / lstm_cell / rnn_*_cell."""
    torch.manual_seed(0)
    model = build_model(model_cfg(**arch), V, V).eval()
    src, src_len, tgt_in = batch()
    mask = torch.arange(src.shape[1])[None, :] < src_len[:, None]
    with torch.no_grad():
        step_logits, step_weights = stepwise(model, src, src_len, tgt_in)
        dec, enc = model.decoder, model.encode(src, src_len)
        products, state, ref_state = dec.products(), dec.init_state(enc), dec.init_state(enc)
        for t in range(tgt_in.shape[1]):
            att, state, w = dec.step(products.embed(tgt_in[:, t]), state, enc, products)
            logits, w_ref, (h, c, feed) = reference_step(model, tgt_in[:, t], ref_state, enc.outputs, mask)
            ref_state = type(state)(tuple(h), tuple(c) if c else None, feed if state.feed is not None else None)
            for got in (dec.output_layer(att), step_logits[:, t]):
                torch.testing.assert_close(got, logits, atol=1e-5, rtol=1e-4)
            for got in (w, step_weights[:, t]):
                torch.testing.assert_close(got, w_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bahdanau", "concat", "general", "dot"])
def test_attention_sums_to_one_over_unmasked_positions(kind):
    torch.manual_seed(0)
    attn = build_attention(kind, 8, 8, 5)
    values = torch.randn(3, 6, 8)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5]).bool()
    keys = attn.project_keys(values)
    for query in (torch.randn(3, 8), torch.randn(3, 4, 8)):
        context, weights = attn(query, keys, values, mask_bias(mask, values.dtype))
        w = weights if weights.dim() == 3 else weights.unsqueeze(1)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
        assert (w.masked_select(~mask[:, None, :].expand_as(w)) == 0).all()
        assert context.shape == query.shape[:-1] + (8,)


def test_encoder_padding_does_not_leak():
    """A sentence encodes the same alone and next to longer ones (packing)."""
    torch.manual_seed(0)
    for cell in ["gru", "lstm"]:
        model = build_model(model_cfg(cell=cell, enc_layers=2), V, V).eval()
        src, src_len, _ = batch(b=3, s=9)
        with torch.no_grad():
            enc = model.encode(src, src_len)
            for i in range(3):
                n = int(src_len[i])
                alone = model.encode(src[i:i + 1, :n], src_len[i:i + 1])
                torch.testing.assert_close(alone.outputs[0], enc.outputs[i, :n], atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(alone.summary[0], enc.summary[i], atol=1e-6, rtol=1e-5)
                assert (enc.outputs[i, n:] == 0).all()


def test_tied_embeddings_share_one_tensor():
    m = build_model(model_cfg(tie_embeddings="all"), V, V)
    assert m.decoder.output_layer.weight is m.encoder.embedding.weight is m.decoder.embedding.weight
    m2 = build_model(model_cfg(tie_embeddings="decoder"), V, V + 1)
    assert m2.decoder.output_layer.weight is m2.decoder.embedding.weight
    assert m2.encoder.embedding.weight is not m2.decoder.embedding.weight
    assert count_parameters(m) < count_parameters(build_model(model_cfg(), V, V))
    with pytest.raises(ConfigError, match="one vocabulary"):
        build_model(model_cfg(tie_embeddings="all"), V, V + 1)


def test_reorder_state_selects_rows():
    torch.manual_seed(0)
    model = DecodingModel(build_model(model_cfg(cell="lstm", decoder="luong", attention="general"), V, V))
    src, src_len, tgt_in = batch()
    with torch.no_grad():
        enc = model.encode(src, src_len)
        state = model.init_state(enc)
        _, state, _ = model.step(tgt_in[:, 0], state, enc)
        index = torch.tensor([2, 2, 0])
        enc2, state2 = model.reorder_encoder(enc, index), model.reorder_state(state, index)
        logits2, _, _ = model.step(tgt_in[index, 1], state2, enc2)
        logits, _, _ = model.step(tgt_in[:, 1], state, enc)
        torch.testing.assert_close(logits2, logits[index])


def test_scheduled_sampling_with_ratio_one_is_teacher_forcing():
    torch.manual_seed(0)
    model = build_model(model_cfg(), V, V).eval()
    src, src_len, tgt_in = batch()
    with torch.no_grad():
        a, _ = model(src, src_len, tgt_in, tf_ratio=1.0)
        b, _ = model.decoder._forward_sampled(tgt_in, model.decoder.init_state(model.encode(src, src_len)),
                                              model.encode(src, src_len), tf_ratio=1.0)
        c, _ = model(src, src_len, tgt_in, tf_ratio=0.0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(a[:, 2:], c[:, 2:])  # own predictions differ from the reference


def test_additive_scores_in_row_blocks_equal_the_formula():
    """Decoding computes v . tanh(keys + q) in cache-sized blocks of rows, in place."""
    from mt.attention import additive_scores

    torch.manual_seed(0)
    keys, q, v = torch.randn(70, 37, 256), torch.randn(70, 256), torch.randn(256)  # 70 rows: several blocks
    expected = torch.tanh(keys + q.unsqueeze(1)) @ v
    assert torch.allclose(additive_scores(keys, q, v), expected, atol=1e-5)
    assert torch.allclose(additive_scores(keys[:3], q[:3], v), expected[:3], atol=1e-5)  # one block


def test_additive_scores_of_several_queries_per_source_equal_the_formula():
    from mt.attention import additive_scores

    torch.manual_seed(1)
    keys, q, v = torch.randn(30, 23, 64), torch.randn(30, 5, 64), torch.randn(64)  # 5 queries per source
    expected = torch.tanh(keys.unsqueeze(1) + q.unsqueeze(2)) @ v  # 30 x 5 x 23
    assert torch.allclose(additive_scores(keys, q, v), expected, atol=1e-5)


@pytest.mark.parametrize("arch", [dict(), dict(cell="lstm", decoder="luong", attention="general"),
                                  dict(decoder="luong", attention="dot", enc_hidden=10, dec_hidden=20)])
def test_rows_that_share_a_source_read_one_copy_of_it_and_step_as_if_copied(arch):
    """Beam search expands each sentence to k rows and later drops finished sentences: the
    encoding then stays one per sentence (EncoderOut.group), and a step gives what it gives
    with the encoding copied to every row."""
    from dataclasses import replace

    from test_search import batch, tiny_model

    model, (src, lens) = tiny_model(**arch), batch()
    k, n = 3, src.shape[0]
    with torch.no_grad():
        enc = model.encode(src, lens)
        expand = torch.arange(n).repeat_interleave(k)
        grouped = model.reorder_encoder(enc, expand)
        assert grouped.group == k and grouped.keys.data_ptr() == enc.keys.data_ptr()  # not copied
        copied = replace(grouped, outputs=enc.outputs[expand], keys=enc.keys[expand], bias=enc.bias[expand], group=1)
        keep = torch.tensor([0, 2, 5])  # sentences that go on: their rows, still in groups of k
        rows = (keep[:, None] * k + torch.arange(k)).view(-1)
        for e in (grouped, copied):
            assert e.summary.shape[0] == n * k
        kept = model.reorder_encoder(grouped, rows)
        assert kept.group == k and kept.keys.shape[0] == len(keep)
        state = model.init_state(grouped)
        tokens = torch.randint(4, 40, (n * k,))
        a, state_a, w_a = model.step(tokens, state, grouped)
        b, state_b, w_b = model.step(tokens, state, copied)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(w_a, w_b)
        a2, _, _ = model.step(tokens[rows], model.reorder_state(state_a, rows), kept)
        b2, _, _ = model.step(tokens[rows], model.reorder_state(state_b, rows), model.reorder_encoder(copied, rows))
        torch.testing.assert_close(a2, b2)
        scattered = model.reorder_encoder(grouped, torch.tensor([4, 0, 7]))  # rows of no common pattern
        assert scattered.group == 1 and torch.equal(scattered.keys, enc.keys[torch.tensor([1, 0, 2])])


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_encoder_under_cpu_bf16_autocast_multiplies_in_bf16_and_trains_the_float32_weights(cell):
    """Autocast leaves torch's packed RNN in float32 on the CPU; the encoder casts it to bf16
    itself: outputs within bf16 rounding of float32, gradients on the float32 parameters."""
    torch.manual_seed(0)
    enc = build_model(model_cfg(cell=cell, enc_layers=2, emb_size=32, enc_hidden=32), V, V).encoder
    src, src_len, _ = batch(b=5, s=9)
    full, _, _ = enc(src, src_len)
    full.sum().backward()
    ref = {n: p.grad.clone() for n, p in enc.rnn.named_parameters()}
    enc.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, summary, _ = enc(src, src_len)
    assert low.dtype == torch.bfloat16 and summary.dtype == torch.bfloat16
    assert (low.float() - full).abs().max() <= 0.05 * full.abs().max()
    low.float().sum().backward()
    for name, p in enc.rnn.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), ref[name].flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))


def test_word_dropout_replaces_pieces_only_at_its_rate():
    from mt.dropout import word_dropout
    from mt.tokenizer import EOS_ID, UNK_ID
    tokens = torch.randint(0, V, (200, 50), generator=torch.Generator().manual_seed(1))
    before = tokens.clone()
    assert word_dropout(tokens, 0.0) is tokens
    dropped = word_dropout(tokens, 0.25)
    assert torch.equal(tokens, before)  # a copy: the batch is not changed in place
    changed = dropped != tokens
    assert torch.all(dropped[changed] == UNK_ID)
    assert torch.equal(dropped[tokens <= EOS_ID], tokens[tokens <= EOS_ID])  # pad, unk, bos, eos stay
    pieces = tokens > EOS_ID
    assert abs(changed.sum().item() / pieces.sum().item() - 0.25) < 0.02


def test_word_dropout_feeds_unk_to_both_sides_in_training_only():
    from mt.dropout import word_dropout
    src, src_len, tgt_in = batch(b=16, s=9, t=8)
    model = build_model(model_cfg(word_dropout=0.3), V, V, seed=0)
    model.train()
    torch.manual_seed(5)
    att, attn = model(src, src_len, tgt_in)
    torch.manual_seed(5)  # the same draws, made by hand, in the same order
    src_d, tgt_d = word_dropout(src, 0.3), word_dropout(tgt_in, 0.3)
    assert not torch.equal(src_d, src) and not torch.equal(tgt_d, tgt_in)
    model.eval()
    att_d, attn_d = model(src_d, src_len, tgt_d)
    torch.testing.assert_close(att, att_d)
    torch.testing.assert_close(attn, attn_d)
    plain = build_model(model_cfg(), V, V, seed=0).eval()
    torch.testing.assert_close(model(src, src_len, tgt_in)[0], plain(src, src_len, tgt_in)[0])
