"""The deployment paths a user calls, each run by the other library's own high-level code:
openai-whisper's `transcribe` (through export.openai.openai_tokenizer) and transformers'
`pipeline("automatic-speech-recognition")` (through export.hf.hf_pipeline). Each must give our
greedy transcript of the same 30 s input. A tiny model with a real 30 s window (1500 positions)
and wide weights, so that transcripts are varied and end with <|endoftext|>.
"""
import numpy as np
import pytest
import torch

from whisper_scratch.audio import load_audio
from whisper_scratch.decoding import DecodingOptions, decode
from whisper_scratch.export import export_hf, export_openai
from whisper_scratch.export.hf import hf_pipeline
from whisper_scratch.export.openai import openai_tokenizer
from whisper_scratch.tokenizer import CharTokenizer

from conftest import wide_30s_model

MN = "абвгдеёжзийклмнопрстуфхцчшщъыьэюяөү"


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(MN)


@pytest.fixture(scope="module")
def model(tok):
    return wide_30s_model(tok.vocab_size)


@pytest.fixture(scope="module")
def clips(data_dir):
    audio = load_audio(data_dir / "samples" / "jfk" / "jfk.flac")
    return [audio, audio[::-1].copy()]


def ours_on(model, tok, mel: torch.Tensor):
    return decode(model, mel[None].float(), None, tok, DecodingOptions(language="mn", max_new_tokens=224))[0]


def test_openai_transcribe_and_decode_give_our_transcript(model, tok, clips, tmp_path):
    import whisper

    theirs = whisper.load_model(str(export_openai(model, tmp_path / "model.pt")), device="cpu").eval()
    for clip in clips:
        with openai_tokenizer(tok):
            result = whisper.transcribe(theirs, clip, language="mn", without_timestamps=True, temperature=0.0,
                                        condition_on_previous_text=False, fp16=False)
            padded = whisper.log_mel_spectrogram(whisper.pad_or_trim(clip))  # decode's input: audio padded
            decoded = whisper.decode(theirs, padded, whisper.DecodingOptions(language="mn", without_timestamps=True,
                                                                            fp16=False))
        # transcribe pads the log-mel of the clip with zeros to 30 s; ours on that same input
        content = whisper.log_mel_spectrogram(clip, padding=len(padded[0]) * 160)[:, : len(clip) // 160]
        ours = ours_on(model, tok, whisper.pad_or_trim(content, 3000))
        assert len(result["segments"]) == 1 and len(set(ours.tokens)) >= 5
        assert result["segments"][0]["tokens"] == ours.tokens
        assert result["text"] == ours.text
        assert decoded.tokens == ours_on(model, tok, padded).tokens
    # outside the block openai-whisper has its own tokenizer again
    assert whisper.decoding.get_tokenizer.__module__ == "whisper.tokenizer"
    with pytest.raises(ValueError, match="'xx'"), openai_tokenizer(tok):
        whisper.transcribe(theirs, clips[0], language="xx", without_timestamps=True, fp16=False)


def test_hf_pipeline_gives_our_transcript(model, tok, clips, tmp_path):
    """Greedy (the pipeline's own default is beam search, num_beams 5)."""
    from transformers import WhisperFeatureExtractor

    folder = export_hf(model, tok, tmp_path / "hf")
    asr = hf_pipeline(folder, device="cpu")
    features = WhisperFeatureExtractor.from_pretrained(folder)
    for clip in clips:
        text = asr(clip.astype(np.float32), generate_kwargs={"language": "mn", "max_new_tokens": 200, "num_beams": 1})["text"]
        mel = torch.from_numpy(features(clip, sampling_rate=16000, return_tensors="np").input_features[0])
        ours = ours_on(model, tok, mel)
        assert len(set(ours.tokens)) >= 5 and text.strip() == ours.text
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        hf_pipeline(tmp_path)
