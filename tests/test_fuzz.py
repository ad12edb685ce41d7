"""Fuzzed readers (hypothesis, bounded so the suite stays fast): the TSV/JSONL manifest readers, the
Common Voice reader, the reference reader and load_audio, on arbitrary bytes and on odd but valid
input. Each either reads, counts what it skips, or raises a clear error that names the file;
never an exception from inside csv, json, soundfile or torch. Tokenizers: decode(encode(text)) is
the normalised text for any text in the alphabet; unknown characters are counted, never dropped.

EXAMPLES examples per test (60 for the odd WAVs), derandomized like the other property tests: the
same examples every run, so CI is never flaky; 1,500 random examples per test (2,000 odd WAVs)
passed when this was written. The README's Reliability section quotes these numbers."""
import contextlib
import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from whisper_scratch import audio as A
from whisper_scratch.data import DataReport, read_common_voice, read_manifest, read_references
from whisper_scratch.tables import read_tsv
from whisper_scratch.tokenizer import UNK_TEXT, CharTokenizer, TextNormalizer, build_tokenizer
from conftest import DATA

EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- inputs -----------------------------------------------------------------------------------
COLUMNS = ["path", "audio", "text", "sentence", "duration", "speaker", "split", "client_id", "id", "extra", ""]
FIELD_CHARS = st.sampled_from(list('ab "\'\t\r\n\\,;{}[]:\x00\ufeff\u2028é') + ["clip.wav", "nan", "-1", "1e400"])
FIELD = st.lists(FIELD_CHARS, max_size=6).map("".join)


@st.composite
def table_bytes(draw):
    """A TSV as users make them: a header of known and unknown columns, rows with too few or too
    many fields, quotes, a BOM, CRLF, and now and then an encoding that is not UTF-8."""
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=6))
    rows = draw(st.lists(st.lists(FIELD, max_size=8), max_size=6))
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    text = end.join("\t".join(r) for r in [header] + rows) + draw(st.sampled_from(["", end]))
    text = draw(st.sampled_from(["", "\ufeff"])) + text
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-16", "latin-1", "cp1251"]))
    return text.encode(encoding, errors="replace")


@st.composite
def jsonl_bytes(draw):
    value = st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | FIELD,
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(FIELD, inner, max_size=3),
                         max_leaves=6)
    obj = st.dictionaries(st.sampled_from(COLUMNS), value, max_size=5)
    lines = draw(st.lists(obj.map(json.dumps) | FIELD | st.just("[" * 3000), max_size=6))
    return "\n".join(lines).encode(draw(st.sampled_from(["utf-8", "utf-8", "utf-16"])), errors="replace")


ANY_BYTES = st.binary(max_size=400)
WAV = DATA / "fsdd" / "recordings" / "0_george_5.wav"


@contextlib.contextmanager
def in_folder(data: bytes, name: str, subfolder: str = ""):
    """`data` written as `name` to a fresh folder that holds a real clip (SUBFOLDER/clip.wav), so
    some rows resolve; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fuzz") as folder:
        (Path(folder) / subfolder).mkdir(exist_ok=True)
        shutil.copy(WAV, Path(folder) / subfolder / "clip.wav")
        (Path(folder) / name).write_bytes(data)
        yield Path(folder) / name


def clear(e: Exception, path: Path) -> bool:
    return isinstance(e, (ValueError, FileNotFoundError)) and str(path.name) in str(e)


def check_manifest(path: Path) -> None:
    report = DataReport()
    try:
        utts = read_manifest(path, report=report)
    except Exception as e:  # noqa: BLE001 - the point: which exceptions escape
        assert clear(e, path), f"{type(e).__name__}: {e}"
        return
    for u in utts:
        assert Path(u.audio).is_file() and math.isfinite(u.duration) and u.duration > 0
    if path.suffix == ".tsv":  # every data row is an utterance or a counted skip
        assert len(utts) + report.num_skipped == len(read_tsv(path)[1])


# -- readers ----------------------------------------------------------------------------------
@FUZZ
@given(st.one_of(ANY_BYTES, table_bytes()))
def test_tsv_manifest_reader(data):
    with in_folder(data, "m.tsv") as path:
        check_manifest(path)


@FUZZ
@given(st.one_of(ANY_BYTES, jsonl_bytes()))
def test_jsonl_manifest_reader(data):
    with in_folder(data, "m.jsonl") as path:
        check_manifest(path)


@FUZZ
@given(st.one_of(ANY_BYTES, table_bytes(), jsonl_bytes()), st.sampled_from(["refs.tsv", "refs.jsonl"]))
def test_reference_reader(data, name):
    with in_folder(data, name) as path:
        check_references(path)


def check_references(path: Path) -> None:
    try:
        pairs, kind = read_references(path)
    except Exception as e:  # noqa: BLE001
        assert clear(e, path), f"{type(e).__name__}: {e}"
        return
    assert kind in ("tsv", "manifest", "common_voice")
    assert all(isinstance(p, str) and isinstance(t, str) for p, t in pairs)


@FUZZ
@given(st.one_of(ANY_BYTES, table_bytes()), st.sampled_from(["validated.tsv", "train.tsv"]))
def test_common_voice_reader(data, name):
    """validated.tsv alone (the carving path) or train.tsv, fuzzed; clips/clip.wav exists."""
    with in_folder(data, name, "clips") as path:
        try:
            utts = read_common_voice(path.parent, "train", report=DataReport())
        except Exception as e:  # noqa: BLE001
            assert clear(e, path) or (isinstance(e, ValueError) and "carving" in str(e)), f"{type(e).__name__}: {e}"
            return
        assert all(Path(u.audio).is_file() for u in utts)


# -- audio ------------------------------------------------------------------------------------
HEADERS = [b"", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS", b"ID3\x03\x00", b"\xff\xfb\x90\x00"]


@FUZZ
@given(st.sampled_from(HEADERS), ANY_BYTES, st.sampled_from([".wav", ".mp3", ".flac", ".ogg", ".opus"]))
def test_load_audio_on_arbitrary_bytes(header, body, suffix):
    with in_folder(header + body, "x" + suffix) as path:
        try:
            audio = A.load_audio(path)
        except A.AudioError as e:
            assert str(path) in str(e)
            return
    assert audio.dtype == np.float32 and audio.ndim == 1 and audio.size > 0 and np.isfinite(audio).all()


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(sr=st.sampled_from([8000, 11025, 16000, 44100, 96000, 192000]), channels=st.integers(1, 8),
       frames=st.integers(1, 4000), subtype=st.sampled_from(["PCM_16", "PCM_U8", "FLOAT", "ULAW", "ALAW", "PCM_32"]),
       scale=st.sampled_from([0.5, 1.0, 4.0]))
def test_load_audio_on_odd_but_valid_wavs(sr, channels, frames, subtype, scale):
    """Any rate up to 192 kHz, 1 to 8 channels, a single sample, μ-law/A-law, float beyond ±1:
    mono 16 kHz float32 of the right length, or AudioError when nothing is left at 16 kHz."""
    x = scale * np.sin(np.arange(frames)[:, None] * 0.05 + np.arange(channels)[None, :]).astype(np.float32)
    expected = frames * A.SAMPLE_RATE / sr
    with tempfile.TemporaryDirectory() as folder:
        sf.write(Path(folder) / "odd.wav", x, sr, subtype=subtype)
        try:
            audio = A.load_audio(Path(folder) / "odd.wav")
        except A.AudioError as e:
            assert expected < 1 and "too short" in str(e), (expected, e)
            return
    assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()
    assert abs(len(audio) - expected) <= 1
    if subtype == "FLOAT" and sr == A.SAMPLE_RATE:  # nothing to resample: the channels' mean, unclipped
        assert np.allclose(audio, x.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_an_audio_error(tmp_path, bad):
    x = np.zeros(1600, np.float32)
    x[7] = bad
    sf.write(tmp_path / "bad.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(A.AudioError, match="bad.wav: decoded samples contain NaN or inf"):
        A.load_audio(tmp_path / "bad.wav")


def test_a_wav_header_that_lies_about_its_length(tmp_path):
    sf.write(tmp_path / "x.wav", np.zeros(16000, np.float32), 16000)
    data = bytearray((tmp_path / "x.wav").read_bytes())
    data[40:44] = struct.pack("<I", 10 ** 9)  # data chunk size far beyond the file
    (tmp_path / "lies.wav").write_bytes(bytes(data[:1000]))
    with pytest.warns(A.AudioWarning, match=r"lies\.wav: truncated: the header promises 31250\.00 s of audio"):
        audio = A.load_audio(tmp_path / "lies.wav")  # what is there, and the file named
    assert audio.ndim == 1 and np.isfinite(audio).all()


# -- tokenizers -------------------------------------------------------------------------------
MN = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяөү"
PUNCT = " .,?!\"«»-':"


@pytest.fixture(scope="module")
def bpe(mn_sentences):
    return build_tokenizer("bpe", mn_sentences[:1500], bpe_vocab_size=200)


@FUZZ
@given(st.text(alphabet=MN + MN.upper() + PUNCT + "\t\n", max_size=80), st.sampled_from(["strip", "keep"]))
def test_char_round_trip_for_any_text_in_the_alphabet(text, punctuation):
    tok = CharTokenizer(MN + ("" if punctuation == "strip" else PUNCT), TextNormalizer(punctuation=punctuation))
    ids = tok.encode(text)
    assert tok.unk not in ids and tok.decode(ids) == tok.normalize(text)


@FUZZ
@given(st.text(alphabet=MN + MN.upper() + PUNCT, max_size=80))
def test_bpe_round_trip_for_any_text_in_the_alphabet(bpe, text):
    assume_known = all(c in bpe.alphabet_set for c in bpe.normalize(text))
    ids = bpe.encode(text)
    assert (bpe.unk not in ids) == assume_known
    if assume_known:
        assert bpe.decode(ids) == bpe.normalize(text)


@FUZZ
@given(st.text(max_size=60))
def test_unknown_characters_are_counted_never_dropped(bpe, text):
    for tok in (CharTokenizer(MN), bpe):
        norm, oov = tok.normalize(text), tok.find_oov(text)
        assert sum(oov.values()) == sum(1 for c in norm if c not in tok.alphabet_set)
        decoded = tok.decode(tok.encode(text))
        if isinstance(tok, CharTokenizer):  # one <|unk|> per unknown character, in its place
            assert decoded == "".join(c if c in tok.alphabet_set else UNK_TEXT for c in norm)
        else:  # U+2581 is sentencepiece's own word boundary: counted by find_oov, read as a space
            assert (UNK_TEXT in decoded) == bool(set(oov) - {"\u2581"})
            assert decoded.replace(UNK_TEXT, "").split() == "".join(
                " " if c not in tok.alphabet_set else c for c in norm).split()
