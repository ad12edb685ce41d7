"""Run openai-whisper's own `decode` on our vocabulary (a test and benchmark helper).

Our tokenizer is handed to it by whisper_scratch.export.openai.openai_tokenizer; used by tests/test_export.py and
bench/vs_decode.py, not part of the package.
"""
from __future__ import annotations

from typing import Optional

import torch

from whisper_scratch.export.hf import suppress_ids
from whisper_scratch.export.openai import openai_tokenizer
from whisper_scratch.tokenizer import Tokenizer


def openai_decode(model, mel: torch.Tensor, tokenizer: Tokenizer, beam_size: int = 1,
                  max_new_tokens: Optional[int] = None, language: Optional[str] = None) -> list:
    """openai-whisper's `decode` on our vocabulary: mel (B, n_mels, 2 * n_audio_ctx) -> its
    DecodingResults. Same search settings as ours: no blank suppression, our specials suppressed.

    Beam search runs one utterance at a time: openai-whisper 20250625 fails on a batch of more
    than one with beam_size > 1 (audio features are not repeated per beam; openai/whisper#2197)."""
    import whisper.decoding as W

    options = W.DecodingOptions(language=language or tokenizer.languages[0], without_timestamps=True, suppress_blank=False,
                                suppress_tokens=suppress_ids(tokenizer), sample_len=max_new_tokens,
                                beam_size=beam_size if beam_size > 1 else None, fp16=False)
    with openai_tokenizer(tokenizer):
        if beam_size > 1:
            return [W.decode(model, m[None], options)[0] for m in mel]
        return W.decode(model, mel, options)
