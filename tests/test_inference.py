"""Speed options of decoding never change translations beyond float noise: the inference weight
cache, a shortlist that holds the whole vocabulary, and bf16 (whose tolerance is bf16's). int8 is
the exception the benchmark report measures in BLEU; here it only has to stay close."""
import pytest
import torch

from mt.inference import Shortlist, ShortlistModel, quantize_int8
from mt.search import beam_search, greedy_search
from mt.tokenizer import EOS_ID

from test_search import batch, tiny_model  # the same tiny model and batches as the search tests

V = 40
ARCHS = [dict(), dict(cell="lstm", decoder="luong", attention="general"),
         dict(decoder="luong", attention="bahdanau", input_feeding=True, dec_layers=2, enc_layers=2)]


def outputs(model, src, lens):
    with torch.no_grad():
        hyps = beam_search(model, src, lens, beam_size=4, alpha=0.6, n_best=3)
    return [[(h.tokens, h.score) for h in sent] for sent in hyps]


def assert_same(a, b, tol=1e-5):
    for sent_a, sent_b in zip(a, b, strict=True):
        assert [t for t, _ in sent_a] == [t for t, _ in sent_b]
        assert [s for _, s in sent_a] == pytest.approx([s for _, s in sent_b], abs=tol)


def step_logits(model, src, lens, steps=4):
    """Teacher-forced logits of a few steps fed with a fixed token sequence: batch x steps x V."""
    with torch.no_grad():
        enc = model.encode(src, lens)
        state, out = model.init_state(enc), []
        tokens = torch.full((src.shape[0],), 2, dtype=torch.long)
        for t in range(steps):
            logits, state, _ = model.step(tokens, state, enc)
            out.append(logits.float())
            tokens = torch.full_like(tokens, 4 + t)
    return torch.stack(out, 1)


@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_inference_weight_cache_changes_nothing(arch, table, monkeypatch):
    import mt.decoder

    if not table:  # a vocabulary too large for the embedding-product table: the product stays
        monkeypatch.setattr(mt.decoder, "EMB_TABLE_MAX_MB", 0)
    model, (src, lens) = tiny_model(**arch), batch()
    plain = outputs(model, src, lens)
    model.decoder.freeze()
    assert model.decoder.frozen is not None
    assert (model.decoder.frozen["emb_table"] is not None) == table
    assert_same(outputs(model, src, lens), plain)
    model.train()  # back to training drops the cache
    assert model.decoder.frozen is None


@pytest.mark.parametrize("arch", ARCHS[:2])
def test_full_vocabulary_shortlist_changes_nothing_and_a_subset_is_the_same_logits(arch):
    model, (src, lens) = tiny_model(**arch), batch()
    everything = ShortlistModel(model, torch.arange(V))
    assert_same(outputs(everything, src, lens), outputs(model, src, lens))
    ids = torch.tensor([0, 1, 2, 3, 7, 11, 19, 23, 31])  # specials first, as Shortlist.for_batch makes them
    full, short = step_logits(model, src, lens), step_logits(ShortlistModel(model, ids), src, lens)
    # the wrapper feeds shortlist indices: index 4.. map to ids 7.., so compare with fed ids
    sub = ShortlistModel(model, torch.arange(V))
    assert torch.allclose(step_logits(sub, src, lens), full, atol=1e-6)
    with torch.no_grad():  # one step from BOS: the shortlist's logits are the full logits at its ids
        enc = model.encode(src, lens)
        bos = torch.full((src.shape[0],), 2, dtype=torch.long)
        a, _, _ = model.step(bos, model.init_state(enc), enc)
        b, _, _ = ShortlistModel(model, ids).step(bos, model.init_state(enc), enc)
    assert torch.allclose(a[:, ids], b, atol=1e-6)
    assert short.shape == (src.shape[0], 4, len(ids))


def test_shortlist_is_built_from_cooccurrence_and_keeps_specials(tmp_path):
    """Synthetic training ids: source piece s (5..14) always translates to target piece s + 20,
    and target piece 4 appears everywhere (the most frequent, but specific to no source)."""
    import numpy as np

    rng = np.random.default_rng(0)
    src, tgt = [], []
    for _ in range(300):
        s = rng.choice(np.arange(5, 15), size=3, replace=False)
        src.append(s.astype(np.int32))
        tgt.append(np.concatenate([[4], s + 20]).astype(np.int32))
    for side, rows in (("src", src), ("tgt", tgt)):
        np.concatenate(rows).tofile(tmp_path / f"train.{side}.bin")
        np.save(tmp_path / f"train.{side}.len.npy", np.array([len(r) for r in rows], dtype=np.int32))
    shortlist = Shortlist.build(tmp_path, size=1, src_vocab=V, tgt_vocab=V, per_source=2)
    assert shortlist.frequent.tolist() == [4]
    for s in range(5, 15):
        assert shortlist.lexicon[s, 0] == s + 20  # the specific translation ranks first
    ids = shortlist.for_batch(torch.tensor([[7, 9, EOS_ID]]))
    assert ids[:EOS_ID + 1].tolist() == list(range(EOS_ID + 1))  # specials keep their own index
    assert {4, 27, 29} <= set(ids.tolist()) and 25 not in ids.tolist()
    assert ids.tolist() == sorted(ids.tolist())


@pytest.mark.parametrize("arch", ARCHS[:2])
def test_bf16_decoding_stays_within_bf16_rounding(arch):
    model, (src, lens) = tiny_model(**arch), batch()
    full = step_logits(model, src, lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = step_logits(model, src, lens)
    scale = full.abs().max()
    assert (half - full).abs().max() <= 0.05 * scale  # bf16 keeps 8 bits of mantissa
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        hyps = greedy_search(model, src, lens)
    assert len(hyps) == src.shape[0]


@pytest.mark.parametrize("arch", ARCHS[:2])
def test_int8_stays_close(arch):
    model, (src, lens) = tiny_model(**arch), batch()
    full = step_logits(model, src, lens)
    quantized = step_logits(quantize_int8(model), src, lens)
    cos = torch.nn.functional.cosine_similarity(full.flatten(1), quantized.flatten(1), dim=1)
    assert cos.min() > 0.99, cos


def test_int8_covers_the_decoder_cell_and_a_shortlist_of_it_is_its_logits_at_those_ids():
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    model, (src, lens) = tiny_model(decoder="luong", attention="bahdanau", input_feeding=True, dec_layers=2), batch()
    quantize_int8(model)
    frozen = model.decoder.frozen
    dec = model.decoder
    every_product = [frozen["feed"], *frozen["hh"], frozen["ih"][1], dec.att_layer, dec.output_layer,
                     dec.bridge_h, dec.attention.query_layer, dec.attention.key_layer]
    assert all(isinstance(p, Int8Linear) for p in every_product)
    full = step_logits(model, src, lens)
    short = step_logits(ShortlistModel(model, torch.arange(V)), src, lens)  # an int8 copy of the same layer
    assert isinstance(ShortlistModel(model, torch.arange(V)).project, Int8Linear)
    assert torch.allclose(short, full, atol=1e-4)
