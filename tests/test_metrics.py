"""metrics.py: WER/CER equal jiwer's on the same normalised strings, per-utterance counts add up,
empty references are handled explicitly, and the three reference formats are read."""
import jiwer
import pytest

from whisper_scratch.data import read_references
from whisper_scratch.metrics import cer, error_rates, utterance_errors, wer, worst
from whisper_scratch.tokenizer import TextNormalizer
from conftest import DATA

REFS = ["Сайн байна уу?", "the cat sat on the mat", "ask not what your country can do", "один два"]
HYPS = ["сайн байна", "the cat sat on a mat mat", "ask what your country can do for you", ""]


def test_error_rates_equal_jiwer_after_normalisation():
    norm = TextNormalizer()
    r = error_rates(REFS, HYPS, normalize=norm)
    refs, hyps = [norm(x) for x in REFS], [norm(x) for x in HYPS]
    o = jiwer.process_words(refs, hyps)
    assert r["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert r["cer"] == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)
    assert (r["substitutions"], r["insertions"], r["deletions"], r["hits"]) == (
        o.substitutions, o.insertions, o.deletions, o.hits)
    assert r["n_ref_words"] == sum(len(x.split()) for x in refs) == 18
    assert r["n_utterances"] == 4
    assert wer(REFS, HYPS, norm) == r["wer"] and cer(REFS, HYPS, norm) == r["cer"]
    # without normalisation case and punctuation count as errors
    assert error_rates(REFS, HYPS)["wer"] > r["wer"]


def test_utterance_errors_add_up_to_the_corpus_counts():
    norm = TextNormalizer()
    rows = utterance_errors(REFS, HYPS, norm)
    total = error_rates(REFS, HYPS, norm)
    for key in ("substitutions", "insertions", "deletions"):
        assert sum(r[key] for r in rows) == total[key]
    for r, ref, hyp in zip(rows, REFS, HYPS):
        assert r["reference"] == norm(ref) and r["hypothesis"] == norm(hyp)
        assert r["wer"] == pytest.approx(jiwer.wer(norm(ref), norm(hyp)))
    assert [r["hypothesis"] for r in worst(rows, 2)] == ["", "ask what your country can do for you"]
    assert all(r["errors"] > 0 for r in worst(rows, 10))


def test_empty_references_are_explicit():
    r = error_rates(["", "a b"], ["x y", "a b"])
    assert r["insertions"] == 2 and r["n_ref_words"] == 2 and r["wer"] == 1.0
    rows = utterance_errors(["", ""], ["x", ""])
    assert rows[0]["wer"] == float("inf") and rows[1]["wer"] == 0.0
    with pytest.raises(ValueError, match="all 2 references are empty"):
        error_rates(["", " "], ["x", ""])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        error_rates(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no utterances"):
        error_rates([], [])


def test_read_references_in_three_formats(tmp_path):
    plain = tmp_path / "refs.tsv"
    plain.write_text("a.wav\thello world\nsub/b.mp3\t\"quoted\" text\n\n", encoding="utf-8")
    assert read_references(plain) == ([("a.wav", "hello world"), ("sub/b.mp3", '"quoted" text')], "tsv")
    cv = tmp_path / "test.tsv"
    cv.write_text("client_id\tpath\tsentence\tup_votes\tdown_votes\n"
                  "x\tcommon_voice_mn_1.mp3\t\"Юу вэ?\" гэж асуув\t2\t0\n", encoding="utf-8")
    assert read_references(cv) == ([("common_voice_mn_1.mp3", '"Юу вэ?" гэж асуув')], "common_voice")
    pairs, kind = read_references(DATA / "fsdd" / "manifest.tsv")
    assert kind == "manifest" and len(pairs) == 2500 and pairs[0] == ("recordings/0_george_0.wav", "zero")
    bad = tmp_path / "bad.tsv"
    bad.write_text("path\ttext\nonly_a_path.wav\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tsv:2"):
        read_references(bad)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_references(tmp_path / "nope.tsv")
    jsonl = tmp_path / "m.jsonl"  # a JSONL manifest reads as the trainer reads it
    jsonl.write_text('{"audio": "c.wav", "text": "one two"}\n', encoding="utf-8")
    assert read_references(jsonl) == ([("c.wav", "one two")], "manifest")
