"""Validation configuration: the held-out bank, metrics, baselines and plots."""

from typing import Literal

from gmmt.config.fields import config_class, non_negative, positive, setting, unique_items

MetricName = Literal["mse", "mse_over_noise", "excess_over_bayes", "reachable_gap", "gap_closed",
                     "ari", "nmi", "k_accuracy", "induced_ari", "induced_nmi", "energy",
                     "wasserstein"]
BaselineName = Literal["identity", "oracle", "bayes", "bayes_unknown_k", "em_tied", "em", "em_bic",
                       "kmeans"]
# Metrics computed from other methods' averaged MSEs, and the baselines each one needs.
DERIVED_METRICS = {"excess_over_bayes": ("bayes",), "reachable_gap": ("em_tied", "bayes"),
                   "gap_closed": ("em", "oracle")}
PlotName = Literal["sample_grid", "training_curves", "error_vs_snr"]


@config_class
class EMConfig:
    """The EM baselines (spherical covariances, k-means++ initialisation) and k-means."""

    n_init: int = setting(3, "restarts of em and kmeans; the best log-likelihood (inertia) "
                          "wins", positive)
    tied_n_init: int = setting(
        10, "restarts of em_tied and em_bic: the tied model's likelihood keeps picking better "
        "fits up to about 10 (the per-component model's picks degenerate ones instead)",
        positive)
    max_iter: int = setting(100, "iterations per restart", positive)
    tol: float = setting(1e-6, "stop when the mean log-likelihood gains less", positive)


@config_class
class BayesConfig:
    """The Bayes-floor baseline: a Gibbs sampler of the generating prior given K and sigma."""

    num_chains: int = setting(4, "independent chains per set (their disagreement is the "
                              "convergence check)", positive)
    burn_in: int = setting(100, "sweeps discarded at the start of each chain", non_negative)
    num_samples: int = setting(200, "sweeps kept per chain", positive)
    tolerance: float = setting(0.005, "a set is unconverged when its chains' estimates differ "
                               "by more than this (mean squared, in units of sigma^2)", positive)


@config_class
class BreakdownConfig:
    """Split validation metrics by SNR bin, by K and by how close the closest centres are."""

    by_snr: bool = setting(False, "report metrics per SNR bin")
    snr_bins: int = setting(5, "equal-width SNR bins over the prior's range", positive)
    by_k: bool = setting(False, "report metrics per number of clusters")
    by_separation: bool = setting(
        False, "report metrics by the distance between the set's two closest centres, in noise "
        "stds (bins 0-3, 3-6, 6-12, 12+)")


@config_class
class VisualizationConfig:
    """Plots written to the run's plots/ folder (and logged to trackers)."""

    enabled: bool = setting(False, "draw plots")
    plots: list[PlotName] = setting(doc="which plots", factory=lambda: ["sample_grid"],
                                    checks=[unique_items])
    num_examples: int = setting(6, "sets shown in the sample grid", positive)
    baseline: BaselineName = setting("kmeans", "baseline drawn beside the model in the grid")


@config_class
class ValidationConfig:
    """What validation computes and how often."""

    num_sets: int = setting(256, "size of the fixed validation bank", positive)
    batch_size: int = setting(64, "sets per validation batch", positive)
    every_n_steps: int = setting(100, "validate every n optimizer steps (0: only at the end)",
                                 non_negative)
    metrics: list[MetricName] = setting(doc="metrics of the model (and baselines)",
                                        factory=lambda: ["mse", "mse_over_noise"],
                                        checks=[unique_items])
    baselines: list[BaselineName] = setting(doc="classical answers to compare with",
                                            factory=list, checks=[unique_items])
    em: EMConfig = setting(doc="EM baseline settings (em, em_tied, em_bic, kmeans)",
                           factory=EMConfig)
    bayes: BayesConfig = setting(doc="Bayes-floor baseline settings", factory=BayesConfig)
    breakdown: BreakdownConfig = setting(doc="per-SNR / per-K breakdown", factory=BreakdownConfig)
    visualization: VisualizationConfig = setting(doc="plots", factory=VisualizationConfig)

    def _problems(self) -> list[tuple[str, str]]:
        out = []
        for metric, needs in DERIVED_METRICS.items():
            missing = [b for b in needs if b not in self.baselines]
            if metric in self.metrics and missing:
                out.append(("metrics", f"{metric} needs baselines {missing} in baselines"))
        vis = self.visualization
        if vis.enabled and "sample_grid" in vis.plots and vis.baseline not in self.baselines:
            out.append(("visualization.baseline", f"{vis.baseline!r} is not in baselines "
                        f"{self.baselines}"))
        return out
