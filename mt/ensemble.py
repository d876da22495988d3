"""Ensemble decoding: several trained models searched as one.

    translator = Translator.from_path(["runs/a", "runs/b", "runs/c"])   # mt-translate -m a -m b -m c
    ensemble = Ensemble([DecodingModel(a, decode), DecodingModel(b, decode)])
    hyps = ensemble.search(src, src_len)          # greedy, beam (n-best) or sampling, as decode says

At every step each member scores the same prefixes, and the ensemble's scores are the mean of
the members' log-probabilities (OpenNMT-py's and Marian's rule, a product of experts); the
searches normalise them again, so an ensemble of one model, or of copies of one model, searches
exactly as that model does. The members may differ in architecture (GRU and LSTM, sizes) but
speak one vocabulary: `Translator.from_path` refuses checkpoints with another tokenizer. Each
member keeps its own encoding and decoder state; `reorder_*` re-index them all alike. With a
shortlist, the ensemble picks the batch's candidates once and restricts every member to them,
so all members score the same columns.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mt.decoding import DecodingModel, search
from mt.search import Hypothesis
from mt.shortlist import Shortlist


class Ensemble:
    """DecodingModels behind one mt.search.Decodable; state and encoding are lists, one per member."""

    def __init__(self, members: Sequence[DecodingModel], shortlist: Optional[Shortlist] = None):
        if not members:
            raise ValueError("an ensemble needs at least one model")
        if any(m.shortlist is not None for m in members):
            raise ValueError("give the shortlist to the Ensemble, not to its members (they must share it)")
        sizes = {m.model.decoder.output_layer.out_features for m in members}
        if len(sizes) > 1:
            raise ValueError(f"ensemble members have different target vocabularies: {sorted(sizes)} pieces")
        self.members = list(members)
        self.decode = members[0].decode
        self.shortlist = shortlist
        self.vocab_ids: Optional[Tensor] = None  # the batch's shortlist, as in DecodingModel

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    # --- mt.search.Decodable ----------------------------------------------------------------------

    def encode(self, src: Tensor, src_len: Tensor) -> List:
        """src: batch x src_len ids -> every member's encoding. Picks the batch's shortlist."""
        encs = [m.encode(src, src_len) for m in self.members]
        if self.shortlist is not None:
            self.vocab_ids = self.shortlist.for_batch(src)
            for m in self.members:
                m.restrict(self.vocab_ids)
        return encs

    def init_state(self, encs: List) -> List:
        return [m.init_state(e) for m, e in zip(self.members, encs)]

    def step(self, tokens: Tensor, states: List, encs: List):
        """tokens: rows -> (mean log-probabilities rows x V, states, mean attention rows x src_len)."""
        logp, attn, new_states = None, None, []
        for m, s, e in zip(self.members, states, encs):
            logits, s, weights = m.step(tokens, s, e)
            lp = F.log_softmax(logits.float(), dim=-1)
            logp = lp if logp is None else logp.add_(lp)
            attn = weights.float() if attn is None else attn + weights.float()
            new_states.append(s)
        n = len(self.members)
        return logp.div_(n), new_states, attn / n

    def reorder_state(self, states: List, index: Tensor) -> List:
        return [m.reorder_state(s, index) for m, s in zip(self.members, states)]

    def reorder_encoder(self, encs: List, index: Tensor) -> List:
        return [m.reorder_encoder(e, index) for m, e in zip(self.members, encs)]

    # --- search -------------------------------------------------------------------------------

    def search(self, src: Tensor, src_len: Tensor) -> List[List[Hypothesis]]:
        """decode.method over one batch: per sentence its hypotheses, best first, in vocabulary ids."""
        return search(self, self.decode, src, src_len)
