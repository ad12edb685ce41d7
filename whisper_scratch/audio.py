"""Waveform -> features: load any audio file as 16 kHz mono float32, compute Whisper's log-mel.

The log-mel is numerically openai-whisper's definition (Hann STFT, n_fft 400, hop 160, last frame
dropped, slaney mel filters, log10 clamp 1e-10, floor at max-8, (x+4)/4), but for any length:
N samples give N // 160 frames. Nothing is padded to 30 s except by `pad_or_trim`, which the
fixed-window long-form path uses.
"""
from __future__ import annotations

import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf
import soxr
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
N_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE  # 480,000 samples in a 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3,000 mel frames in a 30 s window
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second (10 ms)

MIN_SAMPLES = N_FFT // 2 + 1  # the shortest input the centred STFT accepts

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus")

PathLike = Union[str, os.PathLike]


class AudioError(RuntimeError):
    """An audio file that cannot be used; the message names the file and the reason."""


class AudioWarning(UserWarning):
    """An audio file that was used as far as it goes (a truncated WAV); the message names it."""


def one_line_audio_warnings(prog: str) -> None:
    """Entry points: print each AudioWarning as one line, "PROG: warning: FILE: what" (not the
    warnings module's source line), every time (every file is its own)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, AudioWarning):
            print(f"{prog}: warning: {message}", file=file or sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", AudioWarning)


def _open_info(path: Path) -> sf._SoundFileInfo:
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: file is empty (0 bytes)")
    try:
        return sf.info(str(path))
    except Exception as e:  # libsndfile raises several types for unreadable headers
        raise AudioError(f"{path}: {_undecodable(e)}") from None


def _undecodable(e: Exception) -> str:
    """What to tell the user about a file libsndfile will not open. For bytes it cannot recognise
    (a corrupt MP3, text behind an .mp3 name) libsndfile says "File does not exist or is not a
    regular file (possibly a pipe?)" although the file exists: say what is really wrong."""
    said = str(e)
    if "does not exist or is not a regular file" in said or "unknown format" in said.lower():
        said = "corrupt, truncated, or not WAV/FLAC/MP3/OGG data"
    elif said.startswith("Error opening"):  # "Error opening 'x.wav': <reason>": the path is ours to give
        said = said.split(": ", 1)[-1]
    return f"not a readable audio file: the bytes are not decodable audio ({said})"


def wav_shortfall(path: PathLike, info: sf._SoundFileInfo) -> str:
    """For a WAV file whose header promises more sample data than the file holds (a copy or a
    recording cut off), what is missing, said plainly; "" otherwise. libsndfile reads such a file
    without a word, up to where it ends."""
    if info.format not in ("WAV", "WAVEX"):
        return ""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return ""
        size = Path(path).stat().st_size
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return ""
            n = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                have = size - f.tell()
                if n == 0 or n >= 0x7FFF0000 or n <= have:  # 0 or about 2-4 GB: a streaming writer's "unknown"
                    return ""
                held = info.frames / info.samplerate
                promised = f"{n / (have / held):.2f} s" if info.frames else f"{n} bytes"  # bytes per second as held
                return f"truncated: the header promises {promised} of audio, the file holds {held:.2f} s"
            f.seek(n + (n & 1), 1)  # chunks are padded to an even size


def audio_duration(path: PathLike) -> float:
    """Duration in seconds read from the file header, without decoding the samples."""
    info = _open_info(Path(path))
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError(f"{path}: contains no audio frames")
    return info.frames / info.samplerate


def load_audio(path: PathLike, sr: int = SAMPLE_RATE, warn: bool = True) -> np.ndarray:
    """Read WAV/FLAC/MP3/OGG at any rate and bit depth as float32 mono at `sr` Hz.

    Integer PCM is scaled by 2**(bits-1), exactly as openai-whisper's ffmpeg s16le / 32768 path
    for 16-bit files. Channels are averaged; resampling uses soxr's high-quality filter. A WAV
    cut short is read as far as it goes with an AudioWarning (warn=False: none; threads, where the
    warnings module's state is shared, use `read_audio`, which returns what is missing).
    """
    audio, short = read_audio(path, sr)
    if short and warn:  # decoded as far as it goes, and said (a warning per file: the message names it)
        warnings.warn(f"{path}: {short}", AudioWarning, stacklevel=2)
    return audio


def read_audio(path: PathLike, sr: int = SAMPLE_RATE) -> tuple:
    """(load_audio's samples, wav_shortfall's note: "" unless the WAV was cut short)."""
    path = Path(path)
    info = _open_info(path)
    if info.samplerate <= 0:  # a damaged header; soxr would fail on it without naming the file
        raise AudioError(f"{path}: not a readable audio file: the header gives no sample rate")
    try:
        data, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: {_undecodable(e)}") from None
    short = wav_shortfall(path, info)
    if data.shape[0] == 0:
        raise AudioError(f"{path}: contains no audio frames")
    audio = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(audio)):
        raise AudioError(f"{path}: decoded samples contain NaN or inf")
    if file_sr != sr:
        audio = soxr.resample(audio, file_sr, sr, quality="HQ")
    if audio.size == 0:  # e.g. 1 sample at 48 kHz: nothing is left at 16 kHz
        raise AudioError(f"{path}: too short: {data.shape[0]} sample(s) at {file_sr} Hz leave none at {sr} Hz")
    return np.ascontiguousarray(audio, dtype=np.float32), short


def pad_or_trim(array, length: int = N_SAMPLES, *, axis: int = -1):
    """Zero-pad or cut `array` (numpy or torch) to `length` along `axis` (the fixed 30 s path)."""
    size = array.shape[axis]
    if torch.is_tensor(array):
        if size > length:
            return array.index_select(axis, torch.arange(length, device=array.device))
        if size < length:
            pad = [0, 0] * array.ndim
            pad[2 * (array.ndim - 1 - (axis % array.ndim)) + 1] = length - size
            return torch.nn.functional.pad(array, pad)
        return array
    if size > length:
        return array.take(indices=range(length), axis=axis)
    if size < length:
        widths = [(0, 0)] * array.ndim
        widths[axis] = (0, length - size)
        return np.pad(array, widths)
    return array


def hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's auditory toolbox scale: linear below 1 kHz, logarithmic above (librosa htk=False).
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@lru_cache(maxsize=None)
def _mel_filters_np(n_mels: int, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]  # slaney area normalisation
    return weights.astype(np.float32)


def mel_filters(n_mels: int, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Slaney mel filterbank (n_mels, 201) for 16 kHz, n_fft 400: librosa's and openai-whisper's asset."""
    if n_mels not in (80, 128):
        raise ValueError(f"n_mels must be 80 or 128 (Whisper's front ends), got {n_mels}")
    return torch.from_numpy(_mel_filters_np(n_mels)).to(device)


def log_mel_spectrogram(audio, n_mels: int = 80, device=None) -> torch.Tensor:
    """Whisper log-mel of a waveform (path, numpy or tensor; (N,) or (B, N)) -> (…, n_mels, N // 160).

    For a batch the max-8 floor is taken per row, so a row equals that utterance computed alone
    when the rows hold the same samples (pad after computing features, not before).
    """
    if isinstance(audio, (str, os.PathLike)):
        audio = load_audio(audio)
    if not torch.is_tensor(audio):
        audio = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    if device is not None:
        audio = audio.to(device)
    audio = audio.float()
    if audio.shape[-1] < MIN_SAMPLES:  # torch.stft's reflect padding needs more than n_fft/2
        raise ValueError(f"audio has {audio.shape[-1]} samples; at least {MIN_SAMPLES} (12.6 ms) are needed")
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2  # drop the last frame: N // 160 frames, as Whisper
    mel = mel_filters(n_mels, audio.device) @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0
