"""Build the model from its config."""

from torch import nn

from gmmt.config.model import ModelConfig
from gmmt.model.transformer import GMMTransformer


def build_model(config: ModelConfig, input_dim: int,
                max_components: int | None = None) -> GMMTransformer:
    """The GMM transformer for points of ``input_dim`` dimensions (``DataConfig.dim``); the
    count head, if enabled, answers K = 1..``max_components`` (``DataConfig.max_clusters``)."""
    if input_dim < 1:
        raise ValueError(f"input_dim must be >= 1, got {input_dim}")
    return GMMTransformer(config, input_dim, max_components)


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameter values (shared weights count once; buffers not at all)."""
    return sum(p.numel() for p in model.parameters())
