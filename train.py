#!/usr/bin/env python
"""Train a Whisper model from scratch. Every flag is a field of whisper_scratch.trainer.TrainOptions.

    python train.py --local-data-dir cv-corpus-16.1 --whisper-size tiny --output-dir OUT
    torchrun --nproc_per_node 2 train.py ...        # several GPUs (DDP)
"""
import sys

from whisper_scratch.config import parse_options
from whisper_scratch.trainer import TrainOptions, train


def main(argv=None) -> int:
    opts = parse_options(TrainOptions, argv)
    train(opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
