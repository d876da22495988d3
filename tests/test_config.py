"""Configuration: every recipe and group option composes; mistakes fail loudly, by name."""
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from mt.config import (BYTE_FALLBACK_MIN_VOCAB, CONF_DIR, RANGES, Config, ConfigError, DataConfig, DecodeConfig,
                       ModelConfig, TokenizerConfig, TrainConfig, compose_config, structured, validate)

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in ("data", "tokenizer", "model", "train", "decode")}


def test_recipes_exist_and_start_with_their_command():
    assert {"multi30k_en_de", "multi30k_de_en", "tatoeba_en_de", "bible_en_es", "iwslt2017_de_en",
            "wmt14_en_de"} <= set(RECIPES)
    for name in RECIPES:
        lines = (ROOT / "recipes" / f"{name}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_"
        assert lines[1].startswith(f"# mt-train recipe={name}"), name


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes(recipe):
    cfg = compose_config([f"recipe={recipe}"])
    assert cfg.name == recipe


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    compose_config([f"{group}={option}"])


def test_default_is_multi30k_en_de_and_overrides_apply():
    cfg = compose_config(["tokenizer.vocab_size=4000", "model.cell=lstm"])
    assert cfg.name == "multi30k_en_de" and cfg.data.path == "builtin:multi30k"
    assert cfg.tokenizer.vocab_size == 4000 and cfg.model.cell == "lstm"


def test_misspelled_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="train.lrr"):
        compose_config(["train.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown key tokenizer.vocab_sise; tokenizer has: joint, model_type"):
        compose_config(["+tokenizer.vocab_sise=10"])


def test_bad_choice_and_bad_type_fail_naming_the_key():
    with pytest.raises(ConfigError, match="model.cell='gruu' is not one of: gru, lstm, rnn_tanh, rnn_relu"):
        compose_config(["model.cell=gruu"])
    with pytest.raises(ConfigCompositionException, match="tokenizer.vocab_size"):
        compose_config(["tokenizer.vocab_size=many"])
    with pytest.raises(ConfigError, match="stages: unknown stage 'trian'"):
        compose_config(["stages=[prepare,trian]"])
    with pytest.raises(ConfigError, match="tie_embeddings=all needs tokenizer.joint=true"):
        compose_config(["model.tie_embeddings=all", "tokenizer=separate_8k"])


def test_cli_from_another_directory_prints_config(tmp_path):
    """Recipes are found from the package's location, not the working directory."""
    out = subprocess.run([sys.executable, "-m", "mt.pipeline", "recipe=multi30k_de_en", "--cfg", "job"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "name: multi30k_de_en" in out and "src_lang: de" in out


def test_cli_misspelled_key_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mt.pipeline", "train.lrr=1"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "train.lrr" in r.stderr


def numeric_keys(cls=Config, prefix=""):
    """Every int and float key of the config (lists of numbers included), as dotted paths."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, args = hints[f.name], set(typing.get_args(hints[f.name])) - {type(None)}
        if dataclasses.is_dataclass(tp):
            yield from numeric_keys(tp, f"{prefix}{f.name}.")
        elif tp in (int, float) or (args and args <= {int, float}):  # bool is its own type here
            yield prefix + f.name


def test_every_numeric_key_has_a_range_and_every_range_a_key():
    keys = set(numeric_keys())
    assert {"train.lr", "train.betas", "seed", "decode.top_p", "train.max_nonfinite"} <= keys
    assert sorted(keys - set(RANGES)) == [], "numeric keys without an entry in mt.config.RANGES"
    assert sorted(set(RANGES) - keys) == [], "RANGES entries that name no key"


def test_the_defaults_pass_validation():
    for cls in (DataConfig, TokenizerConfig, ModelConfig, TrainConfig, DecodeConfig):
        structured(cls())  # each dataclass's defaults
    validate(compose_config(["~recipe"]))  # conf/ without a recipe (every recipe: test_every_recipe_composes)


# (override, the whole message): key, value as parsed, allowed range
OUT_OF_RANGE = [
    ("train.valid_every=0", "train.valid_every=0 is out of range: must be >= 1"),
    ("train.log_every=0", "train.log_every=0 is out of range: must be >= 1"),
    ("train.accum_steps=0", "train.accum_steps=0 is out of range: must be >= 1"),
    ("tokenizer.vocab_size=0", "tokenizer.vocab_size=0 is out of range: must be >= 6"),
    ("train.max_len=0", "train.max_len=0 is out of range: must be >= 2"),
    ("train.lr=0", "train.lr=0.0 is out of range: must be > 0"),
    ("train.lr=-1", "train.lr=-1.0 is out of range: must be > 0"),
    ("train.lr=nan", "train.lr=nan is out of range: must be > 0"),
    ("model.dropout=1.0", "model.dropout=1.0 is out of range: must be in [0, 1)"),
    ("model.emb_dropout=-0.1", "model.emb_dropout=-0.1 is out of range: must be in [0, 1)"),
    ("model.word_dropout=1", "model.word_dropout=1.0 is out of range: must be in [0, 1)"),
    ("train.label_smoothing=1.0", "train.label_smoothing=1.0 is out of range: must be in [0, 1)"),
    ("decode.top_p=0", "decode.top_p=0.0 is out of range: must be in (0, 1]"),
    ("decode.top_p=1.5", "decode.top_p=1.5 is out of range: must be in (0, 1]"),
    ("decode.temperature=0", "decode.temperature=0.0 is out of range: must be > 0"),
    ("train.betas=[0.9,1.0]", "train.betas[1]=1.0 is out of range: must be in [0, 1)"),
    ("train.plateau_factor=0", "train.plateau_factor=0.0 is out of range: must be in (0, 1]"),
    ("train.teacher_forcing=1.5", "train.teacher_forcing=1.5 is out of range: must be in [0, 1]"),
    ("train.tf_decay_steps=0", "train.tf_decay_steps=0 is out of range: must be >= 1"),
    ("train.bucket_batches=0", "train.bucket_batches=0 is out of range: must be >= 1"),
    ("train.max_time=-1", "train.max_time=-1.0 is out of range: must be >= 0"),
    ("train.max_nonfinite=0", "train.max_nonfinite=0 is out of range: must be >= 1"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints=-1 is out of range: must be >= 0"),
    ("tokenizer.character_coverage=0", "tokenizer.character_coverage=0.0 is out of range: must be in (0, 1]"),
    ("tokenizer.seed=4294967296", "tokenizer.seed=4294967296 is out of range: must be in [0, 4294967295]"),
    ("seed=-1", "seed=-1 is out of range: must be in [0, 4294967295]"),
    ("model.enc_layers=0", "model.enc_layers=0 is out of range: must be >= 1"),
    ("data.max_ratio=0.5", "data.max_ratio=0.5 is out of range: must be 0 or >= 1"),
    ("data.max_words=-1", "data.max_words=-1 is out of range: must be >= 0"),
    ("data.num_proc=-1", "data.num_proc=-1 is out of range: must be >= 0"),
    ("decode.shortlist=-5", "decode.shortlist=-5 is out of range: must be >= 0"),
    ("decode.beam_size=0", "decode.beam_size=0 is out of range: must be >= 1"),
    ("decode.n_best=0", "decode.n_best=0 is out of range: must be >= 1"),
    ("decode.batch_size=0", "decode.batch_size=0 is out of range: must be >= 1"),
    ("decode.top_k=-1", "decode.top_k=-1 is out of range: must be >= 0"),
    ("decode.alpha=-1", "decode.alpha=-1.0 is out of range: must be >= 0"),
]


@pytest.mark.parametrize("override,message", OUT_OF_RANGE, ids=[o for o, _ in OUT_OF_RANGE])
def test_a_value_out_of_range_fails_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        compose_config([override])


def test_the_bounds_themselves_and_the_off_values_are_accepted():
    compose_config(["model.dropout=0", "decode.top_p=1", "train.teacher_forcing=0", "train.tf_min=1",
                    "data.max_ratio=0", "train.max_len=2", "train.clip_norm=0", "seed=4294967295",
                    "train.lr=1e6",  # no upper bound: the training loop's non-finite guard handles divergence
                    "tokenizer.byte_fallback=false", "tokenizer.vocab_size=6",
                    "decode.max_len_a=0", "decode.max_len_b=2"])
    compose_config(["data.max_ratio=1", "tokenizer.vocab_size=262", "train.batch_tokens=0", "train.batch_size=8"])


@pytest.mark.parametrize("overrides,message", [
    (["tokenizer.vocab_size=261"],
     "tokenizer.vocab_size=261 is out of range: must be >= 262 with tokenizer.byte_fallback=true"),
    (["decode.max_len_a=0", "decode.max_len_b=1"],
     "decode.max_len_a=0.0 with decode.max_len_b=1 leaves a one-piece source no token"),
    (["decode.max_len_a=0.5", "decode.max_len_b=1"], "need max_len_a + max_len_b >= 2"),
    (["train.betas=[0.9]"], "train.betas=[0.9] needs 2 values"),
    (["train.batch_tokens=0", "train.batch_size=0"], "set train.batch_tokens or train.batch_size to a positive number"),
    (["decode.n_best=6"], "decode.n_best=6 exceeds decode.beam_size=5"),
])
def test_combinations_that_cannot_work_fail_naming_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose_config(overrides)


def test_a_component_built_in_code_is_checked_under_its_full_key():
    """mt-translate and tests build components with structured(): the same ranges, the same names."""
    with pytest.raises(ConfigError, match=re.escape("decode.temperature=0.0 is out of range: must be > 0")):
        structured(DecodeConfig(method="sample", temperature=0.0))
    with pytest.raises(ConfigError, match=re.escape("decode.max_len_a=0.0 with decode.max_len_b=0")):
        structured(DecodeConfig(max_len_a=0.0, max_len_b=0))
    with pytest.raises(ConfigError, match=re.escape("train.valid_every=0 is out of range")):
        structured(TrainConfig(valid_every=0))


@pytest.mark.parametrize("model_type,byte_fallback",
                         [("unigram", False), ("bpe", False), ("unigram", True), ("bpe", True)])
def test_the_smallest_vocab_size_allowed_trains(model_type, byte_fallback, tmp_path):
    """The minimum is SentencePiece's: specials (+ 256 bytes) + the word boundary + one character;
    one less is refused by the config instead of ending in SentencePiece's traceback."""
    import sentencepiece as spm

    from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_PIECES, UNK_ID

    smallest = BYTE_FALLBACK_MIN_VOCAB if byte_fallback else 6
    cfg = dict(model_type=model_type, byte_fallback=byte_fallback, vocab_size=smallest)
    structured(TokenizerConfig(**cfg))
    # mt.tokenizer's settings that decide the pieces; a corpus of one character
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a", "aa", "a a"] * 10), model_prefix=str(tmp_path / "spm"),
                                   **cfg, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                                   **SPECIAL_PIECES, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model")).get_piece_size() == smallest
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        structured(TokenizerConfig(**{**cfg, "vocab_size": smallest - 1}))


def test_cli_value_out_of_range_is_one_line_and_exit_1(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mt.pipeline", "train.valid_every=0", "stages=[train]"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "train.valid_every=0 is out of range: must be >= 1" in r.stderr
    assert "Traceback" not in r.stderr
