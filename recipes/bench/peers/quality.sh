#!/usr/bin/env bash
# bash recipes/bench/peers/quality.sh [OUT_DIR]      (BUDGET_MIN=30 PEERS="ours joeynmt onmt fairseq"; also joeynmt_small)
#
# Quality side by side on Multi30k en->de: each toolkit trains with its own documented RNN
# recipe for the same wall-clock budget on the same pinned cores, on the same text with the same
# SentencePiece model (ours, trained by `mt-train recipe=multi30k_en_de stages=[prepare,tokenizer]`),
# then translates test2016 with beam 5; every output is detokenised with that model and scored by
# the same sacreBLEU against the raw references. One after the other, never two at once.
#
#   ours     mt-train recipe=multi30k_en_de train.max_time=BUDGET (its own clock: training and
#            validation; the run then translates test with the recipe's beam 5, alpha 1.0)
#   joeynmt  joeynmt_quality.yaml.in (Joey NMT's IWSLT14 RNN recipe); SIGINT at BUDGET (Joey saves
#            its weights on it); `joeynmt test` with best.ckpt (lowest valid loss, Joey's choice),
#            or the weights saved on SIGINT when it never validated
#   joeynmt_small  the same recipe with our model's sizes (emb 256, encoder 256 per direction,
#            decoder 512): what Joey NMT's code reaches when its recipe's size fits 2 cores
#   onmt     onmt_quality.yaml.in (OpenNMT-py's quickstart: its default 2-layer LSTM); SIGINT at
#            BUDGET; the last saved checkpoint (saved every 250 steps) translates
#   fairseq  the lstm_wiseman_iwslt_de_en architecture with the optimiser flags of fairseq's LSTM
#            tutorial; fairseq's own --stop-time-hours; checkpoint_best.pt (lowest valid loss)
#
# Writes OUT_DIR/<peer>/ (configs, timestamped logs: runlog.py), OUT_DIR/<peer>/test.hyp,
# OUT_DIR/results.txt (one QUALITY line per toolkit) and OUT_DIR/curves/<peer>.tsv (valid BLEU
# by training minutes, from each toolkit's own validation log: greedy, detokenised, sacreBLEU);
# `mt-plot OUT_DIR/ours/runs/ours OUT_DIR/curves/*.tsv -o curves.png` draws them together.
# Environment: BUDGET_MIN (30), PEERS, PEERS_ROOT (~/nmt-peers: setup_envs.sh), CORPUS_DIR
# (raw Multi30k, the shared/corpora/multi30k layout), CPUS (0,1), THREADS (2), MT_BIN (.venv/bin).
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
OUT="${1:-$ROOT/runs/quality-$(date +%Y%m%d-%H%M%S)}"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
BUDGET_MIN="${BUDGET_MIN:-30}"
PEERS="${PEERS:-ours joeynmt onmt fairseq}"
PEERS_ROOT="${PEERS_ROOT:-$HOME/nmt-peers}"
CORPUS_DIR="${CORPUS_DIR:-$ROOT/../shared/corpora/multi30k}"
CPUS="${CPUS:-0,1}"; THREADS="${THREADS:-2}"
MT_BIN="${MT_BIN:-$ROOT/.venv/bin}"
export OMP_NUM_THREADS="$THREADS" MKL_NUM_THREADS="$THREADS"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1   # the peers pickle non-tensors into their checkpoints
PIN=(); command -v taskset > /dev/null && PIN=(taskset -c "$CPUS")
DATA="$OUT/data"; RESULTS="$OUT/results.txt"
mkdir -p "$OUT/curves"; touch "$RESULTS"
say() { echo "$@" | tee -a "$RESULTS"; }
run() { local log=$1; shift; "${PIN[@]}" python3 "$HERE/runlog.py" "$log" "$@"; }
score() {  # peer hyp train_log
  local sig
  sig=$("$MT_BIN/sacrebleu" "$DATA/raw/test.de" -i "$2" -m bleu chrf ter -f text -w 1 2>/dev/null | tr '\n' ' ')
  say "QUALITY peer=$1 budget_min=$BUDGET_MIN lines=$(wc -l < "$2") train_wall_s=$(sed -n 's/^#RUNLOG .*wall_s=\([0-9.]*\).*/\1/p' "$3" | tail -1) $sig"
}

# ---------------------------------------------------------------- data: our tokenizer for all
(cd "$OUT" && mkdir -p ours && cd ours && "$MT_BIN/mt-train" recipe=multi30k_en_de name=ours \
   'stages=[prepare,tokenizer]' > tokenizer.log 2>&1) || { echo "[quality] tokenizer failed: $OUT/ours/tokenizer.log"; exit 1; }
[ -f "$DATA/spm.model" ] || "$MT_BIN/python" "$HERE/prep_quality.py" "$CORPUS_DIR" \
   "$OUT/ours/runs/ours/tokenizer/spm.model" "$DATA" || exit 1
say "HOST $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc) cpus, pinned to '$CPUS', OMP_NUM_THREADS=$THREADS, budget ${BUDGET_MIN} min, $(date -u +%FT%TZ)"

# ---------------------------------------------------------------- toolkits
q_ours() {
  local W="$OUT/ours"
  (cd "$W" && run "$W/train.log" -- "$MT_BIN/mt-train" recipe=multi30k_en_de name=ours \
     train.max_time="$BUDGET_MIN" 'stages=[train]' \
   && run "$W/test.log" -- "$MT_BIN/mt-train" recipe=multi30k_en_de name=ours \
     train.max_time="$BUDGET_MIN" 'stages=[translate,score]')
  score ours "$W/runs/ours/test.hyp" "$W/train.log"
}

q_joeynmt() {  # [name]: joeynmt, or joeynmt_small (the same recipe with our model's sizes)
  local name="${1:-joeynmt}" V="$PEERS_ROOT/joeynmt/bin" J ckpt
  local W="$OUT/$name"
  mkdir -p "$W"
  # Joey NMT 2.3.0 with current torch / sentencepiece: ReduceLROnPlateau lost `verbose=`
  # (torch 2.7), SentencePieceProcessor lost SetVocabulary (sentencepiece 0.2)
  J=$(echo "$PEERS_ROOT"/joeynmt/lib/python3*/site-packages/joeynmt)
  sed -i 's/^\(\s*\)"verbose": False,$/\1# "verbose": False,  (removed by mt quality.sh)/' "$J/builders.py"
  "$V/pip" install -q 'sentencepiece==0.1.99' > "$W/pip.log" 2>&1
  sed -e "s#@DATA@#$DATA#g; s#@WORK@#$W#g" "$HERE/joeynmt_quality.yaml.in" > "$W/train.yaml"
  if [ "$name" = joeynmt_small ]; then  # emb 620 -> 256, encoder 500 -> 256 per direction, decoder 1000 -> 512
    sed -i -e 's/embedding_dim: 620/embedding_dim: 256/; s/hidden_size: 500$/hidden_size: 256/' \
        -e 's/hidden_size: 1000$/hidden_size: 512/; s/^name: "\(.*\)"/name: "\1_our_sizes"/' "$W/train.yaml"
    grep -q 'hidden_size: 512' "$W/train.yaml" || { say "QUALITY peer=$name status=FAILED sizes"; return; }
  fi
  run "$W/train.log" -- timeout -s INT "${BUDGET_MIN}m" "$V/python" -m joeynmt train "$W/train.yaml" --skip-test
  # best.ckpt (lowest valid loss) exists once Joey has validated; else the weights it saved on SIGINT.
  # Joey's test mode translates every split it is given: the test yaml names test only.
  ckpt="$W/model/best.ckpt"; [ -e "$ckpt" ] || ckpt="$W/model/latest.ckpt"
  sed -e "s#load_model: .*#load_model: \"$ckpt\"#; /^    dev: /d" "$W/train.yaml" > "$W/test.yaml"
  run "$W/test.log" -- "$V/python" -m joeynmt test "$W/test.yaml" -o "$W/hyp"
  [ -f "$W/hyp.test" ] || { say "QUALITY peer=$name status=FAILED test"; return; }
  cp "$W/hyp.test" "$W/test.hyp"
  score "$name" "$W/test.hyp" "$W/train.log"
}
q_joeynmt_small() { q_joeynmt joeynmt_small; }

q_onmt() {
  local B="$PEERS_ROOT/onmt/bin" W="$OUT/onmt" last
  mkdir -p "$W"
  sed -e "s#@DATA@#$DATA#g; s#@WORK@#$W#g" "$HERE/onmt_quality.yaml.in" > "$W/train.yaml"
  "${PIN[@]}" "$B/onmt_build_vocab" -config "$W/train.yaml" -n_sample -1 > "$W/build_vocab.log" 2>&1 \
    || { say "QUALITY peer=onmt status=FAILED build_vocab"; return; }
  run "$W/train.log" -- timeout -s INT "${BUDGET_MIN}m" "$B/onmt_train" -config "$W/train.yaml"
  last=$(ls -v "$W"/model_step_*.pt 2> /dev/null | tail -1)
  [ -n "$last" ] || { say "QUALITY peer=onmt status=FAILED no_checkpoint"; return; }
  run "$W/test.log" -- "$B/onmt_translate" -model "$last" -src "$DATA/pieces/test.en" \
      -output "$W/test.pieces" -beam_size 5 -batch_size 32 -gpu -1
  "$MT_BIN/python" -c "import sys, sentencepiece as s; p = s.SentencePieceProcessor(model_file=sys.argv[1])
for l in sys.stdin: print(p.decode_pieces(l.split()))" "$DATA/spm.model" < "$W/test.pieces" > "$W/test.hyp"
  score onmt "$W/test.hyp" "$W/train.log"
}

q_fairseq() {
  local B="$PEERS_ROOT/fairseq/bin" W="$OUT/fairseq"
  mkdir -p "$W"
  "${PIN[@]}" "$B/fairseq-preprocess" --source-lang en --target-lang de --trainpref "$DATA/pieces/train" \
      --validpref "$DATA/pieces/valid" --testpref "$DATA/pieces/test" --destdir "$W/bin" \
      --joined-dictionary --workers 2 > "$W/preprocess.log" 2>&1 || { say "QUALITY peer=fairseq status=FAILED preprocess"; return; }
  run "$W/train.log" -- timeout -s INT "$((BUDGET_MIN + 5))m" "$B/fairseq-train" "$W/bin" \
      --task translation --source-lang en --target-lang de --arch lstm_wiseman_iwslt_de_en \
      --dropout 0.2 --optimizer adam --lr 0.005 --lr-shrink 0.5 --max-tokens 12000 \
      --stop-time-hours "$(python3 -c "print($BUDGET_MIN / 60)")" \
      --eval-bleu --eval-bleu-args '{"beam": 1}' --eval-bleu-remove-bpe sentencepiece \
      --save-dir "$W/ckpt" --no-epoch-checkpoints --log-format json --log-interval 20 \
      --num-workers 0 --cpu --seed 1
  run "$W/test.log" --stdout "$W/generate.out" -- "$B/fairseq-generate" "$W/bin" \
      --path "$W/ckpt/checkpoint_best.pt" --gen-subset test --source-lang en --target-lang de \
      --beam 5 --batch-size 32 --remove-bpe sentencepiece --cpu --num-workers 0
  grep '^D-' "$W/generate.out" | sed 's/^D-//' | sort -n -k1,1 | cut -f3 > "$W/test.hyp"
  score fairseq "$W/test.hyp" "$W/train.log"
}

for p in $PEERS; do
  if [ "$p" != ours ] && [ ! -f "$PEERS_ROOT/${p%_small}/.bench_ok" ]; then
    say "QUALITY peer=$p status=SKIPPED (no venv in $PEERS_ROOT/${p%_small}: bash $HERE/setup_envs.sh)"; continue
  fi
  echo "[quality] $p: training for $BUDGET_MIN minutes, $(date -u +%T)"
  "q_$p"
done
"$MT_BIN/python" "$HERE/parse_quality.py" "$OUT" | tee -a "$RESULTS"
echo "[quality] done: $RESULTS"
