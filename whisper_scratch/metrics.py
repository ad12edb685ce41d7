"""Scoring: WER and CER with jiwer after the shared text normalisation, and per-utterance errors.
(References are read by data.read_references, with the same readers as training.)

Pass `normalize=tokenizer.normalize` so references and hypotheses are compared exactly as the
model was trained (case, punctuation). A leaf module: it imports nothing from the package.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import jiwer

Normalize = Optional[Callable[[str], str]]


def _prepare(refs: Sequence[str], hyps: Sequence[str], normalize: Normalize) -> Tuple[list, list]:
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        raise ValueError("no utterances to score (empty reference list)")
    norm = normalize or (lambda s: s)
    # whitespace is collapsed in any case so "a  b" and "a b" are the same two words
    return [" ".join(norm(r).split()) for r in refs], [" ".join(norm(h).split()) for h in hyps]


def error_rates(refs: Sequence[str], hyps: Sequence[str], normalize: Normalize = None) -> dict:
    """Corpus WER and CER (jiwer) with word-level counts.

    Returns {wer, cer, substitutions, insertions, deletions, hits, n_ref_words, n_ref_chars,
    n_utterances}. An empty reference counts its hypothesis' words as insertions; when every
    reference is empty there is nothing to divide by and a ValueError says so.
    """
    refs, hyps = _prepare(refs, hyps, normalize)
    words = jiwer.process_words(refs, hyps)
    n_ref_words = words.hits + words.substitutions + words.deletions
    if n_ref_words == 0:
        raise ValueError(f"cannot compute WER: all {len(refs)} references are empty after normalisation")
    chars = jiwer.process_characters(refs, hyps)
    return {"wer": float(words.wer), "cer": float(chars.cer), "substitutions": words.substitutions,
            "insertions": words.insertions, "deletions": words.deletions, "hits": words.hits,
            "n_ref_words": n_ref_words, "n_ref_chars": chars.hits + chars.substitutions + chars.deletions,
            "n_utterances": len(refs)}


def wer(refs: Sequence[str], hyps: Sequence[str], normalize: Normalize = None) -> float:
    return error_rates(refs, hyps, normalize)["wer"]


def cer(refs: Sequence[str], hyps: Sequence[str], normalize: Normalize = None) -> float:
    return error_rates(refs, hyps, normalize)["cer"]


def utterance_errors(refs: Sequence[str], hyps: Sequence[str], normalize: Normalize = None) -> List[dict]:
    """Per utterance: {reference, hypothesis (normalised), substitutions, insertions, deletions,
    errors, n_ref_words, wer}. wer is inf for an empty reference with a non-empty hypothesis."""
    refs, hyps = _prepare(refs, hyps, normalize)
    out = jiwer.process_words(refs, hyps)
    rows = []
    for ref, hyp, chunks in zip(refs, hyps, out.alignments):
        counts = {"substitute": 0, "insert": 0, "delete": 0}
        for c in chunks:
            if c.type in counts:
                counts[c.type] += (c.hyp_end_idx - c.hyp_start_idx) if c.type == "insert" else (c.ref_end_idx - c.ref_start_idx)
        errors = sum(counts.values())
        n_ref = len(ref.split())
        rate = errors / n_ref if n_ref else (0.0 if errors == 0 else math.inf)
        rows.append({"reference": ref, "hypothesis": hyp, "substitutions": counts["substitute"],
                     "insertions": counts["insert"], "deletions": counts["delete"], "errors": errors,
                     "n_ref_words": n_ref, "wer": rate})
    return rows


def worst(rows: Sequence[dict], n: int = 10) -> List[dict]:
    """The n utterances with the highest WER (ties: more errors first); error-free ones never."""
    bad = [r for r in rows if r["errors"] > 0]
    return sorted(bad, key=lambda r: (r["wer"], r["errors"]), reverse=True)[:n]
