"""Export to whisper.cpp's GGML file, loaded and run by whisper.cpp itself (pywhispercpp 1.4.1's
compiled whisper.cpp 1.8.2; nothing is downloaded).

The model is tiny (d 64, 2+2 layers, a 3 s encoder window of 150 positions). whisper.cpp is fed
our own log-mel (whisper_set_mel), greedy, no timestamps, flash attention off (ggml.py says why),
and must produce our greedy tokens: for a random model with wide weights (varied output) and for
one trained here for a few seconds to say a sentence.
"""
import numpy as np
import pytest
import torch

from whisper_scratch.checkpoint import save_checkpoint
from whisper_scratch.decoding import DecodingOptions, decode
from whisper_scratch.export import ggml
from whisper_scratch.export.__main__ import main as export_main
from whisper_scratch.model import ModelDimensions, Whisper
from whisper_scratch.tokenizer import CharTokenizer

pw = pytest.importorskip("_pywhispercpp")

MN = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяөү"
N_CTX = 150  # encoder positions: 300 mel frames
N_TEXT_CTX = 48  # whisper.cpp generates at most n_text_ctx / 2 - 4 = 20 tokens per window
SENTENCE = "сайн байна уу"


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(MN)


def tiny_model(tok, seed=0, wide=True) -> Whisper:
    dims = ModelDimensions(80, N_CTX, 64, 4, 2, tok.vocab_size, N_TEXT_CTX, 64, 4, 2, ctc=True)
    torch.manual_seed(seed)
    model = Whisper(dims).eval()
    if wide:
        with torch.no_grad():  # a peaked, audio-dependent output; LayerNorm biases as trained ones have
            for name, p in model.named_parameters():
                if "ln" not in name or name.endswith("bias"):
                    p.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def mel(data_dir):
    """Two real 3 s log-mel windows (JFK), the second reversed in time."""
    m = torch.from_numpy(np.load(data_dir / "reference" / "jfk_logmel80.npy"))[:, 200:200 + 2 * N_CTX]
    return torch.stack([m, m.flip(-1)]).float().contiguous()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


@pytest.fixture(scope="module")
def trained(tok, mel):
    """A default-initialised model (LayerNorm biases zero) trained for 80 steps to say SENTENCE on
    the first window and nothing on the second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two on a shared machine
    model = tiny_model(tok, seed=1, wide=False).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    prompt = list(tok.sot_sequence())
    seqs = [prompt + tok.encode(SENTENCE) + [tok.eot], prompt + [tok.eot]]
    n = max(map(len, seqs))
    tokens = torch.tensor([s + [tok.pad] * (n - len(s)) for s in seqs])
    for _ in range(80):
        logits = model(mel, None, tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[:, len(prompt) - 1:].transpose(1, 2),
                                                 tokens[:, len(prompt):], ignore_index=tok.pad)
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


def ours(model, mel, tok) -> list:
    with torch.no_grad():
        return [r.tokens for r in decode(model, mel, None, tok, DecodingOptions(max_new_tokens=40))]


def export(model, tok, tmp_path, name, ggml_type="f16"):
    ckpt = tmp_path / f"{name}.pt"
    save_checkpoint(ckpt, model, tok)
    out = tmp_path / f"{name}.bin"
    export_main(["--checkpoint", str(ckpt), "--to", "ggml", "--ggml_type", ggml_type, "--output", str(out)])
    return out


def theirs(path, mel, tok, **params) -> list:
    """whisper.cpp's greedy tokens on each of our mels, as our ids (whisper.cpp reports text
    tokens; an id without a counterpart in ours is kept as it is, negated)."""
    ctx = ggml.whisper_cpp_context(path)
    back = {v: k for k, v in ggml.ggml_ids(tok).items()}
    out = []
    for m in mel.numpy():
        seq = [back.get(t, -t) for t in ggml.whisper_cpp_tokens(ctx, ggml.whisper_cpp_params("mn", **params), mel=m)]
        out.append(seq[:-1] if seq[-1:] == [tok.eot] else seq)  # it reports <|endoftext|>, ours does not
    return out


def same_prefix(a, b) -> bool:
    """whisper.cpp stops at 20 tokens, ours at <|endoftext|> or 40."""
    return a == b[:len(a)] and len(a) == min(len(b), N_TEXT_CTX // 2 - 4)


@pytest.fixture(scope="module")
def files(model, trained, tok, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ggml")
    return {"random": export(model, tok, tmp, "random"), "trained": export(trained, tok, tmp, "trained"),
            "trained_q8": export(trained, tok, tmp, "trained_q8", "q8_0"), "f32": export(model, tok, tmp, "f32", "f32")}


def test_whisper_cpp_loads_and_reports_our_special_ids(files, tok):
    ids = ggml.ggml_ids(tok)
    for kind in ("random", "f32", "trained_q8"):
        ctx = ggml.whisper_cpp_context(files[kind])
        assert pw.whisper_n_vocab(ctx) == ggml.GGML_VOCAB and pw.whisper_is_multilingual(ctx)
        assert pw.whisper_n_audio_ctx(ctx) == N_CTX and pw.whisper_n_text_ctx(ctx) == N_TEXT_CTX
        assert pw.whisper_token_eot(ctx) == ids[tok.eot] == 50257
        assert pw.whisper_token_sot(ctx) == ids[tok.sot]
        assert pw.whisper_token_transcribe(ctx) == ids[tok.transcribe]
        assert pw.whisper_token_prev(ctx) == ids[tok.startofprev]
        assert pw.whisper_token_not(ctx) == ids[tok.no_timestamps]
        assert pw.whisper_token_lang(ctx, pw.whisper_lang_id("mn")) == ids[tok.language_ids["mn"]]
        text = [pw.whisper_token_to_str(ctx, i) for i in range(1, tok.n_text)]
        assert [t.decode() if isinstance(t, bytes) else t for t in text] == list(tok.alphabet)


def test_whisper_cpp_greedy_gives_our_tokens(files, model, trained, mel, tok):
    ref = ours(model, mel, tok)
    assert ref[0] != ref[1] and all(len(set(s)) >= 3 for s in ref), ref
    got = theirs(files["random"], mel, tok)
    assert all(same_prefix(g, r) for g, r in zip(got, ref)), (got, ref)

    ref = ours(trained, mel, tok)
    assert tok.decode(ref[0]) == SENTENCE and ref[1] == []  # it learned
    got = theirs(files["trained"], mel, tok)
    assert got == ref
    ctx = ggml.whisper_cpp_context(files["trained"])
    ggml.whisper_cpp_tokens(ctx, ggml.whisper_cpp_params("mn"), mel=mel[0].numpy())
    assert ggml.whisper_cpp_text(ctx) == SENTENCE


def test_whisper_cpp_audio_ctx_runs_our_length(files, trained, mel, tok):
    """audio_ctx = our encoder length on a longer mel: the encoder sees exactly our frames."""
    short = mel[:, :, :200]
    with torch.no_grad():
        ref = [r.tokens for r in decode(trained, short, torch.tensor([200, 200]), tok,
                                        DecodingOptions(max_new_tokens=40))]
    padded = torch.nn.functional.pad(short, (0, 100), value=-1.0)
    got = theirs(files["trained"], padded, tok, audio_ctx=100)
    assert all(same_prefix(g, r) for g, r in zip(got, ref)), (got, ref)


def test_q8_0_loads_and_mostly_agrees(files, trained, mel, tok):
    ref = ours(trained, mel, tok)
    got = theirs(files["trained_q8"], mel, tok)
    a, b = got[0], ref[0]
    assert sum(x == y for x, y in zip(a, b)) >= 0.8 * len(b), (a, b)


def test_q8_0_blocks():
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    raw = np.frombuffer(ggml.quantize_q8_0(x), dtype=[("d", "<f2"), ("qs", "i1", (32,))])
    assert len(raw) == 6 and raw.itemsize == 34
    back = raw["d"].astype(np.float32)[:, None] * raw["qs"]
    assert np.abs(back.reshape(3, 64) - x).max() <= np.abs(x).max() / 127


def test_filler_ids_are_never_emitted(files, model, trained, mel, tok):
    """Tokens whisper.cpp emits are ours; and on random decoder states every pinned id's logit
    (exported rows, exported bias) is below every real one."""
    for kind, m in (("random", model), ("trained", trained)):
        for seq in theirs(files[kind], mel, tok):
            assert all(0 <= t < tok.n_text for t in seq), seq
        emb, bias = ggml.ggml_output(m, tok, "f16")
        ids = ggml.ggml_ids(tok)
        real = [ids[i] for i in range(tok.n_text + 1)]
        pinned = sorted(set(range(tok.n_text, 50257)) | {50358, 50360, 50362})
        x = torch.randn(512, 64) * torch.rand(512, 1) * 10
        y = torch.nn.functional.layer_norm(x, (64,), m.decoder.ln.weight.detach(), bias)
        logits = y @ emb.T.half().float()  # the rows as the f16 file holds them
        assert logits[:, pinned].max(1).values.lt(logits[:, real].min(1).values).all()
        # the bias change leaves our logits as they were
        y0 = torch.nn.functional.layer_norm(x, (64,), m.decoder.ln.weight.detach(), m.decoder.ln.bias.detach())
        emb0 = m.decoder.token_embedding.weight.detach()[:tok.n_text + 1]
        assert torch.allclose(y @ emb0.T, y0 @ emb0.T, atol=1e-3)


def test_corrupt_or_newer_checkpoint_is_a_clear_error(tmp_path, model, tok, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(bad), "--to", "ggml", "--output", str(tmp_path / "x.bin")])
    assert str(bad) in str(e.value) and "Traceback" not in str(e.value)
    newer = tmp_path / "newer.pt"
    save_checkpoint(newer, model, tok)
    ckpt = torch.load(newer, weights_only=True)
    ckpt["version"] = 99
    torch.save(ckpt, newer)
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(newer), "--to", "ggml", "--output", str(tmp_path / "x.bin")])
    assert str(newer) in str(e.value) and "version 99" in str(e.value)
    assert not (tmp_path / "x.bin").exists()


def test_unsafe_pin_is_refused(tmp_path, tok):
    model = tiny_model(tok, wide=False)
    with torch.no_grad():
        model.decoder.ln.weight[3] = 0.0  # no row c / weight exists
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model, tok)
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(ckpt), "--to", "ggml", "--output", str(tmp_path / "x.bin")])
    assert "cannot pin" in str(e.value) and "min |weight| 0" in str(e.value)
    assert not (tmp_path / "x.bin").exists()


def test_layout_errors_and_options(tmp_path, tok, capsys):
    with pytest.raises(ValueError, match="no language token"):
        ggml.ggml_ids(CharTokenizer(MN, languages=("xx",)))
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", "a.pt", "--to", "ct2", "--ggml_type", "f16", "--output", str(tmp_path / "o")])
    assert "--ggml_type f16 applies to --to ggml only" in capsys.readouterr().err
    vocab = ggml.ggml_vocab(tok)
    assert len(vocab) == ggml.GGML_VOCAB and vocab[50257] == "<|endoftext|>" and " " in vocab[:tok.n_text]
