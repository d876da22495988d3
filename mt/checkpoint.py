"""Checkpoints: written atomically, loaded without running pickled code, checked before use.

A checkpoint is one dict (nanoGPT's habit of spelling the keys out):

    format      CHECKPOINT_FORMAT
    model       state_dict                        optimizer, schedule   state_dicts (last.pt only)
    step, epoch, epoch_step                       where training is (epoch_step: updates done in epoch)
    rng         torch (and CUDA) generator states elapsed, tokens      seconds and target tokens trained
    best, bad_validations, history               validation bookkeeping
    config      the resolved run config           model_config: config["model"], checked on load
    tokenizer   {src, tgt: SentencePiece model bytes, fingerprint, src_vocab, tgt_vocab}

`save` writes a temporary file in the same directory, fsyncs it and renames it over the target,
so a kill at any moment leaves the previous checkpoint intact. `load` uses
`torch.load(weights_only=True)`: tensors and plain Python values only, never arbitrary objects.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

CHECKPOINT_FORMAT = 1
# changing these does not change the architecture: a run may resume with new values
NOT_ARCHITECTURE = {"dropout", "emb_dropout"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used with this configuration; the message says why."""


def save(obj: Dict[str, Any], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or holding objects we refuse to unpickle
        raise CheckpointError(f"{path}: cannot be loaded safely ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mt checkpoint of format {CHECKPOINT_FORMAT}")
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


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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

