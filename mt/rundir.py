"""A run directory's layout, and the one way every stage records that its work is done.

Every file a run makes has one name, here:

    runs/<name>/                    RunDir(root)
        config.yaml                 .config       the resolved config of the latest invocation
        mt.log                      .log          the log of every invocation
        data/ -> cache entry        .data         prepared splits (Arrow), one folder each  <- prepare
            stats.json              .data_stamp   the filter counts, and prepare's stamp
        tokenizer/ -> cache entry   .tokenizer    spm.model (or src.model, tgt.model)       <- tokenizer
            stamp.json              .tokenizer_stamp
            ids/                    .ids          <split>.{src,tgt}.{bin,len.npy}
        checkpoints/                .checkpoints                                            <- train
            last.pt, best.pt        .last, .best
            step_<N>.pt             .step_checkpoint(N)
            averaged.json           .averaged     train.average_last was done (train's stamp)
        old/                        .old          what force=true moved aside
        metrics.jsonl, tb/          .metrics, .tb
        curves.png                  .curves       attention_<name>.png: .attention(name)    <- mt-plot
        test.hyp, test.hyp.stamp    .hyp, .hyp_stamp                                        <- translate
        test.scores.json            .scores       with .scores_stamp (test.scores.stamp)    <- score

prepare and tokenizer write into a shared cache entry that the run's data/ and tokenizer/ link
to, so they name their files with the constants below (DATA_STAMP, ...) relative to that entry.

A stamp is a small JSON object, {"fingerprint": <16 hex digits>, ...what the stage records},
written last and atomically: a stage is done when its stamp exists and holds the fingerprint of
what it would be made from now. A missing, partial or older-format stamp reads as not done, so
the stage runs again; it never fails.

    run = RunDir(Path("runs/multi30k_en_de"))
    fp = fingerprint([to_container(cfg.decode), file_digest(run.best)])
    if not is_done(run.hyp_stamp, fp):
        ...                                       # write run.hyp
        write_stamp(run.hyp_stamp, fp)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

# names inside a stage's own folder (a run's data/, tokenizer/, checkpoints/, or a cache entry)
DATA_STAMP = "stats.json"
TOKENIZER_STAMP = "stamp.json"
IDS = "ids"
LAST, BEST, AVERAGED = "last.pt", "best.pt", "averaged.json"
CHECKPOINTS = "checkpoints"
OLD = "old"  # next to checkpoints/: RunCheckpoints.move_aside puts checkpoints-<time>/ there
TEMP_SUFFIX = ".tmp"  # atomic writes go to .<name>.<random>.tmp next to their target


def step_name(step: int) -> str:
    """step_00001200.pt: zero-padded, so that a listing sorts by step too."""
    return f"step_{step:08d}.pt"


def step_of(path: Path) -> Optional[int]:
    """The step of a step_name() file; None for any other name (step_x.pt, best.pt)."""
    digits = path.name[len("step_"):-len(".pt")]
    return int(digits) if path.name.startswith("step_") and path.suffix == ".pt" and digits.isdigit() else None


class _Under:
    """A fixed path under a RunDir's root: `best = _Under(CHECKPOINTS, BEST)` makes `run.best`
    root/checkpoints/best.pt. One line per name keeps the class body the layout table."""

    def __init__(self, *parts: str):
        self.relative = Path(*parts)

    def __get__(self, run: Optional["RunDir"], owner: type) -> Path:
        if run is None:  # RunDir.best: the path relative to a run's root
            return self.relative
        return run.root / self.relative


@dataclass(frozen=True)
class RunDir:
    """The paths of one run (see the module docstring); creating one touches no file."""

    root: Path

    config = _Under("config.yaml")
    log = _Under("mt.log")
    data = _Under("data")
    data_stamp = _Under("data", DATA_STAMP)
    tokenizer = _Under("tokenizer")
    tokenizer_stamp = _Under("tokenizer", TOKENIZER_STAMP)
    ids = _Under("tokenizer", IDS)
    checkpoints = _Under(CHECKPOINTS)
    last = _Under(CHECKPOINTS, LAST)
    best = _Under(CHECKPOINTS, BEST)
    averaged = _Under(CHECKPOINTS, AVERAGED)
    old = _Under(OLD)
    metrics = _Under("metrics.jsonl")
    tb = _Under("tb")
    curves = _Under("curves.png")
    hyp = _Under("test.hyp")
    hyp_stamp = _Under("test.hyp.stamp")
    scores = _Under("test.scores.json")
    scores_stamp = _Under("test.scores.stamp")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str is accepted, a Path kept

    def step_checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def attention(self, name: str) -> Path:
        """mt-plot's attention picture of one sentence (`test_12`, `text`)."""
        return self.root / f"attention_{name}.png"

    @classmethod
    def of_checkpoint(cls, path: Path) -> Optional["RunDir"]:
        """The run a checkpoint file belongs to: runs/x/checkpoints/best.pt -> RunDir(runs/x);
        None for a checkpoint that is not in a run's checkpoints/ (copied elsewhere)."""
        path = Path(path)
        return cls(path.parent.parent) if path.parent.name == CHECKPOINTS else None


# --- stamps -------------------------------------------------------------------------------------

def fingerprint(obj: Any) -> str:
    """16 hex digits identifying a JSON-able value (dict keys in any order give the same)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """16 hex digits of a file's content. By content, not size and mtime: a run copied without
    its times (cp -r, a fresh checkout) is still up to date, a file rewritten in place is not."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_stamp(path: Path) -> Optional[Dict[str, Any]]:
    """The stamp's JSON object; None when it is missing, unreadable or not a stamp (a stamp of an
    older format, e.g. the bare hex line test.hyp.stamp once held: that stage is redone)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("fingerprint"), str) else None


def is_done(path: Path, fp: str) -> bool:
    """Whether the stamp at `path` says its stage was done from what `fp` identifies."""
    record = read_stamp(path)
    return record is not None and record["fingerprint"] == fp


def write_stamp(path: Path, fp: str, **record: Any) -> Dict[str, Any]:
    """Mark a stage done (call it last, after every output is in place); `record` is kept with
    the fingerprint (prepare's filter counts, the tokenizer's vocabulary). Returns the stamp."""
    stamp = {"fingerprint": fp, **record}
    write_text_atomic(path, json.dumps(stamp, indent=2) + "\n")
    return stamp


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: a reader (or a
    later run, after a kill) sees the old file or the whole new one, never part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
