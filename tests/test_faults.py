"""Faults lose nothing: kills during saves, SIGINT/SIGTERM mid-run, a full disk, NaN, a truncated
last.pt, a run directory that would otherwise start over. Each asserts the one-line message, the
exit code, and that what is left resumes to the parameters of an uninterrupted run."""
import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mt import checkpoint as ckpt_io
from mt.pipeline import run
from mt.train import TrainingDiverged

from conftest import tiny_overrides

# seconds per run; log_every=1 so a test can follow the steps in metrics.jsonl
FAST = {"train.batch_tokens": 4000, "train.valid_every": 1000, "train.log_every": 1,
        "model.dropout": 0.2, "model.emb_dropout": 0.1, "stages": "[prepare,tokenizer,train]"}


def weights(path):
    return ckpt_io.load(path)["model"]


def assert_same_weights(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def all_finite(ckpt_dir):
    files = list(ckpt_dir.glob("*.pt"))
    assert files
    return all(ckpt_io.first_nonfinite(weights(p)) is None for p in files)


def cli(corpus, **over):
    return [sys.executable, "-m", "mt.pipeline"] + tiny_overrides(corpus, **{**FAST, **over})


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# --- kills and signals ----------------------------------------------------------------------------

def _save_forever(path, blob):
    step = ckpt_io.load(path, required=())["step"] + 1 if path.exists() else 0
    while True:
        ckpt_io.save({"format": ckpt_io.CHECKPOINT_FORMAT, "step": step, "blob": blob}, path)
        step += 1


def test_sigkill_at_random_points_of_saves_never_leaves_a_broken_checkpoint(tmp_path):
    path, blob = tmp_path / "last.pt", torch.randn(200_000)  # 800 kB: kills land mid-write
    fork = multiprocessing.get_context("fork")
    rng, steps = random.Random(0), []
    for _ in range(12):
        child = fork.Process(target=_save_forever, args=(path, blob))
        child.start()
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        if path.exists():
            ckpt = ckpt_io.load(path, required=())  # never half-written
            torch.testing.assert_close(ckpt["blob"], blob)
            steps.append(ckpt["step"])
        ckpt_io.RunCheckpoints(tmp_path, keep=0).remove_temp_files()
        assert [p.name for p in tmp_path.iterdir()] in ([], ["last.pt"])
    assert steps == sorted(steps) and steps[-1] > 0


def _interrupt(cmd, cwd, signum, after_rows):
    """Start `cmd`, send `signum` once metrics.jsonl has `after_rows` rows; (step it names, stderr)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = cwd / "runs" / "tiny" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= after_rows):
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    line = last_line(err)
    assert line.startswith(f"mt-train: interrupted ({signal.Signals(signum).name}) at step ") and \
        line.endswith("; checkpoint saved; run the same command to resume"), line
    return int(line.split(" at step ")[1].split(";")[0]), err


def test_sigint_then_sigterm_mid_run_save_say_so_in_one_line_and_resume_exactly(small_corpus, tmp_path):
    steps = 40
    cmd = cli(small_corpus, **{"train.max_steps": steps})
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"
    first, _ = _interrupt(cmd, tmp_path, signal.SIGINT, after_rows=3)
    assert 3 <= first < steps and ckpt_io.load(last)["step"] == first
    second, _ = _interrupt(cmd, tmp_path, signal.SIGTERM, after_rows=first + 3)  # rows after `first` were cut
    assert first < second < steps and ckpt_io.load(last)["step"] == second

    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    straight = tmp_path / "straight"  # the same prepared data and tokenizer (the cache), no signal
    straight.mkdir()
    r = subprocess.run(cmd + [f"cache_dir={tmp_path / 'runs' / '.cache'}"], cwd=straight, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert_same_weights(weights(straight / "runs" / "tiny" / "checkpoints" / "last.pt"), weights(last))
    rows = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in rows if "loss" in r]
    assert len(keys) == len(set(keys)) and ("train", steps) in keys  # each step once after two resumes


def _signalled_twice():
    from mt.interrupt import StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first only asks the loop to stop
        os.kill(os.getpid(), signal.SIGINT)  # the second exits at once
        time.sleep(5)
    os._exit(0)


def test_a_second_ctrl_c_exits_at_once_with_130():
    child = multiprocessing.get_context("fork").Process(target=_signalled_twice)
    start = time.time()
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 130 and time.time() - start < 4


# --- a full disk ----------------------------------------------------------------------------------

def _mount_tmpfs(path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_is_one_line_exit_74_and_the_previous_checkpoint_loads(small_corpus, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "64m"):
        pytest.skip("needs root and mount (tmpfs); test_an_injected_enospc_* covers the rest")
    try:
        run_dir = disk / "run"
        over = {"hydra.run.dir": str(run_dir), "cache_dir": str(tmp_path / "cache"), "train.valid_every": 2,
                "train.valid_max_sentences": 5}
        r = subprocess.run(cli(small_corpus, **over, **{"train.max_steps": 2}), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        free = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:  # leave 64 kB: less than a checkpoint
            os.posix_fallocate(f.fileno(), 0, free.f_bavail * free.f_frsize - 64 * 1024)
        r = subprocess.run(cli(small_corpus, **over, **{"train.max_steps": 4}), cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 74, r.stderr
        assert "Traceback" not in r.stderr, r.stderr
        line = last_line(r.stderr)
        assert line.startswith(f"mt-train: error: {run_dir}") and "No space left on device" in line, line
        ckpt_dir = run_dir / "checkpoints"
        assert ckpt_io.load(ckpt_dir / "last.pt")["step"] == 2
        assert not [p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_an_injected_enospc_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.save({"format": ckpt_io.CHECKPOINT_FORMAT, "step": 1}, path)

    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 177984 vs 177872") \
            from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(ckpt_io.CheckpointWriteError) as e:
        ckpt_io.save({"format": ckpt_io.CHECKPOINT_FORMAT, "step": 2}, path)
    monkeypatch.undo()
    assert str(e.value) == f"{path}: cannot write the checkpoint: No space left on device (the previous checkpoint is intact)"
    assert e.value.errno == errno.ENOSPC
    assert ckpt_io.load(path, required=())["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --- non-finite losses ----------------------------------------------------------------------------

def test_a_huge_learning_rate_stops_in_one_line_exit_3_and_saves_no_nan(small_corpus, tmp_path):
    over = {"train.lr": 1e38, "train.max_steps": 50, "train.valid_every": 1, "train.valid_max_sentences": 5}
    r = subprocess.run(cli(small_corpus, **over), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr
    line = last_line(r.stderr)
    assert "not finite in 5 updates in a row (train.max_nonfinite=5)" in line and "train.lr (now 1e+38)" in line, line
    # validated after every update, the first (a finite 1e38-sized jump) included: none was fit to keep
    assert not list((tmp_path / "runs" / "tiny" / "checkpoints").glob("*.pt"))
    assert "not saved (the valid loss is not finite)" in r.stderr


def test_a_resumed_run_with_a_bad_lr_keeps_its_finite_checkpoints(tiny_cfg, tmp_path):
    over = {**FAST, "train.valid_every": 2, "train.valid_max_sentences": 5}
    run(tiny_cfg(**over, **{"train.max_steps": 4}), tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    before = weights(ckpt_dir / "last.pt")
    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: .*/last\.pt \(step 4\) is the last finite state"):
        run(tiny_cfg(**over, **{"train.max_steps": 40, "train.lr": 1e38}), tmp_path)
    assert ckpt_io.load(ckpt_dir / "last.pt")["step"] == 4 and all_finite(ckpt_dir)
    assert_same_weights(before, weights(ckpt_dir / "last.pt"))


def test_a_few_non_finite_updates_are_skipped_and_counted(tiny_cfg, tmp_path, monkeypatch):
    import mt.loss

    real, calls = mt.loss.LossModel.forward, {"n": 0}

    def sometimes_nan(self, *args, **kw):
        calls["n"] += 1
        out = real(self, *args, **kw)
        return out * float("nan") if calls["n"] in (3, 4) else out

    monkeypatch.setattr(mt.loss.LossModel, "forward", sometimes_nan)
    out = run(tiny_cfg(**{**FAST, "train.max_steps": 8}), tmp_path)["train"]
    assert out["step"] == 8 and out["skipped"] == 2 and out["nonfinite"] == 0
    assert all_finite(tmp_path / "checkpoints")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train" and "loss" not in r] == [3, 4]
    (final,) = [r for r in rows if r["kind"] == "train" and r["step"] == 8]
    assert final["skipped_updates"] == 2
    from mt.plot import plot_curves

    assert plot_curves(tmp_path).exists()  # rows of skipped updates (no loss) are no curve points


# --- checkpoint recovery --------------------------------------------------------------------------

def test_a_truncated_last_pt_resumes_from_the_newest_step_file(tiny_cfg, tmp_path):
    over = {**FAST, "train.valid_every": 2, "train.valid_max_sentences": 5, "train.average_last": 0,
            "train.keep_checkpoints": 2}
    run(tiny_cfg(**over, **{"train.max_steps": 8}), tmp_path / "straight")
    resumed = tmp_path / "resumed"
    run(tiny_cfg(**over, **{"train.max_steps": 6}), resumed)
    ckpt_dir = resumed / "checkpoints"
    assert [p.name for p in ckpt_io.RunCheckpoints(ckpt_dir, 2).step_files()] == \
        ["step_00000004.pt", "step_00000006.pt"]
    last = ckpt_dir / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (ckpt_dir / ".last.pt.killed.tmp").write_bytes(b"half a save")
    run(tiny_cfg(**over, **{"train.max_steps": 8}), resumed)
    log = (resumed / "mt.log").read_text()
    assert f"{last}: cannot be loaded safely" in log and f"resuming from {ckpt_dir / 'step_00000006.pt'} instead" in log
    assert "removed" in log and not (ckpt_dir / ".last.pt.killed.tmp").exists()
    assert_same_weights(weights(tmp_path / "straight" / "checkpoints" / "last.pt"), weights(last))


def test_a_run_dir_with_checkpoints_is_never_silently_started_over(tiny_cfg, tmp_path):
    over = {**FAST, "train.valid_every": 2, "train.valid_max_sentences": 5, "train.max_steps": 4}
    run(tiny_cfg(**over), tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    best = weights(ckpt_dir / "best.pt")
    for p in [ckpt_dir / "last.pt", *ckpt_dir.glob("step_*.pt")]:
        p.unlink()  # what a user does with a corrupt last.pt
    with pytest.raises(ckpt_io.CheckpointError, match="no loadable checkpoint to resume from: force=true"):
        run(tiny_cfg(**over), tmp_path)
    assert_same_weights(best, weights(ckpt_dir / "best.pt"))
    run(tiny_cfg(**over, force=True), tmp_path)  # explicit: the old files are moved aside
    (old,) = (tmp_path / "old").iterdir()
    assert_same_weights(best, weights(old / "best.pt"))
    assert ckpt_io.load(ckpt_dir / "last.pt")["step"] == 4 and (old / "metrics.jsonl").exists()


def test_step_files_are_ordered_by_step_number(tmp_path):
    for step in (110, 10, 9, 100000000):
        (tmp_path / f"step_{step:08d}.pt").touch()
    assert [p.name for p in ckpt_io.RunCheckpoints(tmp_path, 2).step_files()] == \
        ["step_00000009.pt", "step_00000010.pt", "step_00000110.pt", "step_100000000.pt"]


def test_precision_auto_is_decided_once_and_kept_on_resume(tiny_cfg, tmp_path, monkeypatch):
    import mt.train

    over = {**FAST, "train.precision": "auto"}
    run(tiny_cfg(**over, **{"train.max_steps": 2}), tmp_path)
    decided = ckpt_io.load(tmp_path / "checkpoints" / "last.pt")["precision"]
    assert decided in ("fp32", "bf16")

    def measured_again(*a, **k):
        raise AssertionError("precision=auto measured again on resume")

    monkeypatch.setattr(mt.train, "resolve_precision", measured_again)
    run(tiny_cfg(**over, **{"train.max_steps": 4}), tmp_path)
    assert ckpt_io.load(tmp_path / "checkpoints" / "last.pt")["precision"] == decided


def test_metrics_hold_each_step_once_after_resuming_from_an_older_checkpoint(tiny_cfg, tmp_path):
    over = {**FAST, "train.valid_every": 2, "train.valid_max_sentences": 5, "train.average_last": 0,
            "train.keep_checkpoints": 2}
    run(tiny_cfg(**over, **{"train.max_steps": 8}), tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    for p in (ckpt_dir / "last.pt", ckpt_dir / "step_00000008.pt"):
        p.write_bytes(b"corrupt")
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "st')  # a line that a kill cut short
    run(tiny_cfg(**over, **{"train.max_steps": 8}), tmp_path)  # resumes at 6, redoes 7 and 8
    assert "resuming from" in (tmp_path / "mt.log").read_text()
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)) and {("train", 7), ("train", 8), ("valid", 8)} <= set(keys)
