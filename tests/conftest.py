import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WHISPER_SCRATCH_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
REFERENCE = DATA / "reference"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        raise FileNotFoundError(f"shared data not found at {DATA}; set WHISPER_SCRATCH_SHARED")
    return DATA


@pytest.fixture(scope="session")
def mn_sentences(data_dir) -> list:
    return (data_dir / "mn_text" / "sentences.txt").read_text(encoding="utf-8").splitlines()


def wide_30s_model(n_vocab: int, seed: int = 2):
    """A tiny model with a real 30 s window (1500 positions, as the 30 s tools need) and wide
    weights: varied transcripts that end with <|endoftext|> (tests of the exports)."""
    from whisper_scratch.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(80, 1500, 64, 4, 2, n_vocab, 448, 64, 4, 2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 1.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.3)
    return model
