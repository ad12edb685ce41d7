"""Training-only augmentation: speed perturbation and additive noise on the waveform, SpecAugment
on the log-mel. Each is a pure function of its inputs and a numpy Generator, so a worker's RNG
decides everything and runs are reproducible."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import soxr
import torch

from .audio import AUDIO_EXTENSIONS, HOP_LENGTH, SAMPLE_RATE, load_audio


@dataclass(frozen=True)
class AugmentOptions:
    spec_augment: bool = False
    freq_masks: int = 2  # OWSM / SpecAugment LD: 2 masks of up to 27 bins
    freq_mask_width: int = 27
    time_masks: int = 10  # up to 10 masks, each at most 5 % of the utterance
    time_mask_fraction: float = 0.05
    speed_perturb: bool = False
    speeds: tuple = (0.9, 1.0, 1.1)
    noise_dir: Optional[str] = None
    noise_prob: float = 0.5
    snr_range: tuple = (5.0, 20.0)
    silence_pad_max: float = 0.0  # seconds of silence added before and after a clip, each up to this
    silence_pad_prob: float = 0.5

    def __post_init__(self):
        if not 0 <= self.silence_pad_max <= 5:
            raise ValueError(f"silence_pad_max must be in [0, 5] seconds, got {self.silence_pad_max}")
        if not 0 <= self.noise_prob <= 1:
            raise ValueError(f"noise_prob must be in [0, 1], got {self.noise_prob}")
        if self.snr_range[0] > self.snr_range[1]:
            raise ValueError(f"snr_range must be (low, high), got {self.snr_range}")
        if any(s <= 0 for s in self.speeds):
            raise ValueError(f"speeds must be positive, got {self.speeds}")


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
    """Frequency and time masks on a (n_mels, T) log-mel; masked cells get the utterance mean."""
    mel = mel.clone()
    n_mels, T = mel.shape
    fill = mel.mean()
    for _ in range(opts.freq_masks):
        w = int(rng.integers(0, opts.freq_mask_width + 1))
        f0 = int(rng.integers(0, max(1, n_mels - w)))
        mel[f0:f0 + w, :] = fill
    max_t = int(opts.time_mask_fraction * T)
    for _ in range(opts.time_masks if max_t > 0 else 0):
        w = int(rng.integers(0, max_t + 1))
        t0 = int(rng.integers(0, max(1, T - w)))
        mel[:, t0:t0 + w] = fill
    return mel


def pad_silence(mel: torch.Tensor, max_seconds: float, max_frames: int, rng: np.random.Generator) -> torch.Tensor:
    """Up to max_seconds of silence before and after a normalised log-mel (n_mels, T), never past
    max_frames. Clips cut tight to their speech (espeak's start at their first sample) leave a
    model that reads a letter into the few hundred ms of silence a VAD chunk starts with. Silence in
    the normalised log-mel is exactly max - 2 (log_mel_spectrogram clamps at max - 8, then
    (x + 4) / 4), so padding here equals padding the waveform with zeros, bar the STFT's border
    frames, and works on cached features."""
    room = max(0, max_frames - mel.shape[-1])
    before, after = (min(int(rng.uniform(0, max_seconds) * SAMPLE_RATE / HOP_LENGTH), room // 2) for _ in range(2))
    if before == after == 0:
        return mel
    fill = mel.max() - 2
    return torch.cat([fill.expand(mel.shape[0], before), mel, fill.expand(mel.shape[0], after)], dim=-1)


class NoiseBank:
    """Noise clips from a folder (any audio format), loaded lazily once per process."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"--noise-dir {self.folder}: not a folder")
        self.paths: Sequence[Path] = sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not self.paths:
            raise ValueError(f"--noise-dir {self.folder}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
        self._cache: dict = {}

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        path = self.paths[int(rng.integers(0, len(self.paths)))]
        if path not in self._cache:
            self._cache[path] = load_audio(path)
        return self._cache[path]
