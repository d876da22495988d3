"""Attentional recurrent decoder: one step function, called by training and decoding alike.

Two placements of attention (Luong et al. 2015, section 3; Bahdanau et al. 2015):

    bahdanau:  c_t = attn(s_{t-1});  s_t = RNN([y_{t-1}; c_t], s_{t-1});  a_t = tanh(W [s_t; c_t])
    luong:     s_t = RNN([y_{t-1}; a_{t-1}], s_{t-1});  c_t = attn(s_t);  a_t = tanh(W [s_t; c_t])
               (a_{t-1} is fed only with input feeding)
    logits_t = W_out a_t

`step` is that recurrence, written once over the cell and attention functions of mt/cells.py and
mt/attention.py. Its matrix products come in a `StepProducts`: the module's own parameters
(`products()`, training) or decoding's detached / bf16 / int8 ones (mt/decoding.py), so the
equations do not change with the arithmetic. Teacher forcing (`forward`) runs the whole target:

    luong, no input feeding   one nn.GRU / nn.LSTM / nn.RNN call (cuDNN on CUDA), then attention
    backward="handwritten"    mt/decoder_loop.py: the same functions, a hand-written backward
                              (one layer; chosen by train.decoder_backward, see there)
    otherwise                 `step` in a loop under autograd

The input-side product of the embeddings, the part of a step that does not depend on the
previous step, is made for all steps in one large product before any loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt import decoder_loop
from mt.attention import build_attention
from mt.cells import cell_step, make_rnn
from mt.dropout import Dropout
from mt.encoder import EncoderOut

Linear = Callable[[Tensor], Tensor]  # x -> x W^T + b


@dataclass
class DecoderState:
    """Recurrent state between steps; every tensor has the batch in dimension 0."""

    hidden: Tuple[Tensor, ...]  # per layer: batch x dec_hidden
    cell: Optional[Tuple[Tensor, ...]] = None  # per layer: batch x dec_hidden (LSTM)
    feed: Optional[Tensor] = None  # batch x out_size: previous attentional vector (input feeding)

    def index_select(self, index: Tensor) -> "DecoderState":
        pick = lambda ts: None if ts is None else tuple(t.index_select(0, index) for t in ts)  # noqa: E731
        feed = None if self.feed is None else self.feed.index_select(0, index)
        return DecoderState(pick(self.hidden), pick(self.cell), feed)


@dataclass
class StepProducts:
    """The matrix products of a decoder step (gates G = gates x dec_hidden)."""

    embed: Callable[[Tensor], Tensor]  # tokens batch [x T] -> first layer's input-side gx, batch [x T] x G
    feed: Optional[Linear]  # fed vector (context or attentional vector) -> its share of gx (no bias)
    hh: List[Linear]  # per layer: h -> gh
    ih: List[Optional[Linear]]  # per layer above the first: the layer below's h -> gx ([0] is None)
    query: Linear  # h -> the projected attention query
    attend: Callable[..., Tuple[Tensor, Tensor]]  # (q, keys, values, bias) -> context, weights
    out: Linear  # [h; context] -> the attentional vector's pre-activation


class RecurrentDecoder(nn.Module):
    def __init__(self, cell: str, embedding: nn.Embedding, enc_size: int, hidden: int, layers: int,
                 style: str, attention: str, attn_size: int, input_feeding: bool, bridge: bool,
                 out_size: int, vocab_size: int, dropout: float, emb_dropout: float):
        super().__init__()
        self.cell_kind, self.style, self.layers, self.hidden_size = cell, style, layers, hidden
        self.embedding = embedding
        self.emb_size, self.out_size = embedding.embedding_dim, out_size
        # what the first layer takes besides the embedding: the context (bahdanau), the previous
        # attentional vector (luong + input feeding) or nothing
        self.feed_size = enc_size if style == "bahdanau" else (out_size if input_feeding else 0)
        self.rnn = make_rnn(cell, self.emb_size + self.feed_size, hidden, layers, dropout)  # holds the weights
        self.attention = build_attention(attention, hidden, enc_size, attn_size)
        self.att_layer = nn.Linear(hidden + enc_size, out_size)
        self.output_layer = nn.Linear(out_size, vocab_size)
        self.bridge_h = nn.Linear(enc_size, layers * hidden) if bridge else None
        self.bridge_c = nn.Linear(enc_size, layers * hidden) if bridge and cell == "lstm" else None
        self.emb_dropout = Dropout(emb_dropout)
        self.dropout = Dropout(dropout)

    @property
    def parallel(self) -> bool:
        """True when training can run the RNN over the whole target in one call."""
        return self.style == "luong" and self.feed_size == 0

    def init_state(self, enc: EncoderOut) -> DecoderState:
        batch = enc.summary.shape[0]

        def bridged(layer: Optional[nn.Module], summary: Optional[Tensor]) -> Tuple[Tensor, ...]:
            if layer is None or summary is None:
                zero = enc.summary.new_zeros(batch, self.hidden_size)
                return tuple(zero for _ in range(self.layers))
            return tuple(torch.tanh(layer(summary)).view(batch, self.layers, -1).unbind(1))

        hidden = bridged(self.bridge_h, enc.summary)
        cell = bridged(self.bridge_c, enc.summary_cell) if self.cell_kind == "lstm" else None
        feed = enc.summary.new_zeros(batch, self.out_size) if self.style == "luong" and self.feed_size else None
        return DecoderState(hidden, cell, feed)

    def products(self) -> StepProducts:
        """The step's products over this module's parameters (autograd sees them). Take them once
        per batch: the weight slices are views, so autograd then accumulates one gradient each
        instead of one full-size one per step."""
        rnn, emb = self.rnn, self.emb_size
        w_emb, w_feed = rnn.weight_ih_l0[:, :emb], rnn.weight_ih_l0[:, emb:]

        def weights(kind: str, layer: int) -> Linear:
            w, b = getattr(rnn, f"weight_{kind}_l{layer}"), getattr(rnn, f"bias_{kind}_l{layer}")
            return lambda x: F.linear(x, w, b)

        return StepProducts(
            embed=lambda tokens: F.linear(self.emb_dropout(self.embedding(tokens)), w_emb, rnn.bias_ih_l0),
            feed=(lambda x: F.linear(x, w_feed)) if self.feed_size else None,
            hh=[weights("hh", i) for i in range(self.layers)],
            ih=[None] + [weights("ih", i) for i in range(1, self.layers)],
            query=self.attention.project_query, attend=self.attention.attend, out=self.att_layer)

    def step(self, gx0: Tensor, state: DecoderState, enc: EncoderOut,
             p: StepProducts) -> Tuple[Tensor, DecoderState, Tensor]:
        """One step from the embedding pre-activations gx0 (batch x G, `p.embed`). Returns the
        attentional vector (batch x out_size), the new state and the attention (batch x src_len)."""
        context = weights = None
        if self.style == "bahdanau":
            context, weights = p.attend(p.query(state.hidden[-1]), enc.keys, enc.outputs, enc.bias)
            fed = context
        else:
            fed = state.feed
        x = gx0 if fed is None else gx0 + p.feed(fed)
        hidden: List[Tensor] = []
        cells: List[Tensor] = []
        for layer in range(self.layers):
            if layer > 0:  # nn.GRU semantics: dropout between layers
                x = p.ih[layer](self.dropout(hidden[-1]))
            c_prev = state.cell[layer] if state.cell else None
            h, c, _ = cell_step(self.cell_kind, x, p.hh[layer](state.hidden[layer]), state.hidden[layer], c_prev)
            hidden.append(h)
            if c is not None:
                cells.append(c)
        top = hidden[-1]
        if self.style == "luong":
            context, weights = p.attend(p.query(top), enc.keys, enc.outputs, enc.bias)
        att = torch.tanh(p.out(self.dropout(torch.cat([top, context], dim=1))))
        feed = att if self.style == "luong" and self.feed_size else None
        return att, DecoderState(tuple(hidden), tuple(cells) if cells else None, feed), weights

    # --- teacher forcing ------------------------------------------------------------------------

    def forward(self, tgt_in: Tensor, state: DecoderState, enc: EncoderOut, tf_ratio: float = 1.0,
                backward: str = "autograd") -> Tuple[Tensor, Tensor]:
        """tgt_in: batch x T (BOS + reference). Returns attentional vectors batch x T x out_size
        and attention weights batch x T x src_len. tf_ratio < 1 is scheduled sampling: each
        step feeds the reference token with that probability, else the model's own argmax.
        backward: "handwritten" runs mt/decoder_loop.py where it covers the architecture."""
        if tf_ratio < 1.0:
            return self._forward_sampled(tgt_in, state, enc, tf_ratio)
        if self.parallel:
            return self._forward_parallel(tgt_in, state, enc)
        if backward == "handwritten" and decoder_loop.covers(self):
            return decoder_loop.teacher_forced(self, tgt_in, state, enc)
        p = self.products()
        gx = p.embed(tgt_in).unbind(1)  # T x (B x G): one large product for all steps
        atts, weights = [], []
        for t in range(tgt_in.shape[1]):
            att, state, w = self.step(gx[t], state, enc, p)
            atts.append(att)
            weights.append(w)
        return torch.stack(atts, dim=1), torch.stack(weights, dim=1)

    def _forward_parallel(self, tgt_in: Tensor, state: DecoderState, enc: EncoderOut):
        emb = self.emb_dropout(self.embedding(tgt_in))  # B x T x E
        h0 = torch.stack(state.hidden)  # layers x B x H
        init = (h0, torch.stack(state.cell)) if self.cell_kind == "lstm" else h0
        outputs, _ = self.rnn(emb, init)  # B x T x H, the whole target in one call
        context, weights = self.attention(outputs, enc.keys, enc.outputs, enc.bias)
        att = torch.tanh(self.att_layer(self.dropout(torch.cat([outputs, context], dim=2))))
        return att, weights

    def _forward_sampled(self, tgt_in: Tensor, state: DecoderState, enc: EncoderOut, tf_ratio: float):
        p = self.products()
        atts, weights = [], []
        tokens = tgt_in[:, 0]
        for t in range(tgt_in.shape[1]):
            att, state, w = self.step(p.embed(tokens), state, enc, p)
            atts.append(att)
            weights.append(w)
            if t + 1 < tgt_in.shape[1]:
                with torch.no_grad():
                    predicted = self.output_layer(att).argmax(dim=-1)
                use_gold = torch.rand(predicted.shape, device=predicted.device) < tf_ratio
                tokens = torch.where(use_gold, tgt_in[:, t + 1], predicted)
        return torch.stack(atts, dim=1), torch.stack(weights, dim=1)
