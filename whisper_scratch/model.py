"""Whisper's architecture with openai-whisper's state-dict names, for training from random init.

Differences from openai/whisper, all needed for training from scratch on short clips:
- a real weight init (Kaiming conv stem, N(0, 0.02) elsewhere, scaled residual projections);
- variable-length encoder input up to n_audio_ctx * 2 frames, with `mel_lens` masking the
  padding, so a 5 s clip costs 5 s of compute and gives the same output alone or in a batch;
- an explicit `KVCache` argument instead of forward hooks;
- optionally (`feature_norm`), log-mels normalised per utterance and mel bin over its real frames
  (cepstral mean [and variance] normalisation): it removes the microphone and the speaker's
  average spectrum, which a model trained on a few voices otherwise keys on.
With `mel_lens=None` and 3000-frame input the computation is exactly openai-whisper's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


FEATURE_NORMS = ("none", "mean", "meanvar")
NOT_SIZES = ("ctc", "feature_norm")  # the ModelDimensions fields that are not positive ints (openai-whisper's)


@dataclass(frozen=True)
class ModelDimensions:
    """Everything needed to rebuild a model; saved with its weights (openai-whisper's field names)."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int
    # Not in openai-whisper: an auxiliary CTC head on the encoder (blank = the tokenizer's <|pad|>,
    # the last id). It makes the encoder align early when training from scratch on little data.
    ctc: bool = False
    # Not in openai-whisper: "mean" subtracts each mel bin's mean over the utterance's frames from
    # the encoder's input, "meanvar" also divides by its deviation (FEATURE_NORMS). The 30 s tools
    # feed plain log-mels, so such a model cannot be exported to them.
    feature_norm: str = "none"

    def __post_init__(self):
        if not isinstance(self.ctc, bool):
            raise ValueError(f"ModelDimensions.ctc must be a bool, got {self.ctc!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"ModelDimensions.feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        for f in fields(self):
            if f.name in NOT_SIZES:
                continue
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelDimensions.{f.name} must be a positive int, got {v!r}")
        if self.n_mels not in (80, 128):
            raise ValueError(f"n_mels must be 80 or 128, got {self.n_mels}")
        for side in ("audio", "text"):
            state, head = getattr(self, f"n_{side}_state"), getattr(self, f"n_{side}_head")
            if state % head:
                raise ValueError(f"n_{side}_state ({state}) must be divisible by n_{side}_head ({head})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelDimensions":
        kw = {f.name: int(d[f.name]) for f in fields(cls) if f.name not in NOT_SIZES}
        return cls(**kw, ctc=bool(d.get("ctc", False)), feature_norm=str(d.get("feature_norm", "none")))


# (state, heads, layers) per preset; encoder and decoder share them, as in openai-whisper.
PRESETS = {
    "micro": (128, 4, 4),  # small vocabularies (digits) on a CPU
    "mini": (256, 4, 4),  # CPU-sized
    "tiny": (384, 6, 4),
    "base": (512, 8, 6),
    "small": (768, 12, 12),
    "medium": (1024, 16, 24),
}


def preset_dims(name: str, n_vocab: int, n_mels: int = 80, n_audio_ctx: int = 1500,
                n_text_ctx: int = 448, ctc: bool = False, feature_norm: str = "none") -> ModelDimensions:
    """Dimensions of a named preset (`--whisper-size`) for a tokenizer's vocabulary size."""
    if name not in PRESETS:
        raise ValueError(f"unknown whisper size {name!r}; choose one of {', '.join(PRESETS)}")
    state, head, layer = PRESETS[name]
    return ModelDimensions(n_mels, n_audio_ctx, state, head, layer, n_vocab, n_text_ctx, state, head, layer, ctc,
                           feature_norm)


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> Tensor:
    """openai-whisper's sinusoidal positions: [sin | cos] halves, geometric timescales."""
    assert channels % 2 == 0
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class LayerNorm(nn.LayerNorm):
    # Normalise in fp32 even under fp16/bf16 autocast: the variance of a d=768 row overflows fp16.
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type(x.dtype)


class KVCache:
    """Keys/values of every decoder layer for incremental decoding, passed explicitly.

    Self-attention K/V live in buffers preallocated to n_text_ctx and filled in place (no
    re-concatenation per step); cross-attention K/V are computed from the audio once.
    `offset` is the number of tokens already processed. `reorder` follows beam-search choices.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.offset = 0
        self.self_kv: dict = {}  # layer -> (k_buf, v_buf), each (B, max_len, n_state)
        self.cross_kv: dict = {}  # layer -> (k, v), each (B, n_audio, n_state)

    def update_self(self, layer: int, k: Tensor, v: Tensor) -> tuple:
        end = self.offset + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"decoder context is {self.max_len} tokens; cannot decode to position {end}")
        if layer not in self.self_kv:
            # uninitialised: only positions < offset are ever read, and each is written first
            # (zero-filling 448 positions for 80 beam rows cost 5 % of a beam search)
            shape = (k.shape[0], self.max_len, k.shape[2])
            self.self_kv[layer] = (k.new_empty(shape), v.new_empty(shape))
        k_buf, v_buf = self.self_kv[layer]
        k_buf[:, self.offset:end] = k
        v_buf[:, self.offset:end] = v
        return k_buf[:, :end], v_buf[:, :end]

    def cast_(self, dtype: torch.dtype) -> None:
        """Every cached key and value in `dtype`, in place (a search moving to another decoder
        precision)."""
        self.self_kv = {i: (k.to(dtype), v.to(dtype)) for i, (k, v) in self.self_kv.items()}
        self.cross_kv = {i: (k.to(dtype), v.to(dtype)) for i, (k, v) in self.cross_kv.items()}

    def reorder(self, index: Tensor, cross: bool = True) -> None:
        """Keep batch rows `index` (beam search: which hypotheses survive), in every layer.

        Only the `offset` filled positions are copied, in place when the batch does not grow
        (copying whole n_text_ctx buffers every beam step dominated decoding time), and when the
        rows stay the same, only those whose source is another row (beam search keeps children
        in their parents' slots: on a trained model about 1 row in 10 moves per step).
        cross=False leaves the cross-attention K/V as they are: beam search reorders rows within
        an utterance, and every row keeps the same audio.
        """
        n, end = index.shape[0], self.offset
        moved = None
        if self.self_kv and n == next(iter(self.self_kv.values()))[0].shape[0]:
            # the same rows, permuted (a beam step): copy only the rows that take another's past
            moved = (index != torch.arange(n, device=index.device)).nonzero()[:, 0]
            src = index[moved]
        for i, (k, v) in self.self_kv.items():
            if moved is not None:
                k[moved, :end], v[moved, :end] = k[src, :end], v[src, :end]  # right side is a copy
            elif n <= k.shape[0]:
                k[:n, :end], v[:n, :end] = k[index, :end], v[index, :end]  # right side is a copy
                self.self_kv[i] = (k[:n], v[:n])
            else:
                self.self_kv[i] = (k[index], v[index])
        if cross:
            self.reorder_cross(index)

    def repeat_rows(self, n: int) -> None:
        """Every self-attention row n times in a row (row i becomes rows n*i .. n*i+n-1): a prompt
        run once per utterance becomes the shared past of its n hypotheses. Cross-attention K/V
        stay one row per utterance, which the decoder shares among its hypotheses anyway."""
        end = self.offset
        for i, (k, v) in self.self_kv.items():
            new = tuple(b.new_empty((b.shape[0] * n, *b.shape[1:])) for b in (k, v))
            for dst, b in zip(new, (k, v)):
                dst[:, :end] = b[:, :end].repeat_interleave(n, dim=0)
            self.self_kv[i] = new

    def reorder_cross(self, index: Tensor) -> None:
        """Keep cross-attention K/V rows `index` only (utterances, when hypotheses share them)."""
        self.cross_kv = {i: (k[index], v[index]) for i, (k, v) in self.cross_kv.items()}


class RowKVCache(KVCache):
    """A KV cache where every row has its own length, for continuous batching: utterances join
    (`join`, with a prompt already run through a plain KVCache) and leave (`keep`) at any step,
    and each step feeds one token per row at that row's own position.

    Self-attention buffers grow by doubling as the longest row needs them; cross-attention K/V
    are padded to the longest audio present, `xa_lens` masks the rest.
    """

    def __init__(self, max_len: int):
        super().__init__(max_len)
        self.lens: Optional[Tensor] = None  # (B,) tokens already processed per row
        self.xa_lens: Optional[Tensor] = None  # (B,) encoder frames per row
        self.end = 0  # keys the current step attends to: the longest row's length + 1 (set by begin_step)

    @property
    def rows(self) -> int:
        return 0 if self.lens is None else self.lens.shape[0]

    def update_self(self, layer: int, k: Tensor, v: Tensor) -> tuple:
        if k.shape[1] != 1:
            raise ValueError(f"a RowKVCache step takes one token per row, got {k.shape[1]}")
        k_buf, v_buf = self.self_kv[layer]
        k_buf[self._rows, self.lens] = k[:, 0]
        v_buf[self._rows, self.lens] = v[:, 0]
        return k_buf[:, :self.end], v_buf[:, :self.end]

    def begin_step(self) -> int:
        """Make room for one more token in every row and return the step's key count (once per
        step, not per layer: it reads the lengths back from the tensor)."""
        self.end = int(self.lens.max()) + 1
        self.reserve(self.end)
        self._rows = torch.arange(self.rows, device=self.lens.device)
        return self.end

    def reserve(self, end: int) -> None:
        """Room for `end` tokens in every row's self-attention buffers."""
        if end > self.max_len:
            raise ValueError(f"decoder context is {self.max_len} tokens; cannot decode to position {end}")
        for i, (k, v) in self.self_kv.items():
            if k.shape[1] < end:
                size = min(self.max_len, max(end, 2 * k.shape[1]))
                self.self_kv[i] = tuple(F.pad(b, (0, 0, 0, size - b.shape[1])) for b in (k, v))

    def join(self, other: KVCache, xa_lens: Tensor) -> None:
        """Append the rows of `other` (a prompt prefilled with the plain cache) as new rows."""
        n, used = xa_lens.shape[0], other.offset
        if self.lens is None:  # empty: take other's buffers, trimmed to what is used
            self.self_kv = {i: (k[:, :used], v[:, :used]) for i, (k, v) in other.self_kv.items()}
            self.cross_kv = dict(other.cross_kv)
            self.lens = torch.full((n,), used, dtype=torch.long, device=xa_lens.device)
            self.xa_lens = xa_lens
            return
        self.reserve(used)
        for i, (k, v) in self.self_kv.items():
            pad = k.shape[1] - used
            self.self_kv[i] = tuple(torch.cat([a, F.pad(b[:, :used], (0, 0, 0, pad))])
                                    for a, b in zip((k, v), other.self_kv[i]))
        for i, (k, v) in self.cross_kv.items():
            s = max(k.shape[1], other.cross_kv[i][0].shape[1])
            self.cross_kv[i] = tuple(torch.cat([F.pad(a, (0, 0, 0, s - a.shape[1])), F.pad(b, (0, 0, 0, s - b.shape[1]))])
                                     for a, b in zip((k, v), other.cross_kv[i]))
        self.lens = torch.cat([self.lens, torch.full((n,), used, dtype=torch.long, device=self.lens.device)])
        self.xa_lens = torch.cat([self.xa_lens, xa_lens])

    def keep(self, index: Tensor) -> None:
        """Keep rows `index` only; the audio side is trimmed to the longest audio left."""
        if not index.numel():
            self.__init__(self.max_len)
            return
        s = int(self.xa_lens[index].max())
        self.self_kv = {i: (k[index], v[index]) for i, (k, v) in self.self_kv.items()}
        self.cross_kv = {i: (k[index, :s], v[index, :s]) for i, (k, v) in self.cross_kv.items()}
        self.lens, self.xa_lens = self.lens[index], self.xa_lens[index]


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """x: queries' input (B, T, C); k, v: projected (B, S, C); mask: bool, True = may attend."""
        B, T, C = x.shape
        q = self.query(x).view(B, T, self.n_head, -1).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, k.shape[1], self.n_head, -1).transpose(1, 2)  # (B, nh, S, hs)
        v = v.view(B, v.shape[1], self.n_head, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)
        self.dropout = 0.0  # on each residual branch in training only (Whisper.set_dropout); not a weight

    def _drop(self, y: Tensor) -> Tensor:
        return F.dropout(y, self.dropout, training=True) if self.dropout and self.training else y

    def forward(self, x: Tensor, mask: Optional[Tensor], xa: Optional[Tensor] = None,
                xa_mask: Optional[Tensor] = None, cache: Optional[KVCache] = None, layer: int = 0) -> Tensor:
        h = self.attn_ln(x)
        k, v = self.attn.key(h), self.attn.value(h)
        if cache is not None:
            k, v = cache.update_self(layer, k, v)
        x = x + self._drop(self.attn(h, k, v, mask))
        if self.cross_attn is not None:
            h = self.cross_attn_ln(x)
            if cache is not None and layer in cache.cross_kv:
                k, v = cache.cross_kv[layer]
            else:
                k, v = self.cross_attn.key(xa), self.cross_attn.value(xa)
                if cache is not None:
                    cache.cross_kv[layer] = (k, v)
            if k.shape[0] != h.shape[0]:
                # n hypotheses per utterance (beam search, rows utterance-major): fold them into
                # the query axis so each utterance's audio K/V are read once, not n times
                B, T, C = h.shape
                x = x + self._drop(self.cross_attn(h.reshape(k.shape[0], -1, C), k, v, xa_mask).reshape(B, T, C))
            else:
                x = x + self._drop(self.cross_attn(h, k, v, xa_mask))
        return x + self._drop(self.mlp(self.mlp_ln(x)))


def lengths_to_mask(lens: Tensor, max_len: int) -> Tensor:
    """(B,) lengths -> (B, max_len) bool, True on real positions."""
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


def attention_key_mask(lens: Optional[Tensor], max_len: int) -> Optional[Tensor]:
    """(B,) key lengths -> (B, 1, 1, S) SDPA mask hiding padded keys; None when nothing is padded."""
    if lens is None:
        return None
    return lengths_to_mask(lens, max_len)[:, None, None, :]


def normalise_features(mel: Tensor, mel_lens: Optional[Tensor], kind: str) -> Tensor:
    """Each mel bin of each utterance minus its mean over the real frames ("mean"), also divided
    by its deviation there ("meanvar"; + 0.1 so a constant bin stays finite). Padding stays zero,
    so an utterance gives the same result alone or padded in a batch."""
    x = mel.float()
    if mel_lens is None:
        mask = torch.ones_like(x[:, :1])
    else:
        mask = lengths_to_mask(mel_lens.to(x.device), x.shape[-1])[:, None, :].float()
    n = mask.sum(-1, keepdim=True)
    x = (x - (x * mask).sum(-1, keepdim=True) / n) * mask
    if kind == "meanvar":
        x = x / (((x ** 2).sum(-1, keepdim=True) / n).sqrt() + 0.1)
    return x.to(mel.dtype)


class AudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int, feature_norm: str = "none"):
        super().__init__()
        self.n_ctx, self.feature_norm = n_ctx, feature_norm
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = LayerNorm(n_state)
        self.grad_checkpointing = False  # recompute block activations in backward to save memory

    def forward(self, mel: Tensor, mel_lens: Optional[Tensor] = None) -> Tensor:
        """mel (B, n_mels, T) -> (B, (T + 1) // 2, n_state). Frames at or past mel_lens are padding."""
        T = mel.shape[-1]
        if (T + 1) // 2 > self.n_ctx:
            raise ValueError(f"mel has {T} frames; this encoder takes at most {2 * self.n_ctx} (30 s)")
        if self.feature_norm != "none":
            mel = normalise_features(mel, mel_lens, self.feature_norm)
        if mel_lens is not None:
            # Zero the padding before each conv so border frames see exactly the zeros that an
            # unpadded, shorter input would see through the conv's own zero padding.
            mel = mel * lengths_to_mask(mel_lens, T)[:, None, :].to(mel.dtype)
        x = F.gelu(self.conv1(mel))
        if mel_lens is not None:
            x = x * lengths_to_mask(mel_lens, T)[:, None, :].to(x.dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, T', C)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        mask = attention_key_mask(self.output_lengths(mel_lens), x.shape[1]) if mel_lens is not None else None
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.ln_post(x)

    @staticmethod
    def output_lengths(mel_lens: Tensor) -> Tensor:
        """Encoder frames for each input length (the stride-2 conv halves it, rounding up)."""
        return (mel_lens + 1) // 2


class TextDecoder(nn.Module):
    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.n_ctx = n_ctx
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.zeros(n_ctx, n_state))
        self.blocks = nn.ModuleList(
            [ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)]
        )
        self.ln = LayerNorm(n_state)
        self.grad_checkpointing = False

    def forward(self, tokens: Tensor, xa: Tensor, xa_lens: Optional[Tensor] = None,
                cache: Optional[KVCache] = None) -> Tensor:
        """tokens (B, T), xa (B, S, C) -> logits (B, T, n_vocab) in fp32.

        With `cache`, `tokens` are the new tokens after `cache.offset` earlier ones, and the
        cache is advanced by T. `tokens` may have n rows per row of `xa` (B = n * xa's batch,
        utterance-major): n hypotheses of one utterance then share its audio (beam search).
        """
        if isinstance(cache, RowKVCache):
            return self._row_step(tokens, cache)
        offset = cache.offset if cache is not None else 0
        T = tokens.shape[1]
        if tokens.shape[0] % xa.shape[0]:
            raise ValueError(f"{tokens.shape[0]} token rows cannot share {xa.shape[0]} audio rows evenly")
        if offset + T > self.n_ctx:
            raise ValueError(f"{offset + T} tokens exceed the decoder context of {self.n_ctx}")
        x = self.token_embedding(tokens) + self.positional_embedding[offset: offset + T]
        x = x.to(xa.dtype)
        # Causal mask over the keys seen so far: query i (absolute offset+i) sees keys <= offset+i.
        mask = None
        if T > 1:
            mask = torch.ones(T, offset + T, dtype=torch.bool, device=tokens.device).tril(diagonal=offset)
        xa_mask = attention_key_mask(xa_lens, xa.shape[1])
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, mask, xa, xa_mask, use_reentrant=False)
            else:
                x = block(x, mask, xa, xa_mask, cache, i)
        if cache is not None:
            cache.offset += T
        x = self.ln(x)
        return (x @ self.token_embedding.weight.to(x.dtype).T).float()

    def _row_step(self, tokens: Tensor, cache: RowKVCache) -> Tensor:
        """One token per row (B, 1), each at its row's own position -> logits (B, 1, n_vocab)."""
        if tokens.shape != (cache.rows, 1):
            raise ValueError(f"a RowKVCache step takes ({cache.rows}, 1) tokens, got {tuple(tokens.shape)}")
        end = cache.begin_step()
        k0 = next(iter(cache.cross_kv.values()))[0]
        x = (self.token_embedding(tokens) + self.positional_embedding[cache.lens][:, None]).to(k0.dtype)
        mask = (torch.arange(end, device=tokens.device)[None] <= cache.lens[:, None])[:, None, None, :]
        xa_mask = attention_key_mask(cache.xa_lens, k0.shape[1])
        for i, block in enumerate(self.blocks):
            x = block(x, mask, None, xa_mask, cache, i)
        cache.lens = cache.lens + 1
        x = self.ln(x)
        return (x @ self.token_embedding.weight.to(x.dtype).T).float()


class Whisper(nn.Module):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state,
                                    dims.n_audio_head, dims.n_audio_layer, dims.feature_norm)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state,
                                   dims.n_text_head, dims.n_text_layer)
        self.ctc_head = nn.Linear(dims.n_audio_state, dims.n_vocab) if dims.ctc else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init for training from scratch.

        The conv stem gets Kaiming-normal weights: with N(0, 0.02) its output is far smaller than
        the sinusoidal positions added to it, the encoder output carries almost no audio, and the
        decoder collapses to the text prior (measured here: one word for every clip). Linear and
        embedding weights are N(0, 0.02); residual output projections are scaled by
        1/sqrt(2 * n_layer) as in GPT-2 so the residual stream's variance does not grow with depth.
        """
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "_ln" in name or name.split(".")[-2] in ("ln", "ln_post"):
                nn.init.ones_(p)
            elif ".conv" in name:
                nn.init.kaiming_normal_(p, nonlinearity="relu")
            elif name == "decoder.positional_embedding":
                nn.init.normal_(p, std=0.01)
            else:
                std = 0.02
                if name.endswith(("attn.out.weight", "mlp.2.weight")):
                    n_layer = self.dims.n_audio_layer if name.startswith("encoder") else self.dims.n_text_layer
                    std = 0.02 / math.sqrt(2 * n_layer)
                nn.init.normal_(p, std=std)

    def forward(self, mel: Tensor, mel_lens: Optional[Tensor], tokens: Tensor) -> Tensor:
        """mel (B, n_mels, T), mel_lens (B,) or None, tokens (B, L) -> logits (B, L, n_vocab)."""
        xa = self.encoder(mel, mel_lens)
        xa_lens = self.encoder.output_lengths(mel_lens) if mel_lens is not None else None
        return self.decoder(tokens, xa, xa_lens)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = enabled

    def set_dropout(self, p: float) -> None:
        """Dropout p on every residual branch (attention, cross-attention, MLP) of both stacks while
        training; eval mode and p = 0 compute exactly what openai-whisper's blocks compute."""
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        for block in [*self.encoder.blocks, *self.decoder.blocks]:
            block.dropout = p

    def ctc_logits(self, xa: Tensor) -> Tensor:
        """Encoder output (B, S, C) -> CTC logits (B, S, n_vocab) in fp32; blank is the last id."""
        if self.ctc_head is None:
            raise ValueError("this model has no CTC head (built with ctc=False)")
        return self.ctc_head(xa).float()

    def new_cache(self) -> KVCache:
        return KVCache(self.dims.n_text_ctx)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
