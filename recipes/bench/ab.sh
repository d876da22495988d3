#!/usr/bin/env bash
# bash recipes/bench/ab.sh OLD_COMMIT OUT_DIR ROUNDS [mt-bench arguments...]
# Before/after of our own code in one sitting: mt-bench from a git worktree of OLD_COMMIT and
# from this tree, alternating old, new, old, new, ... (the machine's speed drifts by 10-30%
# within minutes, so a before/after pair taken apart means little). Each side runs from its own
# tree (PYTHONPATH), with this tree's venv and prepared corpus. Writes OUT_DIR/{old,new}_R.json
# and prints the throughput and memory lines of each run.
#   bash recipes/bench/ab.sh 83efd82 runs/ab-decode 2 --phases 1:64,5:64 --int8 --shortlist 1000
set -eu
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OLD="$1"; OUT="$2"; ROUNDS="$3"; shift 3
PY="${PY:-$ROOT/.venv/bin/python}"
TREE="${TMPDIR:-/tmp}/mt-ab-$(git -C "$ROOT" rev-parse --short "$OLD")"
[ -d "$TREE" ] || git -C "$ROOT" worktree add --detach "$TREE" "$OLD" > /dev/null
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
for r in $(seq 1 "$ROUNDS"); do
  for side in old new; do
    src="$ROOT"; [ "$side" = old ] && src="$TREE"
    (cd "$src" && PYTHONPATH="$src" "$PY" -m mt.bench --dir "$ROOT/runs/.bench" --threads 2 "$@" \
      --out "$OUT/${side}_$r.json" > "$OUT/${side}_$r.txt" 2> "$OUT/${side}_$r.err")
    echo "$side $r: $(grep -E 'tokens_per_s|sentences_per_s|peak_rss' "$OUT/${side}_$r.txt" | tr '\n' ' ')"
  done
done
