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
