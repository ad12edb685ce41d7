"""Interop with other Whisper implementations: export a whisper_scratch checkpoint to
openai-whisper, Hugging Face transformers or CTranslate2, and warm-start our model from an
openai-whisper checkpoint (`init_from_openai`: encoder, optionally the decoder, never the token
embedding: our vocabulary is not Whisper's).

    python -m whisper_scratch.export --checkpoint best_model.pt --to openai --output model.pt
    python -m whisper_scratch.export --checkpoint best_model.pt --to hf     --output hf_model/
    python -m whisper_scratch.export --checkpoint best_model.pt --to ct2    --output ct2_model/ [--quantization int8] [--compact]

Our state-dict keys are openai-whisper's, so `--to openai` is the weights plus the 10 dims. The
auxiliary CTC head (`ctc_head.*`, present when the model was trained with --ctc-weight) has no
counterpart in any of the three and is dropped, with a message.

Our vocabulary is not Whisper's tiktoken one (see tokenizer.py): the HF and CT2 exports carry a
tokenizer built from it (tokenizer.json) and a generation config naming our special-token ids
(decoder start = <|startoftranscript|>, prompt <|lang|> <|transcribe|> <|notimestamps|>, eos =
<|endoftext|>, every other special suppressed), so their own `generate` decodes our models.
The CTranslate2 folder is laid out for faster-whisper (vocabulary padded to openai's 51,865 ids,
see "the padded layout" below) and holds tokenizer.json and preprocessor_config.json, the files
faster-whisper reads: `WhisperModel(folder).transcribe(audio, language="mn",
without_timestamps=True)` gives our greedy transcript (tested).
transformers, tokenizers and ctranslate2 are imported only by the functions that need them
(test dependencies, see requirements-dev.txt), never by the training path.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import atomic_save, load_model
from .config import option, parse_options
from .model import ModelDimensions, Whisper
from .tokenizer import UNK_TEXT, BPETokenizer, CharTokenizer, Tokenizer

OPENAI_DIMS = ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer",
               "n_vocab", "n_text_ctx", "n_text_state", "n_text_head", "n_text_layer")
TARGETS = ("openai", "hf", "ct2")
CT2_QUANTIZATIONS = ("float32", "int8", "int8_float32", "float16", "int8_float16", "bfloat16", "int16")


# -- openai-whisper --------------------------------------------------------------------------

def openai_state_dict(model: Whisper) -> dict:
    """Our weights under openai-whisper's keys: they are the same keys, minus the CTC head."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("ctc_head.")}


def to_openai_checkpoint(model: Whisper) -> dict:
    """{"dims", "model_state_dict"}: what `whisper.load_model(path)` reads."""
    dims = {k: getattr(model.dims, k) for k in OPENAI_DIMS}
    return {"dims": dims, "model_state_dict": openai_state_dict(model)}


def export_openai(model: Whisper, path: Union[str, Path]) -> Path:
    atomic_save(to_openai_checkpoint(model), path)
    return Path(path)


def load_openai_model(path: Union[str, Path]):
    """An exported `.pt` loaded by openai-whisper's own `whisper.load_model` (weights_only,
    load_state_dict strict: every key must match)."""
    import whisper

    path = Path(path)
    if not path.is_file():  # load_model would take a missing path for a model name to download
        raise FileNotFoundError(f"{path}: openai-whisper checkpoint not found")
    return whisper.load_model(str(path), device="cpu").eval()


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


# -- warm start from openai-whisper ----------------------------------------------------------

def _read_openai_checkpoint(path: Union[str, Path]) -> tuple:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: openai-whisper checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise ValueError(f"{path}: not an openai-whisper checkpoint (expected a dict with 'dims' and "
                         f"'model_state_dict')")
    return ckpt["dims"], ckpt["model_state_dict"]


def _check_same(path, theirs: dict, ours: ModelDimensions, names: tuple) -> None:
    bad = [f"{n} {theirs.get(n)} (ours {getattr(ours, n)})" for n in names if theirs.get(n) != getattr(ours, n)]
    if bad:
        raise ValueError(f"{path}: cannot warm-start, the shapes differ: {', '.join(bad)}; "
                         f"pick --whisper-size/--n-mels to match the checkpoint")


def init_from_openai(model: Whisper, path: Union[str, Path], transfer_decoder: bool = False) -> list:
    """Copy an openai-whisper checkpoint's encoder (and, with transfer_decoder, its decoder
    except the token embedding) into `model`, in place; returns the names of the copied tensors.

    Our vocabulary (char or BPE, see tokenizer.py) is not Whisper's, so the token embedding (which
    is also the output projection) always stays as initialised: a new decoder vocabulary. The
    CTC head, if any, stays random too. Positional tables are cut to our context lengths.
    """
    theirs, state = _read_openai_checkpoint(path)
    _check_same(path, theirs, model.dims, ("n_mels", "n_audio_state", "n_audio_head", "n_audio_layer"))
    prefixes = ["encoder."]
    if transfer_decoder:
        _check_same(path, theirs, model.dims, ("n_text_state", "n_text_head", "n_text_layer"))
        prefixes.append("decoder.")
    ours = model.state_dict()
    copied = []
    with torch.no_grad():
        for name, target in ours.items():
            if not name.startswith(tuple(prefixes)) or name == "decoder.token_embedding.weight":
                continue
            if name not in state:
                raise ValueError(f"{path}: has no tensor {name!r}; is it an openai-whisper checkpoint?")
            source = state[name]
            if name.endswith("positional_embedding"):
                if source.shape[0] < target.shape[0]:
                    raise ValueError(f"{path}: {name} has {source.shape[0]} positions, this model needs "
                                     f"{target.shape[0]}")
                source = source[: target.shape[0]]
            target.copy_(source.to(target.dtype))
            copied.append(name)
    return copied


# -- Hugging Face transformers ---------------------------------------------------------------

def _hf_block_names(side: str, hf_side: str, n_layer: int, cross: bool) -> dict:
    names = {}
    for i in range(n_layer):
        ours, hf = f"{side}.blocks.{i}.", f"model.{hf_side}.layers.{i}."
        attn = [("attn", "self_attn")] + ([("cross_attn", "encoder_attn")] if cross else [])
        for o, h in attn:
            for a, b in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj")):
                names[f"{ours}{o}.{a}"] = f"{hf}{h}.{b}"
            names[f"{ours}{o}_ln"] = f"{hf}{h}_layer_norm"
        names[f"{ours}mlp.0"], names[f"{ours}mlp.2"] = f"{hf}fc1", f"{hf}fc2"
        names[f"{ours}mlp_ln"] = f"{hf}final_layer_norm"
    return names


def hf_key_map(dims: ModelDimensions) -> dict:
    """Our module names -> transformers' WhisperForConditionalGeneration names (the same
    mapping as transformers' own convert_openai_to_hf.py)."""
    names = {"encoder.conv1": "model.encoder.conv1", "encoder.conv2": "model.encoder.conv2",
             "encoder.ln_post": "model.encoder.layer_norm", "decoder.ln": "model.decoder.layer_norm",
             "decoder.token_embedding": "model.decoder.embed_tokens"}
    names.update(_hf_block_names("encoder", "encoder", dims.n_audio_layer, cross=False))
    names.update(_hf_block_names("decoder", "decoder", dims.n_text_layer, cross=True))
    return names


def hf_state_dict(model: Whisper) -> dict:
    modules = hf_key_map(model.dims)
    out = {}
    for key, value in openai_state_dict(model).items():
        if key == "encoder.positional_embedding":
            out["model.encoder.embed_positions.weight"] = value
        elif key == "decoder.positional_embedding":
            out["model.decoder.embed_positions.weight"] = value
        else:
            module, param = key.rsplit(".", 1)
            out[f"{modules[module]}.{param}"] = value
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]  # tied, as in Whisper
    return out


def _check_hf_dims(dims: ModelDimensions) -> None:
    if dims.n_audio_state != dims.n_text_state:
        raise ValueError(f"transformers' Whisper has one d_model; this model has n_audio_state "
                         f"{dims.n_audio_state} != n_text_state {dims.n_text_state}")


def special_ids(tokenizer: Tokenizer) -> dict:
    """The ids other implementations need, in our layout (see tokenizer.py)."""
    return {"sot": tokenizer.sot, "eot": tokenizer.eot, "transcribe": tokenizer.transcribe,
            "startofprev": tokenizer.startofprev, "no_timestamps": tokenizer.no_timestamps, "pad": tokenizer.pad,
            "languages": {f"<|{lang}|>": i for lang, i in tokenizer.language_ids.items()}}


def suppress_ids(tokenizer: Tokenizer) -> list:
    """Ids never generated: every special token except <|endoftext|> (as decoding.suppress_mask)."""
    return [i for i in sorted(tokenizer.special_tokens) if i != tokenizer.eot]


def hf_config(dims: ModelDimensions, tokenizer: Tokenizer, tied: bool = True):
    from transformers import WhisperConfig

    _check_hf_dims(dims)
    return WhisperConfig(
        vocab_size=dims.n_vocab, num_mel_bins=dims.n_mels, d_model=dims.n_audio_state,
        encoder_layers=dims.n_audio_layer, encoder_attention_heads=dims.n_audio_head,
        decoder_layers=dims.n_text_layer, decoder_attention_heads=dims.n_text_head,
        encoder_ffn_dim=4 * dims.n_audio_state, decoder_ffn_dim=4 * dims.n_text_state,
        max_source_positions=dims.n_audio_ctx, max_target_positions=dims.n_text_ctx,
        decoder_start_token_id=tokenizer.sot, pad_token_id=tokenizer.pad, bos_token_id=tokenizer.eot,
        eos_token_id=tokenizer.eot, suppress_tokens=None, begin_suppress_tokens=None,  # generation config's
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=tied,
    )


def hf_generation_config(dims: ModelDimensions, tokenizer: Tokenizer):
    """Whisper generation settings with our special ids: `generate(input_features, language=
    "<|mn|>")` (or no language: the first one) gives our prompt sot lang transcribe notimestamps."""
    from transformers import GenerationConfig

    ids = special_ids(tokenizer)
    first = tokenizer.language_ids[tokenizer.languages[0]]
    return GenerationConfig(
        decoder_start_token_id=tokenizer.sot, eos_token_id=tokenizer.eot, pad_token_id=tokenizer.pad,
        bos_token_id=tokenizer.eot, max_length=dims.n_text_ctx,
        # the old-style forced prompt too, for tools that read it (positions 1, 2, 3)
        forced_decoder_ids=[[1, first], [2, tokenizer.transcribe], [3, tokenizer.no_timestamps]],
        suppress_tokens=suppress_ids(tokenizer), begin_suppress_tokens=[],
        lang_to_id=ids["languages"], task_to_id={"transcribe": tokenizer.transcribe},
        no_timestamps_token_id=tokenizer.no_timestamps, prev_sot_token_id=tokenizer.startofprev,
        is_multilingual=True, return_timestamps=False,
    )


def hf_model(model: Whisper, tokenizer: Tokenizer, faster_whisper: bool = False):
    """A transformers WhisperForConditionalGeneration holding our weights (fp32, eval mode);
    with `faster_whisper`, in the padded, untied layout of fw_weights (for CTranslate2)."""
    from transformers import WhisperForConditionalGeneration

    dims, state = model.dims, hf_state_dict(model)
    if faster_whisper:
        dims = replace(dims, n_vocab=FW_VOCAB)
        state["model.decoder.embed_tokens.weight"], state["proj_out.weight"] = fw_weights(model, tokenizer)
    hf = WhisperForConditionalGeneration(hf_config(dims, tokenizer, tied=not faster_whisper))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"weight mapping to transformers is incomplete: missing {missing}, unexpected {unexpected}")
    if not faster_whisper:
        hf.tie_weights()
    hf.generation_config = hf_generation_config(dims, tokenizer)
    return hf.eval()


# -- the padded layout that faster-whisper needs ----------------------------------------------
#
# faster-whisper and CTranslate2 read a Whisper model through openai's vocabulary layout:
#  1. CTranslate2 calls a model multilingual when its vocabulary has 51,865 tokens (before 4.6) or
#     holds the empty-string token (4.6 and later; measured on 4.8.5). Otherwise faster-whisper
#     ignores `language` and builds the English-only prompt <|startoftranscript|><|notimestamps|>.
#  2. The number of languages is taken as id(<|nospeech|>) - id(<|startoftranscript|>) - 5.
#  3. faster-whisper's tokenizer must know <|translate|>, <|startoflm|> and <|nospeech|> (it
#     suppresses them) and encode " -" and " '" to at least one token (its non-speech list takes
#     the first).
#  4. It suppresses its own list of ids, not ours: our languages, <|notimestamps|> and <|pad|>,
#     and the ids added for 1-3, would be free to win.
# So the CTranslate2 export appends <|nospeech|> right after <|pad|> (which makes 2 come out as our
# number of languages), the other tokens of 3, fillers up to 51,865 (the last one named "" in
# CTranslate2's vocabulary), and unties the output projection: every id that we never generate
# (every special but <|endoftext|>, and all the added ones) gets a projection row whose logit is
# the same large negative constant whatever the decoder state (pinned_row). The input embeddings
# of our own tokens are unchanged. The model then decodes as ours does, whichever suppress list
# the caller passes.
FW_VOCAB = 51865
FW_SPECIALS = ("<|nospeech|>", "<|translate|>", "<|startoflm|>")
# the single characters that faster-whisper's non_speech_tokens encodes, " -" and " '" included
FW_SYMBOLS = tuple('"#()*+/:;<=>@[\\]^_`{|}~「」『』' + "-'" + "♩♪♫♬♭♮♯")
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


def fw_extra_tokens(tokenizer: Tokenizer) -> tuple:
    """(names, symbols): the tokens appended to our vocabulary up to FW_VOCAB, in order
    FW_SPECIALS, the characters of FW_SYMBOLS that our tokenizer has no token of its own for
    (`symbols`), fillers."""
    def own_token(ch):
        ids = tokenizer._encode(tokenizer.normalize(ch))
        return len(ids) == 1 and ids[0] != 0  # 0 = <|unk|>
    symbols = [c for c in FW_SYMBOLS if not own_token(c)]
    names = list(FW_SPECIALS) + symbols
    n_fill = FW_VOCAB - tokenizer.vocab_size - len(names)
    if n_fill < 1:
        raise ValueError(f"faster-whisper needs a vocabulary of exactly {FW_VOCAB} tokens; this model has "
                         f"{tokenizer.vocab_size}, +{len(names) + 1} that faster-whisper needs: too many")
    return names + [f"<|unused_{i}|>" for i in range(n_fill)], symbols


def _stand_in(tokenizer: Tokenizer, ch: str) -> int:
    """Our id for symbol `ch` inside a prompt: what our normaliser makes of it between two
    letters (punctuation -> the space token), else <|unk|>. faster-whisper's tokenizer matches the
    added symbol before normalising, so embedding it as this keeps prompts close to ours."""
    mid = tokenizer.normalize(f"x{ch}x")[1:-1]
    ids = tokenizer._encode(mid) if mid else []
    return ids[0] if len(ids) == 1 else 0


def fw_weights(model: Whisper, tokenizer: Tokenizer) -> tuple:
    """(embedding, projection), both (FW_VOCAB, d): our rows first. Added symbols embed as their
    _stand_in, the other added tokens as zeros (never input).
    Projection: our text tokens and <|endoftext|> keep their rows, all other ids get pinned_row."""
    emb = model.decoder.token_embedding.weight.detach()
    names, symbols = fw_extra_tokens(tokenizer)
    v, d = emb.shape
    embedding = torch.zeros(FW_VOCAB, d, dtype=emb.dtype)
    embedding[:v] = emb
    first = v + len(FW_SPECIALS)
    embedding[first:first + len(symbols)] = emb[[_stand_in(tokenizer, c) for c in symbols]]
    row, logit = pinned_row(model.decoder.ln.weight.detach(), model.decoder.ln.bias.detach())
    if logit > -30:
        print(f"warning: the decoder's final LayerNorm bias is (almost) zero (an untrained model?), so the "
              f"tokens we never generate cannot be pinned (logit {logit:.3g}); faster-whisper may emit them",
              file=sys.stderr)
    projection = row.expand(FW_VOCAB, d).clone()
    projection[:tokenizer.n_text] = emb[:tokenizer.n_text]
    projection[tokenizer.eot] = emb[tokenizer.eot]
    return embedding, projection


# -- a tokenizers (HF) tokenizer for our vocabulary -----------------------------------------

def _normalizer(tokenizer: Tokenizer):
    """Our TextNormalizer in tokenizers' terms: NFC, lower-case, punctuation, whitespace."""
    from tokenizers import Regex, normalizers as N

    steps = [N.NFC()]
    if tokenizer.normalizer.lowercase:
        steps.append(N.Lowercase())
    if tokenizer.normalizer.punctuation == "strip":
        steps += [N.Replace(Regex("['\u2019\u02bc]"), ""), N.Replace(Regex(r"\p{P}"), " ")]
    steps += [N.Replace(Regex(r"\s+"), " "), N.Strip()]
    return steps


def _bpe_merges(pieces: list) -> list:
    """Merges that reproduce a sentencepiece BPE model in tokenizers' BPE: every split of each
    piece into two known pieces, ranked by the merged piece's id (sentencepiece's merge order),
    as transformers' SentencePieceExtractor does."""
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, rank in vocab.items():
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(((rank, vocab[a], vocab[b], a, b) for a, b in local))
    return [(a, b) for *_, a, b in sorted(merges)]


def _text_model(tokenizer: Tokenizer):
    from tokenizers import Regex, decoders as D, models as M, pre_tokenizers as P

    if isinstance(tokenizer, CharTokenizer):
        vocab = {"<|unk|>": 0, **{c: i + 1 for i, c in enumerate(tokenizer.alphabet)}}
        model = M.WordLevel(vocab, unk_token="<|unk|>")
        pre = P.Split(Regex("."), behavior="isolated")  # one token per character, spaces included
        decoder = D.Sequence([D.Replace("<|unk|>", UNK_TEXT), D.Fuse()])
        return model, _normalizer(tokenizer), pre, decoder
    if isinstance(tokenizer, BPETokenizer):
        sp = tokenizer.sp
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        model = M.BPE({p: i for i, p in enumerate(pieces)}, _bpe_merges(pieces), unk_token=pieces[0], fuse_unk=True)
        # sentencepiece: a "▁" before the text and for every space, pieces never cross a "▁"
        pre = P.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
        # sentencepiece renders <unk> as " ⁇ " and our decode collapses the spaces; a plain "⁇" gives
        # the same text except for an unknown character inside a word ("аб⁇в", ours "аб ⁇ в")
        decoder = D.Sequence([D.Replace(pieces[0], UNK_TEXT),
                              D.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)])
        return model, _normalizer(tokenizer), pre, decoder
    raise ValueError(f"no Hugging Face tokenizer for a {type(tokenizer).__name__}")


def hf_tokenizer(tokenizer: Tokenizer, faster_whisper: bool = False):
    """A transformers fast tokenizer with our ids: text pieces, then our special tokens; with
    `faster_whisper`, then fw_extra_tokens (symbols as plain tokens, matched before normalisation,
    the rest special)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, normalizers as N
    from transformers import PreTrainedTokenizerFast

    model, norm, pre, decoder = _text_model(tokenizer)
    tok = HFTokenizer(model)
    tok.normalizer = N.Sequence(norm)
    tok.pre_tokenizer, tok.decoder = pre, decoder
    specials = [name for _, name in sorted(tokenizer.special_tokens.items())]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    size = tokenizer.vocab_size
    if faster_whisper:
        names, symbols = fw_extra_tokens(tokenizer)
        tok.add_tokens([AddedToken(n, special=n not in symbols, normalized=False) for n in names])
        size = FW_VOCAB
    if tok.get_vocab_size() != size:
        raise RuntimeError(f"HF tokenizer has {tok.get_vocab_size()} tokens, expected {size}")
    # no unk_token here: transformers would treat it as special and drop it in decode(...,
    # skip_special_tokens=True); the tokenizer model maps unknown text to id 0 by itself
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>",
        bos_token="<|endoftext|>", pad_token="<|pad|>", additional_special_tokens=specials,
        model_max_length=10**6, clean_up_tokenization_spaces=False,
    )


def export_hf(model: Whisper, tokenizer: Tokenizer, folder: Union[str, Path], faster_whisper: bool = False) -> Path:
    """config.json, generation_config.json, model.safetensors, tokenizer files and the feature
    extractor's preprocessor_config.json (n_mels). `faster_whisper`: the padded layout (export_ct2)."""
    from transformers import WhisperFeatureExtractor

    folder = Path(folder)
    hf = hf_model(model, tokenizer, faster_whisper)
    hf.save_pretrained(folder, safe_serialization=True)
    hf_tokenizer(tokenizer, faster_whisper).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=model.dims.n_mels).save_pretrained(folder)
    # the layout in words, for people and tools that do not read generation_config.json
    (folder / "whisper_scratch.json").write_text(json.dumps(
        {"tokenizer": tokenizer.kind, "special_ids": special_ids(tokenizer)}, indent=1) + "\n", encoding="utf-8")
    return folder


# -- CTranslate2 -----------------------------------------------------------------------------

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
        export_hf(model, tokenizer, tmp, faster_whisper=not compact)
        converter = TransformersConverter(
            tmp, copy_files=["tokenizer.json", "preprocessor_config.json", "whisper_scratch.json"])
        converter.convert(str(folder), quantization=quantization, force=True)
    if compact:
        return folder
    vocab_file = folder / "vocabulary.json"
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    if len(vocab) != FW_VOCAB or not vocab[-1].startswith("<|unused_"):
        raise RuntimeError(f"{vocab_file}: expected {FW_VOCAB} tokens ending in fillers, got {len(vocab)}")
    vocab[-1] = ""  # CTranslate2 >= 4.6 calls a model multilingual when "" is a token (see above)
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return folder


# -- the command line ------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportOptions:
    """Export a whisper_scratch checkpoint to openai-whisper, Hugging Face or CTranslate2."""

    checkpoint: str = option(help="a whisper_scratch checkpoint (best_model.pt / last.pt)")
    output: str = option(help="output file (openai) or folder (hf, ct2)")
    to: str = option("openai", "target: openai (.pt file), hf (folder), ct2 (folder)", choices=TARGETS)
    quantization: Optional[str] = option(None, "ct2 only: CTranslate2 weight type (default float32)",
                                         choices=CT2_QUANTIZATIONS)
    compact: bool = option(False, "ct2 only: keep our vocabulary size instead of faster-whisper's 51,865 "
                                  "(smaller and faster; for ctranslate2.models.Whisper, not faster-whisper)")
    overwrite: bool = option(False, "replace an existing output")

    def __post_init__(self):
        if self.to not in TARGETS:
            raise ValueError(f"--to must be one of {TARGETS}, got {self.to!r}")
        if self.to != "ct2" and self.quantization is not None:
            raise ValueError(f"--quantization {self.quantization} applies to --to ct2 only, not --to {self.to}")
        if self.to != "ct2" and self.compact:
            raise ValueError(f"--compact applies to --to ct2 only, not --to {self.to}")


def _clear_output(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.is_dir():
        # only ever delete a folder that an export wrote (HF and CT2 folders hold config.json)
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise FileExistsError(f"{out} is a folder that does not look like an export (no config.json); "
                                  f"not deleting it, choose another --output")
        shutil.rmtree(out)


def export(opts: ExportOptions) -> Path:
    out = Path(opts.output)
    _clear_output(out, opts.overwrite)
    model, tokenizer, _ = load_model(opts.checkpoint)
    if model.dims.ctc:
        print(f"note: {opts.checkpoint} has a CTC head (ctc_head.*); {opts.to} has no place for it, it is "
              f"dropped (attention decoding is unchanged)", file=sys.stderr)
    if opts.to == "openai":
        return export_openai(model, out)
    if opts.to == "hf":
        return export_hf(model, tokenizer, out)
    return export_ct2(model, tokenizer, out, opts.quantization or "float32", opts.compact)


def main(argv=None) -> None:
    opts = parse_options(ExportOptions, argv, prog="python -m whisper_scratch.export")
    try:
        out = export(opts)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} ({opts.to})")


if __name__ == "__main__":
    main()
