"""Audio -> speech chunks: silero-vad's speech regions, merged into chunks no longer than the
clips a model was trained on, cut at the longest pauses.

A model trained on 1-10 s clips decodes 30 s windows badly (an input length it never saw, words
cut at the window edge, more tokens than the decoding budget); chunks of speech of training length
are what it knows, and the variable-length encoder decodes them in one batch with no padding.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .audio import SAMPLE_RATE
from .config import option, require

Span = Tuple[int, int]  # [start, end) in samples


@dataclass(frozen=True)
class VadOptions:
    """How long audio is cut into chunks (transcribe.py's --vad* and --chunk_seconds flags)."""

    vad: bool = option(True, "cut audio longer than one chunk at pauses found by silero-vad; false: fixed 30 s "
                             "windows, each prompted with the text so far")
    chunk_seconds: Optional[float] = option(None, "longest chunk decoded at once (default: the longest clip the "
                                                  "model was trained on, saved in its checkpoint; else 30)")
    target_seconds: Optional[float] = option(None, "chunks longer than this are cut at their longest pause if it "
                                                   "is >= --split_pause_ms (default: the median training clip, "
                                                   "saved in the checkpoint)")
    split_pause_ms: int = option(300, "the shortest pause a chunk over --target_seconds is cut at")
    vad_threshold: float = option(0.5, "speech probability above which a 32 ms frame is speech")
    min_silence_ms: int = option(100, "a pause at least this long ends a speech region")
    min_speech_ms: int = option(250, "speech regions shorter than this are dropped")
    speech_pad_ms: int = option(50, "silence kept on each side of a speech region (a model trained on "
                                    "tightly cut clips misreads long leading silence)")

    def __post_init__(self):
        require(self.chunk_seconds is None or self.chunk_seconds >= 1,
                f"chunk_seconds must be >= 1, got {self.chunk_seconds}")
        require(self.target_seconds is None or self.target_seconds > 0,
                f"target_seconds must be > 0, got {self.target_seconds}")
        require(0 < self.vad_threshold < 1, f"vad_threshold must be in (0, 1), got {self.vad_threshold}")
        for name in ("min_silence_ms", "min_speech_ms", "speech_pad_ms", "split_pause_ms"):
            require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")


def with_checkpoint_chunks(vad: VadOptions, ckpt: dict) -> VadOptions:
    """vad with chunk_seconds = the longest clip the checkpoint was trained on and target_seconds
    = its median clip, where unset (a model should be fed inputs shaped like those it learned
    from); what the checkpoint does not record stays unset (chunks go up to one window)."""
    if not vad.vad:
        return vad
    if vad.chunk_seconds is None and ckpt.get("longest_clip_seconds") is not None:
        vad = replace(vad, chunk_seconds=max(1.0, float(ckpt["longest_clip_seconds"])))
    if vad.target_seconds is None and ckpt.get("median_clip_seconds") is not None:
        vad = replace(vad, target_seconds=float(ckpt["median_clip_seconds"]))
    return vad


_model = None
_lock = threading.Lock()  # the silero model keeps state between frames: one file at a time


def _silero():
    """The silero-vad model shipped in its wheel, loaded once. Importing silero_vad sets torch to
    one thread for the whole process; the caller's setting is put back."""
    global _model
    if _model is None:
        threads = torch.get_num_threads()
        try:
            from silero_vad import load_silero_vad
        except ImportError:
            raise RuntimeError("voice-activity segmentation needs silero-vad: pip install silero-vad "
                               "(or pass --vad false)") from None
        finally:
            torch.set_num_threads(threads)
        with warnings.catch_warnings():  # its loader uses APIs deprecated in torch and importlib
            warnings.simplefilter("ignore", DeprecationWarning)
            _model = load_silero_vad()
    return _model


FRAME = 512  # silero's frame at 16 kHz (32 ms)
# Silence before the audio (256 ms): silero misses speech that starts at once. Measured on all 2,500
# FSDD clips (tightly cut digits): with 8, 16 or 32 frames of it, 1 clip has no frame above 0.5.
# None is needed after: silero is causal (each frame's probability depends on the frames before
# it only; tested), so trailing silence would cost time and change nothing.
LEAD_IN = 8 * FRAME


def _row_samples(n: int) -> int:
    """Samples of a silero input row for n samples of audio: the lead-in and whole frames."""
    return LEAD_IN + -(-n // FRAME) * FRAME


def speech_probabilities(audio: np.ndarray) -> np.ndarray:
    """silero-vad's speech probability for every 512-sample (32 ms) frame of 16 kHz mono audio.
    The audio follows LEAD_IN of silence (without it, 18 of FSDD's 250 tightly cut test digits
    score below 0.5), whose frames are dropped."""
    return speech_probabilities_many([audio])[0]


def speech_probabilities_many(audios: Sequence[np.ndarray], max_samples: int = 32 * 30 * SAMPLE_RATE) -> list:
    """`speech_probabilities` of each audio, computed for several at once: silero keeps one state
    per row, so a batch (padded at the end) gives each row's own probabilities (to 1e-4) in
    about a quarter of the time on 2 cores. Batches hold similar lengths, at most max_samples."""
    out: list = [None] * len(audios)
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    batch: list = []
    for n, i in enumerate(order):
        batch.append(i)
        longest = _row_samples(len(audios[i]))
        last = n == len(order) - 1
        if last or (len(batch) + 1) * _row_samples(len(audios[order[n + 1]])) > max_samples:
            for j, probs in zip(batch, _silero_batch([audios[j] for j in batch], longest)):
                out[j] = probs
            batch = []
    return out


def chunk_samples(max_seconds: float) -> int:
    """Samples in a chunk of at most max_seconds: a file this long or shorter is decoded whole."""
    return int(max_seconds * SAMPLE_RATE)


PROBE = 32 * FRAME  # the first second: where a clip's speech starts (CV clips may open with more silence)


def chunking_probabilities(audios: Sequence[np.ndarray], max_seconds: float, threshold: float) -> list:
    """Per audio, the silero frame probabilities `speech_chunks` needs, for all at once. Audio
    longer than max_seconds is cut at its pauses: every frame. Shorter audio is decoded whole
    when any frame is speech, so its frames are scored only until that is known: its first
    second first (silero is causal, so those equal the whole pass's first frames), every frame
    only when that second holds none. On the server bench's 5 s clips silero scores a fifth of
    the frames it scored before."""
    out: list = [None] * len(audios)
    short = [i for i, a in enumerate(audios) if PROBE < len(a) <= chunk_samples(max_seconds)]
    for i, probs in zip(short, speech_probabilities_many([audios[i][:PROBE] for i in short])):
        if probs.max() >= threshold:
            out[i] = probs
    rest = [i for i, probs in enumerate(out) if probs is None]
    for i, probs in zip(rest, speech_probabilities_many([audios[i] for i in rest])):
        out[i] = probs
    return out


def _silero_batch(audios: list, length: int) -> list:
    rows = torch.zeros(len(audios), length)
    for r, audio in enumerate(audios):
        rows[r, LEAD_IN:LEAD_IN + len(audio)] = torch.as_tensor(np.asarray(audio, dtype=np.float32))
    # silero runs on the CPU in fp32 whatever precision the caller decodes in
    with _lock, torch.inference_mode(), torch.autocast("cpu", enabled=False):
        probs = _silero().audio_forward(rows, SAMPLE_RATE).float().numpy()
    first = LEAD_IN // FRAME
    return [p[first:first + -(-len(a) // FRAME)] for p, a in zip(probs, audios)]


def speech_regions(audio: np.ndarray, options: VadOptions = VadOptions(),
                   max_seconds: float = float("inf"), probs: Optional[np.ndarray] = None) -> List[Span]:
    """Speech regions of `audio` (padded by speech_pad_ms), none longer than max_seconds: silero
    splits a longer one at its longest inner pause, else at max_seconds."""
    from silero_vad import get_speech_timestamps_from_probs
    probs = speech_probabilities(audio) if probs is None else probs
    found = get_speech_timestamps_from_probs(
        probs.tolist(), sampling_rate=SAMPLE_RATE, threshold=options.vad_threshold,
        min_speech_duration_ms=options.min_speech_ms, max_speech_duration_s=max_seconds,
        min_silence_duration_ms=options.min_silence_ms, speech_pad_ms=options.speech_pad_ms,
        audio_length_samples=len(audio))
    return [(int(r["start"]), int(r["end"])) for r in found]


def merge_regions(regions: Sequence[Span], max_len: int, target_len: Optional[int] = None,
                  split_pause: int = 0) -> List[Span]:
    """Chunks of consecutive regions, each spanning at most max_len samples (pauses inside a
    chunk are kept, so the model hears them). Cut at the longest pause first, so a chunk ends
    where the speaker stopped longest. A chunk longer than target_len (the typical training
    clip) is also cut, at its longest pause if that is at least split_pause samples: a model
    trained on one sentence per clip decodes two sentences in one chunk worse than each alone.
    A single region longer than max_len is cut into equal parts (silero has already cut it at a
    pause where it found one)."""
    require(max_len >= 1, f"max_len must be >= 1, got {max_len}")
    regions = sorted(regions)
    if not regions:
        return []
    span = regions[-1][1] - regions[0][0]
    gaps = [regions[i + 1][0] - regions[i][1] for i in range(len(regions) - 1)]
    if span <= max_len and (target_len is None or span <= target_len or not gaps or max(gaps) < split_pause):
        return [(regions[0][0], regions[-1][1])]
    if not gaps:
        (a, b), = regions
        n = -(-(b - a) // max_len)
        edges = [a + (b - a) * i // n for i in range(n + 1)]
        return list(zip(edges[:-1], edges[1:]))
    cut = int(np.argmax(gaps)) + 1
    return (merge_regions(regions[:cut], max_len, target_len, split_pause)
            + merge_regions(regions[cut:], max_len, target_len, split_pause))


def speech_chunks(audio: np.ndarray, max_seconds: float, options: VadOptions = VadOptions(),
                  probs: Optional[np.ndarray] = None) -> List[Span]:
    """[start, end) sample spans to decode: the whole file when it is no longer than max_seconds
    and has any speech; else its speech regions merged into chunks of at most max_seconds.
    Audio with no frame above the threshold gives no chunk (silence is not decoded)."""
    probs = speech_probabilities(audio) if probs is None else probs
    if not len(probs) or probs.max() < options.vad_threshold:
        return []
    max_len = chunk_samples(max_seconds)
    if len(audio) <= max_len:
        return [(0, len(audio))]
    target = int(options.target_seconds * SAMPLE_RATE) if options.target_seconds else None
    return merge_regions(speech_regions(audio, options, max_seconds, probs), max_len, target,
                         int(options.split_pause_ms * SAMPLE_RATE / 1000))


def check_against_clips(chunks: Sequence[Span], offsets: Sequence[int], clips: Sequence[np.ndarray],
                        margin_s: float = 0.1) -> List[Tuple[float, list]]:
    """For a recording joined from `clips` (clip i starting at sample offsets[i]): per clip, the
    share of its speech (silero on the clip alone, unpadded) that the chunks keep, and the chunk
    edges (samples) that fall inside that speech, more than margin_s from its region edges
    (silero's 32 ms frames make edges inexact). Used by the tests and bench/long_audio.py."""
    margin, report = int(margin_s * SAMPLE_RATE), []
    for offset, clip in zip(offsets, clips):
        speech = [(offset + a, offset + b) for a, b in speech_regions(clip, VadOptions(speech_pad_ms=0))]
        total = sum(b - a for a, b in speech)
        kept = sum(max(0, min(b, y) - max(a, x)) for a, b in speech for x, y in chunks)
        inside = [e for x, y in chunks for e in (x, y) for a, b in speech if a + margin < e < b - margin]
        report.append((kept / total if total else float("nan"), inside))
    return report
