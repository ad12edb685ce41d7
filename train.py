#!/usr/bin/env python
"""Train a Whisper model from scratch. Every flag is a field of whisper_scratch.trainer.TrainOptions.

    python train.py --local-data-dir cv-corpus-16.1 --whisper-size tiny --output-dir OUT
    torchrun --nproc_per_node 2 train.py ...        # several GPUs (DDP)
"""
import sys

from whisper_scratch.audio import one_line_audio_warnings
from whisper_scratch.checkpoint import CheckpointError, CheckpointWriteError
from whisper_scratch.config import parse_options
from whisper_scratch.trainer import TrainOptions, train


def main(argv=None) -> int:
    opts = parse_options(TrainOptions, argv)
    one_line_audio_warnings("train.py")
    try:
        result = train(opts)
    except KeyboardInterrupt:  # the second Ctrl-C: stop at once, as asked
        print("train.py: interrupted; no checkpoint written for this step (--resume continues from the last saved "
              "one, if there is one)", file=sys.stderr)
        return 130
    except CheckpointError as e:  # --resume on a file that is not a loadable checkpoint
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except CheckpointWriteError as e:  # disk full: say so and where, the last good checkpoint is intact
        print(f"train.py: error: {e.strerror}", file=sys.stderr)
        return 1
    return 130 if result.get("interrupted") else 0  # stopped by Ctrl-C: `train.py && transcribe.py` stops too


if __name__ == "__main__":
    sys.exit(main())
