"""Test-wide settings: one torch thread (2 shared cores), no wandb network, temp run dirs."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("DEVICE", None)
os.environ.pop("GMMT_CONFIG_PATH", None)

import pytest


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not see a developer's DEVICE or preset path."""
    monkeypatch.delenv("DEVICE", raising=False)
    monkeypatch.delenv("GMMT_CONFIG_PATH", raising=False)


try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a core dependency
    pass
