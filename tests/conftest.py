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


# ---- serving: a tiny random checkpoint with the real tokenizer, and in-process servers -------------
@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """The 'tiny' preset widened to Qwen2's vocabulary (151,936 rows), random weights, saved with
    save_model, with the fixture tokenizer files copied in: a checkpoint `qwen2 serve` can load.
    The output layer is untied: a random tied model repeats the last input token (after a chat
    prompt, "\n" forever), which would make every text comparison compare newlines."""
    import shutil

    from qwen2.checkpoint import save_model
    from qwen2.config import ModelConfig
    from qwen2.model import build_model

    path = tmp_path_factory.mktemp("tiny-chat")
    save_model(build_model(ModelConfig.preset("tiny").replace(vocab_size=151936, tie_word_embeddings=False), seed=0), path)
    for f in tokenizer_dir.iterdir():
        if f.suffix in (".json", ".txt", ".tiktoken"):
            shutil.copy(f, path / f.name)
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
