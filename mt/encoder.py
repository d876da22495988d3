"""Recurrent encoder: embeddings -> N-layer (bi)directional GRU / LSTM / Elman RNN.

Sequences are packed, so padding never reaches the recurrent states: the final state of every
sentence is the state after its last real token, whatever the batch's longest sentence.

    outputs, summary, summary_cell = encoder(src, src_len)   # src: batch x src_len ids; src_len: batch
    # outputs: batch x src_len x enc_size (zeros at padding); summary: batch x enc_size, the last
    # layer's final state(s), both directions; summary_cell: the same of the LSTM cell (else None)

Seq2Seq.encode wraps them, with the projected attention keys and the padding mask, in an
`EncoderOut`: what the decoder attends to. On CUDA the packed RNN is cuDNN's kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from mt.cells import make_rnn
from mt.dropout import Dropout


@dataclass
class EncoderOut:
    """What the decoder attends to, with the batch in dimension 0. Decoding may give one source
    several consecutive decoder rows (beam search: a sentence's beams): then `group` > 1 and
    the tensors attention reads stay one per source (n), while the rest has one per row (n x group).
    Copying the source's encoding for every beam made a beam step's attention read k times the
    memory, and that, not arithmetic, was its cost."""

    outputs: Tensor  # sources x src_len x enc_size
    keys: Tensor  # sources x src_len x key_size: attention keys, projected once
    bias: Tensor  # sources x src_len: 0 at tokens, -inf at padding (added to scores)
    summary: Tensor  # rows x enc_size (hidden state summary for the bridge)
    summary_cell: Optional[Tensor] = None  # rows x enc_size (LSTM cell state summary)
    group: int = 1  # decoder rows per source: rows i * group ... (i + 1) * group - 1 read source i

    def index_select(self, index: Tensor) -> "EncoderOut":
        """The encoding for new decoder rows (row r of the result is row index[r] of this one).
        Where the new rows come in runs of one source each, all runs of one length (beam search's
        expansion to k beams, and its dropping of finished sentences), the per-source tensors
        are not copied per row; otherwise (e.g. samples that finish one by one) they are."""
        source = index // self.group  # the source each new row reads
        group = _run_length(source)
        source = source[::group]
        per_row = {f: getattr(self, f).index_select(0, index) for f in ("summary", "summary_cell")
                   if getattr(self, f) is not None}
        if source.numel() == self.keys.shape[0] and bool((source == torch.arange(source.numel(), device=source.device)).all()):
            return replace(self, group=group, **per_row)  # the same sources: no copy
        return replace(self, group=group, outputs=self.outputs.index_select(0, source),
                       keys=self.keys.index_select(0, source), bias=self.bias.index_select(0, source), **per_row)


def _run_length(source: Tensor) -> int:
    """g if `source` is made of runs of g equal entries (source[i * g ... i * g + g - 1] equal), else 1."""
    n = source.numel()
    if n == 0:
        return 1
    differs = (source != source[0]).nonzero()
    g = int(differs[0]) if differs.numel() else n
    if g <= 1 or n % g or not bool((source.view(-1, g) == source[::g, None]).all()):
        return 1
    return g


class RecurrentEncoder(nn.Module):
    def __init__(self, cell: str, embedding: nn.Embedding, hidden: int, layers: int,
                 bidirectional: bool, dropout: float, emb_dropout: float):
        super().__init__()
        self.embedding = embedding
        self.rnn = make_rnn(cell, embedding.embedding_dim, hidden, layers, dropout, bidirectional)
        self.emb_dropout = Dropout(emb_dropout)
        self.dropout = Dropout(dropout)
        self.directions = 2 if bidirectional else 1
        self.output_size = hidden * self.directions
        self.layers = layers

    def forward(self, src: Tensor, src_len: Tensor):
        """src: batch x src_len; src_len: batch (on any device) -> outputs, summary, summary_cell."""
        assert src.dim() == 2 and src_len.shape == (src.shape[0],), (
            f"encoder shapes: src {tuple(src.shape)}, src_len {tuple(src_len.shape)}")
        emb = self.emb_dropout(self.embedding(src))  # B x S x E
        packed = pack_padded_sequence(emb, src_len.cpu(), batch_first=True, enforce_sorted=False)
        packed_out, final = self._rnn(packed)  # cuDNN on CUDA
        outputs, _ = pad_packed_sequence(packed_out, batch_first=True, total_length=src.shape[1])
        h_n, c_n = final if isinstance(final, tuple) else (final, None)

        def last_layer(state: Tensor) -> Tensor:  # (layers*dirs) x B x H -> B x dirs*H
            return torch.cat(list(state[-self.directions:]), dim=-1)

        summary_cell = last_layer(c_n) if c_n is not None else None
        return self.dropout(outputs), last_layer(h_n), summary_cell

    def _rnn(self, packed: PackedSequence):
        """The packed RNN. Under bf16 autocast on the CPU, in bf16: autocast leaves torch's RNN in
        float32 there (CUDA's cuDNN RNN it does cast), while CPUs with AMX multiply bf16 about
        four times as fast. The weights are cast once per batch; gradients reach the float32
        parameters through the cast."""
        cpu_bf16 = packed.data.device.type == "cpu" and torch.is_autocast_enabled("cpu") \
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and isinstance(self.rnn, nn.RNNBase)
        if not cpu_bf16:
            return self.rnn(packed)
        weights = {name: p.to(torch.bfloat16) for name, p in self.rnn.named_parameters()}
        return functional_call(self.rnn, weights, (packed._replace(data=packed.data.to(torch.bfloat16)),))
