"""Training: exact resume, atomic and safe checkpoints, batching, losses, schedules, DDP."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mt import checkpoint as ckpt_io
from mt.batches import epoch_batches, make_batches
from mt.config import TrainConfig, structured
from mt.model import build_model
from mt.pipeline import run
from mt.tokenizer import IdCorpus
from mt.loss import LossModel
from mt.schedule import LRSchedule, teacher_forcing_ratio

from conftest import tiny_overrides

# small enough for seconds, big enough that 24 updates cross an epoch boundary
FAST = {"train.batch_tokens": 4000, "train.valid_every": 1000, "train.log_every": 1,
        "model.dropout": 0.2, "model.emb_dropout": 0.1, "stages": "[prepare,tokenizer,train]"}


def params(path):
    return ckpt_io.load(path)["model"]


def test_resume_continues_exactly(tiny_cfg, tmp_path):
    """N steps straight == N/2 steps, stop, resume for N/2 (dropout on, epoch boundary crossed)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(tiny_cfg(**{**FAST, "train.max_steps": 24}), straight)
    run(tiny_cfg(**{**FAST, "train.max_steps": 12}), resumed)
    assert ckpt_io.load(resumed / "checkpoints" / "last.pt")["step"] == 12
    out = run(tiny_cfg(**{**FAST, "train.max_steps": 24}), resumed)
    assert out["train"]["epoch"] >= 1, "the test must cross an epoch boundary"
    a, b = params(straight / "checkpoints" / "last.pt"), params(resumed / "checkpoints" / "last.pt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_kill_during_training_leaves_a_usable_checkpoint(small_corpus, tmp_path):
    cmd = [sys.executable, "-m", "mt.pipeline"] + tiny_overrides(
        small_corpus, **{**FAST, "train.max_steps": 100000, "train.valid_every": 3, "train.valid_max_sentences": 5})
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "tiny" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (last.exists() and ckpt_io.load(last)["step"] >= 6):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = ckpt_io.load(last)  # loads: never a half-written file
    assert ckpt["step"] >= 6
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]
    r = subprocess.run(cmd[:-1] + [f"train.max_steps={ckpt['step'] + 3}"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {last} at step" in r.stderr


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt_io.save({"format": ckpt_io.CHECKPOINT_FORMAT, "step": 1}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        ckpt_io.save({"format": ckpt_io.CHECKPOINT_FORMAT, "step": 2}, path)
    monkeypatch.undo()
    assert ckpt_io.load(path, required=())["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_never_runs_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt_io.CHECKPOINT_FORMAT, "model": Payload()}, path)
    with pytest.raises(ckpt_io.CheckpointError, match="cannot be loaded safely"):
        ckpt_io.load(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt_io.CheckpointError):
        ckpt_io.load(path)


def test_average_of_states_is_the_mean_and_keeps_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    avg = ckpt_io.average([a, b])
    torch.testing.assert_close(avg["w"], torch.tensor([2.0, 4.0]))
    assert avg["n"].item() == 7 and avg["w"].dtype == torch.float32


def test_average_last_keeps_n_snapshots_and_validates_their_mean(tiny_cfg, tmp_path, monkeypatch):
    import mt.validation

    monkeypatch.setattr(mt.validation, "improved", lambda metric, value, best: True)  # the average wins
    over = {**FAST, "train.max_steps": 12, "train.valid_every": 3, "train.valid_max_sentences": 5,
            "train.average_last": 3}
    run(tiny_cfg(**over), tmp_path)
    ckpt_dir = tmp_path / "checkpoints"
    snaps = sorted(ckpt_dir.glob("step_*.pt"))
    assert [ckpt_io.load(p)["step"] for p in snaps] == [6, 9, 12]  # older ones pruned
    record = json.loads((ckpt_dir / "averaged.json").read_text())
    assert record["steps"] == [6, 9, 12] and {"bleu", "chrf", "loss"} <= set(record)
    mean = ckpt_io.average([params(p) for p in snaps])
    best = ckpt_io.load(ckpt_dir / "best.pt")
    assert record["better"] and best["averaged_steps"] == [6, 9, 12]
    for k in mean:
        torch.testing.assert_close(best["model"][k], mean[k], msg=k)
    assert not torch.equal(best["model"]["decoder.output_layer.weight"], params(snaps[-1])["decoder.output_layer.weight"])
    stamp = (ckpt_dir / "averaged.json").stat().st_mtime_ns
    run(tiny_cfg(**over), tmp_path)  # done: neither training nor averaging again
    assert (ckpt_dir / "averaged.json").stat().st_mtime_ns == stamp


def test_checkpoint_with_other_architecture_or_vocabulary_is_refused(tiny_cfg, tmp_path):
    run(tiny_cfg(**{**FAST, "train.max_steps": 2}), tmp_path)
    with pytest.raises(ckpt_io.CheckpointError, match=r"model.dec_hidden=32 \(config: 48\)"):
        run(tiny_cfg(**{**FAST, "train.max_steps": 4, "model.dec_hidden": 48}), tmp_path)
    with pytest.raises(ckpt_io.CheckpointError, match="another vocabulary"):
        run(tiny_cfg(**{**FAST, "train.max_steps": 4, "tokenizer.vocab_size": 450}), tmp_path)
    out = run(tiny_cfg(**{**FAST, "train.max_steps": 4, "model.dropout": 0.5}), tmp_path)  # not architecture
    assert out["train"]["step"] == 4


def test_epoch_batches_cover_each_pair_once_within_budget(tiny_cfg, tmp_path):
    run(tiny_cfg(stages="[prepare,tokenizer]"), tmp_path)
    corpus = IdCorpus(tmp_path / "tokenizer" / "ids", "train")
    cfg = structured(TrainConfig(batch_tokens=300, max_len=40))
    batches = epoch_batches(corpus, cfg, seed=3, epoch=0)
    seen = np.sort(np.concatenate(batches))
    longest = np.maximum(corpus.lengths["src"], corpus.lengths["tgt"]) + 1
    assert np.array_equal(seen, np.flatnonzero(longest <= 40))  # every usable pair, exactly once
    assert all(len(b) * longest[b].max() <= 300 or len(b) == 1 for b in batches)
    again = epoch_batches(corpus, cfg, seed=3, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))  # reproducible
    other = epoch_batches(corpus, cfg, seed=3, epoch=1)
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other))  # reshuffled per epoch
    fixed = make_batches(corpus.lengths["src"], corpus.lengths["tgt"], np.arange(100), 0, 16, 4, None)
    assert [len(b) for b in fixed] == [16] * 6 + [4]


def test_label_smoothed_loss_matches_torch():
    torch.manual_seed(0)
    from mt.config import ModelConfig
    model = build_model(structured(ModelConfig(emb_size=8, enc_hidden=8, dec_hidden=8, attn_size=8)), 30, 30).eval()
    src = torch.randint(4, 30, (3, 5))
    tgt_out = torch.randint(4, 30, (3, 4))
    tgt_out[2, 2:] = 0
    tgt_in = torch.cat([torch.full((3, 1), 2), tgt_out[:, :-1]], dim=1)
    loss, nll = LossModel(model, 0.1)(src, torch.tensor([5, 5, 5]), tgt_in, tgt_out)
    att, _ = model(src, torch.tensor([5, 5, 5]), tgt_in)
    logits = model.logits(att).reshape(-1, 30)
    ref = F.cross_entropy(logits, tgt_out.reshape(-1), ignore_index=0, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(nll, F.cross_entropy(logits, tgt_out.reshape(-1), ignore_index=0, reduction="sum"))


def test_lr_and_teacher_forcing_schedules():
    c = structured(TrainConfig(schedule="inverse_sqrt", lr=1e-3, warmup_steps=100))
    s = LRSchedule(c)
    assert s.lr(50) == pytest.approx(5e-4) and s.lr(100) == pytest.approx(1e-3) and s.lr(400) == pytest.approx(5e-4)
    p = LRSchedule(structured(TrainConfig(schedule="plateau", lr=1e-3, plateau_patience=1, min_lr=3e-4)))
    for better in (True, False, False):  # more than plateau_patience=1 bad validations: halve
        p.observe(better)
    assert p.lr(10) == pytest.approx(5e-4)
    for _ in range(4):
        p.observe(False)
    assert p.lr(10) == pytest.approx(3e-4)  # floored at min_lr
    for kind in ("linear", "exponential", "inverse_sigmoid"):
        t = structured(TrainConfig(teacher_forcing=1.0, tf_schedule=kind, tf_min=0.25, tf_decay_steps=1000))
        values = [teacher_forcing_ratio(t, s) for s in (0, 250, 500, 1000, 5000)]
        assert values[0] == pytest.approx(1.0, abs=0.01) and values[-1] == pytest.approx(0.25, abs=0.01)
        assert all(a >= b for a, b in zip(values, values[1:])), kind


def test_scheduled_sampling_and_bf16_train(tiny_cfg, tmp_path):
    overrides = {**FAST, "train.max_steps": 3, "train.teacher_forcing": 0.5}
    if torch.backends.mkldnn.is_available():
        overrides["train.precision"] = "bf16"
    out = run(tiny_cfg(**overrides), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["tf_ratio"] for x in lines if x["kind"] == "train"] == [0.5, 0.5, 0.5]
    assert out["train"]["step"] == 3 and all(np.isfinite(x["loss"]) for x in lines)


def test_ddp_two_processes_match_one_process_with_the_same_effective_batch(small_corpus, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) vs one process with accum_steps=2: same loss curve."""
    common = tiny_overrides(small_corpus, **{**FAST, "train.max_steps": 6, "model.dropout": 0.0,
                                             "model.emb_dropout": 0.0, "device": "cpu"})
    single = subprocess.run([sys.executable, "-m", "mt.pipeline"] + common + ["name=single", "train.accum_steps=2"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "mt.pipeline"] + common + ["name=ddp"], cwd=tmp_path, capture_output=True,
                         text=True, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    def curve(name):
        rows = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert len(curve("single")) == 6
    np.testing.assert_allclose(curve("ddp"), curve("single"), rtol=1e-4)
    a = params(tmp_path / "runs" / "single" / "checkpoints" / "last.pt")
    b = params(tmp_path / "runs" / "ddp" / "checkpoints" / "last.pt")
    for k in a:  # Adam turns float noise in near-zero gradients into visible steps: lr * 6 = 0.018
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=5e-4, msg=k)


def test_the_progress_bar_follows_whichever_limit_ends_the_run_first():
    import io
    from omegaconf import OmegaConf

    from mt.distributed import Context
    from mt.progress import LimitBar, limit_fraction

    def cfg(**kw):
        return OmegaConf.create({"max_steps": 0, "max_epochs": 0, "max_time": 0.0, **kw})

    p = {"step": 300, "epoch": 1, "epoch_step": 50, "elapsed": 30 * 60.0}
    assert limit_fraction(cfg(), p, 100) is None
    assert limit_fraction(cfg(max_steps=1000), p, 100) == (0.3, "max_steps")
    assert limit_fraction(cfg(max_epochs=3), p, 100) == (0.5, "max_epochs")
    assert limit_fraction(cfg(max_time=90.0), p, 100) == (pytest.approx(1 / 3), "max_time")
    assert limit_fraction(cfg(max_steps=1000, max_epochs=3, max_time=90.0), p, 100)[1] == "max_epochs"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = LimitBar(Context(), cfg(max_time=90.0), p, 100, file=out)
    assert not bar.disable
    bar.update({**p, "step": 301, "elapsed": 45 * 60.0}, loss="2.000")
    bar.bar.refresh()
    assert " 50%|" in out.getvalue() and "step 301 (max_time)" in out.getvalue() and "loss=2.000" in out.getvalue()
