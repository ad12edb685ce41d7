"""Training-only augmentation: speed perturbation and additive noise on the waveform; vocal tract
length perturbation, a random channel (microphone) response, a random level, silence padding and
SpecAugment on the log-mel. Each is a pure function of its inputs and a numpy Generator, so a
worker's RNG decides everything and runs are reproducible."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import soxr
import torch

from .audio import (AUDIO_EXTENSIONS, HOP_LENGTH, SAMPLE_RATE, AudioError, audio_duration, hz_to_mel, load_audio,
                    mel_to_hz)


# The allowed range of each amount (inclusive), checked here and by train.py's flags alike.
LIMITS = {"vtlp_max": (0.0, 0.5, ""), "channel_db": (0.0, 30.0, " dB"), "gain_db": (0.0, 40.0, " dB"),
          "silence_pad_max": (0.0, 5.0, " seconds"), "silence_pad_prob": (0.0, 1.0, "")}
PAD_FILLS = ("zeros", "background")  # what pad_silence pads with


def check_limits(values: dict, name=lambda field: field) -> None:
    """A ValueError naming the first amount in `values` (field -> value) outside LIMITS; `name`
    spells the field as the caller's user knows it (train.py: --vtlp-max)."""
    for field, value in values.items():
        lo, hi, unit = LIMITS[field]
        if not lo <= value <= hi:
            raise ValueError(f"{name(field)} must be in [{lo:g}, {hi:g}]{unit}, got {value}")


@dataclass(frozen=True)
class AugmentOptions:
    spec_augment: bool = False
    freq_masks: int = 2  # OWSM / SpecAugment LD: 2 masks of up to 27 bins
    freq_mask_width: int = 27
    time_masks: int = 10  # up to 10 masks, each at most 5 % of the utterance
    time_mask_fraction: float = 0.05
    # what masked cells get: the utterance's mean, or each mel bin's own mean over the utterance (a
    # model with --feature-norm subtracts those means: time masks then leave them unchanged)
    mask_fill: str = "mean"
    speed_perturb: bool = False
    speeds: tuple = (0.9, 1.0, 1.1)
    noise_dir: Optional[str] = None
    noise_prob: float = 0.5
    snr_range: tuple = (5.0, 20.0)
    silence_pad_max: float = 0.0  # seconds of silence added before and after a clip, each up to this
    silence_pad_prob: float = 0.5
    silence_pad_fill: str = "zeros"  # "zeros" (digital silence) or "background" (the clip's quietest frames)
    vtlp_max: float = 0.0  # warp factor drawn from [1 - x, 1 + x]; 0 = off
    channel_db: float = 0.0  # largest gain (dB) of the random channel response; 0 = off
    gain_db: float = 0.0  # a clip's level moved by up to this many dB either way; 0 = off

    def __post_init__(self):
        check_limits({field: getattr(self, field) for field in LIMITS})
        if not 0 <= self.noise_prob <= 1:
            raise ValueError(f"noise_prob must be in [0, 1], got {self.noise_prob}")
        if self.snr_range[0] > self.snr_range[1]:
            raise ValueError(f"snr_range must be (low, high), got {self.snr_range}")
        if any(s <= 0 for s in self.speeds):
            raise ValueError(f"speeds must be positive, got {self.speeds}")
        if self.silence_pad_fill not in PAD_FILLS:
            raise ValueError(f"silence_pad_fill must be one of {PAD_FILLS}, got {self.silence_pad_fill!r}")
        if self.mask_fill not in ("mean", "bin_mean"):
            raise ValueError(f"mask_fill must be 'mean' or 'bin_mean', got {self.mask_fill!r}")


def speed_perturb(audio: np.ndarray, factor: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Play `audio` `factor` times faster (tempo and pitch, like `sox speed`): resample to sr/factor
    and read the result as sr."""
    if factor == 1.0:
        return audio
    return soxr.resample(audio, sr, int(round(sr / factor)), quality="HQ").astype(np.float32)


def add_noise(audio: np.ndarray, noise: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Mix a random stretch of `noise` (tiled if short) into `audio` at `snr_db`."""
    if len(noise) < len(audio):
        noise = np.tile(noise, int(np.ceil(len(audio) / max(len(noise), 1))))
    start = int(rng.integers(0, len(noise) - len(audio) + 1))
    noise = noise[start:start + len(audio)]
    p_sig, p_noise = float(np.mean(audio ** 2)), float(np.mean(noise ** 2))
    if p_sig == 0 or p_noise == 0:
        return audio
    scale = np.sqrt(p_sig / (p_noise * 10 ** (snr_db / 10)))
    return (audio + scale * noise).astype(np.float32)


def spec_augment(mel: torch.Tensor, opts: AugmentOptions, rng: np.random.Generator) -> torch.Tensor:
    """Frequency and time masks on a (n_mels, T) log-mel. Masked cells get the utterance mean
    (opts.mask_fill "mean"), or each bin's mean over the frames no time mask covers ("bin_mean"):
    then every bin's mean over the utterance is that of the frames left, and an encoder that
    subtracts it (--feature-norm) is not shifted by the masks."""
    mel = mel.clone()
    n_mels, T = mel.shape
    bands, spans = [], []
    for _ in range(opts.freq_masks):
        w = int(rng.integers(0, opts.freq_mask_width + 1))
        f0 = int(rng.integers(0, max(1, n_mels - w)))
        bands.append((f0, f0 + w))
    max_t = int(opts.time_mask_fraction * T)
    for _ in range(opts.time_masks if max_t > 0 else 0):
        w = int(rng.integers(0, max_t + 1))
        t0 = int(rng.integers(0, max(1, T - w)))
        spans.append((t0, t0 + w))
    if opts.mask_fill == "mean":
        fill = mel.mean()
    else:
        kept = torch.ones(T, dtype=torch.bool)
        for a, b in spans:
            kept[a:b] = False
        fill = (mel[:, kept] if kept.any() else mel).mean(-1, keepdim=True)  # (n_mels, 1)
    for a, b in bands:
        mel[a:b, :] = fill if fill.ndim == 0 else fill[a:b]
    for a, b in spans:
        mel[:, a:b] = fill
    return mel


@lru_cache(maxsize=None)
def _mel_centres(n_mels: int, sr: int) -> np.ndarray:
    """Centre frequency (Hz) of each slaney mel bin of audio.mel_filters."""
    return mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))[1:-1]


def vtlp(mel: torch.Tensor, alpha: float, sr: int = SAMPLE_RATE, f_hi: float = 4800.0) -> torch.Tensor:
    """Vocal tract length perturbation (Jaitly & Hinton 2013) on a (n_mels, T) log-mel: the
    spectrum is stretched along frequency by `alpha` (formants move as in a longer or shorter vocal
    tract), piecewise linearly so that 0 Hz and Nyquist stay put. Done on the mel bins, by
    interpolating each output bin from the input at its unwarped frequency, so it works on cached
    features. Speed perturbation moves pitch, formants and tempo together; this moves the formants
    alone, which is what separates one voice from another most."""
    if alpha == 1.0:
        return mel
    n_mels, nyq = mel.shape[0], sr / 2
    centres = _mel_centres(n_mels, sr)
    knee = f_hi * min(alpha, 1.0) / alpha  # below it f -> alpha f; above it a line to (nyq, nyq)
    grid = np.linspace(0, nyq, 2048)
    warped = np.where(grid <= knee, alpha * grid,
                      nyq - (nyq - alpha * knee) / (nyq - knee) * (nyq - grid))
    source = np.interp(centres, warped, grid)  # the input frequency each output bin shows
    pos = np.interp(hz_to_mel(source), hz_to_mel(centres), np.arange(n_mels))
    lo = np.clip(np.floor(pos).astype(np.int64), 0, n_mels - 1)
    hi = np.minimum(lo + 1, n_mels - 1)
    w = torch.from_numpy((pos - lo).astype(np.float32)).to(mel.dtype)[:, None]
    return mel[lo] * (1 - w) + mel[hi] * w


def channel_response(mel: torch.Tensor, max_db: float, rng: np.random.Generator) -> torch.Tensor:
    """A random smooth gain over frequency (a tilt plus two slower bumps, at most `max_db` dB
    anywhere), as another microphone or room would give: FSDD's speakers each recorded on their own
    equipment, and a model trained on four of them learns their channels along with their voices.
    The gain is added in the normalised log-mel (1 unit = 40 dB) and the max - 8 floor is taken
    again, as if the gain had been applied before the log."""
    n_mels = mel.shape[0]
    x = np.linspace(0.0, 1.0, n_mels)
    curve = sum(rng.uniform(-1, 1) * np.cos(np.pi * k * x) for k in (1, 2, 3))
    curve = curve / max(np.abs(curve).max(), 1e-6) * rng.uniform(0, max_db)
    out = mel + torch.from_numpy((curve / 40.0).astype(np.float32)).to(mel.dtype)[:, None]
    return torch.maximum(out, out.max() - 2.0)


def random_gain(mel: torch.Tensor, max_db: float, rng: np.random.Generator) -> torch.Tensor:
    """The clip played up to max_db louder or softer. Whisper's log-mel keeps the absolute level
    (its floor is max - 8, relative to the clip's own peak), so a gain is a constant added to every
    cell, 1 unit per 40 dB; FSDD's speakers differ by 20 dB in peak level."""
    return mel + float(rng.uniform(-max_db, max_db)) / 40.0


def pad_silence(mel: torch.Tensor, max_seconds: float, max_frames: int, rng: np.random.Generator,
                fill: str = "zeros") -> torch.Tensor:
    """Up to max_seconds of silence before and after a normalised log-mel (n_mels, T), never past
    max_frames. Clips cut tight to their speech (espeak's start at their first sample) leave a
    model that reads a letter into the few hundred ms of silence a VAD chunk starts with, and one
    that has only seen speech at the first frame mistakes a word that starts later (FSDD: 0.25 s of
    the clip's own noise floor before tightly cut digits turned 56 % of them into other digits;
    bench/onset_shift.py).

    fill "zeros": digital silence. In the normalised log-mel that is exactly max - 2
    (log_mel_spectrogram clamps at max - 8, then (x + 4) / 4), so padding here equals padding the
    waveform with zeros, bar the STFT's border frames, and works on cached features.
    fill "background": the recording's own background, its quietest frames (`background_frames`)
    repeated: real microphones are never digitally silent, and a recording's noise floor is part
    of what the model must learn to ignore."""
    room = max(0, max_frames - mel.shape[-1])
    before, after = (min(int(rng.uniform(0, max_seconds) * SAMPLE_RATE / HOP_LENGTH), room // 2) for _ in range(2))
    if before == after == 0:
        return mel
    if fill == "background":
        pad = background_frames(mel, before + after)
        return torch.cat([pad[:, :before], mel, pad[:, before:]], dim=-1)
    silence = mel.max() - 2
    return torch.cat([silence.expand(mel.shape[0], before), mel, silence.expand(mel.shape[0], after)], dim=-1)


def background_frames(mel: torch.Tensor, n: int, share: float = 0.1) -> torch.Tensor:
    """n frames of a log-mel's background: its quietest `share` of frames (lowest mean over the
    bins, at least one), in their order, repeated. A clip with digital silence in it gets exactly
    the silence that fill "zeros" gives."""
    k = max(1, int(mel.shape[-1] * share))
    quiet = mel.mean(0).topk(k, largest=False).indices.sort().values
    return mel[:, quiet.repeat((n + k - 1) // k)[:n]]


class NoiseBank:
    """Noise clips from a folder (any audio format), loaded lazily once per process. Every file's
    header is read up front: a file that is not audio is refused then, naming it, rather than
    costing the training clips it would have been mixed into."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"--noise-dir {self.folder}: not a folder")
        self.paths: Sequence[Path] = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not self.paths:
            raise ValueError(f"--noise-dir {self.folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
        bad = []
        for p in self.paths:
            try:
                audio_duration(p)
            except AudioError as e:
                bad.append(str(e))
        if bad:
            raise ValueError(f"--noise-dir {self.folder}: {len(bad)} of {len(self.paths)} files are not usable audio "
                             f"(remove or fix them): " + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
        self._cache: dict = {}

    def sample(self, rng: np.random.Generator) -> Optional[np.ndarray]:
        """A noise recording drawn with rng, or None when that file turns out undecodable (a sound
        header over bad data): the clip then trains without noise, the same in every worker and
        epoch, and the file is named once per process."""
        path = self.paths[int(rng.integers(0, len(self.paths)))]
        if path not in self._cache:
            try:
                self._cache[path] = load_audio(path)
            except AudioError as e:
                self._cache[path] = None
                warnings.warn(f"--noise-dir: {e}; the clips that draw it train without noise", stacklevel=2)
        return self._cache[path]
