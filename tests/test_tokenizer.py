"""The tokenizer stage: SentencePiece models, special ids, round trips, cached id arrays."""
import os

import numpy as np
import pytest

from mt.config import DataConfig, TokenizerConfig, structured
from mt.data import load_split, normalize, prepare
from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, IdCorpus, Tokenizer, train_tokenizer

from conftest import builtin_lines


@pytest.fixture(scope="module")
def prepared(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(structured(DataConfig(path=str(small_corpus))), out)
    return out


def tok_cfg(**kw):
    base = dict(vocab_size=600)
    base.update(kw)
    return structured(TokenizerConfig(**base))


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_decode_encode_roundtrip_on_real_lines(prepared, tmp_path, model_type):
    tok = train_tokenizer(tok_cfg(model_type=model_type), prepared, tmp_path / "tok")
    # unseen lines of the real corpus, normalised as the pipeline does; byte fallback covers
    # characters the model never saw
    lines = [normalize(x) for x in builtin_lines("test2016", "de", 300) + builtin_lines("train", "de", 3000)[-300:]]
    lines += ["Ζ, ж and 中文 are not in the training data", "emoji \U0001F600 ok"]
    for line, ids in zip(lines, tok.encode_tgt(lines)):
        assert tok.decode_tgt(ids) == line
        assert UNK_ID not in ids


def test_special_ids_and_vocab_size(prepared, tmp_path):
    tok = train_tokenizer(tok_cfg(vocab_size=700), prepared, tmp_path / "tok")
    assert (tok.src.pad_id(), tok.src.unk_id(), tok.src.bos_id(), tok.src.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert tok.src_vocab_size == 700 and tok.joint
    assert tok.decode_tgt([BOS_ID] + tok.encode_tgt(["Hallo Welt"])[0] + [EOS_ID, PAD_ID]) == "Hallo Welt"


def test_separate_models_and_char_model(prepared, tmp_path):
    tok = train_tokenizer(tok_cfg(joint=False, vocab_size=500), prepared, tmp_path / "sep")
    assert not tok.joint and tok.src.serialized_model_proto() != tok.tgt.serialized_model_proto()
    assert (tmp_path / "sep" / "src.model").is_file() and (tmp_path / "sep" / "tgt.model").is_file()
    char = train_tokenizer(tok_cfg(model_type="char", vocab_size=200), prepared, tmp_path / "char")
    assert all(len(char.src.id_to_piece(i).lstrip("\u2581")) <= 1 for i in char.encode_src(["Ein Hund"])[0])


def test_encoded_corpus_matches_encoder(prepared, tmp_path):
    tok = train_tokenizer(tok_cfg(), prepared, tmp_path / "tok")
    train = load_split(prepared, "train")
    corpus = IdCorpus(tmp_path / "tok" / "ids", "train")
    assert len(corpus) == len(train)
    for i in (0, 7, len(train) - 1):
        assert corpus.src(i).tolist() == tok.encode_src([train[i]["src"]])[0]
        assert corpus.tgt(i).tolist() == tok.encode_tgt([train[i]["tgt"]])[0]
    assert corpus.src(0).dtype == np.int32


def test_stage_skips_when_done_and_vocab_override_retrains(prepared, tmp_path):
    out = tmp_path / "tok"
    train_tokenizer(tok_cfg(vocab_size=600), prepared, out)
    model = out / "spm.model"
    before = (os.stat(model).st_mtime_ns, model.read_bytes())
    train_tokenizer(tok_cfg(vocab_size=600), prepared, out)
    assert (os.stat(model).st_mtime_ns, model.read_bytes()) == before
    tok = train_tokenizer(tok_cfg(vocab_size=800), prepared, out)
    assert tok.src_vocab_size == 800 and model.read_bytes() != before[1]
    assert Tokenizer.from_dir(out).fingerprint() == tok.fingerprint()
