"""What `--pad-adapt-steps` costs: seconds per training step with a padded share against a plain
step, on the same data, model and flags, in one command (the two alternate, so a noisy machine
slows both alike).

Builds the `./run.sh` CPU demo's trainer (mini, 80 s batches, CTC 0.3) on a corpus, then runs
--steps steps of each kind, alternating, and prints the median seconds of each, their ratio, and
what a recipe of S scheduled steps plus A adaptation steps costs against S plain steps:
(S + A × ratio) / S.

    python bench/pad_adapt_cost.py --data data/synth_mn --steps 20 --schedule 800 --adapt 150
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from whisper_scratch.trainer import Trainer, TrainOptions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--language", default="mn")
    ap.add_argument("--steps", type=int, default=20, help="steps of each kind")
    ap.add_argument("--schedule", type=int, default=800, help="S: the recipe's scheduled steps")
    ap.add_argument("--adapt", type=int, default=150, help="A: the recipe's --pad-adapt-steps")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        opts = TrainOptions(local_data_dir=args.data, language=args.language, output_dir=tmp, tokenizer="char",
                            whisper_size="mini", max_batch_seconds=80, learning_rate=2e-3, warmup_steps=150,
                            ctc_weight=0.3, max_steps=10 ** 6, num_workers=0, progress=False)
        t = Trainer(opts)
        times = {"plain": [], "adapting": []}
        batches = t.epoch_steps()
        for i in range(2 * args.steps + 2):
            kind = "adapting" if i % 2 else "plain"
            t.schedule_steps = 0 if kind == "adapting" else 10 ** 6  # the phase maybe_pad_to_window sees
            batch = next(batches)  # (micro-batches, consumed, partial), padded per the phase above
            # epoch_steps pads when it yields, so the phase must be set before asking for the batch
            start = time.perf_counter()
            t.step(batch[0])
            if i >= 2:  # the first of each kind warms up allocators and threads
                times[kind].append(time.perf_counter() - start)
            t.state.step += 1
    plain, adapting = (statistics.median(times[k]) for k in ("plain", "adapting"))
    ratio = adapting / plain
    print(f"median s/step over {args.steps} steps each: plain {plain:.2f}, with a padded share {adapting:.2f}: "
          f"ratio {ratio:.2f}")
    print(f"recipe {args.schedule} + {args.adapt} adaptation steps costs "
          f"{(args.schedule + args.adapt * ratio) / args.schedule:.2f}× {args.schedule} plain steps")


if __name__ == "__main__":
    main()
