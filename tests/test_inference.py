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


# --- a checkpoint at odds with itself is refused by every loader, in one line ---------------------

def write_tiny_checkpoint(corpus, path, tamper=None):
    """An untrained tiny model with a real (tiny) SentencePiece model, saved the way training
    saves best.pt: what Translator.from_path reads, without a training run. `tamper(ckpt)` edits
    the dict first."""
    import io

    import sentencepiece as spm

    from conftest import tiny_overrides
    from mt import checkpoint as ckpt_io
    from mt.config import compose_config, to_container
    from mt.model import build_model
    from mt.tokenizer import BOS_ID, PAD_ID, SPECIAL_PIECES, UNK_ID

    cfg = compose_config(tiny_overrides(corpus))
    proto = io.BytesIO()
    lines = [s for lang in ("en", "de") for s in (corpus / f"train.{lang}").read_text(encoding="utf-8").splitlines()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=120,
                                   pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, **SPECIAL_PIECES,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    vocab = spm.SentencePieceProcessor(model_proto=proto.getvalue()).get_piece_size()
    model = build_model(cfg.model, vocab, vocab, seed=0)
    ckpt = {"format": ckpt_io.CHECKPOINT_FORMAT, "model": model.state_dict(), "step": 0, "config": to_container(cfg),
            "model_config": to_container(cfg.model),
            "tokenizer": {"src": proto.getvalue(), "tgt": proto.getvalue(), "fingerprint": "test",
                          "src_vocab": vocab, "tgt_vocab": vocab}}
    if tamper is not None:
        tamper(ckpt)
    ckpt_io.save(ckpt, path)
    return path


def _set(ckpt, section, key, value):
    ckpt[section][key] = value(ckpt[section][key]) if callable(value) else value


def _nan_at_first_element(w):
    w = w.clone()
    w.view(-1)[0] = float("nan")
    return w


TAMPERED = {  # what was done to the checkpoint -> what the one-line refusal must say
    "wrong shape": (lambda c: _set(c, "model", "decoder.rnn.weight_hh_l0", torch.zeros(7, 3)),
                    r"weights do not match its model config: "
                    r"decoder\.rnn\.weight_hh_l0 is 7x3, the config builds 96x32"),
    "config edited": (lambda c: _set(c, "model_config", "dec_hidden", 48),
                      r"weights do not match its model config: "
                      r"decoder\.rnn\.weight_ih_l0 is 96x\d+, the config builds 144x"),
    "missing weight": (lambda c: c["model"].pop("decoder.bridge_h.bias"),
                       r"weights do not match its model config: missing: decoder\.bridge_h\.bias"),
    "tokenizer size": (lambda c: _set(c, "tokenizer", "tgt_vocab", lambda v: v - 1),
                       r"target vocabulary does not match its weights: the SentencePiece model has (\d+) pieces, "
                       r"the checkpoint records tgt_vocab=\d+, decoder\.embedding\.weight has \1 rows"),
    "NaN": (lambda c: _set(c, "model", "encoder.rnn.weight_ih_l0", _nan_at_first_element),
            r"holds non-finite values in encoder\.rnn\.weight_ih_l0: it was saved from a diverged run"),
    "inf": (lambda c: _set(c, "model", "decoder.output_layer.bias", lambda w: w.fill_(float("inf"))),
            r"holds non-finite values in decoder\.output_layer\.bias"),
}


def test_a_consistent_tiny_checkpoint_loads_and_translates(small_corpus, tmp_path):
    from mt.translate import Translator

    path = write_tiny_checkpoint(small_corpus, tmp_path / "best.pt")
    assert len(Translator.from_path(path, "cpu", method="greedy", max_len_b=3).translate(["A dog runs."])) == 1


@pytest.mark.parametrize("case", list(TAMPERED))
def test_an_inconsistent_checkpoint_is_refused_in_one_line_naming_file_and_key(case, small_corpus, tmp_path):
    from mt.checkpoint import CheckpointError
    from mt.translate import Translator

    tamper, expected = TAMPERED[case]
    path = write_tiny_checkpoint(small_corpus, tmp_path / "best.pt", tamper)
    with pytest.raises(CheckpointError, match=expected) as refused:
        Translator.from_path(path, "cpu")
    message = str(refused.value)
    assert message.startswith(str(path)) and "\n" not in message, message
