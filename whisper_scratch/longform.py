"""Audio files -> transcripts, in two ways:

- voice-activity chunks (`transcribe_chunks`, the default for transcribe.py and the server): each
  file cut by vad.speech_chunks into speech of at most the training clip length, the chunks of
  many files decoded together, sorted by length, with real start/end times; silence gives no text;
- fixed windows (`transcribe` without vad): consecutive 30 s windows, each prompted with the text
  so far (this vocabulary has no timestamp tokens to cut at).
"""
from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Hashable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .audio import (FRAMES_PER_SECOND, HOP_LENGTH, N_FRAMES, SAMPLE_RATE, AudioError, audio_duration, load_audio,
                    log_mel_spectrogram)
from .alignment import aligned_words, ctc_log_probs, segment_words
from .decoding import (DecodingOptions, DecodingResult, FallbackOptions, GreedyStream, decode_with_fallback, encode,
                       encode_for_fallback, fall_back, fallback_stages, needs_fallback, utterance_seeds)
from .model import Whisper
from .tokenizer import Tokenizer
from .vad import FRAME, VadOptions, chunking_probabilities, speech_chunks

Source = Union[str, Path, np.ndarray, Tensor]  # a file, or 16 kHz mono samples


def window_frames(model: Whisper) -> int:
    """Frames per long-form window: 30 s, or less for a model with a shorter encoder context."""
    return min(N_FRAMES, 2 * model.dims.n_audio_ctx)


def fixed_windows(n_frames: int, window: int) -> Iterator[Tuple[int, int]]:
    """(first frame, end frame) of consecutive windows of `window` frames from the start of the
    file; the last end may lie past n_frames (the last window is shorter)."""
    for seek in range(0, n_frames, window):
        yield seek, seek + window


# -- one file of any length --------------------------------------------------------------------

def transcribe(model: Whisper, audio: Source, tokenizer: Tokenizer,
               options: DecodingOptions = DecodingOptions(), fallback: FallbackOptions = FallbackOptions(),
               condition_on_previous_text: bool = True, word_timestamps: bool = False,
               vad: Optional[VadOptions] = None, batch_size: int = 16) -> dict:
    """Transcribe a file or 16 kHz waveform of any length.

    With `vad` (and vad.vad true): speech chunks decoded in batches (`transcribe_chunks`).
    Without: fixed 30 s windows, since this vocabulary has no timestamp tokens; each is decoded
    with the previous windows' text as prompt (<|startofprev|> ...), reset after a window decoded
    at a temperature above 0.5 (likely garbage, as openai-whisper). The last window is shorter and
    decoded at its own length. Returns {text, segments: [{id, seek, start, end, text, ...}], ...};
    with word_timestamps, each segment also has `words` (alignment.segment_words).
    """
    if vad is not None and vad.vad:
        _, result = next(transcribe_chunks(model, [(0, audio)], tokenizer, options, fallback, vad, batch_size,
                                           word_timestamps))
        if isinstance(result, Exception):
            raise result
        return result
    if isinstance(audio, (str, Path)):
        audio = load_audio(audio)
    n_samples = audio.shape[-1]
    mel = log_mel_spectrogram(audio, model.dims.n_mels)  # whole file: one dynamic-range floor
    duration = n_samples / SAMPLE_RATE
    segments: list = []
    history: list = []  # texts since the last prompt reset
    for seek, stop in fixed_windows(mel.shape[-1], window_frames(model)):
        if is_digital_silence(audio[seek * HOP_LENGTH: stop * HOP_LENGTH]):
            continue  # nothing to hear, and a model trained on speech would read a word into it
        chunk = mel[None, :, seek:stop]
        prompt = tokenizer.encode(" ".join(history)) if condition_on_previous_text and history else []
        opts = replace(options, prompt=tuple(prompt))
        r = decode_with_fallback(model, chunk, torch.tensor([chunk.shape[-1]]), tokenizer, opts, fallback)[0]
        end = min(stop / FRAMES_PER_SECOND, duration)
        segments.append(_segment(len(segments), seek, seek / FRAMES_PER_SECOND, end, r))
        if word_timestamps:
            segments[-1].update(segment_words(model, tokenizer, chunk[0], r.tokens, segments[-1]["start"],
                                              segments[-1]["end"]))
        history = [] if r.temperature > 0.5 else (history + [r.text] if r.text else history)
    return _transcript(segments, tokenizer, options, duration)


SILENCE_PEAK = 1e-4  # -80 dBFS: below any recording's noise floor, so only digital silence (or a muted input)


def is_digital_silence(samples) -> bool:
    """A window with no sample above -80 dBFS gives no segment (openai-whisper skips a window its
    no-speech token calls silent; these models never learned that token). Quiet real recordings
    keep their noise floor above this; their silence is the voice-activity chunker's job."""
    return len(samples) == 0 or float(torch.as_tensor(samples).abs().max()) < SILENCE_PEAK


def _segment(i: int, seek: int, start: float, end: float, r: DecodingResult) -> dict:
    return {"id": i, "seek": seek, "start": round(start, 3), "end": round(end, 3), "text": r.text,
            "tokens": r.tokens, "temperature": r.temperature, "avg_logprob": r.avg_logprob,
            "compression_ratio": r.compression_ratio}


def _transcript(segments: list, tokenizer: Tokenizer, options: DecodingOptions, duration: float) -> dict:
    text = " ".join(s["text"] for s in segments if s["text"])
    return {"text": text, "segments": segments, "language": options.language or tokenizer.languages[0],
            "duration": round(duration, 3)}


# -- speech chunks of many files, decoded together ---------------------------------------------

def chunk_limit(model: Whisper, vad: VadOptions) -> float:
    """The longest chunk in seconds: vad.chunk_seconds (default one window), at most one window."""
    window_s = window_frames(model) / FRAMES_PER_SECOND
    return min(vad.chunk_seconds or window_s, window_s)


def transcribe_chunks(model: Whisper, sources: Iterable[Tuple[Hashable, Source]], tokenizer: Tokenizer,
                      options: DecodingOptions = DecodingOptions(), fallback: FallbackOptions = FallbackOptions(),
                      vad: VadOptions = VadOptions(), batch_size: int = 16, word_timestamps: bool = False,
                      group_seconds: float = 600.0,
                      in_order: bool = True) -> Iterator[Tuple[Hashable, Union[dict, Exception]]]:
    """Yield (key, transcript or the error) for every (key, file or waveform).

    Each input is cut into speech chunks (vad.speech_chunks: the whole input when it is no longer
    than one chunk, nothing when it holds no speech). The chunks of consecutive inputs, up to
    group_seconds of audio, are decoded together: sorted by length, longest first, batch_size at a
    time, each featurised alone (as the training clips were) and padded to its batch's longest.
    A segment per chunk that says something, with the chunk's real start and end; no prompt (the
    chunks of a file are decoded at the same time). Results come in input order, each as soon as
    it and those before it are done; with in_order=False each as soon as it is done (a server
    answers the chunks that pass the fallback thresholds while the few that fail decode again).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    limit = chunk_limit(model, vad)
    for group in _groups(sources, group_seconds):
        pieces, speech = speech_pieces([audio for _, audio in group], limit, vad)
        pieces.sort(key=lambda p: p[1] - p[2])
        segments: dict = {i: [] for i in range(len(group))}
        left = Counter(i for i, _, _ in pieces)  # chunks of each input not decoded yet
        pending = list(range(len(group)))  # inputs not yielded yet
        for n in _finished(pending, left, in_order):  # no speech, or unreadable
            yield _input_result(group[n], segments[n], tokenizer, options)
        for k in range(0, len(pieces), batch_size):
            batch = pieces[k:k + batch_size]
            mels = [log_mel_spectrogram(group[i][1][a:b], model.dims.n_mels) for i, a, b in batch]
            for j, r, log_probs in _decode_mels(model, mels, tokenizer, options, fallback, word_timestamps):
                i, a, b = batch[j]
                segment = chunk_segment(r, log_probs, speech[i], a, b, tokenizer)
                if segment is not None:
                    segments[i].append(segment)
                left[i] -= 1
                for n in _finished(pending, left, in_order):
                    yield _input_result(group[n], segments[n], tokenizer, options)


def _finished(pending: list, left: Counter, in_order: bool) -> list:
    """Remove from `pending` and return the inputs with no chunk left to decode: all of them, or
    (in_order) only those before the first that still has one."""
    done = []
    for i in pending:
        if left[i] == 0:
            done.append(i)
        elif in_order:
            break
    for i in done:
        pending.remove(i)
    return done


def _input_result(item: tuple, segments: list, tokenizer: Tokenizer, options: DecodingOptions) -> tuple:
    key, audio = item
    return key, audio if isinstance(audio, Exception) else file_transcript(segments, tokenizer, options, audio)


def speech_pieces(audios: Sequence[Union[np.ndarray, Exception]], limit: float, vad: VadOptions) -> Tuple[list, dict]:
    """The speech chunks of every loaded input (an Exception in `audios` is a file that failed
    to load: skipped), as (input index, first sample, end sample), and each input's silero
    frame probabilities by index (of a short input, maybe only its first second's:
    vad.chunking_probabilities). Silero runs on all inputs at once (it costs per call, not per file)."""
    loaded = [i for i, audio in enumerate(audios) if not isinstance(audio, Exception)]
    probs = chunking_probabilities([audios[i] for i in loaded], limit, vad.vad_threshold)
    speech = dict(zip(loaded, probs))
    pieces = [(i, a, b) for i, probs in speech.items() for a, b in speech_chunks(audios[i], limit, vad, probs)]
    return pieces, speech


def chunk_segment(r: DecodingResult, log_probs: Optional[Tensor], probs: np.ndarray, a: int, b: int,
                  tokenizer: Tokenizer) -> Optional[dict]:
    """The segment of a decoded chunk [a, b) samples of its file, or None when it says nothing.
    log_probs: its CTC log-probs for word timestamps (None: no words); probs: the file's silero
    frame probabilities, for openai-whisper's no_speech_prob (1 - the surest speech frame scored
    in the chunk; a short file's frames may be scored only up to its first second)."""
    if not r.text.strip():
        return None
    segment = _segment(0, a * FRAMES_PER_SECOND // SAMPLE_RATE, a / SAMPLE_RATE, b / SAMPLE_RATE, r)
    segment["no_speech_prob"] = round(1.0 - float(probs[a // FRAME: -(-b // FRAME)].max()), 4)
    if log_probs is not None:
        segment.update(aligned_words(log_probs, r.tokens, tokenizer, segment["start"], segment["end"]))
    return segment


def file_transcript(segments: list, tokenizer: Tokenizer, options: DecodingOptions, audio: np.ndarray) -> dict:
    """One file's transcript from its chunks' segments (in any order)."""
    found = sorted(segments, key=lambda s: s["start"])
    for n, segment in enumerate(found):
        segment["id"] = n
    return _transcript(found, tokenizer, options, len(audio) / SAMPLE_RATE)


# -- continuous batching: files arrive while others decode ------------------------------------

@dataclass
class _File:
    key: Hashable
    audio: np.ndarray
    words: bool
    speech: Optional[np.ndarray] = None  # silero frame probabilities (once cut into chunks)
    left: int = 0  # chunks not decoded yet
    segments: list = field(default_factory=list)


@dataclass
class _Chunk:
    file: _File
    a: int  # first sample
    b: int  # end sample
    mel: Optional[Tensor] = None
    xa: Optional[Tensor] = None  # (S, C) encoder output: the fallback decodes from it again
    log_probs: Optional[Tensor] = None  # CTC, for word timestamps


class ChunkStream:
    """Voice-activity chunks of files that arrive at any time, decoded greedily with continuous
    batching (decoding.GreedyStream): chunks join the running batch at a decoder step (see
    `step` for when) and leave it as soon as they end, so a batch of mixed lengths never holds
    a short request until its longest chunk is done (server --continuous true).

    `submit` queues files; `step` cuts queued files into chunks and lets chunks join, up to
    batch_size rows (encoded together), advances every row by one token and returns the files
    whose last chunk ended, as (key, transcript). A
    transcript equals transcribe_chunks' for the same file and options (up to float rounding in
    the padded attention). Chunks whose text fails the thresholds fall back as there, alone.
    """

    def __init__(self, model: Whisper, tokenizer: Tokenizer, options: DecodingOptions,
                 fallback: FallbackOptions = FallbackOptions(), vad: VadOptions = VadOptions(), batch_size: int = 16,
                 max_join_wait: int = 30):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.options, self.fallback = model, tokenizer, options, fallback
        self.limit, self.vad, self.batch_size = chunk_limit(model, vad), vad, batch_size
        self.greedy = GreedyStream(model, tokenizer, options)
        self.unsplit: list = []  # files not cut into chunks yet
        self.steps, self.queued_since = 0, 1 << 62  # steps run; the step since which work has been queued
        self.max_join_wait = max_join_wait
        self.waiting: deque = deque()  # chunks not started
        self.running: dict = {}  # row key -> _Chunk
        self.files = 0  # files submitted and not returned

    @property
    def busy(self) -> bool:
        return self.files > 0

    def submit(self, items: Sequence[tuple]) -> None:
        """Queue files (key, 16 kHz samples, word timestamps?). They are cut into chunks when
        rows are free for them, silero on all such files at once."""
        self.unsplit += [_File(key, audio, words) for key, audio, words in items]
        self.queued_since = min(self.queued_since, self.steps)
        self.files += len(items)

    def step(self) -> list:
        """Start what fits, then one token for every running chunk; the files now complete
        (a file with no speech completes when it is cut, with an empty transcript).

        Queued work joins at once when nothing runs, else once it has waited max_join_wait steps:
        a join has a fixed cost that its files share (silero steps through its frames one call at
        a time, so one file costs about what sixteen do; the encoder and the prompt run once per
        join). bench/server_load.py, 16 clients: joining groups of a quarter of batch_size after
        at most 8 steps took 8.3-8.5 s, this rule with 30 steps 7.0 s and with 60 6.8 s."""
        self.steps += 1
        free, queued = self.batch_size - len(self.running), len(self.waiting) + len(self.unsplit)
        done = []
        if queued and free and (not self.running or self.steps - self.queued_since >= self.max_join_wait):
            done = self._split()
            if self.waiting:
                done += self._start()
        if self.waiting or self.unsplit:
            self.queued_since = min(self.queued_since, self.steps)
        else:
            self.queued_since = 1 << 62
        for row, result in self.greedy.step():
            done += self._ended(row, result)
        return done

    def abort(self, error: Exception) -> list:
        """Every file in flight, failed with `error` (after an error inside the decoder)."""
        files = {id(c.file): c.file for c in [*self.waiting, *self.running.values()]}
        files.update({id(f): f for f in self.unsplit})
        self.waiting.clear()
        self.running.clear()
        self.unsplit.clear()
        self.queued_since = 1 << 62
        self.greedy = GreedyStream(self.model, self.tokenizer, self.options)
        self.files = 0
        return [(f.key, error) for f in files.values()]

    def _split(self) -> list:
        """Cut the queued files into chunks; the files with none, done."""
        files, self.unsplit = self.unsplit, []
        if not files:
            return []
        pieces, speech = speech_pieces([f.audio for f in files], self.limit, self.vad)
        for i, f in enumerate(files):
            f.speech = speech[i]
        for i, a, b in pieces:
            files[i].left += 1
            self.waiting.append(_Chunk(files[i], a, b))
        return [self._finish(f) for f in files if f.left == 0]

    def _start(self) -> list:
        batch = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.batch_size - len(self.running)))]
        for c in batch:
            c.mel = log_mel_spectrogram(c.file.audio[c.a:c.b], self.model.dims.n_mels)
        lens = torch.tensor([c.mel.shape[-1] for c in batch])
        mel = torch.stack([F.pad(c.mel, (0, int(lens.max()) - c.mel.shape[-1])) for c in batch])
        with torch.inference_mode():
            xa, xa_lens = encode(self.model, mel, lens)
        words = [c.file.words for c in batch]
        log_probs = ctc_log_probs(self.model, xa, xa_lens) if any(words) else [None] * len(batch)
        for c, x, n, lp, w in zip(batch, xa, xa_lens.tolist(), log_probs, words):
            c.xa, c.log_probs = x[:n], lp if w else None
            self.running[id(c)] = c
        done = []
        for row, result in self.greedy.add(xa, xa_lens, [id(c) for c in batch]):
            done += self._ended(row, result)
        return done

    def _ended(self, row: int, result: DecodingResult) -> list:
        c = self.running.pop(row)
        if self.fallback.temperature_increment_on_fallback and needs_fallback(result, self.fallback):
            seeds = utterance_seeds(c.mel[None], None)  # as transcribe_chunks' batch would seed it
            with torch.inference_mode():
                result = fall_back(self.model, c.xa[None], torch.tensor([c.xa.shape[0]], device=c.xa.device),
                                   self.tokenizer, self.options, self.fallback, seeds, first=[result])[0]
        segment = chunk_segment(result, c.log_probs, c.file.speech, c.a, c.b, self.tokenizer)
        if segment is not None:
            c.file.segments.append(segment)
        c.file.left -= 1
        return [self._finish(c.file)] if c.file.left == 0 else []

    def _finish(self, f: _File) -> Tuple[Hashable, dict]:
        self.files -= 1
        return f.key, file_transcript(f.segments, self.tokenizer, self.options, f.audio)


def _groups(sources: Iterable[Tuple[Hashable, Source]], group_seconds: float):
    """Lists of (key, samples or the load error) holding about group_seconds of audio each, so a
    folder of long recordings is never all in memory at once."""
    group, seconds = [], 0.0
    for key, source in sources:
        try:
            audio = load_audio(source) if isinstance(source, (str, Path)) else _samples(source)
        except (AudioError, ValueError) as e:
            audio = e
        group.append((key, audio))
        seconds += 0.0 if isinstance(audio, Exception) else len(audio) / SAMPLE_RATE
        if seconds >= group_seconds:
            yield group
            group, seconds = [], 0.0
    if group:
        yield group


def _samples(audio) -> np.ndarray:
    """A waveform argument as 1-D float32 samples, or ValueError saying what is wrong with it."""
    x = audio.detach().cpu().numpy() if isinstance(audio, Tensor) else np.asarray(audio)
    if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"a waveform must be non-empty 1-D float samples at {SAMPLE_RATE} Hz, "
                         f"got shape {x.shape} dtype {x.dtype}")
    return x.astype(np.float32, copy=False)


def _decode_mels(model: Whisper, mels: list, tokenizer: Tokenizer, options: DecodingOptions,
                 fallback: FallbackOptions,
                 word_timestamps: bool) -> Iterator[Tuple[int, DecodingResult, Optional[Tensor]]]:
    """(index, DecodingResult, CTC log-probs or None) for log-mels (n_mels, T_i) padded into one
    batch, each as soon as it is final: those that pass the fallback thresholds after the first
    pass, the others after their fallback. One encoder pass serves the search, its fallback and
    the word alignment."""
    lens = torch.tensor([m.shape[-1] for m in mels])
    mel = torch.stack([F.pad(m, (0, int(lens.max()) - m.shape[-1])) for m in mels])
    xa, xa_lens, seeds = encode_for_fallback(model, mel, lens, options, fallback)
    log_probs = ctc_log_probs(model, xa, xa_lens) if word_timestamps else [None] * len(mels)
    for stage in fallback_stages(model, xa, xa_lens, tokenizer, options, fallback, seeds):
        for i, r in stage:
            yield i, r, log_probs[i]


# -- many files: batched across files ----------------------------------------------------------

def transcribe_files(model: Whisper, paths: Sequence[Union[str, Path]], tokenizer: Tokenizer,
                     options: DecodingOptions = DecodingOptions(), fallback: FallbackOptions = FallbackOptions(),
                     batch_size: int = 16, condition_on_previous_text: bool = True,
                     word_timestamps: bool = False,
                     vad: Optional[VadOptions] = None) -> Iterator[Tuple[str, Union[dict, Exception]]]:
    """Yield (path, transcript or the error) for every file.

    With `vad`: `transcribe_chunks` (chunks of long and short files in the same batches).
    Without: files of at most one window in batches sorted by duration (longest first, so memory
    limits show at once), each batch padded to its longest file; longer files go through the
    window path of `transcribe` one by one afterwards. Either way a result equals `transcribe` of
    that file alone with the same `vad` (up to float rounding). Results come as they are done
    (without `vad`: longest batch first), so a run that stops keeps everything written so far."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if vad is not None and vad.vad:
        yield from transcribe_chunks(model, [(str(p), p) for p in paths], tokenizer, options, fallback, vad,
                                     batch_size, word_timestamps)
        return
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
        if is_digital_silence(audio):  # as `transcribe`'s window loop: no segment
            yield p, _transcript([], tokenizer, options, len(audio) / SAMPLE_RATE)
            continue
        mels.append(mel)
        ok.append(p)
        durations.append(len(audio) / SAMPLE_RATE)
    if not ok:
        return
    decoded = sorted(_decode_mels(model, mels, tokenizer, options, fallback, word_timestamps), key=lambda d: d[0])
    for p, duration, (_, r, log_probs) in zip(ok, durations, decoded):
        segment = _segment(0, 0, 0.0, duration, r)
        if word_timestamps:
            segment.update(aligned_words(log_probs, r.tokens, tokenizer, 0.0, duration))
        yield p, _transcript([segment], tokenizer, options, duration)
