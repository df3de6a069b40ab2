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


@pytest.fixture(scope="module")
def ray_local():
    """A private local Ray cluster for one test module (never a head `make demo` left running)."""
    import ray

    os.environ["RAY_ADDRESS"] = "local"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()
