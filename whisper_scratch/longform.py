"""Audio files -> transcripts: one file of any length cut into windows, each decoded with
`decoding.decode_with_fallback` and the previous text as prompt; many files batched by duration.

The cut is `fixed_windows` (consecutive 30 s windows: this vocabulary has no timestamp tokens);
any segmentation that yields spans of at most one window, voice activity for one, can replace it.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .audio import (FRAMES_PER_SECOND, N_FRAMES, SAMPLE_RATE, AudioError, audio_duration, load_audio,
                    log_mel_spectrogram)
from .alignment import segment_words
from .decoding import DecodingOptions, DecodingResult, FallbackOptions, decode_with_fallback
from .model import Whisper
from .tokenizer import Tokenizer


def window_frames(model: Whisper) -> int:
    """Frames per long-form window: 30 s, or less for a model with a shorter encoder context."""
    return min(N_FRAMES, 2 * model.dims.n_audio_ctx)


def fixed_windows(n_frames: int, window: int) -> Iterator[Tuple[int, int]]:
    """(first frame, end frame) of consecutive windows of `window` frames from the start of the
    file; the last end may lie past n_frames (the last window is shorter)."""
    for seek in range(0, n_frames, window):
        yield seek, seek + window


# -- one file of any length --------------------------------------------------------------------

def transcribe(model: Whisper, audio: Union[str, Path, np.ndarray, Tensor], tokenizer: Tokenizer,
               options: DecodingOptions = DecodingOptions(), fallback: FallbackOptions = FallbackOptions(),
               condition_on_previous_text: bool = True, word_timestamps: bool = False) -> dict:
    """Transcribe a file or 16 kHz waveform of any length, window by window.

    Windows are fixed (30 s) since this vocabulary has no timestamp tokens; each is decoded with
    the previous windows' text as prompt (<|startofprev|> ...), reset after a window decoded at a
    temperature above 0.5 (likely garbage, as openai-whisper). The last window is shorter and
    decoded at its own length. Returns {text, segments: [{id, seek, start, end, text, ...}], ...};
    with word_timestamps, each segment also has `words` (alignment.segment_words).
    """
    if isinstance(audio, (str, Path)):
        audio = load_audio(audio)
    n_samples = audio.shape[-1]
    mel = log_mel_spectrogram(audio, model.dims.n_mels)  # whole file: one dynamic-range floor
    duration = n_samples / SAMPLE_RATE
    segments: list = []
    history: list = []  # texts since the last prompt reset
    for seek, stop in fixed_windows(mel.shape[-1], window_frames(model)):
        chunk = mel[None, :, seek:stop]
        prompt = tokenizer.encode(" ".join(history)) if condition_on_previous_text and history else []
        opts = replace(options, prompt=tuple(prompt))
        r = decode_with_fallback(model, chunk, torch.tensor([chunk.shape[-1]]), tokenizer, opts, fallback)[0]
        end = min(stop / FRAMES_PER_SECOND, duration)
        segments.append(_segment(len(segments), seek, seek / FRAMES_PER_SECOND, end, r))
        if word_timestamps:
            segments[-1].update(segment_words(model, tokenizer, chunk[0], r.tokens, segments[-1]["start"]))
        history = [] if r.temperature > 0.5 else (history + [r.text] if r.text else history)
    return _transcript(segments, tokenizer, options, duration)


def _segment(i: int, seek: int, start: float, end: float, r: DecodingResult) -> dict:
    return {"id": i, "seek": seek, "start": round(start, 3), "end": round(end, 3), "text": r.text,
            "tokens": r.tokens, "temperature": r.temperature, "avg_logprob": r.avg_logprob,
            "compression_ratio": r.compression_ratio}


def _transcript(segments: list, tokenizer: Tokenizer, options: DecodingOptions, duration: float) -> dict:
    text = " ".join(s["text"] for s in segments if s["text"])
    return {"text": text, "segments": segments, "language": options.language or tokenizer.languages[0],
            "duration": round(duration, 3)}


# -- many files: batched across files ----------------------------------------------------------

def transcribe_files(model: Whisper, paths: Sequence[Union[str, Path]], tokenizer: Tokenizer,
                     options: DecodingOptions = DecodingOptions(), fallback: FallbackOptions = FallbackOptions(),
                     batch_size: int = 16, condition_on_previous_text: bool = True,
                     word_timestamps: bool = False) -> Iterator[Tuple[str, Union[dict, Exception]]]:
    """Yield (path, transcript or the error) for every file, decoding files of at most one window
    in batches sorted by duration (longest first, so memory limits show at once), each batch
    padded to its longest file. Longer files go through `transcribe` one by one afterwards.
    A result equals `transcribe(model, path, ...)` of that file alone (up to float rounding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    window_s = window_frames(model) / FRAMES_PER_SECOND
    timed, long = [], []
    for p in paths:
        try:
            d = audio_duration(p)
        except AudioError as e:
            yield str(p), e
            continue
        if d <= window_s:
            timed.append((d, str(p)))
        else:
            long.append(str(p))
    timed.sort(key=lambda x: -x[0])
    for start in range(0, len(timed), batch_size):
        batch = [p for _, p in timed[start:start + batch_size]]
        yield from _transcribe_batch(model, batch, tokenizer, options, fallback, long, word_timestamps)
    for p in long:
        try:
            yield p, transcribe(model, p, tokenizer, options, fallback, condition_on_previous_text, word_timestamps)
        except (AudioError, ValueError) as e:
            yield p, e


def _transcribe_batch(model, paths, tokenizer, options, fallback, long: list, word_timestamps: bool = False):
    """Load, featurise (each file alone, so features match `transcribe`), pad, decode one batch."""
    mels, ok, durations = [], [], []
    for p in paths:
        try:
            audio = load_audio(p)
            mel = log_mel_spectrogram(audio, model.dims.n_mels)
        except (AudioError, ValueError) as e:
            yield p, e
            continue
        if mel.shape[-1] > window_frames(model):  # header said shorter than the decoded audio
            long.append(p)
            continue
        mels.append(mel)
        ok.append(p)
        durations.append(len(audio) / SAMPLE_RATE)
    if not ok:
        return
    lens = torch.tensor([m.shape[-1] for m in mels])
    batch = torch.stack([F.pad(m, (0, int(lens.max()) - m.shape[-1])) for m in mels])
    results = decode_with_fallback(model, batch, lens, tokenizer, options, fallback)
    for p, mel, duration, r in zip(ok, mels, durations, results):
        segment = _segment(0, 0, 0.0, duration, r)
        if word_timestamps:
            segment.update(segment_words(model, tokenizer, mel, r.tokens, 0.0))
        yield p, _transcript([segment], tokenizer, options, duration)
