"""Validation during training: scores on the valid split, which of two is better, and the
average of the last N validations' weights once training stops.

    scores = valid_scores(model, corpus, refs, tok, device, precision)   # loss, ppl, greedy BLEU, chrF
    improved("bleu", scores["bleu"], best)                              # a new best.pt?
    average_last(cfg.train, model, run, progress, validate_fn)           # train.average_last=N

Greedy decoding, not the recipe's beam: validation measures the model, not the search, and it
runs every train.valid_every updates.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mt import checkpoint as ckpt_io
from mt.batches import collate, eval_batches
from mt.model import Seq2Seq
from mt.precision import autocast
from mt.rundir import RunDir, fingerprint, is_done, write_stamp
from mt.tokenizer import PAD_ID, IdCorpus, Tokenizer

log = logging.getLogger("mt.train")  # the train stage's logger: these lines are part of its log

# Validation decodes greedily with a generous length cap: it measures the model, not the search.
VALID_MAX_LEN_A, VALID_MAX_LEN_B = 1.5, 10
VALID_BATCH_TOKENS = 8000


@torch.no_grad()
def valid_scores(model: Seq2Seq, corpus: IdCorpus, refs: List[str], tok: Tokenizer, device: torch.device,
             precision: str, limit: int = 0) -> Dict[str, float]:
    """Valid loss, perplexity and greedy BLEU/chrF (sacreBLEU) against the raw references."""
    from mt.decoding import DecodingModel
    from mt.evaluate import score_lines
    from mt.search import greedy_search

    was_training = model.training
    decoding = DecodingModel(model)  # sets eval mode; the products of this model's current weights
    idx = np.arange(len(corpus) if not limit else min(limit, len(corpus)))
    nll = tokens = 0.0
    hyps: List[str] = [""] * len(idx)
    for batch_idx in eval_batches(corpus, VALID_BATCH_TOKENS, indices=idx):
        b = collate(corpus, batch_idx, device)
        with autocast(device, precision):
            att, _ = model(b.src, b.src_len, b.tgt_in)
            mask = b.tgt_out != PAD_ID
            logits = model.logits(att[mask]).float()
            nll += float(F.cross_entropy(logits, b.tgt_out[mask], reduction="sum"))
            tokens += b.n_tokens
            for i, h in zip(batch_idx, greedy_search(decoding, b.src, b.src_len, VALID_MAX_LEN_A, VALID_MAX_LEN_B)):
                hyps[i] = tok.decode_tgt(h[0].tokens)
    scores = {r["name"]: r for r in score_lines(hyps, [refs[:len(idx)]], ("bleu", "chrf"))}
    model.train(was_training)
    loss = nll / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "bleu": scores["BLEU"]["score"],
            "chrf": scores["chrF2"]["score"], "bleu_signature": scores["BLEU"]["signature"]}


def improved(metric: str, value: float, best: Optional[float]) -> bool:
    if not math.isfinite(value):  # a diverged model never becomes best.pt
        return False
    return best is None or (value < best if metric == "loss" else value > best)


def average_last(tcfg, model: Seq2Seq, run: RunDir, progress: Dict[str, Any], validate_fn) -> None:
    """When training has stopped: average the weights of the last `train.average_last`
    validations (checkpoints/step_*.pt), validate the average, and make it best.pt when it beats
    the best single checkpoint. Its stamp, checkpoints/averaged.json, records which steps were
    averaged (and how the average scored): a rerun over the same steps does not repeat it."""
    paths = ckpt_io.RunCheckpoints(run.checkpoints, tcfg.average_last).step_files()[-tcfg.average_last:]
    fp = fingerprint({"average_last": [p.name for p in paths]})
    if len(paths) < 2 or is_done(run.averaged, fp):
        return
    states = []
    for p in paths:  # full states: kept off the device
        try:
            states.append(ckpt_io.load(p, map_location="cpu"))
        except ckpt_io.CheckpointError as e:  # e.g. a corrupt newer file that resume fell back past
            log.warning("average_last: %s; left out", e)
    if len(states) < 2:
        return
    model.load_state_dict(ckpt_io.average([s["model"] for s in states]))
    result = validate_fn()
    metric, steps = tcfg.valid_metric, [s["step"] for s in states]
    better = improved(metric, result[metric], progress["best"])
    log.info("valid, average of steps %s: loss %.3f BLEU %.2f chrF %.2f (best single checkpoint: %s %.2f)%s",
             ",".join(map(str, steps)), result["loss"], result["bleu"], result["chrf"], metric, progress["best"],
             "; saved as best.pt" if better else "; best.pt kept")
    if better:
        best = {k: v for k, v in states[-1].items() if k not in ("optimizer", "schedule", "rng")}
        best.update(model=model.state_dict(), best=result[metric], best_step=progress["step"], averaged_steps=steps)
        ckpt_io.save(best, run.best)
    write_stamp(run.averaged, fp, steps=steps, better=better,
                **{k: v for k, v in result.items() if k != "bleu_signature"})
