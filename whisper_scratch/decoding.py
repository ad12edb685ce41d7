"""Features -> text for windows of at most 30 s: greedy, sampling and beam search on the
explicit KV cache, batched over utterances and beams; optional joint CTC prefix scoring;
hypotheses caught in a loop end there (`loop_cuts`); temperature fallback.

`decode` takes a batch of mels, `decode_features` encoder output, `decode_with_fallback` adds
the fallback. The search follows openai-whisper's decoding.py (same scores, ranking, fallback
rule), vectorised over the batch. Both searches return `Candidate`s grouped per utterance.
Files of any length and many files at once: longform.py; output formats: writers.py.
"""
from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field, replace
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import option, require
from .model import RowKVCache, Whisper, lengths_to_mask
from .tokenizer import Tokenizer

NEG_INF = float("-inf")
LOOP_COPIES, LOOP_MAX_PERIOD = 3, 32  # a loop: one block of at most 32 tokens, at least 3 times in a row
LOOP_CHECK_EVERY = 8  # tokens between checks: a late find only costs steps, the text is trimmed the same


# -- options and results -----------------------------------------------------------------------

@dataclass(frozen=True)
class DecodingOptions:
    """How to decode one window. temperature 0: greedy (beam_size 1) or beam search; temperature
    > 0: sampling, best_of samples per utterance. Combinations that would be ignored are rejected,
    as openai-whisper's _verify_options does."""

    beam_size: int = option(1, "1 = greedy; > 1 = beam search (temperature 0 only)")
    patience: float = option(1.0, "beam search ends after beam_size * patience finished hypotheses")
    length_penalty: Optional[float] = option(None, "none: rank by logprob / length; a: GNMT's ((5+L)/6)^a")
    temperature: float = option(0.0, "first decoding temperature (0 = greedy/beam search, > 0 = sampling)")
    best_of: int = option(1, "samples per utterance at temperature > 0")
    max_new_tokens: Optional[int] = option(None, "tokens per window (default n_text_ctx // 2, always capped "
                                                 "by the context)")
    language: Optional[str] = option(None, "language token (default: the tokenizer's first language)")
    ctc_weight: float = option(0.0, "weight of the joint CTC prefix score in beam search (needs a CTC head; "
                                    "> 0 switches to beam search even at beam size 1)")
    lm_path: Optional[str] = option(None, "a character language model (python -m whisper_scratch.lm, or an ARPA "
                                          "file) fused into beam search with weight --lm_weight")
    lm_weight: float = option(0.0, "weight of the external language model's score in beam search (shallow fusion; "
                                   "needs --lm_path; > 0 switches to beam search even at beam size 1)")
    length_bonus: float = option(0.0, "added to a hypothesis's score per text token in beam search: offsets the "
                                      "language model's preference for short outputs")
    loop_span: int = option(12, "end a hypothesis once loop_span or more of its tokens in a row repeat one block "
                                "(3+ copies) and keep the text up to one copy: a loop the model cannot leave; "
                                "counts as too repetitive for the fallback (0 = off: run to the token limit, as "
                                "openai-whisper)")
    lm: Optional[object] = option(None, "the language model (lm.TokenLM) that --lm_weight weighs", cli=False)
    prompt: Tuple[int, ...] = option((), "previous text's token ids, sent after <|startofprev|>", cli=False)
    use_cache: bool = option(True, "False re-runs the decoder on the whole prefix (for tests)", cli=False)

    def __post_init__(self):
        require(self.beam_size >= 1, f"beam_size must be >= 1, got {self.beam_size}")
        require(self.best_of >= 1, f"best_of must be >= 1, got {self.best_of}")
        require(self.patience > 0, f"patience must be > 0, got {self.patience}")
        require(self.length_penalty is None or self.length_penalty >= 0,
               f"length_penalty must be None or >= 0, got {self.length_penalty}")
        require(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}")
        require(self.max_new_tokens is None or self.max_new_tokens >= 1,
               f"max_new_tokens must be >= 1 or None, got {self.max_new_tokens}")
        require(0.0 <= self.ctc_weight <= 1.0, f"ctc_weight must be in [0, 1], got {self.ctc_weight}")
        require(self.lm_weight >= 0, f"lm_weight must be >= 0, got {self.lm_weight}")
        require(self.loop_span == 0 or self.loop_span >= LOOP_COPIES,
                f"loop_span must be 0 (off) or >= {LOOP_COPIES}, got {self.loop_span}")
        require(self.lm_weight == 0 or self.lm_path is not None or self.lm is not None,
                f"lm_weight {self.lm_weight} needs a language model: give --lm_path")
        if self.temperature > 0:  # sampling: the beam settings would be silently unused
            require(self.beam_size == 1, f"beam_size {self.beam_size} cannot be used with sampling "
                                        f"(temperature {self.temperature}); use temperature 0 for beam search")
            require(self.ctc_weight == 0, f"ctc_weight {self.ctc_weight} needs beam search; it cannot be used "
                                         f"with sampling (temperature {self.temperature})")
            require(self.lm_weight == 0 and self.length_bonus == 0,
                    f"lm_weight {self.lm_weight} and length_bonus {self.length_bonus} need beam search; they "
                    f"cannot be used with sampling (temperature {self.temperature})")
        if self.patience != 1.0:
            require(self.uses_beam_search, f"patience {self.patience} only applies to beam search, not to "
                   + (f"sampling (temperature {self.temperature})" if self.temperature > 0 else "greedy decoding "
                      "(beam_size 1, ctc_weight 0)"))
        object.__setattr__(self, "prompt", tuple(int(t) for t in self.prompt))

    @property
    def uses_beam_search(self) -> bool:
        return self.temperature == 0 and (self.beam_size > 1 or self.ctc_weight > 0 or self.lm_weight > 0)

    def at_temperature(self, t: float) -> "DecodingOptions":
        """These options for one fallback temperature: sampling drops the beam settings (they
        apply to the temperature-0 pass only), as openai-whisper's fallback does."""
        if t == 0:
            return replace(self, temperature=0.0)
        return replace(self, temperature=t, beam_size=1, patience=1.0, ctc_weight=0.0, lm_weight=0.0, length_bonus=0.0)


# Tokens a fallback sample may run past ctc_length_ratio x the CTC head's reading. On the demo test
# set (539 clips) the reference had at most 1.25x (and 13 more) tokens than the CTC head's greedy path.
CTC_LENGTH_SLACK = 10


@dataclass(frozen=True)
class FallbackOptions:
    """openai-whisper's temperature fallback: decode again at the next temperature while the text
    is too repetitive (compression ratio above the threshold) or too unlikely (avg logprob below).
    The temperatures run from DecodingOptions.temperature up to 1.0 in steps of the increment."""

    temperature_increment_on_fallback: Optional[float] = option(
        0.2, "raise the temperature by this up to 1.0 while decoding fails the thresholds; none = no fallback")
    compression_ratio_threshold: Optional[float] = option(2.4, "fall back when the text's zlib ratio is above")
    logprob_threshold: Optional[float] = option(-1.0, "fall back when the average token logprob is below")
    fallback_rows: int = option(16, "rows the fallback may sample at once: with few failing utterances it tries "
                                    "several temperatures in one batch (same results as one at a time, in fp32)")
    ctc_length_ratio: Optional[float] = option(
        1.5, "a fallback sample ends after this many times the tokens the CTC head reads in the audio, + "
             f"{CTC_LENGTH_SLACK} (sampled text babbles on after the speech; the search costs by its longest "
             "row); none = at the token limit, as openai-whisper; no effect without a CTC head")

    def __post_init__(self):
        inc = self.temperature_increment_on_fallback
        require(inc is None or inc > 0, f"temperature_increment_on_fallback must be > 0 or none, got {inc}")
        require(self.fallback_rows >= 1, f"fallback_rows must be >= 1, got {self.fallback_rows}")
        cr, lp = self.compression_ratio_threshold, self.logprob_threshold
        require(cr is None or (math.isfinite(cr) and cr > 0),
                f"compression_ratio_threshold must be a finite number > 0, or none, got {cr}")
        require(lp is None or (math.isfinite(lp) and lp <= 0),  # an average log-probability is never above 0
                f"logprob_threshold must be a finite number <= 0, or none, got {lp}")
        require(self.ctc_length_ratio is None or self.ctc_length_ratio >= 1,
                f"ctc_length_ratio must be >= 1 or none, got {self.ctc_length_ratio}")

    def temperatures(self, first: float = 0.0) -> Tuple[float, ...]:
        inc = self.temperature_increment_on_fallback
        temps = np.arange(first, 1.0 + 1e-6, inc) if inc else [first]
        return tuple(round(float(t), 6) for t in temps) or (first,)


NO_FALLBACK = FallbackOptions(temperature_increment_on_fallback=None)


@dataclass
class DecodingResult:
    text: str
    tokens: List[int]  # text tokens, without the prompt and <|endoftext|>
    sum_logprob: float  # decoder log-probability of tokens + <|endoftext|> (when reached)
    avg_logprob: float  # sum_logprob / (len(tokens) + 1), as openai-whisper
    compression_ratio: float
    temperature: float
    score: float  # the ranking score (with CTC: the joint score)
    looped: bool = False  # the search ended it in a loop; text and tokens keep one copy of the block


class Candidate(NamedTuple):
    """One finished hypothesis of a search (greedy, sampling or beam), before ranking."""

    tokens: List[int]  # new text tokens, without <|endoftext|>
    score: float  # the ranking score: the decoder logprob sum, or with CTC the joint score
    logprob: float  # the decoder logprob sum (including <|endoftext|>'s when reached)


def compression_ratio(text: str) -> float:
    """len(utf-8) / len(zlib): repetitive (hallucinated) text compresses well, above ~2.4."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def loop_cuts(tokens: Tensor, span: int) -> Tensor:
    """tokens (R, L) -> (R,) the length of each row to keep: everything before its first loop
    and one copy of the loop's block, or L when it has none. A loop: one block of p <= 32 tokens
    repeated over max(span, 3p) or more tokens in a row; the shortest block wins at the first
    place a loop is complete ("ээсээсээс" is "ээс" three times, not "ээсээс" 1.5 times)."""
    R, L = tokens.shape
    periods = min(LOOP_MAX_PERIOD, L // LOOP_COPIES)
    cut = torch.full((R,), L, dtype=torch.long, device=tokens.device)
    if span <= 0 or L < span or periods < 1:
        return cut
    padded = torch.cat([tokens.new_full((R, periods), -1), tokens], dim=1)
    p = torch.arange(1, periods + 1, device=tokens.device)
    shifted = torch.stack([padded[:, periods - k:periods - k + L] for k in range(1, periods + 1)], dim=1)
    same = tokens[:, None, :] == shifted  # (R, p, L): token j equals token j - p
    pos = torch.arange(L, device=tokens.device)
    run = pos - torch.where(same, -1, pos).cummax(dim=-1).values  # equal pairs in a row ending at j
    need = torch.clamp(LOOP_COPIES * p, min=span) - p  # a block repeated over max(span, 3p) tokens
    hit = run >= need[None, :, None]
    found = hit.any(1)  # (R, L)
    rows = found.any(1).nonzero().squeeze(1)
    if len(rows):
        j = found[rows].int().argmax(1)  # where the first loop is complete
        k = hit[rows, :, j].int().argmax(1)  # its shortest block
        cut[rows] = j - run[rows, k, j] + 1  # the region starts at j - run - p + 1; keep one block
    return cut


def _looping_rows(tokens: Tensor, first: int, span: int) -> List[int]:
    """Rows of tokens (R, L) whose generated part (from column `first`) holds a loop, checked
    every LOOP_CHECK_EVERY generated tokens. Earlier checks saw every loop completed before the
    last LOOP_CHECK_EVERY tokens, so only a window that holds a loop completed since is read."""
    n = tokens.shape[1] - first
    if span <= 0 or n < span or n % LOOP_CHECK_EVERY:
        return []
    w = min(n, LOOP_CHECK_EVERY + max(span, LOOP_COPIES * LOOP_MAX_PERIOD))
    return (loop_cuts(tokens[:, -w:], span) < w).nonzero().squeeze(1).tolist()


def needs_fallback(result: DecodingResult, fallback: FallbackOptions) -> bool:
    too_repetitive = (fallback.compression_ratio_threshold is not None
                      and (result.looped or result.compression_ratio > fallback.compression_ratio_threshold))
    too_unlikely = fallback.logprob_threshold is not None and result.avg_logprob < fallback.logprob_threshold
    return too_repetitive or too_unlikely


# -- tokens ------------------------------------------------------------------------------------

def suppress_mask(tokenizer: Tokenizer, n_vocab: int, device=None) -> Tensor:
    """(n_vocab,) bool, True for ids never to generate: every special token except <|endoftext|>
    (and any id the model has beyond the tokenizer)."""
    mask = torch.ones(n_vocab, dtype=torch.bool, device=device)
    mask[: tokenizer.n_text] = False
    mask[tokenizer.eot] = False
    return mask


def initial_tokens(tokenizer: Tokenizer, options: DecodingOptions, n_text_ctx: int) -> List[int]:
    """[<|startofprev|> prompt[-(n_text_ctx//2 - 1):]] + sot_sequence, as openai-whisper."""
    bad = [t for t in options.prompt if not 0 <= t < tokenizer.n_text]
    if bad:
        raise ValueError(f"prompt must hold text tokens (< {tokenizer.n_text}), got {bad[:5]}")
    sot = list(tokenizer.sot_sequence(options.language))
    keep = n_text_ctx // 2 - 1
    prev = [tokenizer.startofprev] + list(options.prompt[-keep:]) if options.prompt and keep > 0 else []
    return prev + sot


def _max_new_tokens(options: DecodingOptions, n_text_ctx: int, n_prompt: int) -> int:
    n_new = min(options.max_new_tokens or n_text_ctx // 2, n_text_ctx - n_prompt)
    if n_new < 1:
        raise ValueError(f"a prompt of {n_prompt} tokens leaves no room in the decoder context of {n_text_ctx}")
    return n_new


def search_setup(model: Whisper, tokenizer: Tokenizer, options: DecodingOptions, device) -> Tuple[List[int], int, Tensor]:
    """What every search starts from: the prompt tokens, how many new tokens it may add, and the
    mask of ids never to generate."""
    prompt = initial_tokens(tokenizer, options, model.dims.n_text_ctx)
    n_new = _max_new_tokens(options, model.dims.n_text_ctx, len(prompt))
    return prompt, n_new, suppress_mask(tokenizer, model.dims.n_vocab, device)


def length_normalised(score: float, length: int, length_penalty: Optional[float]) -> float:
    """openai-whisper's MaximumLikelihoodRanker: divide by the length or by GNMT's penalty.
    The length counts <|endoftext|> (the score includes its logprob), so an empty transcript,
    the right answer for silence, has length 1 rather than dividing by zero."""
    length += 1
    penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
    return score / penalty


# -- the decoder, one step at a time -----------------------------------------------------------

# A search of at most this many rows runs the fp32 copy of a bf16 model's decoder on a CPU
# (checkpoint.quantize): a bf16 linear layer costs about 35 us a call whatever the rows. Demo
# model, one step at 250 audio frames: 1.2 ms in fp32 against 2.2 ms in bf16 at 1 row, 2.4
# against 2.8 ms at 8, 3.8 against 3.6 ms at 16.
FP32_DECODER_ROWS = 8


class Inference:
    """Runs the decoder on a growing prefix. With the KV cache only the new tokens are fed and
    cross-attention K/V are computed once; without it the whole prefix is re-run (reference).
    `group` rows of tokens share one row of xa (beam search: the hypotheses of one utterance;
    sampling: its best_of samples at each temperature). A bf16 model with an fp32 decoder copy
    decodes in fp32 once at most FP32_DECODER_ROWS rows are left (from the start, or when
    finished rows leave: the cache is converted then)."""

    def __init__(self, model: Whisper, xa: Tensor, xa_lens: Tensor, use_cache: bool = True, group: int = 1):
        self.model, self.xa, self.xa_lens, self.group = model, xa, xa_lens, group
        self.decoder = model.decoder
        self.cache = model.new_cache() if use_cache else None
        self._few_rows(xa.shape[0] * group)

    def logits(self, tokens: Tensor) -> Tensor:
        """tokens (R, L), the whole prefix -> logits (R, n_vocab) for the next token, fp32."""
        if self.cache is not None:
            if self.cache.offset == 0 and self.group > 1:
                shared = self._shared_prompt(tokens)
                if shared is not None:
                    return shared
            tokens = tokens[:, self.cache.offset:]
        return self.decoder(tokens, self.xa, self.xa_lens, cache=self.cache)[:, -1]

    def _shared_prompt(self, tokens: Tensor) -> Optional[Tensor]:
        """When every row of a group holds the same prompt (beams and best_of samples start that
        way), run it once per utterance and copy its keys and values to the group's rows: a
        conditioning prompt of previous text can be a few hundred tokens, run K times over."""
        first = tokens[:: self.group]
        if not torch.equal(tokens, first.repeat_interleave(self.group, dim=0)):
            return None
        logits = self.decoder(first, self.xa, self.xa_lens, cache=self.cache)[:, -1]
        self.cache.repeat_rows(self.group)
        return logits.repeat_interleave(self.group, dim=0)

    def _few_rows(self, rows: int) -> None:
        decoder = decoder_for_rows(self.model, self.decoder, rows, self.xa.device)
        if decoder is self.decoder:
            return
        self.decoder, self.xa = decoder, self.xa.to(decoder_dtype(decoder))
        if self.cache is not None:
            self.cache.cast_(decoder_dtype(decoder))

    def reorder(self, index: Tensor, same_audio: bool = False) -> None:
        """Keep token rows `index`. same_audio: every row keeps the utterance it had (beams
        permuted within an utterance), so the audio side is unchanged and need not be copied.
        Otherwise, with groups, `index` must keep whole groups (drop finished utterances)."""
        if self.cache is not None:
            self.cache.reorder(index, cross=False)
        if same_audio:
            return
        audio = index[:: self.group] // self.group if self.group > 1 else index
        self.xa, self.xa_lens = self.xa[audio], self.xa_lens[audio]
        if self.cache is not None:
            self.cache.reorder_cross(audio)
        self._few_rows(index.shape[0])


def decoder_for_rows(model: Whisper, current: nn.Module, rows: int, device) -> nn.Module:
    """The decoder a search of `rows` rows runs: a bf16 model's fp32 copy (checkpoint.quantize)
    at most FP32_DECODER_ROWS rows, its own decoder above twice that, else `current` (the gap
    keeps a continuous-batching stream near the threshold from casting its cache at every join).
    A model without the copy, or moved off the copy's device after quantize, keeps `current`."""
    fp32 = getattr(model, "fp32_decoder", None)
    if fp32 is None or fp32.ln.weight.device != device:
        return current
    if rows <= FP32_DECODER_ROWS:
        return fp32
    return model.decoder if rows > 2 * FP32_DECODER_ROWS else current


def decoder_dtype(decoder: nn.Module) -> torch.dtype:
    return decoder.token_embedding.weight.dtype  # not the LayerNorms': a bf16 model keeps those fp32


def utterance_seeds(mel: Tensor, mel_lens: Optional[Tensor]) -> List[int]:
    """A sampling seed per utterance from its features, so that temperature fallback gives the
    same text for a file whether it is decoded alone or in any batch (and run to run)."""
    lens = mel_lens.tolist() if mel_lens is not None else [mel.shape[-1]] * mel.shape[0]
    return [int.from_bytes(hashlib.blake2b(m[:, :n].float().cpu().contiguous().numpy().tobytes(),
                                           digest_size=7).digest(), "little") for m, n in zip(mel, lens)]


def _logprobs(logits: Tensor, suppress: Tensor) -> Tensor:
    return F.log_softmax(logits.float().masked_fill(suppress, NEG_INF), dim=-1)


# -- greedy and sampling -----------------------------------------------------------------------

def sample_search(inference: Inference, tokens: Tensor, n_new: int, suppress: Tensor, eot: int,
                  temperature: Union[float, Sequence[float]] = 0.0, seeds: Optional[Sequence[int]] = None,
                  group: int = 1, loop_span: int = 0, limits: Optional[Sequence[int]] = None) -> List[List[Candidate]]:
    """Greedy (temperature 0) or sampling, every row independent. tokens (R, P): the prompt,
    `group` consecutive rows per utterance (best_of samples); `temperature`: one for all rows or
    one per row. Sampling draws each row's noise from its own generator seeded by `seeds[row]`,
    so a row's text does not depend on which other rows share its batch (exactly so in fp32; a
    bf16 model's decoder precision depends on the rows: Inference). A row caught in a loop
    (loop_cuts with loop_span) ends there; a row ends after limits[row] tokens (if given) or
    n_new. Returns per utterance its `group` candidates (score = logprob)."""
    R, P = tokens.shape
    share = getattr(inference, "group", 1)  # rows that share one audio row: they leave together
    rows = torch.arange(R, device=tokens.device)  # original row of each live row
    temps = torch.as_tensor(temperature, dtype=torch.float32, device=tokens.device).expand(R)
    sampling = temps > 0
    gens = {r: torch.Generator(tokens.device).manual_seed(int(seeds[r])) for r in sampling.nonzero().squeeze(1).tolist()}
    sum_lp = torch.zeros(R, device=tokens.device)
    limit = torch.as_tensor(limits if limits is not None else [n_new] * R, device=tokens.device).clamp(max=n_new)
    ended = torch.zeros(R, dtype=torch.bool, device=tokens.device)  # rows kept only for their audio group
    out: List[Optional[Candidate]] = [None] * R
    for step in range(n_new):
        logits = inference.logits(tokens).float().masked_fill(suppress, NEG_INF)
        logprobs = F.log_softmax(logits, dim=-1)
        nxt = logprobs.argmax(-1)
        if gens:  # Gumbel-max sample of softmax(logits / T); scored with the untempered logprobs (openai)
            live = [i for i, (r, e) in enumerate(zip(rows.tolist(), ended.tolist())) if r in gens and not e]
            u = torch.stack([torch.rand(logits.shape[-1], generator=gens[r], device=logits.device)
                             for r in rows[live].tolist()])
            t = temps[rows[live]][:, None]
            nxt[live] = (logits[live] / t - (-u.clamp(1e-12, 1 - 1e-7).log()).log()).argmax(-1)
        sum_lp = sum_lp + logprobs.gather(1, nxt[:, None]).squeeze(1)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done = (nxt == eot) | (step + 1 >= limit[rows])
        done[_looping_rows(tokens, P, loop_span)] = True
        done &= ~ended
        for i in done.nonzero().squeeze(1).tolist():
            seq, lp = tokens[i, P:].tolist(), sum_lp[i].item()
            out[int(rows[i])] = Candidate(seq[:-1] if seq[-1] == eot else seq, lp, lp)
        ended |= done
        if ended.all():
            break
        # drop finished rows so later steps cost only what is still running (with shared audio,
        # once their whole group has finished: until then they cost little, the audio is read once)
        gone = ended.view(-1, share).all(1).repeat_interleave(share) if share > 1 else ended
        if gone.any():
            keep = (~gone).nonzero().squeeze(1)
            tokens, rows, sum_lp, ended = tokens[keep], rows[keep], sum_lp[keep], ended[keep]
            inference.reorder(keep)
    return [out[i:i + group] for i in range(0, R, group)]


# -- CTC prefix scoring ------------------------------------------------------------------------

class CtcPrefixScorer:
    """CTC prefix scores for joint attention/CTC decoding (Watanabe et al. 2017; ESPnet's
    CTCPrefixScore), vectorised over hypotheses and candidate tokens.

    For a prefix g it keeps r[t] = (log P(x_1..t, g, last frame non-blank), ... blank) and psi(g),
    the log-probability of all label sequences that start with g. Extending g by c gives psi(g+c);
    extending by <|endoftext|> gives log P(exactly g). logprobs (R, T, V) with blank = `blank`.
    """

    def __init__(self, logprobs: Tensor, lens: Tensor, blank: int, eot: int):
        self.x = logprobs.transpose(0, 1).float()  # (T, R, V)
        T, R, _ = self.x.shape
        self.lens, self.blank, self.eot = lens, blank, eot
        self.t_mask = torch.arange(T, device=lens.device)[:, None] < lens[None, :]  # (T, R)
        blank_lp = self.x[:, :, blank].masked_fill(~self.t_mask, 0.0)
        # empty prefix: only blanks so far (held constant past each utterance's end)
        self.r = torch.stack([torch.full_like(blank_lp, NEG_INF), blank_lp.cumsum(0)], dim=-1)  # (T, R, 2)
        self.psi = torch.zeros(R, device=lens.device)
        self.last = torch.full((R,), -1, dtype=torch.long, device=lens.device)
        self.empty = True

    def score(self, cand: Tensor) -> Tuple[Tensor, Tensor]:
        """cand (R, C) token ids -> (psi of each extension (R, C), its r (T, R, C, 2))."""
        T, R = self.x.shape[:2]
        xc = self.x.gather(2, cand[None].expand(T, -1, -1))  # (T, R, C)
        r_n_g, r_b_g = self.r[..., 0, None], self.r[..., 1, None]  # (T, R, 1)
        # a repeated label needs a blank in between: only paths ending in blank may extend
        same = (cand == self.last[:, None])[None]
        phi = torch.logaddexp(r_b_g, torch.where(same, NEG_INF, r_n_g))  # (T, R, C)
        r_n = torch.full_like(xc, NEG_INF)  # (T, R, C): paths of g+c ending in c / in blank
        r_b = torch.full_like(xc, NEG_INF)
        if self.empty:
            r_n[0] = xc[0]
        blank_lp = self.x[:, :, self.blank, None]
        for t in range(1, T):  # the recursion is sequential in time; vectorised over R and C
            m = self.t_mask[t][:, None]  # past an utterance's end its r stays as at its last frame
            r_n[t] = torch.where(m, torch.logaddexp(r_n[t - 1], phi[t - 1]) + xc[t], r_n[t - 1])
            r_b[t] = torch.where(m, torch.logaddexp(r_n[t - 1], r_b[t - 1]) + blank_lp[t], r_b[t - 1])
        r = torch.stack([r_n, r_b], dim=-1)
        # psi(g+c) = sum over the first frame emitting c: r_n at t=0 plus phi[t-1] + x_t(c)
        starts = torch.cat([r_n[:1], phi[:-1] + xc[1:]], dim=0)
        psi = starts.masked_fill(~self.t_mask[..., None], NEG_INF).logsumexp(0)
        end = self.r[self.lens - 1, torch.arange(R, device=xc.device)].logsumexp(-1)  # (R,)
        psi = torch.where(cand == self.eot, end[:, None], psi)
        return psi, r

    def advance(self, rows: Tensor, cols: Tensor, psi: Tensor, r: Tensor, tokens: Tensor) -> None:
        """Hypothesis i becomes row rows[i] extended by its candidate cols[i] (= tokens[i])."""
        self.r, self.psi, self.last = r[:, rows, cols], psi[rows, cols], tokens
        self.x, self.lens, self.t_mask = self.x[:, rows], self.lens[rows], self.t_mask[:, rows]
        self.empty = False

    def reorder(self, index: Tensor) -> None:
        self.r, self.psi, self.last = self.r[:, index], self.psi[index], self.last[index]
        self.x, self.lens, self.t_mask = self.x[:, index], self.lens[index], self.t_mask[:, index]


# -- language model fusion ---------------------------------------------------------------------

class LmScorer:
    """Shallow fusion: the LM state of every live hypothesis (lm.TokenLM states), reordered and
    extended with the beams; `scores` is log P_lm of every next token, (R, V)."""

    def __init__(self, lm, rows: int, device):
        self.lm, self.device = lm, device
        self.states = [lm.start()] * rows

    def scores(self) -> Tensor:
        return torch.from_numpy(np.stack([self.lm.scores(s) for s in self.states])).to(self.device)

    def advance(self, rows: Tensor, tokens: Tensor) -> None:
        self.states = [self.lm.advance(self.states[r], t) for r, t in zip(rows.tolist(), tokens.tolist())]

    def reorder(self, index: Tensor) -> None:
        self.states = [self.states[i] for i in index.tolist()]


@dataclass
class Fusion:
    """What beam search adds to the decoder's scores: the CTC prefix score (weight w: the
    decoder's logprob counts 1 - w), the LM's score times lm_weight, and a bonus per text token."""

    ctc: Optional[CtcPrefixScorer] = None
    ctc_weight: float = 0.0
    lm: Optional[LmScorer] = None
    lm_weight: float = 0.0
    length_bonus: float = 0.0

    def extra(self, logprobs: Tensor, eot: int) -> Optional[Tensor]:
        """(R, V) LM and length terms of every extension, or None when there are none (so the
        search without them is exactly the plain one)."""
        if self.lm is None and self.length_bonus == 0:
            return None
        out = self.lm_weight * self.lm.scores() if self.lm is not None else torch.zeros_like(logprobs)
        out = out + self.length_bonus
        out[:, eot] -= self.length_bonus  # ending adds no token
        return out


_BOUND_LMS: dict = {}


def with_language_model(options: DecodingOptions, tokenizer: Tokenizer, n_vocab: int) -> DecodingOptions:
    """`options` with --lm_path loaded and bound to the tokenizer (lm.TokenLM), once per file and
    tokenizer: entry points call it at start so a bad file fails before the first clip."""
    if options.lm is not None or options.lm_path is None:
        return options
    from .lm import bind

    key = (str(options.lm_path), id(tokenizer), n_vocab)
    if key not in _BOUND_LMS:
        _BOUND_LMS.clear()  # one model at a time: they hold large tables
        _BOUND_LMS[key] = (bind(options.lm_path, tokenizer, n_vocab), tokenizer)  # tokenizer: keeps id() unique
    return replace(options, lm=_BOUND_LMS[key][0])


# -- beam search -------------------------------------------------------------------------------

@dataclass
class _Beams:
    """Live hypotheses of the utterances still searching: rows are audio-major, K per audio."""

    tokens: Tensor  # (b*K, L)
    scores: Tensor  # (b, K) ranking score (joint with CTC)
    att: Tensor  # (b, K) decoder logprob sum
    audios: list  # original utterance index of each live audio
    finished: List[List[Candidate]] = field(default_factory=list)  # per utterance


def _candidates(logprobs: Tensor, beams: _Beams, K: int, fusion: Fusion, eot: int):
    """Scores of every extension: (token ids, decoder sums, ranking scores), each (b, K, C)."""
    b, V = beams.scores.shape[0], logprobs.shape[-1]
    ctc, w, extra = fusion.ctc, fusion.ctc_weight, fusion.extra(logprobs, eot)
    if ctc is None:
        att = beams.att[..., None] + logprobs.view(b, K, V)
        if extra is None:
            return None, att, att, None
        return None, att, beams.scores[..., None] + (logprobs + extra).view(b, K, V), None
    # Pre-beam on the full scorers (decoder and LM; ESPnet: 1.5 x beam) keeps the CTC forward
    # pass small; with CTC alone (weight 1) the decoder has no say, so every token is scored.
    n_pre = V if w == 1.0 else min(V, max(K + 1, int(1.5 * K)))
    pre = logprobs if extra is None or w == 1.0 else (1 - w) * logprobs + extra
    cand = pre.topk(n_pre, dim=-1).indices  # (b*K, C)
    lp = logprobs.gather(1, cand)
    psi, r = ctc.score(cand)
    # a prefix CTC finds impossible (psi -inf) cannot be extended: avoid -inf - -inf = nan
    # (and 0 * -inf = nan for suppressed tokens when the weight is 1)
    ok = torch.isfinite(lp) & torch.isfinite(ctc.psi)[:, None]
    gain = torch.where(ok, (1 - w) * lp + w * (psi - ctc.psi[:, None]), NEG_INF)
    if extra is not None:
        gain = gain + extra.gather(1, cand)
    score = beams.scores[..., None] + gain.view(b, K, -1)
    return cand.view(b, K, -1), beams.att[..., None] + lp.view(b, K, -1), score, (psi, r)


def _beam_step(beams: _Beams, logprobs: Tensor, K: int, eot: int, max_cand: int, P: int, fusion: Fusion) -> Tensor:
    """Extend every live hypothesis; record ended ones; return the source row of each new one."""
    ctc = fusion.ctc
    cand, att, score, ctc_out = _candidates(logprobs, beams, K, fusion, eot)
    b, C = score.shape[0], score.shape[-1]
    top, idx = score.view(b, -1).topk(2 * K, dim=-1)
    src, col = idx // C, idx % C
    tok = col if cand is None else cand.view(b, -1).gather(1, idx)
    att_top = att.view(b, -1).gather(1, idx)
    is_eot = tok == eot
    rank = (~is_eot).cumsum(1)  # continuing hypotheses ranked up to here
    keep = ~is_eot & (rank <= K)  # exactly K per audio: at most K of the 2K candidates are eot
    ended = is_eot & (rank < K) & torch.isfinite(top)  # eot ranked above the K-th continuing one
    for i, j in ended.nonzero().tolist():
        done = beams.finished[beams.audios[i]]
        if len(done) < max_cand:
            done.append(Candidate(beams.tokens[i * K + src[i, j], P:].tolist(), top[i, j].item(),
                                  att_top[i, j].item()))
    kept = keep.nonzero()[:, 1].view(b, K)  # the kept candidates' columns, best first
    kept = kept.gather(1, _children_in_place(src.gather(1, kept), K))
    rows = (torch.arange(b, device=src.device)[:, None] * K + src.gather(1, kept)).flatten()
    new_tok = tok.gather(1, kept).view(-1)
    if ctc is not None:
        ctc.advance(rows, col.gather(1, kept).view(-1), *ctc_out, new_tok)
    if fusion.lm is not None:
        fusion.lm.advance(rows, new_tok)
    beams.tokens = torch.cat([beams.tokens[rows], new_tok[:, None]], dim=1)
    beams.scores, beams.att = top.gather(1, kept), att_top.gather(1, kept)
    return rows


def _children_in_place(parent: Tensor, K: int) -> Tensor:
    """An order of each audio's K new hypotheses (parent (b, K): their source beams) that puts a
    child in its parent's slot wherever it can: each parent's best child takes the parent's slot,
    the other children fill the slots of parents that left none. The KV cache then copies only
    the rows whose source is another row (KVCache.reorder), often half or fewer, where a sorted
    order moves nearly all of them; which slot holds which hypothesis does not change the search.
    Returns order (b, K): slot s gets hypothesis order[:, s]."""
    slots = torch.arange(K, device=parent.device)
    onehot = parent[..., None] == slots  # (b, hypothesis, slot)
    first = (onehot & (onehot.cumsum(1) == 1)).any(-1)  # the best child of its parent
    free = torch.argsort(onehot.any(1).to(torch.int8), dim=1, stable=True)  # childless slots first, in order
    extra = ((~first).cumsum(1) - 1).clamp(min=0)  # the j-th other child takes the j-th free slot
    slot = torch.where(first, parent, free.gather(1, extra))
    return torch.empty_like(slot).scatter_(1, slot, slots.expand_as(slot).contiguous())


def _end_loops(beams: _Beams, K: int, P: int, max_cand: int, span: int) -> None:
    """Hypotheses caught in a loop end where they are (recorded like an ended one, without
    <|endoftext|>'s score) and leave the beam: their score becomes -inf."""
    for row in _looping_rows(beams.tokens, P, span):
        i, j = divmod(row, K)
        score = beams.scores[i, j].item()
        if not np.isfinite(score):
            continue
        done = beams.finished[beams.audios[i]]
        if len(done) < max_cand:
            done.append(Candidate(beams.tokens[row, P:].tolist(), score, beams.att[i, j].item()))
        beams.scores[i, j] = NEG_INF


def _drop_done(beams: _Beams, inference: Inference, fusion: Fusion, K: int, max_cand: int) -> bool:
    """Remove utterances with enough ended hypotheses; True when none is left."""
    live = [i for i, a in enumerate(beams.audios) if len(beams.finished[a]) < max_cand]
    if len(live) == len(beams.audios):
        return False
    if not live:
        return True
    live_t = torch.tensor(live, device=beams.tokens.device)
    rows = (live_t[:, None] * K + torch.arange(K, device=live_t.device)).flatten()
    beams.tokens, beams.scores, beams.att = beams.tokens[rows], beams.scores[live_t], beams.att[live_t]
    beams.audios = [beams.audios[i] for i in live]
    inference.reorder(rows)
    for scorer in (fusion.ctc, fusion.lm):
        if scorer is not None:
            scorer.reorder(rows)
    return False


def beam_search(inference: Inference, tokens: Tensor, n_new: int, suppress: Tensor, eot: int, K: int,
                patience: float = 1.0, ctc: Optional[CtcPrefixScorer] = None, ctc_weight: float = 0.0,
                lm: Optional[LmScorer] = None, lm_weight: float = 0.0,
                length_bonus: float = 0.0, loop_span: int = 0) -> List[List[Candidate]]:
    """openai-whisper's beam search, batched: tokens (B*K, P) holds each utterance's prompt K
    times. Stops an utterance once round(K * patience) hypotheses ended (a hypothesis caught in
    a loop, see loop_cuts, ends too); returns per utterance its finished candidates (score:
    joint with CTC and the LM; logprob: the decoder's sum)."""
    fusion = Fusion(ctc, ctc_weight, lm, lm_weight, length_bonus)
    n_audio, P = tokens.shape[0] // K, tokens.shape[1]
    max_cand = max(1, round(K * patience))
    scores = torch.full((n_audio, K), NEG_INF, device=tokens.device)
    scores[:, 0] = 0.0  # the K copies of the prompt are one hypothesis: start only the first
    beams = _Beams(tokens, scores, scores.clone(), list(range(n_audio)), [[] for _ in range(n_audio)])
    for step in range(n_new):
        logprobs = _logprobs(inference.logits(beams.tokens), suppress)
        rows = _beam_step(beams, logprobs, K, eot, max_cand, P, fusion)
        _end_loops(beams, K, P, max_cand, loop_span)
        if step == n_new - 1:
            break
        inference.reorder(rows, same_audio=True)
        if _drop_done(beams, inference, fusion, K, max_cand):
            break
    # utterances that hit the length limit: fill up with the best unfinished hypotheses (even
    # a -inf one when nothing else exists, so every utterance gets a result)
    for i, a in enumerate(beams.audios):
        done = beams.finished[a]
        for j in beams.scores[i].argsort(descending=True).tolist():
            if len(done) >= max_cand or (done and not np.isfinite(beams.scores[i, j].item())):
                break
            done.append(Candidate(beams.tokens[i * K + j, P:].tolist(), beams.scores[i, j].item(),
                                  beams.att[i, j].item()))
    return beams.finished


# -- decode: a batch of windows ----------------------------------------------------------------

def encode(model: Whisper, mel: Tensor, mel_lens: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """mel (B, n_mels, T) -> (xa (B, S, C), xa_lens (B,)) on the model's device and dtype."""
    p = model.encoder.conv1.weight
    if mel.ndim != 3 or mel.shape[1] != model.dims.n_mels:
        raise ValueError(f"mel must be (batch, {model.dims.n_mels}, frames), got {tuple(mel.shape)}")
    if mel_lens is None:
        mel_lens = torch.full((mel.shape[0],), mel.shape[-1], dtype=torch.long)
    mel_lens = mel_lens.to(p.device)
    if (mel_lens < 1).any() or (mel_lens > mel.shape[-1]).any():
        raise ValueError(f"mel_lens must be in [1, {mel.shape[-1]}], got {mel_lens.tolist()}")
    mel = mel.to(device=p.device, dtype=p.dtype)
    groups = length_groups(mel_lens.tolist())
    if len(groups) == 1:
        return model.encoder(mel, mel_lens), model.encoder.output_lengths(mel_lens)
    # Encoding cost grows with the padded frames: a batch of mixed lengths (a server's requests)
    # is encoded in groups of similar length, each trimmed to its longest (16 requests of the demo
    # test set: 190 ms against 300 ms padded to the longest). Each row's output does not depend on
    # its padding; past its group's longest xa is zero (every reader masks past a row's length).
    xa = None
    for g in groups:
        idx = torch.tensor(g, device=p.device)
        n = int(mel_lens[idx].max())
        out = model.encoder(mel[idx, :, :n], mel_lens[idx])
        if xa is None:
            xa = out.new_zeros(mel.shape[0], (mel.shape[-1] + 1) // 2, out.shape[-1])
        xa[idx, :out.shape[1]] = out
    return xa, model.encoder.output_lengths(mel_lens)


def length_groups(lens: Sequence[int], ratio: float = 1.2) -> List[List[int]]:
    """Indices of `lens` in groups of similar length, longest first: a group ends where the next
    length is shorter than its longest / ratio, so padding within a group stays under ratio - 1."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups: List[List[int]] = []
    for i in order:
        if groups and lens[groups[-1][0]] <= ratio * lens[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def decode(model: Whisper, mel: Tensor, mel_lens: Optional[Tensor], tokenizer: Tokenizer,
           options: DecodingOptions = DecodingOptions()) -> List[DecodingResult]:
    """Decode a batch of windows of at most 2 * n_audio_ctx frames (30 s): one result each.

    mel (B, n_mels, T) padded, mel_lens (B,) real frames (None: all T). Runs under inference
    mode and does not change the model's train/eval mode (the model has no dropout).
    """
    with torch.inference_mode():
        xa, xa_lens = encode(model, mel, mel_lens)
        seeds = utterance_seeds(mel, mel_lens) if options.temperature > 0 else None
        return decode_features(model, xa, xa_lens, tokenizer, options, seeds)


def decode_features(model: Whisper, xa: Tensor, xa_lens: Tensor, tokenizer: Tokenizer,
                    options: DecodingOptions, seeds: Optional[Sequence[int]] = None) -> List[DecodingResult]:
    """The search on encoder output xa (B, S, C); see `decode`. seeds: one per utterance for
    sampling (default: drawn from torch's global generator)."""
    with torch.inference_mode():
        prompt, n_new, suppress = search_setup(model, tokenizer, options, xa.device)
        if options.uses_beam_search:
            cands = _beam_candidates(model, xa, xa_lens, tokenizer, options, prompt, n_new, suppress)
        else:
            cands = _sampled_candidates(model, xa, xa_lens, tokenizer, options, prompt, n_new, suppress, seeds)
        return [_best(c, tokenizer, options) for c in cands]


def _beam_candidates(model: Whisper, xa: Tensor, xa_lens: Tensor, tokenizer: Tokenizer, options: DecodingOptions,
                     prompt: List[int], n_new: int, suppress: Tensor) -> List[List[Candidate]]:
    """Beam search (joint with CTC when ctc_weight > 0): the beams of an utterance share its
    audio, read once per step."""
    B, K = xa.shape[0], options.beam_size
    rows = torch.arange(B, device=xa.device).repeat_interleave(K)
    inference = Inference(model, xa, xa_lens, options.use_cache, group=K)
    tokens = torch.tensor(prompt, device=xa.device).repeat(B * K, 1)
    ctc = _ctc_scorer(model, xa, xa_lens, rows, tokenizer) if options.ctc_weight > 0 else None
    lm = None
    if options.lm_weight > 0:
        lm = LmScorer(with_language_model(options, tokenizer, model.dims.n_vocab).lm, B * K, xa.device)
    return beam_search(inference, tokens, n_new, suppress, tokenizer.eot, K, options.patience, ctc, options.ctc_weight,
                       lm, options.lm_weight, options.length_bonus, options.loop_span)


def _sampled_candidates(model: Whisper, xa: Tensor, xa_lens: Tensor, tokenizer: Tokenizer,
                        options: DecodingOptions, prompt: List[int], n_new: int, suppress: Tensor,
                        seeds: Optional[Sequence[int]], temperatures: Sequence[float] = (),
                        limits: Optional[Sequence[int]] = None) -> List[List[Candidate]]:
    """Greedy (one row per utterance) or best_of samples per utterance, each row with its own
    seed. temperatures: several sampling temperatures decoded together; the candidates come per
    (temperature, utterance), temperature-major. limits: at most this many tokens per utterance.
    An utterance's rows (every sample at every temperature) share its audio row, as beams do:
    its cross-attention keys and values are read once per step for all of them."""
    temps = list(temperatures) or [options.temperature]
    B, T = xa.shape[0], len(temps)
    n = options.best_of if temps[0] > 0 else 1
    require(len(temps) == 1 or min(temps) > 0, f"temperatures decoded together must all sample, got {temps}")
    G = n * T  # rows per utterance, utterance-major
    inference = Inference(model, xa, xa_lens, options.use_cache, group=G)
    tokens = torch.tensor(prompt, device=xa.device).repeat(B * G, 1)
    if seeds is None:  # drawn even when greedy, so the global generator advances the same way
        seeds = torch.randint(0, 2**62, (B,)).tolist()
    # sample k of utterance i: its own stream, different for every temperature
    row_seeds = [hash((int(s), k, t)) & (2**63 - 1) for s in seeds for t in temps for k in range(n)]
    row_temps = [t for _ in range(B) for t in temps for _ in range(n)]
    row_limits = [int(limits[i]) for i in range(B) for _ in range(G)] if limits is not None else None
    found = sample_search(inference, tokens, n_new, suppress, tokenizer.eot, row_temps, row_seeds, group=n,
                          loop_span=options.loop_span, limits=row_limits)  # per (utterance, temperature)
    return [found[i * T + j] for j in range(T) for i in range(B)]


def decode_at_temperatures(model: Whisper, xa: Tensor, xa_lens: Tensor, tokenizer: Tokenizer,
                           options: DecodingOptions, temperatures: Sequence[float],
                           seeds: Sequence[int], limits: Optional[Sequence[int]] = None) -> List[List[DecodingResult]]:
    """Sampling at several temperatures (all > 0) in one batch: per utterance, its result at each
    temperature, each what `decode_features` at that temperature gives it (in fp32: a bf16
    model's precision depends on the rows). limits: at most this many tokens per utterance
    (default: the options' limit)."""
    with torch.inference_mode():
        prompt, n_new, suppress = search_setup(model, tokenizer, options, xa.device)
        opts = [options.at_temperature(t) for t in temperatures]
        cands = _sampled_candidates(model, xa, xa_lens, tokenizer, opts[0], prompt, n_new, suppress, seeds,
                                    temperatures, limits)
        B = xa.shape[0]
        return [[_best(cands[j * B + i], tokenizer, o) for j, o in enumerate(opts)] for i in range(B)]


def _ctc_scorer(model: Whisper, xa: Tensor, xa_lens: Tensor, rows: Tensor, tokenizer: Tokenizer) -> CtcPrefixScorer:
    """CTC log-probs of each utterance (blank = <|pad|>), one copy per beam row."""
    if not model.dims.ctc:
        raise ValueError("ctc_weight > 0 needs a model with a CTC head (dims.ctc is False)")
    logprobs = F.log_softmax(model.ctc_logits(xa).float(), dim=-1)
    return CtcPrefixScorer(logprobs[rows], xa_lens[rows], blank=tokenizer.pad, eot=tokenizer.eot)


def _best(cands: List[Candidate], tokenizer: Tokenizer, options: DecodingOptions) -> DecodingResult:
    """Rank one utterance's candidates by length-normalised score (openai's ranker); the best one's
    text ends at its first loop, with one copy of the loop's block (loop_cuts; the scores stay
    those of the search)."""
    best = max(cands, key=lambda c: length_normalised(c.score, len(c.tokens), options.length_penalty))
    keep = int(loop_cuts(torch.tensor([best.tokens], dtype=torch.long), options.loop_span)[0]) if best.tokens else 0
    tokens = best.tokens[:keep]
    text, lp = tokenizer.decode(tokens), best.logprob
    return DecodingResult(text=text, tokens=tokens, sum_logprob=lp, avg_logprob=lp / (len(best.tokens) + 1),
                          compression_ratio=compression_ratio(text), temperature=options.temperature,
                          score=best.score, looped=keep < len(best.tokens))


def decode_with_fallback(model: Whisper, mel: Tensor, mel_lens: Optional[Tensor], tokenizer: Tokenizer,
                         options: DecodingOptions = DecodingOptions(),
                         fallback: FallbackOptions = FallbackOptions()) -> List[DecodingResult]:
    """`decode` at each temperature in turn, re-decoding only the utterances that still need it
    (the last temperature's result is kept whatever it is, as openai-whisper). Encodes once."""
    xa, xa_lens, seeds = encode_for_fallback(model, mel, mel_lens, options, fallback)
    return fall_back(model, xa, xa_lens, tokenizer, options, fallback, seeds)


def encode_for_fallback(model: Whisper, mel: Tensor, mel_lens: Optional[Tensor], options: DecodingOptions,
                        fallback: FallbackOptions) -> Tuple[Tensor, Tensor, List[int]]:
    """(xa, xa_lens, seeds): what `fall_back` and `fallback_stages` decode from (one encoder pass
    serves the search, its fallback and a CTC word alignment)."""
    with torch.inference_mode():
        xa, xa_lens = encode(model, mel, mel_lens)
        temperatures = fallback.temperatures(options.temperature)
        seeds = utterance_seeds(mel, mel_lens) if max(temperatures) > 0 else [0] * xa.shape[0]
        return xa, xa_lens, seeds


def fall_back(model: Whisper, xa: Tensor, xa_lens: Tensor, tokenizer: Tokenizer, options: DecodingOptions,
              fallback: FallbackOptions, seeds: Sequence[int], first: Optional[list] = None) -> list:
    """The fallback loop on encoder output xa (B, S, C): decode at each temperature in turn,
    again only the utterances that still fail the thresholds. `first`: the results of the first
    temperature when they are already known (continuous batching decodes that pass itself)."""
    results: list = [None] * xa.shape[0]
    for stage in fallback_stages(model, xa, xa_lens, tokenizer, options, fallback, seeds, first):
        for i, r in stage:
            results[i] = r
    return results


def fallback_stages(model: Whisper, xa: Tensor, xa_lens: Tensor, tokenizer: Tokenizer, options: DecodingOptions,
                    fallback: FallbackOptions, seeds: Sequence[int],
                    first: Optional[list] = None) -> Iterator[List[Tuple[int, DecodingResult]]]:
    """`fall_back` stage by stage: after the first pass, and after each round of higher
    temperatures, the utterances whose result is now final (it passes the thresholds, or no
    temperature is left) as (index, result). A caller can hand those on (a server answers
    them) while the few that fail are decoded again."""
    temperatures = fallback.temperatures(options.temperature)
    results = list(first) if first is not None else \
        decode_features(model, xa, xa_lens, tokenizer, options.at_temperature(temperatures[0]), seeds)
    left = list(temperatures[1:])
    todo = [i for i, r in enumerate(results) if left and needs_fallback(r, fallback)]
    failing = set(todo)
    yield [(i, r) for i, r in enumerate(results) if i not in failing]
    limits = None  # per failing utterance, the tokens its samples may hold
    if todo and (found := sample_limits(model, xa[todo], xa_lens[todo], tokenizer, fallback)) is not None:
        limits = dict(zip(todo, found.tolist()))
    while todo:
        # the batch has room: try the next few temperatures at once (the first that passes wins,
        # as one at a time), rather than a few rows for each temperature in turn
        k = max(1, min(len(left), fallback.fallback_rows // (len(todo) * options.best_of)))
        run, left = left[:k], left[k:]
        idx = torch.tensor(todo, device=xa.device)
        found = decode_at_temperatures(model, xa[idx], xa_lens[idx], tokenizer, options, run, [seeds[i] for i in todo],
                                       None if limits is None else [limits[i] for i in todo])
        for i, tried in zip(todo, found):
            for r in tried:
                results[i] = r
                if not needs_fallback(r, fallback):
                    break
        failing = {i for i in todo if left and needs_fallback(results[i], fallback)}
        yield [(i, results[i]) for i in todo if i not in failing]
        todo = [i for i in todo if i in failing]


def ctc_lengths(model: Whisper, xa: Tensor, xa_lens: Tensor, blank: int) -> Tensor:
    """(B,) tokens on the CTC head's greedy path of each utterance (repeats merged, blanks dropped)."""
    with torch.inference_mode():
        path = model.ctc_logits(xa).argmax(-1)  # (B, S)
        new = path != F.pad(path, (1, 0), value=-1)[:, :-1]
        return ((path != blank) & new & lengths_to_mask(xa_lens.to(path.device), path.shape[1])).sum(1)


def sample_limits(model: Whisper, xa: Tensor, xa_lens: Tensor, tokenizer: Tokenizer,
                  fallback: FallbackOptions) -> Optional[Tensor]:
    """(B,) most tokens a fallback sample of each utterance may hold, or None (no CTC head, or
    fallback.ctc_length_ratio none)."""
    if fallback.ctc_length_ratio is None or not model.dims.ctc:
        return None
    n = ctc_lengths(model, xa, xa_lens, tokenizer.pad).float()
    return (n * fallback.ctc_length_ratio).ceil().long() + CTC_LENGTH_SLACK


# -- continuous batching -----------------------------------------------------------------------

class GreedyStream:
    """Greedy decoding where utterances join and leave the batch at any step (continuous
    batching): a server's batch of mixed lengths no longer runs until its longest utterance is
    done while new requests wait; they join at the next step.

    `add` runs the new utterances' prompts (a plain KV cache, as `decode_features`) and takes
    their first token; `step` advances every live utterance by one token. Both return the
    utterances that ended, as (key, DecodingResult at temperature 0); those failing the fallback
    thresholds go on through `fall_back(..., first=...)`. Greedy rows do not interact, so each
    gets what `decode_features` gives it alone, up to float rounding in the padded attention."""

    def __init__(self, model: Whisper, tokenizer: Tokenizer, options: DecodingOptions):
        require(options.temperature == 0 and not options.uses_beam_search,
                f"continuous batching decodes greedily; got temperature {options.temperature}, beam_size "
                f"{options.beam_size}, ctc_weight {options.ctc_weight}, lm_weight {options.lm_weight}")
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.prompt, self.n_new, self.suppress = search_setup(model, tokenizer, options,
                                                              model.decoder.token_embedding.weight.device)
        self.cache = RowKVCache(model.dims.n_text_ctx)
        self.decoder = model.decoder
        self.keys: list = []
        self.tokens: List[List[int]] = []  # new tokens of each live row
        self.sum_lp = torch.zeros(0, device=self.suppress.device)

    def __len__(self) -> int:
        return len(self.keys)

    def _fit_precision(self, rows: int) -> None:
        """The decoder for `rows` running rows (decoder_for_rows: a bf16 model decodes few rows
        with its fp32 copy, as Inference does); the cache is cast when it changes."""
        decoder = decoder_for_rows(self.model, self.decoder, rows, self.suppress.device)
        if decoder is not self.decoder:
            self.decoder = decoder
            if self.cache.rows:
                self.cache.cast_(decoder_dtype(decoder))

    def add(self, xa: Tensor, xa_lens: Tensor, keys: Sequence) -> list:
        """Start utterances `keys` on encoder output xa (n, S, C)."""
        with torch.inference_mode():
            self._fit_precision(len(self.keys) + xa.shape[0])
            xa = xa.to(decoder_dtype(self.decoder))
            plain = self.model.new_cache()
            prompt = torch.tensor(self.prompt, device=xa.device).repeat(xa.shape[0], 1)
            logits = self.decoder(prompt, xa, xa_lens, cache=plain)[:, -1]
            self.cache.join(plain, xa_lens)
            self.keys += list(keys)
            self.tokens += [[] for _ in keys]
            self.sum_lp = torch.cat([self.sum_lp, self.sum_lp.new_zeros(len(keys))])
            return self._advance(logits, len(self.keys) - len(keys))

    def step(self) -> list:
        """One token for every live utterance."""
        if not self.keys:
            return []
        with torch.inference_mode():
            last = torch.tensor([t[-1] for t in self.tokens], device=self.sum_lp.device)[:, None]
            return self._advance(self.decoder(last, None, cache=self.cache)[:, -1], 0)

    def _advance(self, logits: Tensor, first: int) -> list:
        """Append the greedy choice from logits (rows first..) and retire the rows that ended."""
        logprobs = _logprobs(logits, self.suppress)
        nxt = logprobs.argmax(-1)
        self.sum_lp[first:] += logprobs.gather(1, nxt[:, None]).squeeze(1)
        ended = []
        for row, t in enumerate(nxt.tolist(), start=first):
            self.tokens[row].append(t)
            n = len(self.tokens[row])
            if t == self.tokenizer.eot or n == self.n_new or (n % LOOP_CHECK_EVERY == 0 and _looping_rows(
                    torch.tensor([self.tokens[row]]), 0, self.options.loop_span)):
                ended.append(row)
        if not ended:
            return []
        out = []
        for row in ended:
            seq, lp = self.tokens[row], self.sum_lp[row].item()
            cand = Candidate(seq[:-1] if seq[-1] == self.tokenizer.eot else seq, lp, lp)
            out.append((self.keys[row], _best([cand], self.tokenizer, self.options)))
        gone = set(ended)
        keep = [r for r in range(len(self.keys)) if r not in gone]
        self.cache.keep(torch.tensor(keep, dtype=torch.long, device=self.sum_lp.device))
        self.keys, self.tokens = [self.keys[r] for r in keep], [self.tokens[r] for r in keep]
        self.sum_lp = self.sum_lp[keep]
        self._fit_precision(len(self.keys))
        return out
