"""Ensembles (mt/ensemble.py) and checkpoint averaging (mt-average): an ensemble of one model,
or of copies of one model, searches exactly as that model; its step is the mean of the members'
log-probabilities; members with another tokenizer or (for averaging) another architecture are
refused in one line; an average is the mean of the weights, written atomically."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mt import checkpoint as ckpt_io
from mt.config import DecodeConfig, structured
from mt.decoding import DecodingModel
from mt.ensemble import Ensemble

from test_decoding import FixedShortlist, write_tiny_checkpoint
from test_search import batch, tiny_model

SEARCHES = [dict(method="greedy"), dict(method="beam", beam_size=4, n_best=3, alpha=0.6),
            dict(method="beam", beam_size=1), dict(method="sample", n_best=2, seed=7)]


def with_decode(decoding, **kw):
    """The same model behind a DecodingModel with these decode settings."""
    return DecodingModel(decoding.model, structured(DecodeConfig(**kw)))


def results(decoder, src, lens):
    return [[(h.tokens, h.score) for h in sent] for sent in decoder.search(src, lens)]


def assert_same(a, b, tol=1e-4):
    for sent_a, sent_b in zip(a, b, strict=True):
        assert [t for t, _ in sent_a] == [t for t, _ in sent_b]
        assert [s for _, s in sent_a] == pytest.approx([s for _, s in sent_b], abs=tol)


@pytest.mark.parametrize("search", SEARCHES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
@pytest.mark.parametrize("copies", [1, 2, 3])
def test_an_ensemble_of_copies_of_one_model_searches_as_that_model(search, copies):
    single = with_decode(tiny_model(), **search)
    src, lens = batch(n=7)
    ensemble = Ensemble([with_decode(single, **search) for _ in range(copies)])
    assert_same(results(ensemble, src, lens), results(single, src, lens))


def test_the_ensemble_step_is_the_mean_of_the_members_log_probabilities():
    members = [tiny_model(seed=0), tiny_model(seed=1, cell="lstm", decoder="luong", attention="general"),
               tiny_model(seed=2, dec_layers=2)]
    ensemble = Ensemble(members)
    src, lens = batch(n=5)
    with torch.no_grad():
        encs = ensemble.encode(src, lens)
        states = ensemble.init_state(encs)
        tokens = torch.full((5,), 2, dtype=torch.long)
        for t in range(3):
            logp, new_states, attn = ensemble.step(tokens, states, encs)
            outs = [m.step(tokens, s, e) for m, s, e in zip(members, states, encs)]
            expected = torch.stack([F.log_softmax(o[0].float(), -1) for o in outs]).mean(0)
            torch.testing.assert_close(logp, expected)
            assert torch.allclose(attn.sum(-1), torch.ones(5), atol=1e-5)  # still a distribution
            states, tokens = new_states, torch.full_like(tokens, 5 + t)


def test_an_ensemble_of_different_models_decodes_and_its_beam_one_equals_greedy():
    members = [tiny_model(seed=0), tiny_model(seed=1, cell="lstm", decoder="luong", attention="general")]
    src, lens = batch(n=6)
    greedy = Ensemble([with_decode(m, method="greedy") for m in members])
    beam1 = Ensemble([with_decode(m, method="beam", beam_size=1, alpha=0.0) for m in members])
    assert [[h.tokens for h in s] for s in greedy.search(src, lens)] == \
           [[h.tokens for h in s] for s in beam1.search(src, lens)]


def test_a_shared_shortlist_holding_the_whole_vocabulary_changes_nothing():
    members = [with_decode(tiny_model(seed=s), method="beam", beam_size=3) for s in (0, 1)]
    src, lens = batch(n=6)
    full = results(Ensemble(members), src, lens)
    listed = Ensemble([with_decode(m, method="beam", beam_size=3) for m in members],
                      shortlist=FixedShortlist(torch.arange(40)))
    assert_same(results(listed, src, lens), full)
    with pytest.raises(ValueError, match="give the shortlist to the Ensemble"):
        Ensemble([DecodingModel(members[0].model, members[0].decode, FixedShortlist(torch.arange(40)))])


# --- through checkpoints: Translator.from_path, mt-translate, mt-evaluate, mt-average -----------

@pytest.fixture(scope="module")
def ckpts(small_corpus, tmp_path_factory):
    """Two tiny checkpoints of one tokenizer (different weights), one of another tokenizer, one of
    another architecture."""
    d = tmp_path_factory.mktemp("ensemble")
    return {"a": write_tiny_checkpoint(small_corpus, d / "a.pt", seed=0),
            "b": write_tiny_checkpoint(small_corpus, d / "b.pt", seed=1),
            "vocab": write_tiny_checkpoint(small_corpus, d / "vocab.pt", vocab_size=100),
            "arch": write_tiny_checkpoint(small_corpus, d / "arch.pt", lambda c: _wider(c, small_corpus))}


def _wider(ckpt, corpus):
    """Another architecture, same tokenizer: the decoder 8 wider, weights built for it."""
    from mt.config import ModelConfig
    from mt.model import build_model

    ckpt["model_config"]["dec_hidden"] += 8
    v = ckpt["tokenizer"]["tgt_vocab"]
    ckpt["model"] = build_model(structured(ModelConfig(**ckpt["model_config"])), v, v, seed=3).state_dict()


LINES = ["A dog runs.", "", "Two men are playing football in a park."]


def test_translator_ensembles_copies_as_one_and_refuses_another_vocabulary(ckpts):
    from mt.translate import Translator

    kw = dict(device="cpu", method="beam", beam_size=3, max_len_b=4)
    one = Translator.from_path(ckpts["a"], **kw).translate(LINES)
    assert Translator.from_path([ckpts["a"], ckpts["a"]], **kw).translate(LINES) == one
    assert len(Translator.from_path([ckpts["a"], ckpts["b"], ckpts["arch"]], **kw).translate(LINES)) == 3
    with pytest.raises(ckpt_io.CheckpointError, match=r"vocab\.pt: its target vocabulary differs from .*a\.pt's"):
        Translator.from_path([ckpts["a"], ckpts["vocab"]], **kw)


def run_cli(module, *args, stdin=""):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], input=stdin.encode(), capture_output=True)


def test_mt_translate_takes_several_models_and_refuses_a_mismatch_in_one_line(ckpts):
    text = "\n".join(LINES) + "\n"
    one = run_cli("mt.translate", "-m", ckpts["a"], "--beam", "2", "--max-len-b", "4", "--device", "cpu", stdin=text)
    two = run_cli("mt.translate", "-m", ckpts["a"], "-m", ckpts["a"], "--beam", "2", "--max-len-b", "4",
                  "--n-best", "2", "--format", "tsv", "--device", "cpu", stdin=text)
    assert one.returncode == 0 and two.returncode == 0, two.stderr.decode()
    assert "an ensemble of 2 models" in two.stderr.decode()
    best = [line.split("\t")[3] for line in two.stdout.decode().splitlines() if line.split("\t")[1] == "1"]
    assert best == one.stdout.decode().splitlines()
    bad = run_cli("mt.translate", "-m", ckpts["a"], "-m", ckpts["vocab"], "-q", "--device", "cpu", stdin=text)
    err = bad.stderr.decode().strip().splitlines()
    assert bad.returncode == 1 and bad.stdout == b"" and len(err) == 1, err
    assert err[0].startswith("mt-translate: error: ") and "target vocabulary differs" in err[0]


def test_average_is_the_mean_of_the_weights_and_of_copies_the_same(ckpts, tmp_path):
    out = tmp_path / "avg.pt"
    r = run_cli("mt.average", ckpts["a"], ckpts["b"], "-o", out)
    assert r.returncode == 0, r.stderr.decode()
    avg, a, b = (ckpt_io.load(p) for p in (out, ckpts["a"], ckpts["b"]))
    for k, w in avg["model"].items():
        torch.testing.assert_close(w, (a["model"][k].double() + b["model"][k].double()).div(2).to(w.dtype))
    assert avg["averaged_from"] == [str(ckpts["a"]), str(ckpts["b"])] and "optimizer" not in avg
    run_cli("mt.average", ckpts["a"], ckpts["a"], ckpts["a"], "-o", out)
    same = ckpt_io.load(out)
    assert all(torch.equal(same["model"][k], a["model"][k]) for k in a["model"])
    ckpt_io.load_model(out)  # loads with every check a translator applies


@pytest.mark.parametrize("other, message", [("vocab", "its target vocabulary differs"),
                                            ("arch", r"has another architecture: model\.dec_hidden=40")])
def test_average_refuses_a_mismatch_in_one_line_and_writes_nothing(ckpts, tmp_path, other, message):
    out = tmp_path / "avg.pt"
    r = run_cli("mt.average", ckpts["a"], ckpts[other], "-o", out)
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and err[0].startswith("mt-average: error: "), err
    assert str(ckpts[other]) in err[0] and pytest.importorskip("re").search(message, err[0]), err[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_average_refuses_unreadable_input_and_bad_arguments(ckpts, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpts["a"].read_bytes()[:1000])
    r = run_cli("mt.average", ckpts["a"], broken, "-o", tmp_path / "avg.pt")
    assert r.returncode == 1 and "broken.pt: cannot be loaded safely" in r.stderr.decode()
    assert run_cli("mt.average", "-o", tmp_path / "x.pt").returncode == 2  # argparse: nothing to average
    r = run_cli("mt.average", "--run", tmp_path, "--last", "2", "-o", tmp_path / "x.pt")
    assert r.returncode == 1 and "no such folder" in r.stderr.decode()
