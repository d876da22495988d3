"""The quality side by side's log parser (recipes/bench/peers/parse_quality.py): each toolkit's
validation lines become a curve mt-plot reads, and the QUALITY lines a table."""
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARSER = ROOT / "recipes" / "bench" / "peers" / "parse_quality.py"

# one validation line as each toolkit writes it, behind runlog.py's seconds-since-start prefix,
# among lines that must not count (training progress; a test-time beam search line)
LOGS = {
    "joeynmt": [
        "61.500 2026-12-03 13:50:01,123 - INFO - joeynmt.training - Epoch   1, Step:      100, Batch Loss: 4.5",
        "120.000 2026-12-03 13:51:00,000 - INFO - joeynmt.prediction - Evaluation result (greedy): "
        "bleu:  12.34, loss:  40.00, ppl:  20.00, acc:   0.40, 30.1[sec]",
        "240.000 2026-12-03 13:53:00,000 - INFO - joeynmt.prediction - Evaluation result (greedy): "
        "bleu:  20.50, loss:  30.00, ppl:  10.00, acc:   0.50, 30.1[sec]",
        "300.000 2026-12-03 13:54:00,000 - INFO - joeynmt.prediction - Evaluation result (beam search): "
        "bleu:  99.00, loss:  30.00, 30.1[sec]",
    ],
    "onmt": [
        "60.000 [2026-12-03 13:41:48,140 INFO] Step 50/10000000; acc: 6.9; ppl: 16779.2;",
        "120.000 [2026-12-03 13:42:04,315 INFO] validation BLEU: 12.34",
        "240.000 [2026-12-03 13:42:04,315 INFO] Validation perplexity: 2031.26",
        "360.000 [2026-12-03 13:44:04,315 INFO] validation BLEU: 20.5",
    ],
    "fairseq": [
        '60.000 2026-12-03 13:45:06 | INFO | train_inner | {"epoch": 1, "loss": "8.5"}',
        '120.000 2026-12-03 13:45:06 | INFO | valid | {"epoch": 1, "valid_loss": "7.705", "valid_bleu": "12.34"}',
        '240.000 2026-12-03 13:47:06 | INFO | valid | {"epoch": 2, "valid_loss": "6.1", "valid_bleu": "20.5"}',
    ],
}


def run_parser(out, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["parse_quality.py", str(out)])
    runpy.run_path(str(PARSER), run_name="__main__")
    return capsys.readouterr().out


def test_every_toolkits_validations_become_a_curve(tmp_path, capsys, monkeypatch):
    for peer, lines in LOGS.items():
        (tmp_path / peer).mkdir()
        (tmp_path / peer / "train.log").write_text("\n".join(lines + ["#RUNLOG rc=0 wall_s=1800.0 maxrss_kb=1"]) + "\n")
    run_parser(tmp_path, capsys, monkeypatch)
    for peer, lines in LOGS.items():
        rows = (tmp_path / "curves" / f"{peer}.tsv").read_text().splitlines()
        assert rows[0] == "minutes\tvalid_bleu"
        assert [r.split("\t")[1] for r in rows[1:]] == ["12.34", "20.50"], peer
        assert rows[1].split("\t")[0] == "2.00"  # 120 s after the start


def test_the_table_has_a_row_per_toolkit_and_the_signature(tmp_path, capsys, monkeypatch):
    (tmp_path / "results.txt").write_text(
        "HOST 2 cpus\n"
        "QUALITY peer=ours budget_min=30 lines=1000 train_wall_s=1815.0 "
        "BLEU|nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0 = 36.1 67.0/42.0 (BP = 1.000) "
        "chrF2|nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:2.6.0 = 60.2 "
        "TER|nrefs:1|case:lc|tok:tercom|norm:no|punct:yes|asian:no|version:2.6.0 = 48.5\n"
        "QUALITY peer=onmt status=FAILED build_vocab\n")
    out = run_parser(tmp_path, capsys, monkeypatch)
    assert "| ours | 30.2 | 36.1 | 60.2 | 48.5 |" in out
    assert "| onmt | | FAILED | | |" in out
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0" in out
