import torch
from pathlib import Path
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(2)
run = Path("/work/main/runs/.bench/multi30k_ende_8000")
import argparse
from mt.bench import _model
from mt.translate import Translator
from mt.data import load_split
args = argparse.Namespace(model="bench_lstm")
cfg, tok, model = _model(args, run)
d = cfg.decode
d.method, d.beam_size, d.batch_size, d.alpha = "beam", 5, 64, 1.0
d.max_len_a, d.max_len_b = 0.0, 20
d.int8, d.bf16, d.shortlist = True, False, 1000
t = Translator(model, tok, d, torch.device("cpu")); t.run_dir = run; t.min_len = 20; t.apply_speed_options()
src = list(load_split(run / "data", "test")["src"][:500])
t.translate_batch(src[:64])
import time
ts=[]
for _ in range(3):
    t0=time.perf_counter(); t.translate_batch(src); ts.append(time.perf_counter()-t0)
print("SENTS_PER_S", 500/sorted(ts)[1])
