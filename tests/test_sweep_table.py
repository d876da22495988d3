"""recipes/bench/sweep_table.py: a multirun's jobs become one table row each, ranked by valid BLEU
(the better of the best single validation and the averaged weights); jobs that have not yet
validated are left out with a line on stderr; test scores are never read."""
import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "bench" / "sweep_table.py"


def _job(root: Path, num: int, lr: str, valid: list, averaged=None) -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(f"- recipe=quick\n- train.lr={lr}\n", encoding="utf-8")
    lines = [{"kind": "train", "step": 1, "loss": 9.0}]
    lines += [{"kind": "valid", "step": 200 * (i + 1), "bleu": b, "minutes": 1.5 * (i + 1)} for i, b in enumerate(valid)]
    (job / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    (job / "test.scores.json").write_text('{"bleu": 99.0}', encoding="utf-8")  # must never show
    if averaged is not None:
        (job / "checkpoints").mkdir()
        (job / "checkpoints" / "averaged.json").write_text(json.dumps({"bleu": averaged}), encoding="utf-8")


def _run(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *map(str, args)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    return capsys.readouterr()


def test_jobs_are_ranked_by_valid_bleu_and_shared_overrides_go_above(tmp_path, monkeypatch, capsys):
    _job(tmp_path, 0, "0.003", [20.0, 30.0], averaged=31.0)
    _job(tmp_path, 1, "0.004", [22.0, 33.0])
    _job(tmp_path, 2, "0.005", [])  # still running: no validation yet
    out = _run(monkeypatch, capsys, tmp_path)
    rows = [line for line in out.out.splitlines() if line.startswith(f"| {tmp_path}")]
    assert out.out.splitlines()[0] == "all jobs: `recipe=quick`"
    assert [r.split("|")[2].strip() for r in rows] == ["`train.lr=0.004`", "`train.lr=0.003`"]
    assert rows[0].split("|")[3:7] == [" 400 ", " 3.0 ", " 33.0 ", " - "]
    assert rows[1].split("|")[5:7] == [" 30.0 ", " 31.0 "]
    assert "99" not in out.out
    assert f"{tmp_path / '2'}: no validation yet" in out.err


def test_a_missing_multirun_directory_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_:
        _run(monkeypatch, capsys, tmp_path / "nope")
    assert str(exit_.value) == f"{tmp_path / 'nope'}: no such multirun directory"
