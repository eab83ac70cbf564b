"""Shared pytest fixtures for the rbprop test suite.

Markers (``gpu``, ``slow``) are declared in ``pyproject.toml``; nothing is
registered here.
"""

import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded generator, so that every test draws the same inputs on every run."""
    return np.random.default_rng(0)
