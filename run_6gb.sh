#!/usr/bin/env bash
# Train on one 6 GB GPU: tiny-sized budgets: fp16 with GradScaler, 240 padded seconds per batch.
# run_6gb.sh and run_6gb_lowmem.sh differ only in the memory flags: diff them to see the trade-offs.
#   DATA_DIR=~/cv-corpus-16.1 ./run_6gb.sh [extra train.py flags]      (WHISPER_SIZE=tiny|small|base)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh requirements.txt
# plain AdamW: no extra package needed
DATA_DIR="${DATA_DIR:?set DATA_DIR to a Common Voice folder, e.g. DATA_DIR=~/cv-corpus-16.1}"
"$PY" train.py --local-data-dir "$DATA_DIR" --language mn --train-split validated \
    --output-dir "${OUT:-whisper-mongolian-from-scratch}" --tokenizer char --ctc-weight 0.3 --spec-augment \
    --learning-rate 5e-4 --warmup-steps 1000 --num-epochs 50 --eval-every 2000 --num-workers 4 --pad-adapt-steps 2000 \
    --whisper-size "${WHISPER_SIZE:-tiny}" --dtype fp16 --max-batch-seconds 240 --grad-accum 1 --eval-batch-size 16 \
    "$@"
