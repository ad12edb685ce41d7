"""Real-time factor of the data front end on one core: MP3 decode + resample + log-mel, with and
without the on-disk feature cache, on Common-Voice-like clips (48 kHz mono MP3, ~5 s).

    python bench/data_pipeline.py [--clips 40]

Prints audio seconds processed per wall second per core (higher is better) and the cache's ratio.
Both runs happen in this process on the same files, so the ratio is robust to machine noise.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from whisper_scratch import audio as A  # noqa: E402
from whisper_scratch.data import FeatureCache  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_clips(folder: Path, n: int) -> list:
    """Cut real speech (JFK + LDC93S1 + speechbrain clips) into ~5 s 48 kHz MP3s."""
    speech = np.concatenate([A.load_audio(p) for p in sorted((SHARED / "samples").rglob("*.wav"))])
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sec = rng.uniform(3.5, 7.0)
        start = rng.integers(0, len(speech) - int(sec * 16000))
        clip = soxr.resample(speech[start:start + int(sec * 16000)], 16000, 48000)
        path = folder / f"clip_{i:03d}.mp3"
        sf.write(path, clip, 48000, format="MP3", subtype="MPEG_LAYER_III")
        paths.append(str(path))
    return paths


def run(paths, fn) -> float:
    t0 = time.perf_counter()
    for p in paths:
        fn(p)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clips", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)  # per core: DataLoader workers each use one
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_clips(Path(tmp), args.clips)
        audio_s = sum(A.audio_duration(p) for p in paths)
        decode = run(paths, A.load_audio)
        full = run(paths, lambda p: A.log_mel_spectrogram(A.load_audio(p)))
        cache = FeatureCache(Path(tmp) / "cache", 80)
        fill = run(paths, cache.get)
        warm = run(paths, cache.get)
    print(f"{len(paths)} MP3 clips (48 kHz), {audio_s:.1f} s of audio, 1 thread")
    print(f"{'stage':38s} {'seconds':>8s} {'audio s / s':>12s}")
    for name, t in [("decode + resample", decode), ("decode + resample + log-mel", full),
                    ("cache fill (compute + write fp16)", fill), ("cache hit (read fp16)", warm)]:
        print(f"{name:38s} {t:8.3f} {audio_s / t:12.0f}")
    print(f"feature cache speed-up over computing: {full / warm:.1f}x")
    print(f"one core feeds {audio_s / full:.0f}x real time uncached, {audio_s / warm:.0f}x cached")


if __name__ == "__main__":
    main()
