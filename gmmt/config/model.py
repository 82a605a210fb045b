"""Model configuration: the permutation-equivariant set transformer and what it predicts."""

from typing import Literal

from gmmt.config.fields import config_class, less_than, non_negative, positive, setting


@config_class
class AttentionConfig:
    """How points attend to each other."""

    type: Literal["softmax", "random_feature"] = setting(
        "softmax", "softmax: exact (scaled_dot_product_attention); random_feature: linear time")
    num_features: int = setting(64, "random features per head (random_feature only)", positive)
    feature_seed: int = setting(0, "seed of the fixed random features (random_feature only)",
                                non_negative)
    dropout: float = setting(0.0, "dropout on attention weights", non_negative, less_than(1))


@config_class
class RepetitionConfig:
    """Weight sharing across depth: run the L distinct blocks more than once."""

    mode: Literal["none", "cycle", "layerwise", "grouped"] = setting(
        "none", "none; cycle: 1..L repeated r times; layerwise: each block r times in a row; "
        "grouped: consecutive groups of blocks, each group repeated by its own factor")
    factor: int = setting(1, "r, the repeat count (cycle, layerwise)", positive)
    group_sizes: list[int] = setting(doc="grouped: blocks per group, summing to num_layers",
                                     factory=list)
    group_factors: list[int] = setting(doc="grouped: repeat factor of each group", factory=list)

    def _problems(self) -> list[tuple[str, str]]:
        out = []
        if self.mode in ("none", "grouped") and self.factor != 1:
            out.append(("factor", f"must be 1 when mode is {self.mode!r} (got {self.factor})"))
        if self.mode == "grouped":
            if not self.group_sizes:
                out.append(("group_sizes", "grouped repetition needs group_sizes"))
            if len(self.group_factors) != len(self.group_sizes):
                out.append(("group_factors", f"needs one factor per group "
                            f"({len(self.group_sizes)} groups, {len(self.group_factors)} factors)"))
            if any(v < 1 for v in self.group_sizes + self.group_factors):
                out.append(("group_sizes", "group sizes and factors must be >= 1"))
        elif self.group_sizes or self.group_factors:
            out.append(("group_sizes", f"only used when mode is 'grouped' (mode is {self.mode!r})"))
        return out


@config_class
class FlowConfig:
    """Flow speed s in ``x = x + s * Attn(LN x)``: fixed at 1, or predicted from the set's SNR."""

    enabled: bool = setting(False, "predict s from an SNR value (else s = 1)")
    predictor: Literal["linear", "monotonic"] = setting(
        "linear", "linear: s = a + b*snr; monotonic: s non-increasing in snr (softplus weights)")
    per_layer: bool = setting(False, "one predictor per distinct block (else one global)")
    distribution: Literal["direct", "fractional"] = setting(
        "direct", "over repeats of a block: direct = s each time; fractional = s / repeats each")
    snr_source: Literal["true", "estimated"] = setting(
        "estimated", "true: the generator's SNR (research only); estimated: a head predicts it")
    estimator_hidden_dim: int = setting(64, "width of the SNR-estimator head", positive)
    aux_loss_weight: float = setting(0.1, "weight of the SNR-estimation auxiliary loss",
                                     non_negative)
    snr_center_db: float = setting(10.0, "SNR fed to predictors is (snr_db - center) / scale")
    snr_scale_db: float = setting(10.0, "see snr_center_db", positive)


@config_class
class TransformerConfig:
    """The stack of pre-LN blocks."""

    hidden_dim: int = setting(64, "width D of every block", positive)
    num_layers: int = setting(4, "L, number of distinct blocks (weights)", positive)
    num_heads: int = setting(4, "attention heads; must divide hidden_dim", positive)
    ff_multiplier: int = setting(4, "feed-forward width = ff_multiplier * hidden_dim", positive)
    dropout: float = setting(0.0, "dropout on residual branches", non_negative, less_than(1))
    activation: Literal["gelu", "relu", "silu"] = setting("gelu", "feed-forward activation")
    norm_eps: float = setting(1e-5, "LayerNorm epsilon", positive)
    attention: AttentionConfig = setting(doc="attention kind", factory=AttentionConfig)
    repetition: RepetitionConfig = setting(doc="layer repetition", factory=RepetitionConfig)
    flow: FlowConfig = setting(doc="flow speed", factory=FlowConfig)

    def _problems(self) -> list[tuple[str, str]]:
        out = []
        if self.hidden_dim % self.num_heads:
            out.append(("num_heads", f"hidden_dim {self.hidden_dim} is not divisible by "
                        f"num_heads {self.num_heads}"))
        rep = self.repetition
        if rep.mode == "grouped" and rep.group_sizes and sum(rep.group_sizes) != self.num_layers:
            out.append(("repetition.group_sizes", f"sum to {sum(rep.group_sizes)} but num_layers "
                        f"is {self.num_layers}"))
        return out

    def block_schedule(self) -> list[int]:
        """Indices of the distinct blocks in the order they run (length = effective depth)."""
        rep = self.repetition
        blocks = list(range(self.num_layers))
        if rep.mode == "cycle":
            return blocks * rep.factor
        if rep.mode == "layerwise":
            return [b for b in blocks for _ in range(rep.factor)]
        if rep.mode == "grouped":
            schedule, start = [], 0
            for size, factor in zip(rep.group_sizes, rep.group_factors):
                schedule += list(range(start, start + size)) * factor
                start += size
            return schedule
        return blocks

    @property
    def effective_depth(self) -> int:
        """Blocks run per forward pass (num_layers times the repeats)."""
        return len(self.block_schedule())


# Below this starting bandwidth the kernel's precision 1 / h^2 overflows float32 logits.
MIN_SMOOTHING_BANDWIDTH = 1e-3


@config_class
class PredictionConfig:
    """What the decoder output means."""

    target: Literal["residual", "centre"] = setting(
        "residual", "residual: output is a correction added to the (normalised) input point")
    set_normalization: bool = setting(
        True, "subtract the set mean and divide by the set scale (undone at the output)")
    principal_axes: bool = setting(
        False, "also rotate each normalised set onto its principal axes (signs fixed by the "
        "third moment) and rotate the output back: the model sees sets in one canonical "
        "orientation and is rotation- and reflection-equivariant; needs set_normalization")
    output_smoothing: float = setting(
        0.0, "finish by averaging each point's predicted centre with the predictions near it "
        "(Gaussian kernel on the predictions); the value is the kernel's starting bandwidth in "
        "units of the set's residual scale, learned from there (0 = off; 0.1 is tested, and "
        "training widens it)", non_negative)

    def _problems(self) -> list[tuple[str, str]]:
        problems = []
        if self.principal_axes and not self.set_normalization:
            problems.append(("principal_axes", "rotates the centred set, so it needs "
                             "set_normalization = true"))
        if 0 < self.output_smoothing < MIN_SMOOTHING_BANDWIDTH:
            problems.append(("output_smoothing", f"must be 0 (off) or at least "
                             f"{MIN_SMOOTHING_BANDWIDTH} (a narrower kernel underflows), got "
                             f"{self.output_smoothing}"))
        return problems


@config_class
class CountHeadConfig:
    """A set-level head that predicts how many clusters the set holds, P(K | points) over
    K = 1..K_max (K_max is the data prior's largest K), trained by cross-entropy against the
    true K next to the centre loss."""

    enabled: bool = setting(False, "add the head (its K is the model's answer to 'how many "
                            "clusters'; without it K comes from grouping the predictions)")
    hidden_dim: int = setting(64, "width of the head's per-point and set-level layers", positive)
    loss_weight: float = setting(
        0.02, "weight of the cross-entropy next to the centre loss (the centre loss under the "
        "default noise_var normalisation ends near 0.005 on the simple prior; the "
        "cross-entropy near 0.1-0.2)", non_negative)


@config_class
class RefinementConfig:
    """Amortized + refined inference: tied-variance EM on the points, started from the model's
    clusters, returns each point's posterior-mean centre under the fitted mixture.

    Not told K, every K the count head gives at least 1 % is refined, the results are
    averaged with weights P_head(K) exp(-BIC_K / 2), and that average is blended with the
    model's own prediction by the head's largest probability (without a head: the number of
    groups in the predictions, unblended); told K, the true one. Either way the start is the
    model's predictions clustered into K groups.
    """

    enabled: bool = setting(
        False, "score the refined centres beside the raw ones in validation and gmmt.evaluate "
        "(methods 'refined' and 'refined_told_k'), and return them from gmmt.predict")
    iterations: int = setting(20, "EM iterations at most (a set stops earlier once its "
                              "log-likelihood per point gains less than 1e-6)", positive)


@config_class
class ModelConfig:
    """The GMM transformer. Its input dimension comes from ``data.dim`` (derived, not set)."""

    encoder: Literal["linear", "orthogonal"] = setting(
        "linear", "linear: independent in/out maps; orthogonal: a tied orthogonal pair")
    transformer: TransformerConfig = setting(doc="the block stack", factory=TransformerConfig)
    prediction: PredictionConfig = setting(doc="prediction target", factory=PredictionConfig)
    count_head: CountHeadConfig = setting(doc="predicting the number of clusters",
                                          factory=CountHeadConfig)
    refinement: RefinementConfig = setting(doc="amortized + refined inference",
                                           factory=RefinementConfig)

