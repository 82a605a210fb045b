"""gmmt: transformers that denoise sets drawn from unknown Gaussian mixtures."""

from pathlib import Path
from typing import Any

__version__ = "0.1.0"


def load_model(path: str | Path, device: str = "cpu") -> Any:
    """Rebuild a trained model from a run's ``final/`` or ``best/`` folder (no unpickling)."""
    from gmmt.training.checkpoint import load_model as _load

    return _load(path, device)


__all__ = ["__version__", "load_model"]
