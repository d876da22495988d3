#!/usr/bin/env bash
# before/after of this session's speed changes, interleaved: old = /tmp/ab_old (commit before them), new = /work/main
set -u
OUT=/work/main/runs/ab-$(date +%H%M); mkdir -p $OUT
PY=/work/main/.venv/bin/python
for r in 1 2; do
  for v in old new; do
    d=$([ $v = old ] && echo /tmp/ab_old || echo /work/main)
    (cd $d && PYTHONPATH=$d $PY -m mt.bench --dir /work/main/runs/.bench --phases train,1:64,5:64 --train-steps 40 --warmup 10 \
       --out $OUT/${v}_$r.json > $OUT/${v}_$r.txt 2> $OUT/${v}_$r.err)
    echo "$v $r: $(grep -E 'target_tokens_per_s|batch64.sentences_per_s' $OUT/${v}_$r.txt | tr '\n' ' ')"
  done
done
