"""decoding.py on tiny random models and real clips: the search invariants (greedy = beam 1,
batched = one by one, cached = uncached), special-token suppression and length limits, the CTC
prefix scorer against brute force and torch's ctc_loss, and the temperature fallback rule."""
import itertools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from whisper_scratch.audio import load_audio, log_mel_spectrogram
from whisper_scratch.decoding import (CtcPrefixScorer, DecodingOptions, DecodingResult, FallbackOptions, GreedyStream,
                                      Inference,
                                      beam_search, compression_ratio, decode, decode_with_fallback, encode,
                                      encode_for_fallback, fall_back, fallback_stages, ctc_lengths, sample_limits,
                                      initial_tokens, length_normalised, loop_cuts, needs_fallback, sample_search,
                                      suppress_mask, length_groups, _best, _looping_rows)
from whisper_scratch.model import ModelDimensions, Whisper
from whisper_scratch.tokenizer import CharTokenizer
from conftest import DATA

TOK = CharTokenizer("abcdefghijklmnopqrstuvwxyz'")
MAX = 12  # new tokens: random models rarely stop, keep every test short


def tiny_model(seed=0, n_text_ctx=48, ctc=True, eot_scale=3.0):
    """A random model; eot's embedding is scaled so some clips end at once and others run to the
    length limit (the batch then shrinks mid-search, which the invariants must survive)."""
    torch.manual_seed(seed)
    m = Whisper(ModelDimensions(80, 1500, 32, 4, 2, TOK.vocab_size, n_text_ctx, 32, 4, 2, ctc=ctc)).eval()
    with torch.no_grad():
        m.decoder.token_embedding.weight[TOK.eot] *= eot_scale
    return m


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def clips():
    """Six real clips of 0.5-3 s (speech and digits), as a padded batch and one by one."""
    files = [DATA / "samples/speechbrain/spk1_snt1.wav", DATA / "samples/speechbrain/spk2_snt2.wav",
             DATA / "samples/deepspeech/LDC93S1_pcms16le_1_16000.wav", DATA / "fsdd/recordings/0_theo_1.wav",
             DATA / "fsdd/recordings/7_jackson_2.wav", DATA / "fsdd/recordings/3_yweweler_4.wav"]
    mels = [log_mel_spectrogram(load_audio(f)) for f in files]
    lens = torch.tensor([m.shape[-1] for m in mels])
    batch = torch.stack([F.pad(m, (0, int(lens.max()) - m.shape[-1])) for m in mels])
    return batch, lens, mels


def same(a: DecodingResult, b: DecodingResult, tol=1e-4) -> bool:
    return a.tokens == b.tokens and math.isclose(a.sum_logprob, b.sum_logprob, abs_tol=tol)


def test_options_are_validated_with_the_bad_value():
    for kw, bad in [("beam_size", 0), ("best_of", 0), ("patience", 0.0), ("temperature", -0.5),
                    ("max_new_tokens", 0), ("ctc_weight", 1.5), ("length_penalty", -1.0), ("loop_span", 2)]:
        with pytest.raises(ValueError, match=f"{kw} must .* got {bad}"):
            DecodingOptions(**{kw: bad})
    o = replace(DecodingOptions(), beam_size=5)
    assert o.beam_size == 5 and DecodingOptions().beam_size == 1
    with pytest.raises(ValueError, match="temperature_increment_on_fallback must be > 0 or none, got 0"):
        FallbackOptions(temperature_increment_on_fallback=0)
    with pytest.raises(ValueError, match="fallback_rows must be >= 1, got 0"):
        FallbackOptions(fallback_rows=0)
    assert FallbackOptions().temperatures() == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert FallbackOptions(temperature_increment_on_fallback=None).temperatures(0.3) == (0.3,)


def test_ignored_combinations_are_rejected():
    """Settings that would be silently unused are errors that quote the value (openai's
    _verify_options): beam size, CTC weight or patience when sampling; patience when greedy."""
    for kw, msg in [(dict(temperature=0.5, beam_size=4), "beam_size 4 cannot be used with sampling"),
                    (dict(temperature=0.5, ctc_weight=0.3), "ctc_weight 0.3 needs beam search"),
                    (dict(temperature=0.5, patience=2.0), "patience 2.0 only applies to beam search"),
                    (dict(patience=2.0), "patience 2.0 only applies .* greedy decoding")]:
        with pytest.raises(ValueError, match=msg):
            DecodingOptions(**kw)
    assert DecodingOptions(beam_size=4, patience=2.0).uses_beam_search
    assert DecodingOptions(ctc_weight=0.3).uses_beam_search  # joint CTC runs the beam code at beam 1
    sampled = DecodingOptions(beam_size=4, patience=2.0, ctc_weight=0.3).at_temperature(0.4)
    assert (sampled.temperature, sampled.beam_size, sampled.patience, sampled.ctc_weight) == (0.4, 1, 1.0, 0.0)


def test_greedy_equals_beam_size_1(model, clips):
    """The greedy loop and the beam search code with one beam find the same tokens and scores.
    decode() sends beam_size 1 to the greedy loop, so beam_search is called directly, set up as
    decode() sets it up for beam search."""
    batch, lens, _ = clips
    options = DecodingOptions(max_new_tokens=MAX, loop_span=0)  # the search records untrimmed tokens
    assert not options.uses_beam_search
    greedy = decode(model, batch, lens, TOK, options)
    xa, xa_lens = encode(model, batch, lens)
    prompt = torch.tensor(initial_tokens(TOK, options, 48)).repeat(len(lens), 1)
    with torch.inference_mode():
        beam1 = beam_search(Inference(model, xa, xa_lens, group=1), prompt, MAX, suppress_mask(TOK, TOK.vocab_size),
                            TOK.eot, 1)
    lengths = {len(r.tokens) for r in greedy}
    assert len(lengths) > 1, "the test model should stop early on some clips and not on others"
    for g, found in zip(greedy, beam1):
        assert len(found) == 1  # patience 1: one finished hypothesis per utterance
        b = found[0]
        assert b.tokens == g.tokens
        assert math.isclose(b.logprob, g.sum_logprob, abs_tol=1e-5) and math.isclose(b.score, g.score, abs_tol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_batched_equals_one_by_one(model, clips, beam_size):
    batch, lens, mels = clips
    options = DecodingOptions(max_new_tokens=MAX, beam_size=beam_size)
    batched = decode(model, batch, lens, TOK, options)
    for mel, b in zip(mels, batched):
        alone = decode(model, mel[None], torch.tensor([mel.shape[-1]]), TOK, options)[0]
        assert same(alone, b), (alone.text, b.text)


def test_continuous_batching_equals_decoding_alone(model, clips):
    """GreedyStream: utterances join the running batch at different steps (several at once, in
    batches padded to their longest) and leave it when they end; each gets what decoding it
    alone gives, and the batch shrinks as rows end (the model stops some clips at once)."""
    batch, lens, mels = clips
    options = DecodingOptions(max_new_tokens=MAX)
    alone = [decode(model, m[None], torch.tensor([m.shape[-1]]), TOK, options)[0] for m in mels]
    stream = GreedyStream(model, TOK, options)
    arrivals = {0: [3], 2: [0, 5], 3: [1], 7: [2, 4]}  # step -> utterances that join before it
    got, sizes = {}, []
    for step in range(60):
        if step in arrivals:
            idx = torch.tensor(arrivals[step])
            T = int(lens[idx].max())
            xa, xa_lens = encode(model, batch[idx, :, :T], lens[idx])
            got.update(stream.add(xa, xa_lens, arrivals[step]))
        sizes.append(len(stream))
        got.update(stream.step())
        if not len(stream) and step > max(arrivals):
            break
    assert sorted(got) == list(range(len(mels)))
    for i, a in enumerate(alone):
        assert same(a, got[i]), (i, a.text, got[i].text)
    lengths = [len(a.tokens) for a in alone]
    assert min(lengths) < max(lengths), f"rows should end at different steps, got lengths {lengths}"
    assert max(sizes) > 2 and len(stream) == 0, sizes
    assert any(b < a for a, b in zip(sizes, sizes[1:])), f"the batch should shrink as rows end: {sizes}"


def test_a_bf16_stream_decodes_in_fp32_while_few_rows_run(clips):
    from whisper_scratch.checkpoint import quantize
    from whisper_scratch.decoding import FP32_DECODER_ROWS
    q = quantize(tiny_model(), "bf16", "cpu")
    batch, lens, _ = clips
    with torch.inference_mode():
        xa, xa_lens = encode(q, batch, lens)
    stream, got = GreedyStream(q, TOK, DecodingOptions(max_new_tokens=MAX)), {}
    got.update(stream.add(xa[:2], xa_lens[:2], ["a0", "a1"]))
    got.update(stream.step())
    running = len(stream)
    assert stream.decoder is q.fp32_decoder  # few rows: fp32
    idx = torch.arange(2 * FP32_DECODER_ROWS + 1) % len(lens)  # a crowd joins: bf16, the running rows' cache cast
    got.update(stream.add(xa[idx], xa_lens[idx], [f"b{i}" for i in range(len(idx))]))
    assert running + len(idx) > 2 * FP32_DECODER_ROWS and stream.decoder is q.decoder
    assert all(k.dtype == torch.bfloat16 for kv in (stream.cache.self_kv, stream.cache.cross_kv)
               for k, _ in kv.values())
    while len(stream):
        got.update(stream.step())
    assert stream.decoder is q.fp32_decoder  # every row ended: fp32 for whoever comes next
    assert sorted(got) == sorted(["a0", "a1", *(f"b{i}" for i in range(len(idx)))])


@pytest.mark.parametrize("beam_size", [1, 3])
def test_cached_equals_uncached(model, clips, beam_size):
    batch, lens, _ = clips
    options = DecodingOptions(max_new_tokens=MAX, beam_size=beam_size)
    cached = decode(model, batch[:4], lens[:4], TOK, options)
    uncached = decode(model, batch[:4], lens[:4], TOK, replace(options, use_cache=False))
    for a, b in zip(cached, uncached):
        assert same(a, b)


@pytest.mark.parametrize("beam_size,best_of,temperature", [(3, 1, 0.0), (1, 3, 0.7)])
def test_a_shared_prompt_runs_once_per_utterance(model, clips, monkeypatch, beam_size, best_of, temperature):
    """Beams and best_of samples start from one prompt: it runs once per utterance, and its keys
    and values are copied to the other rows (KVCache.repeat_rows). The results equal the prompt
    run on every row (the uncached reference re-runs the whole prefix each step)."""
    batch, lens, _ = clips
    prompt = tuple(TOK.encode("the previous window said this much"))
    options = DecodingOptions(max_new_tokens=MAX, beam_size=beam_size, best_of=best_of, temperature=temperature,
                              prompt=prompt)
    calls = []
    forward = type(model.decoder).forward
    monkeypatch.setattr(type(model.decoder), "forward",
                        lambda self, tokens, *a, **k: calls.append(tuple(tokens.shape)) or forward(self, tokens, *a, **k))
    once = decode(model, batch[:4], lens[:4], TOK, options)
    first = calls[0]
    from whisper_scratch.decoding import initial_tokens
    n_prompt = len(initial_tokens(TOK, options, model.dims.n_text_ctx))  # the prompt, cut to fit the context
    assert n_prompt > 20 and first == (4, n_prompt), first  # one row per utterance, the whole prompt
    assert calls[1][0] == 4 * max(beam_size, best_of) and calls[1][1] == 1
    calls.clear()
    every_row = decode(model, batch[:4], lens[:4], TOK, replace(options, use_cache=False))
    assert calls[0][0] == 4 * max(beam_size, best_of)
    for a, b in zip(once, every_row):
        assert same(a, b)


def test_hypotheses_sharing_audio_equal_replicated_audio(model, clips):
    """model.py: n token rows per audio row (beam search) give the logits of replicated audio,
    with and without the cache, and after KVCache.reorder(cross=False) / reorder_cross."""
    batch, lens, _ = clips
    n = 3
    with torch.inference_mode():
        xa, xa_lens = encode(model, batch[:4], lens[:4])
        rows = torch.arange(4).repeat_interleave(n)
        tokens = torch.randint(0, TOK.n_text, (4 * n, 7))
        shared = model.decoder(tokens, xa, xa_lens)
        replicated = model.decoder(tokens, xa[rows], xa_lens[rows])
        assert (shared - replicated).abs().max() <= 1e-5
        cache = model.new_cache()
        model.decoder(tokens[:, :6], xa, xa_lens, cache=cache)
        keep = torch.tensor([3, 4, 5, 9, 10, 11])  # utterances 1 and 3; and beams permuted within them
        index = keep[torch.tensor([2, 2, 0, 4, 3, 3])]
        cache.reorder(index, cross=False)
        cache.reorder_cross(torch.tensor([1, 3]))
        step = model.decoder(tokens[index, 6:], xa[[1, 3]], xa_lens[[1, 3]], cache=cache)
        full = model.decoder(tokens[index], xa[rows][index], xa_lens[rows][index])
        assert (step[:, 0] - full[:, -1]).abs().max() <= 1e-5
        with pytest.raises(ValueError, match="cannot share"):
            model.decoder(tokens[:5], xa, xa_lens)


def test_new_hypotheses_stay_in_their_parents_slots():
    from whisper_scratch.decoding import _children_in_place
    parent = torch.tensor([[0, 0, 0, 0], [2, 0, 2, 1], [3, 2, 1, 0], [1, 1, 3, 3]])
    order = _children_in_place(parent, 4)
    slot_parent = parent.gather(1, order)
    for b in range(parent.shape[0]):
        assert sorted(order[b].tolist()) == [0, 1, 2, 3], "a permutation of the hypotheses"
        for p in set(parent[b].tolist()):
            kids = [j for j in range(4) if parent[b, j] == p]
            assert order[b, p] == kids[0], "a parent's slot goes to its best child"
        kept = sum(int(slot_parent[b, s] == s) for s in range(4))
        assert kept == len(set(parent[b].tolist())), "only the childless parents' slots take copies"
    assert order[2].tolist() == [3, 2, 1, 0] and order[0].tolist() == [0, 1, 2, 3]


def test_beam_search_finds_at_least_the_greedy_score(clips):
    batch, lens, _ = clips
    m = tiny_model(seed=3, eot_scale=1.0)
    greedy = decode(m, batch[:3], lens[:3], TOK, DecodingOptions(max_new_tokens=6))
    beam = decode(m, batch[:3], lens[:3], TOK, DecodingOptions(max_new_tokens=6, beam_size=5))
    for g, b in zip(greedy, beam):  # equal lengths here (no eot), so the raw sums compare
        assert len(g.tokens) == len(b.tokens) == 6 and b.sum_logprob >= g.sum_logprob - 1e-5


def test_patience_collects_more_finished_hypotheses(model, clips):
    batch, lens, _ = clips
    xa, xa_lens = encode(model, batch[3:], lens[3:])  # the clips that end early
    K, n = 3, len(lens) - 3
    prompt = torch.tensor(initial_tokens(TOK, DecodingOptions(), 48)).repeat(n * K, 1)
    sup = suppress_mask(TOK, TOK.vocab_size)
    with torch.inference_mode():
        for patience in (1.0, 2.0):
            rows = torch.arange(n).repeat_interleave(K)
            found = beam_search(Inference(model, xa[rows], xa_lens[rows]), prompt, 30, sup, TOK.eot, K, patience)
            assert [len(f) for f in found] == [round(K * patience)] * n
            for f in found:  # every finished hypothesis is distinct
                assert len({tuple(t) for t, _, _ in f}) == len(f)


def test_length_penalty_formula():
    # the length counts <|endoftext|>: 2 text tokens + eot
    assert length_normalised(-6.0, 2, None) == -2.0
    assert math.isclose(length_normalised(-6.0, 2, 1.0), -6.0 / (8 / 6))
    assert length_normalised(-6.0, 2, 0.0) == -6.0
    assert length_normalised(-0.5, 0, None) == -0.5  # an empty transcript is not infinitely bad


def test_never_generates_special_tokens_and_respects_limits(clips):
    batch, lens, _ = clips
    m = tiny_model(seed=1, n_text_ctx=24, eot_scale=0.0)
    with torch.no_grad():  # make every special token's logit huge: the raw argmax is special
        m.decoder.token_embedding.weight[TOK.n_text + 1:] *= 200
        logits = m(batch, lens, torch.tensor([TOK.sot_sequence()] * len(lens)))[:, -1]
    assert (logits.argmax(-1) > TOK.eot).all()
    for options in (DecodingOptions(), DecodingOptions(beam_size=3), DecodingOptions(temperature=1.0, best_of=2)):
        for r in decode(m, batch, lens, TOK, options):
            assert all(0 <= t < TOK.n_text for t in r.tokens)
            assert len(r.tokens) <= 24 // 2  # default cap: n_text_ctx // 2
    # a prompt is cut to n_text_ctx // 2 - 1 tokens and the search stops at the context limit
    prompt = tuple(TOK.encode("a long previous text that does not fit"))
    tokens = initial_tokens(TOK, DecodingOptions(prompt=prompt), 24)
    assert tokens[0] == TOK.startofprev and tokens[1:12] == list(prompt[-11:]) and tokens[12:] == list(TOK.sot_sequence())
    r = decode(m, batch[:1], lens[:1], TOK, DecodingOptions(prompt=prompt, max_new_tokens=100))[0]
    assert len(r.tokens) <= 24 - len(tokens)
    with pytest.raises(ValueError, match="text tokens"):
        initial_tokens(TOK, DecodingOptions(prompt=(TOK.sot,)), 24)


def test_decode_does_not_touch_train_mode(model, clips):
    batch, lens, _ = clips
    model.train()
    try:
        a = decode(model, batch[:2], lens[:2], TOK, DecodingOptions(max_new_tokens=MAX))
        assert model.training
    finally:
        model.eval()
    b = decode(model, batch[:2], lens[:2], TOK, DecodingOptions(max_new_tokens=MAX))
    assert all(same(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="mel must be"):
        decode(model, batch[0], lens[:1], TOK)


# -- CTC ---------------------------------------------------------------------------------------

def collapse(path, blank):
    out = [k for k, _ in itertools.groupby(path)]
    return tuple(k for k in out if k != blank)


def test_ctc_prefix_scores_match_brute_force():
    torch.manual_seed(0)
    T, V, blank, eot = 5, 4, 3, 2
    lp = F.log_softmax(torch.randn(1, T, V), -1)
    paths = {}
    for path in itertools.product(range(V), repeat=T):
        seq = collapse(path, blank)
        paths[seq] = paths.get(seq, 0.0) + math.exp(sum(lp[0, t, k].item() for t, k in enumerate(path)))
    scorer = CtcPrefixScorer(lp, torch.tensor([T]), blank, eot)
    prefix = ()
    for label in (0, 1, 1):
        psi, r = scorer.score(torch.tensor([[0, 1, eot]]))
        for j, c in enumerate((0, 1)):
            want = sum(p for s, p in paths.items() if s[:len(prefix) + 1] == prefix + (c,))
            assert math.isclose(psi[0, j].exp().item(), want, rel_tol=1e-4)
        assert math.isclose(psi[0, 2].exp().item(), paths.get(prefix, 0.0), rel_tol=1e-4, abs_tol=1e-12)
        scorer.advance(torch.tensor([0]), torch.tensor([label]), psi, r, torch.tensor([label]))
        prefix += (label,)


def test_ctc_prefix_end_score_equals_ctc_loss_with_padding():
    torch.manual_seed(1)
    T, V, blank, eot = 40, 9, 8, 7
    lp = F.log_softmax(torch.randn(2, T, V), -1)
    lens = torch.tensor([40, 23])
    target = [2, 5, 5, 1]
    scorer = CtcPrefixScorer(lp, lens, blank, eot)
    for c in target:
        psi, r = scorer.score(torch.tensor([[c, eot]] * 2))
        scorer.advance(torch.arange(2), torch.tensor([0, 0]), psi, r, torch.tensor([c, c]))
    psi, _ = scorer.score(torch.tensor([[eot]] * 2))
    want = -F.ctc_loss(lp.transpose(0, 1), torch.tensor([target] * 2), lens, torch.tensor([4, 4]),
                       blank=blank, reduction="none")
    assert torch.allclose(psi[:, 0], want, atol=1e-4)


def test_joint_ctc_beam_search(clips):
    batch, lens, _ = clips
    m = tiny_model(seed=2, eot_scale=3.0)
    plain = decode(m, batch, lens, TOK, DecodingOptions(max_new_tokens=MAX, beam_size=3))
    # the joint path (CTC scorer, pre-beam on the decoder's scores) at weight 0 is plain beam
    # search; decode() attaches no scorer at weight 0, so beam_search is given one directly. Only
    # clips whose CTC allows every prefix (MAX labels need at most 2 * MAX - 1 frames): the joint
    # path drops a hypothesis CTC finds impossible, whatever the weight.
    K, xa, xa_lens = 3, *encode(m, batch, lens)
    ok = (xa_lens >= 2 * MAX).nonzero().squeeze(1)
    assert 0 < len(ok) < len(lens)
    xa, xa_lens, rows = xa[ok], xa_lens[ok], torch.arange(len(ok)).repeat_interleave(K)
    prompt = torch.tensor(initial_tokens(TOK, DecodingOptions(), 48)).repeat(len(ok) * K, 1)
    with torch.inference_mode():
        ctc_lp = F.log_softmax(m.ctc_logits(xa).float(), dim=-1)
        found = {}
        for name, ctc in [("plain", None), ("zero", CtcPrefixScorer(ctc_lp[rows], xa_lens[rows], TOK.pad, TOK.eot))]:
            found[name] = beam_search(Inference(m, xa, xa_lens, group=K), prompt, MAX,
                                      suppress_mask(TOK, TOK.vocab_size), TOK.eot, K, ctc=ctc, ctc_weight=0.0)
    assert found["zero"] == found["plain"]  # every finished hypothesis: tokens, score and decoder sum
    best = [max(f, key=lambda c: length_normalised(c.score, len(c.tokens), None)) for f in found["zero"]]
    for c, i in zip(best, ok.tolist()):  # and decode() on the whole batch ranks them the same
        assert c.tokens == plain[i].tokens and math.isclose(c.score, plain[i].score, abs_tol=1e-4)
    half = decode(m, batch, lens, TOK, DecodingOptions(max_new_tokens=MAX, beam_size=3, ctc_weight=0.5))
    assert all(all(0 <= t < TOK.n_text for t in r.tokens) for r in half)
    assert [r.tokens for r in half] != [r.tokens for r in plain]  # the CTC head has a say
    with pytest.raises(ValueError, match="CTC head"):
        decode(tiny_model(ctc=False), batch[:1], lens[:1], TOK, DecodingOptions(beam_size=2, ctc_weight=0.3))


def test_ctc_alone_decodes_what_the_ctc_head_spells(clips):
    """A CTC head that spells one word per clip (peaky, with blanks between letters): with
    ctc_weight 1 beam search must output exactly that word, scored log P_ctc(word)."""
    batch, lens, _ = clips
    batch, lens = batch[3:], lens[3:]  # digits: 0.4-0.7 s, still padded to the longest of all six clips
    words = ["cab", "", "hid"]
    S = (int(lens.max()) + 1) // 2  # encoder frames of the longest: the stride-2 conv halves, rounding up
    xa_lens = (lens + 1) // 2
    logits = torch.zeros(len(words), S, TOK.vocab_size)
    logits[..., TOK.pad] = 6.0  # blank everywhere ...
    for i, w in enumerate(words):  # ... except one frame per letter, two frames apart
        for j, t in enumerate(TOK.encode(w)):
            logits[i, 2 + 2 * j, TOK.pad], logits[i, 2 + 2 * j, t] = 0.0, 6.0
    m = tiny_model(seed=4)
    seen = []  # encoder frames (padding included) the CTC head is asked for
    m.ctc_logits = lambda xa: seen.append(xa.shape[1]) or logits[:, : xa.shape[1]]
    out = decode(m, batch, lens, TOK, DecodingOptions(max_new_tokens=MAX, beam_size=3, ctc_weight=1.0))
    assert [r.text for r in out] == words
    lp = F.log_softmax(logits, -1).transpose(0, 1)
    for i, r in enumerate(out):
        want = -F.ctc_loss(lp[:, i:i + 1], torch.tensor([r.tokens + [0]]), xa_lens[i:i + 1],
                           torch.tensor([len(r.tokens)]), blank=TOK.pad, reduction="sum")
        assert math.isclose(r.score, want.item(), rel_tol=1e-4, abs_tol=1e-4), (r.score, want.item())
    # the hand-made head spans every real encoder frame: xa_lens are the model's own lengths
    enc_lens = encode(m, batch, lens)[1]
    assert torch.equal(enc_lens, xa_lens) and int(enc_lens.max()) == S and len(seen) == 1 and seen[0] >= S


def test_mixed_lengths_are_encoded_in_groups_each_as_alone(model):
    assert length_groups([100, 50, 90, 20, 84, 45]) == [[0, 2, 4], [1, 5], [3]]
    torch.manual_seed(0)
    lens = torch.tensor([100, 50, 90, 20, 84, 45])
    mel = torch.randn(len(lens), 80, 104) * (torch.arange(104) < lens[:, None, None])
    with torch.inference_mode():
        xa, xa_lens = encode(model, mel, lens)
        assert xa.shape[1] == 52 and xa_lens.tolist() == ((lens + 1) // 2).tolist()
        for i, n in enumerate(lens.tolist()):
            alone, _ = encode(model, mel[i:i + 1, :, :n], None)
            assert torch.allclose(xa[i, :(n + 1) // 2], alone[0], atol=1e-5)
        assert not xa[3, 10:].any()  # alone in its group: zeros past its length (every reader masks them)


# -- loops -----------------------------------------------------------------------------------

def cut(text: str, span: int = 12) -> str:
    return text[:int(loop_cuts(torch.tensor([[ord(c) for c in text]]), span)[0])]


def test_loop_cuts_keep_one_copy_of_the_first_loop():
    assert cut("үнэээсээсээсээсээсэн тэсэх") == "үнэээс"  # "ээс" five times: the shortest block
    assert cut("x тэсэн тэсэн тэсэн тэр") == "x тэсэн"  # a word three times (18 tokens)
    assert cut("ааааааааааааа") == "а" and cut("ааааааааааа") == "ааааааааааа"  # 13 in a row, not 11
    assert cut("abcabcabcabc") == "abc" and cut("abcabcabcab") == "abcabcabcab"  # needs the whole span
    assert cut("abcdefgh" * 2) == "abcdefgh" * 2  # two copies of a long block are not a loop
    assert cut("abcdefgh" * 3 + "xyz") == "abcdefgh"  # three are (24 tokens, 3 x 8)
    assert cut("the quick brown fox jumps over the lazy dog") == "the quick brown fox jumps over the lazy dog"
    assert cut("hi hahahahahahaha and then zzzzzzzzzzzzzzzz") == "hi ha"  # the first loop ends the text
    assert cut("ababababababab", span=0) == "ababababababab"  # off
    assert cut("ababababababab", span=16) == "ababababababab"
    rows = torch.tensor([[1, 2] * 8, list(range(16))])
    assert loop_cuts(rows, 12).tolist() == [2, 16] and loop_cuts(rows[:, :0], 12).tolist() == [0, 0]


def test_loop_checks_read_a_window_and_find_what_the_whole_prefix_shows():
    """The searches check every 8 tokens on the last tokens only: the first check that finds a
    loop is the first whose whole prefix holds one, whatever the loop's block and place."""
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        head = torch.randint(0, 40, (int(torch.randint(0, 150, (1,), generator=g)),), generator=g)
        block = torch.randint(0, 3 if trial % 2 else 40, (int(torch.randint(1, 33, (1,), generator=g)),), generator=g)
        seq = torch.cat([head, block.repeat(int(torch.randint(1, 6, (1,), generator=g))),
                         torch.randint(0, 40, (100,), generator=g)])[None]
        whole = [n for n in range(8, seq.shape[1] + 1, 8) if loop_cuts(seq[:, :n], 12)[0] < n]
        checked = [n for n in range(8, seq.shape[1] + 1, 8) if _looping_rows(seq[:, :n], 0, 12)]
        assert whole[:1] == checked[:1], (trial, whole[:1], checked[:1])


class Cycle:
    """A fake decoder that always prefers the next token of the cycle 1, 2, 3 and never ends."""

    def logits(self, tokens):
        out = torch.full((tokens.shape[0], TOK.vocab_size), -10.0)
        out[torch.arange(len(tokens)), tokens[:, -1] % 3 + 1] = 5.0
        return out

    def reorder(self, index, same_audio=False):
        pass


def test_ctc_lengths_count_the_greedy_path_of_real_frames():
    class Stub:
        def ctc_logits(self, xa):
            return F.one_hot(xa[..., 0].long(), 5).float()  # frame t says token xa[b, t, 0]
    blank = 4
    paths = torch.tensor([[1, 1, 4, 1, 2, 2, 4, 3], [4, 4, 0, 0, 0, 4, 4, 4]])  # a a _ a b b _ c | _ _ x x x _ _ _
    xa = paths[..., None].float()
    assert ctc_lengths(Stub(), xa, torch.tensor([8, 8]), blank).tolist() == [4, 1]
    assert ctc_lengths(Stub(), xa, torch.tensor([5, 2]), blank).tolist() == [3, 0]  # padding is not read


def test_fallback_samples_end_at_the_ctc_length_limit(model, clips, monkeypatch):
    import whisper_scratch.decoding as decoding
    batch, lens, _ = clips
    options = DecodingOptions(max_new_tokens=30, loop_span=0)
    fb = FallbackOptions(compression_ratio_threshold=None, logprob_threshold=0.0)  # every temperature runs
    xa, xa_lens, seeds = encode_for_fallback(model, batch, lens, options, fb)
    free = fall_back(model, xa, xa_lens, TOK, options, replace(fb, ctc_length_ratio=None), seeds)
    monkeypatch.setattr(decoding, "ctc_lengths", lambda *a: torch.tensor([0, 2, 4, 0, 2, 4]))
    limits = sample_limits(model, xa, xa_lens, TOK, fb).tolist()
    assert limits == [10, 13, 16, 10, 13, 16]  # ceil(1.5 n) + 10
    capped = fall_back(model, xa, xa_lens, TOK, options, fb, seeds)
    assert all(r.temperature == 1.0 for r in capped)
    assert all(len(r.tokens) <= n for r, n in zip(capped, limits))
    assert any(len(r.tokens) == n for r, n in zip(capped, limits)), "a sample should run to its limit"
    assert any(len(r.tokens) > n for r, n in zip(free, limits)), "the limit should bite on some utterance"
    assert sample_limits(model, xa, xa_lens, TOK, replace(fb, ctc_length_ratio=None)) is None
    assert sample_limits(tiny_model(ctc=False), xa, xa_lens, TOK, fb) is None


@pytest.mark.parametrize("beam_size", [1, 3])
def test_searches_end_a_loop_and_keep_one_copy(beam_size):
    suppress, n_new = suppress_mask(TOK, TOK.vocab_size), 40
    for span in (12, 0):
        options = DecodingOptions(beam_size=beam_size, loop_span=span)
        prompt = torch.tensor([[TOK.sot]]).repeat(2 * beam_size, 1)
        if beam_size == 1:
            found = sample_search(Cycle(), prompt, n_new, suppress, TOK.eot, loop_span=span)
        else:
            found = beam_search(Cycle(), prompt, n_new, suppress, TOK.eot, beam_size, loop_span=span)
        for cands in found:
            r = _best(cands, TOK, options)
            if span:  # ended at the first check after the loop was complete, cut to one copy
                assert all(len(c.tokens) == 16 for c in cands) and r.tokens == [1, 2, 3] and r.looped
            else:
                assert len(r.tokens) == n_new and r.tokens[:6] == [1, 2, 3, 1, 2, 3] and not r.looped


def test_continuous_batching_ends_loops_as_decoding_alone(model, clips):
    batch, lens, _ = clips
    options = DecodingOptions(max_new_tokens=40)  # the random model repeats a letter
    alone = decode(model, batch, lens, TOK, options)
    assert any(r.looped and len(r.tokens) < 3 for r in alone)
    stream = GreedyStream(model, TOK, options)
    xa, xa_lens = encode(model, batch, lens)
    ended = dict(stream.add(xa, xa_lens, range(len(lens))))
    while len(stream):
        ended.update(stream.step())
    assert [ended[i].tokens for i in range(len(lens))] == [r.tokens for r in alone]
    assert [ended[i].looped for i in range(len(lens))] == [r.looped for r in alone]


# -- temperature fallback ----------------------------------------------------------------------

def test_compression_ratio_and_fallback_rule():
    assert compression_ratio("") == 0.0
    assert compression_ratio("ab " * 50) > 2.4 > compression_ratio("the quick brown fox jumps over the lazy dog")
    r = DecodingResult("x", [1], -3.0, -1.5, 1.0, 0.0, -3.0)
    assert needs_fallback(r, FallbackOptions())
    assert not needs_fallback(r, FallbackOptions(logprob_threshold=-2.0))
    assert not needs_fallback(r, FallbackOptions(compression_ratio_threshold=None, logprob_threshold=None))
    assert needs_fallback(replace(r, avg_logprob=-0.1, compression_ratio=3.0), FallbackOptions())
    looped = replace(r, avg_logprob=-0.1, looped=True)  # a loop cut short compresses badly, but is one
    assert needs_fallback(looped, FallbackOptions())
    assert not needs_fallback(looped, FallbackOptions(compression_ratio_threshold=None))


def test_a_bf16_model_decodes_few_rows_with_its_fp32_decoder(clips):
    from whisper_scratch.checkpoint import quantize
    from whisper_scratch.decoding import FP32_DECODER_ROWS
    q = quantize(tiny_model(), "bf16", "cpu")
    assert q.fp32_decoder.token_embedding.weight.dtype == torch.float32
    assert q.decoder.token_embedding.weight.dtype == torch.bfloat16
    assert set(q.state_dict()) == set(tiny_model().state_dict())  # the copy is not a submodule
    batch, lens, _ = clips
    prompt = torch.tensor(initial_tokens(TOK, DecodingOptions(), q.dims.n_text_ctx))
    with torch.inference_mode():
        xa, xa_lens = encode(q, batch, lens)
        # one row: fp32 from the start, exactly the fp32 decoder on the bf16 encoder output
        one = Inference(q, xa[:1], xa_lens[:1])
        assert one.decoder is q.fp32_decoder
        assert torch.equal(one.logits(prompt[None]), q.fp32_decoder(prompt[None], xa[:1].float(), xa_lens[:1])[:, -1])
        # many rows: bf16 until finished rows leave, then fp32 on the converted cache
        idx = torch.arange(FP32_DECODER_ROWS + 4) % xa.shape[0]
        many = Inference(q, xa[idx], xa_lens[idx])
        tokens = prompt.repeat(len(idx), 1)
        assert many.decoder is q.decoder
        nxt = many.logits(tokens).argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        many.logits(tokens)
        keep = torch.tensor([0, 3])
        many.reorder(keep)
        assert many.decoder is q.fp32_decoder and many.xa.dtype == torch.float32
        tokens = torch.cat([tokens[keep], torch.tensor([[5], [6]])], 1)
        got = many.logits(tokens)
        want = q.fp32_decoder(tokens, xa[idx][keep].float(), xa_lens[idx][keep])[:, -1]  # no cache, all fp32
        assert got.dtype == torch.float32 and (got - want).abs().max() < 0.01 * want.abs().max()


def test_samples_sharing_their_audio_row_equal_samples_with_a_copy_each(clips, monkeypatch):
    from whisper_scratch.decoding import _sampled_candidates, search_setup
    model = tiny_model(eot_scale=5.0)  # some utterances end early: whole groups of rows leave mid-search
    batch, lens, _ = clips
    options, temps = DecodingOptions(max_new_tokens=MAX, best_of=3), (0.4, 0.8)
    xa, xa_lens, seeds = encode_for_fallback(model, batch, lens, options, FallbackOptions())
    kept = []
    reorder = Inference.reorder
    monkeypatch.setattr(Inference, "reorder", lambda self, index, *a: kept.append(len(index)) or reorder(self, index, *a))
    with torch.inference_mode():
        prompt, n_new, suppress = search_setup(model, TOK, options, xa.device)
        shared = _sampled_candidates(model, xa, xa_lens, TOK, options, prompt, n_new, suppress, seeds, temps)
        G = options.best_of * len(temps)
        assert kept and all(k % G == 0 and k < len(batch) * G for k in kept), kept  # whole groups left
        monkeypatch.setattr(Inference, "reorder", reorder)
        B, n = xa.shape[0], options.best_of
        rows = torch.arange(B).repeat_interleave(n).repeat(len(temps))  # temperature-major, one audio copy a row
        copies = sample_search(Inference(model, xa[rows], xa_lens[rows]), torch.tensor(prompt).repeat(len(rows), 1),
                               n_new, suppress, TOK.eot, [t for t in temps for _ in range(B * n)],
                               [hash((int(s), k, t)) & (2**63 - 1) for t in temps for s in seeds for k in range(n)],
                               group=n, loop_span=options.loop_span)
    assert len(shared) == len(copies) == B * len(temps)
    for a, b in zip(shared, copies):
        assert [c.tokens for c in a] == [c.tokens for c in b]
        assert all(math.isclose(x.logprob, y.logprob, abs_tol=1e-4) for x, y in zip(a, b))


def test_fallback_redecodes_only_failing_utterances(model, clips):
    batch, lens, mels = clips
    options = DecodingOptions(max_new_tokens=MAX)
    first = decode(model, batch, lens, TOK, options)
    # half pass, half fail; the cut lies midway between two utterances, so that float rounding
    # (batched or alone) cannot move one across it
    lps = sorted(r.avg_logprob for r in first)
    cut = (lps[len(lps) // 2 - 1] + lps[len(lps) // 2]) / 2
    fb = FallbackOptions(temperature_increment_on_fallback=0.5, compression_ratio_threshold=None, logprob_threshold=cut)
    out = decode_with_fallback(model, batch, lens, TOK, options, fb)
    for r0, r in zip(first, out):
        if r0.avg_logprob >= cut:
            assert r.temperature == 0.0 and same(r, r0)
        else:
            assert r.temperature > 0.0 and (r.avg_logprob >= cut or r.temperature == 1.0)
    # sampling depends only on the utterance: alone or batched, run after run, the same text
    again = decode_with_fallback(model, batch, lens, TOK, options, fb)
    alone = [decode_with_fallback(model, m[None], torch.tensor([m.shape[-1]]), TOK, options, fb)[0] for m in mels]
    assert [r.tokens for r in out] == [r.tokens for r in again] == [r.tokens for r in alone]
    # several temperatures in one batch (the default when few fail) or one at a time: the same
    assert any(r.temperature == 1.0 for r in out), "some utterance should need both fallback temperatures"
    one_by_one = decode_with_fallback(model, batch, lens, TOK, options, replace(fb, fallback_rows=1))
    assert [(r.tokens, r.temperature) for r in out] == [(r.tokens, r.temperature) for r in one_by_one]
    none = decode_with_fallback(model, batch, lens, TOK, options, FallbackOptions(temperature_increment_on_fallback=None))
    assert all(same(a, b) for a, b in zip(none, first))
    # stage by stage: the utterances that pass come first, the others once their fallback is done
    xa, xa_lens, seeds = encode_for_fallback(model, batch, lens, options, fb)
    stages = list(fallback_stages(model, xa, xa_lens, TOK, options, fb, seeds))
    assert sorted(i for i, _ in stages[0]) == [i for i, r in enumerate(first) if r.avg_logprob >= cut]
    assert len(stages) >= 2
    staged = dict(pair for stage in stages for pair in stage)
    assert sorted(staged) == list(range(len(out))) and [staged[i].tokens for i in range(len(out))] == \
        [r.tokens for r in out]
