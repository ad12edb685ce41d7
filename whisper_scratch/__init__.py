"""whisper_scratch: a Whisper speech recognizer trained from scratch. Re-exports only."""
from .audio import SAMPLE_RATE, AudioError, load_audio, log_mel_spectrogram, pad_or_trim
from .model import KVCache, ModelDimensions, Whisper, preset_dims
from .tokenizer import BPETokenizer, CharTokenizer, TextNormalizer, build_tokenizer, tokenizer_from_dict

__version__ = "0.1.0"
