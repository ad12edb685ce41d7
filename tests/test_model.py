import json

import numpy as np
import pytest
import torch

from whisper_scratch import audio as A
from whisper_scratch.checkpoint import load_checkpoint, load_model, save_checkpoint
from whisper_scratch.model import PRESETS, ModelDimensions, Whisper, preset_dims
from whisper_scratch.tokenizer import CharTokenizer
from conftest import DATA, REFERENCE

TINY = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=4, n_audio_layer=2,
                       n_vocab=50, n_text_ctx=24, n_text_state=32, n_text_head=4, n_text_layer=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Whisper(TINY).eval()


def expected_params(state, layers, n_vocab, n_mels=80, n_text_ctx=448):
    """Independent count of openai-whisper's parameters from the architecture description."""
    d = state
    attn = 4 * d * d + 3 * d  # query.w/b, key.w, value.w/b, out.w/b
    mlp = d * 4 * d + 4 * d + 4 * d * d + d
    ln = 2 * d
    enc_block = attn + ln + mlp + ln
    dec_block = attn + ln + attn + ln + mlp + ln
    stem = n_mels * d * 3 + d + d * d * 3 + d
    return stem + layers * enc_block + ln + n_vocab * d + n_text_ctx * d + layers * dec_block + ln


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    dims = preset_dims(name, n_vocab=51865)
    with torch.device("meta"):
        m = Whisper(dims)
    state, _, layers = PRESETS[name]
    assert m.num_parameters() == expected_params(state, layers, 51865)
    if name == "tiny":
        assert m.num_parameters() == 37_184_640
    if name == "mini":
        assert (dims.n_audio_state, dims.n_audio_layer, dims.n_text_layer, dims.n_audio_head) == (256, 4, 4, 4)


@pytest.mark.parametrize("name", ["tiny", "base", "small", "medium"])
def test_state_dict_keys_and_shapes_match_openai(name):
    ref = json.loads((REFERENCE / "openai_whisper_state_dicts.json").read_text())[name]
    with torch.device("meta"):
        m = Whisper(ModelDimensions(**ref["dims"]))
    assert {k: list(v.shape) for k, v in m.state_dict().items()} == ref["state_dict"]
    assert m.num_parameters() == ref["n_params"]


def test_reproduces_openai_whisper_outputs():
    dims = json.loads((REFERENCE / "openai_whisper_random_reference.dims.json").read_text())
    ref = np.load(REFERENCE / "openai_whisper_random_reference.npz")
    m = Whisper(ModelDimensions(**dims)).eval()
    m.load_state_dict({k[2:]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith("w.")}, strict=True)
    mel, tokens = torch.from_numpy(ref["mel"]), torch.from_numpy(ref["tokens"]).long()
    with torch.no_grad():
        enc = m.encoder(mel)
        logits = m(mel, None, tokens)
        logits_with_lens = m(mel, torch.tensor([3000, 3000]), tokens)
    assert (enc - torch.from_numpy(ref["encoder_out"])).abs().max() <= 1e-5
    assert (logits - torch.from_numpy(ref["logits"])).abs().max() <= 1e-5
    assert (logits_with_lens - torch.from_numpy(ref["logits"])).abs().max() <= 1e-5


def test_init_is_real_and_encoder_listens():
    torch.manual_seed(0)
    m = Whisper(preset_dims("mini", n_vocab=60)).eval()
    for name, p in m.named_parameters():
        assert torch.isfinite(p).all(), name
        if p.ndim >= 2:
            assert p.std() > 1e-4, f"{name} looks uninitialised"
    audio = A.load_audio(DATA / "samples/jfk/jfk.wav")
    mel = A.log_mel_spectrogram(audio)[None, :, :500]
    with torch.no_grad():
        stem = torch.nn.functional.gelu(m.encoder.conv2(torch.nn.functional.gelu(m.encoder.conv1(mel))))
        pos_rms = m.encoder.positional_embedding.pow(2).mean().sqrt()
        ratio = stem.pow(2).mean().sqrt() / pos_rms
        # the conv stem's output must be of the order of the positions added to it
        assert 0.2 < ratio < 5, ratio
        other = A.log_mel_spectrogram(audio)[None, :, 500:1000]
        out_a, out_b = m.encoder(mel), m.encoder(other)
        rel = (out_a - out_b).norm() / out_a.norm()
        assert rel > 0.2, f"encoder output barely depends on the audio ({rel:.3f})"


def test_variable_length_input(model):
    mel = torch.randn(1, 80, 500)  # 5 s
    assert model.encoder(mel).shape == (1, 250, 32)
    assert model.encoder(torch.randn(1, 80, 77)).shape == (1, 39, 32)
    with pytest.raises(ValueError, match="3002 frames"):
        model.encoder(torch.randn(1, 80, 3002))


def test_padded_batch_equals_alone(model):
    torch.manual_seed(1)
    short, long = torch.randn(80, 301), torch.randn(80, 700)
    batch = torch.zeros(2, 80, 700)
    batch[0, :, :301] = short
    batch[1] = long
    lens = torch.tensor([301, 700])
    tokens = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        enc_batch = model.encoder(batch, lens)
        enc_alone = model.encoder(short[None], torch.tensor([301]))
        assert enc_alone.shape[1] == 151
        assert (enc_batch[0, :151] - enc_alone[0]).abs().max() <= 1e-5
        assert (enc_batch[1] - model.encoder(long[None])[0]).abs().max() <= 1e-5
        logits_batch = model(batch, lens, tokens)
        logits_alone = model(short[None], torch.tensor([301]), tokens[:1])
        assert (logits_batch[0] - logits_alone[0]).abs().max() <= 1e-5
        # garbage in the padded region must not matter either
        batch[0, :, 301:] = 100.0
        assert (model(batch, lens, tokens)[0] - logits_alone[0]).abs().max() <= 1e-5


def test_future_tokens_never_change_earlier_logits(model):
    mel = torch.randn(2, 80, 200)
    tokens = torch.randint(0, 50, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % 50
    with torch.no_grad():
        a, b = model(mel, None, tokens), model(mel, None, changed)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_cached_equals_uncached(model):
    torch.manual_seed(2)
    mel, lens = torch.randn(2, 80, 400), torch.tensor([400, 250])
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        xa = model.encoder(mel, lens)
        xa_lens = model.encoder.output_lengths(lens)
        full = model.decoder(tokens, xa, xa_lens)
        cache = model.new_cache()
        steps = [model.decoder(tokens[:, :4], xa, xa_lens, cache=cache)]  # a prompt of 4, then 1 by 1
        for t in range(4, 12):
            steps.append(model.decoder(tokens[:, t:t + 1], xa, xa_lens, cache=cache))
        assert cache.offset == 12
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("order", [[2, 2, 0], [0, 0, 2], [0, 1, 2], [1, 0]])
def test_cache_reorder_and_context_limit(model, order):
    """Every row moved, one row moved (only it is copied), none, and fewer rows."""
    mel = torch.randn(3, 80, 100)
    tokens = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        xa = model.encoder(mel)
        cache = model.new_cache()
        model.decoder(tokens[:, :4], xa, cache=cache)
        index = torch.tensor(order)
        cache.reorder(index)
        step = model.decoder(tokens[index, 4:5], xa[index], cache=cache)
        full = model.decoder(tokens[index], xa[index])
    assert (step[:, 0] - full[:, 4]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="25 tokens"):
        model.decoder(torch.zeros(1, 25, dtype=torch.long), xa[:1])


def test_checkpoint_round_trip_weights_only(tmp_path, model):
    tok = CharTokenizer("абв")
    path = tmp_path / "sub" / "model.pt"
    save_checkpoint(path, model, tok, step=3)
    assert not list(path.parent.glob("*.tmp"))
    raw = torch.load(path, weights_only=True)
    assert raw["dims"] == TINY.to_dict() and raw["step"] == 3
    again, tok2, ckpt = load_model(path)
    assert again.dims == TINY and tok2.alphabet == tok.alphabet
    mel, tokens = torch.randn(1, 80, 120), torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        assert torch.equal(again(mel, None, tokens), model(mel, None, tokens))


def test_bad_checkpoints_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"model_state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a whisper_scratch checkpoint"):
        load_checkpoint(other)


def test_bad_dims_are_clear():
    with pytest.raises(ValueError, match="unknown whisper size 'huge'"):
        preset_dims("huge", 100)
    with pytest.raises(ValueError, match="divisible"):
        ModelDimensions(80, 1500, 30, 4, 1, 10, 10, 32, 4, 1)
    with pytest.raises(ValueError, match="n_mels"):
        ModelDimensions(64, 1500, 32, 4, 1, 10, 10, 32, 4, 1)


def test_ctc_head_is_optional_and_saved_in_dims(tmp_path):
    dims = preset_dims("mini", n_vocab=40, ctc=True)
    m = Whisper(dims).eval()
    assert "ctc_head.weight" in m.state_dict() and dims.to_dict()["ctc"] is True
    xa = m.encoder(torch.randn(2, 80, 60))
    assert m.ctc_logits(xa).shape == (2, 30, 40)
    save_checkpoint(tmp_path / "c.pt", m, CharTokenizer("аб"))
    again, _, _ = load_model(tmp_path / "c.pt")
    assert again.dims.ctc and torch.equal(again.ctc_logits(xa), m.ctc_logits(xa))
    plain = Whisper(preset_dims("mini", n_vocab=40))
    assert plain.ctc_head is None and not any(k.startswith("ctc") for k in plain.state_dict())
    with pytest.raises(ValueError, match="no CTC head"):
        plain.ctc_logits(xa)
    # openai-style dims dicts (no "ctc" key) still load
    assert ModelDimensions.from_dict({k: v for k, v in TINY.to_dict().items() if k != "ctc"}) == TINY


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(3)
    m = Whisper(TINY).train()
    mel, lens, tokens = torch.randn(2, 80, 90), torch.tensor([90, 61]), torch.randint(0, 50, (2, 6))
    grads = []
    for enabled in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(enabled)
        m(mel, lens, tokens).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_dropout_acts_in_training_only():
    torch.manual_seed(4)
    m = Whisper(TINY)
    mel, lens, tokens = torch.randn(2, 80, 90), torch.tensor([90, 61]), torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        plain = m.eval()(mel, lens, tokens)
        assert torch.equal(m.train()(mel, lens, tokens), plain)  # the architecture has none of its own
        m.set_dropout(0.2)
        assert torch.equal(m.eval()(mel, lens, tokens), plain)  # eval: untouched
        a, b = m.train()(mel, lens, tokens), m(mel, lens, tokens)
        assert not torch.allclose(a, plain) and not torch.allclose(a, b)  # a fresh mask each call
    assert all(k in Whisper(TINY).state_dict() for k in m.state_dict())  # nothing saved with the weights
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        m.set_dropout(1.0)


@pytest.mark.parametrize("kind", ["mean", "meanvar"])
def test_feature_norm_is_per_utterance_over_its_frames_and_saved_in_dims(tmp_path, kind):
    """--feature-norm: each mel bin of each utterance is centred (and scaled) over its own frames;
    padding and the other rows of the batch change nothing; the setting travels in dims."""
    from dataclasses import replace
    from whisper_scratch.model import normalise_features
    torch.manual_seed(2)
    mel = torch.randn(2, 80, 90) * 3 + torch.linspace(-2, 2, 80)[None, :, None]  # a microphone's tilt
    lens = torch.tensor([60, 90])
    x = normalise_features(mel, lens, kind)
    real = x[0, :, :60]
    assert real.mean(-1).abs().max() < 1e-5 and x[0, :, 60:].abs().max() == 0
    if kind == "meanvar":
        sd = mel[0, :, :60].std(-1, unbiased=False)
        assert torch.allclose(real.pow(2).mean(-1).sqrt(), sd / (sd + 0.1), atol=1e-5)
    # a constant gain per bin (another microphone) is removed entirely by the mean
    assert torch.allclose(normalise_features(mel + torch.randn(1, 80, 1), lens, kind), x, atol=1e-4)
    torch.manual_seed(0)
    m = Whisper(replace(TINY, feature_norm=kind)).eval()
    batch = mel.clone()
    batch[0, :, 60:] = 50.0  # garbage in the padding
    with torch.no_grad():
        both = m.encoder(batch, lens)
        alone = m.encoder(mel[:1, :, :60], torch.tensor([60]))
    assert (both[0, :30] - alone[0]).abs().max() <= 1e-5
    save_checkpoint(tmp_path / "n.pt", m, CharTokenizer("аб"))
    again, _, _ = load_model(tmp_path / "n.pt")
    assert again.dims.feature_norm == kind
    with torch.no_grad():
        assert torch.equal(again.encoder(mel, lens), m.encoder(mel, lens))
    assert ModelDimensions.from_dict(TINY.to_dict()).feature_norm == "none"  # older checkpoints: plain log-mels
    with pytest.raises(ValueError, match="feature_norm must be one of"):
        replace(TINY, feature_norm="cmvn")
