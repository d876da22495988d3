"""Batches by token count with length bucketing, reproducible from (seed, epoch).

    order = epoch_batches(corpus, cfg.train, seed, epoch)   # list of index arrays
    b = collate(corpus, order[0], device)                   # Batch of padded tensors

An epoch's batch list depends only on the seed and the epoch number, so a resumed run rebuilds
it and skips the batches it has done: the data position is two integers in the checkpoint.
Under DistributedDataParallel every rank builds the same list and takes its own share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from mt.tokenizer import BOS_ID, EOS_ID, PAD_ID, IdCorpus


@dataclass
class Batch:
    src: Tensor  # batch x src_len: pieces + EOS, then PAD
    src_len: Tensor  # batch
    tgt_in: Tensor  # batch x tgt_len: BOS + pieces, then PAD
    tgt_out: Tensor  # batch x tgt_len: pieces + EOS, then PAD
    n_tokens: int  # target tokens that count (pieces + EOS)


def usable(corpus: IdCorpus, max_len: int) -> np.ndarray:
    """Indices of pairs whose sides (with EOS) fit max_len and are not empty on the source side."""
    src, tgt = corpus.lengths["src"] + 1, corpus.lengths["tgt"] + 1
    return np.flatnonzero((src <= max_len) & (tgt <= max_len))


def make_batches(src_len: np.ndarray, tgt_len: np.ndarray, indices: np.ndarray, batch_tokens: int,
                 batch_size: int, bucket_batches: int, rng: Optional[np.random.Generator]) -> List[np.ndarray]:
    """Shuffle (if rng), sort pools of about `bucket_batches` batches by length, cut them into
    batches of at most `batch_size` sentences or `batch_tokens` padded tokens (longer side),
    and shuffle the batch order."""
    if rng is not None:
        indices = rng.permutation(indices)
    longest = np.maximum(src_len[indices], tgt_len[indices]) + 1
    per_batch = batch_size if batch_size > 0 else max(1, batch_tokens // max(1, int(longest.mean())))
    pool = max(1, per_batch * bucket_batches)
    batches: List[np.ndarray] = []
    for start in range(0, len(indices), pool):
        chunk = indices[start:start + pool]
        lengths = longest[start:start + pool]
        order = np.lexsort((tgt_len[chunk], src_len[chunk]))  # by source, then target length
        chunk, lengths = chunk[order], lengths[order]
        begin, widest = 0, 0
        for i, n in enumerate(lengths.tolist()):
            count, grown = i - begin + 1, max(widest, n)
            full = count > batch_size if batch_size > 0 else count * grown > batch_tokens
            if full and i > begin:  # close the batch before sentence i
                batches.append(chunk[begin:i])
                begin, widest = i, n
            else:
                widest = grown
        batches.append(chunk[begin:])
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def epoch_batches(corpus: IdCorpus, cfg, seed: int, epoch: int) -> List[np.ndarray]:
    """The training batches of one epoch (cfg: TrainConfig)."""
    rng = np.random.default_rng([seed, epoch])
    return make_batches(corpus.lengths["src"], corpus.lengths["tgt"], usable(corpus, cfg.max_len),
                        cfg.batch_tokens, cfg.batch_size, cfg.bucket_batches, rng)


def eval_batches(corpus: IdCorpus, batch_tokens: int, batch_size: int = 0,
                 indices: Optional[np.ndarray] = None) -> List[np.ndarray]:
    """The given pairs (default: all), sorted by length, unshuffled (validation, translation)."""
    idx = np.arange(len(corpus)) if indices is None else np.asarray(indices)
    return make_batches(corpus.lengths["src"], corpus.lengths["tgt"], idx, batch_tokens, batch_size,
                        bucket_batches=len(idx) + 1, rng=None)


def pad(seqs: Sequence[Sequence[int]], prefix: Optional[int] = None, suffix: Optional[int] = None) -> Tensor:
    """Right-padded id matrix, optionally with a token before / after every sequence."""
    extra = (prefix is not None) + (suffix is not None)
    width = max((len(s) for s in seqs), default=0) + extra
    out = np.full((len(seqs), width), PAD_ID, dtype=np.int64)
    for row, s in enumerate(seqs):
        pos = 0
        if prefix is not None:
            out[row, 0] = prefix
            pos = 1
        out[row, pos:pos + len(s)] = s
        if suffix is not None:
            out[row, pos + len(s)] = suffix
    return torch.from_numpy(out)


def collate(corpus: IdCorpus, indices: np.ndarray, device: torch.device) -> Batch:
    src = [corpus.src(i) for i in indices]
    tgt = [corpus.tgt(i) for i in indices]
    src_len = torch.tensor([len(s) + 1 for s in src])
    tgt_out = pad(tgt, suffix=EOS_ID)
    batch = Batch(pad(src, suffix=EOS_ID), src_len, pad(tgt, prefix=BOS_ID), tgt_out,
                  int(sum(len(t) for t in tgt) + len(tgt)))
    if device.type != "cpu":
        batch = Batch(batch.src.to(device, non_blocking=True), batch.src_len,
                      batch.tgt_in.to(device, non_blocking=True), batch.tgt_out.to(device, non_blocking=True),
                      batch.n_tokens)
    return batch


def n_target_tokens(corpus: IdCorpus, indices: np.ndarray) -> int:
    return int(corpus.lengths["tgt"][indices].sum() + len(indices))
