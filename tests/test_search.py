"""Search: scripted probabilities with answers known in advance, beam 1 == greedy, batching."""
import math

import pytest
import torch

from mt.config import ModelConfig, structured
from mt.decoding import DecodingModel
from mt.model import build_model
from mt.search import beam_search, greedy_search, length_penalty, sample_search
from mt.tokenizer import EOS_ID

A, B, C = 4, 5, 6  # ordinary tokens of the scripted model
V = 7


class ScriptedModel:
    """A model whose next-token distribution depends only on the prefix so far (a dict lookup),
    behind the narrow interface mt.search.Decodable. The state is the prefix."""

    def __init__(self, table, default=None):
        self.table, self.default = table, default or {EOS_ID: 1.0}
        self.encode_calls = 0

    def encode(self, src, src_len):
        self.encode_calls += 1
        return {"rows": torch.arange(src.shape[0])}

    def init_state(self, enc):
        return [()] * enc["rows"].numel()

    def step(self, tokens, state, enc):
        new_state = [prefix + (int(t),) for prefix, t in zip(state, tokens)]
        logits = torch.full((len(state), V), -1e9)
        for row, prefix in enumerate(new_state):
            probs = self.table.get(prefix[1:], self.default)  # prefix[0] is BOS
            for tok, p in probs.items():
                logits[row, tok] = math.log(p)
        return logits, new_state, None

    def reorder_state(self, state, index):
        return [state[i] for i in index.tolist()]

    def reorder_encoder(self, enc, index):
        return {"rows": enc["rows"][index]}


# After (): A .5, B .4, EOS .1; after (A,): EOS .6, C .4; after (B,): EOS .9, C .1;
# after (A, C): EOS 1; after (B, C): EOS 1.
TABLE = {(): {A: 0.5, B: 0.4, EOS_ID: 0.1}, (A,): {EOS_ID: 0.6, C: 0.4}, (B,): {EOS_ID: 0.9, C: 0.1},
         (A, C): {EOS_ID: 1.0}, (B, C): {EOS_ID: 1.0}}
SRC, SRC_LEN = torch.full((1, 4), 9), torch.tensor([4])


def test_beam_search_against_scripted_probabilities():
    hyps = beam_search(ScriptedModel(TABLE), SRC, SRC_LEN, beam_size=2, alpha=0.0, n_best=2)[0]
    # complete hypotheses and their probabilities: A EOS .30, B EOS .36, EOS .10, A C EOS .20, B C EOS .04
    # beam 2 keeps A, B at step 1 (EOS .1 ends only among the top 2k with rank < k: it is third)
    assert [h.tokens for h in hyps] == [[B], [A]]
    assert hyps[0].logprob == pytest.approx(math.log(0.36)) and hyps[1].logprob == pytest.approx(math.log(0.30))
    assert hyps[0].score == pytest.approx(math.log(0.36))


def test_length_penalty_reranks_finished_hypotheses():
    table = {(): {A: 0.6, EOS_ID: 0.4}, (A,): {B: 0.6, EOS_ID: 0.4}, (A, B): {EOS_ID: 1.0}}
    short = beam_search(ScriptedModel(table), SRC, SRC_LEN, beam_size=2, alpha=0.0)[0][0]
    assert short.tokens == []  # EOS at once: p=.4 beats A EOS .24 and A B EOS .36
    long = beam_search(ScriptedModel(table), SRC, SRC_LEN, beam_size=2, alpha=4.0, n_best=2)[0]
    scores = {tuple(h.tokens): h.score for h in long}
    assert scores[()] == pytest.approx(math.log(0.4) / length_penalty(1, 4.0))
    assert long[0].tokens == [A] and long[0].score == pytest.approx(math.log(0.24) / length_penalty(2, 4.0))


def test_greedy_and_length_limits():
    model = ScriptedModel(TABLE)
    assert greedy_search(model, SRC, SRC_LEN)[0][0].tokens == [A]
    loop = ScriptedModel({}, default={A: 0.9, EOS_ID: 0.1})
    out = greedy_search(loop, SRC, SRC_LEN, max_len_a=1.0, max_len_b=2)[0][0]
    assert out.tokens == [A] * 4  # a * (src_len - 1) + b = 5 tokens including the forced EOS
    fixed = beam_search(ScriptedModel(TABLE), SRC, SRC_LEN, beam_size=2, max_len_a=0, max_len_b=6, min_len=6)[0][0]
    assert len(fixed.tokens) == 5  # EOS blocked before step 6, forced at 6


def test_finished_sentences_leave_the_batch_and_encoder_runs_once():
    table = {(): {A: 1.0}, (A,): {EOS_ID: 1.0}}
    model = ScriptedModel(table, default={A: 0.6, EOS_ID: 0.4})
    src, src_len = torch.full((3, 30), 9), torch.tensor([30, 30, 30])
    out = beam_search(model, src, src_len, beam_size=3, max_len_a=1, max_len_b=0)
    assert model.encode_calls == 1 and [h[0].tokens for h in out] == [[A]] * 3


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(emb_size=16, enc_hidden=12, dec_hidden=20, attn_size=10, dropout=0.0, emb_dropout=0.0)
    base.update(kw)
    model = build_model(structured(ModelConfig(**base)), 40, 40).eval()
    with torch.no_grad():  # a peaked output distribution, so the search has something to find
        model.decoder.output_layer.weight.mul_(8)
    return DecodingModel(model)


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 9, (n,), generator=g)
    src = torch.zeros(n, int(lens.max()), dtype=torch.long)
    for i, n_i in enumerate(lens.tolist()):
        src[i, :n_i - 1] = torch.randint(4, 40, (n_i - 1,), generator=g)
        src[i, n_i - 1] = EOS_ID
    return src, lens


@pytest.mark.parametrize("arch", [dict(), dict(cell="lstm", decoder="luong", attention="general")])
def test_beam_one_equals_greedy(arch):
    model = tiny_model(**arch)
    src, lens = batch()
    greedy = greedy_search(model, src, lens)
    beam = beam_search(model, src, lens, beam_size=1)
    assert [h[0].tokens for h in greedy] == [h[0].tokens for h in beam]
    for g, b in zip(greedy, beam):
        assert g[0].logprob == pytest.approx(b[0].logprob, abs=1e-4)


@pytest.mark.parametrize("search", ["greedy", "beam", "sample"])
def test_batched_equals_one_by_one(search):
    model = tiny_model(cell="lstm")
    src, lens = batch(n=7)

    def go(s, l):
        if search == "greedy":
            return greedy_search(model, s, l)
        if search == "beam":
            return beam_search(model, s, l, beam_size=4, alpha=0.6, n_best=3)
        return sample_search(model, s, l, top_p=0.95, temperature=0.7, seed=5)

    batched = go(src, lens)
    for i in range(len(lens)):
        alone = go(src[i:i + 1, :lens[i]], lens[i:i + 1])[0]
        if search == "sample":  # one seed per batch: check validity, not equality
            assert len(alone) == 1 and EOS_ID not in alone[0].tokens
            continue
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        for a, b in zip(alone, batched[i]):
            assert a.score == pytest.approx(b.score, abs=1e-4)


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model()
    src, lens = batch(n=4)
    a = sample_search(model, src, lens, seed=11, num_samples=3)
    b = sample_search(model, src, lens, seed=11, num_samples=3)
    assert [[h.tokens for h in x] for x in a] == [[h.tokens for h in x] for x in b]
    assert all(len(x) == 3 for x in a)
    top1 = sample_search(model, src, lens, seed=3, top_k=1)
    assert [h[0].tokens for h in top1] == [h[0].tokens for h in greedy_search(model, src, lens)]


@pytest.mark.parametrize("step,min_len", [(0, 0), (0, 3), (5, 3)])
def test_row_candidates_equal_the_top_of_the_log_softmax(step, min_len):
    """Beam search's shortcut (top m of the raw logits, then the log-sum-exp shift) ranks and
    scores exactly as a full log-softmax with EOS blocked / forced would."""
    from mt.search import _log_probs, _row_candidates

    torch.manual_seed(step + min_len)
    logits = torch.randn(6, 50) * 3
    logits[1, EOS_ID] = 10.0  # EOS is the best token of row 1
    forced = torch.tensor([False, True, False, False, True, False])
    ref = _log_probs(logits.clone(), step, min_len, forced)
    logp, tok = _row_candidates(logits.clone(), step, min_len, forced, 4)
    free = ~forced
    assert torch.allclose(logp[free], ref[free].gather(1, tok[free]), atol=1e-5)  # the tokens' scores
    assert torch.allclose(logp[free], ref[free].topk(4, dim=1).values, atol=1e-5)  # ... the best ones
    assert (tok[forced, 0] == EOS_ID).all() and torch.isinf(logp[forced, 1:]).all()
    assert torch.allclose(logp[forced, 0], ref[forced, EOS_ID])


@pytest.mark.parametrize("width", [7, 50, 160, 163, 1000, 3517])
@pytest.mark.parametrize("k", [1, 2, 10])
def test_topk_rows_has_the_values_of_topk(width, k):
    from mt.search import topk_rows

    g = torch.Generator().manual_seed(width * 31 + k)
    x = torch.randn(37, width, generator=g)
    x[:, 3 % width] = -math.inf  # a blocked column (EOS) stays out of the top
    x[5] = x[5].round()  # many ties in one row
    top, idx = topk_rows(x, min(k, width))
    ref = x.topk(min(k, width), dim=1).values
    assert torch.equal(top, ref)
    assert torch.equal(x.gather(1, idx), top)  # the indices point at those values ...
    assert all(len(set(row)) == len(row) for row in idx.tolist())  # ... each column at most once
