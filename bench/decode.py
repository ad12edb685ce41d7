"""Decoding speed on this machine's CPU: one file at a time vs batched across files.

16 clips of ~5 s (4.5-5.5 s, cut from the real speech in shared/data/samples) are transcribed
with a randomly initialised `mini` model (d 256, 4+4 layers) and a Mongolian character
vocabulary, greedy and beam 5, first one by one (`transcribe`, as --mode directory does) then
in one batch (`transcribe_files`, as --mode batch does). A random model has no reason to stop,
so <|endoftext|> is made unreachable (`never_stop`) and every clip decodes --max_new_tokens
tokens (default 64, about the characters of 5 s of speech). Temperature fallback is off: both modes
must do the same work. Prints the real-time factor (processing seconds / audio seconds) and
the speed-up.

    python bench/decode.py [--threads 2] [--max_new_tokens 64] [--beam_size 5]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from whisper_scratch.audio import SAMPLE_RATE, load_audio  # noqa: E402
from whisper_scratch.decoding import NO_FALLBACK, DecodingOptions  # noqa: E402
from whisper_scratch.longform import transcribe, transcribe_files  # noqa: E402
from whisper_scratch.model import Whisper, preset_dims  # noqa: E402
from whisper_scratch.tokenizer import CharTokenizer  # noqa: E402

SHARED = Path(os.environ.get("WHISPER_SCRATCH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MN_LETTERS = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяөү"


def never_stop(model: Whisper, eot: int) -> None:
    """Make <|endoftext|> unreachable: logit = (g * norm(x) + b) · e_eot ≈ -30 ± 10 with |b| = 3
    and e_eot = -10 b / |b|; other logits stay O(1). Every implementation sees these weights."""
    g = torch.Generator().manual_seed(1)
    u = torch.randn(model.dims.n_text_state, generator=g)
    u /= u.norm()
    with torch.no_grad():
        model.decoder.ln.bias.copy_(3 * u)
        model.decoder.token_embedding.weight[eot] = -10 * u


def random_model(size: str, threads: int) -> tuple:
    """(tokenizer, model): a seeded random `size` model with a Mongolian character vocabulary
    that never stops (never_stop), on `threads` CPU threads."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = CharTokenizer(MN_LETTERS)
    model = Whisper(preset_dims(size, n_vocab=tok.vocab_size)).eval()
    never_stop(model, tok.eot)
    return tok, model


def speech_stream() -> np.ndarray:
    """Every sample file's speech, 16 kHz, one after another: what the benches cut clips from."""
    files = sorted((SHARED / "data" / "samples").rglob("*.wav"))
    if not files:
        raise SystemExit(f"error: no .wav files under {SHARED / 'data' / 'samples'} to cut the clips from "
                         f"(set WHISPER_SCRATCH_SHARED to the shared folder)")
    return np.concatenate([load_audio(f) for f in files])


def make_clips(folder: Path, n: int = 16, seed: int = 0) -> list:
    """Cut n clips of 4.5-5.5 s from the concatenated sample speech; write them as 16 kHz wav."""
    stream = speech_stream()
    rng = np.random.default_rng(seed)
    paths, start = [], 0
    for i in range(n):
        length = int(rng.uniform(4.5, 5.5) * SAMPLE_RATE)
        if start + length > len(stream):
            start = 0
        path = folder / f"clip{i:02d}.wav"
        sf.write(path, stream[start:start + length], SAMPLE_RATE)
        paths.append(path)
        start += length
    return paths


def bench(model, tok, paths, options, batch_size) -> float:
    """Seconds to transcribe every path: one by one (batch_size 1) or in batches."""
    t0 = time.perf_counter()
    if batch_size == 1:
        out = [transcribe(model, p, tok, options, NO_FALLBACK) for p in paths]
    else:
        out = [r for _, r in transcribe_files(model, paths, tok, options, NO_FALLBACK, batch_size)]
    elapsed = time.perf_counter() - t0
    assert all(isinstance(r, dict) for r in out), out
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--beam_size", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per setting")
    args = ap.parse_args()
    tok, model = random_model("mini", args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_clips(Path(tmp))
        audio_s = sum(sf.info(str(p)).duration for p in paths)
        print(f"{len(paths)} clips, {audio_s:.1f} s of audio (mean {audio_s / len(paths):.2f} s); model mini "
              f"({model.num_parameters() / 1e6:.1f} M params), {args.threads} threads, "
              f"{args.max_new_tokens} tokens per clip, torch {torch.__version__}")
        bench(model, tok, paths[:2], DecodingOptions(max_new_tokens=4), 2)  # warm-up
        print(f"{'search':<8} {'one-by-one RTF':>15} {'batched RTF':>12} {'speed-up':>9}")
        for name, beam in (("greedy", 1), (f"beam {args.beam_size}", args.beam_size)):
            options = DecodingOptions(beam_size=beam, max_new_tokens=args.max_new_tokens, loop_span=0)  # every token (a random model loops)
            single = min(bench(model, tok, paths, options, 1) for _ in range(args.repeats))
            batched = min(bench(model, tok, paths, options, len(paths)) for _ in range(args.repeats))
            print(f"{name:<8} {single / audio_s:>15.4f} {batched / audio_s:>12.4f} {single / batched:>8.2f}x")


if __name__ == "__main__":
    main()
