"""The permutation-equivariant set transformer (torch and gmmt.config.model only)."""

from gmmt.model.build import build_model, count_parameters
from gmmt.model.transformer import GMMTransformer

__all__ = ["GMMTransformer", "build_model", "count_parameters"]
