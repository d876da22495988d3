"""Configuration: every recipe and group option composes; mistakes fail loudly, by name."""
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from mt.config import CONF_DIR, ConfigError, compose_config

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


@pytest.mark.parametrize("override,message", [("data.num_proc=-1", "data.num_proc must be >= 0"),
                                              ("decode.shortlist=-5", "decode.shortlist must be >= 0")])
def test_the_new_counts_are_range_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        compose_config([override])
