"""Text <-> token ids: a character tokenizer (from --keep-chars or the training texts) and a BPE
tokenizer trained in-process with sentencepiece. Both share one Whisper-like special-token layout:

    [0, n_text)            text tokens; id 0 is <|unk|> (a character outside the alphabet)
    n_text                 <|endoftext|>
    n_text + 1             <|startoftranscript|>
    n_text + 2 ...         one <|xx|> per language
    then                   <|transcribe|>, <|startofprev|>, <|notimestamps|>, <|pad|>

<|pad|> is last so it can be used as the loss's ignore_index and is never predicted or counted.
Text is normalised once, by one explicit `TextNormalizer`, for training targets and for WER/CER.
"""
from __future__ import annotations

import io
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

UNK_TEXT = "\u2047"  # "⁇", what an <|unk|> decodes to, as sentencepiece does
_APOSTROPHES = "'\u2019\u02bc"
PUNCTUATION_POLICIES = ("strip", "keep")


@dataclass(frozen=True)
class TextNormalizer:
    """The one text normalisation used for training targets and for scoring.

    NFC, optional lower-casing, then punctuation: "strip" deletes apostrophes (don't -> dont) and
    turns every other Unicode punctuation character (category P*) into a space; "keep" leaves it.
    Whitespace is always collapsed to single spaces and trimmed.
    """

    lowercase: bool = True
    punctuation: str = "strip"

    def __post_init__(self):
        if self.punctuation not in PUNCTUATION_POLICIES:
            raise ValueError(f"punctuation must be one of {PUNCTUATION_POLICIES}, got {self.punctuation!r}")

    def __call__(self, text: str) -> str:
        text = unicodedata.normalize("NFC", text)
        if self.lowercase:
            text = text.lower()
        if self.punctuation == "strip":
            text = "".join(
                "" if c in _APOSTROPHES else " " if unicodedata.category(c).startswith("P") else c for c in text
            )
        return " ".join(text.split())


class Tokenizer:
    """Shared special tokens, normalisation and out-of-alphabet lookup; subclasses map text."""

    kind = "base"

    def __init__(self, n_text: int, normalizer: TextNormalizer, languages: Sequence[str]):
        if not languages:
            raise ValueError("a tokenizer needs at least one language code, got none")
        self.normalizer = normalizer
        self.languages = tuple(languages)
        self.n_text = n_text
        self.unk = 0
        self.eot = n_text
        self.sot = n_text + 1
        self.language_ids = {lang: n_text + 2 + i for i, lang in enumerate(self.languages)}
        self.transcribe = n_text + 2 + len(self.languages)
        self.startofprev = self.transcribe + 1
        self.no_timestamps = self.transcribe + 2
        self.pad = self.transcribe + 3
        self.vocab_size = self.pad + 1

    # -- specials ---------------------------------------------------------------------------
    @property
    def special_tokens(self) -> dict:
        names = {self.eot: "<|endoftext|>", self.sot: "<|startoftranscript|>"}
        names.update({i: f"<|{lang}|>" for lang, i in self.language_ids.items()})
        names.update({self.transcribe: "<|transcribe|>", self.startofprev: "<|startofprev|>",
                      self.no_timestamps: "<|notimestamps|>", self.pad: "<|pad|>"})
        return names

    def sot_sequence(self, language: Optional[str] = None) -> tuple:
        """The decoder prompt: <|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>."""
        language = language or self.languages[0]
        if language not in self.language_ids:
            raise ValueError(f"language {language!r} is not in this tokenizer's languages {self.languages}")
        return (self.sot, self.language_ids[language], self.transcribe, self.no_timestamps)

    # -- text -------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        return self.normalizer(text)

    def find_oov(self, text: str) -> Counter:
        """Characters of normalise(text) that this tokenizer cannot represent, with counts."""
        known = self.alphabet_set
        return Counter(c for c in self.normalize(text) if c not in known)

    def encode(self, text: str) -> list:
        """normalise(text) -> text-token ids. Unknown characters become <|unk|>, never dropped
        silently: `find_oov` names them (data.filter_for_model counts them in the DataReport)."""
        return self._encode(self.normalize(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text tokens -> text; special tokens are skipped."""
        return self._decode([int(i) for i in ids if 0 <= int(i) < self.n_text])

    def _base_dict(self) -> dict:
        return {"kind": self.kind, "normalizer": asdict(self.normalizer), "languages": list(self.languages)}

    # subclasses: alphabet_set, _encode, _decode, to_dict


class CharTokenizer(Tokenizer):
    """One token per character of `alphabet` (after normalisation); space is always included."""

    kind = "char"

    def __init__(self, alphabet: str, normalizer: TextNormalizer = TextNormalizer(), languages=("mn",)):
        chars = []
        for c in unicodedata.normalize("NFC", alphabet.lower() if normalizer.lowercase else alphabet) + " ":
            if c not in chars and not (c.isspace() and c != " "):
                chars.append(c)
        self.alphabet = "".join(chars)
        self.alphabet_set = frozenset(self.alphabet)
        self._ids = {c: i + 1 for i, c in enumerate(self.alphabet)}
        super().__init__(len(self.alphabet) + 1, normalizer, languages)

    def _encode(self, norm: str) -> list:
        return [self._ids.get(c, self.unk) for c in norm]

    def _decode(self, ids: list) -> str:
        return "".join(UNK_TEXT if i == self.unk else self.alphabet[i - 1] for i in ids)

    def to_dict(self) -> dict:
        return {**self._base_dict(), "alphabet": self.alphabet}


class BPETokenizer(Tokenizer):
    """A sentencepiece BPE model trained in-process; its serialized proto travels in checkpoints."""

    kind = "bpe"

    def __init__(self, model_proto: bytes, normalizer: TextNormalizer = TextNormalizer(), languages=("mn",)):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        if self.sp.unk_id() != 0 or self.sp.bos_id() != -1 or self.sp.eos_id() != -1:
            raise ValueError("BPE model must have unk_id 0 and no bos/eos pieces (train it with train_bpe)")
        pieces = (self.sp.id_to_piece(i) for i in range(1, self.sp.get_piece_size()))
        self.alphabet_set = frozenset(c for p in pieces for c in p.replace("\u2581", " "))
        super().__init__(self.sp.get_piece_size(), normalizer, languages)

    def _encode(self, norm: str) -> list:
        return self.sp.encode(norm) if norm else []

    def _decode(self, ids: list) -> str:
        # sentencepiece renders <unk> as " ⁇ "; normalised text never has double spaces
        return " ".join(self.sp.decode(ids).split())

    def to_dict(self) -> dict:
        return {**self._base_dict(), "model_proto": self.model_proto}


def train_bpe(texts: Iterable[str], vocab_size: int, normalizer: TextNormalizer = TextNormalizer(),
              languages=("mn",)) -> BPETokenizer:
    """Train a sentencepiece BPE on the normalised `texts` (every character covered)."""
    import sentencepiece as spm

    lines = [t for t in (normalizer(x) for x in texts) if t]
    if not lines:
        raise ValueError("cannot train a BPE tokenizer on no text (all training transcripts are empty)")
    if vocab_size < 8:
        raise ValueError(f"bpe vocab size must be >= 8, got {vocab_size}")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        normalization_rule_name="identity",  # TextNormalizer already did it; keep round trips exact
        hard_vocab_limit=False,  # small corpora cannot always fill the requested size
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
    )
    return BPETokenizer(model.getvalue(), normalizer, languages)


def build_tokenizer(kind: str = "char", texts: Iterable[str] = (), keep_chars: Optional[str] = None,
                    bpe_vocab_size: int = 256, normalizer: TextNormalizer = TextNormalizer(),
                    languages=("mn",)) -> Tokenizer:
    """The entry point for train.py: --tokenizer char|bpe, --keep-chars, --bpe-vocab-size.

    A char tokenizer uses `keep_chars` when given, else every character of the normalised texts.
    """
    if kind == "char":
        if keep_chars is None:
            seen = Counter(c for t in texts for c in normalizer(t))
            if not seen:
                raise ValueError("cannot build a char tokenizer: no --keep-chars and no training text")
            keep_chars = "".join(sorted(seen))
        return CharTokenizer(keep_chars, normalizer, languages)
    if kind == "bpe":
        return train_bpe(texts, bpe_vocab_size, normalizer, languages)
    raise ValueError(f"tokenizer must be 'char' or 'bpe', got {kind!r}")


def tokenizer_from_dict(d: dict) -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict()` (primitives only, as stored in checkpoints)."""
    normalizer = TextNormalizer(**d["normalizer"])
    if d["kind"] == "char":
        return CharTokenizer(d["alphabet"], normalizer, d["languages"])
    if d["kind"] == "bpe":
        return BPETokenizer(d["model_proto"], normalizer, d["languages"])
    raise ValueError(f"unknown tokenizer kind {d.get('kind')!r} in checkpoint")
