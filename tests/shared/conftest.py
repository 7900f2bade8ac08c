"""Shared-package fixtures: the tiny Llama, for the cases that check a layout or a template against a real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import built_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_tiny_model(tmp_path_factory)
