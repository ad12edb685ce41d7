"""Synthetic Mongolian speech in the Common Voice layout, spoken by espeak-ng.

Real Mongolian speech cannot be downloaded here, so this builds a stand-in corpus that every
Common Voice reader in the project can load unchanged:

    DIR/mn/clips/synth_mn_000000.mp3 ...   48 kHz mono MP3
    DIR/mn/{train,dev,test,validated}.tsv  CV columns, tab-separated, no quoting
    DIR/mn/clip_durations.tsv              clip, duration[ms]
    DIR/mn/synth_params.json               what was built (makes reruns a no-op)

espeak-ng has no Mongolian voice; `ky` (Kyrgyz) reads Mongolian Cyrillic best. Its input is
cleaned by `tts_normalise`, but the transcript stays the original sentence.

    python -m whisper_scratch.synth --out-dir data/synth_cv --num-sentences 300 --jobs 2

Only stdlib, numpy, soundfile, soxr and tqdm are imported: this module is a leaf.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Collection, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from .config import option, output_problem, parse_options
from .tables import TableError, read_text

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SENTENCES = REPO.parent / "shared" / "data" / "mn_text" / "sentences.txt"

PathLike = Union[str, "os.PathLike[str]"]
LOCALE = "mn"
SAMPLE_RATE = 48_000  # Common Voice clips are 48 kHz mono MP3
PEAK = 0.89  # -1 dBFS: MP3 encoding overshoots the input peak by a few percent
ESPEAK_TIMEOUT_S = 60
FORMAT_VERSION = 1  # bump when the audio or TSV contents change for the same parameters
SPLITS = ("train", "dev", "test")
CV_COLUMNS = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
              "down_votes", "age", "gender", "accents", "variant", "locale", "segment")


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: an espeak-ng variant of `ky` with its own speed and pitch."""
    variant: str  # espeak-ng variant file name: m1..m7, f1..f5
    speed: int  # words per minute (espeak -s)
    pitch: int  # 0..99 (espeak -p)
    gender: str  # Common Voice gender value

    @property
    def name(self) -> str:
        return f"ky+{self.variant}"

    @property
    def client_id(self) -> str:
        # CV client ids are opaque hex hashes; hashing the voice keeps them stable across runs.
        return hashlib.sha256(f"whisper_scratch/synth/{self.name}".encode()).hexdigest()


# Speeds and pitches are spread so no two speakers sound alike even where variants are close
# (m1/m3/m7 differ by only ~15 Hz median F0 at the same pitch setting).
VOICES: Tuple[Voice, ...] = (
    Voice("m1", 150, 45, "male_masculine"),
    Voice("m2", 165, 30, "male_masculine"),
    Voice("m3", 135, 55, "male_masculine"),
    Voice("m4", 175, 40, "male_masculine"),
    Voice("m5", 145, 35, "male_masculine"),
    Voice("m6", 185, 50, "male_masculine"),
    Voice("m7", 130, 60, "male_masculine"),
    Voice("f1", 155, 55, "female_feminine"),
    Voice("f2", 140, 70, "female_feminine"),
    Voice("f3", 150, 60, "female_feminine"),
    Voice("f4", 180, 45, "female_feminine"),
    Voice("f5", 160, 65, "female_feminine"),
)


class SynthError(RuntimeError):
    """A problem the user can fix (missing tool, bad input); `main` prints it, no traceback."""


class EspeakNotFoundError(SynthError):
    pass


# ---------------------------------------------------------------------------------------------
# TTS input normalisation
# ---------------------------------------------------------------------------------------------

LETTER_NAMES: Dict[str, str] = {
    "А": "а", "Б": "бэ", "В": "вэ", "Г": "гэ", "Д": "дэ", "Е": "е", "Ё": "ё", "Ж": "жэ",
    "З": "зэ", "И": "и", "Й": "хагас и", "К": "ка", "Л": "эл", "М": "эм", "Н": "эн", "О": "о",
    "Ө": "ө", "П": "пэ", "Р": "эр", "С": "эс", "Т": "тэ", "У": "у", "Ү": "ү", "Ф": "фэ",
    "Х": "хэ", "Ц": "цэ", "Ч": "чэ", "Ш": "ша", "Щ": "щэ", "Ъ": "хатуугийн тэмдэг", "Ы": "ы",
    "Ь": "зөөлний тэмдэг", "Э": "э", "Ю": "ю", "Я": "я",
}
# Read letter by letter in Mongolian. ХХ is the Roman numeral for "20th" (century) written with
# Cyrillic Х; spelling it keeps audio and transcript consistent without guessing the number.
ABBREVIATIONS = frozenset({
    "ХХ", "ТНТ", "ЮНЕСКО", "АНУ", "ОХУ", "НҮБ", "УИХ", "МАН", "АН", "ЕБС", "ТББ",
    "МУИС", "ШУТИС", "ШУА", "ЗГ", "ЦЕГ", "МҮОНРТ", "ХБНГУ", "БНХАУ", "ЕХ",
})
VOWELS = frozenset("АЕЁИОӨУҮЫЭЮЯ")
UPPER = "А-ЯЁӨҮ"
LOWER = "а-яёөү"

_QUOTES = re.compile(r"[\"'«»“”„‟‘’‚‛`´]")
# A hyphen that glues a case suffix to a quoted name or an abbreviation: "Хүн"-тэй, ЮНЕСКО-д,
# "гавьяат"- ын. It is deleted so the suffix is read as part of the word, not as a lone letter
# (ky spells a lone г in English).
_SUFFIX_HYPHEN = re.compile(rf"(?<=[\"'«»“”’{UPPER}])-\s*(?=[{LOWER}])")
_JOIN = "\u2060"  # marks a joined suffix while words are rewritten; not a word character
_DASHES = re.compile(r"[-‐‑‒–—―]")
# An initial: one capital and a full stop before a capitalised name ("Т.Дашцэдэн", "Б. Бат").
_INITIAL = re.compile(rf"(?<!\w)([{UPPER}])\.\s*(?=[{UPPER}])")
_PARTICLE_L = re.compile(r"(?<!\w)[лЛ](?!\w)")
_LONE_CAPITAL = re.compile(rf"(?<!\w)([{UPPER}])(?!\w)")
_ALL_CAPS = re.compile(rf"(?<!\w)[{UPPER}]{{2,}}(?!\w)")
_WORD = re.compile(rf"[{LOWER}]+")


def spell(word: str) -> str:
    """Mongolian letter names for each letter: "ТНТ" -> "тэ эн тэ"."""
    return " ".join(LETTER_NAMES.get(ch.upper(), ch.lower()) for ch in word)


def known_words(sentences: Iterable[str]) -> frozenset:
    """Words the corpus writes in lower case: an all-caps word found here is emphasis, not an
    abbreviation."""
    return frozenset(w for s in sentences for w in _WORD.findall(s))


def _caps_word(word: str, words: Collection[str]) -> str:
    # The rule for a whole word of >= 2 capitals, first match wins:
    #   1. a listed abbreviation (ХХ, ТНТ, ЮНЕСКО, АНУ, ...)  -> spelled
    #   2. the corpus writes it in lower case (МАШ, БАГА, ЦЭВЭР) -> lower-cased (emphasis)
    #   3. no vowel letter (ХХ, ТНТ, НТВ): unpronounceable     -> spelled
    #   4. at most 4 letters: likely an unlisted abbreviation  -> spelled
    #   5. otherwise a long word in capitals (УНШИХГҮЙ)       -> lower-cased
    # ky reads lower-cased words natively but spells capitals it cannot parse in English.
    if word in ABBREVIATIONS:
        return spell(word)
    lower = word.lower()
    if lower in words:
        return lower
    if not VOWELS.intersection(word) or len(word) <= 4:
        return spell(word)
    return lower


def tts_normalise(text: str, words: Collection[str] = frozenset()) -> str:
    """The text espeak-ng `ky` is given for `text`; the transcript stays `text` itself.

    `ky` reads `"` aloud, spells the particle л and capital letters in English (its -x output
    switches to `(en)`), and takes a leading "- " as an option. So: suffix hyphens are joined,
    other dashes and all quotes removed, the particle л becomes лэ, initials and abbreviations
    become Mongolian letter names, and capitals used for emphasis are lower-cased. `words` is
    the lower-case vocabulary (`known_words`) that tells emphasis from abbreviations.
    """
    text = _SUFFIX_HYPHEN.sub(_JOIN, text)  # ЮНЕСКО-д: spell ЮНЕСКО, then glue д back on
    text = _DASHES.sub(" ", text)
    text = _QUOTES.sub("", text)
    text = _INITIAL.sub(lambda m: LETTER_NAMES[m.group(1)] + " ", text)
    text = _PARTICLE_L.sub("лэ", text)  # before lone capitals: a capital Л here is the particle
    text = _LONE_CAPITAL.sub(lambda m: LETTER_NAMES[m.group(1)], text)
    text = _ALL_CAPS.sub(lambda m: _caps_word(m.group(0), words), text)
    return " ".join(text.replace(_JOIN, "").split())


# ---------------------------------------------------------------------------------------------
# Synthesis of one clip (runs in worker processes)
# ---------------------------------------------------------------------------------------------

def espeak_path() -> str:
    """The espeak-ng binary, or a SynthError that says how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakNotFoundError("espeak-ng not found; install it with: apt-get install espeak-ng")
    return path


def espeak_wav(text: str, voice: Voice, binary: str = "espeak-ng") -> Tuple[np.ndarray, int]:
    """Speak `text` with `voice`: (float32 samples, sample rate). Raises SynthError on failure."""
    # Text goes on stdin: a sentence starting with "- " would be parsed as an option otherwise.
    cmd = [binary, "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout"]
    try:
        proc = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True,
                              timeout=ESPEAK_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SynthError(f"espeak-ng failed: {e}") from None
    if proc.returncode != 0 or not proc.stdout:
        err = proc.stderr.decode("utf-8", "replace").strip()
        raise SynthError(f"espeak-ng exited with {proc.returncode}: {err or 'no audio'}")
    try:
        y, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    except (RuntimeError, sf.LibsndfileError) as e:
        raise SynthError(f"espeak-ng output is not audio: {e}") from None
    if y.ndim != 1 or len(y) == 0 or not np.abs(y).max() > 0:
        raise SynthError("espeak-ng produced silence")
    return y, sr


def to_clip(y: np.ndarray, sr: int, out_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample to out_sr (default 48 kHz) and set the peak to PEAK (espeak's level varies by voice)."""
    y = soxr.resample(y, sr, out_sr)
    return (y * (PEAK / np.abs(y).max())).astype(np.float32)


def write_mp3(path: Path, y: np.ndarray) -> int:
    """Write a 48 kHz mono MP3 atomically; returns the frame count the file decodes to."""
    tmp = path.with_name(path.name + ".part")
    sf.write(tmp, y, SAMPLE_RATE, format="MP3", subtype="MPEG_LAYER_III")
    # The duration comes from the file as written, so clip_durations.tsv matches decoding.
    frames = sf.info(str(tmp)).frames
    os.replace(tmp, path)
    return frames


def _synth_job(job: Tuple[int, str, int, str, str]) -> Tuple[int, Optional[int], str]:
    """Worker: (clip index, tts text, voice index, out path, binary) -> (index, frames, error)."""
    index, text, voice_index, path, binary = job
    try:
        y, sr = espeak_wav(text, VOICES[voice_index], binary)
        return index, write_mp3(Path(path), to_clip(y, sr)), ""
    except (SynthError, RuntimeError, OSError) as e:
        return index, None, str(e)


# ---------------------------------------------------------------------------------------------
# Corpus plan: which sentences, voices and splits (all deterministic from the seed)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clip:
    path: str  # file name inside clips/
    sentence: str  # original text: the transcript
    tts_text: str  # what espeak-ng is given
    voice: int  # index into VOICES
    split: str


def read_sentences(path: Path) -> List[str]:
    """Non-empty lines of a UTF-8 file; a missing file is an error naming its path."""
    if path.is_dir():
        raise SynthError(f"--sentences {path}: is a folder; give a text file, one sentence per line")
    if not path.is_file():
        raise FileNotFoundError(f"sentences file not found: {path}")
    try:
        lines = [s.strip() for s in read_text(path).splitlines()]
    except TableError as e:  # names the line and the byte
        raise SynthError(str(e)) from None
    bad = [s for s in lines if "\t" in s]
    if bad:  # a tab would break the no-quoting TSV layout
        raise SynthError(f"{path}: {len(bad)} sentences contain a tab, e.g. {bad[0]!r}")
    sentences = [s for s in lines if s]
    if not sentences:
        raise SynthError(f"no sentences in {path}")
    return sentences


def plan_corpus(sentences: Sequence[str], num_sentences: Optional[int], seed: int,
                voices_per_sentence: int, dev_fraction: float, test_fraction: float,
                words: Collection[str] = frozenset()) -> List[Clip]:
    """Choose sentences, voices and splits. Splits are disjoint by sentence: every voice of a
    sentence lands in the same split, so no test sentence is heard in training."""
    rng = random.Random(seed)
    order = list(range(len(sentences)))
    rng.shuffle(order)
    # A random subset, kept in file order: the file is sorted, its first lines all start with ".
    chosen = sorted(order[:num_sentences] if num_sentences is not None else order)
    voices = [rng.sample(range(len(VOICES)), voices_per_sentence) for _ in chosen]
    split_of = _assign_splits(len(chosen), rng, dev_fraction, test_fraction)
    clips = []
    for k, (i, vs) in enumerate(zip(chosen, voices)):
        tts = tts_normalise(sentences[i], words)
        for v in vs:
            clips.append(Clip(f"synth_{LOCALE}_{len(clips):06d}.mp3", sentences[i], tts, v,
                              split_of[k]))
    return clips


def _assign_splits(n: int, rng: random.Random, dev_fraction: float,
                   test_fraction: float) -> List[str]:
    n_dev, n_test = round(n * dev_fraction), round(n * test_fraction)
    order = list(range(n))
    rng.shuffle(order)
    split = ["train"] * n
    for rank, k in enumerate(order):
        if rank < n_dev:
            split[k] = "dev"
        elif rank < n_dev + n_test:
            split[k] = "test"
    return split


# ---------------------------------------------------------------------------------------------
# Writing the corpus
# ---------------------------------------------------------------------------------------------

def _cv_row(clip: Clip) -> str:
    voice = VOICES[clip.voice]
    sentence_id = hashlib.sha256(clip.sentence.encode("utf-8")).hexdigest()
    fields = {"client_id": voice.client_id, "path": clip.path, "sentence_id": sentence_id,
              "sentence": clip.sentence, "up_votes": "2", "down_votes": "0",
              "gender": voice.gender, "accents": "", "locale": LOCALE}
    # Plain joins, no csv quoting: CV files are read with quoting disabled; sentences hold ".
    return "\t".join(fields.get(c, "") for c in CV_COLUMNS)


def write_tsv(path: Path, header: Sequence[str], rows: Iterable[str]) -> None:
    """Write a header line and rows, UTF-8, LF line ends, atomically."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("".join(line + "\n" for line in ["\t".join(header), *rows]), encoding="utf-8")
    os.replace(tmp, path)


def _write_tables(root: Path, clips: Sequence[Clip], frames: Dict[str, int]) -> None:
    for split in SPLITS:
        rows = (_cv_row(c) for c in clips if c.split == split)
        write_tsv(root / f"{split}.tsv", CV_COLUMNS, rows)
    write_tsv(root / "validated.tsv", CV_COLUMNS, (_cv_row(c) for c in clips))
    write_tsv(root / "clip_durations.tsv", ("clip", "duration[ms]"),
              (f"{c.path}\t{round(frames[c.path] * 1000 / SAMPLE_RATE)}" for c in clips))


def _synthesise(clips: Sequence[Clip], clip_dir: Path, jobs: int,
                binary: str) -> Tuple[Dict[str, int], List[dict]]:
    """Run espeak-ng over all clips in `jobs` processes: ({path: frames}, failures)."""
    work = [(i, c.tts_text, c.voice, str(clip_dir / c.path), binary) for i, c in enumerate(clips)]
    frames: Dict[str, int] = {}
    failed: List[dict] = []
    with Pool(max(1, min(jobs, len(work)))) as pool:
        results = pool.imap_unordered(_synth_job, work, chunksize=4)
        for i, n, err in tqdm(results, total=len(work), desc="synth", unit="clip",
                              file=sys.stderr):
            if n is None:
                # Logged now and listed in the summary: a failed sentence is never dropped silently.
                c, voice = clips[i], VOICES[clips[i].voice].name
                tqdm.write(f"synth: skipped {c.path} ({voice}): {err}: {c.sentence}",
                           file=sys.stderr)
                failed.append({"path": c.path, "voice": voice, "sentence": c.sentence, "error": err})
            else:
                frames[clips[i].path] = n
    return frames, sorted(failed, key=lambda f: f["path"])


def _remove_stale_clips(clip_dir: Path, keep: Collection[str]) -> None:
    # Only our own file names: a user's real clips in the same folder are never touched.
    for p in clip_dir.glob(f"synth_{LOCALE}_*.mp3*"):
        if p.name not in keep:
            p.unlink()


def _summary(root: Path, clips: Sequence[Clip], frames: Dict[str, int], failed: List[dict],
             seconds: float) -> dict:
    done = [c for c in clips if c.path in frames]
    summary = {"out_dir": str(root), "clips": {}, "hours": {}, "seconds": round(seconds, 2),
               "failed": failed}
    for split in (*SPLITS, "validated"):
        cs = [c for c in done if split in ("validated", c.split)]
        summary["clips"][split] = len(cs)
        summary["hours"][split] = round(sum(frames[c.path] for c in cs) / SAMPLE_RATE / 3600, 4)
    return summary


def summary_line(summary: dict) -> str:
    """One line: clips and hours per split, time taken and failures."""
    parts = [f"{s} {summary['clips'][s]} clips {summary['hours'][s]:.3f} h" for s in SPLITS]
    n, secs = summary["clips"]["validated"], summary["seconds"]
    rate = f" ({n / secs:.1f} clips/s)" if secs > 0 else ""
    failed = summary["failed"]
    tail = "; failed 0"
    if failed:
        tail = f"; FAILED {len(failed)}: " + ", ".join(f["path"] for f in failed)
    head = "already built: " if summary.get("skipped") else ""
    return head + " | ".join(parts) + f" | {n} clips in {secs:.1f} s{rate}{tail}"


# ---------------------------------------------------------------------------------------------
# English digits in many voices: more speakers for FSDD-sized corpora
# ---------------------------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EN_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
              "en-us-nyc")
# espeak-ng's human-sounding variants (not its robots, whispers or effects)
EN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
               "klatt3", "klatt4", "adam", "anika", "Andy", "Annie", "aunty", "belinda", "benjamin", "boris",
               "caleb", "david", "ed", "edward", "grandma", "grandpa", "iven", "iven2", "iven3", "john", "linda",
               "max", "michel", "norbert", "paul", "pedro", "quincy", "rob", "robert", "shelby", "steph",
               "travis", "victor", "zac", "Alex", "Alicia", "Andrea", "Denis", "Gene", "Hugo", "Jacky", "Lee",
               "Michael", "Mike")


class SpokenVoice(NamedTuple):
    """An espeak-ng voice (accent+variant) at a speed and pitch: what `espeak_wav` needs."""
    name: str
    speed: int
    pitch: int


def digit_voices(n: int, seed: int = 0) -> List[SpokenVoice]:
    """n distinct random voices: accent, variant, speed (110-200 wpm) and pitch (15-85)."""
    rng = random.Random(seed)
    voices: dict = {}
    while len(voices) < n:
        v = SpokenVoice(f"{rng.choice(EN_ACCENTS)}+{rng.choice(EN_VARIANTS)}", rng.randint(110, 200),
                        rng.randint(15, 85))
        voices.setdefault(v, None)
    return list(voices)


def _digit_job(job: Tuple[str, SpokenVoice, str, int, str]) -> Tuple[str, Optional[float], str]:
    """Worker: (word, voice, out path, sample rate, binary) -> (path, seconds, error)."""
    word, voice, path, sr, binary = job
    try:
        y = to_clip(*espeak_wav(word, voice, binary), sr)
        sf.write(path, y, sr, subtype="PCM_16")
        return path, len(y) / sr, ""
    except (SynthError, RuntimeError, OSError) as e:
        return path, None, str(e)


def build_digits(out_dir: PathLike, num_voices: int, seed: int = 0, sample_rate: int = 8000,
                 jobs: Optional[int] = None) -> Path:
    """The ten digit words of FSDD spoken by `num_voices` espeak-ng voices, as WAV at
    `sample_rate` (FSDD's 8 kHz: the same bandwidth as the real clips) and OUT_DIR/manifest.tsv
    (path, duration, text, speaker, split = train). Kept when already built with the same
    parameters. A clip espeak-ng fails on is logged and left out of the manifest. Returns the
    manifest's path."""
    if num_voices < 1:
        raise ValueError(f"num_voices must be >= 1, got {num_voices}")
    root = Path(out_dir)
    manifest, stamp = root / "manifest.tsv", root / "params.json"
    params = {"num_voices": num_voices, "seed": seed, "sample_rate": sample_rate, "version": 1}
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return manifest
    binary = espeak_path()
    (root / "clips").mkdir(parents=True, exist_ok=True)
    voices = digit_voices(num_voices, seed)
    work = [(word, v, str(root / "clips" / f"v{i:04d}_{word}.wav"), sample_rate, binary)
            for i, v in enumerate(voices) for word in DIGIT_WORDS]
    seconds, speaker = {}, {job[2]: f"espeak{i // len(DIGIT_WORDS):04d}" for i, job in enumerate(work)}
    with Pool(max(1, jobs or os.cpu_count() or 1)) as pool:
        for path, secs, err in pool.imap_unordered(_digit_job, work, chunksize=8):
            if secs is None:
                print(f"synth digits: skipped {path}: {err}", file=sys.stderr)
            else:
                seconds[path] = secs
    rows = [f"clips/{Path(p).name}\t{seconds[p]:.4f}\t{w}\t{speaker[p]}\ttrain"
            for w, _, p, _, _ in work if p in seconds]
    write_tsv(manifest, ("path", "duration", "text", "speaker", "split"), rows)
    stamp.write_text(json.dumps(params))
    print(f"synth digits: {len(rows)} clips of {num_voices} voices in {root} ({len(work) - len(rows)} failed)",
          file=sys.stderr)
    return manifest


def colored_noise(seconds: float, slope: float, rng: np.random.Generator, sample_rate: int = 16_000) -> np.ndarray:
    """Gaussian noise whose power falls as f ** slope (0 white, -1 pink, -2 brown; > 0 hiss),
    scaled to unit RMS."""
    n = int(seconds * sample_rate)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / sample_rate)
    spectrum *= np.maximum(f, 20.0) ** (slope / 2)  # amplitude ~ sqrt(power); below 20 Hz held flat
    y = np.fft.irfft(spectrum, n)
    return (y / (np.sqrt(np.mean(y ** 2)) + 1e-12)).astype(np.float32)


def build_noise(out_dir: PathLike, num_files: int = 24, seconds: float = 10.0, seed: int = 0) -> Path:
    """num_files noise recordings for `train.py --noise-dir`: colored noise with a spectral slope
    drawn from [-2, 1] (brown to hiss), half with mains hum (50 or 60 Hz and its harmonics). A
    corpus of a few speakers and microphones lets a model tell its speakers apart by their noise
    floor; mixing in noise of every colour takes that cue away. WAV at 16 kHz; kept when already
    built with the same parameters. Returns the folder."""
    root = Path(out_dir)
    stamp = root / "params.json"
    params = {"num_files": num_files, "seconds": seconds, "seed": seed, "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return root
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sr = 16_000
    t = np.arange(int(seconds * sr)) / sr
    for i in range(num_files):
        y = colored_noise(seconds, float(rng.uniform(-2, 1)), rng, sr)
        if i % 2:
            mains = float(rng.choice([50.0, 60.0]))
            y += sum(float(rng.uniform(0.1, 1.0)) / k * np.sin(2 * np.pi * mains * k * t) for k in range(1, 6))
        sf.write(root / f"noise_{i:03d}.wav", (0.1 * y / np.abs(y).max()).astype(np.float32), sr)
    stamp.write_text(json.dumps(params))
    return root


# ---------------------------------------------------------------------------------------------
# Options, API and CLI
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SynthOptions:
    """Build a synthetic Mongolian corpus in the Common Voice layout with espeak-ng."""
    out_dir: str = option(help="corpus root; files go to OUT_DIR/mn/")
    sentences_path: Optional[str] = option(None, f"UTF-8 sentences, one a line ({DEFAULT_SENTENCES})",
                                           aliases=("--sentences",))
    num_sentences: Optional[int] = option(None, "random subset of at most this many sentences (all if unset)")
    seed: int = option(0, "sentence, voice and split choice")
    jobs: Optional[int] = option(None, "worker processes (os.cpu_count() if unset)")
    dev_fraction: float = option(0.1, "share of sentences")
    test_fraction: float = option(0.1, "share of sentences")
    voices_per_sentence: int = option(1, "clips per sentence")
    force: bool = option(False, "rebuild even if up to date")

    def __post_init__(self) -> None:
        for name in ("dev_fraction", "test_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dev_fraction + self.test_fraction >= 1:
            raise ValueError(f"dev_fraction + test_fraction must be < 1, got "
                             f"{self.dev_fraction} + {self.test_fraction}")
        if self.num_sentences is not None and self.num_sentences < 1:
            raise ValueError(f"num_sentences must be >= 1, got {self.num_sentences}")
        if self.jobs is not None and self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        if not 1 <= self.voices_per_sentence <= len(VOICES):
            raise ValueError(f"voices_per_sentence must be in 1..{len(VOICES)}, "
                             f"got {self.voices_per_sentence}")


def _params(opts: SynthOptions, sentences_path: Path, n_sentences: int, text_sha: str) -> dict:
    """What determines the output: equal params mean an identical corpus (jobs does not)."""
    return {"format_version": FORMAT_VERSION, "sentences_path": str(sentences_path),
            "sentences_sha256": text_sha, "sentences_total": n_sentences,
            "num_sentences": opts.num_sentences, "seed": opts.seed,
            "dev_fraction": opts.dev_fraction, "test_fraction": opts.test_fraction,
            "voices_per_sentence": opts.voices_per_sentence,
            "voices": [dataclasses.asdict(v) for v in VOICES]}


def _up_to_date(root: Path, params: dict) -> Optional[dict]:
    """The stored summary if ROOT holds a complete corpus built with `params`."""
    stamp = root / "synth_params.json"
    if not ((root / "validated.tsv").is_file() and stamp.is_file()):
        return None
    try:
        stored = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored.get("summary") if stored.get("params") == params else None


def build_corpus(out_dir: PathLike, sentences_path: Optional[PathLike] = None,
                 num_sentences: Optional[int] = None, seed: int = 0,
                 jobs: Optional[int] = None, dev_fraction: float = 0.1, test_fraction: float = 0.1,
                 force: bool = False, voices_per_sentence: int = 1) -> dict:
    """Build OUT_DIR/mn/ (see the module docstring) and return the summary dict:
    {"out_dir", "clips": {split: n}, "hours": {split: h}, "seconds", "failed": [...],
    "skipped": bool}. A corpus already built with the same parameters is left as it is."""
    opts = SynthOptions(str(out_dir), None if sentences_path is None else str(sentences_path),
                        num_sentences, seed, jobs, dev_fraction, test_fraction,
                        voices_per_sentence, force)
    t0 = time.perf_counter()
    path = Path(opts.sentences_path or DEFAULT_SENTENCES).resolve()
    sentences = read_sentences(path)
    text_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    root = Path(opts.out_dir) / LOCALE
    problem = output_problem("--out-dir", root, "folder")
    if problem:
        raise SynthError(problem)
    params = _params(opts, path, len(sentences), text_sha)
    done = None if opts.force else _up_to_date(root, params)
    if done is not None:
        print(f"corpus already built at {root} (use --force to rebuild)", file=sys.stderr)
        return {**done, "skipped": True}
    binary = espeak_path()
    # The vocabulary comes from the whole file, so a sentence's TTS text (and audio) does not
    # depend on which other sentences were chosen.
    clips = plan_corpus(sentences, opts.num_sentences, opts.seed, opts.voices_per_sentence,
                        opts.dev_fraction, opts.test_fraction, known_words(sentences))
    clip_dir = root / "clips"
    clip_dir.mkdir(parents=True, exist_ok=True)
    (root / "synth_params.json").unlink(missing_ok=True)  # an interrupted rebuild is not complete
    frames, failed = _synthesise(clips, clip_dir, opts.jobs or os.cpu_count() or 1, binary)
    ok = [c for c in clips if c.path in frames]
    _write_tables(root, ok, frames)
    _remove_stale_clips(clip_dir, set(frames))
    summary = _summary(root, clips, frames, failed, time.perf_counter() - t0)
    stamp = {"params": params, "summary": summary}
    (root / "synth_params.json").write_text(json.dumps(stamp, ensure_ascii=False, indent=1),
                                            encoding="utf-8")
    return {**summary, "skipped": False}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """CLI entry point: parse flags, build, print the summary line. User errors exit with a
    one-line message instead of a traceback."""
    opts = parse_options(SynthOptions, argv, prog="python -m whisper_scratch.synth")
    try:
        summary = build_corpus(**dataclasses.asdict(opts))
    except (SynthError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(summary_line(summary))
    return summary


if __name__ == "__main__":
    main()
