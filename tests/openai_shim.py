"""Run openai-whisper's own `decode` on our vocabulary (a test and benchmark helper).

It monkeypatches openai-whisper's tokenizer lookup; used by tests/test_export.py and
bench/vs_decode.py, not part of the package.
"""
from __future__ import annotations

from typing import Optional

import torch

from whisper_scratch.export.hf import suppress_ids
from whisper_scratch.tokenizer import Tokenizer


class OpenAITokenizerShim:
    """What openai-whisper's DecodingTask reads from its tiktoken tokenizer, with our ids, so its
    own `decode` (greedy / beam search, KV-cache hooks) runs on our vocabulary. Only the
    without-timestamps path is supported (our vocabulary has no timestamp tokens)."""

    def __init__(self, tokenizer: Tokenizer, language: Optional[str] = None):
        self.tokenizer = tokenizer
        self.sot, self.eot, self.transcribe = tokenizer.sot, tokenizer.eot, tokenizer.transcribe
        self.translate = self.sot_lm = tokenizer.sot  # no such tokens here; both are suppressed anyway
        self.sot_prev, self.no_timestamps = tokenizer.startofprev, tokenizer.no_timestamps
        self.no_speech = None
        self.timestamp_begin = tokenizer.vocab_size  # no timestamp tokens
        self.language = language or tokenizer.languages[0]
        self.language_token = tokenizer.language_ids[self.language]
        self.sot_sequence = tuple(tokenizer.sot_sequence(self.language)[:3])
        self.sot_sequence_including_notimestamps = tuple(tokenizer.sot_sequence(self.language))
        self.non_speech_tokens = ()

    def encode(self, text: str) -> list:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)


def openai_decode(model, mel: torch.Tensor, tokenizer: Tokenizer, beam_size: int = 1,
                  max_new_tokens: Optional[int] = None, language: Optional[str] = None) -> list:
    """openai-whisper's `decode` on our vocabulary: mel (B, n_mels, 2 * n_audio_ctx) -> its
    DecodingResults. Same search settings as ours: no blank suppression, our specials suppressed.

    Beam search runs one utterance at a time: openai-whisper 20250625 fails on a batch of more
    than one with beam_size > 1 (audio features are not repeated per beam; openai/whisper#2197)."""
    import whisper.decoding as W

    shim = OpenAITokenizerShim(tokenizer, language)
    options = W.DecodingOptions(language=shim.language, without_timestamps=True, suppress_blank=False,
                                suppress_tokens=suppress_ids(tokenizer), sample_len=max_new_tokens,
                                beam_size=beam_size if beam_size > 1 else None, fp16=False)
    original = W.get_tokenizer
    W.get_tokenizer = lambda *args, **kwargs: shim  # DecodingTask looks it up by this name
    try:
        if beam_size > 1:
            return [W.decode(model, m[None], options)[0] for m in mel]
        return W.decode(model, mel, options)
    finally:
        W.get_tokenizer = original
