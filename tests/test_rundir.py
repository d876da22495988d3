"""The run directory's layout and its one stamp mechanism: every stage's stamp reads as done
after it is written, not after its inputs or settings change, and a stamp is never half-written."""
import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import mt.translate
from mt import rundir
from mt.config import compose_config
from mt.data import fingerprint as data_fingerprint, load_split, prepare
from mt.evaluate import score_test
from mt.rundir import RunDir, file_digest, fingerprint, is_done, read_stamp, write_stamp
from mt.tokenizer import fingerprint as tokenizer_fingerprint, train_tokenizer
from mt.translate import translate_test

from conftest import tiny_overrides

# the names runs on disk have today: a run made before mt/rundir.py must be found as it is
TODAY = {"config": "config.yaml", "log": "mt.log", "data": "data", "data_stamp": "data/stats.json",
         "tokenizer": "tokenizer", "tokenizer_stamp": "tokenizer/stamp.json", "ids": "tokenizer/ids",
         "checkpoints": "checkpoints", "last": "checkpoints/last.pt", "best": "checkpoints/best.pt",
         "averaged": "checkpoints/averaged.json", "old": "old", "metrics": "metrics.jsonl", "tb": "tb",
         "curves": "curves.png", "hyp": "test.hyp", "hyp_stamp": "test.hyp.stamp",
         "scores": "test.scores.json", "scores_stamp": "test.scores.stamp"}


def test_the_layout_is_the_one_runs_have_on_disk(tmp_path):
    run = RunDir(tmp_path)
    assert {name: getattr(run, name) for name in TODAY} == {n: tmp_path / rel for n, rel in TODAY.items()}
    assert RunDir.best == Path("checkpoints/best.pt")  # on the class: relative to a run's root
    assert run.step_checkpoint(1200) == tmp_path / "checkpoints" / "step_00001200.pt"
    assert rundir.step_of(run.step_checkpoint(1200)) == 1200 and rundir.step_of(run.best) is None
    assert run.attention("test_12") == tmp_path / "attention_test_12.png"
    assert RunDir(str(tmp_path)) == run  # a str is a Path


@pytest.mark.parametrize("name", ["last", "best", "averaged"])
def test_of_checkpoint_finds_the_run_a_checkpoint_is_in(tmp_path, name):
    run = RunDir(tmp_path / "runs" / "x")
    assert RunDir.of_checkpoint(getattr(run, name)) == run
    assert RunDir.of_checkpoint(run.step_checkpoint(7)) == run
    assert RunDir.of_checkpoint(tmp_path / "elsewhere" / "best.pt") is None
    assert RunDir.of_checkpoint(Path("best.pt")) is None


def test_fingerprints_are_the_ones_existing_stamps_hold():
    value = [2, {"b": 1, "a": [None, "x"]}, ["train.en", 12, 1700000000]]
    before = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]  # the old formula
    assert fingerprint(value) == before
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1}) != fingerprint({"a": 1, "b": 3})


def test_file_digest_follows_the_content_not_the_times(tmp_path):
    f = tmp_path / "best.pt"
    f.write_bytes(b"weights")
    digest = file_digest(f)
    os.utime(f, (1, 1))
    assert file_digest(f) == digest
    f.write_bytes(b"other weights")
    assert file_digest(f) != digest


def test_a_stamp_is_done_for_its_fingerprint_only(tmp_path):
    stamp = tmp_path / "deep" / "stamp.json"
    assert not is_done(stamp, "0123456789abcdef")
    record = write_stamp(stamp, "0123456789abcdef", pairs={"train": 3})
    assert record == read_stamp(stamp) == {"fingerprint": "0123456789abcdef", "pairs": {"train": 3}}
    assert is_done(stamp, "0123456789abcdef") and not is_done(stamp, "fedcba9876543210")
    assert stamp.read_text() == json.dumps(record, indent=2) + "\n"  # the format stats.json always had


@pytest.mark.parametrize("text", ["", '{"fingerpr', "3f9a0c1d2e4b5a6f\n", "1234567890123456\n", "[1, 2]",
                                  '{"fingerprint": 5}', '{"splits": {}}', b"\xff\xfe"])
def test_a_partial_foreign_or_old_format_stamp_is_not_done_and_never_raises(tmp_path, text):
    stamp = tmp_path / "test.hyp.stamp"  # "3f9a...": what test.hyp.stamp held before: redone once
    stamp.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert read_stamp(stamp) is None and not is_done(stamp, "3f9a0c1d2e4b5a6f")
    assert read_stamp(tmp_path) is None  # a folder where the stamp should be


@pytest.mark.parametrize("fails", ["os.replace", "os.fsync"])
def test_a_failed_write_leaves_the_old_stamp_whole_and_no_temporary_file(tmp_path, monkeypatch, fails):
    stamp = tmp_path / "stamp.json"
    write_stamp(stamp, "aaaaaaaaaaaaaaaa")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fails, full_disk)
    with pytest.raises(OSError):
        write_stamp(stamp, "bbbbbbbbbbbbbbbb", pairs={"train": 1})
    monkeypatch.undo()
    assert is_done(stamp, "aaaaaaaaaaaaaaaa") and sorted(os.listdir(tmp_path)) == ["stamp.json"]


# --- every stage's stamp ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg(small_corpus):
    return compose_config(tiny_overrides(small_corpus))


@pytest.fixture(scope="module")
def prepared(cfg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(cfg.data, out)
    return out


@pytest.fixture
def run(prepared, tmp_path) -> RunDir:
    """A run whose data/ links to the prepared splits, as the pipeline's runs do."""
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.data.symlink_to(prepared, target_is_directory=True)
    return run


def with_(cfg, **keys):
    """A copy of `cfg` with dotted keys set: with_(cfg, **{"decode.beam_size": 3})."""
    new = copy.deepcopy(cfg)
    for key, value in keys.items():
        section, name = key.split(".")
        new[section][name] = value
    return new


def test_prepare_is_done_until_its_settings_or_its_input_files_change(cfg, prepared, small_corpus, tmp_path):
    stamp = prepared / rundir.DATA_STAMP
    assert is_done(stamp, data_fingerprint(cfg.data))
    assert read_stamp(stamp) == prepare(cfg.data, prepared)  # skipped: the stamp is the statistics
    assert not is_done(stamp, data_fingerprint(with_(cfg, **{"data.max_words": 7}).data))
    copied = tmp_path / "corpus"
    shutil.copytree(small_corpus, copied)
    moved = with_(cfg, **{"data.path": str(copied)}).data
    fp = data_fingerprint(moved)
    with open(copied / "train.en", "a", encoding="utf-8") as f:
        f.write("one more line\n")
    os.utime(copied / "train.en", (2_000_000_000, 2_000_000_000))
    assert data_fingerprint(moved) != fp


def test_the_tokenizer_is_done_until_its_settings_or_its_data_change(cfg, run):
    tok_dir = run.root / "tok"
    train_tokenizer(cfg.tokenizer, run.data, tok_dir)
    stamp, data_fp = tok_dir / rundir.TOKENIZER_STAMP, read_stamp(run.data_stamp)["fingerprint"]
    assert is_done(stamp, tokenizer_fingerprint(cfg.tokenizer, data_fp))
    assert read_stamp(stamp)["src_vocab_size"] == 500
    assert not is_done(stamp, tokenizer_fingerprint(with_(cfg, **{"tokenizer.vocab_size": 420}).tokenizer, data_fp))
    assert not is_done(stamp, tokenizer_fingerprint(cfg.tokenizer, "0" * 16))


class Echo:
    """Stands in for a Translator: what the stage decides to (re)do is the subject, not decoding."""

    def __init__(self, calls):
        self.calls = calls

    def translate_lines(self, lines):
        self.calls.append(len(lines))
        return (line.upper() for line in lines)


def test_translate_is_done_until_the_checkpoint_or_the_decoding_changes(cfg, run, monkeypatch):
    calls = []
    monkeypatch.setattr(mt.translate.Translator, "from_path", classmethod(lambda cls, *a: Echo(calls)))
    run.checkpoints.mkdir()
    run.best.write_bytes(b"weights")
    translate_test(cfg, run.root)
    assert len(calls) == 1 and run.hyp.read_text().splitlines()[0].isupper()
    translate_test(cfg, run.root)
    os.utime(run.best, (1, 1))  # a copy that lost its times: still the same weights
    translate_test(cfg, run.root)
    assert len(calls) == 1
    translate_test(with_(cfg, **{"decode.beam_size": 3}), run.root)
    assert len(calls) == 2
    run.best.write_bytes(b"trained further")
    translate_test(cfg, run.root)
    assert len(calls) == 3
    run.hyp_stamp.write_text("3f9a0c1d2e4b5a6f\n")  # the stamp's format before mt/rundir.py
    translate_test(cfg, run.root)
    assert len(calls) == 4 and read_stamp(run.hyp_stamp) is not None


def test_score_is_done_until_the_hypotheses_change(cfg, run):
    refs = list(load_split(run.data, "test")["tgt_raw"])
    run.hyp.write_text("\n".join(refs) + "\n", encoding="utf-8")
    assert score_test(cfg, run.root)[0]["score"] == 100.0
    scored = run.scores.stat().st_mtime_ns
    score_test(cfg, run.root)
    assert run.scores.stat().st_mtime_ns == scored  # skipped
    run.hyp.write_text("\n".join(["x"] * len(refs)) + "\n", encoding="utf-8")
    assert score_test(cfg, run.root)[0]["score"] < 1
    run.scores_stamp.unlink()  # a run scored before the stamp existed: scored once more
    assert score_test(cfg, run.root)[0]["score"] < 1 and read_stamp(run.scores_stamp) is not None
