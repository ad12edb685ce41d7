"""Synthetic Common Voice corpus: layout, TSV contents, audio, splits, determinism, normaliser."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from whisper_scratch import synth
from whisper_scratch.synth import CV_COLUMNS, build_corpus, known_words, tts_normalise

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng not installed (apt-get install espeak-ng)")

# Short sentences with the cases the normaliser exists for: quotes, a leading dash, the
# particle л, an abbreviation with a suffix, an initial and capitals for emphasis.
SENTENCES = [
    '"Аав чинь ямар хүн бэ" гэж асуув.',
    "- Надад захиа ирээгүй юу?",
    "Би амьдарч чадаж л байгаа ш дээ.",
    "Ойг ЮНЕСКО-д бүртгүүлжээ.",
    "Гавьяат багш Т.Дашцэдэн.",
    "Тэд МАШ БАГА хувийг эзэлдэг.",
    "ХХ зууны шилдэг дуу.",
    "Монгол хэлний ихэр хэмээх үг 'ики'-ээс гаралтай.",
    "Сэр-Од хүүдээ нэр хайрлажээ.",
    "Маш бага хүн ирсэн.",
    "Өглөө эрт бос.",
    "Үүл хөвж байна.",
]


def read_tsv(path: Path):
    """Header and rows of a no-quoting TSV, the way CV readers must read it."""
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "", f"{path} must end with a newline"
    header, *rows = [line.split("\t") for line in lines[:-1]]
    return header, [dict(zip(header, r, strict=True)) for r in rows]


@pytest.fixture(scope="module")
def sentences_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sentences.txt"
    path.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sentences_file):
    out = tmp_path_factory.mktemp("corpus_a")
    summary = build_corpus(out, sentences_file, seed=3, jobs=2, dev_fraction=0.2, test_fraction=0.2)
    return out / "mn", summary


@needs_espeak
def test_layout_and_headers(corpus):
    root, summary = corpus
    for name in ("train", "dev", "test", "validated"):
        header, rows = read_tsv(root / f"{name}.tsv")
        assert tuple(header) == CV_COLUMNS
        assert all(r["locale"] == "mn" for r in rows)
    header, _ = read_tsv(root / "clip_durations.tsv")
    assert header == ["clip", "duration[ms]"]
    assert summary["clips"] == {"train": 8, "dev": 2, "test": 2, "validated": 12}
    assert summary["failed"] == [] and not summary["skipped"]


@needs_espeak
def test_clips_decode_at_48k_with_listed_durations(corpus):
    root, _ = corpus
    _, rows = read_tsv(root / "validated.tsv")
    _, durations = read_tsv(root / "clip_durations.tsv")
    ms = {d["clip"]: int(d["duration[ms]"]) for d in durations}
    assert sorted(ms) == sorted(r["path"] for r in rows)
    for r in rows:
        y, sr = sf.read(root / "clips" / r["path"])
        assert sr == 48_000 and y.ndim == 1
        assert abs(len(y) / sr * 1000 - ms[r["path"]]) <= 1
        assert 0.5 < len(y) / sr < 15 and 0.5 < abs(y).max() <= 1.0  # speech, peak-normalised


@needs_espeak
def test_splits_disjoint_by_sentence_and_union_is_validated(corpus):
    root, _ = corpus
    rows = {s: read_tsv(root / f"{s}.tsv")[1] for s in ("train", "dev", "test", "validated")}
    texts = {s: {r["sentence"] for r in rs} for s, rs in rows.items()}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    union = rows["train"] + rows["dev"] + rows["test"]
    assert sorted(r["path"] for r in union) == sorted(r["path"] for r in rows["validated"])


@needs_espeak
def test_sentence_column_is_original_text_and_voice_fields(corpus):
    root, _ = corpus
    _, rows = read_tsv(root / "validated.tsv")
    assert sorted(r["sentence"] for r in rows) == sorted(SENTENCES)  # quotes and dashes kept
    by_id = {v.client_id: v for v in synth.VOICES}
    for r in rows:
        assert by_id[r["client_id"]].gender == r["gender"]
        assert r["gender"] in ("male_masculine", "female_feminine")


@needs_espeak
def test_same_seed_gives_identical_corpus_and_rerun_is_skipped(tmp_path, corpus, sentences_file):
    root_a, _ = corpus
    summary = build_corpus(tmp_path, sentences_file, seed=3, jobs=2, dev_fraction=0.2,
                           test_fraction=0.2)
    root_b = tmp_path / "mn"
    for name in ("train.tsv", "dev.tsv", "test.tsv", "validated.tsv", "clip_durations.tsv"):
        assert (root_a / name).read_bytes() == (root_b / name).read_bytes(), name
    _, rows = read_tsv(root_a / "validated.tsv")
    for r in rows[:3]:  # espeak-ng, soxr and the MP3 encoder are deterministic too
        a, _ = sf.read(root_a / "clips" / r["path"])
        b, _ = sf.read(root_b / "clips" / r["path"])
        assert (a == b).all()
    again = build_corpus(tmp_path, sentences_file, seed=3, jobs=2, dev_fraction=0.2,
                         test_fraction=0.2)
    assert again["skipped"] and again["clips"] == summary["clips"]


def test_tts_normalise():
    words = known_words(["маш бага хүн", "цэвэр ус"])
    assert tts_normalise('"Аав чинь" гэж «асуув»') == "Аав чинь гэж асуув"
    assert tts_normalise("- Надад захиа") == "Надад захиа"
    assert tts_normalise("чадаж л байгаа. Л гэж") == "чадаж лэ байгаа. лэ гэж"
    assert tts_normalise("ХХ зууны") == "хэ хэ зууны"
    assert tts_normalise("ойг ЮНЕСКО-д") == "ойг ю эн е эс ка од"
    assert tts_normalise("ТНТ сувгаар") == "тэ эн тэ сувгаар"
    assert tts_normalise("багш Т.Дашцэдэн, Б. Бат") == "багш тэ Дашцэдэн, бэ Бат"
    assert tts_normalise("тэд МАШ БАГА ЦЭВЭР", words) == "тэд маш бага цэвэр"
    assert tts_normalise("УНШИХГҮЙ БОЛ") == "уншихгүй бэ о эл"  # long -> lower, short -> spelled
    assert tts_normalise('"Хүн"-тэй, Сэр-Од') == "Хүнтэй, Сэр Од"


def test_missing_sentences_file_names_path(tmp_path):
    missing = tmp_path / "nope" / "sentences.txt"
    with pytest.raises(FileNotFoundError, match="nope/sentences.txt"):
        build_corpus(tmp_path / "out", missing)
    with pytest.raises(SystemExit, match="nope/sentences.txt"):
        synth.main(["--out-dir", str(tmp_path / "out"), "--sentences", str(missing)])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("сайн байна уу\n")
    for argv, message in [(["--sentences", str(tmp_path / "latin1.txt")], "latin1.txt:1: not UTF-8 text \\(byte 0xe9\\)"),
                          (["--sentences", str(tmp_path)], "is a folder; give a text file"),
                          (["--sentences", str(tmp_path / "ok.txt"), "--out-dir", str(tmp_path / "ok.txt" / "x")],
                           "ok.txt is a file, not a folder")]:
        argv = argv if "--out-dir" in argv else [*argv, "--out-dir", str(tmp_path / "out")]
        with pytest.raises(SystemExit, match=message):
            synth.main(argv)


def test_missing_espeak_is_a_clear_error(tmp_path, sentences_file, monkeypatch):
    monkeypatch.setattr(synth.shutil, "which", lambda name: None)
    with pytest.raises(synth.EspeakNotFoundError, match="apt-get install espeak-ng"):
        build_corpus(tmp_path, sentences_file, jobs=1)


def test_bad_options_rejected():
    with pytest.raises(ValueError, match="dev_fraction"):
        synth.SynthOptions("x", dev_fraction=0.6, test_fraction=0.5)


@needs_espeak
def test_failed_sentence_is_reported_not_dropped(tmp_path, monkeypatch, capsys):
    # A wrapper that fails on one sentence and runs the real espeak-ng otherwise.
    fake = tmp_path / "espeak-ng"
    fake.write_text('#!/bin/sh\ntext=$(cat)\ncase "$text" in *Үүл*) echo boom >&2; exit 3;; esac\n'
                    f'printf "%s" "$text" | exec {shutil.which("espeak-ng")} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setattr(synth.shutil, "which", lambda name: str(fake))
    text = tmp_path / "s.txt"
    text.write_text("Өглөө эрт бос.\nҮүл хөвж байна.\nМаш бага хүн ирсэн.\n", encoding="utf-8")
    summary = synth.main(["--out-dir", str(tmp_path / "out"), "--sentences", str(text),
                          "--jobs", "1", "--dev-fraction", "0", "--test-fraction", "0"])
    out, err = capsys.readouterr()
    assert [f["sentence"] for f in summary["failed"]] == ["Үүл хөвж байна."]
    assert "boom" in summary["failed"][0]["error"] and "Үүл хөвж байна." in err
    assert "FAILED 1" in out and summary["clips"]["validated"] == 2
    _, rows = read_tsv(tmp_path / "out" / "mn" / "validated.tsv")
    assert sorted(r["sentence"] for r in rows) == ["Маш бага хүн ирсэн.", "Өглөө эрт бос."]


@needs_espeak
def test_digits_in_many_voices(tmp_path):
    """synth.build_digits: every digit word in every voice, 8 kHz WAV files the manifest lists
    with their real durations, distinct voices, and a rebuild with the same parameters is a no-op."""
    from whisper_scratch.data import read_manifest
    manifest = synth.build_digits(tmp_path / "d", 3, seed=1, jobs=1)
    utts = read_manifest(manifest, "train")
    assert len(utts) == 30
    assert sorted({u.text for u in utts}) == sorted(synth.DIGIT_WORDS)
    assert len({u.speaker for u in utts}) == 3
    for u in utts[:5]:
        info = sf.info(u.audio)
        assert info.samplerate == 8000 and abs(info.frames / 8000 - u.duration) < 1e-3
    voices = synth.digit_voices(3, seed=1)
    assert len(set(voices)) == 3 and voices == synth.digit_voices(3, seed=1) != synth.digit_voices(3, seed=2)
    before = manifest.stat().st_mtime_ns
    assert synth.build_digits(tmp_path / "d", 3, seed=1, jobs=1) == manifest
    assert manifest.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="num_voices"):
        synth.build_digits(tmp_path / "e", 0)


def test_noise_recordings_have_the_colour_asked_for(tmp_path):
    """build_noise writes --noise-dir material: colored noise whose spectral slope is what was
    asked (brown: most power at low frequencies, hiss: at high ones), rebuilt only on new params."""
    from whisper_scratch.synth import build_noise, colored_noise
    rng = np.random.default_rng(0)

    def low_high(y):
        p = np.abs(np.fft.rfft(y)) ** 2
        f = np.fft.rfftfreq(len(y), 1 / 16000)
        return p[(f > 50) & (f < 500)].mean() / p[(f > 2000) & (f < 7000)].mean()
    brown, white, hiss = (low_high(colored_noise(2.0, s, rng)) for s in (-2.0, 0.0, 1.0))
    assert brown > 100 * white and white > 10 * hiss, (brown, white, hiss)
    assert 0.5 < white < 2, white
    folder = build_noise(tmp_path / "noise", num_files=3, seconds=1.0)
    files = sorted(folder.glob("*.wav"))
    assert len(files) == 3
    audio, sr = sf.read(files[0])
    assert sr == 16000 and len(audio) == 16000 and 0 < np.abs(audio).max() <= 0.1 + 1e-6
    stamp = (folder / "params.json").stat().st_mtime_ns
    build_noise(tmp_path / "noise", num_files=3, seconds=1.0)
    assert (folder / "params.json").stat().st_mtime_ns == stamp
