#!/usr/bin/env bash
# Train on one 6 GB GPU: the lowest memory: fp16, 60 padded s per micro-batch x 4 accumulated (same 240 s step), gradient checkpointing, 8-bit AdamW.
# run_6gb.sh and run_6gb_lowmem.sh differ only in the memory flags: diff them to see the trade-offs.
#   DATA_DIR=~/cv-corpus-16.1 ./run_6gb_lowmem.sh [extra train.py flags]      (WHISPER_SIZE=tiny|small|base)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh requirements.txt
"$PY" -m pip install -q --disable-pip-version-check bitsandbytes==0.49.0  # 8-bit AdamW (CUDA only)
DATA_DIR="${DATA_DIR:?set DATA_DIR to a Common Voice folder, e.g. DATA_DIR=~/cv-corpus-16.1}"
"$PY" train.py --local-data-dir "$DATA_DIR" --language mn --train-split validated \
    --output-dir "${OUT:-whisper-mongolian-from-scratch}" --tokenizer char --ctc-weight 0.3 --spec-augment \
    --learning-rate 5e-4 --warmup-steps 1000 --num-epochs 50 --eval-every 2000 --num-workers 4 --pad-adapt-steps 2000 \
    --whisper-size "${WHISPER_SIZE:-small}" --dtype fp16 --max-batch-seconds 60 --grad-accum 4 --eval-batch-size 8 --grad-checkpointing --optimizer adamw8bit \
    "$@"
