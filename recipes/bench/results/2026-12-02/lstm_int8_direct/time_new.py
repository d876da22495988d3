import torch, time, sys
from pathlib import Path
from torch.profiler import profile, ProfilerActivity
torch.set_num_threads(2)
run = Path("/work/main/runs/.bench/multi30k_ende_8000")
from mt.translate import Translator
from mt.data import load_split
t = Translator.from_path(run / "checkpoints/untrained_bench_lstm.pt", device="cpu", method="beam", beam_size=5, batch_size=64,
    alpha=1.0, int8=True, shortlist=1000, max_len_a=0.0, max_len_b=20, min_len=20)
src = list(load_split(run / "data", "test")["src"][:500])
t.translate_batch(src[:64])
import time
ts=[]
for _ in range(3):
    t0=time.perf_counter(); t.translate_batch(src); ts.append(time.perf_counter()-t0)
print("SENTS_PER_S", 500/sorted(ts)[1])
