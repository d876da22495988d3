"""A target vocabulary shortlist for decoding (`decode.shortlist`, `--shortlist N`).

    shortlist = Shortlist.build(run.ids_dir, 1000, src_vocab, tgt_vocab)
    ids = shortlist.for_batch(src)     # sorted candidate ids: specials, frequent pieces, likely translations

Marian's lexical shortlists, without an aligner: the N most frequent target pieces, plus for
every source piece in the batch the K target pieces that co-occur with it most specifically in
the training data (count(s, t)^2 / (count(s) count(t))), plus the specials. Decoding then scores
only those (mt/decoding.py slices the output layer to them, per batch).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mt.tokenizer import EOS_ID, IdCorpus

SAMPLE_PAIRS = 200_000  # co-occurrence statistics from at most this many training pairs
PER_SOURCE = 20  # target candidates kept per source piece


class Shortlist:
    """Candidate target pieces for a batch of sources (see the module docstring)."""

    def __init__(self, frequent: np.ndarray, lexicon: np.ndarray, vocab: int):
        self.frequent, self.lexicon, self.vocab = frequent, lexicon, vocab  # lexicon: V_src x K

    @classmethod
    def build(cls, ids_dir: Path, size: int, src_vocab: int, tgt_vocab: int, per_source: int = PER_SOURCE) -> "Shortlist":
        corpus = IdCorpus(ids_dir, "train")
        n = min(len(corpus), SAMPLE_PAIRS)
        rows = np.random.default_rng(0).choice(len(corpus), n, replace=False) if n < len(corpus) else np.arange(n)
        t_count = np.zeros(tgt_vocab, dtype=np.int64)
        s_count = np.zeros(src_vocab, dtype=np.int64)
        keys = []
        for i in rows:
            s, t = np.unique(corpus.src(int(i))), np.unique(corpus.tgt(int(i)))
            s_count[s] += 1
            t_count[t] += 1
            keys.append((s[:, None].astype(np.int64) * tgt_vocab + t[None, :]).ravel())
        pairs, counts = np.unique(np.concatenate(keys), return_counts=True)
        src, tgt = pairs // tgt_vocab, pairs % tgt_vocab
        score = counts.astype(np.float64) ** 2 / (s_count[src] * t_count[tgt])
        order = np.lexsort((-score, src))  # by source piece, best first
        src, tgt = src[order], tgt[order]
        lexicon = np.full((src_vocab, per_source), EOS_ID, dtype=np.int64)
        starts = np.searchsorted(src, np.arange(src_vocab))
        ends = np.searchsorted(src, np.arange(src_vocab), side="right")
        for s in np.flatnonzero(ends > starts):
            cand = tgt[starts[s]:min(ends[s], starts[s] + per_source)]
            lexicon[s, :len(cand)] = cand
        frequent = np.argsort(-t_count, kind="stable")[:size]
        return cls(frequent, lexicon, tgt_vocab)

    def for_batch(self, src: Tensor) -> Tensor:
        """Sorted candidate ids, specials first (so their ids are their own indices)."""
        seen = np.unique(src.cpu().numpy())
        cand = np.concatenate([np.arange(EOS_ID + 1), self.frequent, self.lexicon[seen].ravel()])
        return torch.from_numpy(np.unique(cand)).to(src.device)
