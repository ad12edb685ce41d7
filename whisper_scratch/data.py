"""Files on disk -> padded batches: Common Voice splits and generic manifests, a report of what
was skipped and why, a duration-bucketed batch sampler budgeted in padded seconds (resumable,
shardable), an on-disk feature cache, and collation that pads to the batch's longest clip."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import audio as A
from .augment import AugmentOptions, NoiseBank, add_noise, spec_augment, speed_perturb
from .config import option, parse_options
from .tokenizer import Tokenizer

CV_SPLITS = ("train", "dev", "test", "validated")
CV_REQUIRED_COLUMNS = ("client_id", "path", "sentence")


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: str  # absolute path
    text: str
    duration: float  # seconds
    speaker: str = ""


@dataclass
class DataReport:
    """Everything skipped during data preparation or loading: counted, named, summarised."""

    skipped: dict = field(default_factory=lambda: defaultdict(list))  # reason -> [names]
    oov: Counter = field(default_factory=Counter)

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason].append(str(name))

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self, limit: int = 5) -> str:
        lines = []
        for reason, names in sorted(self.skipped.items()):
            shown = ", ".join(names[:limit]) + (f", … (+{len(names) - limit})" if len(names) > limit else "")
            lines.append(f"  skipped {len(names)} ({reason}): {shown}")
        if self.oov:
            top = ", ".join(f"{c!r}×{n}" for c, n in self.oov.most_common(20))
            lines.append(f"  {sum(self.oov.values())} transcript characters outside the tokenizer: {top}")
        return "\n".join(lines) if lines else "  nothing skipped"


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------
def _read_tsv(path: Path) -> list:
    """Rows of a header TSV as dicts; quoting disabled (Common Voice sentences contain `"`)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty file, expected a header line")
        return list(reader)


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


def _cv_durations(lang_dir: Path) -> dict:
    path = lang_dir / "clip_durations.tsv"
    if not path.is_file():
        return {}
    rows = _read_tsv(path)
    if rows and not {"clip", "duration[ms]"} <= set(rows[0]):
        raise ValueError(f"{path}: expected columns 'clip' and 'duration[ms]', found {list(rows[0])}")
    return {r["clip"]: float(r["duration[ms]"]) / 1000 for r in rows if r.get("duration[ms]")}


def _cv_rows(lang_dir: Path, split: str) -> list:
    path = lang_dir / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a Common Voice folder has {', '.join(CV_SPLITS)} .tsv files")
    rows = _read_tsv(path)
    missing = [c for c in CV_REQUIRED_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; found {list(rows[0])}")
    return rows


def read_common_voice(local_data_dir, split: str, language: str = "mn",
                      report: Optional[DataReport] = None) -> list:
    """One Common Voice split as Utterances. `validated` is validated.tsv minus every clip,
    sentence and speaker of dev and test, so it can be trained on without leaking into them."""
    if split not in CV_SPLITS:
        raise ValueError(f"split must be one of {CV_SPLITS}, got {split!r}")
    report = report if report is not None else DataReport()
    lang_dir = find_cv_language_dir(local_data_dir, language)
    rows = _cv_rows(lang_dir, split)
    if split == "validated":
        held = [r for s in ("dev", "test") if (lang_dir / f"{s}.tsv").is_file() for r in _cv_rows(lang_dir, s)]
        clips, sents, spks = ({r[k] for r in held} for k in ("path", "sentence", "client_id"))
        kept = []
        for r in rows:
            if r["path"] in clips or r["sentence"] in sents or r["client_id"] in spks:
                report.skip("validated clip shares its clip, sentence or speaker with dev/test", r["path"])
            else:
                kept.append(r)
        rows = kept
    durations = _cv_durations(lang_dir)
    utts = []
    for i, r in enumerate(rows):
        name = r.get("path") or f"{split}.tsv row {i + 2}"
        if not r.get("path") or r.get("sentence") is None:
            report.skip("unreadable row", f"{split}.tsv row {i + 2}")
            continue
        utt = _make_utterance(lang_dir / "clips" / r["path"], r["sentence"], durations.get(r["path"]),
                              r.get("client_id", ""), report, name)
        if utt:
            utts.append(utt)
    return utts


def _make_utterance(path: Path, text: str, duration: Optional[float], speaker: str,
                    report: DataReport, name: str) -> Optional[Utterance]:
    """Check the file cheaply (exists, non-empty; header only when the duration is unknown)."""
    if not path.is_file():
        report.skip("audio file missing", path)
        return None
    if path.stat().st_size == 0:
        report.skip("audio file empty", path)
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


def read_manifest(path, split: Optional[str] = None, report: Optional[DataReport] = None) -> list:
    """A generic manifest: TSV with a header or JSONL, one utterance per row/line with an audio
    path (relative to the manifest's folder or absolute), text, and optional duration, speaker,
    split and id. Rows of other splits are left out when `split` is given."""
    path = Path(path)
    report = report if report is not None else DataReport()
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: no such file")
    rows = _read_jsonl(path, report) if path.suffix in (".jsonl", ".json") else _read_tsv(path)
    if not rows:
        raise ValueError(f"manifest {path}: no rows")
    keys = set().union(*(r.keys() for r in rows[:10]))
    pkey = next((k for k in _PATH_KEYS if k in keys), None)
    tkey = next((k for k in _TEXT_KEYS if k in keys), None)
    if pkey is None or tkey is None:
        raise ValueError(f"manifest {path}: needs an audio column ({'/'.join(_PATH_KEYS)}) and a text column "
                         f"({'/'.join(_TEXT_KEYS)}); found {sorted(keys)}")
    utts = []
    for i, r in enumerate(rows):
        if split is not None and "split" in r and r["split"] != split:
            continue
        if not r.get(pkey) or r.get(tkey) is None:
            report.skip("unreadable row", f"{path.name} row {i + 2}")
            continue
        dur = r.get("duration")
        try:
            dur = float(dur) if dur not in (None, "") else None
        except ValueError:
            report.skip("unreadable row", f"{path.name} row {i + 2} (duration {dur!r})")
            continue
        audio = Path(r[pkey]) if Path(r[pkey]).is_absolute() else path.parent / r[pkey]
        utt = _make_utterance(audio, str(r[tkey]), dur, str(r.get("speaker", "")), report, r.get("id") or r[pkey])
        if utt:
            utts.append(utt)
    return utts


def read_references(path) -> Tuple[List[Tuple[str, str]], str]:
    """(audio path as written, transcript) pairs and the format's name, for scoring:

    - "common_voice": a TSV whose header names `path` and `sentence` (other columns ignored);
    - "manifest": a TSV or JSONL with the columns `read_manifest` accepts (path/audio..., text/...);
    - "tsv": no such header, every line `path<TAB>text`.
    The same readers as training (quoting disabled: Common Voice sentences contain '"'). Relative
    paths are returned as written; the caller resolves them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference file not found")
    if path.suffix in (".jsonl", ".json"):
        rows, kind = _read_jsonl(path, DataReport()), "manifest"
    else:
        with open(path, newline="", encoding="utf-8") as f:
            first = next(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), None)
        if first is None:
            raise ValueError(f"{path}: reference file is empty")
        header = {c.strip().lower() for c in first}
        if not (header & set(_PATH_KEYS) and header & set(_TEXT_KEYS)):
            return _headerless_pairs(path), "tsv"
        rows = [{k.strip().lower(): v for k, v in r.items() if k is not None} for r in _read_tsv(path)]
        kind = "common_voice" if "sentence" in header and "text" not in header else "manifest"
    keys = set().union(*(r.keys() for r in rows)) if rows else set()
    pkey = next(k for k in _PATH_KEYS if k in keys) if keys & set(_PATH_KEYS) else None
    tkey = next(k for k in _TEXT_KEYS if k in keys) if keys & set(_TEXT_KEYS) else None
    if pkey is None or tkey is None:
        raise ValueError(f"{path}: needs an audio column ({'/'.join(_PATH_KEYS)}) and a text column "
                         f"({'/'.join(_TEXT_KEYS)}); found {sorted(keys)}")
    pairs = []
    for lineno, r in enumerate(rows, start=2):
        if r.get(pkey) is None or r.get(tkey) is None:
            raise ValueError(f"{path}:{lineno}: expected a path and a transcript column ({kind} format), got {r!r}")
        pairs.append((str(r[pkey]).strip(), str(r[tkey]).strip()))
    return pairs, kind


def _headerless_pairs(path: Path) -> list:
    pairs = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or not "".join(row).strip():
                continue  # blank line
            if len(row) < 2:
                raise ValueError(f"{path}:{lineno}: expected a path and a transcript column (tsv format), "
                                 f"got {len(row)} field(s): {row!r}")
            pairs.append((row[0].strip(), row[1].strip()))
    return pairs


def _read_jsonl(path: Path, report: DataReport) -> list:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            report.skip("unreadable row", f"{path.name} line {i + 1} ({e.msg})")
    return rows


def load_split(source, split: str, language: str = "mn", report: Optional[DataReport] = None) -> list:
    """`source` is a Common Voice folder (corpus root or language folder) or a manifest file."""
    if Path(source).is_file():
        return read_manifest(source, split, report)
    return read_common_voice(source, split, language, report)


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
FEATURE_VERSION = 1  # bump when the front end's computation changes


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
        mel = A.log_mel_spectrogram(speed_perturb(A.load_audio(path), speed), self.n_mels)
        file.parent.mkdir(exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, mel.numpy().astype(np.float16))
        os.replace(tmp, file)
        return mel


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
            wav = speed_perturb(A.load_audio(u.audio), speed)
            if use_noise:
                wav = add_noise(wav, self.noise.sample(rng), float(rng.uniform(*aug.snr_range)), rng)
            mel = A.log_mel_spectrogram(wav, self.n_mels)
        return spec_augment(mel, aug, rng) if aug.spec_augment else mel

    def __getitem__(self, i: int) -> Optional[dict]:
        u = self.utts[i]
        # one generator per (seed, epoch, item): identical augmentation whatever the worker layout
        rng = np.random.default_rng([self.seed, self.epoch, i])
        try:
            mel = self._features(u, rng)
        except A.AudioError as e:
            return {"error": str(e), "id": u.id}
        if mel.shape[-1] > A.N_FRAMES:  # speed 0.9 can push a 29 s clip past 30 s
            mel = mel[:, : A.N_FRAMES]
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


def summarise_source(source, language: str = "mn") -> str:
    """Clips and hours of every split of a Common Voice folder or manifest, plus what was skipped."""
    report = DataReport()
    if Path(source).is_file():
        rows = _read_jsonl(Path(source), report) if Path(source).suffix in (".jsonl", ".json") else _read_tsv(Path(source))
        names = sorted({r.get("split") for r in rows if r.get("split")}) or [None]
    else:
        names = list(CV_SPLITS)
    splits = {str(n or "all"): load_split(source, n, language, report) if n else read_manifest(source, None, report)
              for n in names}
    return f"{source}\n{describe_splits(splits)}\n{report.summary()}"


@dataclass(frozen=True)
class SummaryOptions:
    """Print the clips and hours of each split of a data source."""
    source: str = option(help="Common Voice folder (corpus root or language folder) or manifest", positional=True)
    language: str = option("mn", "Common Voice language folder")


def main(argv=None) -> None:
    opts = parse_options(SummaryOptions, argv, prog="python -m whisper_scratch.data")
    try:
        print(summarise_source(opts.source, opts.language))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()


__all__ = [
    "Utterance", "DataReport", "find_cv_language_dir", "read_common_voice", "read_manifest", "load_split",
    "filter_for_model", "DurationBucketSampler", "FeatureCache", "AsrDataset", "collate", "Collator",
    "make_loader", "describe_splits", "hours", "summarise_source",
]
