"""Shared fixtures: small synthetic Carvana-like data sets written to disk once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from unet_deploy.synth import generate_dataset


@pytest.fixture(scope="session")
def synth_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 pairs at 192x128 (Carvana layout), seed 1."""
    root = tmp_path_factory.mktemp("synth_train")
    generate_dataset(root, n=96, width=192, height=128, seed=1)
    return root


@pytest.fixture(scope="session")
def synth_heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 pairs from other cars (seed 2): never seen in training."""
    root = tmp_path_factory.mktemp("synth_heldout")
    generate_dataset(root, n=24, width=192, height=128, seed=2)
    return root


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 pairs at 64x48 for fast checks of the training machinery."""
    root = tmp_path_factory.mktemp("synth_tiny")
    generate_dataset(root, n=12, width=64, height=48, seed=3)
    return root
