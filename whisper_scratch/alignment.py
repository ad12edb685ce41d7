"""Decoded tokens -> times: forced alignment (Viterbi) of a transcript to the CTC head's posteriors,
and words with start, end and probability. No second model is needed: the CTC head trained beside
the decoder already says, frame by frame, which token is being spoken."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from .audio import FRAMES_PER_SECOND
from .decoding import encode

NEG_INF = float("-inf")


def ctc_viterbi(log_probs: Tensor, tokens: Sequence[int], blank: int) -> List[Tuple[int, int]]:
    """The most likely CTC path of `tokens` through log_probs (T, V): for every token, the first
    and last frame the path spends on it. The path runs over the usual extended sequence
    blank t1 blank t2 ... tN blank; a repeated token needs a blank between its two copies, so
    T must be at least N + (number of repeats), else ValueError."""
    T, n = log_probs.shape[0], len(tokens)
    repeats = sum(a == b for a, b in zip(tokens, tokens[1:]))
    if n == 0:
        return []
    if T < n + repeats:
        raise ValueError(f"cannot align {n} tokens ({repeats} repeated) to {T} frames: a CTC path needs "
                         f"at least {n + repeats}")
    ext = torch.full((2 * n + 1,), blank, dtype=torch.long)
    ext[1::2] = torch.as_tensor(list(tokens), dtype=torch.long)
    S = ext.numel()
    # s may come from s, s-1, and from s-2 when s is a token different from the token two back
    skip = torch.zeros(S, dtype=torch.bool)
    skip[3::2] = ext[3::2] != ext[1:-2:2]
    emit = log_probs.float()[:, ext]  # (T, S)
    score = torch.full((S,), NEG_INF)
    score[:2] = emit[0, :2]
    back = torch.zeros((T, S), dtype=torch.long)  # 0: stayed, 1: from s-1, 2: from s-2
    for t in range(1, T):
        prev1 = torch.cat([score.new_full((1,), NEG_INF), score[:-1]])
        prev2 = torch.cat([score.new_full((2,), NEG_INF), score[:-2]]).masked_fill(~skip, NEG_INF)
        best, arg = torch.stack([score, prev1, prev2]).max(0)
        score, back[t] = best + emit[t], arg
    return _backtrack(score, back, S, n)


def _backtrack(score: Tensor, back: Tensor, S: int, n: int) -> List[Tuple[int, int]]:
    """Follow the back-pointers from the better of the two final states (last blank or last token)."""
    s = S - 1 if score[S - 1] >= score[S - 2] else S - 2
    spans = [[-1, -1] for _ in range(n)]
    for t in range(back.shape[0] - 1, -1, -1):
        if s % 2 == 1:  # a token state
            k = s // 2
            spans[k][0] = t
            if spans[k][1] < 0:
                spans[k][1] = t
        s -= int(back[t, s])
    return [(a, b) for a, b in spans]


def word_timestamps(log_probs: Tensor, tokens: Sequence[int], tokenizer, frame_seconds: float,
                    offset: float = 0.0, end: float = float("inf")) -> List[dict]:
    """[{word, start, end, probability}] for the words of tokenizer.decode(tokens), aligned on
    log_probs (T, V) of one utterance. A word spans its tokens' frames; its probability is the
    mean posterior of its tokens on the frames they occupy. Whitespace tokens belong to no word.
    Times stop at `end` (the segment's end): an odd number of mel frames leaves the last CTC
    frame covering 10 ms, not 20."""
    tokens = list(tokens)
    spans = ctc_viterbi(log_probs, tokens, tokenizer.pad)
    probs = log_probs.float().exp()
    words: List[dict] = []
    for i, (token, (a, b)) in enumerate(zip(tokens, spans)):
        index = _word_index(tokenizer, tokens, i)
        if index is None:
            continue
        p = float(probs[a:b + 1, token].mean())
        if index == len(words):
            words.append({"start_frame": a, "end_frame": b, "p": [p]})
        else:
            words[index]["end_frame"], words[index]["p"] = b, words[index]["p"] + [p]
    texts = tokenizer.decode(tokens).split()
    return [{"word": w, "start": round(min(offset + d["start_frame"] * frame_seconds, end), 3),
             "end": round(min(offset + (d["end_frame"] + 1) * frame_seconds, end), 3),
             "probability": round(sum(d["p"]) / len(d["p"]), 4)} for w, d in zip(texts, words)]


def _word_index(tokenizer, tokens: list, i: int):
    """Which word of decode(tokens) token i belongs to (None for a whitespace token): the number
    of words in the text up to and including it, minus one."""
    piece = tokenizer.decode(tokens[i:i + 1])
    if piece and not piece.strip():
        return None
    return len(tokenizer.decode(tokens[:i + 1]).split()) - 1


def ctc_log_probs(model, xa: Tensor, xa_lens: Tensor) -> List[Tensor]:
    """The CTC head's log-posteriors of each utterance of encoder output xa (B, S, C), trimmed to
    its own frames, on the CPU."""
    if not model.dims.ctc:
        raise ValueError("word timestamps come from the CTC head; this model has none (train with --ctc-weight > 0)")
    with torch.inference_mode():
        log_probs = model.ctc_logits(xa).float().log_softmax(-1).cpu()
    return [lp[: int(n)] for lp, n in zip(log_probs, xa_lens)]


def aligned_words(log_probs: Tensor, tokens: Sequence[int], tokenizer, start: float,
                  end: float = float("inf")) -> dict:
    """{"words": [...]} for one decoded segment on its own CTC log-probs (T, V); start, end: the
    segment's times in the file. Tokens that cannot be aligned (more than the CTC frames allow)
    give no words and an `alignment_error` saying why."""
    try:  # the encoder's stride-2 conv: one CTC frame per two mel frames (20 ms)
        return {"words": word_timestamps(log_probs, tokens, tokenizer, 2 / FRAMES_PER_SECOND, start, end)}
    except ValueError as e:
        return {"words": [], "alignment_error": str(e)}


def segment_words(model, tokenizer, mel: Tensor, tokens: Sequence[int], start: float,
                  end: float = float("inf")) -> dict:
    """`aligned_words` for a segment given by the mel (n_mels, T) it was decoded from (runs the
    encoder on it; the batched paths reuse their decoding's encoder output instead)."""
    with torch.inference_mode():
        xa, xa_lens = encode(model, mel[None], torch.tensor([mel.shape[-1]]))
    return aligned_words(ctc_log_probs(model, xa, xa_lens)[0], tokens, tokenizer, start, end)
