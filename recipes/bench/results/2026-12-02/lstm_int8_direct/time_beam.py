# cd <a checkout> && PYTHONPATH=$PWD /work/main/.venv/bin/python time_beam.py
"""bench_lstm, --int8 --shortlist 1000, beam 5, batch 64, 500 test sentences forced to 20 tokens,
seed-1 weights: sentences/s, the median of 3 runs after a warm-up. The translator is built the
way the checked-out code's mt-bench builds it: at c0d78fb by hand (Translator(),
apply_speed_options), after issue 13 through Translator.from_path on the bench run's untrained checkpoint."""
import time
from pathlib import Path

import torch

import mt.translate
from mt.data import load_split

torch.set_num_threads(2)
run = Path("/work/main/runs/.bench/multi30k_ende_8000")
if hasattr(mt.translate, "DecodingModel"):  # the code of issue 13
    t = mt.translate.Translator.from_path(
        run / "checkpoints/untrained_bench_lstm.pt", device="cpu", method="beam", beam_size=5, batch_size=64,
        alpha=1.0, int8=True, shortlist=1000, max_len_a=0.0, max_len_b=20, min_len=20)
else:  # c0d78fb
    import argparse

    from mt.bench import _model

    cfg, tok, model = _model(argparse.Namespace(model="bench_lstm"), run)
    d = cfg.decode
    d.method, d.beam_size, d.batch_size, d.alpha = "beam", 5, 64, 1.0
    d.max_len_a, d.max_len_b = 0.0, 20
    d.int8, d.bf16, d.shortlist = True, False, 1000
    t = mt.translate.Translator(model, tok, d, torch.device("cpu"))
    t.run_dir, t.min_len = run, 20
    t.apply_speed_options()
src = list(load_split(run / "data", "test")["src"][:500])
t.translate_batch(src[:64])
times = []
for _ in range(3):
    t0 = time.perf_counter()
    t.translate_batch(src)
    times.append(time.perf_counter() - t0)
print("SENTS_PER_S", 500 / sorted(times)[1])
