"""lm.py and shallow fusion: the Kneser-Ney model is a distribution, its files (ours and ARPA)
round-trip, it binds to char and BPE tokenizers with the chain rule, a wrong normaliser is
refused, the CLI keeps held-out sentences out, and in beam search weight 0 is exactly no LM
while a heavy weight makes the search spell what the LM knows."""
import gzip
import json
import math

import numpy as np
import pytest
import torch

from whisper_scratch import lm as L
from whisper_scratch.decoding import DecodingOptions, decode, with_language_model
from whisper_scratch.tokenizer import CharTokenizer, TextNormalizer, train_bpe
import test_decoding
from test_decoding import TOK, tiny_model

clips = test_decoding.clips  # the fixture: six real clips

TEXT = ["the cat sat on the mat", "a cat and a hat", "the hat sat", "that cat is fat", "tea at the mat"]


@pytest.fixture(scope="module")
def lm():
    return L.build(TEXT, 4)


def contexts_to_check(m):
    keys = list(m.contexts)
    return [m.start()] + [keys[i] for i in np.random.default_rng(0).choice(len(keys), 20, replace=False)]


def test_every_next_symbol_distribution_sums_to_one(lm):
    for ctx in contexts_to_check(lm) + [(lm.index["z"],) if "z" in lm.index else (lm.unk,)]:
        p = np.exp(lm.next_logprobs(ctx).astype(np.float64))
        assert math.isclose(p.sum(), 1.0, abs_tol=1e-5), (ctx, p.sum())
        assert p[lm.bos] == 0 and p[lm.unk] > 0  # <s> is never predicted; unseen characters keep a share


def test_kneser_ney_prefers_what_the_text_says(lm):
    idx = lm.index
    after_th = lm.next_logprobs(lm.extend(lm.start(), [idx["t"], idx["h"]]))
    assert after_th[idx["e"]] > after_th[idx["a"]] > after_th[idx["z"] if "z" in idx else lm.unk]
    # a sentence of the text is far more likely than the same letters shuffled
    assert lm.sentence_logprob("the cat sat") > lm.sentence_logprob("tta hce ast") + 5
    assert 1.0 < lm.bits_per_char(TEXT) < lm.bits_per_char(["qxv zzk"])


def test_saved_and_arpa_files_round_trip(lm, tmp_path):
    lm.normalizer = {"lowercase": True, "punctuation": "strip"}
    lm.save(tmp_path / "lm.json.gz")
    lm.write_arpa(tmp_path / "lm.arpa")
    back, arpa = L.load_lm(tmp_path / "lm.json.gz"), L.load_lm(tmp_path / "lm.arpa")
    assert back.normalizer == lm.normalizer and arpa.normalizer is None
    text = (tmp_path / "lm.arpa").read_text()
    assert text.startswith("\\data\\\nngram 1=") and "<sp>" in text and text.rstrip().endswith("\\end\\")
    for ctx in contexts_to_check(lm):
        names = [lm.symbols[i] for i in ctx]
        want = lm.next_logprobs(ctx)
        for other in (back, arpa):
            got = other.next_logprobs(tuple(other.index[s] for s in names))
            by_name = {s: got[other.index[s]] for s in other.symbols}
            assert all(abs(by_name[s] - want[i]) < 1e-4 for i, s in enumerate(lm.symbols) if s != L.BOS), names


def test_unreadable_language_model_files_get_clear_errors(lm, tmp_path):
    with pytest.raises(FileNotFoundError, match="language model not found"):
        L.load_lm(tmp_path / "missing.json.gz")
    (tmp_path / "words.txt").write_text("not an arpa file\n")
    with pytest.raises(ValueError, match="not an ARPA file"):
        L.load_lm(tmp_path / "words.txt")
    with gzip.open(tmp_path / "other.json.gz", "wt") as f:
        json.dump({"format": "something else"}, f)
    with pytest.raises(ValueError, match="not a whisper_scratch language model"):
        L.load_lm(tmp_path / "other.json.gz")
    d = lm.to_dict()
    d["version"] = L.VERSION + 1
    with gzip.open(tmp_path / "newer.json.gz", "wt") as f:
        json.dump(d, f)
    with pytest.raises(ValueError, match="newer than this code"):
        L.load_lm(tmp_path / "newer.json.gz")
    (tmp_path / "word.arpa").write_text("\\data\\\nngram 1=1\n\n\\1-grams:\n-1.0\thello\n\n\\end\\\n")
    with pytest.raises(ValueError, match="not a character n-gram"):
        L.load_lm(tmp_path / "word.arpa")


def test_token_scores_char_and_bpe_follow_the_chain_rule(lm):
    char = CharTokenizer("abcdefghijklmnopqrstuvwxyz")
    tlm = L.TokenLM(lm, char, char.vocab_size)
    sym = lm.next_logprobs(tlm.start())
    vec = tlm.scores(tlm.start())
    assert vec[char.encode("t")[0]] == pytest.approx(sym[lm.index["t"]])
    assert vec[char.eot] == pytest.approx(sym[lm.eos]) and vec[char.sot] == 0
    assert vec[char.encode("q")[0]] == pytest.approx(sym[lm.unk])  # a letter the text never had
    bpe = train_bpe(TEXT * 5, 40)
    blm = L.TokenLM(lm, bpe, bpe.vocab_size)
    for word in ("the", "cat"):
        pieces = bpe.encode(word)
        state, total = blm.start(), 0.0
        for t in pieces:
            total += float(blm.scores(state)[t])
            state = blm.advance(state, t)
        # the first piece's word-boundary mark is not a character of the text: it is not scored
        assert total == pytest.approx(lm.sentence_logprob(word) - float(lm.next_logprobs(state)[lm.eos]), abs=1e-4)


def test_a_language_model_built_with_another_normaliser_is_refused(lm):
    lm.normalizer = {"lowercase": False, "punctuation": "keep"}
    with pytest.raises(ValueError, match="normaliser.*rebuild it"):
        L.TokenLM(lm, CharTokenizer("abc"), 10)
    lm.normalizer = None


def test_a_language_model_of_another_alphabet_is_refused(lm):
    with pytest.raises(ValueError, match="knows none of the acoustic model's letters \\('абвг'\\).*another alphabet"):
        L.TokenLM(lm, CharTokenizer("абвг"), 10)
    L.TokenLM(lm, CharTokenizer("abcq"), 10)  # one letter the text never had: fine


def test_cli_says_what_it_cannot_learn_from_or_write_before_building(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    (tmp_path / "text.txt").write_text("the cat\n")
    (tmp_path / "folder").mkdir()
    cases = [(["--text", str(tmp_path / "blank.txt")], "no sentences left to learn from (3 lines: 3 blank"),
             (["--text", str(tmp_path / "text.txt"), "--exclude", str(tmp_path / "text.txt")], "1 held out by --exclude"),
             (["--text", str(tmp_path / "text.txt"), "--output", str(tmp_path / "folder")], "is a folder"),
             (["--text", str(tmp_path / "text.txt"), "--arpa", str(tmp_path / "folder")], "--arpa"),
             (["--text", str(tmp_path / "text.txt"), "--arpa", str(tmp_path / "text.txt" / "x.arpa")],
              "text.txt is a file, not a folder")]
    for argv, message in cases:
        argv = argv if "--output" in argv else [*argv, "--output", str(tmp_path / "lm.json.gz")]
        assert L.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "lm.json.gz").exists()
    assert L.main(["--text", str(tmp_path / "text.txt"), "--output", str(tmp_path / "new" / "lm.json.gz"), "--order", "2",
                   "--arpa", str(tmp_path / "arpa" / "sub" / "lm.arpa")]) == 0  # new folders are made for both
    assert (tmp_path / "arpa" / "sub" / "lm.arpa").is_file()
    (tmp_path / "table.tsv").write_text("a.wav\tthe cat\nb.wav\ta hat\n")  # no header naming the text column
    with pytest.raises(ValueError, match="table.tsv: a table \\(2 tab-separated columns on every line\\)"):
        L.read_text(tmp_path / "table.tsv")


def test_cli_drops_held_out_sentences_and_writes_a_loadable_model(tmp_path, capsys):
    (tmp_path / "train.tsv").write_text("client_id\tpath\tsentence\nc\ta.mp3\tThe cat, sat.\nc\tb.mp3\tA hat!\n"
                                        "c\tc.mp3\tthe dev line\n")
    (tmp_path / "dev.tsv").write_text("client_id\tpath\tsentence\nc\td.mp3\tThe DEV line\n")
    out = tmp_path / "lm.json.gz"
    assert L.main(["--text", str(tmp_path / "train.tsv"), "--output", str(out), "--order", "3",
                   "--exclude", str(tmp_path / "dev.tsv"), "--arpa", str(tmp_path / "lm.arpa")]) == 0
    err = capsys.readouterr().err
    assert "2 sentences" in err and "1 dropped as held out" in err
    m = L.load_lm(out)
    assert m.normalizer == {"lowercase": True, "punctuation": "strip"} and m.order == 3
    assert "," not in m.index and "T" not in m.index  # the text was normalised before counting
    assert m.sentence_logprob("the cat sat") > m.sentence_logprob("the dev line")
    assert L.main(["--text", str(tmp_path / "none.txt"), "--output", str(out)]) == 2
    assert "none.txt: text file not found" in capsys.readouterr().err
    (tmp_path / "cv.tsv").write_text('client_id\tpath\tsentence\nc\ta.mp3\t"He said ""hi""."\n')
    assert L.read_text(tmp_path / "cv.tsv") == ['He said "hi".']  # CSV quoting, as the corpus readers read it


def test_lm_weight_zero_is_exactly_no_lm_and_a_heavy_lm_spells_its_text(clips, tmp_path):
    batch, lens, _ = clips
    m = tiny_model()
    lm = L.build(["hid cab"] * 20, 4)  # every context has one continuation
    lm.normalizer = {"lowercase": True, "punctuation": "strip"}
    lm.save(tmp_path / "lm.json.gz")
    base = DecodingOptions(max_new_tokens=10, beam_size=3)
    plain = decode(m, batch, lens, TOK, base)
    for extra in ({}, {"ctc_weight": 0.3}):
        ref = decode(m, batch, lens, TOK, DecodingOptions(max_new_tokens=10, beam_size=3, **extra))
        zero = decode(m, batch, lens, TOK, DecodingOptions(max_new_tokens=10, beam_size=3, lm_path=str(tmp_path / "lm.json.gz"),
                                                           lm_weight=0.0, **extra))
        assert [(r.tokens, r.score) for r in zero] == [(r.tokens, r.score) for r in ref]
    # patience 2: hypotheses the LM ruins end early, and the search must not stop on three of them
    heavy = with_language_model(DecodingOptions(max_new_tokens=10, beam_size=3, patience=2.0,
                                                lm_path=str(tmp_path / "lm.json.gz"), lm_weight=50.0), TOK, m.dims.n_vocab)
    assert isinstance(heavy.lm, L.TokenLM)
    found = decode(m, batch, lens, TOK, heavy)
    assert [r.text for r in found] == ["hid cab"] * len(found) != [r.text for r in plain]
    with torch.no_grad():  # the LM term is in the ranking score, not in the decoder's own logprob
        assert all(r.score != r.sum_logprob for r in found)


def test_fusion_options_are_validated():
    with pytest.raises(ValueError, match="lm_weight 0.5 needs a language model"):
        DecodingOptions(beam_size=4, lm_weight=0.5)
    with pytest.raises(ValueError, match="need beam search"):
        DecodingOptions(temperature=0.4, lm_weight=0.5, lm_path="x")
    assert DecodingOptions(lm_weight=0.5, lm_path="x").uses_beam_search  # even at beam size 1
    assert DecodingOptions(lm_weight=0.5, lm_path="x").at_temperature(0.4).lm_weight == 0


def test_normaliser_default_matches_the_tokenizer_default():
    assert L.normalizer_for(L.LmOptions(text=("x",), output="y")) == TextNormalizer()
