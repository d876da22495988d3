#!/usr/bin/env bash
# bash recipes/bench/side_by_side.sh [OUT_DIR]
# Peers and ours in one sitting, interleaved (the machine's speed drifts by 10-30% within
# minutes): ours, Joey NMT, ours, OpenNMT-py, ours, ours-LSTM, fairseq, ours-LSTM. Each "ours"
# is training fp32 and bf16, decoding float32, and decoding with the inference options in $FAST
# (default --int8 --shortlist 1000; --bf16 --shortlist 1000 pays only on CPUs with AMX). Needs the peer
# harness of recipes/bench/peers (its setup_envs.sh run once). Prints RESULT lines of the peers
# and our figures; `python recipes/bench/summarize.py OUT_DIR` turns them into ratio tables.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PEERS_DIR="${PEERS_DIR:-$HERE/peers}"
OUT="${1:-$ROOT/runs/bench-$(date +%Y%m%d-%H%M%S)}"
MT_BENCH="${MT_BENCH:-$ROOT/.venv/bin/mt-bench}"
STEPS="${STEPS:-120}"
FAST="${FAST:---int8 --shortlist 1000}"
mkdir -p "$OUT"
ours() {  # tag model
  for prec in fp32 bf16; do
    "$MT_BENCH" --model "$2" --precision "$prec" --train-steps "$STEPS" --warmup 20 \
      --phases "$([ $prec = fp32 ] && echo peak,train,1:64,5:64 || echo train)" --fixed-len 20 \
      --out "$OUT/ours_$1_$prec.json" > "$OUT/ours_$1_$prec.txt" 2> "$OUT/ours_$1_$prec.err"
    echo "[side-by-side] ours $1 $2 $prec: $(grep target_tokens_per_s "$OUT/ours_$1_$prec.txt")"
  done
  # decoding with the inference options (BLEU cost on a trained model: recipes/bench/decode_options.py)
  # shellcheck disable=SC2086
  "$MT_BENCH" --model "$2" --phases 1:64,5:64 --fixed-len 20 $FAST \
    --out "$OUT/ours_$1_fast.json" > "$OUT/ours_$1_fast.txt" 2> "$OUT/ours_$1_fast.err"
  echo "[side-by-side] ours $1 $2 $FAST: $(grep beam5.batch64.sentences "$OUT/ours_$1_fast.txt")"
}
peer() {  # name
  PEERS="$1" SKIP_SETUP=1 BENCH_OUT="$OUT/$1" DECODES="1:64:20 5:64:20" bash "$PEERS_DIR/run_peers.sh" \
    > "$OUT/peer_$1.log" 2>&1
  grep RESULT "$OUT/$1/results.txt" | sed "s/^/[side-by-side] /"
}
ours 1 bench_gru
peer joeynmt
ours 2 bench_gru
peer onmt
ours 3 bench_gru
ours 4 bench_lstm
peer fairseq
ours 5 bench_lstm
echo "[side-by-side] done: $OUT"
