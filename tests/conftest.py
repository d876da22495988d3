"""Shared fixtures: a small slice of the built-in Multi30k corpus, and tiny-run configs."""
import gzip
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# datasets' own cache (where Hub loads go unless data.hub_cache_dir says otherwise): a fresh one
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mt-tests-hf-"))

from mt.config import compose_config  # noqa: E402
from mt.data import BUILTIN_DIR  # noqa: E402

SIZES = {"train": 1500, "valid": 60, "test2016": 40}


def builtin_lines(split: str, lang: str, n: int):
    with gzip.open(BUILTIN_DIR / "multi30k" / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="session", autouse=True)
def _work_in_a_temporary_folder(tmp_path_factory):
    """Tests run where a user would: relative paths (runs/, runs/.cache) land in an empty
    folder of their own, never in the checkout."""
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(old)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """train/valid/test2016.{en,de}: the first lines of the built-in Multi30k splits."""
    d = tmp_path_factory.mktemp("multi30k_small")
    for split, n in SIZES.items():
        for lang in ("en", "de"):
            (d / f"{split}.{lang}").write_text("\n".join(builtin_lines(split, lang, n)) + "\n", encoding="utf-8")
    return d


def tiny_overrides(corpus: Path, **extra) -> list:
    """A run that finishes every stage in seconds on the small corpus."""
    o = {"name": "tiny", "data.path": str(corpus), "tokenizer.vocab_size": 500, "model": "tiny",
         "train": "debug", "decode.beam_size": 2, "decode.max_len_b": 5, "device": "cpu",
         "train.precision": "fp32"}  # the recipe's auto measures matrix products first: 2 s a run
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


@pytest.fixture
def tiny_cfg(small_corpus):
    def make(**extra):
        return compose_config(tiny_overrides(small_corpus, **extra))
    return make
