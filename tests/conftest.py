"""Shared test configuration.

* ``data`` tests read the real 300-W faces from ``../shared/data`` (or $ECTFAST_DATA) and skip
  cleanly where they are absent. Unit tests never need them.
* ``cuda`` tests skip unless the cuda backend is built and a GPU is present.
* ``fuzz_long`` tests (>= 10,000 hypothesis examples) run only with ``--run-long-fuzz``.
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
