#!/usr/bin/env bash
# bash recipes/bench/faults.sh [WORKDIR]
# Reruns, as a user would (the installed mt-train / mt-translate, from an empty folder), each fault
# that issue 12 lists, and prints every command with its exit code and the last line it wrote to
# stderr. The default recipe (Multi30k en->de, the built-in corpus), a few steps each. Needs root
# for the full-disk case (a 512 MB tmpfs); skipped otherwise.
set -u
W=${1:-$(mktemp -d)}
mkdir -p "$W" && cd "$W" || exit 1
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
SHORT="stages=[prepare,tokenizer,train] train.valid_every=10 train.valid_max_sentences=50 train.log_every=5"

show() {  # show CMD...: run it, print the command, its exit code and its last stderr line
    "$@" > out.txt 2> err.txt
    local rc=$?
    echo "\$ ${*}"
    echo "  exit $rc; stderr's last line: $(tail -n 1 err.txt)"
    echo "  tracebacks: $(grep -c Traceback err.txt)"
}
finite() {  # finite RUN: the step and finiteness of every checkpoint of runs/RUN
    python - "$1" <<'EOF'
import sys, pathlib
from mt import checkpoint as c
for p in sorted(pathlib.Path("runs", sys.argv[1], "checkpoints").glob("*.pt")):
    s = c.load(p)
    print(f"  {p}: step {s['step']}, non-finite tensor: {c.first_nonfinite(s['model'])}")
EOF
}

echo "== NaN: a huge lr, new run; then a good run resumed with it"
show mt-train name=nan train.lr=1e30 $SHORT train.max_steps=30
finite nan
show mt-train name=good $SHORT train.max_steps=20
show mt-train name=good $SHORT train.max_steps=40 train.lr=1e30
finite good

echo "== a corrupt last.pt; then last.pt and step files deleted; then force=true"
show mt-train name=corrupt $SHORT train.max_steps=30
head -c 100000 runs/corrupt/checkpoints/last.pt > t && mv t runs/corrupt/checkpoints/last.pt
show mt-train name=corrupt $SHORT train.max_steps=40
grep -E "WARNING|resumed" runs/corrupt/mt.log | tail -n 2
rm runs/corrupt/checkpoints/last.pt runs/corrupt/checkpoints/step_*.pt
show mt-train name=corrupt $SHORT train.max_steps=40
show mt-train name=corrupt $SHORT train.max_steps=10 force=true
ls runs/corrupt/old/*/

echo "== Ctrl-C and SIGTERM mid-run, then resume; orphan temp files; metrics.jsonl rows"
show timeout --preserve-status -s INT 45 mt-train name=sig $SHORT train.max_steps=100000
show timeout --preserve-status -s TERM 45 mt-train name=sig $SHORT train.max_steps=100000
touch runs/sig/checkpoints/.last.pt.orphan.tmp
show mt-train name=sig $SHORT train.max_steps=$(( $(python -c "from mt import checkpoint as c; print(c.load('runs/sig/checkpoints/last.pt')['step'])") + 5 ))
grep -E "removed|resumed" runs/sig/mt.log | tail -n 3
python -c "
import json, collections
rows = [json.loads(l) for l in open('runs/sig/metrics.jsonl')]
n = collections.Counter((r['kind'], r['step']) for r in rows)
print('  metrics.jsonl rows:', len(rows), 'steps written twice:', sum(v > 1 for v in n.values()))"

echo "== a full disk"
if [ "$(id -u)" = 0 ] && mkdir -p disk && mount -t tmpfs -o size=512m tmpfs disk; then
    show mt-train name=full hydra.run.dir=disk/run $SHORT train.max_steps=10
    python -c "import os; s = os.statvfs('disk'); f = os.open('disk/filler', os.O_CREAT | os.O_WRONLY); os.posix_fallocate(f, 0, s.f_bavail * s.f_frsize - 65536)"
    show mt-train name=full hydra.run.dir=disk/run $SHORT train.max_steps=20
    ls -a disk/run/checkpoints
    python -c "from mt import checkpoint as c; print('  last.pt loads, step', c.load('disk/run/checkpoints/last.pt')['step'])"
    umount disk
else
    echo "  (skipped: needs root and tmpfs)"
fi

echo "== precision=auto, decided once"
show mt-train name=prec $SHORT train.max_steps=10 train.precision=auto
show mt-train name=prec $SHORT train.max_steps=20 train.precision=auto
grep -E "precision" runs/prec/mt.log | tail -n 3

echo "== values refused at composition"
for kv in train.valid_every=0 train.log_every=0 train.accum_steps=0 tokenizer.vocab_size=0 train.max_len=0 \
          train.lr=0 model.dropout=1.5 train.label_smoothing=1 decode.top_p=0 decode.temperature=0; do
    show mt-train name=v "$kv"
done

echo "== data"
mkdir -p blank zero gz
printf '\n\n\n\n' > blank/train.en; cp blank/train.en blank/train.de
: > zero/train.en; : > zero/train.de
for d in blank zero; do for s in valid test2016; do for l in en de; do echo "a b" > $d/$s.$l; done; done; done
python -c "import gzip; z = gzip.compress('\n'.join(f'{i} b' for i in range(50000)).encode()); open('gz/train.en.gz', 'wb').write(z[:len(z) // 2])"
for l in de; do python -c "import gzip; open('gz/train.de.gz','wb').write(gzip.compress(b'a b\n' * 5000))"; done
for s in valid test2016; do for l in en de; do echo "a b" > gz/$s.$l; done; done
for d in blank zero gz; do show mt-train name=$d data.path=$PWD/$d "stages=[prepare,tokenizer]"; done

echo "== mt-translate on a checkpoint at odds with its config"
python - <<'EOF'
from mt import checkpoint as c
s = c.load("runs/good/checkpoints/best.pt")
s["model_config"]["dec_hidden"] = 256
c.save(s, "bad.pt")
EOF
echo "A dog runs." > in.txt
show mt-translate -m bad.pt -i in.txt
echo "(work folder: $W)"
