"""The shell tools: mt-translate as a Unix filter, mt-evaluate as sacrebleu, mt-plot."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mt.pipeline import run

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    """A tiny model trained through every stage (shared by the tests below)."""
    from mt.config import compose_config
    from conftest import tiny_overrides

    run_dir = tmp_path_factory.mktemp("cli") / "runs" / "tiny"
    run(compose_config(tiny_overrides(small_corpus)), run_dir)
    return run_dir


def sh(args, stdin="", **kw):
    return subprocess.run(args, input=stdin.encode() if isinstance(stdin, str) else stdin, capture_output=True, **kw)


def test_translate_keeps_one_line_per_input_line(trained):
    lines = ["A dog runs.", "", "Two men ride bikes through the city.", "   ", "x" * 3000, "A\u2028B"]
    r = sh([BIN / "mt-translate", "-m", trained, "--beam", "2", "--batch-size", "2"], "\n".join(lines) + "\n")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode("utf-8").split("\n")
    assert len(out) == len(lines) + 1 and out[-1] == ""
    assert out[1] == "" and out[3] == ""  # empty (or blank) in, empty out
    assert "longer than the" in r.stderr.decode() and "line 5" in r.stderr.decode()
    assert "INFO" not in r.stdout.decode()


def test_translate_file_options_formats_and_greedy_equals_beam_one(trained, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("A man.\nA woman sings.\n", encoding="utf-8")
    g = sh([BIN / "mt-translate", "-m", trained, "--greedy", "-i", src, "-o", tmp_path / "g.txt"], check=True)
    b = sh([BIN / "mt-translate", "-m", trained, "--beam", "1", "-i", src, "-o", tmp_path / "b.txt"], check=True)
    assert "greedy search" in g.stderr.decode() and "beam search" in b.stderr.decode()  # two code paths
    assert (tmp_path / "g.txt").read_text() == (tmp_path / "b.txt").read_text()
    r = sh([BIN / "mt-translate", "-m", trained / "checkpoints" / "best.pt", "--beam", "3", "--n-best", "3",
            "--format", "jsonl", "-i", src], check=True)
    rows = [json.loads(x) for x in r.stdout.decode().splitlines()]
    assert [x["id"] for x in rows] == [1, 2] and all(len(x["hyps"]) == 3 for x in rows)
    assert rows[0]["src"] == "A man." and rows[0]["hyps"][0]["score"] >= rows[0]["hyps"][1]["score"]
    r = sh([BIN / "mt-translate", "-m", trained, "--beam", "2", "--n-best", "2", "--format", "tsv", "-i", src], check=True)
    assert [line.split("\t")[:2] for line in r.stdout.decode().splitlines()] == [["1", "1"], ["1", "2"], ["2", "1"], ["2", "2"]]
    r = sh([BIN / "mt-translate", "-m", trained, "--sample", "--seed", "3", "--top-k", "5", "-i", src], check=True)
    assert len(r.stdout.decode().splitlines()) == 2


def test_translate_errors_are_one_line(trained, tmp_path):
    r = sh([BIN / "mt-translate", "-m", tmp_path / "nothing"])
    assert r.returncode == 1 and r.stderr.decode().strip().splitlines()[-1].startswith("mt-translate: error: no checkpoint")
    r = sh([BIN / "mt-translate", "-m", trained, "-q"], b"ok\n\xff\xfe\n")
    assert r.returncode == 1 and "stdin:2: invalid UTF-8" in r.stderr.decode()
    r = sh([BIN / "mt-translate", "-m", trained, "--n-best", "2", "--beam", "2"], "x\n")
    assert r.returncode == 1 and "--format tsv or jsonl" in r.stderr.decode()


@pytest.mark.parametrize("command", ["mt.translate", "mt.evaluate", "mt.plot"])
def test_an_inconsistent_checkpoint_is_one_error_line_from_every_loader(command, small_corpus, tmp_path):
    """best.pt with a NaN in its weights (no training run needed): each command that loads a
    model refuses it before translating anything, in one line, without a traceback."""
    from test_decoding import TAMPERED, write_tiny_checkpoint

    run_dir = tmp_path / "runs" / "x"
    best = write_tiny_checkpoint(small_corpus, run_dir / "checkpoints" / "best.pt", TAMPERED["NaN"][0])
    (run_dir / "metrics.jsonl").write_text(  # mt-plot draws the curves before it loads the model
        '{"kind": "train", "step": 1, "loss": 5.0}\n'
        '{"kind": "valid", "step": 1, "loss": 5.0, "bleu": 0.0, "chrf": 1.0}\n')
    args = {"mt.translate": ["-m", run_dir], "mt.evaluate": ["--run", run_dir],
            "mt.plot": [run_dir, "--text", "A dog runs."]}[command]
    r = sh([sys.executable, "-m", command, *args, "--device", "cpu"], "A dog runs.\n")
    err = r.stderr.decode()
    prefix = f"{command.replace('.', '-')}: error: {best} holds non-finite values in encoder.rnn.weight_ih_l0"
    assert r.returncode == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith(prefix), err


def test_translate_streams_and_survives_a_closed_pipe(trained):
    """Output for the first batch appears before stdin is closed; `| head -1` ends cleanly."""
    proc = subprocess.Popen([BIN / "mt-translate", "-m", trained, "--buffer-size", "1", "-q"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"A dog.\n")
    proc.stdin.flush()
    first = proc.stdout.readline()  # would block forever if output waited for EOF
    assert first.endswith(b"\n")
    proc.stdin.close()
    proc.wait(timeout=60)
    text = "\n".join(["A dog runs."] * 300) + "\n"
    r = subprocess.run(f"'{BIN / 'mt-translate'}' -m '{trained}' -q --greedy | head -1", shell=True, input=text.encode(),
                       capture_output=True)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
    assert b"BrokenPipe" not in r.stderr and b"Traceback" not in r.stderr


def test_evaluate_prints_what_sacrebleu_prints(tmp_path):
    hyp = ["The cat sat on the mat.", "A dog runs in the park .", "", "Ein Test"]
    ref = ["The cat sat on a mat.", "A dog is running in the park.", "Something", "Ein Test"]
    (tmp_path / "hyp").write_text("\n".join(hyp) + "\n")
    (tmp_path / "ref").write_text("\n".join(ref) + "\n")
    (tmp_path / "ref2").write_text("\n".join(reversed(ref)) + "\n")
    for extra in ([], ["-m", "bleu", "chrf", "ter"], ["-f", "text", "-m", "bleu", "chrf"], ["-b"], ["-b", "-m", "chrf", "ter"],
                  ["-lc", "-tok", "intl"], ["-w", "3"]):
        for refs in (["ref"], ["ref", "ref2"]):
            ours = sh([BIN / "mt-evaluate", *refs, "-i", "hyp", *extra], cwd=tmp_path)
            theirs = sh([BIN / "sacrebleu", *refs, "-i", "hyp", *extra], cwd=tmp_path)
            assert ours.returncode == 0, ours.stderr.decode()
            assert ours.stdout == theirs.stdout, (extra, refs)
    via_stdin = sh([BIN / "mt-evaluate", "ref", "-b"], "\n".join(hyp) + "\n", cwd=tmp_path)
    assert via_stdin.stdout == sh([BIN / "sacrebleu", "ref", "-i", "hyp", "-b"], cwd=tmp_path).stdout


def test_evaluate_line_count_mismatch_is_an_error(tmp_path):
    (tmp_path / "ref").write_text("a\nb\n")
    r = sh([BIN / "mt-evaluate", tmp_path / "ref"], "a\n")
    assert r.returncode == 1 and f"stdin has 1 lines, {tmp_path / 'ref'} has 2" in r.stderr.decode()


def test_evaluate_translates_and_scores_a_run(trained):
    r = sh([BIN / "mt-evaluate", "--run", trained, "--split", "test", "-m", "bleu", "chrf"], check=True)
    results = json.loads(r.stdout)
    assert [x["name"] for x in results] == ["BLEU", "chrF2"]
    scores = json.loads((trained / "test.scores.json").read_text())
    assert results[0]["score"] == scores[0]["score"]  # same model, split and search as the pipeline


def test_plot_writes_pngs(trained):
    r = sh([BIN / "mt-plot", trained, "--sentence", "3"])
    assert r.returncode == 0, r.stderr.decode()
    for name in ("curves.png", "attention_test_3.png"):
        data = (trained / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    out = Path(trained).parent / "compare.png"
    r = sh([BIN / "mt-plot", trained, trained, "-o", out])  # several runs: one figure by minutes
    assert r.returncode == 0 and out.stat().st_size > 1000, r.stderr.decode()
    assert all("minutes" in json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()
               if '"valid"' in line)


def test_plot_draws_other_toolkits_curves_next_to_a_run(trained, tmp_path):
    peer = tmp_path / "joeynmt.tsv"
    peer.write_text("minutes\tvalid_bleu\n5.0\t10.5\n10.0\t20.25\n")
    out = tmp_path / "side_by_side.png"
    r = sh([BIN / "mt-plot", trained, peer, "-o", out])
    assert r.returncode == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stderr.decode()
    peer.write_text("minutes\tvalid_bleu\n5.0\t10.5\n10.0 20.25\n")  # a space, not a tab
    r = sh([BIN / "mt-plot", trained, peer, "-o", out])
    assert r.returncode == 1 and f"{peer}:3: expected two numbers" in r.stderr.decode()
    peer.write_text("step,bleu\n")
    r = sh([BIN / "mt-plot", trained, peer, "-o", out])
    assert r.returncode == 1 and "not a curve file" in r.stderr.decode()


def test_a_line_written_into_an_open_pipe_is_translated_before_the_pipe_closes(trained):
    import select
    import time

    p = subprocess.Popen([BIN / "mt-translate", "-m", trained, "--greedy", "-q"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def ask(line: str, timeout: float) -> float:
        t0 = time.monotonic()
        p.stdin.write(line.encode() + b"\n")
        p.stdin.flush()
        ready = select.select([p.stdout], [], [], timeout)[0]
        assert ready, f"no translation of {line!r} within {timeout} s while the pipe stayed open"
        assert p.stdout.readline().endswith(b"\n")
        return time.monotonic() - t0

    try:
        ask("A dog runs.", 120)  # includes loading the model
        assert ask("Two men ride bikes.", 10) < 10  # the writer pauses: no wait for 256 lines
        assert p.poll() is None  # still running, stdin still open
    finally:
        p.stdin.close()
        assert p.wait(60) == 0, p.stderr.read().decode()
    assert p.stdout.read() == b""  # one output line per input line, nothing more


def test_files_and_fast_pipes_are_read_in_full_batches(tmp_path):
    import threading
    import time

    from mt.translate import read_chunks

    f = tmp_path / "in.txt"
    f.write_bytes(b"".join(b"line %d\n" % i for i in range(1000)) + b"last, no newline")
    with open(f, "rb", buffering=0) as inp:
        chunks = list(read_chunks(inp.fileno(), 256))
    assert [len(c) for c in chunks] == [256, 256, 256, 233]
    assert chunks[0][0] == b"line 0" and chunks[-1][-1] == b"last, no newline"

    r, w = os.pipe()

    def writer():  # two bursts with a pause between them, like a live producer
        os.write(w, b"a\nb\n")
        time.sleep(0.6)
        os.write(w, b"c\n")
        os.close(w)

    threading.Thread(target=writer).start()
    assert list(read_chunks(r, 256)) == [[b"a", b"b"], [b"c"]]
    os.close(r)


def test_decode_speed_keys_are_honoured_by_the_pipeline_and_the_command_line(trained, tiny_cfg, tmp_path, monkeypatch):
    import shutil

    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    from mt.translate import Translator, translate_test

    fast = Translator.from_path(trained, device="cpu", int8=True, shortlist=50, bf16=True)
    d = fast.decoding
    assert isinstance(d.logits, Int8Linear) and d.shortlist is not None and d.bf16
    plain = Translator.from_path(trained, device="cpu").decoding
    assert not isinstance(plain.logits, Int8Linear) and plain.shortlist is None and not plain.bf16

    used = []
    real = Translator.__init__

    def spy(self, decoding, *a):
        used.append((decoding.int8, decoding.bf16, decoding.shortlist is not None))
        real(self, decoding, *a)

    monkeypatch.setattr(Translator, "__init__", spy)
    run_dir = tmp_path / "copy"
    shutil.copytree(trained, run_dir)  # links followed: the copy is self-contained
    translate_test(tiny_cfg(**{"decode.int8": "true", "decode.shortlist": 50}), run_dir)
    assert used == [(True, False, True)]  # the stage's decode.* reach the decoding model
    monkeypatch.undo()

    r = sh([BIN / "mt-translate", "-m", trained, "--int8", "--shortlist", "50"], "A dog runs.\n")
    assert r.returncode == 0 and "beam search, with int8, shortlist 50" in r.stderr.decode()
    r = sh([BIN / "mt-translate", "-m", trained, "--no-int8"], "A dog runs.\n")
    assert r.returncode == 0 and "with int8" not in r.stderr.decode()


def test_average_of_a_runs_last_checkpoints_and_an_ensemble_through_evaluate(trained, tmp_path):
    """mt-average --run --last N on a real run decodes like any checkpoint; mt-evaluate --run
    with the same run twice (an ensemble of copies) scores exactly as the run alone."""
    steps = sorted((trained / "checkpoints").glob("step_*.pt"))
    out = tmp_path / "avg.pt"
    r = sh([BIN / "mt-average", "--run", trained, "--last", str(len(steps)), "-o", out])
    assert r.returncode == 0 and f"averaged {len(steps)} checkpoints" in r.stderr.decode(), r.stderr.decode()
    r = sh([BIN / "mt-translate", "-m", out, "-q"], "A dog runs.\n\n")
    assert r.returncode == 0 and len(r.stdout.decode().split("\n")) == 3
    r = sh([BIN / "mt-average", "--run", trained, "--last", str(len(steps) + 1), "-o", out])
    assert r.returncode == 1 and "fewer than --last" in r.stderr.decode()
    args = ["--split", "valid", "--beam", "2", "--device", "cpu", "-b"]
    one = sh([BIN / "mt-evaluate", "--run", trained, *args])
    two = sh([BIN / "mt-evaluate", "--run", trained, "--run", steps[-1].parent / "best.pt", *args])
    assert one.returncode == 0 and two.returncode == 0, two.stderr.decode()
    assert "an ensemble of 2 models" in two.stderr.decode() and one.stdout == two.stdout


def test_the_readmes_python_example_runs(trained, tmp_path, monkeypatch, capsys):
    import re
    import shutil

    import mt

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, tmp_path / "runs" / "multi30k_en_de_quick")  # where the example looks
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" = ")[0] for line in printed] == ["BLEU", "chrF2", "TER"]
    assert "nrefs:1|case:mixed|eff:no|tok:13a" in printed[0]
    assert set(mt.__all__) >= {"Translator", "score", "compose_config", "run"}
    with pytest.raises(TypeError, match="list of lines"):
        mt.Translator.from_path(tmp_path / "runs" / "multi30k_en_de_quick").translate("one string")
