"""Export to CTranslate2, in the padded vocabulary layout that faster-whisper reads.

CTranslate2's own converter runs on the HF export (hf.py), in faster-whisper's padded layout
(below) unless `compact`.

The folder holds tokenizer.json and preprocessor_config.json, the files faster-whisper reads:
`WhisperModel(folder).transcribe(audio, language="mn", without_timestamps=True, beam_size=1)` gives
our greedy transcript; faster-whisper's default without_timestamps=False gives the same text
(tested) unless decoding runs to its 224-token cap (the layout notes, 5). ctranslate2 is imported
only by export_ct2.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Union

import torch

from ..model import Whisper
from ..tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from .hf import export_hf

CT2_QUANTIZATIONS = ("float32", "int8", "int8_float32", "float16", "int8_float16", "bfloat16", "int16")


# -- the padded layout that faster-whisper needs ----------------------------------------------
#
# faster-whisper and CTranslate2 read a Whisper model through openai's vocabulary layout:
#  1. CTranslate2 calls a model multilingual when its vocabulary has 51,865 tokens (before 4.6) or
#     holds the empty-string token (4.6 and later; measured on 4.8.5). Otherwise faster-whisper
#     ignores `language` and builds the English-only prompt <|startoftranscript|><|notimestamps|>.
#  2. The number of languages is taken as id(<|nospeech|>) - id(<|startoftranscript|>) - 5.
#  3. faster-whisper's tokenizer must know <|translate|>, <|startoflm|> and <|nospeech|> (it
#     suppresses them) and encode " -" and " '" to at least one token (its non-speech list takes
#     the first; our normaliser deletes both), see fw_extra_tokens.
#  4. It suppresses its own list of ids, not ours: our languages, <|notimestamps|> and <|pad|>,
#     and the ids added for 1-3, would be free to win.
# So the CTranslate2 export appends <|nospeech|> right after <|pad|> (which makes 2 come out as our
# number of languages), the other tokens of 3, fillers up to 51,865 (the last one named "" in
# CTranslate2's vocabulary), and unties the output projection: every id that we never generate
# (every special but <|endoftext|>, and all the added ones) gets a projection row whose logit is
# the same large negative constant whatever the decoder state (pinned_row). The input embeddings
# of our own tokens are unchanged. The model then decodes as ours does, whichever suppress list
# the caller passes.
#  5. With faster-whisper's default `without_timestamps=False` the prompt is <|startoftranscript|>
#     <|lang|> <|transcribe|> without <|notimestamps|>, and CTranslate2 then applies openai's
#     timestamp rules (ids above <|notimestamps|> are "timestamps"): the first token must be a
#     timestamp, text after it. Here every such id is pinned, so it forced the first of the ties
#     (greedy: our <|pad|>; beam search: 5 different ones, one beam each) and our decoder went on
#     from a prompt it never saw. So the first timestamp (<|pad|>, never an input of ours) embeds
#     as <|notimestamps|> and its pinned logit is half the others' (still ~5000 below any text
#     token): CTranslate2 forces exactly it, at the position where our prompt has <|notimestamps|>,
#     and the decoder continues exactly as ours; faster-whisper drops it from the text. Same text
#     as without_timestamps=True (tested), greedy or beam, with these differences: the segment's
#     tokens start with that id; the forced token takes one of CTranslate2's 224 steps, so a window
#     decoded up to that cap without <|endoftext|> (a model hallucinating on the 30 s padding) ends
#     one token earlier, and beam search, which ranks by score / (length + 1), may then pick
#     another of those capped hypotheses; avg_logprob divides by one token more; over 30 s with
#     condition_on_previous_text the next window's prompt holds that id too.
#     without_timestamps=True has none of these: it is the exact call.
FW_VOCAB = 51865
FW_SPECIALS = ("<|nospeech|>", "<|translate|>", "<|startoflm|>")
# faster-whisper's non-speech list (faster_whisper/tokenizer.py, non_speech_tokens): the first
# token of " -" and " '" (these must encode to something), and the token of every symbol that
# encodes, alone or after a space, to a single token (to the first token, for FW_MUSIC)
FW_REQUIRED = (" -", " '")
FW_NON_SPEECH = tuple('"#()*+/:;<=>@[\\]^_`{|}~「」『』') + tuple(
    "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split())
FW_MUSIC = tuple("♩♪♫♬♭♮♯")
PINNED_LOGIT = -1e4


def pinned_row(gain: torch.Tensor, bias: torch.Tensor, target: float = PINNED_LOGIT,
               max_abs: float = 6e4) -> tuple:
    """A projection row r whose logit r . LayerNorm(x) is one constant for every x.

    LayerNorm(x) = gain * n + bias with sum(n) = 0 (n is x centred and scaled), so r = c / gain
    gives r . (gain * n + bias) = c * sum(bias / gain): no n left. c makes that `target`, as far as
    |r| <= max_abs allows (fp16's range). Returns (row, logit); logit 0 when the LayerNorm bias is
    zero (an untrained model), where no such row exists."""
    g, b = gain.detach().double(), bias.detach().double()
    s = (b / g).sum()
    if g.abs().min() < 1e-6 or s.abs() < 1e-9:
        return torch.zeros_like(gain), 0.0
    c = target / s
    c = c * min(1.0, max_abs * float(g.abs().min()) / abs(float(c)))
    return (c / g).to(gain.dtype), float(c * s)


def pin_bias(model: Whisper, tokenizer: Tokenizer) -> torch.Tensor:
    """decoder.ln.bias plus w, the part of 1 / decoder.ln.weight orthogonal to the rows of every
    token we generate (text tokens and <|endoftext|>). Their logits e . (y + w) = e . y are
    unchanged; a pinned row c / g gets the logit c * sum((b + w) / g) = c * (sum(b / g) + |w|^2),
    far from zero even when the trained bias is (almost) zero. No w when those rows span every
    direction (more generated tokens than d - 1)."""
    g = model.decoder.ln.weight.detach().double()
    b = model.decoder.ln.bias.detach().double()
    emb = model.decoder.token_embedding.weight.detach().double()
    rows = torch.cat([emb[:tokenizer.n_text], emb[tokenizer.eot:tokenizer.eot + 1]])
    if rows.shape[0] >= g.numel() or g.abs().min() < 1e-6:
        return b.float()
    q, _ = torch.linalg.qr(rows.T)  # an orthonormal basis of the generated rows' span
    u = 1.0 / g
    w = u - q @ (q.T @ u)
    return (b + w).float()


def check_pin(model: Whisper, bias: torch.Tensor, row: torch.Tensor, logit: float, rounding: str) -> None:
    """Refuses an export whose pinned logit could beat a real token for some decoder state;
    rounding: f32, f16 / float16, bfloat16, q8_0 or int8 (CTranslate2's int8_* included).

    With y = g * n + b (n: the normalised state, |n|_2 = sqrt(d), |n|_1 <= d) every real logit is
    e . y >= -|e| (max|g| sqrt(d) + |b|) = -bound (pin_bias leaves them as they are). The pinned
    row's logit is `logit` exactly in real arithmetic; whisper.cpp and CTranslate2 round weights and
    activations (to float16, or 8 bits per block of 32 or per row), which moves it by at most `err`."""
    g = model.decoder.ln.weight.detach().double()
    b = model.decoder.ln.bias.detach().double()
    bp = bias.detach().double()
    emb = model.decoder.token_embedding.weight.detach().double()
    d = g.numel()
    bound = float(emb.norm(dim=1).max()) * (float(g.abs().max()) * math.sqrt(d) + float(b.norm()))
    r = row.detach().double().abs()
    ry = float((r * g.abs()).max() * d + (r * bp.abs()).sum())  # >= sum |r_i y_i|
    if rounding == "f32":
        err = 1e-6 * ry
    elif rounding in ("f16", "float16"):
        err = 2.1 * 2.0 ** -11 * ry  # weights and activations rounded to float16, half an ulp each
    elif rounding == "bfloat16":
        err = 2.1 * 2.0 ** -8 * ry
    else:  # q8_0 (8 bits per block of 32) or CTranslate2's int8 (per row): a step of max / 127
        # for weights and activations, half a step each; bounded with whole-row maxima
        y_max = float(g.abs().max()) * math.sqrt(d) + float(bp.abs().max())
        err = (float(r.max()) / 254 * (float(g.abs().max()) * d + float(bp.abs().sum()))
               + y_max / 254 * float(r.sum()) + float(r.max()) * y_max * d / 254 ** 2)
    if not logit + err < -bound:
        raise ValueError(
            f"cannot pin the ids this model never generates: their logit would be "
            f"{logit:.4g} (+- {err:.3g} in {rounding}), real logits can reach -{bound:.4g}. It needs a "
            f"decoder.ln weight with no element near zero (min |weight| {float(g.abs().min()):.3g}) and a "
            f"nonzero sum(bias / weight) ({float((bp / g).sum()):.3g})")


def pin(model: Whisper, tokenizer: Tokenizer, rounding: str, weakest: float = 1.0) -> tuple:
    """(row, bias): pinned_row over pin_bias's final LayerNorm bias, checked (check_pin) for
    `rounding` at `weakest` times the row, the weakest pin the export writes."""
    bias = pin_bias(model, tokenizer)
    row, logit = pinned_row(model.decoder.ln.weight.detach().float(), bias)
    check_pin(model, bias, row * weakest, logit * weakest, rounding)
    return row, bias


def _fw_needs_token(encode, symbol: str, n_ours: int) -> bool:
    """Whether faster-whisper's non-speech list, computed with `encode` (our exported tokenizer),
    would fail on `symbol` or take one of our ids from it (faster_whisper/tokenizer.py)."""
    forms = (symbol,) if symbol in FW_REQUIRED else (symbol, " " + symbol)
    for form in forms:
        ids = encode(form)
        if symbol in FW_REQUIRED or symbol in FW_MUSIC:
            if not ids or ids[0] < n_ours:  # it takes ids[0]: an IndexError, or ours suppressed
                return True
        elif len(ids) == 1 and ids[0] < n_ours:
            return True
    return False


def fw_extra_tokens(tokenizer: Tokenizer) -> tuple:
    """(names, symbols): the tokens appended to our vocabulary up to FW_VOCAB, in order
    FW_SPECIALS, `symbols`, fillers.

    `symbols` are plain tokens that faster-whisper's tokenizer matches in the text before
    normalising: " -" and " '" (space included, so that a hyphen or an apostrophe inside a word,
    "сайн-сайхан", "don't", is left to our normaliser), then only those of faster-whisper's
    non-speech symbols that would otherwise encode to one of our ids (which it would suppress):
    with the default normaliser the music signs and the non-punctuation symbols (+ < = > ^ ` | ~)
    of a char tokenizer, none of the punctuation (it normalises to nothing)."""
    from .hf import hf_tokenizer

    candidates = FW_REQUIRED + FW_NON_SPEECH + FW_MUSIC
    symbols = list(FW_REQUIRED)
    for _ in range(len(candidates)):
        hf = hf_tokenizer(tokenizer, (list(FW_SPECIALS) + symbols, symbols)).backend_tokenizer
        def encode(text, hf=hf):
            return hf.encode(text, add_special_tokens=False).ids
        # a symbol that is a token of ours already (a keep BPE's '"') cannot be added: that one stays ours
        wanted = [c for c in candidates if c not in symbols and c not in hf.get_vocab()
                  and _fw_needs_token(encode, c, tokenizer.vocab_size)]
        if not wanted:
            break
        symbols = [c for c in candidates if c in symbols or c in wanted]
    names = list(FW_SPECIALS) + symbols
    n_fill = FW_VOCAB - tokenizer.vocab_size - len(names)
    if n_fill < 1:
        raise ValueError(f"faster-whisper needs a vocabulary of exactly {FW_VOCAB} tokens; this model has "
                         f"{tokenizer.vocab_size}, +{len(names) + 1} that faster-whisper needs: too many")
    return names + [f"<|unused_{i}|>" for i in range(n_fill)], symbols


def _stand_in(tokenizer: Tokenizer, symbol: str) -> int:
    """Our id for added `symbol` inside a prompt (its input embedding): what our normaliser makes
    of it between two letters. Nothing but space ("x -x", "x 'x" -> "x x"): our word boundary (a
    char tokenizer's space, exactly ours; sentencepiece's "▁", the same text with one token more,
    since the word after it gets its own "▁"). Else the last id of what is left ("+" -> <|unk|>)."""
    core = tokenizer.normalize(f"x{symbol}x")[1:-1].strip()
    if core:
        ids = tokenizer._encode(core)
        return ids[-1] if ids else 0
    if isinstance(tokenizer, CharTokenizer):
        return tokenizer._ids[" "]
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.sp.piece_to_id("\u2581")  # 0 (<|unk|>) if it has no such piece
    return 0


def fw_weights(model: Whisper, tokenizer: Tokenizer, quantization: str = "float32") -> tuple:
    """(embedding, projection, final LayerNorm bias): the first two (FW_VOCAB, d), our rows first.
    Added symbols embed as their _stand_in, the other added tokens as zeros (never input); the
    first "timestamp" id (<|notimestamps|> + 1, our <|pad|>) embeds as <|notimestamps|>.
    Projection: our text tokens and <|endoftext|> keep their rows, all other ids get pinned_row,
    the first timestamp half of it (a logit half as negative: the only one CTranslate2 can force).
    The bias is pin_bias's: our logits unchanged, the pin far from zero, so that rounding to
    `quantization` (int8 rounds a row of 1 / gain to 8 bits) cannot undo it (check_pin)."""
    emb = model.decoder.token_embedding.weight.detach()
    names, symbols = fw_extra_tokens(tokenizer)
    v, d = emb.shape
    embedding = torch.zeros(FW_VOCAB, d, dtype=emb.dtype)
    embedding[:v] = emb
    first = v + len(FW_SPECIALS)
    embedding[first:first + len(symbols)] = emb[[_stand_in(tokenizer, c) for c in symbols]]
    rounding = "int8" if quantization.startswith("int8") else {"int16": "f16"}.get(quantization, quantization)
    row, bias = pin(model, tokenizer, rounding, weakest=0.5)  # the first timestamp's row is half a pin
    projection = row.expand(FW_VOCAB, d).clone()
    projection[:tokenizer.n_text] = emb[:tokenizer.n_text]
    projection[tokenizer.eot] = emb[tokenizer.eot]
    # faster-whisper's default without_timestamps=False: see the layout notes, 5
    first_timestamp = tokenizer.no_timestamps + 1  # <|pad|>, never input otherwise
    embedding[first_timestamp] = emb[tokenizer.no_timestamps]
    projection[first_timestamp] = row / 2
    return embedding, projection, bias


# -- the export: CTranslate2's converter on the HF export -------------------------------------

def export_ct2(model: Whisper, tokenizer: Tokenizer, folder: Union[str, Path],
               quantization: str = "float32", compact: bool = False) -> Path:
    """Through the HF export and CTranslate2's own converter; tokenizer.json,
    preprocessor_config.json and whisper_scratch.json are copied along, so faster-whisper's
    WhisperModel(folder) finds everything it reads. The default is faster-whisper's padded layout
    (above); `compact` keeps our vocabulary size: ctranslate2.models.Whisper with our own prompt
    only, but its output layer is 51,865 / vocab_size times smaller."""
    from ctranslate2.converters import TransformersConverter

    if quantization not in CT2_QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {CT2_QUANTIZATIONS}, got {quantization!r}")
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        if compact:
            export_hf(model, tokenizer, tmp)
        else:
            export_hf(model, tokenizer, tmp, weights=fw_weights(model, tokenizer, quantization),
                      extra_tokens=fw_extra_tokens(tokenizer))
        converter = TransformersConverter(
            tmp, copy_files=["tokenizer.json", "preprocessor_config.json", "whisper_scratch.json"])
        converter.convert(str(folder), quantization=quantization, force=True)
    if not compact:
        _mark_multilingual(folder)
    return folder


def _mark_multilingual(folder: Path) -> None:
    """Renames the last filler of a padded export's vocabulary.json to "": CTranslate2 >= 4.6
    calls a model multilingual when "" is a token (see the padded layout above)."""
    vocab_file = folder / "vocabulary.json"
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    if len(vocab) != FW_VOCAB or not vocab[-1].startswith("<|unused_"):
        raise RuntimeError(f"{vocab_file}: expected {FW_VOCAB} tokens ending in fillers, got {len(vocab)}")
    vocab[-1] = ""
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
