"""recipes/multi30k_en_de_distill.sh, run as its first comment says, on a small corpus with tiny
models: the student trains on exactly what the teachers' ensemble translated, validates and is
scored on the untouched references, the clock holds every piece of work, a second run resumes
without redoing any, and bad settings or a spent budget stop it in one line."""
import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import builtin_lines

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "recipes" / "multi30k_en_de_distill.sh"
BIN = Path(sys.executable).parent
TINY = ("tokenizer.vocab_size=500 model=tiny train=debug train.max_steps=40 train.valid_every=20 "
        "train.average_last=2 decode.beam_size=2 decode.max_len_b=5 device=cpu train.precision=fp32")
DISTILL_ARGS = "--beam 2 --max-len-b 5"


def corpus(folder: Path) -> Path:
    """train (gzipped, as the built-in copy is), valid, test2016 in the built-in layout."""
    folder.mkdir()
    for split, n in {"train": 400, "valid": 20, "test2016": 15}.items():
        for lang in ("en", "de"):
            text = "\n".join(builtin_lines(split, lang, n)) + "\n"
            if split == "train":
                with gzip.open(folder / f"{split}.{lang}.gz", "wt", encoding="utf-8") as f:
                    f.write(text)
            else:
                (folder / f"{split}.{lang}").write_text(text, encoding="utf-8")
    return folder


def distill(cwd: Path, **env):
    env = {**os.environ, "MT_BIN": str(BIN), "TEACHERS": "2", "BUDGET_MIN": "30", "EXTRA": TINY,
           "DISTILL_ARGS": DISTILL_ARGS, "NAME": "kd", **env}
    return subprocess.run(["bash", SCRIPT], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def lines(path: Path):
    return path.read_text(encoding="utf-8").splitlines()


def test_the_first_comment_is_the_command():
    assert SCRIPT.read_text(encoding="utf-8").splitlines()[1].startswith("# bash recipes/multi30k_en_de_distill.sh")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One finished run: (its folder, the corpus, the script's result)."""
    cwd = tmp_path_factory.mktemp("distill")
    src = corpus(cwd / "corpus")
    r = distill(cwd, CORPUS=str(src))
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, src, r


def test_the_student_learns_the_ensembles_translations(done):
    cwd, src, _ = done
    data = cwd / "runs" / "kd" / "data"
    source = builtin_lines("train", "en", 400)
    assert lines(data / "train.en") == source
    teachers = [a for i in range(2) for a in ("-m", str(cwd / "runs" / "kd_teachers" / "multirun" / str(i)))]
    again = subprocess.run([BIN / "mt-translate", *teachers, *DISTILL_ARGS.split(), "-q"], input="\n".join(source) + "\n",
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines(data / "train.de") == again != builtin_lines("train", "de", 400)
    config = (cwd / "runs" / "kd_student" / "config.yaml").read_text(encoding="utf-8")
    assert f"path: {data}" in config
    # valid (which picks the student's checkpoints) and test are the corpus's own references
    assert lines(data / "valid.de") == lines(src / "valid.de")
    assert lines(data / "test2016.de") == lines(src / "test2016.de")
    assert (cwd / "runs" / "kd_student" / "test.scores.json").is_file()


def test_the_clock_counts_every_piece_and_the_summary_adds_them(done):
    cwd, _, r = done
    clock = [line.split() for line in lines(cwd / "runs" / "kd" / "clock")]
    pieces = [p for p, _ in clock]
    assert pieces == ["teachers", "teachers_done", "distill", "student_prep", "student_prep_done",
                      "student", "student_done"]
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("DISTILL teachers_min=")
    total = float(summary.rsplit("total_min=", 1)[1])
    assert total == pytest.approx(sum(float(s) for _, s in clock) / 60, abs=0.1)
    # the student trains for the 30 minutes less what the pieces before it took, less one
    said = next(x for x in r.stderr.splitlines() if x.startswith("[distill] student: "))
    minutes, before = float(said.split()[2]), float(said.split("(")[1].split()[0])
    assert before == pytest.approx(sum(float(s) for p, s in clock if p != "student"), abs=0.1)
    assert minutes == pytest.approx(30 - before / 60 - 1, abs=0.01)


def test_a_second_run_redoes_nothing(done):
    cwd, src, _ = done
    clock = cwd / "runs" / "kd" / "clock"
    before = clock.read_text(encoding="utf-8")
    r = distill(cwd, CORPUS=str(src))
    assert r.returncode == 0, r.stderr[-3000:]
    assert clock.read_text(encoding="utf-8") == before
    assert "teachers: done" in r.stderr


def test_a_spent_budget_stops_before_the_student_in_one_line(done, tmp_path):
    cwd, src, _ = done
    clock = cwd / "runs" / "kd" / "clock"
    before = clock.read_text(encoding="utf-8")
    try:  # as if the student had not trained yet, with a budget the teachers already used up
        clock.write_text("".join(x for x in before.splitlines(True) if not x.startswith("student ")
                                 and not x.startswith("student_done")), encoding="utf-8")
        r = distill(cwd, CORPUS=str(src), BUDGET_MIN="0.01")
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1].startswith("multi30k_en_de_distill: no time left for the student")
    finally:
        clock.write_text(before, encoding="utf-8")


@pytest.mark.parametrize("env, says", [({"TEACHERS": "0"}, "TEACHERS=0"), ({"KD_DATA": "all"}, "KD_DATA=all"),
                                       ({"BUDGET_MIN": "ninety"}, "BUDGET_MIN=ninety"),
                                       ({"CORPUS": "/no/such/folder"}, "CORPUS=/no/such/folder")])
def test_bad_settings_fail_in_one_line(env, says, tmp_path):
    r = distill(tmp_path, **env)
    assert r.returncode == 2
    assert says in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
