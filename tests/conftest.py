"""Shared test configuration.

* ``data`` tests read the real 300-W faces from ``../shared/data`` (or $ECTFAST_DATA) and skip
  cleanly where they are absent. Unit tests never need them.
* ``cuda`` tests skip unless the cuda backend is built and a GPU is present.
* ``fuzz_long`` tests (>= 10,000 hypothesis examples) run only with ``--run-long-fuzz``.
* A test module that sets ``TORCH_THREADS = n`` runs with n torch CPU threads (restored after).
"""
import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("ECTFAST_DATA", ROOT.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--run-long-fuzz", action="store_true", default=False,
                     help="run the >= 10,000-example fuzz tests (marker fuzz_long)")


def pytest_collection_modifyitems(config, items):
    import ectfast

    have_cuda = "cuda" in ectfast.backends()
    for item in items:
        if "fuzz_long" in item.keywords and not config.getoption("--run-long-fuzz"):
            item.add_marker(pytest.mark.skip(reason="long fuzz: pass --run-long-fuzz"))
        if "cuda" in item.keywords and not have_cuda:
            item.add_marker(pytest.mark.skip(reason="no CUDA backend/GPU here"))


@pytest.fixture(scope="module", autouse=True)
def _torch_threads(request):
    """``TORCH_THREADS`` of the test module, if it sets one: torch's CPU threads while it runs."""
    n = getattr(request.module, "TORCH_THREADS", None)
    if n is None:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_shipped_network(monkeypatch, tmp_path):
    """This installation as if it shipped no trained network (the default paths point nowhere)."""
    from ectfast.nets import engine, model

    monkeypatch.setattr(engine, "DEFAULT_PT", str(tmp_path / "missing.pt"))
    monkeypatch.setattr(engine, "DEFAULT_ONNX", str(tmp_path / "missing.onnx"))
    monkeypatch.setattr(model, "DEFAULT_WEIGHTS", str(tmp_path / "missing.pt"))


@pytest.fixture(scope="session")
def data_dir():
    """The shared data folder (300w/, faces/); skips the test where it is absent."""
    if not (DATA / "300w").is_dir():
        pytest.skip(f"real 300-W data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def pdm():
    import ectfast

    return ectfast.default_pdm()


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
