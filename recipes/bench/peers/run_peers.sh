#!/usr/bin/env bash
# Side-by-side CPU throughput of peer NMT toolkits on one small RNN model.
#
# Sets everything up from scratch (venvs, corpus, SentencePiece), then per peer:
# train TRAIN_STEPS steps (first WARMUP_STEPS excluded from the figure), then
# translate the first 500 test sentences greedily and with beam 5.
# Prints one "RESULT ..." line per measurement (also saved to results.txt).
#
# Environment (all optional):
#   PEERS_ROOT    venvs, data, runs               (default $HOME/nmt-peers)
#   BENCH_DATA    prepared corpus dir              (default $PEERS_ROOT/data)
#   CORPUS_DIR    raw Multi30k en/de (train.*, valid.*|val.*, test2016.*|test_2016_flickr.*, .gz ok);
#                 default: first of <project>/../shared/corpora/multi30k (this dir is
#                 <project>/recipes/bench/peers), $BENCH_DATA/multi30k/raw
#                 that has train.en[.gz]; none => synthetic corpus (throughput only)
#   BENCH_OUT     where this run's logs go         (default $PEERS_ROOT/runs/<date>)
#   PEERS         default "joeynmt onmt fairseq" (a peer whose venv is missing is skipped)
#   TRAIN_STEPS=250 WARMUP_STEPS=50 LOG_EVERY=10
#   DECODES       "beam:batch[:L] ..."  L>0 = fixed-length decoding: every
#                 hypothesis is forced to exactly L tokens (EOS blocked before,
#                 forced at L), so all peers do the same work whatever their
#                 (undertrained) model would emit.  (default "1:64 5:32 5:64 1:64:20 5:64:20")
#   DEC_REPEAT=3  runs of each decode; the figure is the median, with the range
#   CPUS=0,1 THREADS=2 (taskset list / OMP+MKL threads)   RUN_TIMEOUT=900 (s per run)
#   SKIP_SETUP=1  do not (re)create venvs
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS_ROOT="${PEERS_ROOT:-$HOME/nmt-peers}"
BENCH_DATA="${BENCH_DATA:-$PEERS_ROOT/data}"
BENCH_OUT="${BENCH_OUT:-$PEERS_ROOT/runs/$(date +%Y%m%d-%H%M%S)}"
PEERS="${PEERS:-joeynmt onmt fairseq}"
TRAIN_STEPS="${TRAIN_STEPS:-250}"; WARMUP_STEPS="${WARMUP_STEPS:-50}"; LOG_EVERY="${LOG_EVERY:-10}"
DECODES="${DECODES:-1:64 5:32 5:64 1:64:20 5:64:20}"; DEC_REPEAT="${DEC_REPEAT:-3}"
CPUS="${CPUS:-0,1}"; THREADS="${THREADS:-2}"; RUN_TIMEOUT="${RUN_TIMEOUT:-900}"
SP="$BENCH_DATA/spm8k"

export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torch>=2.6 loads checkpoints with weights_only=True; all three peers pickle
# non-tensor objects (argparse.Namespace, vocab, ...) into theirs.
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
PIN=(); command -v taskset >/dev/null && PIN=(taskset -c "$CPUS")
mkdir -p "$BENCH_OUT"
RESULTS="$BENCH_OUT/results.txt"; : > "$RESULTS"
say() { echo "$@" | tee -a "$RESULTS"; }

# ---------------------------------------------------------------- setup
if [ "${SKIP_SETUP:-0}" != 1 ]; then
  PEERS_ROOT="$PEERS_ROOT" PEERS="$PEERS" bash "$HERE/setup_envs.sh" || echo "[run] setup reported a failure; continuing with what exists"
fi

# ---------------------------------------------------------------- data
if [ ! -f "$SP/CORPUS" ]; then
  if [ -z "${CORPUS_DIR:-}" ]; then
    for c in "$HERE/../../../../shared/corpora/multi30k" "$BENCH_DATA/multi30k/raw"; do
      if [ -f "$c/train.en" ] || [ -f "$c/train.en.gz" ]; then CORPUS_DIR="$c"; break; fi
    done
  fi
  PREP_PY="$PEERS_ROOT/joeynmt/bin/python"; [ -x "$PREP_PY" ] || PREP_PY="$PEERS_ROOT/onmt/bin/python"
  echo "[run] preparing corpus from '${CORPUS_DIR:-<synthetic>}' into $SP"
  "${PIN[@]}" "$PREP_PY" "$HERE/prep_data.py" "${CORPUS_DIR:-/nonexistent}" "$SP" 8000 || { echo "[run] data prep failed"; exit 1; }
fi
say "CORPUS $(cat "$SP/CORPUS") train=$(wc -l < "$SP/train.en") test=$(wc -l < "$SP/test500.en") vocab=spm-unigram-8000-joint dir=en-de"
say "HOST $(nproc) cpus visible, pinned to '${CPUS}', OMP_NUM_THREADS=$THREADS, $(python3 -c 'import platform;print(platform.processor() or platform.machine())')"

fill() {  # template work beam batch [fixlen]
  local L="${5:-0}" mn=1 mx=-1
  [ "$L" -gt 0 ] && { mn=$L; mx=$L; }
  sed -e "s#@DATA@#$SP#g; s#@WORK@#$2#g; s#@STEPS@#$TRAIN_STEPS#g; s#@LOGF@#$LOG_EVERY#g; s#@BEAM@#$3#g; s#@DEC_BATCH@#$4#g; s#@MINLEN@#$mn#g; s#@MAXLEN@#$mx#g" "$1"
}
parse_dec() {  # spec -> sets b bs L tag
  b=$(echo "$1" | cut -d: -f1); bs=$(echo "$1" | cut -d: -f2); L=$(echo "$1" | cut -s -d: -f3); L=${L:-0}
  tag="b${b}_bs${bs}"; [ "$L" -gt 0 ] && tag="${tag}_len${L}"
  lbl_len="len=natural"; [ "$L" -gt 0 ] && lbl_len="len=fixed$L"
}
run() {  # log [--stdout f] -- cmd...   (pinned, timed, RSS-measured)
  local log=$1; shift
  "${PIN[@]}" python3 "$HERE/runlog.py" "$log" "$@"
}
envline() {  # peer python
  "${PIN[@]}" "$2" - "$1" <<'PY' | tee -a "$RESULTS"
import sys, torch, importlib.metadata as md
p = sys.argv[1]
dist = {"joeynmt": "joeynmt", "onmt": "OpenNMT-py", "fairseq": "fairseq"}[p]
# machine-speed reference taken right before this peer's runs (the host's speed
# drifts by 10-20% over minutes): fp32 GEMM of a beam-5 x batch-64 output layer
import time
a, w = torch.randn(320, 512), torch.randn(512, 8000)
for _ in range(5):
    a @ w
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < 1.0:
    a @ w
    n += 1
gf = n * 2 * 320 * 512 * 8000 / (time.perf_counter() - t0) / 1e9
print(f"ENV peer={p} {dist}=={md.version(dist)} torch=={torch.__version__} "
      f"torch.get_num_threads()={torch.get_num_threads()} interop={torch.get_num_interop_threads()} "
      f"python={sys.version.split()[0]} calib_gemm_gflops={gf:.1f}")
PY
}

# ---------------------------------------------------------------- peers
bench_joeynmt() {
  local V="$PEERS_ROOT/joeynmt/bin/python" W="$BENCH_OUT/joeynmt"
  local LBL="model=biGRU(256x2)+GRU(512)+bahdanau"
  mkdir -p "$W"
  fill "$HERE/joeynmt_gru.yaml.in" "$W" 5 64 > "$W/train.yaml"
  run "$W/train.log" -- timeout "$RUN_TIMEOUT" "$V" -m joeynmt train "$W/train.yaml" --skip-test
  python3 "$HERE/parse_logs.py" train joeynmt "$W/train.log" "$WARMUP_STEPS" "$LBL" | tee -a "$RESULTS"
  local b bs L tag lbl_len
  for d in $DECODES; do
    parse_dec "$d"
    fill "$HERE/joeynmt_gru.yaml.in" "$W" "$b" "$bs" "$L" > "$W/dec_$tag.yaml"
    # Joey 2.3.0's `translate -o FILE` crashes (args.n_best); hyps go to stdout.
    # It also drops testing.min_output_length on the way to search(): the
    # fixed-length runs go through a shim that forwards it.
    local entry=(-m joeynmt translate); [ "$L" -gt 0 ] && entry=("$HERE/joey_translate_minlen.py")
    for r in $(seq "$DEC_REPEAT"); do
      run "$W/dec_$tag.r$r.log" --stdout "$W/hyp_$tag" -- \
          timeout "$RUN_TIMEOUT" "$V" "${entry[@]}" "$W/dec_$tag.yaml" < "$SP/test500.en"
    done
    python3 "$HERE/parse_logs.py" decode joeynmt "$W/hyp_$tag" "$b" "$bs" "$LBL $lbl_len" "$W/dec_$tag".r*.log | tee -a "$RESULTS"
  done
}

bench_onmt() {
  local B="$PEERS_ROOT/onmt/bin" W="$BENCH_OUT/onmt"
  local LBL="model=biGRU(512=256x2)+GRU(512)+mlp-attn"
  mkdir -p "$W"
  fill "$HERE/onmt_gru.yaml.in" "$W" 5 64 > "$W/train.yaml"
  "${PIN[@]}" "$B/onmt_build_vocab" -config "$W/train.yaml" -n_sample -1 > "$W/build_vocab.log" 2>&1 || { say "RESULT peer=onmt status=FAILED build_vocab"; return; }
  run "$W/train.log" -- timeout "$RUN_TIMEOUT" "$B/onmt_train" -config "$W/train.yaml"
  python3 "$HERE/parse_logs.py" train onmt "$W/train.log" "$WARMUP_STEPS" "$LBL" | tee -a "$RESULTS"
  local b bs L tag lbl_len lenopt
  for d in $DECODES; do
    parse_dec "$d"
    lenopt=(-max_length_ratio 1.5)   # natural: min(250, 1.5 x longest source + 5)
    [ "$L" -gt 0 ] && lenopt=(-min_length "$L" -max_length "$L" -max_length_ratio 0)
    for r in $(seq "$DEC_REPEAT"); do
      run "$W/dec_$tag.r$r.log" -- timeout "$RUN_TIMEOUT" "$B/onmt_translate" \
          -model "$W/model_step_${TRAIN_STEPS}.pt" -src "$SP/test500.en" -output "$W/hyp_$tag" \
          -beam_size "$b" -batch_size "$bs" -batch_type sents "${lenopt[@]}" \
          -length_penalty avg -report_time -gpu -1 -seed 42
    done
    python3 "$HERE/parse_logs.py" decode onmt "$W/hyp_$tag" "$b" "$bs" "$LBL $lbl_len" "$W/dec_$tag".r*.log | tee -a "$RESULTS"
  done
}

bench_fairseq() {
  local B="$PEERS_ROOT/fairseq/bin" W="$BENCH_OUT/fairseq"
  # fairseq has no GRU model: LSTM, and its attention is Luong "general"-style
  local LBL="model=biLSTM(256x2)+LSTM(512)+luong-general(fairseq-lstm)"
  mkdir -p "$W"
  "${PIN[@]}" "$B/fairseq-preprocess" --source-lang en --target-lang de --trainpref "$SP/train" \
      --validpref "$SP/valid" --testpref "$SP/test500" --destdir "$W/bin" --joined-dictionary \
      --workers 2 > "$W/preprocess.log" 2>&1 || { say "RESULT peer=fairseq status=FAILED preprocess"; return; }
  run "$W/train.log" -- timeout "$RUN_TIMEOUT" "$B/fairseq-train" "$W/bin" --task translation \
      --source-lang en --target-lang de --arch lstm \
      --encoder-embed-dim 256 --encoder-hidden-size 256 --encoder-layers 1 --encoder-bidirectional \
      --decoder-embed-dim 256 --decoder-hidden-size 512 --decoder-layers 1 --decoder-out-embed-dim 512 \
      --decoder-attention True --dropout 0.2 --criterion cross_entropy --sentence-avg \
      --optimizer adam --lr 3e-4 --adam-betas '(0.9,0.999)' --lr-scheduler fixed --clip-norm 5 \
      --batch-size 64 --max-update "$TRAIN_STEPS" --disable-validation --save-dir "$W/ckpt" \
      --no-epoch-checkpoints --log-format json --log-interval "$LOG_EVERY" --num-workers 0 --cpu \
      --seed 42 --max-source-positions 1024 --max-target-positions 1024
  python3 "$HERE/parse_logs.py" train fairseq "$W/train.log" "$WARMUP_STEPS" "$LBL" | tee -a "$RESULTS"
  local b bs L tag lbl_len lenopt
  for d in $DECODES; do
    parse_dec "$d"
    lenopt=(--max-len-a 1.5 --max-len-b 5)   # natural: 1.5 x longest source + 5
    [ "$L" -gt 0 ] && lenopt=(--min-len "$L" --max-len-a 0 --max-len-b "$L")
    for r in $(seq "$DEC_REPEAT"); do
      run "$W/dec_$tag.r$r.log" -- timeout "$RUN_TIMEOUT" "$B/fairseq-generate" "$W/bin" \
          --path "$W/ckpt/checkpoint_last.pt" --gen-subset test --source-lang en --target-lang de \
          --beam "$b" --batch-size "$bs" "${lenopt[@]}" --lenpen 1.0 --cpu --num-workers 0
    done
    python3 "$HERE/parse_logs.py" decode fairseq - "$b" "$bs" "$LBL $lbl_len" "$W/dec_$tag".r*.log | tee -a "$RESULTS"
  done
}

for p in $PEERS; do
  PYV="$PEERS_ROOT/$p/bin/python"
  if [ ! -x "$PYV" ] || [ ! -f "$PEERS_ROOT/$p/.bench_ok" ]; then say "SKIP peer=$p (no working venv in $PEERS_ROOT/$p)"; continue; fi
  envline "$p" "$PYV"
  "bench_$p"
done
echo "[run] logs in $BENCH_OUT; figures in $RESULTS"
