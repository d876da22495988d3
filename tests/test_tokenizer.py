"""The tokenizer stage: SentencePiece models, special ids, round trips, cached id arrays."""
import os

import numpy as np
import pytest

from mt.config import DataConfig, TokenizerConfig, structured
from mt.data import DataError, load_split, normalize, prepare
from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, IdCorpus, Tokenizer, TokenizerError, train_tokenizer

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


def test_same_data_gives_the_same_model_bytes_in_any_folder(prepared, tmp_path):
    # Ensembles and mt-average compare tokenizer bytes, so the same recipe in two clones (other
    # paths, other core counts) must give one model: no path and no machine's thread count in it.
    from sentencepiece import sentencepiece_model_pb2

    from mt.tokenizer import SPM_THREADS
    a = train_tokenizer(tok_cfg(), prepared, tmp_path / "clone_a" / "tok")
    b = train_tokenizer(tok_cfg(), prepared, tmp_path / "elsewhere" / "b")
    assert a.src.serialized_model_proto() == b.src.serialized_model_proto()
    assert (tmp_path / "clone_a" / "tok" / "spm.model").read_bytes() == a.src.serialized_model_proto()
    spec = sentencepiece_model_pb2.ModelProto.FromString(a.src.serialized_model_proto()).trainer_spec
    assert spec.model_prefix == "" and spec.num_threads == SPM_THREADS
    assert not list((tmp_path / "clone_a" / "tok").glob("*.tmp"))


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


def test_a_vocabulary_that_does_not_fit_the_data_is_one_line_naming_the_key(tmp_path):
    """300 distinct characters need more than 280 pieces: SentencePiece's RuntimeError becomes
    one line with its own reason, without the C++ file and condition."""
    chars = [chr(0x4E00 + i) for i in range(300)]
    d = tmp_path / "c"
    d.mkdir()
    (d / "train.en").write_text("".join(f"{c} x\n" for c in chars), encoding="utf-8")
    (d / "train.de").write_text("".join(f"{c} y\n" for c in chars), encoding="utf-8")
    prepare(structured(DataConfig(path=str(d), splits={"train": "train"})), tmp_path / "data")
    with pytest.raises(TokenizerError) as e:
        train_tokenizer(tok_cfg(vocab_size=280), tmp_path / "data", tmp_path / "tok")
    assert str(e.value) == (f"tokenizer.vocab_size=280: SentencePiece cannot train spm.model on the train split in "
                            f"{tmp_path}/data: Vocabulary size is smaller than required_chars. 280 vs 563. "
                            "Increase vocab_size or decrease character_coverage with --character_coverage option.")


def test_a_vocabulary_too_large_for_the_data_is_one_line_naming_the_key(tmp_path, monkeypatch):
    """With hard_vocab_limit=False this SentencePiece build trains a smaller vocabulary instead of
    refusing, so its refusal (as other builds word it) is simulated."""
    import mt.tokenizer

    def refuse(**kw):
        raise RuntimeError("Internal: src/trainer_interface.cc(664) [(trainer_spec_.vocab_size()) == "
                           "(model_proto->pieces_size())] Vocabulary size too high (9000). Please set it to a value <= 527.")

    monkeypatch.setattr(mt.tokenizer.spm.SentencePieceTrainer, "train", refuse)
    with pytest.raises(TokenizerError) as e:
        mt.tokenizer._train_model(tok_cfg(vocab_size=9000), iter(["a b"]), tmp_path / "src.model", "X")
    assert str(e.value) == ("tokenizer.vocab_size=9000: SentencePiece cannot train src.model on X: "
                            "Vocabulary size too high (9000). Please set it to a value <= 527.")


def test_sentencepiece_never_sees_an_empty_split(tmp_path):
    import mt.tokenizer

    with pytest.raises(DataError, match=r"^the train split in runs/x/data: no sentences to train SentencePiece on"):
        mt.tokenizer._train_model(tok_cfg(), iter([]), tmp_path / "spm.model", "the train split in runs/x/data")
