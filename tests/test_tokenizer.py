import io
import unicodedata

import pytest
import torch

from whisper_scratch.tokenizer import (UNK_TEXT, CharTokenizer, TextNormalizer, build_tokenizer,
                                       tokenizer_from_dict)

MN_LETTERS = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяөү"


def test_normalizer_policy():
    n = TextNormalizer()
    assert n("  Сайн   байна уу?  ") == "сайн байна уу"
    assert n('"ЮНЕСКО"-гийн «өв», don\u2019t!') == "юнеско гийн өв dont"
    keep = TextNormalizer(lowercase=False, punctuation="keep")
    assert keep("Сайн,  байна?") == "Сайн, байна?"
    decomposed = unicodedata.normalize("NFD", "й")
    assert len(decomposed) == 2 and n(decomposed) == "й"
    with pytest.raises(ValueError, match="'drop'"):
        TextNormalizer(punctuation="drop")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_round_trip_on_every_mongolian_sentence(kind, mn_sentences):
    assert len(mn_sentences) > 5000
    tok = build_tokenizer(kind, mn_sentences, bpe_vocab_size=500)
    for line in mn_sentences:
        ids = tok.encode(line)
        assert all(0 < i < tok.n_text for i in ids), line  # no <|unk|>, no specials
        assert tok.decode(ids) == tok.normalize(line), line
        assert not tok.find_oov(line), line
    if kind == "bpe":
        total_chars = sum(len(tok.normalize(x)) for x in mn_sentences)
        total_ids = sum(len(tok.encode(x)) for x in mn_sentences)
        assert total_ids < 0.6 * total_chars  # BPE actually merges


def test_keep_chars_tokenizer_round_trips_all_sentences(mn_sentences):
    tok = build_tokenizer("char", keep_chars=MN_LETTERS.upper() + MN_LETTERS)
    assert tok.alphabet.startswith(MN_LETTERS) and " " in tok.alphabet  # space always kept
    for line in mn_sentences:
        ids = tok.encode(line)
        assert tok.unk not in ids and tok.decode(ids) == tok.normalize(line), line


def test_out_of_alphabet_characters_are_counted_not_dropped():
    tok = CharTokenizer("абв")
    (a, b, v), space = tok.encode("абв"), tok.encode("а а")[1]
    ids = tok.encode("Аб гг в x")
    assert ids == [a, b, space, tok.unk, tok.unk, space, v, space, tok.unk]  # one <|unk|> per character
    assert tok.decode(ids) == f"аб {UNK_TEXT}{UNK_TEXT} в {UNK_TEXT}"
    assert tok.find_oov("Аб гг в x") == {"г": 2, "x": 1}  # what filter_for_model adds to DataReport.oov
    assert tok.find_oov("Гд, АБВ!") == {"г": 1, "д": 1}  # after normalisation: punctuation and case gone


def test_bpe_counts_unknown_characters(mn_sentences):
    tok = build_tokenizer("bpe", mn_sentences[:300], bpe_vocab_size=120)
    text = "сайн xyz байна"
    ids = tok.encode(text)
    assert tok.unk in ids
    assert tok.find_oov(text) == {"x": 1, "y": 1, "z": 1}
    assert tok.decode(ids) == f"сайн {UNK_TEXT} байна"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_special_token_layout(kind, mn_sentences):
    tok = build_tokenizer(kind, mn_sentences[:200], bpe_vocab_size=100, languages=("mn", "en"))
    specials = tok.special_tokens
    assert len(specials) == 8 and len(set(specials.values())) == 8
    assert min(specials) == tok.n_text == tok.eot and tok.pad == tok.vocab_size - 1
    assert tok.sot_sequence() == (tok.sot, tok.language_ids["mn"], tok.transcribe, tok.no_timestamps)
    assert tok.sot_sequence("en")[1] == tok.language_ids["en"]
    with pytest.raises(ValueError, match="'de'"):
        tok.sot_sequence("de")
    # specials never leak into text
    assert tok.decode([tok.sot, *tok.encode("сайн"), tok.eot, tok.pad]) == "сайн"


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_tokenizer_serialises_to_primitives_and_round_trips(kind, mn_sentences):
    tok = build_tokenizer(kind, mn_sentences[:500], bpe_vocab_size=200,
                          normalizer=TextNormalizer(punctuation="keep"))
    buf = io.BytesIO()
    torch.save({"tokenizer": tok.to_dict()}, buf)
    buf.seek(0)
    again = tokenizer_from_dict(torch.load(buf, weights_only=True)["tokenizer"])
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.normalizer == tok.normalizer and again.languages == tok.languages
    for line in mn_sentences[500:600]:
        assert again.encode(line) == tok.encode(line)


def test_bad_tokenizer_arguments():
    with pytest.raises(ValueError, match="'wordpiece'"):
        build_tokenizer("wordpiece", ["a"])
    with pytest.raises(ValueError, match="no text"):
        build_tokenizer("bpe", ["", "   "])
    with pytest.raises(ValueError, match="no --keep-chars"):
        build_tokenizer("char", [])
    with pytest.raises(ValueError, match="kind 'x'"):
        tokenizer_from_dict({"kind": "x", "normalizer": {}, "languages": ["mn"]})
