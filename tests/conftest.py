import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dense(tmp_path_factory):
    """Path of a freshly built tiny dense model (built once per test session, offline)."""
    from thinkrl.models import ensure_tiny_model

    return ensure_tiny_model("tiny-dense", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tokenizer():
    from thinkrl.models import build_tokenizer

    return build_tokenizer()
