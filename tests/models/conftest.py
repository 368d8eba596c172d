"""Shared by the real-model tests: transformers' warnings and logging kept out of the output."""

from __future__ import annotations

import importlib.util
import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if importlib.util.find_spec("transformers") is not None:
            import transformers

            transformers.logging.set_verbosity_error()
        yield
