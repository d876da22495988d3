"""The encoder-decoder and its builder.

Training uses `model(src, src_len, tgt_in)` (teacher forcing) -> attentional vectors, and the
output layer (`model.logits`) on the positions that count: the output layer never sees padding.
Decoding goes through mt/decoding.py's DecodingModel, which gives the search functions the
narrow interface they take (encode, init_state, step, reorder) and holds every decode-time
product and option, so this module holds no inference state.

    att, attn = model(src, src_len, tgt_in)      # batch x T x out_size, batch x T x src_len
    enc = model.encode(src, src_len)             # the encoding the decoder attends to
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from mt.attention import mask_bias
from mt.cells import GATES
from mt.config import ConfigError, ModelConfig
from mt.decoder import RecurrentDecoder
from mt.dropout import word_dropout
from mt.encoder import EncoderOut, RecurrentEncoder
from mt.tokenizer import PAD_ID


class Seq2Seq(nn.Module):
    def __init__(self, encoder: RecurrentEncoder, decoder: RecurrentDecoder, word_dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.word_dropout = word_dropout  # training only: input pieces -> <unk> (mt.dropout)

    def encode(self, src: Tensor, src_len: Tensor, encoder: Optional[nn.Module] = None) -> EncoderOut:
        """src: batch x src_len ids (PAD after the end); src_len: batch. `encoder`: another copy
        of this model's encoder (decoding's int8 one)."""
        outputs, summary, summary_cell = (encoder or self.encoder)(src, src_len)
        keys = self.decoder.attention.project_keys(outputs)  # once per batch, not per step
        mask = torch.arange(src.shape[1], device=src.device)[None, :] < src_len.to(src.device)[:, None]
        return EncoderOut(outputs, keys, mask_bias(mask, outputs.dtype), summary, summary_cell)

    # --- training -------------------------------------------------------------------------------

    def forward(self, src: Tensor, src_len: Tensor, tgt_in: Tensor, tf_ratio: float = 1.0,
                decoder_backward: str = "autograd") -> Tuple[Tensor, Tensor]:
        """Teacher forcing. tgt_in: batch x T (BOS + reference) -> attentional vectors
        batch x T x out_size and attention weights batch x T x src_len."""
        if self.training and self.word_dropout:
            src, tgt_in = word_dropout(src, self.word_dropout), word_dropout(tgt_in, self.word_dropout)
        enc = self.encode(src, src_len)
        return self.decoder(tgt_in, self.decoder.init_state(enc), enc, tf_ratio, decoder_backward)

    def logits(self, vectors: Tensor) -> Tensor:
        """Output layer: ... x out_size -> ... x vocab."""
        return self.decoder.output_layer(vectors)

    @property
    def tgt_vocab_size(self) -> int:
        return self.decoder.output_layer.out_features


def _init_weights(model: Seq2Seq) -> None:
    for name, p in model.named_parameters():
        if "embedding" in name:
            nn.init.normal_(p, std=p.shape[1] ** -0.5)
        elif p.dim() == 2 and "rnn" not in name:
            nn.init.xavier_uniform_(p)
        elif "bias" in name and "rnn" not in name:
            nn.init.zeros_(p)
    for emb in (model.encoder.embedding, model.decoder.embedding):
        with torch.no_grad():
            emb.weight[PAD_ID].zero_()
    for rnn in (model.encoder.rnn, model.decoder.rnn):  # LSTM forget gates start open
        if isinstance(rnn, nn.LSTM):
            for name, p in rnn.named_parameters():
                if name.startswith("bias_ih"):
                    with torch.no_grad():
                        p[p.shape[0] // 4: p.shape[0] // 2].fill_(1.0)


def build_model(cfg: ModelConfig, src_vocab: int, tgt_vocab: int, seed: Optional[int] = None) -> Seq2Seq:
    """Embeddings, then encoder, then decoder, then weight tying (Joey NMT's order)."""
    if seed is not None:
        torch.manual_seed(seed)
    tie = cfg.tie_embeddings
    if tie == "all" and src_vocab != tgt_vocab:
        raise ConfigError(f"model.tie_embeddings=all needs one vocabulary; got {src_vocab} and {tgt_vocab}")
    src_embed = nn.Embedding(src_vocab, cfg.emb_size, padding_idx=PAD_ID)
    tgt_embed = src_embed if tie == "all" else nn.Embedding(tgt_vocab, cfg.emb_size, padding_idx=PAD_ID)
    encoder = RecurrentEncoder(cfg.cell, src_embed, cfg.enc_hidden, cfg.enc_layers, cfg.bidirectional,
                               cfg.dropout, cfg.emb_dropout)
    # tied output weights need attentional vectors of the embedding size
    out_size = cfg.emb_size if tie != "none" else cfg.dec_hidden
    decoder = RecurrentDecoder(
        cfg.cell, tgt_embed, encoder.output_size, cfg.dec_hidden, cfg.dec_layers, cfg.decoder,
        cfg.attention, cfg.attn_size, cfg.input_feeding, cfg.bridge == "bridge", out_size,
        tgt_vocab, cfg.dropout, cfg.emb_dropout)
    model = Seq2Seq(encoder, decoder, cfg.word_dropout)
    _init_weights(model)
    if tie != "none":
        decoder.output_layer.weight = tgt_embed.weight
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_target_token(cfg: ModelConfig, src_vocab: int, tgt_vocab: int, src_per_tgt: float = 1.0,
                           mean_src_len: float = 13.0) -> float:
    """Approximate multiply-add FLOPs (x2) of training per target token: forward + backward (x3).
    Counts the matrix products only (recurrences, attention over mean_src_len, output layer)."""
    g = GATES[cfg.cell]
    d = 2 if cfg.bidirectional else 1
    enc_out = cfg.enc_hidden * d
    enc = 0.0
    for layer in range(cfg.enc_layers):
        inp = cfg.emb_size if layer == 0 else enc_out
        enc += d * g * cfg.enc_hidden * (inp + cfg.enc_hidden)
    out_size = cfg.emb_size if cfg.tie_embeddings != "none" else cfg.dec_hidden
    feed = enc_out if cfg.decoder == "bahdanau" else (out_size if cfg.input_feeding else 0)
    dec = 0.0
    for layer in range(cfg.dec_layers):
        inp = cfg.emb_size + feed if layer == 0 else cfg.dec_hidden
        dec += g * cfg.dec_hidden * (inp + cfg.dec_hidden)
    if cfg.attention in ("bahdanau", "concat"):
        attn = cfg.dec_hidden * cfg.attn_size + mean_src_len * (cfg.attn_size + enc_out) \
            + enc_out * cfg.attn_size * src_per_tgt  # keys projected once per source token
    else:
        key = enc_out * cfg.dec_hidden * src_per_tgt if cfg.attention == "general" else 0
        attn = mean_src_len * (cfg.dec_hidden + enc_out) + key
    out = (cfg.dec_hidden + enc_out) * out_size + out_size * tgt_vocab
    macs = enc * src_per_tgt + dec + attn + out
    return 2.0 * 3.0 * macs
