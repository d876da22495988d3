"""Checkpoints: written atomically, loaded without running pickled code, checked before use.

A checkpoint is one dict (nanoGPT's habit of spelling the keys out):

    format      CHECKPOINT_FORMAT
    model       state_dict                        optimizer, schedule   state_dicts (not in best.pt)
    step, epoch, epoch_step                       where training is (epoch_step: updates done in epoch)
    rng         torch (and CUDA) generator states elapsed, tokens      seconds and target tokens trained
    best, best_step, bad_validations             validation bookkeeping
    skipped, nonfinite                           updates skipped as non-finite: in all, in a row
    precision   decided at the run's start (train.precision=auto), kept on resume
    config      the resolved run config           model_config: config["model"], checked on load
    tokenizer   {src, tgt: SentencePiece model bytes, fingerprint, src_vocab, tgt_vocab}

`save` writes a temporary file in the same directory, fsyncs it and renames it over the target,
so a kill at any moment leaves the previous checkpoint intact; a write error (a full disk) is
one line. `load` uses `torch.load(weights_only=True)`: tensors and plain Python values only,
never arbitrary objects; `load_weights` refuses weights at odds with their own config, tokenizer
or finiteness. `RunCheckpoints` keeps a run's checkpoints/ folder: which file to resume from,
step files by step number, temporary files of killed saves, starting over without deleting.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from mt.rundir import BEST, LAST, OLD, TEMP_SUFFIX, step_name, step_of

CHECKPOINT_FORMAT = 1
# changing these does not change the architecture: a run may resume with new values
NOT_ARCHITECTURE = {"dropout", "emb_dropout", "word_dropout"}
REQUIRED_KEYS = ("model", "step", "config", "model_config", "tokenizer")  # in every file save() writes


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with this configuration; the message says why."""


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, permissions); the previous one is intact."""

    def __str__(self) -> str:
        return self.strerror


def _os_error(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e` (torch.save reports a full disk as a RuntimeError about zip
    positions, with the OSError only in its context)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def save(obj: Dict[str, Any], path: Path) -> None:
    """Write `obj` to `path` atomically; on failure no temporary file is left and the file that
    was at `path` is untouched. Write errors raise CheckpointWriteError with a one-line message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _os_error(e)
        if cause is None:
            raise
        raise CheckpointWriteError(cause.errno, f"{path}: cannot write the checkpoint: {cause.strerror} "
                                   "(the previous checkpoint is intact)") from None


def load(path: Path, map_location: str | torch.device = "cpu",
         required: Tuple[str, ...] = REQUIRED_KEYS) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holding objects we refuse to unpickle
        raise CheckpointError(f"{path}: cannot be loaded safely ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mt checkpoint of format {CHECKPOINT_FORMAT}")
    missing = sorted(set(required) - set(ckpt))
    if missing:
        raise CheckpointError(f"{path}: not a complete mt checkpoint (no {', '.join(missing)})")
    return ckpt


def check_compatible(ckpt: Dict[str, Any], path: Path, model_cfg: Dict[str, Any],
                     tokenizer_fingerprint: Optional[str]) -> None:
    """Refuse a checkpoint whose architecture or vocabulary differs from the configuration."""
    saved = ckpt["model_config"]
    diffs = [f"model.{k}={saved.get(k)!r} (config: {model_cfg.get(k)!r})"
             for k in sorted(set(saved) | set(model_cfg))
             if k not in NOT_ARCHITECTURE and saved.get(k) != model_cfg.get(k)]
    if diffs:
        raise CheckpointError(f"{path} was trained with {', '.join(diffs)}: choose another name= "
                              "for a new run, or force=true to start this one over")
    if tokenizer_fingerprint is not None and ckpt["tokenizer"]["fingerprint"] != tokenizer_fingerprint:
        raise CheckpointError(f"{path} was trained with another vocabulary (the tokenizer was retrained): "
                              "choose another name= for a new run, or force=true to start over")


# weights whose rows are a vocabulary (Seq2Seq's names): their sizes are checked against the tokenizer
VOCAB_ROWS = {"encoder.embedding.weight": "src", "decoder.embedding.weight": "tgt",
              "decoder.output_layer.weight": "tgt"}


def first_nonfinite(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating tensor of a state_dict holding NaN or inf, else None."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return key
    return None


def load_weights(model: torch.nn.Module, ckpt: Dict[str, Any], path: Path) -> None:
    """Load ckpt["model"] into `model` (built from the checkpoint's model_config and vocabulary
    sizes, or from a config that check_compatible accepted), or refuse in one line a checkpoint
    that disagrees with itself: a tokenizer that is not the embeddings' size, weights that are not
    what the config builds, NaN/inf from a diverged run. Every loader calls this, so none of
    them ends in a load_state_dict traceback or an embedding index error mid-translation."""
    weights = ckpt.get("model")
    if not isinstance(weights, dict) or not all(isinstance(w, torch.Tensor) for w in weights.values()):
        raise CheckpointError(f"{path}: its model entry is not a state_dict of tensors: use another checkpoint")
    _check_vocabulary(weights, ckpt.get("tokenizer") or {}, path)
    _check_shapes(weights, model.state_dict(), path)
    bad = first_nonfinite(weights)
    if bad is not None:
        raise CheckpointError(f"{path} holds non-finite values in {bad}: it was saved from a diverged run; "
                              "use an earlier checkpoint, or retrain with a lower train.lr")
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:  # what comparing names and shapes cannot see
        raise CheckpointError(f"{path}: weights cannot be loaded into its model "
                              f"({' '.join(str(e).split())[:200]})") from None


def _check_vocabulary(weights: Dict[str, torch.Tensor], tok: Dict[str, Any], path: Path) -> None:
    """Per side, the pieces of the SentencePiece model (what encodes the text), the size the
    checkpoint records (what the model is built with) and the embedding rows must be one number."""
    import sentencepiece as spm

    for side, name in (("src", "source"), ("tgt", "target")):
        try:
            pieces = spm.SentencePieceProcessor(model_proto=tok[side]).get_piece_size()
        except (KeyError, TypeError, RuntimeError):  # absent, not bytes, or not a SentencePiece model
            raise CheckpointError(f"{path}: its {name} SentencePiece model is missing or unreadable: "
                                  "use another checkpoint") from None
        recorded = tok.get(f"{side}_vocab")
        rows = {k: weights[k].shape[0] for k, s in VOCAB_ROWS.items()
                if s == side and k in weights and weights[k].dim()}
        if len({pieces, recorded, *rows.values()}) > 1:
            found = "".join(f", {k} has {n} rows" for k, n in rows.items())
            raise CheckpointError(f"{path}: its {name} vocabulary does not match its weights: the SentencePiece "
                                  f"model has {pieces} pieces, the checkpoint records {side}_vocab={recorded}{found}; "
                                  "tokenizer and weights come from different runs: use the run's own checkpoint")


def _check_shapes(weights: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], path: Path) -> None:
    """The weights must be exactly what the model config builds; compared here, because
    load_state_dict's error is a many-line list."""
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if not (wrong or missing or unexpected):
        return
    shape = lambda t: "x".join(map(str, t.shape)) or "a scalar"  # noqa: E731
    few = lambda keys: ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")  # noqa: E731
    first = f"{wrong[0]} is {shape(weights[wrong[0]])}, the config builds {shape(expected[wrong[0]])}" if wrong else ""
    keys = "; ".join(f"{what}: {few(ks)}" for what, ks in (("missing", missing), ("unexpected", unexpected)) if ks)
    detail = f"{first} ({keys})" if first and keys else first or keys
    raise CheckpointError(f"{path}: weights do not match its model config: {detail}; the file was edited or "
                          "mixes two runs: use the run's own checkpoint, or retrain")


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_model(path: Path, device: str | torch.device = "cpu"):
    """(model, checkpoint) from a checkpoint file: the model built from the checkpoint's own
    model_config and vocabulary sizes, its weights loaded through load_weights' checks, in eval mode."""
    from mt.config import ModelConfig, structured
    from mt.model import build_model

    ckpt = load(path, map_location=device)
    t = ckpt["tokenizer"]
    try:
        model_cfg = structured(ModelConfig(**ckpt["model_config"]))
    except TypeError as e:  # a key this version does not know
        raise CheckpointError(f"{path}: its model_config does not fit this version of mt ({e})") from None
    model = build_model(model_cfg, t["src_vocab"], t["tgt_vocab"]).to(device)
    load_weights(model, ckpt, path)  # refuses, in one line, a checkpoint at odds with itself
    return model.eval(), ckpt


def check_same_vocabulary(ckpt: Dict[str, Any], path: Path, first: Dict[str, Any], first_path: Path) -> None:
    """Refuse, in one line, a checkpoint whose source or target SentencePiece model is not the
    first one's: an ensemble or an average speaks one vocabulary."""
    for side, name in (("tgt", "target"), ("src", "source")):
        if ckpt["tokenizer"].get(side) != first["tokenizer"].get(side):
            raise CheckpointError(f"{path}: its {name} vocabulary differs from {first_path}'s "
                                  "(models to combine must share one tokenizer)")


def check_same_architecture(ckpt: Dict[str, Any], path: Path, first: Dict[str, Any], first_path: Path) -> None:
    """Refuse, in one line, a checkpoint whose architecture is not the first one's (weights of
    different shapes or meanings cannot be averaged)."""
    a, b = first["model_config"], ckpt["model_config"]
    diffs = [f"model.{k}={b.get(k)!r} ({first_path}: {a.get(k)!r})"
             for k in sorted(set(a) | set(b)) if k not in NOT_ARCHITECTURE and a.get(k) != b.get(k)]
    if diffs:
        raise CheckpointError(f"{path} has another architecture: {', '.join(diffs)}")


def average_checkpoints(paths: List[Path]) -> Dict[str, Any]:
    """One weights-only checkpoint (what best.pt holds) whose model is the mean of the given
    checkpoints' weights; the other entries are the last one's. Every file is loaded through
    load_model's checks, and all must share the first one's vocabulary and architecture."""
    if len(paths) < 1:
        raise ValueError("average: no checkpoints given")
    first, states = None, []
    for path in paths:
        _, ckpt = load_model(path)
        if first is None:
            first = ckpt
        check_same_vocabulary(ckpt, path, first, paths[0])
        check_same_architecture(ckpt, path, first, paths[0])
        states.append(ckpt)
    out = {k: v for k, v in states[-1].items() if k not in ("optimizer", "schedule", "rng", "scaler")}
    out["model"] = average([s["model"] for s in states])
    out["averaged_steps"] = [s["step"] for s in states]
    out["averaged_from"] = [str(p) for p in paths]
    return out


def average(states: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The element-wise mean of model state_dicts (floating tensors, accumulated in float64);
    other tensors are taken from the last state."""
    if not states:
        raise ValueError("average: no states")
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            total = sum(s[key].to(torch.float64) for s in states)
            out[key] = (total / len(states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out



# --- a run's checkpoints/ folder (its names: mt.rundir) -------------------------------------------

class RunCheckpoints:
    """checkpoints/ of a run: last.pt (where training is), best.pt (weights that validated best)
    and step_<N>.pt (full states of the latest validations: resume points when last.pt is
    unreadable, and the snapshots that train.average_last averages)."""

    def __init__(self, folder: Path, keep: int):
        self.dir, self.keep = Path(folder), keep
        self.last, self.best = self.dir / LAST, self.dir / BEST

    def step_files(self) -> List[Path]:
        """step_<N>.pt, oldest first, by step number (not by name); other names are not ours."""
        return sorted((p for p in self.dir.glob("step_*.pt") if step_of(p) is not None), key=step_of)

    def remove_temp_files(self) -> List[Path]:
        """Temporary files of saves that a kill interrupted."""
        stale = list(self.dir.glob(f".*{TEMP_SUFFIX}"))
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def move_aside(self) -> Optional[Path]:
        """Start over without losing anything: checkpoints/ becomes old/checkpoints-<time>/."""
        if not self.dir.exists() or not any(self.dir.iterdir()):
            return None
        stem = self.dir.parent / OLD / f"{self.dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest, n = stem, 1
        while dest.exists():  # twice within a second
            n += 1
            dest = stem.with_name(f"{stem.name}-{n}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.dir, dest)
        return dest

    def resume_point(self, map_location) -> Tuple[Optional[Dict[str, Any]], Optional[Path], List[str]]:
        """(state, its path, warnings) of the newest loadable full checkpoint: last.pt, else the
        newest step_*.pt; (None, None, []) when the folder holds no checkpoint at all. Refuses a
        folder whose checkpoints are all unreadable, or that holds best.pt alone: a run is never
        silently started over from step 0."""
        candidates = ([self.last] if self.last.exists() else []) + self.step_files()[::-1]
        failed: List[str] = []
        for path in candidates:
            try:
                state = load(path, map_location=map_location)
            except CheckpointError as e:
                failed.append(str(e))
                continue
            if "optimizer" not in state:  # a weights-only file of an older version
                failed.append(f"{path}: holds weights only, no optimizer state to resume from")
                continue
            bad = first_nonfinite(state["model"])
            if bad is not None:
                failed.append(f"{path}: holds non-finite values in {bad}")
                continue
            warnings = [f"{f}; resuming from {path} instead" for f in failed]
            return state, path, warnings
        if candidates or self.best.exists():
            why = failed[0] if failed else f"{self.dir} holds best.pt but no last.pt or step_*.pt"
            raise CheckpointError(f"{why}; no loadable checkpoint to resume from: force=true starts "
                                  f"the run over (moving {self.dir} to {self.dir.parent / OLD}/), "
                                  "or choose another name=")
        return None, None, []

    def save(self, state: Dict[str, Any], best: bool, step_file: bool) -> None:
        """best.pt (weights only) and a step file where asked, then last.pt: the commit point (a
        failure before it leaves last.pt saying nothing that the other files do not hold)."""
        if best:
            save({k: v for k, v in state.items() if k not in ("optimizer", "schedule", "rng", "scaler")}, self.best)
        if step_file and self.keep > 0:
            save(state, self.dir / step_name(state["step"]))
        save(state, self.last)
        if step_file and self.keep > 0:
            for old in self.step_files()[:-self.keep]:
                old.unlink()
