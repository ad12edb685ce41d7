r"""Text -> an external language model for shallow fusion in beam search.

A character n-gram with interpolated modified Kneser-Ney smoothing (Chen & Goodman 1998), built in
pure Python from a text file or a Common Voice TSV's `sentence` column. Characters, not words:
the demo corpus's test text has 19 % of its words outside the train text's vocabulary, so a word
LM could not spell them, and the typical errors are one or two letters and word boundaries, which
a character model with the space as a symbol scores directly.

The model is saved (gzip JSON) with the text normaliser it was built under and its symbol set;
`TokenLM` binds it to an acoustic model's tokenizer and refuses a different normaliser. It also
reads and writes ARPA (space written `<sp>`), so a model built by KenLM's `lmplz` on
space-separated characters can be used, and ours inspected with other tools.

    python -m whisper_scratch.lm --text data/synth_mn/mn/train.tsv --output exp/lm.json.gz \
        --exclude data/synth_mn/mn/dev.tsv data/synth_mn/mn/test.tsv
"""
from __future__ import annotations

import gzip
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from . import tables
from .config import option, output_problem, parse_options, require
from .tokenizer import TextNormalizer, Tokenizer

FORMAT, VERSION = "whisper_scratch_lm", 1
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
ARPA_SPACE = "<sp>"
LOG10 = math.log(10.0)


# -- building ----------------------------------------------------------------------------------

def count_ngrams(lines: Iterable[str], order: int) -> List[Counter]:
    """counts[n][gram] for n = 1..order over "<s> c1 c2 ... </s>" (index 0 unused)."""
    counts = [Counter() for _ in range(order + 1)]
    for line in lines:
        seq = (BOS, *line, EOS)
        for n in range(1, order + 1):
            c = counts[n]
            for i in range(len(seq) - n + 1):
                c[seq[i:i + n]] += 1
        counts[1][(BOS,)] -= 1  # <s> is only ever a context, never predicted
    del counts[1][(BOS,)]
    return counts


def kn_counts(counts: List[Counter]) -> List[Counter]:
    """Kneser-Ney's counts: raw at the highest order and for grams starting with <s> (nothing
    precedes them), else the number of distinct left extensions (continuation counts)."""
    order = len(counts) - 1
    out = [Counter() for _ in range(order + 1)]
    out[order] = counts[order]
    for n in range(1, order):
        cont = Counter(g[1:] for g in counts[n + 1])
        out[n] = Counter({g: (c if g[0] == BOS else cont[g]) for g, c in counts[n].items()})
        out[n] = Counter({g: c for g, c in out[n].items() if c > 0})
    return out


def discounts(counts: Counter) -> Tuple[float, float, float]:
    """Modified KN's D1, D2, D3+ from the count-of-counts (Chen & Goodman), kept in [0.05, c]."""
    n = Counter(c for c in counts.values() if c <= 4)
    n1, n2, n3, n4 = (n.get(i, 0) for i in (1, 2, 3, 4))
    if not (n1 and n2 and n3 and n4):  # tiny text: fall back to one absolute discount
        d = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5
        return d, d, d
    y = n1 / (n1 + 2 * n2)
    # kept above 0: a zero discount would give every unseen continuation probability 0
    return tuple(min(max(d, 0.05), i) for i, d in
                 ((1, 1 - 2 * y * n2 / n1), (2, 2 - 3 * y * n3 / n2), (3, 3 - 4 * y * n4 / n3)))


def build(lines: Sequence[str], order: int) -> "NgramLM":
    """Interpolated modified Kneser-Ney over the characters of `lines` (already normalised)."""
    require(order >= 1, f"order must be >= 1, got {order}")
    require(any(lines), "cannot build a language model from no text")
    counts = kn_counts(count_ngrams(lines, order))
    symbols = sorted({s for g in counts[1] for s in g} - {EOS}) + [EOS, UNK]
    uniform = 1.0 / len(symbols)  # <unk> gets only this share: characters never seen in the text
    lower: Dict[tuple, float] = {}  # p_{n-1}(w | h') of every seen gram, for the next order's interpolation
    probs: List[Dict[tuple, float]] = [dict() for _ in range(order + 1)]
    bows: List[Dict[tuple, float]] = [dict() for _ in range(order + 1)]
    for n in range(1, order + 1):
        d = discounts(counts[n])
        by_ctx: Dict[tuple, list] = defaultdict(list)
        for g, c in counts[n].items():
            by_ctx[g[:-1]].append((g[-1], c))
        for h, items in by_ctx.items():
            total = sum(c for _, c in items)
            gamma = sum(d[min(c, 3) - 1] for _, c in items) / total
            bows[n - 1][h] = gamma
            for w, c in items:
                back = uniform if n == 1 else lower.get(h[1:] + (w,), None)
                if back is None:  # the lower gram is always seen (a suffix of a seen gram); be safe
                    back = uniform
                probs[n][h + (w,)] = (c - d[min(c, 3) - 1]) / total + gamma * back
        if n == 1:
            probs[1][(UNK,)] = bows[0][()] * uniform
        lower = probs[n]
    return NgramLM.from_tables(order, symbols, probs, bows)


# -- the model ---------------------------------------------------------------------------------

class NgramLM:
    """A backoff n-gram over symbols: P(w | h) = p(h w) when seen, else bow(h) * P(w | h[1:]).

    Held per context: the ids and natural-log probabilities of the symbols seen after it and its
    log backoff weight, so a whole next-symbol distribution is a few numpy operations."""

    def __init__(self, order: int, symbols: Sequence[str], unigram: np.ndarray,
                 contexts: Dict[tuple, Tuple[np.ndarray, np.ndarray, float]], normalizer: Optional[dict] = None):
        self.order, self.symbols = order, list(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.bos = self.index.get(BOS, -1)
        self.eos, self.unk = self.index[EOS], self.index[UNK]
        self.unigram, self.contexts = unigram.astype(np.float32), contexts
        self.normalizer = normalizer
        self._cache: Dict[tuple, np.ndarray] = {}

    @classmethod
    def from_tables(cls, order: int, symbols: Sequence[str], probs: list, bows: list,
                    normalizer: Optional[dict] = None) -> "NgramLM":
        """probs[n][gram] and bows[n][context-of-length-n] (both probabilities, not logs)."""
        index = {s: i for i, s in enumerate(symbols)}
        if BOS not in index:
            symbols = [BOS, *symbols]
            index = {s: i for i, s in enumerate(symbols)}
        uni = np.full(len(symbols), -np.inf)
        for (w,), p in probs[1].items():
            uni[index[w]] = math.log(p)
        unseen = ~np.isfinite(uni)
        unseen[index[BOS]] = False
        if unseen.any():  # ARPA files may omit symbols; give them <unk>'s share
            uni[unseen] = uni[index[UNK]] if np.isfinite(uni[index[UNK]]) else -30.0
        seen: Dict[tuple, list] = defaultdict(list)
        for n in range(2, order + 1):
            for g, p in probs[n].items():
                seen[tuple(index[s] for s in g[:-1])].append((index[g[-1]], math.log(p)))
        contexts = {}
        for n in range(1, order):
            for h, b in bows[n].items():
                key = tuple(index[s] for s in h)
                items = seen.get(key, [])
                ids = np.array([i for i, _ in items], dtype=np.int64)
                lps = np.array([lp for _, lp in items], dtype=np.float32)
                contexts[key] = (ids, lps, math.log(b) if b > 0 else -np.inf)
        return cls(order, symbols, uni, contexts, normalizer)

    def start(self) -> tuple:
        return (self.bos,)

    def next_logprobs(self, ctx: tuple) -> np.ndarray:
        """log P(w | ctx) for every symbol (<s>: -inf), from the shortest context up: back off
        from the longer one, then overwrite what it has seen."""
        ctx = ctx[-(self.order - 1):] if self.order > 1 else ()
        vec = self._cache.get(ctx)
        if vec is not None:
            return vec
        vec = self.unigram.copy()
        for k in range(1, len(ctx) + 1):
            entry = self.contexts.get(ctx[-k:])
            if entry is None:
                break
            ids, lps, bow = entry
            vec += bow
            vec[ids] = lps
        vec[self.bos] = -np.inf
        if len(self._cache) > 2_000_000:  # bounded memory on long jobs (a server)
            self._cache.clear()
        self._cache[ctx] = vec
        return vec

    def extend(self, ctx: tuple, symbols: Sequence[int]) -> tuple:
        keep = self.order - 1
        return (ctx + tuple(symbols))[-keep:] if keep else ()

    def sentence_logprob(self, text: str) -> float:
        """Natural-log probability of one normalised sentence, </s> included."""
        ctx, total = self.start(), 0.0
        for s in [self.index.get(c, self.unk) for c in text] + [self.eos]:
            total += float(self.next_logprobs(ctx)[s])
            ctx = self.extend(ctx, [s])
        return total

    def bits_per_char(self, lines: Sequence[str]) -> float:
        n = sum(len(t) + 1 for t in lines)
        return -sum(self.sentence_logprob(t) for t in lines) / n / math.log(2) if n else float("nan")

    # -- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        ctx = [[list(k), round(float(b), 6), ids.tolist(), [round(float(x), 5) for x in lps]]
               for k, (ids, lps, b) in self.contexts.items()]
        return {"format": FORMAT, "version": VERSION, "kind": "char_ngram", "order": self.order,
                "normalizer": self.normalizer, "symbols": self.symbols,
                "unigram": [round(float(x), 6) if np.isfinite(x) else None for x in self.unigram], "contexts": ctx}

    @classmethod
    def from_dict(cls, d: dict) -> "NgramLM":
        uni = np.array([-np.inf if x is None else x for x in d["unigram"]], dtype=np.float32)
        contexts = {tuple(k): (np.array(ids, dtype=np.int64), np.array(lps, dtype=np.float32), b)
                    for k, b, ids, lps in d["contexts"]}
        return cls(d["order"], d["symbols"], uni, contexts, d.get("normalizer"))

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, separators=(",", ":"))
        tmp.replace(path)

    def write_arpa(self, path) -> None:
        """The model as ARPA: log10 probabilities and backoffs, characters as words (space = <sp>)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        name = [ARPA_SPACE if s == " " else s for s in self.symbols]
        grams: List[list] = [[] for _ in range(self.order + 1)]
        bow_of = {k: b for k, (_, _, b) in self.contexts.items()}
        for i, lp in enumerate(self.unigram):  # <s> is never predicted: ARPA's -99
            grams[1].append(((i,), float(lp) if i != self.bos else -99.0 * LOG10))
        for k, (ids, lps, _) in self.contexts.items():
            for i, lp in zip(ids.tolist(), lps.tolist()):
                grams[len(k) + 1].append((k + (i,), lp))
        with open(path, "w", encoding="utf-8") as f:
            f.write("\\data\\\n" + "".join(f"ngram {n}={len(grams[n])}\n" for n in range(1, self.order + 1)))
            for n in range(1, self.order + 1):
                f.write(f"\n\\{n}-grams:\n")
                for g, lp in grams[n]:
                    line = f"{lp / LOG10:.6f}\t{' '.join(name[s] for s in g)}"
                    if g in bow_of and n < self.order:
                        line += f"\t{bow_of[g] / LOG10:.6f}"
                    f.write(line + "\n")
            f.write("\n\\end\\\n")


def read_arpa(path, normalizer: Optional[dict] = None) -> NgramLM:
    """An ARPA file whose words are single characters (`<sp>` or `▁` for the space) -> NgramLM."""
    probs: List[dict] = [dict()]
    bows: List[dict] = [dict()]
    order, n, seen_data = 0, 0, False
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if line == "\\data\\":
                seen_data = True
                continue
            if line and not seen_data:
                raise ValueError(f"{path}:{lineno}: text before \\data\\ ({line[:40]!r}): not an ARPA file")
            if not line or line.startswith("ngram "):
                order = max(order, int(line.split("=")[0].split()[1])) if line.startswith("ngram ") else order
                continue
            if line == "\\end\\":
                break
            if line.startswith("\\") and line.endswith("-grams:"):
                n = int(line[1:].split("-")[0])
                while len(probs) <= n:
                    probs.append({})
                    bows.append({})
                continue
            parts = line.split()
            if n == 0 or len(parts) not in (n + 1, n + 2):
                raise ValueError(f"{path}:{lineno}: not an ARPA {n}-gram line: {line[:60]!r}")
            g = tuple(" " if w in (ARPA_SPACE, "\u2581") else w for w in parts[1:n + 1])
            if any(len(w) != 1 and w not in (BOS, EOS, UNK) for w in g):
                raise ValueError(f"{path}:{lineno}: {g} is not a character n-gram (this reader wants "
                                 f"one character per word, space as {ARPA_SPACE})")
            probs[n][g] = 10 ** float(parts[0])
            if len(parts) == n + 2:
                bows[n][g] = 10 ** float(parts[-1])
    if order == 0 or len(probs) < 2:
        raise ValueError(f"{path}: no \\data\\ section or no 1-grams: not an ARPA file")
    while len(bows) <= order:
        bows.append({})
    # every context that predicts something needs an entry (bow 1 when the file gives none)
    for m in range(2, order + 1):
        for g in probs[m]:
            bows[m - 1].setdefault(g[:-1], 1.0)
    symbols = sorted({s for (s,) in probs[1]} - {BOS, EOS, UNK}) + [EOS, UNK]
    probs[1].setdefault((UNK,), 1e-7)
    return NgramLM.from_tables(order, symbols, probs, bows, normalizer)


def load_lm(path) -> NgramLM:
    """A saved model (.json.gz from `save`) or an ARPA file; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: language model not found")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError):
        d = None
    if d is None:
        try:
            return read_arpa(path)
        except UnicodeDecodeError:
            raise ValueError(f"{path}: neither a whisper_scratch language model nor an ARPA file") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError(f"{path}: not a whisper_scratch language model (expected format={FORMAT!r})")
    if d.get("version", 0) > VERSION:
        raise ValueError(f"{path}: language model version {d['version']} is newer than this code ({VERSION})")
    return NgramLM.from_dict(d)


# -- binding to a tokenizer --------------------------------------------------------------------

class TokenLM:
    """The LM seen through a tokenizer: log P(token | state) for every token id, so beam search
    can add it to the decoder's scores. A text token scores the sum over its characters;
    <|endoftext|> scores </s>; other special tokens 0 (the search suppresses them anyway)."""

    def __init__(self, lm: NgramLM, tokenizer: Tokenizer, n_vocab: int, path=""):
        want = asdict(tokenizer.normalizer)
        if lm.normalizer is not None and lm.normalizer != want:
            raise ValueError(f"{path or 'language model'}: built with text normaliser {lm.normalizer}, but the "
                             f"acoustic model's tokenizer normalises with {want}; rebuild it with "
                             f"`python -m whisper_scratch.lm --model_path ...`")
        self.lm, self.eot, self.n_vocab = lm, tokenizer.eot, n_vocab
        self.symbols: List[Tuple[int, ...]] = []
        for t in range(tokenizer.n_text):
            text = tokenizer.decode([t])
            if t == tokenizer.unk:
                self.symbols.append((lm.unk,))
            else:
                raw = _piece_text(tokenizer, t, text)
                self.symbols.append(tuple(lm.index.get(c, lm.unk) for c in raw))
        single = np.array([s[0] if len(s) == 1 else -1 for s in self.symbols], dtype=np.int64)
        self.one_ids = np.nonzero(single >= 0)[0]  # tokens of one character: a gather per state
        self.one_syms = single[self.one_ids]
        self.multi_ids = np.nonzero(single < 0)[0].tolist()  # BPE pieces: the chain rule
        letters = {c for t in range(1, tokenizer.n_text) for c in _piece_text(tokenizer, t, "")}
        self.unknown = sorted(c for c in letters if c not in lm.index)
        if not letters - set(self.unknown) - {" "}:  # every letter unknown to it: only eot and spaces could move
            raise ValueError(f"{path or 'language model'}: knows none of the acoustic model's letters "
                             f"({''.join(sorted(letters - {' '})[:30])!r}): it was built from text in another "
                             f"alphabet; build one from this language's text")
        self._cache: Dict[tuple, np.ndarray] = {}

    def start(self) -> tuple:
        return self.lm.start()

    def advance(self, state: tuple, token: int) -> tuple:
        if token == self.eot or not 0 <= token < len(self.symbols):
            return state
        return self.lm.extend(state, self._symbols(state, token))

    def _symbols(self, state: tuple, token: int) -> Tuple[int, ...]:
        syms = self.symbols[token]
        space = self.lm.index.get(" ")
        if state == self.lm.start() and syms and syms[0] == space:  # a BPE "▁word" opening the text
            syms = syms[1:]
        return syms

    def scores(self, state: tuple) -> np.ndarray:
        """(n_vocab,) natural-log LM scores of every token after `state`."""
        vec = self._cache.get(state)
        if vec is not None:
            return vec
        sym = self.lm.next_logprobs(state)
        vec = np.zeros(self.n_vocab, dtype=np.float32)
        vec[self.one_ids] = sym[self.one_syms]
        for t in self.multi_ids:
            ctx, total = state, 0.0
            for s in self._symbols(state, t):
                total += float(self.lm.next_logprobs(ctx)[s])
                ctx = self.lm.extend(ctx, [s])
            vec[t] = total
        vec[self.eot] = sym[self.lm.eos]
        if len(self._cache) > 1_000_000:
            self._cache.clear()
        self._cache[state] = vec
        return vec


def _piece_text(tokenizer: Tokenizer, token: int, decoded: str) -> str:
    """The characters a token adds to the text: a BPE piece with its word-boundary mark as a space."""
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:
        return sp.id_to_piece(token).replace("\u2581", " ")
    return decoded or tokenizer.decode([token])


def bind(path, tokenizer: Tokenizer, n_vocab: int) -> TokenLM:
    """load_lm + TokenLM with the file named in every error."""
    return TokenLM(load_lm(path), tokenizer, n_vocab, path)


# -- text --------------------------------------------------------------------------------------

def read_text(path) -> List[str]:
    """Sentences of a text file (one per line) or of a TSV with a `sentence` column (Common
    Voice) or `text` column (manifests), read as the corpus readers read it (tables.py: CSV
    quoting detected per file, errors name the line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: text file not found")
    text = tables.read_text(path)
    first = text.split("\n", 1)[0].rstrip("\r").split("\t")
    col = next((c for c in ("sentence", "text") if c in first), None)
    if len(first) > 1 and col:
        return [row.get(col, "") for _, row in tables.read_tsv(path)[1]]
    lines = text.splitlines()
    widths = {line.count("\t") for line in lines if line.strip()}
    if len(lines) > 1 and widths and min(widths) >= 1 and len(widths) == 1:  # a table, not sentences
        raise ValueError(f"{path}: a table ({min(widths) + 1} tab-separated columns on every line) without a "
                         f"'sentence' or 'text' column in its first line; name the column, or give one "
                         f"sentence per line")
    return lines


@dataclass(frozen=True)
class LmOptions:
    """Build a character n-gram language model (interpolated modified Kneser-Ney) from text."""

    text: Tuple[str, ...] = option(help="text files (one sentence per line) or TSVs with a sentence/text column",
                                   nargs="+")
    output: str = option(help="where to write the model (.json.gz)")
    order: int = option(7, "n-gram order (characters of context + 1)")
    model_path: Optional[str] = option(None, "an acoustic model checkpoint: use its tokenizer's text normaliser "
                                             "(else --lowercase/--punctuation)")
    lowercase: bool = option(True, "lower-case the text (when no --model-path)")
    punctuation: str = option("strip", "strip or keep punctuation (when no --model-path)", choices=("strip", "keep"))
    exclude: Tuple[str, ...] = option((), "held-out files (dev/test TSVs): any of their sentences found in --text "
                                          "is dropped and counted, so the LM never sees them", nargs="*")
    arpa: Optional[str] = option(None, "also write the model as an ARPA file here")

    def __post_init__(self):
        require(2 <= self.order <= 12, f"--order must be in [2, 12], got {self.order}")
        object.__setattr__(self, "text", tuple(self.text))
        object.__setattr__(self, "exclude", tuple(self.exclude))


def normalizer_for(opts: LmOptions) -> TextNormalizer:
    if opts.model_path:
        from .checkpoint import load_checkpoint
        return TextNormalizer(**load_checkpoint(opts.model_path)["tokenizer"]["normalizer"])
    return TextNormalizer(lowercase=opts.lowercase, punctuation=opts.punctuation)


def outputs_problem(opts: LmOptions) -> Optional[str]:
    """What stops --output or --arpa from being written (nothing is created yet), or None."""
    return next((p for name, path in (("--output", opts.output), ("--arpa", opts.arpa))
                 if path and (p := output_problem(name, path))), None)


def main(argv=None) -> int:
    opts = parse_options(LmOptions, argv, prog="python -m whisper_scratch.lm")
    try:
        norm = normalizer_for(opts)
        lines = [norm(t) for p in opts.text for t in read_text(p)]
        held = {norm(t) for p in opts.exclude for t in read_text(p)} - {""}
    except (OSError, ValueError) as e:  # a missing or unreadable text, a bad --model-path
        print(f"error: {e}", file=sys.stderr)
        return 2
    kept = [t for t in lines if t and t not in held]
    dropped = sum(1 for t in lines if t and t in held)
    blank = sum(1 for t in lines if not t)
    print(f"{len(kept)} sentences, {sum(map(len, kept))} characters from {', '.join(opts.text)}; "
          f"{dropped} dropped as held out ({len(held)} sentences in {', '.join(opts.exclude) or 'no --exclude'}); "
          f"{blank} blank lines skipped", file=sys.stderr)
    problem = (f"{', '.join(opts.text)}: no sentences left to learn from ({len(lines)} lines: {blank} blank, "
               f"{dropped} held out by --exclude)") if not kept else outputs_problem(opts)
    if problem:  # before the build, so that no time is spent on a model that cannot be written
        print(f"error: {problem}", file=sys.stderr)
        return 2
    lm = build(kept, opts.order)
    lm.normalizer = asdict(norm)
    try:
        lm.save(opts.output)
        if opts.arpa:
            lm.write_arpa(opts.arpa)
    except OSError as e:  # a folder nobody may write to, a full disk
        print(f"error: could not write {e.filename or opts.output}: {e.strerror}", file=sys.stderr)
        return 1
    n_grams = len(lm.symbols) + sum(len(ids) for ids, _, _ in lm.contexts.values())
    print(f"wrote {opts.output}: order {opts.order}, {len(lm.symbols)} symbols, {n_grams} n-grams"
          + (f"; ARPA {opts.arpa}" if opts.arpa else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
