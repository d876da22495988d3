#!/usr/bin/env bash
# bash recipes/multi30k_en_de_distill.sh        (BUDGET_MIN=90 TEACHERS=4 KD_DATA=distilled NAME=multi30k_en_de_distill)
#
# Multi30k English->German: one model from one wall-clock budget, by sequence-level knowledge
# distillation (Kim & Rush 2016): an ensemble of small models teaches one model of the same size.
#   1. teachers  TEACHERS jobs of the quick recipe (multi30k_en_de_quick, 11 minutes each), seeds
#                1234, 1, 2, ..., one after the other: runs/NAME_teachers/multirun/<job>
#   2. distill   their ensemble translates the training source (mt-translate -m A -m B ...,
#                DISTILL_ARGS: beam 5, alpha 1.0) into runs/NAME/data/train.de
#   3. student   the quick recipe on the training source with those translations (KD_DATA=both:
#                the original pairs too) for what is left of BUDGET_MIN: runs/NAME_student. It
#                validates on the untouched valid split, which picks its checkpoints; then beam 5
#                on test2016 and sacreBLEU (its translate and score stages, not counted).
# BUDGET_MIN is wall clock from the first teacher's start to the student's last update, the
# student's data preparation included. Every stage skips work it finds done, so running the same
# command again resumes; each finished (or interrupted) piece of work adds its seconds to
# runs/NAME/clock, and the student trains for what the clock leaves.
# Environment: BUDGET_MIN (90), TEACHERS (4), KD_DATA (distilled | both), DISTILL_ARGS
# ("--beam 5 --alpha 1.0"), CORPUS (a folder of train/valid/test2016.{en,de}[.gz]; default: the
# built-in Multi30k), EXTRA (more mt-train overrides, for every job), MT_BIN (the clone's .venv/bin,
# else where mt-train is on PATH). Runs land in runs/ under the folder it is started in.
# Exit status: 0; 2 bad environment or no time left for the student; otherwise that of the
# mt-train / mt-translate command that failed (README: "Exit codes").
set -u -o pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${MT_BIN:-}" ]; then  # the clone's venv (make install), else the mt-train on PATH
  if [ -x "$ROOT/.venv/bin/mt-train" ]; then MT_BIN="$ROOT/.venv/bin"
  else MT_BIN="$(dirname "$(command -v mt-train || echo .venv/bin/mt-train)")"; fi
fi
BUDGET_MIN="${BUDGET_MIN:-90}"
TEACHERS="${TEACHERS:-4}"
KD_DATA="${KD_DATA:-distilled}"
DISTILL_ARGS="${DISTILL_ARGS:---beam 5 --alpha 1.0}"
NAME="${NAME:-multi30k_en_de_distill}"
EXTRA="${EXTRA:-}"
RECIPE=multi30k_en_de_quick
W="runs/$NAME"
CLOCK="$W/clock"

die() { echo "multi30k_en_de_distill: $1" >&2; exit "${2:-2}"; }
say() { echo "[distill] $*" >&2; }
[[ "$TEACHERS" =~ ^[1-9][0-9]*$ ]] || die "TEACHERS=$TEACHERS: must be a whole number >= 1"
[[ "$BUDGET_MIN" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "BUDGET_MIN=$BUDGET_MIN: must be a number of minutes"
case "$KD_DATA" in distilled|both) ;; *) die "KD_DATA=$KD_DATA: must be distilled or both" ;; esac
[ -x "$MT_BIN/mt-train" ] || die "no $MT_BIN/mt-train: run make install, or set MT_BIN"
CORPUS_GIVEN="${CORPUS:-}"
if [ -z "${CORPUS:-}" ]; then
  CORPUS="$("$MT_BIN/python" -c 'from mt.data import BUILTIN_DIR; print(BUILTIN_DIR / "multi30k")')" || exit 2
  DATA_PATH=builtin:multi30k
else
  CORPUS="$(cd "$CORPUS" 2> /dev/null && pwd)" || die "CORPUS=${CORPUS_GIVEN:-}: no such folder"
  DATA_PATH="$CORPUS"
fi
text() {  # split lang: the corpus file's lines, compressed or not
  if [ -f "$CORPUS/$1.$2.gz" ]; then gzip -dc "$CORPUS/$1.$2.gz"
  elif [ -f "$CORPUS/$1.$2" ]; then cat "$CORPUS/$1.$2"
  else die "no $CORPUS/$1.$2[.gz]"; fi
}
mkdir -p "$W/data"; touch "$CLOCK"
# shellcheck disable=SC2206  # EXTRA is a list of overrides, split on spaces like a command line
EXTRA_ARGS=($EXTRA)

# ---------------------------------------------------------------- the clock
# "<piece> <seconds>" lines, and "<piece>_done 0" once a piece has finished; a piece run twice
# (a resume) adds both times. Whatever is running when the
# script stops (an error, Ctrl-C, a kill) is written by the EXIT trap, so no time goes uncounted.
PIECE=""; T0=0
now() { date +%s.%N; }
start() { PIECE=$1; T0=$(now); }
stop() { [ -n "$PIECE" ] && awk -v p="$PIECE" -v a="$T0" -v b="$(now)" 'BEGIN { printf "%s %.1f\n", p, b - a }' >> "$CLOCK"; PIECE=""; }
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
spent_s() {  # [piece to leave out]: seconds on the clock
  awk -v skip="${1:-}" '$1 != skip { s += $2 } END { printf "%.1f", s }' "$CLOCK"
}

# ---------------------------------------------------------------- 1. teachers
SEEDS=(1234 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
[ "$TEACHERS" -le ${#SEEDS[@]} ] || die "TEACHERS=$TEACHERS: at most ${#SEEDS[@]}"
seeds=$(IFS=,; echo "${SEEDS[*]:0:$TEACHERS}")
models=()
for ((i = 0; i < TEACHERS; i++)); do models+=(-m "runs/${NAME}_teachers/multirun/$i"); done
if grep -q '^teachers_done' "$CLOCK"; then
  say "teachers: done (runs/${NAME}_teachers)"
else
  say "teachers: $TEACHERS x $RECIPE, seeds $seeds"
  start teachers
  "$MT_BIN/mt-train" -m recipe=$RECIPE name="${NAME}_teachers" data.path="$DATA_PATH" \
      'stages=[prepare,tokenizer,train]' seed="$seeds" "${EXTRA_ARGS[@]}" || exit $?
  stop; echo "teachers_done 0" >> "$CLOCK"
fi

# ---------------------------------------------------------------- 2. distill
D="$W/data"
if [ ! -f "$D/train.de" ]; then
  say "distill: the $TEACHERS teachers translate $(text train en | wc -l) training sentences ($DISTILL_ARGS)"
  start distill
  # shellcheck disable=SC2086  # DISTILL_ARGS: mt-translate options
  text train en | "$MT_BIN/mt-translate" "${models[@]}" $DISTILL_ARGS -q > "$D/train.distilled.tmp" || exit $?
  [ "$(wc -l < "$D/train.distilled.tmp")" = "$(text train en | wc -l)" ] \
    || die "distill: $D/train.distilled.tmp has $(wc -l < "$D/train.distilled.tmp") lines, the source $(text train en | wc -l)" 1
  mv "$D/train.distilled.tmp" "$D/train.distilled.de"
  if [ "$KD_DATA" = both ]; then
    { text train en; text train en; } > "$D/train.en"
    { text train de; cat "$D/train.distilled.de"; } > "$D/train.de.tmp"
  else
    text train en > "$D/train.en"; cp "$D/train.distilled.de" "$D/train.de.tmp"
  fi
  for s in valid test2016; do for l in en de; do text $s $l > "$D/$s.$l"; done; done
  mv "$D/train.de.tmp" "$D/train.de"   # last: its presence says the folder is complete
  stop
fi

# ---------------------------------------------------------------- 3. student
student=("$MT_BIN/mt-train" recipe=$RECIPE name="${NAME}_student" data.path="$(cd "$D" && pwd)" "${EXTRA_ARGS[@]}")
if ! grep -q '^student_prep_done' "$CLOCK"; then
  start student_prep; "${student[@]}" 'stages=[prepare,tokenizer]' || exit $?; stop
  echo "student_prep_done 0" >> "$CLOCK"
fi
# the student's train.max_time is its own clock (training and validation, summed over resumes),
# so it is what the other pieces leave, less a minute for its start and the validation of its
# averaged weights, which come after that clock stops
student_min=$(awk -v b="$BUDGET_MIN" -v s="$(spent_s student)" 'BEGIN { printf "%.2f", b - s / 60 - 1 }')
if ! grep -q '^student_done' "$CLOCK"; then
  awk -v m="$student_min" 'BEGIN { exit !(m > 0) }' \
    || die "no time left for the student: $(spent_s student) s of the ${BUDGET_MIN} min budget spent before it"
  say "student: $student_min minutes of training ($(spent_s student) s of the budget spent before it)"
  start student; "${student[@]}" 'stages=[train]' train.max_time="$student_min" || exit $?; stop
  echo "student_done 0" >> "$CLOCK"
fi
"${student[@]}" 'stages=[translate,score]' || exit $?
awk '{ t[$1] += $2 } END { printf "DISTILL"; n = split("teachers distill student_prep student", k, " ")
  for (i = 1; i <= n; i++) { printf " %s_min=%.1f", k[i], t[k[i]] / 60; s += t[k[i]] }
  printf " total_min=%.1f\n", s / 60 }' "$CLOCK" | tee "$W/summary.txt"
