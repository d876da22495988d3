"""Everything decode-time, in one wrapper around a trained model: `DecodingModel`.

    decoding = DecodingModel(model, decode_cfg)       # decode.bf16 / int8 / shortlist / min_len ...
    hyps = decoding.search(src, src_len)              # greedy, beam or sampling, as decode.method says
    logits, state, attn = decoding.step(tokens, state, enc)   # mt.search.Decodable, for the searches

It implements the narrow interface the search functions take (encode, init_state, step,
reorder_state, reorder_encoder; fairseq's incremental decoding idea) and holds what decoding
needs beyond the model: the step's matrix products made once with detached, contiguous weights
(`Projection`; under bf16 their bf16 copies, made once), the first layer's embedding products
for the whole vocabulary as a table (a step gathers rows instead of multiplying), int8 weights,
and the vocabulary shortlist. The model's modules are never modified: int8 quantizes a copy of
the encoder, so one model can serve several wrappers. The equations are the model's own:
`RecurrentDecoder.step` with these products.

Speed options (each trades a little accuracy for speed; their BLEU cost is in BENCHMARKS.md):
  bf16       matrix products under bf16 autocast; attention stays float32 (a step's attention is
             matrix-vector work, bound by memory: bf16 there only adds casts, and bf16 tanh is
             slow on CPUs)
  int8       dynamic int8 quantization of every matrix product but the embedding table (CPU)
  shortlist  score only the N most frequent target pieces + the likeliest translations of the
             batch's source pieces (mt/shortlist.py)
"""
from __future__ import annotations

import copy
import logging
import warnings
from contextlib import nullcontext
from dataclasses import replace
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt.config import DecodeConfig, structured
from mt.decoder import DecoderState, StepProducts
from mt.encoder import EncoderOut
from mt.model import Seq2Seq
from mt.search import Hypothesis, beam_search, greedy_search, sample_search
from mt.shortlist import Shortlist

log = logging.getLogger("mt.decoding")
EMB_TABLE_MAX_MB = 256  # the largest embedding-product table kept (V x gates*hidden float32)


class Projection:
    """x -> x W^T + b with detached, contiguous weights; under autocast, their copy in the
    autocast dtype is made once rather than at every step."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.weight = weight.detach().contiguous()
        self.bias = None if bias is None else bias.detach()
        self.cast: dict = {}

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            if dtype not in self.cast:
                self.cast[dtype] = (self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
            w, b = self.cast[dtype]
            return F.linear(x.to(dtype), w, b)
        return F.linear(x, self.weight, self.bias)


def int8_linear(weight: Tensor, bias: Optional[Tensor]) -> nn.Module:
    """x -> x W^T + b with W in int8 (per-tensor scale) and x quantized per call (dynamic)."""
    from torch.ao.quantization import quantize_dynamic

    # skip_init: no random initialisation of weights that are overwritten next (the shortlist
    # makes one of these per batch)
    linear = torch.nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight.detach())
        if bias is not None:
            linear.bias.copy_(bias.detach())
    return quantize_dynamic(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8)[0]


def _quiet_int8() -> None:
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated", category=DeprecationWarning)


class DecodingModel:
    """A model with decode-time products and options (see the module docstring)."""

    def __init__(self, model: Seq2Seq, decode=None, shortlist: Optional[Shortlist] = None):
        """decode: a DecodeConfig (default: DecodeConfig's defaults: no speed option on)."""
        self.model = model.eval()
        self.decode = decode = decode if decode is not None else structured(DecodeConfig())
        self.bf16, self.int8 = bool(decode.bf16), bool(decode.int8)
        self.shortlist = shortlist
        device = next(model.parameters()).device
        if self.int8 and device.type != "cpu":
            raise ValueError("decode.int8 (--int8) is for CPU inference")
        if self.int8:
            _quiet_int8()
        self.linear = int8_linear if self.int8 else Projection
        self.encoder = self._encoder()
        self.products = self._products()
        out = model.decoder.output_layer
        # With a shortlist, `encode` picks the batch's candidates and slices the output layer to
        # them: the wrapper then decodes one batch at a time (the searches do), in index space.
        self.vocab_ids: Optional[Tensor] = None  # the batch's shortlist: indices -> vocabulary ids
        self.logits = self.linear(out.weight, out.bias)

    def _encoder(self) -> nn.Module:
        if not self.int8:
            return self.model.encoder
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(self.model.encoder), {nn.GRU, nn.LSTM, nn.RNN}, dtype=torch.qint8)

    def _products(self) -> StepProducts:
        dec, lin = self.model.decoder, self.linear
        rnn, emb = dec.rnn, dec.emb_size
        w = rnn.weight_ih_l0.detach()
        if dec.embedding.num_embeddings * w.shape[0] * 4 <= EMB_TABLE_MAX_MB * 2 ** 20:
            with torch.no_grad():
                table = F.linear(dec.embedding.weight, w[:, :emb], rnn.bias_ih_l0)  # V x G
            embed = lambda tokens: F.embedding(tokens, table)  # noqa: E731  (a row per token)
        else:
            embed_in = Projection(w[:, :emb], rnn.bias_ih_l0)
            embed = lambda tokens: embed_in(dec.embedding(tokens))  # noqa: E731
        layer = lambda kind, i: lin(getattr(rnn, f"weight_{kind}_l{i}"), getattr(rnn, f"bias_{kind}_l{i}"))  # noqa: E731
        attention = dec.attention
        query_layer = getattr(attention, "query_layer", None)
        return StepProducts(
            embed=embed, feed=lin(w[:, emb:], None) if dec.feed_size else None,
            hh=[layer("hh", i) for i in range(dec.layers)],
            ih=[None] + [layer("ih", i) for i in range(1, dec.layers)],
            query=attention.project_query if query_layer is None else lin(query_layer.weight, None),
            attend=self._attend_float32 if self.bf16 else attention.attend,
            out=lin(dec.att_layer.weight, dec.att_layer.bias))

    def _attend_float32(self, q: Tensor, keys: Tensor, values: Tensor, bias: Tensor):
        with torch.autocast(q.device.type, enabled=False):
            return self.model.decoder.attention.attend(q.to(values.dtype), keys, values, bias)

    # --- mt.search.Decodable ----------------------------------------------------------------------

    def encode(self, src: Tensor, src_len: Tensor) -> EncoderOut:
        """src: batch x src_len ids; src_len: batch. Also picks the batch's shortlist."""
        enc = self.model.encode(src, src_len, self.encoder)
        if self.bf16:  # attention runs in float32: cast what it reads once per batch
            dtype = self.model.decoder.rnn.weight_hh_l0.dtype
            enc = replace(enc, outputs=enc.outputs.to(dtype), keys=enc.keys.to(dtype), bias=enc.bias.to(dtype))
        if self.shortlist is not None:
            self.restrict(self.shortlist.for_batch(src))
        return enc

    def restrict(self, vocab_ids: Tensor) -> None:
        """Score only `vocab_ids` (a shortlist, sorted ids) from now on: tokens and logits are
        indices into it. mt/ensemble.py gives every member the same one."""
        self.vocab_ids = vocab_ids
        out = self.model.decoder.output_layer
        bias = out.bias.detach()[vocab_ids] if out.bias is not None else None
        self.logits = self.linear(out.weight.detach()[vocab_ids], bias)

    def init_state(self, enc: EncoderOut) -> DecoderState:
        return self.model.decoder.init_state(enc)

    def step(self, tokens: Tensor, state: DecoderState, enc: EncoderOut):
        """tokens: batch (shortlist indices when a shortlist is on) -> logits batch x V, state, attention."""
        if self.vocab_ids is not None:
            tokens = self.vocab_ids[tokens]
        att, state, weights = self.model.decoder.step(self.products.embed(tokens), state, enc, self.products)
        return self.logits(att), state, weights

    @staticmethod
    def reorder_state(state: DecoderState, index: Tensor) -> DecoderState:
        return state.index_select(index)

    @staticmethod
    def reorder_encoder(enc: EncoderOut, index: Tensor) -> EncoderOut:
        return enc.index_select(index)

    # --- search -------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def search(self, src: Tensor, src_len: Tensor) -> List[List[Hypothesis]]:
        """decode.method over one batch: per sentence its hypotheses, best first, in vocabulary ids."""
        return search(self, self.decode, src, src_len)


@torch.no_grad()
def search(model, d, src: Tensor, src_len: Tensor) -> List[List[Hypothesis]]:
    """The search `d` (a DecodeConfig) names, over one batch of a DecodingModel or an Ensemble
    (a Decodable whose `vocab_ids`, after encode, map shortlist indices back to vocabulary ids)."""
    with torch.autocast(src.device.type, dtype=torch.bfloat16) if d.bf16 else nullcontext():
        if d.method == "greedy":
            hyps = greedy_search(model, src, src_len, d.max_len_a, d.max_len_b, d.min_len)
        elif d.method == "beam":
            hyps = beam_search(model, src, src_len, d.beam_size, d.alpha, d.max_len_a, d.max_len_b, d.n_best, d.min_len)
        else:
            hyps = sample_search(model, src, src_len, d.max_len_a, d.max_len_b, d.min_len, temperature=d.temperature,
                                 top_k=d.top_k, top_p=d.top_p, num_samples=d.n_best, seed=d.seed)
    if model.vocab_ids is not None:  # shortlist indices -> vocabulary ids
        for sentence in hyps:
            for h in sentence:
                h.tokens = model.vocab_ids[torch.tensor(h.tokens, dtype=torch.long)].tolist() if h.tokens else []
    return hyps
