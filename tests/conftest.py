import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = Path(os.environ.get("QWEN2_TOKENIZER_DIR", ROOT.parent / "shared/fixtures/qwen2-tokenizer"))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.fail(f"the Qwen2 tokenizer fixture is missing at {TOKENIZER_DIR} (set QWEN2_TOKENIZER_DIR)")
    return TOKENIZER_DIR

import sys

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_reference.py and other shared test helpers
