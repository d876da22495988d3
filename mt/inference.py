"""CPU inference options of `mt-translate`: int8 dynamic quantization and a vocabulary shortlist.

    mt-translate -m runs/x --int8            # int8 weights for every matrix product of decoding
    mt-translate -m runs/x --shortlist 1000  # score only ~1-2k likely target pieces per batch

Both trade a little accuracy for speed, so neither is on by default; recipes/README.md reports
their BLEU cost and speed-up, measured with `mt-bench` on a trained model.

The shortlist (Marian's lexical shortlists, without an aligner): the N most frequent target
pieces, plus for every source piece in the batch the K target pieces that co-occur with it most
specifically in the training data (count(s, t)^2 / (count(s) count(t))), plus the specials.
Search runs in the shortlist's index space through a wrapper with the model's own interface, so
the search code does not change.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from mt.decoder import Projection
from mt.tokenizer import EOS_ID, IdCorpus

log = logging.getLogger("mt.inference")
SAMPLE_PAIRS = 200_000  # co-occurrence statistics from at most this many training pairs
PER_SOURCE = 20  # target candidates kept per source piece


def int8_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Module:
    """x -> x W^T + b with W in int8 (per-tensor scale) and x quantized per call (dynamic)."""
    from torch.ao.quantization import quantize_dynamic

    # skip_init: no random initialisation of weights that are overwritten next (the shortlist
    # makes one of these per batch)
    linear = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.detach())
    return quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 quantization (weights int8, activations quantized per call) of every matrix
    product of decoding: the encoder RNN, the decoder cell's products of a step (the fed vector's
    and the recurrent ones, in the decoder's inference cache), attention, the attentional layer,
    the output layer (kept in float32 too, for the shortlist to slice) and the bridge. The first
    layer's embedding products stay a float table lookup (RecurrentDecoder.freeze)."""
    import warnings

    from torch.ao.quantization import quantize_dynamic

    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated", category=DeprecationWarning)
    dec = model.decoder
    if dec.frozen is None:
        dec.freeze()
    dec.output_float = (dec.output_layer.weight, dec.output_layer.bias)
    quantize_dynamic(model.encoder, {nn.GRU, nn.LSTM, nn.RNN}, dtype=torch.qint8, inplace=True)
    quantize_dynamic(dec.attention, {nn.Linear}, dtype=torch.qint8, inplace=True)  # its Linear children
    for name in ("att_layer", "output_layer", "bridge_h", "bridge_c"):  # (quantize_dynamic swaps
        module = getattr(dec, name)  # children only: a bare Linear goes through int8_linear)
        if module is not None:
            setattr(dec, name, int8_linear(module.weight.detach(), module.bias))
    frozen = dec.frozen
    to_int8 = lambda p: None if p is None else int8_linear(p.weight, p.bias)  # noqa: E731
    frozen["feed"] = to_int8(frozen["feed"])
    frozen["hh"] = [to_int8(p) for p in frozen["hh"]]
    frozen["ih"] = [to_int8(p) for p in frozen["ih"]]
    return model


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


class ShortlistModel:
    """The model's narrow interface over a shortlist: token ids in and out are indices into
    `ids` (ids[i] == i for the specials, so BOS/EOS keep their meaning in search)."""

    def __init__(self, model, ids: Tensor):
        self.model, self.ids = model, ids
        dec = model.decoder
        quantized = hasattr(dec, "output_float")  # quantize_int8 ran: the sliced layer is int8 too
        weight, bias = getattr(dec, "output_float", (dec.output_layer.weight, dec.output_layer.bias))
        weight, bias = weight.detach()[ids], (bias.detach()[ids] if bias is not None else None)
        self.project = int8_linear(weight, bias) if quantized else Projection(weight, bias)

    def encode(self, src, src_len):
        return self.model.encode(src, src_len)

    def init_state(self, enc):
        return self.model.init_state(enc)

    def step(self, tokens: Tensor, state, enc):
        dec = self.model.decoder
        att, state, weights = dec.step(dec.embed_inputs(self.ids[tokens]), state, enc)
        return self.project(att), state, weights

    def reorder_state(self, state, index):
        return self.model.reorder_state(state, index)

    def reorder_encoder(self, enc, index):
        return self.model.reorder_encoder(enc, index)
