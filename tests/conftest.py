"""Shared fixtures: tiny real models built in-process, and a job home / cache per test session.

`make test` runs the suite in two processes (pytest-xdist); each then computes on one thread, so the two never
wait on each other's OpenMP barriers, and both share one model cache (the demo model converts once, under its lock).
"""

import gc
import os
import pathlib
import signal
import sys

import pytest

import runner  # noqa: F401  (before torch, as the `runner` command does: its OpenMP thread wait applies)

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from tiny_models import build_tiny_gpt2, build_tiny_llama_chat  # noqa: E402


def pytest_configure(config):
    # The processes the tests start compute on one thread, with or without -n: `helpers.reference_run` computes
    # on one, and a sum over two threads rounds otherwise (test_crashes' bit-for-bit rows failed without -n).
    os.environ["OMP_NUM_THREADS"] = "1"
    # Ctrl-C raises KeyboardInterrupt, as in a terminal or a notebook, also where the suite was started in the
    # background of a script (`(make test &)`: a shell without job control starts it with SIGINT ignored, which
    # Python then keeps): the tests of a stop pressed (pass 259) saw their Ctrl-C ignored there
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        import zygote  # the processes the tests start fork from one that imported torch (tests/zygote.py)

        zygote.install()


def pytest_collection_modifyitems(config, items):
    """The slow tests first (their order otherwise kept): pytest-xdist hands each worker the next test as it
    frees up, so minutes-long ones (the README's commands, the GPU check's dry run) that came last, as their
    files' names put them, ran on after the other worker had run out of work."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _collected_then_frozen():
    """Each test starts with what is alive then (torch, transformers, the models and engines of the session:
    millions of objects) out of the garbage collector's view: every full collection scanned all of it again,
    ~0.6 s a call where the benchmark's memory probe and runner's engine switch call gc.collect(), and in each
    automatic one. Collected first, so the garbage of the test before is freed; what lives on is frozen, and
    freed by reference counting as usual (only a cycle among frozen objects would stay)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session", autouse=True)
def _short_rereads():
    """A state record found empty or unreadable is read again after 0.05 and 0.2 s (a writer filling it where
    links are not supported): the tests that damage records on purpose spent ~20 s in those pauses. In this
    process only (each pause still happens, as tests that fill a record during one expect); the worker
    processes the tests start keep runner's own."""
    from runner import jobdir

    real = jobdir.REREAD_PAUSES
    jobdir.REREAD_PAUSES = (0.001, 0.004)
    yield
    jobdir.REREAD_PAUSES = real


@pytest.fixture(autouse=True)
def runner_home(tmp_path, monkeypatch):
    """Every test gets its own job home, so nothing lands in ./jobs."""
    home = tmp_path / "home"
    monkeypatch.setenv("RUNNER_HOME", str(home))
    return home


@pytest.fixture(scope="session", autouse=True)
def runner_cache(tmp_path_factory):
    """One model cache for the session (the demo model converts once); RUNNER_TEST_CACHE reuses one across runs.
    Under xdist the folder above each worker's base is shared by all of them."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent / "cache" if os.environ.get("PYTEST_XDIST_WORKER") else base / "cache"
    path = os.environ.get("RUNNER_TEST_CACHE") or str(shared)
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    old = os.environ.get("RUNNER_CACHE")
    os.environ["RUNNER_CACHE"] = path
    yield pathlib.Path(path)
    if old is None:
        os.environ.pop("RUNNER_CACHE", None)
    else:
        os.environ["RUNNER_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """A 2-layer GPT-2 with a byte-level BPE tokenizer: no pad token, EOS id 0, no chat template."""
    return str(build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-layer Llama with a sentencepiece tokenizer (rinna-style), a pad token and a chat template."""
    return str(build_tiny_llama_chat(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def test_device():
    """Where the engine tests run: RUNNER_TEST_DEVICE (benchmarks/gpu_check.sh sets cuda), else cpu."""
    return os.environ.get("RUNNER_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session", autouse=True)
def float32_on_the_test_device(test_device):
    """On a GPU (gpu_check.sh) dtype "auto" picks bfloat16, and the engine tests compare rows within 1e-4: every
    engine a test makes without a dtype runs in float32 there, as on CPU. tests/test_dtypes.py asks for bfloat16
    and float16 itself, with their own tolerances."""
    if test_device == "cpu":
        yield
        return
    import torch

    import runner.engine as engine_module

    real = engine_module.pick_dtype
    engine_module.pick_dtype = lambda option, device: (
        torch.float32 if option == "auto" else real(option, device)
    )
    yield
    engine_module.pick_dtype = real


@pytest.fixture(scope="session")
def gpt2_engine(tiny_gpt2, test_device):
    from runner.engine import Engine
    from runner.params import EngineOptions

    return Engine(tiny_gpt2, EngineOptions(device=test_device))


@pytest.fixture(scope="session")
def llama_engine(tiny_llama, test_device):
    from runner.engine import Engine
    from runner.params import EngineOptions

    return Engine(tiny_llama, EngineOptions(device=test_device))
