#!/usr/bin/env bash
# bash recipes/bench/prepare_2m.sh CORPUS_DIR OUT_DIR ROUNDS [OLD_COMMIT]
# Throughput and peak memory of the prepare and tokenizer stages at 2 M pairs: CORPUS_DIR's
# train.{en,de} repeated 12 times (Tatoeba en-de: 1,977,000 pairs), its valid and test as they
# are, through `mt-train recipe=tatoeba_en_de stages=[prepare,tokenizer]` with a fresh cache.
# With OLD_COMMIT, that commit (a git worktree) and this tree alternate, old first.
#   bash recipes/bench/prepare_2m.sh ../shared/corpora/tatoeba-en-de runs/bench-prepare 1 73cd3ec
set -eu
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CORPUS="$(cd "$1" && pwd)"; OUT="$2"; ROUNDS="$3"; OLD="${4:-}"
PY="${PY:-$ROOT/.venv/bin/python}"
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"
BIG="$OUT/corpus"
if [ ! -s "$BIG/train.de" ]; then
  mkdir -p "$BIG"
  for lang in en de; do
    for _ in $(seq 12); do cat "$CORPUS/train.$lang"; done > "$BIG/train.$lang"
    cp "$CORPUS/valid.$lang" "$CORPUS/test.$lang" "$BIG/"
  done
fi
sides=new
if [ -n "$OLD" ]; then
  TREE="${TMPDIR:-/tmp}/mt-ab-$(git -C "$ROOT" rev-parse --short "$OLD")"
  [ -d "$TREE" ] || git -C "$ROOT" worktree add --detach "$TREE" "$OLD" > /dev/null
  sides="old new"
fi
pairs=$(wc -l < "$BIG/train.en")
for r in $(seq 1 "$ROUNDS"); do
  for side in $sides; do
    src="$ROOT"; [ "$side" = old ] && src="$TREE"
    work="$OUT/$side-$r"; rm -rf "$work"; mkdir -p "$work"
    extra=(); grep -q 'cache_dir: str' "$src/mt/config.py" && extra=("cache_dir=$work/cache")
    # before data.local_splits, a local copy had to be given its split names by hand
    grep -q 'local_splits' "$src/mt/config.py" || extra+=("data.splits={train:train,valid:valid,test:test}")
    (cd "$src" && PYTHONPATH="$src" /usr/bin/time -v "$PY" -m mt.pipeline recipe=tatoeba_en_de \
       data.local_dir="$BIG" stages=[prepare,tokenizer] name=prep hydra.run.dir="$work/run" \
       "${extra[@]}" > "$work/log.txt" 2>&1) || sed -n '/Traceback\|error/,$p' "$work/log.txt"
    wall=$(grep 'Elapsed (wall' "$work/log.txt" | awk '{print $NF}')
    rss=$(grep 'Maximum resident' "$work/log.txt" | awk '{print $NF}')
    secs=$(echo "$wall" | awk -F: '{ if (NF == 3) print $1 * 3600 + $2 * 60 + $3; else print $1 * 60 + $2 }')
    steps=$(grep -E 'INFO (prepare|tokenizer): ' "$work/log.txt" | awk '{print $2}' | tr '\n' ' ')
    echo "$side $r: $pairs pairs in ${secs}s = $(awk -v p="$pairs" -v s="$secs" 'BEGIN {printf "%.0f", p / s}') pairs/s, peak RSS $((rss / 1024)) MB; log times: $steps"
  done
done
