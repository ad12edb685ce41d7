"""Files on disk -> padded batches: Common Voice splits and generic manifests, a report of what
was skipped and why, a duration-bucketed batch sampler budgeted in padded seconds (resumable,
shardable), an on-disk feature cache, and collation that pads to the batch's longest clip."""
from __future__ import annotations

import hashlib
import math
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import audio as A
from . import tables as T
from .augment import (AugmentOptions, NoiseBank, add_noise, channel_response, pad_silence, random_gain, spec_augment,
                      speed_perturb, vtlp)
from .config import option, parse_options
from .tokenizer import Tokenizer

CV_SPLITS = ("train", "dev", "test", "validated")
CV_HELD = ("dev", "test")  # the official held-out splits
CV_REQUIRED_COLUMNS = ("client_id", "path", "sentence")
CARVE = (0.1, 0.1)  # dev and test fractions of validated.tsv when a folder has no split files


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: str  # absolute path
    text: str
    duration: float  # seconds
    speaker: str = ""


@dataclass
class DataReport:
    """Everything skipped during data preparation or loading: counted, named, summarised; and
    notes on what was derived (a split carved out of validated.tsv)."""

    skipped: dict = field(default_factory=lambda: defaultdict(list))  # reason -> [names]
    oov: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason].append(str(name))

    def note(self, text: str) -> None:
        if text not in self.notes:  # each split's reader may derive the same thing
            self.notes.append(text)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, limit: int = 5) -> str:
        lines = [f"  {n}" for n in self.notes]
        for reason, names in sorted(self.skipped.items()):
            shown = ", ".join(names[:limit]) + (f", … (+{len(names) - limit})" if len(names) > limit else "")
            lines.append(f"  skipped {len(names)} ({reason}): {shown}")
        if self.oov:
            top = ", ".join(f"{c!r}×{n}" for c, n in self.oov.most_common(20))
            lines.append(f"  {sum(self.oov.values())} transcript characters outside the tokenizer: {top}")
        return "\n".join(lines) if self.num_skipped or self.oov else "\n".join(lines + ["  nothing skipped"])


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def _read_tsv(path: Path) -> list:
    """(line number, row dict) pairs of a header TSV; quoting detected per file (tables.py)."""
    return T.read_tsv(path)[1]


def find_cv_language_dir(local_data_dir, language: str = "mn") -> Path:
    """Accept the corpus root (cv-corpus-16.1/, holding mn/) or the language folder itself."""
    root = Path(local_data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--local-data-dir {root}: no such folder")
    for cand in (root, root / language):
        if (cand / "clips").is_dir() and any((cand / f"{s}.tsv").is_file() for s in CV_SPLITS):
            return cand
    raise FileNotFoundError(
        f"--local-data-dir {root}: not a Common Voice folder; expected {root}/{language}/clips/ and "
        f"{root}/{language}/{{train,dev,test,validated}}.tsv (or those directly in {root})")


def _cv_durations(lang_dir: Path, report: DataReport) -> dict:
    """clip -> seconds from clip_durations.tsv; without it (older releases, samples) every clip's
    duration costs a header read instead. A row that cannot be read is counted and costs the same."""
    path = lang_dir / "clip_durations.tsv"
    if not path.is_file():
        return {}
    header, rows = T.read_tsv(path)
    if not {"clip", "duration[ms]"} <= set(header):
        raise ValueError(f"{path}:1: expected columns 'clip' and 'duration[ms]', found {header}")
    durations = {}
    for lineno, r in rows:
        try:
            ms = float(r.get("duration[ms]", ""))
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms > 0 and r.get("clip"):
            durations[r["clip"]] = ms / 1000
        else:
            report.skip("clip_durations.tsv row unreadable (duration read from the audio header)",
                        f"{path.name}:{lineno}")
    return durations


def _cv_rows(lang_dir: Path, split: str) -> list:
    path = lang_dir / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a Common Voice folder has {', '.join(CV_SPLITS)} .tsv files "
                                f"(or validated.tsv alone, from which dev and test are carved)")
    header, rows = T.read_tsv(path)
    missing = [c for c in CV_REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {missing}; found {header}")
    return rows


def carving_needed(lang_dir: Path) -> bool:
    """A sample or delta release: validated.tsv and clips/, none of train/dev/test.tsv."""
    return (lang_dir / "validated.tsv").is_file() and not any((lang_dir / f"{s}.tsv").is_file() for s in CV_HELD)


def _check_carve(carve: Tuple[float, float]) -> None:
    dev, test = carve
    if not (0 <= dev < 1 and 0 <= test < 1 and dev + test < 1):
        raise ValueError(f"--carve-dev {dev} / --carve-test {test}: each must be in [0, 1) and their sum "
                         f"below 1 (the rest is the training split)")


def _speaker_order(client_id: str) -> str:
    # SHA-256, not hash(): Python salts str hashes per process; this order is the same everywhere
    return hashlib.sha256(client_id.encode("utf-8")).hexdigest()


def _pick_speakers(counts: dict, order: list, target: int) -> set:
    """Speakers, in hash order, whose clips fit in what is left of `target` clips; if none fits (every
    speaker is prolific) the one with the fewest clips, so a split asked for is never empty."""
    chosen, room = set(), target
    for spk in order:
        if 0 < counts[spk] <= room:
            chosen.add(spk)
            room -= counts[spk]
    if not chosen and target > 0 and order:
        chosen.add(min(order, key=lambda s: counts[s]))  # min keeps the first in hash order on ties
    return chosen


def _sentence_key(sentence: str) -> str:
    return " ".join(sentence.split()).casefold()


def carve_splits(rows: list, carve: Tuple[float, float]) -> Tuple[dict, dict]:
    """validated.tsv rows -> ({train, dev, test: rows}, {split: [rows dropped]}). Speaker-disjoint:
    each client_id goes to one split, dev then test taking speakers in SHA-256 order until they hold
    their share of the clips. Sentence-disjoint: a test clip reading a dev sentence, and a train
    clip reading a dev or test sentence, is dropped (and counted)."""
    _check_carve(carve)
    counts = Counter(r.get("client_id", "") for _, r in rows)
    order = sorted(counts, key=_speaker_order)
    targets = [max(1, round(f * len(rows))) if f > 0 else 0 for f in carve]
    dev = _pick_speakers(counts, order, targets[0])
    test = _pick_speakers(counts, [s for s in order if s not in dev], targets[1])
    split_of = {s: "dev" if s in dev else "test" if s in test else "train" for s in order}
    by_split = {name: [(n, r) for n, r in rows if split_of[r.get("client_id", "")] == name]
                for name in ("dev", "test", "train")}
    kept, dropped, seen = {}, {}, set()
    for name in ("dev", "test", "train"):  # dev keeps every clip; later splits give way
        kept[name] = [(n, r) for n, r in by_split[name] if _sentence_key(r.get("sentence") or "") not in seen]
        dropped[name] = [(n, r) for n, r in by_split[name] if _sentence_key(r.get("sentence") or "") in seen]
        seen |= {_sentence_key(r.get("sentence") or "") for _, r in kept[name]}
    return kept, dropped


def _describe_carve(kept: dict, dropped: dict, carve: Tuple[float, float]) -> str:
    parts = [f"{name} {len(kept[name])} clips of {len({r.get('client_id') for _, r in kept[name]})} speakers"
             for name in ("train", "dev", "test")]
    n_dropped = sum(len(v) for v in dropped.values())
    return (f"carved from validated.tsv (no train/dev/test.tsv; speakers ordered by SHA-256 of client_id, "
            f"--carve-dev {carve[0]:g} --carve-test {carve[1]:g}): {', '.join(parts)}; {n_dropped} clips dropped "
            f"so that no sentence is in two splits")


def _carved_rows(lang_dir: Path, split: str, carve: Tuple[float, float], report: DataReport) -> list:
    kept, dropped = carve_splits(_cv_rows(lang_dir, "validated"), carve)
    if not kept["train"]:
        raise ValueError(f"{lang_dir / 'validated.tsv'}: carving dev and test left no training clips "
                         f"({len(kept['dev'])} dev, {len(kept['test'])} test); lower --carve-dev/--carve-test")
    report.note(_describe_carve(kept, dropped, carve))
    name = "train" if split == "validated" else split  # carved: validated minus dev/test is train
    for _, r in dropped[name]:
        report.skip(f"carved {name} clip reads a sentence of an earlier split", r.get("path"))
    return kept[name]


def _validated_minus_held(lang_dir: Path, rows: list, report: DataReport) -> list:
    """validated.tsv minus every clip, sentence and speaker of dev and test."""
    held = [r for s in CV_HELD if (lang_dir / f"{s}.tsv").is_file() for _, r in _cv_rows(lang_dir, s)]
    clips, sents, spks = ({r.get(k) for r in held} for k in ("path", "sentence", "client_id"))
    kept = []
    for n, r in rows:
        if r.get("path") in clips or r.get("sentence") in sents or r.get("client_id") in spks:
            report.skip("validated clip shares its clip, sentence or speaker with dev/test", r.get("path"))
        else:
            kept.append((n, r))
    return kept


def read_common_voice(local_data_dir, split: str, language: str = "mn",
                      report: Optional[DataReport] = None, carve: Tuple[float, float] = CARVE) -> list:
    """One Common Voice split as Utterances. `validated` is validated.tsv minus every clip,
    sentence and speaker of dev and test, so it can be trained on without leaking into them. A
    folder with validated.tsv alone has its train/dev/test carved out of it (`carve_splits`;
    `carve` = the dev and test fractions); other .tsv files (other, invalidated, reported) and
    extra columns are ignored."""
    if split not in CV_SPLITS:
        raise ValueError(f"split must be one of {CV_SPLITS}, got {split!r}")
    _check_carve(carve)
    report = report if report is not None else DataReport()
    lang_dir = find_cv_language_dir(local_data_dir, language)
    if carving_needed(lang_dir):
        rows = _carved_rows(lang_dir, split, carve, report)
    else:
        rows = _cv_rows(lang_dir, split)
        if split == "validated":
            rows = _validated_minus_held(lang_dir, rows, report)
    durations = _cv_durations(lang_dir, report)
    table = "validated" if carving_needed(lang_dir) else split
    utts = []
    for lineno, r in rows:
        if not r.get("path") or r.get("sentence") is None:
            report.skip("unreadable row", f"{table}.tsv:{lineno}")
            continue
        utt = _make_utterance(lang_dir / "clips" / r["path"], r["sentence"], durations.get(r["path"]),
                              r.get("client_id", ""), report, r["path"])
        if utt:
            utts.append(utt)
    return utts


def _usable_path(path: Path, report: DataReport) -> bool:
    """Exists and is a non-empty file; a path the OS refuses (a NUL, too long) is a counted skip."""
    try:
        if not path.is_file():
            report.skip("audio file missing", path)
            return False
        if path.stat().st_size == 0:
            report.skip("audio file empty", path)
            return False
    except (OSError, ValueError) as e:  # ValueError: embedded NUL; OSError: name too long
        report.skip("audio path unusable", f"{str(path)[:200]!r} ({e})")
        return False
    return True


def _make_utterance(path: Path, text: str, duration: Optional[float], speaker: str,
                    report: DataReport, name: str) -> Optional[Utterance]:
    """Check the file cheaply (exists, non-empty; header only when the duration is unknown)."""
    if not _usable_path(path, report):
        return None
    if duration is None:
        try:
            duration = A.audio_duration(path)
        except A.AudioError as e:
            report.skip("audio file unreadable", f"{path} ({str(e).split(': ', 1)[-1]})")
            return None
    if not text.strip():
        report.skip("empty transcript", path)
        return None
    return Utterance(id=Path(name).stem if name else path.stem, audio=str(path.resolve()), text=text,
                     duration=float(duration), speaker=speaker)


_PATH_KEYS, _TEXT_KEYS = ("path", "audio", "audio_path", "audio_filepath"), ("text", "sentence", "transcript")


def _manifest_rows(path: Path, report: DataReport) -> list:
    """(line number, row) pairs of a TSV or JSONL manifest; unparsable JSON lines counted."""
    if path.suffix not in (".jsonl", ".json"):
        return _read_tsv(path)
    rows, bad = T.read_jsonl(path)
    for lineno, why in bad:
        report.skip("unreadable row", f"{path.name}:{lineno} ({why})")
    return rows


def _duration(value) -> Optional[float]:
    """A manifest's duration: None when absent; ValueError unless a finite number > 0."""
    if value in (None, ""):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"duration {value!r}")
    d = float(value)
    if not (math.isfinite(d) and d > 0):
        raise ValueError(f"duration {value!r}")
    return d


def read_manifest(path, split: Optional[str] = None, report: Optional[DataReport] = None) -> list:
    """A generic manifest: TSV with a header or JSONL, one utterance per row/line with an audio
    path (relative to the manifest's folder or absolute), text, and optional duration, speaker,
    split and id. Rows of other splits are left out when `split` is given."""
    path = Path(path)
    report = report if report is not None else DataReport()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: no such file")
    rows = _manifest_rows(path, report)
    if not rows:
        raise ValueError(f"manifest {path}: no rows")
    keys = {k for _, r in rows[:10] for k in r}
    pkey = next((k for k in _PATH_KEYS if k in keys), None)
    tkey = next((k for k in _TEXT_KEYS if k in keys), None)
    if pkey is None or tkey is None:
        raise ValueError(f"manifest {path}: needs an audio column ({'/'.join(_PATH_KEYS)}) and a text column "
                         f"({'/'.join(_TEXT_KEYS)}); found {sorted(map(str, keys))}")
    utts = []
    for lineno, r in rows:
        if split is not None and "split" in r and r["split"] != split:
            continue
        utt = _manifest_utterance(path, lineno, r, pkey, tkey, report)
        if utt:
            utts.append(utt)
    return utts


def _manifest_utterance(path: Path, lineno: int, r: dict, pkey: str, tkey: str,
                        report: DataReport) -> Optional[Utterance]:
    where = f"{path.name}:{lineno}"
    audio, text = r.get(pkey), r.get(tkey)
    if not isinstance(audio, str) or not audio or not isinstance(text, (str, int, float)) or isinstance(text, bool):
        report.skip("unreadable row", f"{where} (needs a path string and a text)")
        return None
    try:
        dur = _duration(r.get("duration"))
    except (ValueError, OverflowError) as e:
        report.skip("unreadable row", f"{where} ({e})")
        return None
    file = Path(audio) if Path(audio).is_absolute() else path.parent / audio
    return _make_utterance(file, str(text), dur, str(r.get("speaker", "")), report, str(r.get("id") or audio))


def read_references(path) -> Tuple[List[Tuple[str, str]], str]:
    """(audio path as written, transcript) pairs and the format's name, for scoring:

    - "common_voice": a TSV whose header names `path` and `sentence` (other columns ignored);
    - "manifest": a TSV or JSONL with the columns `read_manifest` accepts (path/audio..., text/...);
    - "tsv": no such header, every line `path<TAB>text`.
    The same readers as training (CSV quoting detected per file, tables.py). Relative paths are
    returned as written; the caller resolves them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference file not found")
    if path.suffix in (".jsonl", ".json"):
        rows, bad = T.read_jsonl(path)
        if bad:
            raise ValueError(f"{path}:{bad[0][0]}: not a JSON object line ({bad[0][1]})")
        kind, keys = "manifest", {k for _, r in rows for k in r}
    else:
        table = T.read_tsv_rows(path)
        if not table:
            raise ValueError(f"{path}: reference file is empty")
        header = {c.strip().lstrip("\ufeff").lower() for c in table[0]}
        looks_like_data = any(c.strip().lower().endswith(A.AUDIO_EXTENSIONS) for c in table[0])
        if bool(header & set(_PATH_KEYS)) != bool(header & set(_TEXT_KEYS)) and not looks_like_data:  # half a header
            raise ValueError(f"{path}:1: a header needs an audio column ({'/'.join(_PATH_KEYS)}) and a text column "
                             f"({'/'.join(_TEXT_KEYS)}); found {table[0]}")
        if not header & set(_PATH_KEYS):
            return _headerless_pairs(path, table), "tsv"
        names = [c.strip().lstrip("\ufeff").lower() for c in table[0]]
        rows = [(n, dict(zip(names, row))) for n, row in enumerate(table[1:], start=2) if "".join(row).strip()]
        kind, keys = "common_voice" if "sentence" in header and "text" not in header else "manifest", header
    return _reference_pairs(path, rows, kind, keys), kind


def _reference_pairs(path: Path, rows: list, kind: str, keys: set) -> list:
    """Pairs from the rows; `keys`: the header's columns (TSV) or every key of every line (JSONL)."""
    pkey = next((k for k in _PATH_KEYS if k in keys), None)
    tkey = next((k for k in _TEXT_KEYS if k in keys), None)
    if pkey is None or tkey is None:
        raise ValueError(f"{path}: needs an audio column ({'/'.join(_PATH_KEYS)}) and a text column "
                         f"({'/'.join(_TEXT_KEYS)}); found {sorted(map(str, keys))}")
    pairs = []
    for lineno, r in rows:
        audio, text = r.get(pkey), r.get(tkey)
        if not isinstance(audio, str) or not isinstance(text, (str, int, float)) or isinstance(text, bool):
            raise ValueError(f"{path}:{lineno}: expected a path and a transcript column ({kind} format), "
                             f"got {str(r)[:200]}")
        pairs.append((audio.strip(), str(text).strip()))
    return pairs


def _headerless_pairs(path: Path, table: list) -> list:
    pairs = []
    for lineno, row in enumerate(table, start=1):
        if not row or not "".join(row).strip():
            continue  # blank line
        if len(row) < 2:
            raise ValueError(f"{path}:{lineno}: expected a path and a transcript column (tsv format), "
                             f"got {len(row)} field(s): {str(row)[:200]}")
        pairs.append((row[0].strip(), row[1].strip()))
    return pairs


def load_split(source, split: str, language: str = "mn", report: Optional[DataReport] = None,
               carve: Tuple[float, float] = CARVE) -> list:
    """`source` is a Common Voice folder (corpus root or language folder) or a manifest file;
    `carve`: dev and test fractions for a Common Voice folder with validated.tsv only."""
    if Path(source).is_file():
        return read_manifest(source, split, report)
    return read_common_voice(source, split, language, report, carve)


def hours(utts: Sequence[Utterance]) -> float:
    return sum(u.duration for u in utts) / 3600


def filter_for_model(utts: Sequence[Utterance], tokenizer: Tokenizer, n_text_ctx: int,
                     max_seconds: float = A.CHUNK_SECONDS, report: Optional[DataReport] = None) -> list:
    """Drop (and count) clips the model cannot take: audio over 30 s, or a transcript that does
    not fit the decoder context with its prompt and end token. Count out-of-alphabet characters."""
    report = report if report is not None else DataReport()
    prompt = len(tokenizer.sot_sequence())
    kept = []
    for u in utts:
        if u.duration > max_seconds:
            report.skip(f"audio longer than {max_seconds:g} s", u.audio)
            continue
        if u.duration * A.SAMPLE_RATE <= A.MIN_SAMPLES - 1:  # log_mel_spectrogram needs MIN_SAMPLES samples
            report.skip(f"audio shorter than {1000 * A.MIN_SAMPLES / A.SAMPLE_RATE:.1f} ms", u.audio)
            continue
        report.oov.update(tokenizer.find_oov(u.text))
        if prompt + len(tokenizer.encode(u.text)) + 1 > n_text_ctx:
            report.skip(f"transcript longer than the decoder context ({n_text_ctx} tokens)", u.audio)
            continue
        kept.append(u)
    return kept


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------
_EPOCH_STRIDE = 1_000_003  # above any epoch count, so seed * stride + epoch differs for every (seed, epoch)


class DurationBucketSampler:
    """Batches of similar duration whose padded size (batch size × longest clip) stays within
    `max_batch_seconds`, optionally also capped at `max_batch_size` items.

    Buckets hold equal numbers of clips (edges at duration quantiles). Each epoch shuffles within
    buckets and then shuffles batch order, deterministically from (seed, epoch). With world_size
    > 1 every rank computes the same global batch list and takes every world_size-th batch; the
    list is first made a multiple of world_size by halving the largest batches, so ranks run the
    same number of steps and each clip appears exactly once per epoch across ranks.
    `state_dict()`/`load_state_dict()` resume mid-epoch with the same remaining batches.
    """

    def __init__(self, durations: Sequence[float], max_batch_seconds: Optional[float] = None,
                 max_batch_size: Optional[int] = None, num_buckets: int = 10, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if max_batch_seconds is None and max_batch_size is None:
            raise ValueError("give max_batch_seconds, max_batch_size or both")
        if max_batch_seconds is not None and max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds must be > 0, got {max_batch_seconds}")
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        too_long = [d for d in durations if max_batch_seconds is not None and d > max_batch_seconds]
        if too_long:
            raise ValueError(f"{len(too_long)} clips are longer than max_batch_seconds={max_batch_seconds} "
                             f"(longest {max(too_long):.1f} s); raise the budget or filter them first")
        if len(durations) == 0:
            raise ValueError("cannot batch an empty dataset")
        self.durations = np.asarray(durations, dtype=np.float64)
        self.max_batch_seconds, self.max_batch_size = max_batch_seconds, max_batch_size
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        order = np.argsort(self.durations, kind="stable")
        self.buckets = [b for b in np.array_split(order, min(num_buckets, len(order))) if len(b)]
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch already consumed (resume)
        self._len_cache: dict = {}

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        self.epoch = epoch

    def _fits(self, n: int, longest: float) -> bool:
        size_ok = self.max_batch_size is None or n <= self.max_batch_size
        secs_ok = self.max_batch_seconds is None or n * longest <= self.max_batch_seconds + 1e-9
        return size_ok and secs_ok

    def global_batches(self, epoch: int) -> list:
        """Every batch of the epoch, for all ranks, in order."""
        rng = random.Random(self.seed * _EPOCH_STRIDE + epoch)
        batches = []
        for bucket in self.buckets:
            idx = [int(i) for i in bucket]
            if self.shuffle:
                rng.shuffle(idx)
            batch, longest = [], 0.0
            for i in idx:
                d = self.durations[i]
                if batch and not self._fits(len(batch) + 1, max(longest, d)):
                    batches.append(batch)
                    batch, longest = [], 0.0
                batch.append(i)
                longest = max(longest, d)
            if batch:
                batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        while len(batches) % self.world_size:
            big = max(range(len(batches)), key=lambda j: len(batches[j]))
            if len(batches[big]) < 2:
                break  # fewer clips than ranks: cannot balance; ranks get uneven counts
            b = batches.pop(big)
            batches[big:big] = [b[: len(b) // 2], b[len(b) // 2:]]
        return batches

    def __iter__(self) -> Iterator[list]:
        mine = self.global_batches(self.epoch)[self.rank::self.world_size]
        for batch in mine[self.start_batch:]:
            yield batch

    def __len__(self) -> int:
        """Batches this rank yields in the current epoch (resume position excluded)."""
        if self.epoch not in self._len_cache:
            self._len_cache = {self.epoch: len(self.global_batches(self.epoch)[self.rank::self.world_size])}
        return self._len_cache[self.epoch] - self.start_batch

    def state_dict(self, batches_done: int) -> dict:
        """Position after `batches_done` batches of the current epoch (the trainer counts them:
        a DataLoader prefetches, so the sampler itself runs ahead of what was trained on)."""
        return {"epoch": self.epoch, "batches_done": int(batches_done), "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["world_size"] != self.world_size:
            raise ValueError(f"sampler state is for seed {state['seed']}, world size {state['world_size']}; "
                             f"this run has seed {self.seed}, world size {self.world_size}")
        self.epoch = int(state["epoch"])
        self.start_batch = int(state["batches_done"])


# ---------------------------------------------------------------------------------------------
# Features, dataset, collation
# ---------------------------------------------------------------------------------------------
FEATURE_VERSION = 2  # bump when the front end's computation changes (2: clip_audio's length limits)


class FeatureCache:
    """log-mel features on disk in fp16, keyed by the file (path, size, mtime) and every front-end
    parameter, so a changed file or front end never returns stale features."""

    def __init__(self, folder, n_mels: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n_mels = n_mels

    def key(self, path: str, speed: float = 1.0) -> str:
        st = os.stat(path)
        ident = (f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|n_mels={self.n_mels}|sr={A.SAMPLE_RATE}"
                 f"|n_fft={A.N_FFT}|hop={A.HOP_LENGTH}|speed={speed}|v={FEATURE_VERSION}")
        return hashlib.sha1(ident.encode()).hexdigest()

    def get(self, path: str, speed: float = 1.0) -> torch.Tensor:
        key = self.key(path, speed)
        file = self.folder / key[:2] / f"{key}.npy"
        if file.is_file():
            try:
                return torch.from_numpy(np.load(file).astype(np.float32))
            except (ValueError, OSError):
                pass  # a torn write from a killed worker: recompute below
        mel = A.log_mel_spectrogram(clip_audio(path, speed), self.n_mels)
        file.parent.mkdir(exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, mel.numpy().astype(np.float16))
        os.replace(tmp, file)
        return mel


def clip_audio(path: str, speed: float = 1.0) -> np.ndarray:
    """A training clip's samples at `speed`. The manifest's duration is only what it says: a
    clip really shorter than the STFT's minimum or longer than 30 s is an AudioError naming the
    file (a counted skip), never a crash in the STFT or a clip cut short under its full
    transcript. A speed change that would cross either limit is not applied to that clip."""
    wav = A.load_audio(path)
    if len(wav) < A.MIN_SAMPLES:
        raise A.AudioError(f"{path}: too short: {1000 * len(wav) / A.SAMPLE_RATE:.1f} ms of audio, at least "
                           f"{1000 * A.MIN_SAMPLES / A.SAMPLE_RATE:.1f} ms are needed")
    if len(wav) > A.N_SAMPLES:
        raise A.AudioError(f"{path}: longer than 30 s ({len(wav) / A.SAMPLE_RATE:.1f} s of audio): the model "
                           f"takes at most 30 s with its transcript")
    fast = speed_perturb(wav, speed)
    return fast if A.MIN_SAMPLES <= len(fast) <= A.N_SAMPLES else wav


class AsrDataset(torch.utils.data.Dataset):
    """Utterance i -> {mel (n_mels, T), tokens (prompt + text + eot), id}; None if unreadable."""

    def __init__(self, utts: Sequence[Utterance], tokenizer: Tokenizer, n_mels: int = 80,
                 augment: Optional[AugmentOptions] = None, cache_dir: Optional[str] = None,
                 seed: int = 0, language: Optional[str] = None):
        self.utts, self.tokenizer, self.n_mels = list(utts), tokenizer, n_mels
        self.augment = augment or AugmentOptions()
        self.cache = FeatureCache(cache_dir, n_mels) if cache_dir else None
        self.noise = NoiseBank(self.augment.noise_dir) if self.augment.noise_dir else None
        self.seed, self.epoch = seed, 0
        self.prompt = list(tokenizer.sot_sequence(language))
        self.tokens = [self.prompt + tokenizer.encode(u.text) + [tokenizer.eot] for u in self.utts]

    def __len__(self) -> int:
        return len(self.utts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _features(self, u: Utterance, rng: np.random.Generator) -> torch.Tensor:
        aug = self.augment
        speed = float(rng.choice(aug.speeds)) if aug.speed_perturb else 1.0
        use_noise = self.noise is not None and rng.random() < aug.noise_prob
        if self.cache is not None and not use_noise:
            mel = self.cache.get(u.audio, speed)
        else:
            wav = clip_audio(u.audio, speed)
            noise = self.noise.sample(rng) if use_noise else None
            if noise is not None:
                wav = add_noise(wav, noise, float(rng.uniform(*aug.snr_range)), rng)
            mel = A.log_mel_spectrogram(wav, self.n_mels)
        if aug.vtlp_max > 0:
            mel = vtlp(mel, float(rng.uniform(1 - aug.vtlp_max, 1 + aug.vtlp_max)))
        if aug.channel_db > 0:
            mel = channel_response(mel, aug.channel_db, rng)
        if aug.gain_db > 0:
            mel = random_gain(mel, aug.gain_db, rng)
        if aug.silence_pad_max > 0 and rng.random() < aug.silence_pad_prob:
            mel = pad_silence(mel, aug.silence_pad_max, A.N_FRAMES, rng, aug.silence_pad_fill)
        return spec_augment(mel, aug, rng) if aug.spec_augment else mel

    def __getitem__(self, i: int) -> Optional[dict]:
        u = self.utts[i]
        # one generator per (seed, epoch, item): identical augmentation whatever the worker layout
        rng = np.random.default_rng([self.seed, self.epoch, i])
        try:
            mel = self._features(u, rng)
        except A.AudioError as e:
            return {"error": str(e), "id": u.id}
        return {"mel": mel, "tokens": self.tokens[i], "id": u.id, "index": i}


def collate(items: list, pad_id: int, prompt_len: int) -> dict:
    """Pad mels (with zeros, to the longest in the batch) and tokens (with pad_id).

    tokens_in = tokens[:-1]; targets = tokens[1:] with the prompt's own continuations
    (language, task, notimestamps) set to pad_id: they are given, not predicted, so no loss.
    Unreadable clips are dropped here and named in `errors`.
    """
    errors = [it["error"] for it in items if "error" in it]
    items = [it for it in items if "error" not in it]
    if not items:
        return {"errors": errors, "size": 0}
    B = len(items)
    T = max(it["mel"].shape[-1] for it in items)
    L = max(len(it["tokens"]) for it in items) - 1
    mel = torch.zeros(B, items[0]["mel"].shape[0], T)
    tokens_in = torch.full((B, L), pad_id, dtype=torch.long)
    targets = torch.full((B, L), pad_id, dtype=torch.long)
    for b, it in enumerate(items):
        mel[b, :, : it["mel"].shape[-1]] = it["mel"]
        tok = torch.tensor(it["tokens"], dtype=torch.long)
        tokens_in[b, : len(tok) - 1] = tok[:-1]
        targets[b, : len(tok) - 1] = tok[1:]
        targets[b, : prompt_len - 1] = pad_id
    return {
        "mel": mel,
        "mel_lens": torch.tensor([it["mel"].shape[-1] for it in items]),
        "tokens_in": tokens_in,
        "targets": targets,
        "ids": [it["id"] for it in items],
        "indices": [it["index"] for it in items],
        "errors": errors,
        "size": B,
    }


class Collator:
    """Picklable collate_fn for DataLoader workers."""

    def __init__(self, tokenizer: Tokenizer):
        self.pad_id, self.prompt_len = tokenizer.pad, len(tokenizer.sot_sequence())

    def __call__(self, items: list) -> dict:
        return collate(items, self.pad_id, self.prompt_len)


_PREFETCH_BATCHES = 4  # batches each worker keeps ready (torch's default 2): one slow MP3 decode does not stall a step


def make_loader(dataset: AsrDataset, sampler: DurationBucketSampler, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader over whole batches from the sampler; workers decode MP3 and compute features."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=Collator(dataset.tokenizer), num_workers=num_workers,
        persistent_workers=False, prefetch_factor=_PREFETCH_BATCHES if num_workers > 0 else None,
    )


def describe_splits(splits: dict) -> str:
    """'train 2,208 clips 3.05 h | dev …' for the start-of-run summary."""
    return " | ".join(f"{name} {len(u):,} clips {hours(u):.2f} h" for name, u in splits.items())


def _split_names(source, language: str) -> list:
    """The splits a source has: a manifest's `split` values (None: no such column), or Common
    Voice's (carved ones: train, dev, test; validated would repeat train)."""
    if Path(source).is_file():
        report = DataReport()
        names = sorted({str(r["split"]) for _, r in _manifest_rows(Path(source), report) if r.get("split")})
        return names or [None]
    return list(CV_SPLITS[:3] if carving_needed(find_cv_language_dir(source, language)) else CV_SPLITS)


def summarise_source(source, language: str = "mn", carve: Tuple[float, float] = CARVE) -> str:
    """Clips and hours of every split of a Common Voice folder or manifest, plus what was skipped
    (and, for a folder with validated.tsv only, what was carved)."""
    report = DataReport()
    splits = {str(n or "all"): load_split(source, n, language, report, carve) if n else
              read_manifest(source, None, report) for n in _split_names(source, language)}
    return f"{source}\n{describe_splits(splits)}\n{report.summary()}"


@dataclass(frozen=True)
class SummaryOptions:
    """Print the clips and hours of each split of a data source."""
    source: str = option(help="Common Voice folder (corpus root or language folder) or manifest", positional=True)
    language: str = option("mn", "Common Voice language folder")
    carve_dev: float = option(CARVE[0], "fraction of validated.tsv carved as dev when a Common Voice folder "
                                        "has no train/dev/test.tsv")
    carve_test: float = option(CARVE[1], "the same for test")


def main(argv=None) -> None:
    opts = parse_options(SummaryOptions, argv, prog="python -m whisper_scratch.data")
    try:
        print(summarise_source(opts.source, opts.language, (opts.carve_dev, opts.carve_test)))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()


__all__ = [
    "Utterance", "DataReport", "find_cv_language_dir", "read_common_voice", "read_manifest", "load_split",
    "filter_for_model", "DurationBucketSampler", "FeatureCache", "AsrDataset", "collate", "Collator",
    "make_loader", "describe_splits", "hours", "summarise_source", "carve_splits", "carving_needed", "read_references",
]
