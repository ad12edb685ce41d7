"""Export to a Hugging Face transformers folder: weights, tokenizer, generation config.

WhisperForConditionalGeneration holds our weights (the same mapping as transformers' own
convert_openai_to_hf.py).

Our vocabulary is not Whisper's tiktoken one (see tokenizer.py): the folder carries a tokenizer
built from it (tokenizer.json) and a generation config with our special-token ids (decoder start
= <|startoftranscript|>, prompt <|lang|> <|transcribe|> <|notimestamps|>, eos = <|endoftext|>,
every other special suppressed), so transformers' own `generate` decodes our models.
The functions take an extended vocabulary with an untied output layer too (`weights`,
`extra_tokens`): ct2.py builds faster-whisper's padded layout that way.
transformers and tokenizers are imported only by the functions that need them.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from ..model import ModelDimensions, Whisper
from ..tokenizer import UNK_TEXT, BPETokenizer, CharTokenizer, Tokenizer
from .openai import openai_state_dict, require_plain_log_mels


# -- weights, config, generation config -------------------------------------------------------

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
    require_plain_log_mels(dims)
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


def hf_model(model: Whisper, tokenizer: Tokenizer, weights: Optional[tuple] = None):
    """A transformers WhisperForConditionalGeneration holding our weights (fp32, eval mode).
    `weights` (embedding, projection[, final LayerNorm bias]), the first two (n_vocab, d) with our rows
    first, replace the token embedding and the output layer, untied (ct2.fw_weights: the padded
    layout for CTranslate2)."""
    from transformers import WhisperForConditionalGeneration

    dims, state = model.dims, hf_state_dict(model)
    tied = weights is None
    if not tied:
        dims = replace(dims, n_vocab=weights[0].shape[0])
        state["model.decoder.embed_tokens.weight"], state["proj_out.weight"] = weights[:2]
        if len(weights) > 2:  # the final LayerNorm's bias too (ct2.fw_weights)
            state["model.decoder.layer_norm.bias"] = weights[2]
    hf = WhisperForConditionalGeneration(hf_config(dims, tokenizer, tied=tied))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or missing:
        raise RuntimeError(f"weight mapping to transformers is incomplete: missing {missing}, unexpected {unexpected}")
    if tied:
        hf.tie_weights()
    hf.generation_config = hf_generation_config(dims, tokenizer)
    return hf.eval()


# -- a tokenizers (HF) tokenizer for our vocabulary -------------------------------------------

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
        # BPETokenizer._decode: sentencepiece's text ("▁" -> " ", <unk> -> " ⁇ ") with runs of spaces
        # collapsed and the ends trimmed, so "аб⁇в" decodes as "аб ⁇ в" here too, for any ids
        # (not D.Strip: tokenizers 0.23 panics on an empty token)
        decoder = D.Sequence([D.Replace(pieces[0], f" {UNK_TEXT} "), D.Replace("\u2581", " "), D.Fuse(),
                              D.Replace(Regex("^ +| +$"), ""), D.Replace(Regex(" {2,}"), " ")])
        return model, _normalizer(tokenizer), pre, decoder
    raise ValueError(f"no Hugging Face tokenizer for a {type(tokenizer).__name__}")


def hf_tokenizer(tokenizer: Tokenizer, extra_tokens: Optional[tuple] = None):
    """A transformers fast tokenizer with our ids: text pieces, then our special tokens; with
    `extra_tokens` (names, symbols), as ct2.fw_extra_tokens, then `names` (those in `symbols` as
    plain tokens, matched before normalisation, the rest special)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, normalizers as N
    from transformers import PreTrainedTokenizerFast

    model, norm, pre, decoder = _text_model(tokenizer)
    tok = HFTokenizer(model)
    tok.normalizer = N.Sequence(norm)
    tok.pre_tokenizer, tok.decoder = pre, decoder
    specials = [name for _, name in sorted(tokenizer.special_tokens.items())]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    size = tokenizer.vocab_size
    if extra_tokens is not None:
        names, symbols = extra_tokens
        tok.add_tokens([AddedToken(n, special=n not in symbols, normalized=False) for n in names])
        size += len(names)
    if tok.get_vocab_size() != size:
        raise RuntimeError(f"HF tokenizer has {tok.get_vocab_size()} tokens, expected {size}")
    # no unk_token here: transformers would treat it as special and drop it in decode(...,
    # skip_special_tokens=True); the tokenizer model maps unknown text to id 0 by itself
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>",
        bos_token="<|endoftext|>", pad_token="<|pad|>", additional_special_tokens=specials,
        model_max_length=10**6, clean_up_tokenization_spaces=False,
    )


def export_hf(model: Whisper, tokenizer: Tokenizer, folder: Union[str, Path],
              weights: Optional[tuple] = None, extra_tokens: Optional[tuple] = None) -> Path:
    """config.json, generation_config.json, model.safetensors, tokenizer files and the feature
    extractor's preprocessor_config.json (n_mels). `weights` and `extra_tokens`: an extended
    vocabulary, as in hf_model and hf_tokenizer (ct2.export_ct2's padded layout)."""
    from transformers import WhisperFeatureExtractor

    folder = Path(folder)
    hf = hf_model(model, tokenizer, weights)
    hf.save_pretrained(folder, safe_serialization=True)
    hf_tokenizer(tokenizer, extra_tokens).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=model.dims.n_mels).save_pretrained(folder)
    # the layout in words, for people and tools that do not read generation_config.json
    (folder / "whisper_scratch.json").write_text(json.dumps(
        {"tokenizer": tokenizer.kind, "special_ids": special_ids(tokenizer)}, indent=1) + "\n", encoding="utf-8")
    return folder


def hf_pipeline(folder: Union[str, Path], **kwargs):
    """transformers' own `pipeline("automatic-speech-recognition")` on an export folder:

        asr = hf_pipeline("hf_model/")
        asr("clip.mp3", generate_kwargs={"language": "mn"})["text"]

    Its Whisper post-processing calls `tokenizer._decode_asr`, which only transformers'
    WhisperTokenizer has, and WhisperTokenizer cannot hold our vocabulary (it rebuilds a
    byte-level BPE). So the folder's tokenizer is loaded as a PreTrainedTokenizerFast that borrows
    WhisperTokenizer's post-processing methods; everything else is the pipeline's own code."""
    from transformers import PreTrainedTokenizerFast, WhisperTokenizer, pipeline

    class AsrTokenizer(PreTrainedTokenizerFast):
        _decode_asr = WhisperTokenizer._decode_asr
        _strip_prompt = WhisperTokenizer._strip_prompt
        _convert_to_list = staticmethod(WhisperTokenizer._convert_to_list)

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: not an HF export folder (no tokenizer.json)")
    tokenizer = AsrTokenizer.from_pretrained(folder)
    return pipeline("automatic-speech-recognition", model=str(folder), tokenizer=tokenizer, **kwargs)
