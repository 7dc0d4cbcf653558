"""Fixtures shared by the engine's tests."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def ckpt(tiny_path, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage or add files to."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_path, folder)
    return folder
