"""mt-bench's fraction of the matmul peak: the highest of the samples, never above 1, and a
tiny real run that takes the samples."""
import json
import time

import pytest
import torch

from mt import bench
from mt.precision import _fitting_n, matmul_peak


def test_fraction_is_of_the_highest_sample():
    assert bench.fraction_of_peak(50.0, [141.0, 200.0, 189.0]) == pytest.approx(0.25)
    assert bench.faster_than_peak(50.0, [141.0, 200.0, 189.0]) is None


def test_a_training_rate_above_every_sample_is_a_lower_bound_on_the_peak():
    # the sitting that printed 1.34: training 189 GFLOP/s against a single 141 GFLOP/s sample
    assert bench.fraction_of_peak(189.0, [141.0]) == 1.0
    assert bench.fraction_of_peak(189.0, [141.0, 120.0]) <= 1.0
    assert bench.faster_than_peak(189.0, [141.0]) == (
        "training ran faster than every peak sample: the peak is at least 189 GFLOP/s")


def test_peak_summary_names_count_dtype_and_range():
    assert bench.peak_summary([141.2, 189.4, 150.0], "float32") == (
        "the highest of 3 float32 peak samples, 141-189 GFLOP/s")


def test_report_peaks_counts_a_faster_training_rate_as_a_sample(capsys):
    figures = {"train.precision": "fp32", "train.gflops": 189.0,
               "machine.fp32_matmul_gflops.samples": [141.0, 120.0],
               "machine.fp32_matmul_gflops.sampled_at": ["before the first phase", "after train"],
               "machine.bf16_matmul_gflops.samples": [900.0], "machine.bf16_matmul_gflops.sampled_at": ["x"]}
    bench.report_peaks(figures)
    out, err = capsys.readouterr()
    assert figures["train.fraction_of_peak"] == 1.0 and figures["train.fraction_of_peak.dtype"] == "float32"
    assert figures["machine.fp32_matmul_gflops"] == 189.0 and figures["machine.bf16_matmul_gflops"] == 900.0
    assert figures["machine.fp32_matmul_gflops.sampled_at"][-1] == "train.gflops"
    assert "the peak is at least 189 GFLOP/s" in err
    assert "train.fraction_of_peak 1.000 (of the highest of 3 float32 peak samples, 120-189 GFLOP/s)" in out


def test_bf16_training_is_compared_with_the_bf16_peak():
    figures = {"train.precision": "bf16", "train.gflops": 100.0,
               "machine.fp32_matmul_gflops.samples": [50.0], "machine.bf16_matmul_gflops.samples": [400.0]}
    bench.report_peaks(figures)
    assert figures["train.fraction_of_peak"] == 0.25 and figures["train.fraction_of_peak.dtype"] == "bfloat16"


def test_a_slow_product_makes_the_sample_smaller_not_longer():
    # bf16 without AMX runs at ~1 GFLOP/s; a budget this small stands in for that here
    assert _fitting_n(torch.float32, 1e-4, 1024) < 1024
    t0 = time.perf_counter()
    assert matmul_peak("float32", 0.05) > 0
    assert time.perf_counter() - t0 < 1.0


def test_tiny_bench_run_samples_the_peak(tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--phases", "peak,train", "--train-steps", "2", "--warmup", "1", "--vocab", "500",
                "--batch-size", "16", "--dir", str(tmp_path / "cache"), "--out", str(out)])
    figures = json.loads(out.read_text())
    samples = figures["machine.fp32_matmul_gflops.samples"]
    # before the first phase, around the training loop (in its process), after the last phase
    assert len(samples) >= 4 and len(figures["machine.bf16_matmul_gflops.samples"]) == 4
    assert figures["machine.fp32_matmul_gflops.sampled_at"][1:3] == [
        "train: before its timed loop", "train: after its timed loop"]
    assert figures["machine.fp32_matmul_gflops"] == max(samples)
    assert 0 < figures["train.fraction_of_peak"] <= 1.0
