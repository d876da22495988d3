"""On CUDA (skipped without a GPU): training uses cuDNN's RNN kernels where the architecture
allows, the hand-written decoder loop equals autograd there too, decoding on the GPU gives what
it gives on the CPU, and a tiny run trains end to end."""
import pytest
import torch

from mt.config import ModelConfig, structured
from mt.decoding import DecodingModel
from mt.model import build_model
from mt.search import greedy_search
from mt.tokenizer import BOS_ID, PAD_ID

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
V = 31


def setup(dtype=torch.float32, **arch):
    torch.manual_seed(0)
    cfg = dict(emb_size=16, enc_hidden=12, dec_hidden=20, attn_size=10, dropout=0.0, emb_dropout=0.0)
    cfg.update(arch)
    model = build_model(structured(ModelConfig(**cfg)), V, V).to(dtype)
    g = torch.Generator().manual_seed(1)
    src_len = torch.tensor([7, 3, 5, 6])
    src = torch.randint(4, V, (4, 7), generator=g)
    src[torch.arange(7)[None] >= src_len[:, None]] = PAD_ID
    tgt_in = torch.randint(4, V, (4, 6), generator=g)
    tgt_in[:, 0] = BOS_ID
    return model, src, src_len, tgt_in


def kernels(fn) -> str:
    """The names of the CUDA kernels and ops `fn` ran, one string."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.key for e in prof.key_averages())


@pytest.mark.parametrize("arch", [dict(), dict(decoder="luong", attention="general", input_feeding=False)],
                         ids=["bahdanau", "luong-no-feeding"])
def test_training_runs_cudnn_rnns_where_the_architecture_allows(arch):
    model, src, src_len, tgt_in = setup(**arch)
    model = model.cuda().train()
    names = kernels(lambda: model(src.cuda(), src_len, tgt_in.cuda())[0].sum().backward())
    assert "cudnn_rnn" in names, names  # the encoder always; the Luong decoder without feeding too
    if arch:  # no per-step attention feedback: the decoder is one cuDNN call, no per-step cells
        assert "gru_cell" not in names and "addcmul" not in names


@pytest.mark.parametrize("arch", [dict(), dict(cell="lstm", decoder="luong", attention="bahdanau")],
                         ids=["gru-bahdanau", "lstm-luong"])
def test_handwritten_decoder_loop_equals_autograd_on_cuda(arch):
    model, src, src_len, tgt_in = setup(torch.float64, **arch)
    model, src, tgt_in = model.cuda(), src.cuda(), tgt_in.cuda()
    grads = []
    for backward in ("autograd", "handwritten"):
        model.zero_grad()
        att, _ = model(src, src_len, tgt_in, decoder_backward=backward)
        (att * torch.linspace(-1, 1, att.numel(), device="cuda", dtype=att.dtype).view_as(att)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_decoding_on_cuda_equals_the_cpu():
    model, src, src_len, _ = setup(decoder="luong", attention="general", input_feeding=True)
    with torch.no_grad():
        cpu = greedy_search(DecodingModel(model), src, src_len)
        gpu = greedy_search(DecodingModel(model.cuda()), src.cuda(), src_len.cuda())
    assert [h[0].tokens for h in cpu] == [h[0].tokens for h in gpu]


def test_a_tiny_run_trains_on_cuda(small_corpus, tmp_path):
    from conftest import tiny_overrides
    from mt.config import compose_config
    from mt.pipeline import run

    cfg = compose_config(tiny_overrides(small_corpus, device="cuda", stages="[prepare,tokenizer,train]",
                                        **{"train.max_steps": 4, "train.valid_every": 2}))
    run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()
