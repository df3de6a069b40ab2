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


_terminal = None
_machine_named: list[bool] = []


def pytest_sessionstart(session):
    global _terminal
    _terminal = session.config.pluginmanager.get_plugin("terminalreporter")


def _machine() -> str:
    import platform

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    amx = "amx_tile" in open("/proc/cpuinfo").read()
    return f"{model}, {os.cpu_count()} cores, {'AMX' if amx else 'no AMX'}, load {os.getloadavg()[0]:.1f}"


def pytest_runtest_logreport(report):
    """A failure's reason printed the moment it happens, not only in the summary at the end: a CI run stopped
    at its time limit never reaches the summary, and its log must still say what failed, why and where."""
    if report.failed and _terminal is not None:
        if not _machine_named:
            _machine_named.append(True)
            _terminal.write_line(f"\nmachine: {_machine()}")
        _terminal.write_line(f"\nFAILED {report.nodeid} ({report.when}, {report.duration:.0f} s):")
        _terminal.write_line(report.longreprtext[-6000:])
