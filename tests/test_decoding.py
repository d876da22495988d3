"""Decoding (mt/decoding.py): its decode-time products never change translations beyond float
noise (the detached products, the embedding table, a shortlist that holds the whole vocabulary,
bf16 within bf16's rounding); int8 is the exception the benchmark report measures in BLEU, here
it only has to stay close. The model itself is never modified."""
import pytest
import torch

from mt.config import DecodeConfig, structured
from mt.decoding import DecodingModel
from mt.search import beam_search
from mt.shortlist import Shortlist
from mt.tokenizer import EOS_ID

from test_search import batch, tiny_model  # the same tiny model and batches as the search tests

V = 40
ARCHS = [dict(), dict(cell="lstm", decoder="luong", attention="general"),
         dict(decoder="luong", attention="bahdanau", input_feeding=True, dec_layers=2, enc_layers=2)]


def decode(**kw):
    return structured(DecodeConfig(**kw))


class FixedShortlist:
    """Shortlist.for_batch's interface with fixed ids."""

    def __init__(self, ids):
        self.ids = ids

    def for_batch(self, src):
        return self.ids


def outputs(decoding, src, lens):
    with torch.no_grad():
        hyps = beam_search(decoding, src, lens, beam_size=4, alpha=0.6, n_best=3)
    return [[(decoding.vocab_ids[torch.tensor(h.tokens, dtype=torch.long)].tolist() if decoding.vocab_ids is not None
              else h.tokens, h.score) for h in sent] for sent in hyps]


def assert_same(a, b, tol=1e-5):
    for sent_a, sent_b in zip(a, b, strict=True):
        assert [t for t, _ in sent_a] == [t for t, _ in sent_b]
        assert [s for _, s in sent_a] == pytest.approx([s for _, s in sent_b], abs=tol)


def step_logits(decoding, src, lens, steps=4):
    """Logits of a few steps fed with a fixed token sequence: batch x steps x V."""
    with torch.no_grad():
        enc = decoding.encode(src, lens)
        state, out = decoding.init_state(enc), []
        tokens = torch.full((src.shape[0],), 2, dtype=torch.long)
        for t in range(steps):
            logits, state, _ = decoding.step(tokens, state, enc)
            out.append(logits.float())
            tokens = torch.full_like(tokens, 4 + t)
    return torch.stack(out, 1)


@pytest.mark.parametrize("table", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_time_products_change_nothing(arch, table, monkeypatch):
    import mt.decoding

    if not table:  # a vocabulary too large for the embedding-product table: the product stays
        monkeypatch.setattr(mt.decoding, "EMB_TABLE_MAX_MB", 0)
    model, (src, lens) = tiny_model(**arch).model, batch()
    reference = DecodingModel(model)
    reference.products = model.decoder.products()  # the module's own products, as training steps
    assert_same(outputs(DecodingModel(model), src, lens), outputs(reference, src, lens))


@pytest.mark.parametrize("arch", ARCHS[:2])
def test_full_vocabulary_shortlist_changes_nothing_and_a_subset_is_the_same_logits(arch):
    model, (src, lens) = tiny_model(**arch).model, batch()
    plain = DecodingModel(model)
    assert_same(outputs(DecodingModel(model, decode(), FixedShortlist(torch.arange(V))), src, lens),
                outputs(plain, src, lens))
    ids = torch.tensor([0, 1, 2, 3, 7, 11, 19, 23, 31])  # specials first, as Shortlist.for_batch makes them
    short = DecodingModel(model, decode(), FixedShortlist(ids))
    with torch.no_grad():  # one step from BOS: the shortlist's logits are the full logits at its ids
        bos = torch.full((src.shape[0],), 2, dtype=torch.long)
        enc_a, enc_b = plain.encode(src, lens), short.encode(src, lens)
        a, _, _ = plain.step(bos, plain.init_state(enc_a), enc_a)
        b, _, _ = short.step(bos, short.init_state(enc_b), enc_b)
    assert torch.allclose(a[:, ids], b, atol=1e-6)
    assert step_logits(short, src, lens).shape == (src.shape[0], 4, len(ids))


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
def test_bf16_decoding_stays_within_bf16_rounding_with_float32_attention(arch, monkeypatch):
    model, (src, lens) = tiny_model(**arch).model, batch()
    full = step_logits(DecodingModel(model), src, lens)
    half = DecodingModel(model, decode(bf16=True))
    seen = []
    attend = model.decoder.attention.attend
    monkeypatch.setattr(model.decoder.attention, "attend", lambda q, *a: seen.append(q.dtype) or attend(q, *a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = step_logits(half, src, lens)
    assert seen and set(seen) == {torch.float32}  # the attention ran in float32
    assert (low - full).abs().max() <= 0.05 * full.abs().max()  # bf16 keeps 8 bits of mantissa
    assert len(half.search(src, lens)) == src.shape[0]


@pytest.mark.parametrize("arch", ARCHS[:2])
def test_int8_stays_close(arch):
    model, (src, lens) = tiny_model(**arch).model, batch()
    full = step_logits(DecodingModel(model), src, lens)
    quantized = step_logits(DecodingModel(model, decode(int8=True)), src, lens)
    cos = torch.nn.functional.cosine_similarity(full.flatten(1), quantized.flatten(1), dim=1)
    assert cos.min() > 0.99, cos


def test_int8_covers_every_product_leaves_the_model_alone_and_shortlists_its_logits():
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    model, (src, lens) = tiny_model(decoder="luong", attention="bahdanau", input_feeding=True, dec_layers=2).model, batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = DecodingModel(model, decode(int8=True))
    p = int8.products
    assert all(isinstance(f, Int8Linear) for f in [p.feed, *p.hh, p.ih[1], p.query, p.out, int8.logits])
    assert type(int8.encoder.rnn).__module__.startswith("torch.ao.nn.quantized")
    assert type(model.encoder.rnn) is torch.nn.GRU  # the model's own modules are untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    full = step_logits(int8, src, lens)
    short = DecodingModel(model, decode(int8=True), FixedShortlist(torch.arange(V)))
    assert torch.allclose(step_logits(short, src, lens), full, atol=1e-4)
    assert isinstance(short.logits, Int8Linear)


# --- a checkpoint at odds with itself is refused by every loader, in one line ---------------------

def write_tiny_checkpoint(corpus, path, tamper=None, vocab_size=120, seed=0):
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
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=vocab_size,
                                   pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, **SPECIAL_PIECES,
                                   hard_vocab_limit=False, num_threads=1, minloglevel=2)
    vocab = spm.SentencePieceProcessor(model_proto=proto.getvalue()).get_piece_size()
    model = build_model(cfg.model, vocab, vocab, seed=seed)
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
    assert len(Translator.from_path(path, device="cpu", method="greedy", max_len_b=3).translate(["A dog runs."])) == 1


@pytest.mark.parametrize("case", list(TAMPERED))
def test_an_inconsistent_checkpoint_is_refused_in_one_line_naming_file_and_key(case, small_corpus, tmp_path):
    from mt.checkpoint import CheckpointError
    from mt.translate import Translator

    tamper, expected = TAMPERED[case]
    path = write_tiny_checkpoint(small_corpus, tmp_path / "best.pt", tamper)
    with pytest.raises(CheckpointError, match=expected) as refused:
        Translator.from_path(path, device="cpu")
    message = str(refused.value)
    assert message.startswith(str(path)) and "\n" not in message, message
