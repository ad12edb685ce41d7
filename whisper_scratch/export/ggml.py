"""Export to the GGML file that whisper.cpp (1.8.x) loads: `ggml-model.bin`.

The file (little-endian), in the order whisper.cpp's loader reads it:
  1. magic 0x67676d6c ("ggml");
  2. eleven int32: n_vocab, n_audio_ctx, n_audio_state, n_audio_head, n_audio_layer, n_text_ctx,
     n_text_state, n_text_head, n_text_layer, n_mels, ftype (0 f32, 1 f16, 7 + 1000 * 2 q8_0);
  3. the mel filterbank: int32 n_mel, int32 n_fft (201 bins), n_mel * 201 float32 (ours, audio.py);
  4. the vocabulary: int32 count, then per token uint32 length + UTF-8 bytes;
  5. tensors until the end of the file: int32 n_dims, int32 name length, int32 ggml type,
     n_dims int32 sizes innermost first (the reverse of torch's shape), the name, the raw data.

whisper.cpp allocates every tensor with a fixed type and checks the file's size against it:
positional embeddings, LayerNorms and biases are float32 in every file; the conv weights float16
unless the file is f32 (also in q8_0 files); every other matrix (attention, MLP, token embedding)
is the file's type. The conv biases are (n_state, 1), not (n_state,).

The vocabulary (GGML_VOCAB = 51,865 ids). whisper.cpp takes every special id from n_vocab
alone: n_vocab >= 51,865 is multilingual, <|endoftext|> = 50,257, <|startoftranscript|> 50,258,
language i of its fixed list at 50,259 + i (99 languages for 51,865), then <|translate|>,
<|transcribe|>, <|startoflm|>, <|startofprev|>, <|nospeech|>, <|notimestamps|> (50,358..50,363)
and the timestamps from 50,364. So the export moves our specials there (`ggml_ids`): our text
tokens keep ids [0, n_text), fillers follow up to 50,257, each special lands where whisper.cpp
expects it (a language must be in its list). The token embedding is also the output layer
(tied), and whisper.cpp does not suppress the fillers, <|translate|>, <|startoflm|>, <|nospeech|>
nor (without no_timestamps) the timestamps: every id that is not ours gets ct2.pinned_row, whose
logit is one large negative constant for every decoder state. None of those ids is ever input
(the prompt is sot/lang/transcribe/notimestamps, or startofprev and text tokens), so their rows
are free. pin_bias makes that constant large even for a final LayerNorm with (almost) no bias,
leaving every logit we generate unchanged; `check_pin` refuses a model whose pin could still lose
to a real token, rounding included (a LayerNorm weight near zero, or no direction left free).
"""
from __future__ import annotations

import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..audio import mel_filters
from ..model import Whisper
from ..tokenizer import UNK_TEXT, BPETokenizer, Tokenizer
from .ct2 import pin
from .openai import openai_state_dict, require_plain_log_mels

GGML_MAGIC = 0x67676D6C
GGML_VOCAB = 51865
GGML_TYPES = ("f32", "f16", "q8_0")
_FTYPE = {"f32": 0, "f16": 1, "q8_0": 7 + 1000 * 2}  # ggml_ftype (+ GGML_QNT_VERSION_FACTOR * version 2)
_TENSOR_TYPE = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type
Q8_BLOCK = 32

# whisper.cpp's language order (openai-whisper's): id 50,259 + index. 51,865 ids hold the first 99.
WHISPER_LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg "
    "lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so "
    "af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su").split()


def whisper_cpp_ids(n_vocab: int = GGML_VOCAB) -> dict:
    """The special ids whisper.cpp derives from n_vocab (multilingual layout only)."""
    if n_vocab < 51865:
        raise ValueError(f"whisper.cpp's multilingual layout needs n_vocab >= 51865, got {n_vocab}")
    n_lang = n_vocab - 51765 - 1
    shift = n_lang - 98
    ids = {"eot": 50257, "sot": 50258, "n_languages": n_lang}
    for k, name in enumerate(("translate", "transcribe", "solm", "prev", "nosp", "not", "beg")):
        ids[name] = 50357 + k + shift
    return ids


def ggml_ids(tokenizer: Tokenizer) -> dict:
    """Our id -> whisper.cpp id for every token we use (<|pad|> has no place: never input or
    generated). Fails when our layout cannot be expressed."""
    w = whisper_cpp_ids()
    if tokenizer.n_text > w["eot"]:
        raise ValueError(f"whisper.cpp puts <|endoftext|> at {w['eot']}; this model has {tokenizer.n_text} "
                         f"text tokens, too many")
    langs = WHISPER_LANGUAGES[:w["n_languages"]]
    missing = [lang for lang in tokenizer.languages if lang not in langs]
    if missing:
        raise ValueError(f"whisper.cpp has no language token for {missing} (it knows {' '.join(langs)})")
    mapping = {i: i for i in range(tokenizer.n_text)}
    mapping.update({tokenizer.eot: w["eot"], tokenizer.sot: w["sot"], tokenizer.transcribe: w["transcribe"],
                    tokenizer.startofprev: w["prev"], tokenizer.no_timestamps: w["not"]})
    for lang, i in tokenizer.language_ids.items():
        mapping[i] = w["sot"] + 1 + langs.index(lang)
    return mapping


def suppressed_by_whisper_cpp() -> set:
    """The ids whisper.cpp always masks (greedy, no timestamps): sot, every language, translate,
    transcribe, startoflm, startofprev, nospeech, notimestamps, and the timestamps."""
    w = whisper_cpp_ids()
    ids = {w["sot"] + 1 + i for i in range(w["n_languages"])}
    ids |= {w[k] for k in ("sot", "translate", "transcribe", "solm", "prev", "nosp", "not")}
    return ids | set(range(w["beg"], GGML_VOCAB))


def _token_text(tokenizer: Tokenizer, i: int) -> str:
    if i == tokenizer.unk:
        return UNK_TEXT
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.sp.id_to_piece(i).replace("\u2581", " ")
    return tokenizer._decode([i])


def ggml_vocab(tokenizer: Tokenizer) -> list:
    """GGML_VOCAB token strings in whisper.cpp's layout: our text tokens, fillers, the specials
    by whisper.cpp's names. whisper.cpp's suppress_blank looks up a " " token: when we have none,
    the first filler carries the name (its row is pinned, it is never generated)."""
    w = whisper_cpp_ids()
    names = [_token_text(tokenizer, i) for i in range(tokenizer.n_text)]
    names += [f"<|unused_{i}|>" for i in range(tokenizer.n_text, w["eot"])]
    if " " not in names[:tokenizer.n_text]:
        if tokenizer.n_text == w["eot"]:
            raise ValueError("whisper.cpp needs a \" \" token and there is no filler id left to name so")
        names[tokenizer.n_text] = " "
    names += ["<|endoftext|>", "<|startoftranscript|>"]
    names += [f"<|{lang}|>" for lang in WHISPER_LANGUAGES[:w["n_languages"]]]
    names += ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
              "<|notimestamps|>"]
    names += [f"<|{0.02 * i:.2f}|>" for i in range(GGML_VOCAB - w["beg"])]
    assert len(names) == GGML_VOCAB
    return names


def ggml_output(model: Whisper, tokenizer: Tokenizer, ggml_type: str = "f32") -> tuple:
    """(token embedding (GGML_VOCAB, d), decoder.ln.bias): our rows at ggml_ids, pinned_row for
    every other id, the bias from pin_bias."""
    emb = model.decoder.token_embedding.weight.detach().float()
    mapping = ggml_ids(tokenizer)
    row, bias = pin(model, tokenizer, ggml_type)
    out = row.expand(GGML_VOCAB, emb.shape[1]).clone()
    ours = sorted(mapping)
    targets = [mapping[i] for i in ours]
    out[targets] = emb[ours]
    # every generated or input id has its own row; the specials' rows are only input (suppressed)
    assert not (set(targets) - {mapping[i] for i in range(tokenizer.n_text + 1)}) - suppressed_by_whisper_cpp()
    return out, bias


# -- tensors ----------------------------------------------------------------------------------

def _tensor_type(name: str, ndim: int, ggml_type: str) -> str:
    if name.endswith("positional_embedding") or ndim == 1 or name in ("encoder.conv1.bias", "encoder.conv2.bias"):
        return "f32"
    if name in ("encoder.conv1.weight", "encoder.conv2.weight"):
        return "f32" if ggml_type == "f32" else "f16"
    return ggml_type


def quantize_q8_0(x: np.ndarray) -> bytes:
    """ggml's Q8_0: per block of 32 consecutive values (rows are whole blocks) one float16 scale
    d = max|x| / 127 followed by 32 int8 round(x / d)."""
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, Q8_BLOCK)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    d = amax / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    v = blocks * inv
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)  # round half away from zero
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("qs", "i1", (Q8_BLOCK,))])
    out["d"] = d[:, 0].astype(np.float16)
    out["qs"] = q
    return out.tobytes()


def _tensor_bytes(t: torch.Tensor, kind: str) -> bytes:
    a = t.detach().float().cpu().numpy()
    if kind == "f32":
        return a.astype("<f4").tobytes()
    if kind == "f16":
        return a.astype("<f2").tobytes()
    return quantize_q8_0(a)


def ggml_tensors(model: Whisper, tokenizer: Tokenizer, ggml_type: str = "f32") -> dict:
    """name -> (tensor in the shape whisper.cpp expects, its ggml type name)."""
    sd = openai_state_dict(model)
    sd["decoder.token_embedding.weight"], sd["decoder.ln.bias"] = ggml_output(model, tokenizer, ggml_type)
    out = {}
    for name, t in sd.items():
        if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
            t = t.reshape(-1, 1)
        kind = _tensor_type(name, t.dim(), ggml_type)
        if kind == "q8_0" and t.shape[-1] % Q8_BLOCK:
            raise ValueError(f"q8_0 needs rows of a multiple of {Q8_BLOCK} values; {name} has {t.shape[-1]}")
        out[name] = (t, kind)
    return out


def _check_dims(model: Whisper) -> None:
    dims = model.dims
    require_plain_log_mels(dims)
    if dims.n_audio_state != dims.n_text_state:
        raise ValueError(f"whisper.cpp needs n_audio_state == n_text_state, got {dims.n_audio_state} "
                         f"and {dims.n_text_state}")
    if dims.n_text_ctx < 8:
        raise ValueError(f"n_text_ctx {dims.n_text_ctx} is too short for whisper.cpp's decoder")


def export_ggml(model: Whisper, tokenizer: Tokenizer, path: Union[str, Path], ggml_type: str = "f32") -> Path:
    """Writes the GGML file atomically (a temporary file renamed into place)."""
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"ggml type must be one of {GGML_TYPES}, got {ggml_type!r}")
    _check_dims(model)
    dims = model.dims
    vocab = ggml_vocab(tokenizer)
    tensors = ggml_tensors(model, tokenizer, ggml_type)
    filters = mel_filters(dims.n_mels).numpy().astype("<f4")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<I", GGML_MAGIC))
            f.write(struct.pack("<11i", GGML_VOCAB, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                dims.n_audio_layer, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                dims.n_text_layer, dims.n_mels, _FTYPE[ggml_type]))
            f.write(struct.pack("<2i", *filters.shape))
            f.write(filters.tobytes())
            f.write(struct.pack("<i", len(vocab)))
            for token in vocab:
                data = token.encode("utf-8")
                f.write(struct.pack("<I", len(data)))
                f.write(data)
            for name, (t, kind) in tensors.items():
                key = name.encode("utf-8")
                shape = tuple(reversed(t.shape))
                f.write(struct.pack(f"<3i{len(shape)}i", len(shape), len(key), _TENSOR_TYPE[kind], *shape))
                f.write(key)
                f.write(_tensor_bytes(t, kind))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"note: whisper.cpp ids: <|endoftext|> {whisper_cpp_ids()['eot']}, languages "
          + ", ".join(f"{lang} {ggml_ids(tokenizer)[i]}" for lang, i in tokenizer.language_ids.items()),
          file=sys.stderr)
    return path


# -- running the file with pywhispercpp 1.4.1 (tests, and the README's usage) -------------------
#
# pywhispercpp 1.4.1 (whisper.cpp 1.8.2) opens a file with whisper.cpp's default context
# parameters, flash attention on, and does not expose `no_timestamps`. Both matter here:
#  - flash attention pads the encoder's keys and values to a multiple of 256 positions with zeros
#    and no mask, so unless n_audio_ctx (or `audio_ctx`) is a multiple of 256 the encoder output
#    is not ours (measured: other tokens);
#  - without no_timestamps the prompt lacks <|notimestamps|>, which our models are trained with.
# The two functions below set those fields in the C structs the binding holds (whisper_context:
# int64 t_load_us, int64 t_start_us, int32 wtype, int32 itype, then its params: bool use_gpu,
# bool flash_attn; whisper_full_params: 5 int32, then bool translate, no_context, no_timestamps),
# and check that the layout is the one they expect before writing.

def _cpp_object(obj) -> int:
    import ctypes

    return ctypes.c_void_p.from_address(id(obj) + 16).value  # pybind11: the held C++ value


def whisper_cpp_context(path: Union[str, Path], flash_attn: bool = False):
    """A pywhispercpp (1.4.1) whisper_context for a GGML file, flash attention off by default."""
    import ctypes

    import _pywhispercpp as pw

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGML file not found")
    ctx = pw.whisper_init_from_file(str(path))
    if ctx is None:
        raise ValueError(f"{path}: whisper.cpp could not load it")
    c = ctypes.c_void_p.from_address(_cpp_object(ctx)).value  # the wrapper holds whisper_context *
    head = bytes((ctypes.c_ubyte * 32).from_address(c))
    wtype, itype = struct.unpack_from("<2i", head, 16)
    use_gpu, flash, gpu_device = head[24], head[25], struct.unpack_from("<i", head, 28)[0]
    if wtype not in _TENSOR_TYPE.values() or itype not in (0, 1) or use_gpu > 1 or flash > 1 or gpu_device != 0:
        raise RuntimeError("unexpected whisper_context layout (this helper is for pywhispercpp 1.4.1); "
                           "open the file with whisper.cpp's own flash_attn=False instead")
    ctypes.c_bool.from_address(c + 25).value = bool(flash_attn)
    return ctx


def whisper_cpp_params(language: str, audio_ctx: int = 0, n_threads: int = 1, beam_size: int = 1, **fields):
    """whisper_full_params for our models, greedy or beam search: no timestamps (prompt sot lang
    transcribe notimestamps, as ours), no temperature fallback, no blank suppression (ours has
    none), quiet."""
    import ctypes

    import _pywhispercpp as pw

    strategy = pw.WHISPER_SAMPLING_BEAM_SEARCH if beam_size > 1 else pw.WHISPER_SAMPLING_GREEDY
    params = pw.whisper_full_default_params(strategy)
    if beam_size > 1:
        params.beam_search = {"beam_size": beam_size, "patience": -1.0}
    if "no_timestamps=False" not in repr(params):
        raise RuntimeError("unexpected whisper_full_params (this helper is for pywhispercpp 1.4.1)")
    ctypes.c_bool.from_address(_cpp_object(params) + 22).value = True
    if "no_timestamps=True" not in repr(params):
        raise RuntimeError("could not set no_timestamps (this helper is for pywhispercpp 1.4.1)")
    settings = dict(language=language, audio_ctx=audio_ctx, n_threads=n_threads, suppress_blank=False,
                    temperature=0.0, temperature_inc=0.0, print_progress=False, print_timestamps=False,
                    print_realtime=False, single_segment=True)
    settings.update(fields)
    for k, v in settings.items():
        setattr(params, k, v)
    return params


def whisper_cpp_tokens(ctx, params, mel=None, audio=None) -> list:
    """whisper_full on our log-mel (n_mels, frames) or on 16 kHz audio (whisper.cpp's own mel);
    the generated token ids (specials excluded, as whisper.cpp reports them)."""
    import _pywhispercpp as pw

    if mel is not None:
        mel = np.ascontiguousarray(np.asarray(mel, dtype=np.float32))
        if pw.whisper_set_mel(ctx, mel, mel.shape[1], mel.shape[0]) != 0:
            raise RuntimeError("whisper_set_mel failed")
        audio = np.zeros(0, dtype=np.float32)
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if pw.whisper_full(ctx, params, audio, len(audio)) != 0:
        raise RuntimeError("whisper_full failed")
    return [pw.whisper_full_get_token_id(ctx, s, j) for s in range(pw.whisper_full_n_segments(ctx))
            for j in range(pw.whisper_full_n_tokens(ctx, s))]


def whisper_cpp_text(ctx) -> str:
    import _pywhispercpp as pw

    return "".join(pw.whisper_full_get_segment_text(ctx, s).decode("utf-8", "replace")
                   for s in range(pw.whisper_full_n_segments(ctx))).strip()
