"""Fixtures shared across the test tree (keep this small)."""

import os
import secrets

import pytest
import torch

# Ray 2.60 reads its auth settings once, when `ray` is first imported, and test modules import it at collection:
# token mode and this session's token must be in the environment before any of them (tests/cluster/conftest.py
# starts the session's cluster with them).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The built-in tiny model (FP8/FP4 as V4 releases ship it), written once per test session. Read-only."""
    from moemesh.kernels.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tests run tiny models: intra-op threads gain nothing, and on a shared 2-core machine their spin-waiting made
    steps 10-40x slower. (Ray/Serve role processes get OMP_NUM_THREADS=1 from the builder.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
