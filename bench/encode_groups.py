"""Encoding a batch of mixed lengths: padded to its longest (as before 2026-12-05) vs in groups of
similar length (`decoding.encode`, each group trimmed to its longest, at most 20 % padding).

A server's batch holds whatever requests arrived together, so its clips differ in length. --batches
batches of 16 clips of 1.5-10 s (cut from the real speech in shared/data/samples; their order is
the arrival order, not sorted) go through a seeded random encoder of --size, both ways, alternating,
--repeats times. Checks that every row's output agrees, prints the best and median time of each and
the ratio (padded / groups).

    python bench/encode_groups.py [--size mini] [--threads 2] [--batches 4] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import speech_stream  # noqa: E402  (bench/decode.py: the same sample speech)
from whisper_scratch.audio import SAMPLE_RATE, log_mel_spectrogram  # noqa: E402
from whisper_scratch.decoding import encode, length_groups  # noqa: E402
from whisper_scratch.model import Whisper, preset_dims  # noqa: E402



def mixed_batches(n_batches: int, n_mels: int, seed: int = 0) -> list:
    """[(mel (16, n_mels, T) padded, lens (16,))]: clips of 1.5-10 s in arrival order."""
    stream = speech_stream()
    rng = np.random.default_rng(seed)
    batches, start = [], 0
    for _ in range(n_batches):
        mels = []
        for _ in range(16):
            n = int(rng.uniform(1.5, 10.0) * SAMPLE_RATE)
            start = 0 if start + n > len(stream) else start
            mels.append(log_mel_spectrogram(stream[start:start + n], n_mels))
            start += n
        lens = torch.tensor([m.shape[-1] for m in mels])
        batches.append((torch.stack([F.pad(m, (0, int(lens.max()) - m.shape[-1])) for m in mels]), lens))
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="mini")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Whisper(preset_dims(args.size, n_vocab=64)).eval()
    batches = mixed_batches(args.batches, model.dims.n_mels)
    frames = sum(int(lens.sum()) for _, lens in batches)
    padded = sum(int(lens.max()) * len(lens) for _, lens in batches)
    groups = [len(length_groups(lens.tolist())) for _, lens in batches]
    print(f"{args.batches} batches of 16 clips (1.5-10 s), {args.size} encoder, {args.threads} threads: "
          f"{frames} frames, {padded} padded to each batch's longest; groups per batch {groups}")
    runs = {"padded to the longest": lambda x, lens: model.encoder(x, lens),
            "groups of similar length": lambda x, lens: encode(model, x, lens)[0]}
    times: dict = {name: [] for name in runs}
    with torch.inference_mode():
        for x, lens in batches:  # the same outputs, row by row, up to float rounding
            a, b = (fn(x, lens) for fn in runs.values())
            for row, n in enumerate(((lens + 1) // 2).tolist()):
                err = (a[row, :n] - b[row, :n]).abs().max().item()
                assert err < 1e-3, f"row {row}: outputs differ by {err}"
        for _ in range(args.repeats):
            for name, fn in runs.items():
                t = time.perf_counter()
                for x, lens in batches:
                    fn(x, lens)
                times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:<26} best {1000 * min(ts):7.0f} ms   median {1000 * sorted(ts)[len(ts) // 2]:7.0f} ms")
    ratio = min(times["padded to the longest"]) / min(times["groups of similar length"])
    print(f"groups are {ratio:.2f}x faster (best of {args.repeats})")


if __name__ == "__main__":
    main()
