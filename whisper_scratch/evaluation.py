"""Decode audio that has reference transcripts and score it: the one evaluation path, used by the
trainer's dev evaluation and by `transcribe.py --mode evaluate`, with one decoding-budget rule."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

from .data import read_references
from .decoding import NO_FALLBACK, DecodingOptions, FallbackOptions
from .longform import transcribe_files
from .metrics import error_rates
from .model import Whisper
from .tokenizer import Tokenizer
from .vad import VadOptions

Pair = Tuple[str, str]  # (audio path, reference transcript)


def reference_budget(tokenizer: Tokenizer, texts: Sequence[str], n_text_ctx: int) -> int:
    """New tokens per window when none are set: a little past the longest reference (+ eot), as a
    model early in training may never emit <|endoftext|>; never more than n_text_ctx // 2."""
    longest = max(len(tokenizer.encode(t)) + 1 for t in texts)
    return min(n_text_ctx // 2, int(1.25 * longest) + 8)


def decode_references(model: Whisper, tokenizer: Tokenizer, pairs: Sequence[Pair], options: DecodingOptions,
                      fallback: FallbackOptions = NO_FALLBACK, batch_size: int = 16,
                      condition_on_previous_text: bool = True, word_timestamps: bool = False,
                      vad: Optional[VadOptions] = None) -> Iterator[Tuple[str, Union[dict, Exception]]]:
    """Yield (path, transcript or the error) for every pair's audio, batched by duration; the
    budget is options.max_new_tokens, or `reference_budget` when that is unset."""
    if options.max_new_tokens is None and pairs:
        options = replace(options, max_new_tokens=reference_budget(tokenizer, [t for _, t in pairs],
                                                                   model.dims.n_text_ctx))
    yield from transcribe_files(model, [p for p, _ in pairs], tokenizer, options, fallback, batch_size,
                                condition_on_previous_text, word_timestamps, vad)


def score(pairs: Sequence[Pair], hyps: dict, tokenizer: Tokenizer) -> dict:
    """WER/CER (after the tokenizer's normalisation) of the pairs that have a hypothesis, plus
    three (reference, hypothesis) examples; {} when none has one."""
    scored = [(ref, hyps[p]) for p, ref in pairs if p in hyps]
    if not scored:
        return {}
    refs, texts = [tokenizer.normalize(r) for r, _ in scored], [tokenizer.normalize(h) for _, h in scored]
    scores = error_rates(refs, texts)
    scores["examples"] = list(zip(refs[:3], texts[:3]))
    return scores


def evaluate(model: Whisper, tokenizer: Tokenizer, pairs: Sequence[Pair], options: DecodingOptions,
             batch_size: int = 16) -> dict:
    """Decode and score in one call (the trainer's dev evaluation): error rates, examples and the
    number of clips that failed to load."""
    hyps, failed = {}, 0
    for path, result in decode_references(model, tokenizer, pairs, options, NO_FALLBACK, batch_size):
        if isinstance(result, Exception):
            failed += 1
        else:
            hyps[path] = result["text"]
    scores = score(pairs, hyps, tokenizer)
    return {**scores, "failed": failed} if scores else {}


def resolve_references(reference_file: Union[str, Path], audio_dir: Optional[Union[str, Path]] = None) -> tuple:
    """{absolute audio path: reference} and the format name. A relative path is looked up under
    audio_dir (and its clips/ folder, Common Voice's layout), then next to the reference file."""
    pairs, kind = read_references(reference_file)
    bases = [Path(audio_dir), Path(audio_dir) / "clips"] if audio_dir else []
    bases.append(Path(reference_file).parent)
    refs = {}
    for p, text in pairs:
        candidates = [Path(p)] if Path(p).is_absolute() else [b / p for b in bases]
        path = str(next((c for c in candidates if c.is_file()), candidates[0]).resolve())
        if refs.get(path, text) != text:  # the same file twice with the same text loses nothing
            raise ValueError(f"{reference_file}: {p} is listed twice with different transcripts "
                             f"({refs[path]!r} and {text!r}); keep one")
        refs[path] = text
    return refs, kind
