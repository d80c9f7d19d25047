"""Fixtures shared across the test tree (keep this small)."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The built-in tiny model (FP8/FP4 as V4 releases ship it), written once per test session. Read-only."""
    from moemesh.kernels.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))
