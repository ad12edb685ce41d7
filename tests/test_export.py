"""Export to openai-whisper / Hugging Face / CTranslate2 and warm start from openai-whisper.

Each export is loaded by the other library's own code and must give our logits (fp32, ≤ 1e-4)
and our greedy transcript. The model is tiny (d 64, 2+2 layers, 3 s encoder window: the other
implementations need exactly 2 * n_audio_ctx frames, like 3000 for the real 30 s models) with
weights drawn wide enough that greedy decoding emits varied tokens, so equal transcripts mean
something.
"""
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from whisper_scratch.checkpoint import save_checkpoint
from whisper_scratch.decoding import DecodingOptions, decode
from whisper_scratch.export import ct2, hf, openai
from whisper_scratch.export.__main__ import main as export_main
from whisper_scratch.model import ModelDimensions, Whisper
from whisper_scratch.tokenizer import CharTokenizer, TextNormalizer, train_bpe
from whisper_scratch.warmstart import warm_start

from conftest import wide_30s_model
from openai_shim import openai_decode  # tests/openai_shim.py

MN = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяөү"
N_CTX = 150  # encoder positions: 300 mel frames (3 s)
N_NEW = 16  # greedy tokens per utterance
TOL = 1e-4


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(MN)


def tiny_model(tok, ctc: bool = False, seed: int = 0) -> Whisper:
    dims = ModelDimensions(80, N_CTX, 64, 4, 2, tok.vocab_size, 48, 64, 4, 2, ctc=ctc)
    torch.manual_seed(seed)
    model = Whisper(dims).eval()
    with torch.no_grad():  # wide weights: a peaked, audio-dependent output distribution
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.3)
            elif name.endswith("bias"):  # trained LayerNorms have biases (the CT2 export needs one)
                p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, ctc=True)


@pytest.fixture(scope="module")
def mel(data_dir):
    """Two real 3 s log-mel windows (JFK), the second reversed in time."""
    m = torch.from_numpy(np.load(data_dir / "reference" / "jfk_logmel80.npy"))[:, 200:200 + 2 * N_CTX]
    return torch.stack([m, m.flip(-1)]).float().contiguous()


@pytest.fixture(scope="module")
def ckpt_path(model, tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, model, tok)
    return path


def teacher_forced(model, mel, tok, text_tokens) -> torch.Tensor:
    tokens = torch.tensor([list(tok.sot_sequence()) + list(text_tokens)])
    with torch.no_grad():
        return model(mel, None, tokens)


def ours_greedy(model, mel, tok) -> list:
    results = decode(model, mel, None, tok, DecodingOptions(max_new_tokens=N_NEW))
    return [r.tokens for r in results]


def test_greedy_output_is_not_trivial(model, mel, tok):
    seqs = ours_greedy(model, mel, tok)
    assert seqs[0] != seqs[1]
    assert all(len(set(s)) >= 3 for s in seqs), seqs


# -- openai-whisper ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def openai_model(ckpt_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("openai") / "model.pt"
    export_main(["--checkpoint", str(ckpt_path), "--to", "openai", "--output", str(out)])
    return openai.load_openai_model(out), torch.load(out, weights_only=True)


def test_openai_file_has_dims_and_weights_without_ctc(openai_model, model):
    _, saved = openai_model
    assert set(saved) == {"dims", "model_state_dict"}
    assert saved["dims"] == {k: getattr(model.dims, k) for k in openai.OPENAI_DIMS}
    assert not any(k.startswith("ctc_head") for k in saved["model_state_dict"])
    assert len(saved["model_state_dict"]) == len(model.state_dict()) - 2  # ctc_head weight + bias


def test_openai_logits_equal(openai_model, model, mel, tok):
    om, _ = openai_model
    tokens = torch.tensor([list(tok.sot_sequence()) + [5, 9, 36, 14]] * 2)
    with torch.no_grad():
        ours, theirs = model(mel, None, tokens), om(mel, tokens)
    assert (ours - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("beam_size", [1, 3])
def test_openai_decode_gives_our_transcript(openai_model, model, mel, tok, beam_size):
    om, _ = openai_model
    theirs = openai_decode(om, mel, tok, beam_size=beam_size, max_new_tokens=N_NEW)
    ours = decode(model, mel, None, tok, DecodingOptions(beam_size=beam_size, max_new_tokens=N_NEW))
    assert [r.tokens for r in theirs] == [r.tokens for r in ours]
    assert [r.text for r in theirs] == [r.text.strip() for r in ours]  # openai strips the text


def test_export_refuses_to_overwrite(ckpt_path, tmp_path, capsys):
    out = tmp_path / "x.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="already exists"):
        export_main(["--checkpoint", str(ckpt_path), "--to", "openai", "--output", str(out)])
    assert out.read_bytes() == b"keep me"
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="does not look like an export"):
        export_main(["--checkpoint", str(ckpt_path), "--to", "hf", "--output", str(folder), "--overwrite"])
    assert (folder / "mine.txt").is_file()
    with pytest.raises(SystemExit, match="checkpoint not found"):
        export_main(["--checkpoint", str(tmp_path / "nope.pt"), "--to", "openai", "--output", str(tmp_path / "y.pt")])
    # the kind of output each target writes, checked before anything is read or deleted
    for to, output, message in [("hf", out, "x.pt is a file; --to hf writes a folder"),
                                ("ct2", out, "x.pt is a file; --to ct2 writes a folder"),
                                ("openai", folder, "notes is a folder; --to openai writes one file"),
                                ("hf", out / "sub", "x.pt is a file, not a folder")]:
        with pytest.raises(SystemExit, match=message):
            export_main(["--checkpoint", str(ckpt_path), "--to", to, "--output", str(output), "--overwrite"])
    assert out.read_bytes() == b"keep me" and (folder / "mine.txt").is_file()


def test_a_missing_package_is_named_with_how_to_install_it(ckpt_path, tmp_path, monkeypatch):
    import importlib.util
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ctranslate2" else find(name, *a))
    with pytest.raises(SystemExit, match="--to ct2 needs ctranslate2, not installed here: pip install ctranslate2"):
        export_main(["--checkpoint", str(ckpt_path), "--to", "ct2", "--output", str(tmp_path / "ct2")])


@pytest.mark.parametrize("to", ["openai", "hf", "ct2", "ggml"])
def test_a_model_on_normalised_log_mels_is_not_exported(model, tok, tmp_path, to):
    """--feature-norm models hear centred log-mels; the 30 s tools would feed them plain ones."""
    from dataclasses import replace
    normed = Whisper(replace(model.dims, feature_norm="mean"))
    normed.load_state_dict(model.state_dict())
    path = tmp_path / "normed.pt"
    save_checkpoint(path, normed, tok)
    with pytest.raises(SystemExit, match="normed.pt: .*--feature-norm mean.*cannot be exported"):
        export_main(["--checkpoint", str(path), "--to", to, "--output", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# -- Hugging Face transformers -----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(ckpt_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    export_main(["--checkpoint", str(ckpt_path), "--to", "hf", "--output", str(out)])
    return out


def test_hf_folder_loads_and_logits_equal(hf_dir, model, mel, tok):
    from transformers import WhisperForConditionalGeneration

    hf_whisper = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    assert (hf_dir / "model.safetensors").is_file()
    tokens = torch.tensor([list(tok.sot_sequence()) + [5, 9, 36, 14]] * 2)
    with torch.no_grad():
        ours, theirs = model(mel, None, tokens), hf_whisper(input_features=mel, decoder_input_ids=tokens).logits
    assert (ours - theirs).abs().max().item() <= TOL


def test_hf_generate_gives_our_transcript(hf_dir, model, mel, tok):
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    hf_whisper = WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()
    g = hf_whisper.generation_config
    assert (g.decoder_start_token_id, g.eos_token_id, g.pad_token_id) == (tok.sot, tok.eot, tok.pad)
    assert g.lang_to_id == {"<|mn|>": tok.language_ids["mn"]} and g.no_timestamps_token_id == tok.no_timestamps
    with torch.no_grad():
        out = hf_whisper.generate(input_features=mel, max_new_tokens=N_NEW, do_sample=False, num_beams=1)
    theirs = [[t for t in row.tolist() if t < tok.n_text] for row in out]  # drop prompt, eot, padding
    assert theirs == ours_greedy(model, mel, tok)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok.batch_decode(out, skip_special_tokens=True) == [tok.decode(t) for t in theirs]


def test_hf_char_tokenizer_round_trips(hf_dir, tok, mn_sentences):
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    assert len(hf_tok) == tok.vocab_size
    assert [hf_tok.convert_ids_to_tokens(i) for i in sorted(tok.special_tokens)] == \
        [tok.special_tokens[i] for i in sorted(tok.special_tokens)]
    for s in mn_sentences[:300] + ["Сайн, байна уу?  OK ёо"]:
        ids = tok.encode(s)
        assert hf_tok.encode(s, add_special_tokens=False) == ids, s
        assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids), s


@pytest.mark.parametrize("normalizer", [TextNormalizer(), TextNormalizer(lowercase=False, punctuation="keep")])
def test_hf_bpe_tokenizer_round_trips(mn_sentences, normalizer):
    bpe = train_bpe(mn_sentences[:1000], 200, normalizer)
    hf_tok = hf.hf_tokenizer(bpe)
    assert len(hf_tok) == bpe.vocab_size
    for s in mn_sentences[:1000] + ["Сайн, байна уу?  OK ёо"]:
        ids = bpe.encode(s)
        assert hf_tok.encode(s, add_special_tokens=False) == ids, s
        assert hf_tok.decode(ids, skip_special_tokens=True) == bpe.decode(ids), s


# a small sentencepiece BPE whose alphabet lacks some letters, for unknown characters anywhere
BPE_TEXTS = ["сайн байна уу", "баяртай найз минь", "өнөөдөр сайхан өдөр байна", "ном уншиж байна",
             "монгол хэл", "гэр бүл", "ус уух", "шинэ жил"]
BPE_UNKNOWN = "qц7äω€ё"  # ц and ё are Mongolian letters missing from BPE_TEXTS


@pytest.fixture(scope="module")
def small_bpe():
    bpe = train_bpe(BPE_TEXTS * 10, 60)
    assert not set(BPE_UNKNOWN) & bpe.alphabet_set
    return bpe, hf.hf_tokenizer(bpe)


BPE_CHARS = "".join(sorted(set("".join(BPE_TEXTS)))) + BPE_UNKNOWN + "  ,-'Ө"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(alphabet=BPE_CHARS, max_size=24))
def test_hf_bpe_tokenizer_matches_ours_with_unknown_characters(small_bpe, text):
    """Unknown characters at the start, inside or at the end of a word, next to each other or to
    spaces: the exported tokenizer encodes and decodes as ours ("аб ⁇ в", not "аб⁇в")."""
    bpe, hf_tok = small_bpe
    ids = bpe.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False) == ids
    assert hf_tok.decode(ids, skip_special_tokens=True) == bpe.decode(ids)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data())
def test_hf_bpe_tokenizer_decodes_any_ids_as_ours(small_bpe, data):
    """Any id sequence a model may emit (pieces in any order, <|unk|> runs, specials between)."""
    bpe, hf_tok = small_bpe
    ids = data.draw(st.lists(st.one_of(st.integers(0, bpe.n_text - 1), st.sampled_from([0, 0, bpe.eot, bpe.pad])),
                             max_size=20))
    assert hf_tok.decode(ids, skip_special_tokens=True) == bpe.decode(ids)


def test_hf_bpe_decodes_unknown_characters_as_ours(small_bpe):
    bpe, hf_tok = small_bpe
    for text, want in [("байqна", "бай ⁇ на"), ("qбайна", "⁇ байна"), ("байнаq", "байна ⁇"),
                       ("байqqна ц", "бай ⁇ на ⁇"), ("q q", "⁇ ⁇")]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == want
        assert hf_tok.decode(ids, skip_special_tokens=True) == want, text


# -- CTranslate2 -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct2_dir(ckpt_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct2") / "model"
    export_main(["--checkpoint", str(ckpt_path), "--to", "ct2", "--output", str(out)])
    return out


def ct2_greedy(ct2_dir, mel, tok, compute_type="default"):
    import ctranslate2

    ct = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type=compute_type, intra_threads=1)
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy()))
    # CTranslate2's Whisper generates at most max_length // 2 new tokens (openai's sample_len
    # rule, measured); suppress_tokens=[-1], the default, means the config's list (our specials);
    # suppress_blank off as in our decoding
    results = ct.generate(features, [list(tok.sot_sequence())] * mel.shape[0], beam_size=1,
                          max_length=2 * N_NEW, suppress_blank=False, return_logits_vocab=True)
    return ct, features, results


def test_ct2_folder_has_tokenizer_and_our_config(ct2_dir, tok):
    import json

    import ctranslate2

    config = json.loads((ct2_dir / "config.json").read_text())
    assert config["suppress_ids"] == hf.suppress_ids(tok) and config["suppress_ids_begin"] == []
    vocab = json.loads((ct2_dir / "vocabulary.json").read_text())
    # faster-whisper's layout: 51,865 tokens, <|nospeech|> right after ours, "" last (multilingual)
    assert len(vocab) == ct2.FW_VOCAB and vocab[:tok.vocab_size] == [
        tok.special_tokens.get(i) or tok.decode([i]) if i else "<|unk|>" for i in range(tok.vocab_size)]
    assert vocab[tok.vocab_size] == "<|nospeech|>" and vocab[-1] == ""
    ct = ctranslate2.models.Whisper(str(ct2_dir), device="cpu")
    assert ct.is_multilingual and ct.num_languages == len(tok.languages)
    for name in ("tokenizer.json", "preprocessor_config.json", "whisper_scratch.json"):
        assert (ct2_dir / name).is_file()


def test_pinned_row_gives_one_logit_for_every_state():
    torch.manual_seed(3)
    ln = torch.nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.normal_(0, 0.1)
    row, logit = ct2.pinned_row(ln.weight, ln.bias)
    x = torch.randn(1000, 64) * torch.rand(1000, 1) * 10 + torch.randn(1000, 1)
    with torch.no_grad():
        logits = ln(x) @ row
    assert logit <= -1000 and (logits - logit).abs().max() <= 1e-3 * abs(logit)  # fp32 rounding only
    assert ct2.pinned_row(torch.ones(64), torch.zeros(64))[1] == 0.0  # no bias: no such row


def test_ct2_encoder_and_logits_equal(ct2_dir, model, mel, tok):
    ct, features, results = ct2_greedy(ct2_dir, mel, tok)
    with torch.no_grad():
        xa = model.encoder(mel)
    assert np.abs(np.array(ct.encode(features)) - xa.numpy()).max() <= TOL
    _, pinned = ct2.pinned_row(model.decoder.ln.weight.detach(), model.decoder.ln.bias.detach())
    for i, r in enumerate(results):
        seq = r.sequences_ids[0]
        theirs = np.array([np.array(step) for step in r.logits[0]])  # (new tokens, 51865), suppressed = -max
        ours = teacher_forced(model, mel[i:i + 1], tok, seq)[0, 3:3 + len(theirs)].numpy()
        keep = np.ones(tok.vocab_size, bool)
        keep[hf.suppress_ids(tok)] = False
        assert np.abs(theirs[:, :tok.vocab_size][:, keep] - ours[:, keep]).max() <= TOL
        # every added id has the pinned logit, far below any of ours
        assert np.abs(theirs[:, tok.vocab_size:] - pinned).max() <= 1e-3 * abs(pinned)
        assert pinned < ours.min() - 100


def test_ct2_generate_gives_our_transcript(ct2_dir, model, mel, tok):
    _, _, results = ct2_greedy(ct2_dir, mel, tok)
    ours = ours_greedy(model, mel, tok)
    assert [r.sequences_ids[0] for r in results] == ours


def test_ct2_int8_export_runs(ckpt_path, tmp_path, mel, tok):
    out = tmp_path / "int8"
    export_main(["--checkpoint", str(ckpt_path), "--to", "ct2", "--quantization", "int8", "--output", str(out)])
    _, _, results = ct2_greedy(out, mel, tok, compute_type="int8")
    assert all(len(r.sequences_ids[0]) > 0 for r in results)


def test_ct2_int8_pin_survives_rounding(tok, tmp_path, mel):
    """A trained model's final LayerNorm bias is small, so the pinned rows (c / gain) are large
    and their constant logit comes from cancellation, which int8 rounding of the row and of the
    activations used to undo: the demo model emitted pinned specials in a third of its tokens.
    With pin_bias the pin is far from zero and int8 gives only our ids, as fp32 does."""
    model = tiny_model(tok, seed=3)
    with torch.no_grad():
        model.decoder.ln.bias.normal_(0, 0.003)  # small, as trained models have it
    ckpt = tmp_path / "model.pt"
    save_checkpoint(ckpt, model, tok)
    for q in ("float32", "int8"):
        export_main(["--checkpoint", str(ckpt), "--to", "ct2", "--quantization", q, "--output", str(tmp_path / q)])
        _, _, results = ct2_greedy(tmp_path / q, mel, tok, compute_type=q)
        ids = [i for r in results for i in r.sequences_ids[0]]
        assert len(ids) > 8 and all(i < tok.n_text or i == tok.eot for i in ids), (q, ids)


def test_ct2_compact_export_keeps_our_vocabulary(ckpt_path, tmp_path, model, mel, tok):
    import json

    out = tmp_path / "compact"
    export_main(["--checkpoint", str(ckpt_path), "--to", "ct2", "--compact", "--output", str(out)])
    assert len(json.loads((out / "vocabulary.json").read_text())) == tok.vocab_size
    _, _, results = ct2_greedy(out, mel, tok)
    assert [r.sequences_ids[0] for r in results] == ours_greedy(model, mel, tok)


# -- faster-whisper -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fw_setup(tok, tmp_path_factory):
    """A 30 s model (faster-whisper always pads to 3000 frames) exported to CTranslate2, loaded by
    faster-whisper. Seed and scale give varied output that ends with <|endoftext|>."""
    from faster_whisper import WhisperModel

    model = wide_30s_model(tok.vocab_size)
    out = tmp_path_factory.mktemp("fw") / "model"
    ct2.export_ct2(model, tok, out)
    return model, WhisperModel(str(out), device="cpu", compute_type="float32", cpu_threads=1)


def test_faster_whisper_tokenizer_speaks_our_layout(fw_setup, tok):
    from faster_whisper.tokenizer import Tokenizer as FWTokenizer

    _, fw = fw_setup
    t = FWTokenizer(fw.hf_tokenizer, multilingual=True, task="transcribe", language="mn")
    assert t.sot_sequence == list(tok.sot_sequence()[:3]) and t.no_timestamps == tok.no_timestamps
    assert t.eot == tok.eot and t.sot_prev == tok.startofprev
    # its non-speech list (suppressed by default) touches none of our tokens, and does not crash
    assert min(t.non_speech_tokens) >= tok.vocab_size
    assert t.decode(tok.encode("Шинэ жил, сайхан-сайхан өдөр")) == "шинэ жил сайхан сайхан өдөр"


def fw_prompt_ids(fw_tokenizer, bpe_or_char, prompt: str) -> list:
    """faster-whisper's initial_prompt ids (" " + prompt.strip()), each added symbol replaced by
    the id of ours whose embedding it carries."""
    names, symbols = ct2.fw_extra_tokens(bpe_or_char)
    stand_in = {bpe_or_char.vocab_size + names.index(c): ct2._stand_in(bpe_or_char, c) for c in symbols}
    return [stand_in.get(i, i) for i in fw_tokenizer.encode(" " + prompt.strip())]


# prompts whose apostrophes and hyphens our normaliser deletes (') or turns into a space (-)
FW_PROMPTS = ["бид'ний ном", "don't stop", "сайн-сайхан өдөр", "Шинэ жил, сайхан-сайхан өдөр", "a - b",
              "нэг 'хоёр' гурав", "ном -ын", "үг' үг", "үг ' үг", "a--b", "it's -- ok-ish"]


def test_faster_whisper_prompt_with_apostrophes_encodes_as_ours(fw_setup, tok):
    """An apostrophe in faster-whisper's initial_prompt used to become <|unk|> ("'" was an added
    token matched before normalising, embedded as <|unk|>); now " '" and " -" are the added
    tokens, so inside a word the normaliser sees them, and between words they embed as the space."""
    from faster_whisper.tokenizer import Tokenizer as FWTokenizer

    _, fw = fw_setup
    t = FWTokenizer(fw.hf_tokenizer, multilingual=True, task="transcribe", language="mn")
    for prompt in FW_PROMPTS:
        assert fw_prompt_ids(t, tok, prompt) == tok.encode(prompt), prompt
    assert 0 not in t.encode(" бид'ний ном")
    # at the very start (faster-whisper prepends " "): our space first, the text is the same
    space = tok.encode("а а")[1]
    assert fw_prompt_ids(t, tok, "'хоёр' гурав") == [space] + tok.encode("хоёр гурав")


@pytest.mark.parametrize("kind", ["char_keep", "bpe", "bpe_keep"])
def test_faster_whisper_tokenizer_other_tokenizers(kind, small_bpe, mn_sentences, tmp_path):
    """Through tokenizers.Tokenizer.from_file on the exported tokenizer.json, as faster-whisper
    reads it: its non-speech list takes none of our ids (a keep tokenizer's own "-" and "'"
    included), and prompts with apostrophes or hyphens inside words encode as ours."""
    import tokenizers
    from faster_whisper.tokenizer import Tokenizer as FWTokenizer

    keep = TextNormalizer(punctuation="keep")
    ours = {"char_keep": lambda: CharTokenizer(MN + "-'.,", keep), "bpe": lambda: small_bpe[0],
            "bpe_keep": lambda: train_bpe(mn_sentences[:300] + ["сайн-сайхан don't"], 150, keep)}[kind]()
    hf.hf_tokenizer(ours, ct2.fw_extra_tokens(ours)).save_pretrained(tmp_path)
    t = FWTokenizer(tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")), multilingual=True,
                    task="transcribe", language="mn")
    taken = [i for i in t.non_speech_tokens if i < ours.vocab_size]
    if kind == "bpe_keep":  # '"' is a piece of ours, so no token can be added for it: "▁\"" is taken
        assert taken and all(ours.sp.id_to_piece(i).lstrip("\u2581") in ct2.FW_NON_SPEECH for i in taken)
    else:
        assert taken == []
    for prompt in ["бид'ний ном", "сайн-сайхан өдөр", "байна-уу", "үг'үг, байна"]:
        assert fw_prompt_ids(t, ours, prompt) == ours.encode(prompt), prompt
    if kind == "bpe":  # between words, a BPE's "▁" comes in addition to the next word's own: the same text
        for prompt in ["сайн - байна", "сайн 'байна'"]:
            ids = fw_prompt_ids(t, ours, prompt)
            assert len(ids) == len(ours.encode(prompt)) + 1 and ours.decode(ids) == ours.decode(ours.encode(prompt))


def test_faster_whisper_transcribe_gives_our_transcript(fw_setup, tok, data_dir):
    from faster_whisper.audio import pad_or_trim as fw_pad

    from whisper_scratch.audio import load_audio

    model, fw = fw_setup
    audio = load_audio(data_dir / "samples" / "jfk" / "jfk.flac")
    for clip in (audio, audio[::-1].copy()):
        segments, info = fw.transcribe(clip, language="mn", without_timestamps=True, beam_size=1,
                                       temperature=0.0, condition_on_previous_text=False)
        segments = list(segments)
        assert info.language == "mn" and len(segments) == 1  # one 30 s window
        # ours on the features faster-whisper computed (its own front end, zero-padded to 30 s)
        features = fw.feature_extractor(clip)[..., :-1]
        mel = torch.from_numpy(fw_pad(features)).float()[None]
        ours = decode(model, mel, None, tok, DecodingOptions(max_new_tokens=224))[0]
        assert segments[0].tokens == ours.tokens
        assert segments[0].text == ours.text
        assert len(set(ours.tokens)) >= 5


def test_faster_whisper_default_call_gives_the_text_without_timestamps(fw_setup, data_dir):
    """faster-whisper's plain `transcribe(audio, language="mn")` (without_timestamps=False, beam 5)
    gives the text of without_timestamps=True: CTranslate2 forces one timestamp first, the export's
    <|pad|>, which embeds as <|notimestamps|> (before: another, or per beam another, token id)."""
    from whisper_scratch.audio import load_audio

    model, fw = fw_setup
    audio = load_audio(data_dir / "samples" / "jfk" / "jfk.flac")
    first_timestamp = fw.hf_tokenizer.token_to_id("<|notimestamps|>") + 1
    for clip in (audio, audio[::-1].copy()):
        for beam in ({}, {"beam_size": 1}):
            plain, _ = fw.transcribe(clip, language="mn", **beam)
            without, _ = fw.transcribe(clip, language="mn", without_timestamps=True, **beam)
            plain, without = list(plain), list(without)
            assert [s.text for s in plain] == [s.text for s in without] and len(plain) == 1
            assert plain[0].tokens == [first_timestamp] + without[0].tokens
            assert plain[0].temperature == without[0].temperature == 0.0  # no fallback on either
            assert len(set(without[0].tokens)) >= 5


# -- warm start from openai-whisper ------------------------------------------------------------

def save_openai_random(tmp_path, dims: dict):
    """A random model built and saved the way openai-whisper checkpoints are: its own Whisper
    class, {"dims": asdict(ModelDimensions), "model_state_dict": ...}."""
    import whisper.model as W

    torch.manual_seed(1)
    model = W.Whisper(W.ModelDimensions(**dims))
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0, 0.02)  # openai leaves it uninitialised
    path = tmp_path / "openai_tiny.pt"
    torch.save({"dims": asdict(model.dims), "model_state_dict": model.state_dict()}, path)
    return model.eval(), path


OPENAI_DIMS = dict(n_mels=80, n_audio_ctx=N_CTX, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                   n_vocab=51865, n_text_ctx=64, n_text_state=64, n_text_head=4, n_text_layer=2)


def test_init_from_openai_encoder_only(tmp_path, tok, mel):
    theirs, path = save_openai_random(tmp_path, OPENAI_DIMS)
    ours = tiny_model(tok, ctc=True, seed=3)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    copied = warm_start(ours, path)
    assert copied and all(k.startswith("encoder.") for k in copied)
    assert len(copied) == sum(k.startswith("encoder.") for k in before)
    with torch.no_grad():
        assert (ours.encoder(mel) - theirs.encoder(mel)).abs().max().item() <= TOL
    after = ours.state_dict()
    for k, v in before.items():  # decoder and CTC head untouched: a new vocabulary is trained
        if not k.startswith("encoder."):
            assert torch.equal(after[k], v), k


def test_init_from_openai_with_decoder(tmp_path, tok):
    theirs, path = save_openai_random(tmp_path, OPENAI_DIMS)
    ours = tiny_model(tok)  # n_text_ctx 48 < 64: the positional table is cut
    token_embedding = ours.decoder.token_embedding.weight.clone()
    copied = warm_start(ours, path, transfer_decoder=True)
    assert "decoder.blocks.1.cross_attn.key.weight" in copied and "decoder.token_embedding.weight" not in copied
    assert torch.equal(ours.decoder.token_embedding.weight, token_embedding)
    assert torch.equal(ours.decoder.positional_embedding, theirs.decoder.positional_embedding[:48])
    assert torch.equal(ours.decoder.blocks[1].mlp[2].weight, theirs.decoder.blocks[1].mlp[2].weight)


def test_init_from_openai_errors(tmp_path, tok):
    ours = tiny_model(tok)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        warm_start(ours, tmp_path / "missing.pt")
    _, path = save_openai_random(tmp_path, {**OPENAI_DIMS, "n_audio_state": 32, "n_text_state": 32})
    with pytest.raises(ValueError, match="n_audio_state 32"):
        warm_start(ours, path)
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="bad.pt: neither an openai-whisper checkpoint .* nor a whisper_scratch one"):
        warm_start(ours, bad)
    (tmp_path / "notes.pt").write_text("hello")  # what the file is, as load_checkpoint says it
    with pytest.raises(ValueError, match="notes.pt: a text file .*not a checkpoint"):
        warm_start(ours, tmp_path / "notes.pt")


def test_warm_start_from_our_own_checkpoint(tmp_path, tok, mel):
    """A model pretrained with this toolkit (another vocabulary, a CTC head) starts a new run: its
    encoder only, unless the decoder is asked for; an encoder that heard other features is refused."""
    donor = tiny_model(tok, ctc=True, seed=5)
    path = tmp_path / "pretrained.pt"
    save_checkpoint(path, donor, tok)
    ours = tiny_model(tok, ctc=True, seed=6)
    ctc_before = ours.ctc_head.weight.clone()
    copied = warm_start(ours, path)
    assert copied and all(k.startswith("encoder.") for k in copied)
    with torch.no_grad():
        assert torch.equal(ours.encoder(mel), donor.encoder(mel))
    assert torch.equal(ours.ctc_head.weight, ctc_before)  # the CTC head is the vocabulary's: kept
    assert not torch.equal(ours.decoder.blocks[0].mlp[0].weight, donor.decoder.blocks[0].mlp[0].weight)
    warm_start(ours, path, transfer_decoder=True)
    assert torch.equal(ours.decoder.blocks[0].mlp[0].weight, donor.decoder.blocks[0].mlp[0].weight)
    assert not torch.equal(ours.decoder.token_embedding.weight, donor.decoder.token_embedding.weight)
    warm_start(ours, path, transfer_decoder=True, tokenizer=tok.to_dict())  # the same vocabulary: all of it
    assert all(torch.equal(v, donor.state_dict()[k]) for k, v in ours.state_dict().items())
    normed = Whisper(replace(donor.dims, feature_norm="mean"))
    with pytest.raises(ValueError, match="pretrained.pt: .*differs: feature_norm none \\(ours mean\\)"):
        warm_start(normed, path)
