"""The whole recipe, tiny: every stage in seconds, skipping what is done, from the shell too."""
import json
import os
import subprocess
import sys

import pytest

from mt.pipeline import run
from mt.tokenizer import Tokenizer

from conftest import tiny_overrides


def test_every_stage_end_to_end_then_skips(tiny_cfg, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    results = run(tiny_cfg(), run_dir)
    assert set(results) == {"prepare", "tokenizer", "train", "translate", "score"}
    assert results["prepare"]["splits"]["test"]["kept"] == 40
    hyp = (run_dir / "test.hyp").read_text(encoding="utf-8").split("\n")
    assert len(hyp) == 41 and hyp[-1] == ""  # one line per test sentence
    scores = json.loads((run_dir / "test.scores.json").read_text())
    assert [s["name"] for s in scores] == ["BLEU", "chrF2", "TER"]
    assert scores[0]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    for f in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.jsonl", "mt.log", "config.yaml"):
        assert (run_dir / f).is_file(), f
    mtimes = {p: os.stat(p).st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".log"}
    again = run(tiny_cfg(), run_dir)
    assert again["train"]["step"] == results["train"]["step"]
    changed = [p for p, m in mtimes.items() if p.exists() and os.stat(p).st_mtime_ns != m and p.name != "config.yaml"]
    assert changed == [], changed
    assert "train: done (reached train.max_steps=20), skipped" in (run_dir / "mt.log").read_text()


def test_selected_stages_and_missing_prerequisites(tiny_cfg, tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(FileNotFoundError, match=r"run the prepare stage first"):
        run(tiny_cfg(stages="[tokenizer]"), run_dir)
    out = run(tiny_cfg(stages="[prepare,tokenizer]"), run_dir)
    assert set(out) == {"prepare", "tokenizer"} and not (run_dir / "checkpoints").exists()


def test_vocab_size_override_changes_the_sentencepiece_model(tiny_cfg, tmp_path):
    run_dir = tmp_path / "r"
    run(tiny_cfg(stages="[prepare,tokenizer]"), run_dir)
    first = (run_dir / "tokenizer" / "spm.model").read_bytes()
    run(tiny_cfg(stages="[prepare,tokenizer]", **{"tokenizer.vocab_size": 420}), run_dir)
    assert (run_dir / "tokenizer" / "spm.model").read_bytes() != first
    assert Tokenizer.from_dir(run_dir / "tokenizer").src_vocab_size == 420


def test_mt_train_command_and_multirun(small_corpus, tmp_path):
    overrides = tiny_overrides(small_corpus, stages="[prepare,tokenizer]")
    cmd = [sys.executable, "-m", "mt.pipeline"]
    r = subprocess.run(cmd + overrides, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "prepare: train: 1500 pairs kept of 1500" in r.stderr and "vocabulary 500" in r.stderr
    assert r.stdout == ""  # logs go to stderr
    r = subprocess.run(cmd + ["-m"] + overrides + ["tokenizer.vocab_size=420,450"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for job, v in enumerate((420, 450)):
        assert Tokenizer.from_dir(tmp_path / "runs" / "tiny" / "multirun" / str(job) / "tokenizer").src_vocab_size == v
    # the data is the single run's: prepared once, in the shared cache; two vocabularies, two tokenizers
    assert "pairs kept" not in r.stderr and r.stderr.count("prepare: up to date") == 2
    assert r.stderr.count("tokenizer: unigram joint model") == 2


def test_a_multirun_prepares_data_and_trains_sentencepiece_once(small_corpus, tmp_path):
    cmd = [sys.executable, "-m", "mt.pipeline", "-m"] + tiny_overrides(small_corpus, stages="[prepare,tokenizer]")
    r = subprocess.run(cmd + ["train.lr=1e-3,3e-4"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("prepare: train: 1500 pairs kept") == 1 and r.stderr.count("prepare: up to date") == 1
    assert r.stderr.count("tokenizer: unigram joint model") == 1 and r.stderr.count("tokenizer: up to date") == 1
    jobs = [tmp_path / "runs" / "tiny" / "multirun" / str(j) for j in (0, 1)]
    for kind in ("data", "tokenizer"):
        a, b = (j / kind for j in jobs)
        assert a.is_symlink() and a.resolve() == b.resolve()
        assert a.resolve().parent == (tmp_path / "runs" / ".cache" / kind).resolve()


def test_mt_train_bad_input_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mt.pipeline", "stages=[prepare]", f"data.path={tmp_path}/nowhere"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"mt-train: error: data.path: no such directory: {tmp_path}/nowhere"
