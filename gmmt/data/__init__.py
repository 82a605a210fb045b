"""Data: distribution samplers and the batched random-GMM set generator."""

from gmmt.data.batch import GMMBatch
from gmmt.data.gmm import GMMSampler, derive_seed, sample_gmm_batch, validation_bank

__all__ = ["GMMBatch", "GMMSampler", "derive_seed", "sample_gmm_batch", "validation_bank"]
