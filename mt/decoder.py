"""Attentional recurrent decoder: one step function shared by training and decoding.

Two placements of attention (Luong et al. 2015, section 3; Bahdanau et al. 2015):

    bahdanau:  c_t = attn(s_{t-1});  s_t = RNN([y_{t-1}; c_t], s_{t-1});  a_t = tanh(W [s_t; c_t])
    luong:     s_t = RNN([y_{t-1}; a_{t-1}], s_{t-1});  c_t = attn(s_t);  a_t = tanh(W [s_t; c_t])
               (a_{t-1} is fed only with input feeding)
    logits_t = W_out a_t

The weights live in torch's fused nn.GRU / nn.LSTM / nn.RNN module, so the Luong decoder without
input feeding trains with one call over the whole target (no Python loop). Otherwise the step
runs the cell equations itself, which lets the input-side product of the embeddings, the part of
each step that does not depend on the previous step, be computed for all steps in one large
matrix product before the loop; a step then adds only the product of its fed vector.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt.attention import build_attention
from mt.encoder import EncoderOut, make_rnn
from mt.fused import Dropout, dropout_mask

GATES = {"gru": 3, "lstm": 4, "rnn_tanh": 1, "rnn_relu": 1}
EMB_TABLE_MAX_MB = 256  # freeze(): the largest embedding-product table kept for decoding


class Projection:
    """x -> x W^T + b for decoding: detached, contiguous weights; under autocast, their copy in
    the autocast dtype is made once rather than at every step."""

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


@dataclass
class DecoderState:
    """Recurrent state between steps; every tensor has the batch in dimension 0."""

    hidden: Tuple[Tensor, ...]  # per layer: batch x dec_hidden
    cell: Optional[Tuple[Tensor, ...]] = None  # per layer: batch x dec_hidden (LSTM)
    feed: Optional[Tensor] = None  # batch x att_size: previous attentional vector (input feeding)

    def index_select(self, index: Tensor) -> "DecoderState":
        pick = lambda ts: None if ts is None else tuple(t.index_select(0, index) for t in ts)  # noqa: E731
        feed = None if self.feed is None else self.feed.index_select(0, index)
        return DecoderState(pick(self.hidden), pick(self.cell), feed)


class RecurrentDecoder(nn.Module):
    def __init__(self, cell: str, embedding: nn.Embedding, enc_size: int, hidden: int, layers: int,
                 style: str, attention: str, attn_size: int, input_feeding: bool, bridge: bool,
                 att_size: int, vocab_size: int, dropout: float, emb_dropout: float):
        super().__init__()
        self.cell, self.style, self.layers, self.hidden_size = cell, style, layers, hidden
        self.embedding = embedding
        emb_size = embedding.embedding_dim
        # what the first layer takes besides the embedding: the context (bahdanau), the previous
        # attentional vector (luong + input feeding) or nothing
        self.feed_size = enc_size if style == "bahdanau" else (att_size if input_feeding else 0)
        self.rnn = make_rnn(cell, emb_size + self.feed_size, hidden, layers, dropout)
        self.attention = build_attention(attention, hidden, enc_size, attn_size)
        self.att_layer = nn.Linear(hidden + enc_size, att_size)
        self.output_layer = nn.Linear(att_size, vocab_size)
        self.bridge_h = nn.Linear(enc_size, layers * hidden) if bridge else None
        self.bridge_c = nn.Linear(enc_size, layers * hidden) if bridge and cell == "lstm" else None
        self.emb_dropout = Dropout(emb_dropout)
        self.dropout = Dropout(dropout)
        self.emb_size, self.att_size = emb_size, att_size
        self.use_fused = True  # mt.fused.DecoderLoop for teacher forcing where it applies
        self.frozen: Optional[dict] = None  # inference weights, see freeze()

    @property
    def parallel(self) -> bool:
        """True when training can run the RNN over the whole target in one call."""
        return self.style == "luong" and self.feed_size == 0

    # --- state ----------------------------------------------------------------------------------

    def init_state(self, enc: EncoderOut) -> DecoderState:
        batch = enc.summary.shape[0]

        def bridged(layer: Optional[nn.Linear], summary: Optional[Tensor]) -> Tuple[Tensor, ...]:
            if layer is None or summary is None:
                zero = enc.summary.new_zeros(batch, self.hidden_size)
                return tuple(zero for _ in range(self.layers))
            return tuple(torch.tanh(layer(summary)).view(batch, self.layers, -1).unbind(1))

        hidden = bridged(self.bridge_h, enc.summary)
        cell = bridged(self.bridge_c, enc.summary_cell) if self.cell == "lstm" else None
        feed = enc.summary.new_zeros(batch, self.att_size) if self.style == "luong" and self.feed_size else None
        return DecoderState(hidden, cell, feed)

    # --- the step -------------------------------------------------------------------------------

    def embed_inputs(self, tokens: Tensor) -> Tensor:
        """Input-side gate pre-activations of the first layer from the embeddings alone.
        tokens: batch [x T] -> batch [x T] x gates*hidden (includes the input bias)."""
        if self.frozen and self.frozen["emb_table"] is not None:
            return F.embedding(tokens, self.frozen["emb_table"])  # a row per token, no product
        w = self.rnn.weight_ih_l0[:, :self.emb_size]
        return F.linear(self.emb_dropout(self.embedding(tokens)), w, self.rnn.bias_ih_l0)

    def feed_weight(self) -> Optional[Tensor]:
        """The first layer's input weights for the fed vector (a view: take it once per batch,
        so autograd accumulates one gradient for it instead of one full-size one per step)."""
        return self.rnn.weight_ih_l0[:, self.emb_size:] if self.feed_size else None

    def freeze(self) -> None:
        """For inference (dropped again by train()): the products a step makes, as Projection
        objects with contiguous weights (mt.inference.quantize_int8 swaps them for int8 ones),
        and the first layer's embedding product for the whole target vocabulary as a table
        (V x gates*hidden), so a step gathers rows instead of multiplying, unless the table
        would be large (EMB_TABLE_MAX_MB)."""
        rnn, emb = self.rnn, self.emb_size
        w = rnn.weight_ih_l0.detach()
        table = None
        if self.embedding.num_embeddings * w.shape[0] * 4 <= EMB_TABLE_MAX_MB * 2 ** 20:
            with torch.no_grad():
                table = F.linear(self.embedding.weight, w[:, :emb], rnn.bias_ih_l0)
        self.frozen = {
            "emb_table": table,
            "feed": Projection(w[:, emb:], None) if self.feed_size else None,
            "hh": [Projection(getattr(rnn, f"weight_hh_l{i}"), getattr(rnn, f"bias_hh_l{i}")) for i in range(self.layers)],
            "ih": [None] + [Projection(getattr(rnn, f"weight_ih_l{i}"), getattr(rnn, f"bias_ih_l{i}"))
                            for i in range(1, self.layers)],
        }

    def train(self, mode: bool = True) -> "RecurrentDecoder":
        if mode:
            self.frozen = None
        return super().train(mode)

    def _cell(self, gx: Tensor, h: Tensor, c: Optional[Tensor], layer: int):
        """One layer, one step: gx = input-side pre-activations (batch x gates*hidden)."""
        if self.frozen:
            gh = self.frozen["hh"][layer](h)
        else:
            gh = F.linear(h, getattr(self.rnn, f"weight_hh_l{layer}"), getattr(self.rnn, f"bias_hh_l{layer}"))
        if self.cell == "gru":  # gate order r, z, n, as in nn.GRU
            n_h = self.hidden_size
            gx_rz, gx_n = gx.split([2 * n_h, n_h], dim=1)
            gh_rz, gh_n = gh.split([2 * n_h, n_h], dim=1)
            r, z = torch.sigmoid(gx_rz + gh_rz).chunk(2, dim=1)
            n = torch.tanh(gx_n + r * gh_n)
            return n + z * (h - n), None
        if self.cell == "lstm":  # gate order i, f, g, o, as in nn.LSTM
            i, f, g, o = (gx + gh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        pre = gx + gh
        return (torch.tanh(pre) if self.cell == "rnn_tanh" else torch.relu(pre)), None

    def step(self, gx0: Tensor, state: DecoderState, enc: EncoderOut,
             w_feed: Optional[Tensor] = None) -> Tuple[Tensor, DecoderState, Tensor]:
        """One decoder step from the embedding pre-activations gx0 (batch x gates*hidden);
        w_feed: `feed_weight()`, taken once by the caller. Returns the attentional vector
        (batch x att_size), the new state and the attention weights (batch x src_len)."""
        context = weights = None
        if self.style == "bahdanau":
            context, weights = self.attention(state.hidden[-1], enc.keys, enc.outputs, enc.bias)
            fed = context
        else:
            fed = state.feed
        if fed is not None and self.frozen:
            gx0 = gx0 + self.frozen["feed"](fed)
        elif fed is not None:
            gx0 = gx0 + F.linear(fed, w_feed if w_feed is not None else self.feed_weight())
        hidden: List[Tensor] = []
        cells: List[Tensor] = []
        x = gx0
        for layer in range(self.layers):
            if layer > 0 and self.frozen:
                x = self.frozen["ih"][layer](hidden[-1])
            elif layer > 0:  # nn.GRU semantics: dropout between layers
                x = F.linear(self.dropout(hidden[-1]), getattr(self.rnn, f"weight_ih_l{layer}"),
                             getattr(self.rnn, f"bias_ih_l{layer}"))
            h, c = self._cell(x, state.hidden[layer], state.cell[layer] if state.cell else None, layer)
            hidden.append(h)
            if c is not None:
                cells.append(c)
        top = hidden[-1]
        if self.style == "luong":
            context, weights = self.attention(top, enc.keys, enc.outputs, enc.bias)
        att = torch.tanh(self.att_layer(self.dropout(torch.cat([top, context], dim=1))))
        feed = att if self.style == "luong" and self.feed_size else None
        return att, DecoderState(tuple(hidden), tuple(cells) if cells else None, feed), weights

    # --- teacher-forced training ----------------------------------------------------------------

    def forward(self, tgt_in: Tensor, state: DecoderState, enc: EncoderOut,
                tf_ratio: float = 1.0) -> Tuple[Tensor, Tensor]:
        """tgt_in: batch x T (BOS + reference). Returns attentional vectors batch x T x att_size
        and attention weights batch x T x src_len. tf_ratio < 1 is scheduled sampling: each
        step feeds the reference token with that probability, else the model's own argmax."""
        if tf_ratio < 1.0:
            return self._forward_sampled(tgt_in, state, enc, tf_ratio)
        if self.parallel:
            return self._forward_parallel(tgt_in, state, enc)
        if self.use_fused and self.layers == 1:
            return self._forward_fused(tgt_in, state, enc)
        gx = self.embed_inputs(tgt_in).unbind(1)  # T x (B x G): one large product for all steps
        w_feed = self.feed_weight()
        atts, weights = [], []
        for t in range(tgt_in.shape[1]):
            att, state, w = self.step(gx[t], state, enc, w_feed)
            atts.append(att)
            weights.append(w)
        return torch.stack(atts, dim=1), torch.stack(weights, dim=1)

    def _forward_fused(self, tgt_in: Tensor, state: DecoderState, enc: EncoderOut):
        """The same computation as the step loop, through mt.fused.DecoderLoop (hand-written
        backward, weight gradients batched over all steps)."""
        from mt.attention import AdditiveAttention
        from mt.fused import DecoderLoop

        gx = self.embed_inputs(tgt_in.t())  # T x B x G
        empty = gx.new_empty(0)
        additive = isinstance(self.attention, AdditiveAttention)
        w_q = self.attention.query_layer.weight if additive else empty
        v = self.attention.energy_layer.weight.view(-1) if additive else empty
        c0 = state.cell[0] if state.cell is not None else empty
        device = tgt_in.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.rnn.weight_hh_l0.dtype
        spec = (self.cell, self.style, additive, compute)
        rnn = self.rnn
        if self.style == "bahdanau":
            hidden, context, weights = DecoderLoop.apply(
                spec, gx, state.hidden[0], c0, empty, enc.keys, enc.outputs, enc.bias, rnn.weight_hh_l0,
                rnn.bias_hh_l0, self.feed_weight(), w_q, v, empty, empty, empty)
            att = torch.tanh(self.att_layer(self.dropout(torch.cat([hidden, context], dim=2))))
        else:
            mask = empty
            if self.training and self.dropout.p > 0:
                width = self.hidden_size + enc.outputs.shape[2]
                mask = dropout_mask((gx.shape[0], gx.shape[1], width), self.dropout.p, gx.device, gx.dtype)
            att, _, weights = DecoderLoop.apply(
                spec, gx, state.hidden[0], c0, state.feed, enc.keys, enc.outputs, enc.bias, rnn.weight_hh_l0,
                rnn.bias_hh_l0, self.feed_weight(), w_q, v, self.att_layer.weight, self.att_layer.bias, mask)
        return att.transpose(0, 1), weights.transpose(0, 1)

    def _forward_parallel(self, tgt_in: Tensor, state: DecoderState, enc: EncoderOut):
        emb = self.emb_dropout(self.embedding(tgt_in))  # B x T x E
        h0 = torch.stack(state.hidden)  # layers x B x H
        init = (h0, torch.stack(state.cell)) if self.cell == "lstm" else h0
        outputs, _ = self.rnn(emb, init)  # B x T x H, the whole target in one call
        context, weights = self.attention(outputs, enc.keys, enc.outputs, enc.bias)
        att = torch.tanh(self.att_layer(self.dropout(torch.cat([outputs, context], dim=2))))
        return att, weights

    def _forward_sampled(self, tgt_in: Tensor, state: DecoderState, enc: EncoderOut, tf_ratio: float):
        atts, weights = [], []
        tokens, w_feed = tgt_in[:, 0], self.feed_weight()
        for t in range(tgt_in.shape[1]):
            att, state, w = self.step(self.embed_inputs(tokens), state, enc, w_feed)
            atts.append(att)
            weights.append(w)
            if t + 1 < tgt_in.shape[1]:
                with torch.no_grad():
                    predicted = self.output_layer(att).argmax(dim=-1)
                use_gold = torch.rand(predicted.shape, device=predicted.device) < tf_ratio
                tokens = torch.where(use_gold, tgt_in[:, t + 1], predicted)
        return torch.stack(atts, dim=1), torch.stack(weights, dim=1)
