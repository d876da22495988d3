"""Greedy, beam and sampling search, batched, over a narrow interface only (`Decodable`:
encode, init_state, step, reorder_state, reorder_encoder), which mt/decoding.py's DecodingModel
implements; tests drive the searches with scripted models of their own.

    hyps = beam_search(model, src, src_len, beam_size=5, alpha=0.6)
    hyps[i][0].tokens    # best hypothesis of sentence i (ids, no BOS/EOS); .score, .logprob

Every function returns, for each input sentence in input order, a list of Hypothesis sorted by
score (best first). Sentences that finish leave the batch, so one long sentence does not keep
the others' work going, and the encoder runs once per batch. Output length is bounded by
`max_len_a * src_len + max_len_b` (src_len without EOS); `min_len` blocks EOS before that many
tokens (with min_len == max length, every output has exactly that length: used by benchmarks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Protocol, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mt.tokenizer import BOS_ID, EOS_ID


class Decodable(Protocol):
    """What search sees of a model. `state` and `enc` are opaque to search, with the batch (the
    decoder rows) in dimension 0 of what `reorder_*` re-index."""

    def encode(self, src: Tensor, src_len: Tensor) -> Any: ...  # src: batch x src_len ids

    def init_state(self, enc: Any) -> Any: ...

    def step(self, tokens: Tensor, state: Any, enc: Any) -> Tuple[Tensor, Any, Tensor]:
        """tokens: rows (the previous output) -> logits rows x V, new state, attention rows x src_len."""
        ...

    def reorder_state(self, state: Any, index: Tensor) -> Any: ...  # row r <- row index[r]

    def reorder_encoder(self, enc: Any, index: Tensor) -> Any: ...  # the same, for the encoding


@dataclass
class Hypothesis:
    tokens: List[int]  # without BOS and EOS
    score: float  # what search ranks by (length-normalised log-probability for beam search)
    logprob: float  # sum of token log-probabilities, EOS included


def length_penalty(length: int, alpha: float) -> float:
    """GNMT (Wu et al. 2016): ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def max_lengths(src_len: Tensor, a: float, b: int) -> Tensor:
    """Per-sentence output cap (tokens, EOS included), from source lengths that include EOS."""
    return torch.clamp((a * (src_len - 1).float() + b).floor().long(), min=1)


def _log_probs(logits: Tensor, step: int, min_len: int, forced_end: Tensor) -> Tensor:
    """log_softmax over the vocabulary with EOS blocked before min_len and forced where
    `forced_end` (rows at their length cap)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if step < min_len:
        logp[:, EOS_ID] = -math.inf
    if forced_end.any():
        eos = logp[:, EOS_ID].clone()
        logp[forced_end] = -math.inf
        logp[forced_end, EOS_ID] = torch.where(torch.isinf(eos[forced_end]), 0.0, eos[forced_end])
    return logp


TOPK_GROUP = 16  # columns per group in topk_rows


def topk_rows(x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Values and indices of the k largest entries of each row of x (rows x V), for rows much
    wider than k; the same values as x.topk(k, dim=1) (ties may pick other indices), about
    10x faster on CPU. Columns fall into n = V // g groups {j, j + n, j + 2n, ...} (the last
    V % g columns are groups of one); a row's k largest entries lie in its k groups of largest
    maximum (an entry outside them has k group maxima above it), so one elementwise max over g
    strided slices, a top-k over the n group maxima and one over the k * g members remain."""
    rows, v = x.shape
    g, n = TOPK_GROUP, v // TOPK_GROUP
    if k == 1:  # max() is fast on its own
        top, idx = x.max(dim=1, keepdim=True)
        return top, idx
    if n < 4 * k:
        return x.topk(min(k, v), dim=1)
    group_max = x[:, :n * g].view(rows, g, n).amax(dim=1)  # rows x n
    tail = v - n * g
    if tail:
        group_max = torch.cat([group_max, x[:, n * g:]], dim=1)
    groups = group_max.topk(k, dim=1).indices  # rows x k
    members = groups.unsqueeze(2) + n * torch.arange(g, device=x.device)  # rows x k x g
    if tail:  # a tail column is its group's only member: the other slots repeat it, masked
        single = (groups >= n).unsqueeze(2)
        members = torch.where(single, (groups + (g - 1) * n).unsqueeze(2), members)
    members = members.view(rows, k * g)
    values = x.gather(1, members)
    if tail:
        values.masked_fill_((single & (torch.arange(g, device=x.device) > 0)).view(rows, k * g), -math.inf)
    top, j = values.topk(k, dim=1)
    return top, members.gather(1, j)


def _row_candidates(logits: Tensor, step: int, min_len: int, forced_end: Tensor, m: int):
    """The m best tokens of each row and their log-probabilities, as _log_probs would rank them
    (EOS blocked before min_len, forced at the cap), without writing a rows x V log-softmax:
    the best m of a sentence's k x V continuations are among its rows' best m each, so beam
    search takes the top m per row, then the top m of those k x m (two small top-k's instead of
    one over k x V); log-softmax is a shift per row, so it is applied to the m values only.
    Consumes `logits` (rows x V, overwritten in place: a fresh buffer of that size per step
    costs more than the arithmetic)."""
    logits = logits.float()
    eos = logits[:, EOS_ID].clone()
    if step < min_len:
        logits[:, EOS_ID] = -math.inf
    top, tok = topk_rows(logits, min(m, logits.shape[1]))
    # log-sum-exp over the original row (EOS included, as log_softmax normalises), in place
    mx = torch.maximum(logits.amax(dim=1), eos)
    total = logits.sub_(mx[:, None]).exp_().sum(dim=1)
    if step < min_len:
        total += torch.exp(eos - mx)
    lse = total.log_().add_(mx)
    logp = top - lse[:, None]
    if forced_end.any():  # only EOS, with its log-probability (0 where it was blocked)
        eos_logp = torch.where(torch.isinf(eos[forced_end]), 0.0, eos[forced_end] - lse[forced_end])
        logp[forced_end] = -math.inf
        logp[forced_end, 0] = eos_logp if step >= min_len else 0.0
        tok[forced_end, 0] = EOS_ID
    return logp, tok


@torch.no_grad()
def greedy_search(model: Decodable, src: Tensor, src_len: Tensor, max_len_a: float = 1.5, max_len_b: int = 10,
                  min_len: int = 0) -> List[List[Hypothesis]]:
    return sample_search(model, src, src_len, max_len_a, max_len_b, min_len, greedy=True)


@torch.no_grad()
def sample_search(model: Decodable, src: Tensor, src_len: Tensor, max_len_a: float = 1.5, max_len_b: int = 10,
                  min_len: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  num_samples: int = 1, seed: Optional[int] = None, greedy: bool = False) -> List[List[Hypothesis]]:
    """Ancestral sampling (temperature, top-k, top-p), or argmax when greedy. num_samples
    independent samples per sentence, ranked by log-probability."""
    batch = src.shape[0]
    generator = None
    if not greedy and seed is not None:
        generator = torch.Generator(device=src.device).manual_seed(seed)
    enc = model.encode(src, src_len)
    rows = torch.arange(batch, device=src.device).repeat_interleave(num_samples)  # row -> sentence
    if num_samples > 1:
        enc = model.reorder_encoder(enc, rows)
    state = model.init_state(enc)
    limit = max_lengths(src_len, max_len_a, max_len_b).to(src.device)[rows]
    tokens = torch.full((rows.numel(),), BOS_ID, dtype=torch.long, device=src.device)
    logprob = torch.zeros(rows.numel(), device=src.device)
    alive = torch.arange(rows.numel(), device=src.device)  # original row of each live row
    outputs: List[List[int]] = [[] for _ in range(rows.numel())]
    results: List[Optional[Hypothesis]] = [None] * rows.numel()
    step = 0
    while alive.numel():
        logits, state, _ = model.step(tokens, state, enc)
        if greedy:  # the best token and its log-probability, without a rows x V log-softmax
            best_logp, best = _row_candidates(logits, step, min_len, limit[alive] <= step + 1, 1)
            tokens, token_logp = best[:, 0], best_logp[:, 0]
        else:
            logp = _log_probs(logits, step, min_len, limit[alive] <= step + 1)
            tokens = torch.multinomial(_filtered_probs(logp, temperature, top_k, top_p), 1,
                                       generator=generator).squeeze(1)
            token_logp = logp.gather(1, tokens[:, None]).squeeze(1)
        logprob[alive] += token_logp
        finished = tokens == EOS_ID
        for row, tok, done in zip(alive.tolist(), tokens.tolist(), finished.tolist()):
            if done:
                results[row] = Hypothesis(outputs[row], 0.0, 0.0)
            else:
                outputs[row].append(tok)
        step += 1
        if finished.any():  # finished rows leave the batch
            keep = (~finished).nonzero().squeeze(1)
            alive, tokens = alive[keep], tokens[keep]
            state, enc = model.reorder_state(state, keep), model.reorder_encoder(enc, keep)
    hyps: List[List[Hypothesis]] = [[] for _ in range(batch)]
    for row, hyp in enumerate(results):
        assert hyp is not None
        hyp.logprob = hyp.score = float(logprob[row])
        hyps[row // num_samples].append(hyp)
    for h in hyps:
        h.sort(key=lambda x: -x.score)
    return hyps


def _filtered_probs(logp: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    logits = logp / max(temperature, 1e-6)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, -math.inf))
    return logits.softmax(dim=-1)


@torch.no_grad()
def beam_search(model: Decodable, src: Tensor, src_len: Tensor, beam_size: int = 5, alpha: float = 0.6,
                max_len_a: float = 1.5, max_len_b: int = 10, n_best: int = 1,
                min_len: int = 0) -> List[List[Hypothesis]]:
    """Beam search with the GNMT length penalty. A sentence stops when `beam_size` hypotheses
    have ended (fairseq's criterion) and then leaves the batch."""
    batch, k, device = src.shape[0], beam_size, src.device
    enc = model.encode(src, src_len)
    enc = model.reorder_encoder(enc, torch.arange(batch, device=device).repeat_interleave(k))
    state = model.init_state(enc)
    limit = max_lengths(src_len, max_len_a, max_len_b).to(device)
    sent = torch.arange(batch, device=device)  # live sentence -> input index
    tokens = torch.full((batch * k,), BOS_ID, dtype=torch.long, device=device)
    # only the first beam of each sentence is live at step 0 (the others would duplicate it)
    scores = torch.full((batch, k), -math.inf, device=device)
    scores[:, 0] = 0.0
    history = torch.empty((batch * k, 0), dtype=torch.long, device=device)  # tokens so far
    finished: List[List[Hypothesis]] = [[] for _ in range(batch)]
    step = 0
    while sent.numel():
        n = sent.numel()
        logits, state, _ = model.step(tokens, state, enc)
        forced = (limit[sent] <= step + 1).repeat_interleave(k)
        row_logp, row_tok = _row_candidates(logits, step, min_len, forced, 2 * k)  # (n*k) x 2k
        m = row_logp.shape[1]  # 2k, or the vocabulary if smaller
        cand = (scores.view(-1, 1) + row_logp).view(n, k * m)
        top_scores, top_idx = cand.topk(2 * k, dim=1)  # 2k: at least k do not end here
        top_beam, top_tok = top_idx // m, row_tok.view(n, k * m).gather(1, top_idx)
        ends = (top_tok == EOS_ID) & (torch.arange(2 * k, device=device) < k) & ~torch.isinf(top_scores)
        done = limit[sent] <= step + 1  # at the length cap every beam is made to end
        if ends.any():
            lp = length_penalty(step + 1, alpha)
            live = sent.tolist()
            for i, j in ends.nonzero().tolist():
                s = live[i]
                if len(finished[s]) < k:
                    row = i * k + int(top_beam[i, j])
                    logprob = float(top_scores[i, j])
                    finished[s].append(Hypothesis(history[row].tolist(), logprob / lp, logprob))
            done |= torch.tensor([len(finished[s]) >= k for s in live], device=device)
        # the k best continuations that do not end
        rank = torch.arange(2 * k, device=device).expand(n, 2 * k)
        order = torch.where(top_tok == EOS_ID, rank + 2 * k, rank).argsort(dim=1)[:, :k]
        scores = top_scores.gather(1, order)
        beams = top_beam.gather(1, order)
        tokens = top_tok.gather(1, order).view(-1)
        parent = (torch.arange(n, device=device)[:, None] * k + beams)  # n x k rows of this step
        step += 1
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            sent, scores, tokens = sent[keep], scores[keep], tokens.view(n, k)[keep].view(-1)
            parent = parent[keep]
            enc = model.reorder_encoder(enc, (keep[:, None] * k + torch.arange(k, device=device)).view(-1))
        index = parent.view(-1)
        history = torch.cat([history.index_select(0, index), tokens[:, None]], dim=1)
        state = model.reorder_state(state, index)
    out = []
    for hyps in finished:
        hyps.sort(key=lambda h: -h.score)
        out.append(hyps[:n_best])
    return out
