"""The set transformer: symmetries, masking, repetition and flow variants, presets."""

import itertools

import pytest
import torch

from gmmt.config.model import (
    AttentionConfig,
    FlowConfig,
    ModelConfig,
    PredictionConfig,
    RepetitionConfig,
    TransformerConfig,
)
from gmmt.config.presets import PresetStore, resolve_config
from gmmt.model import GMMTransformer, build_model, count_parameters
from gmmt.model.attention import (
    SetAttention,
    orthogonal_gaussian_features,
    random_feature_attention,
    softmax_attention,
)
from gmmt.model.sets import from_principal_axes, normalize_set, to_principal_axes
from gmmt.model.smoothing import OutputSmoothing

D, H, L, DIM = 8, 2, 3, 2  # tiny sizes: hidden width, heads, distinct blocks, point dims


def tiny_config(attention: str = "softmax", encoder: str = "linear", target: str = "residual",
                repetition: RepetitionConfig | None = None, flow: FlowConfig | None = None,
                num_layers: int = L, principal_axes: bool = False,
                output_smoothing: float = 0.0) -> ModelConfig:
    return ModelConfig(
        encoder=encoder,
        transformer=TransformerConfig(
            hidden_dim=D, num_layers=num_layers, num_heads=H, ff_multiplier=2,
            attention=AttentionConfig(type=attention, num_features=16),
            repetition=repetition or RepetitionConfig(),
            flow=flow or FlowConfig()),
        prediction=PredictionConfig(target=target, principal_axes=principal_axes,
                                    output_smoothing=output_smoothing))


def randomized(model: GMMTransformer) -> GMMTransformer:
    """Float64 model whose zero-initialised parts are random, so it is not the identity."""
    torch.manual_seed(1)
    model = model.double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # smoothing: a bandwidth near 1, where it changes the output a lot (at 0.1 the
            # symmetry and padding tests would barely see it)
            if any(part in name for part in ("decoder", "gain", "slope", "smoothing")):
                p.copy_(0.3 * torch.randn_like(p))
    return model


def make(seed: int = 0, **kwargs) -> GMMTransformer:
    torch.manual_seed(seed)
    return randomized(build_model(tiny_config(**kwargs), DIM))


def sets(b: int = 2, n: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, DIM, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# Symmetries.


@pytest.mark.parametrize(("attention", "encoder", "output_smoothing"), [
    ("softmax", "linear", 0.0), ("random_feature", "linear", 0.0),
    ("softmax", "orthogonal", 0.0), ("softmax", "linear", 0.1)])
def test_permuting_points_permutes_predictions(attention: str, encoder: str,
                                               output_smoothing: float) -> None:
    model = make(attention=attention, encoder=encoder, output_smoothing=output_smoothing,
                 flow=FlowConfig(enabled=True, snr_source="estimated"))
    x = sets()
    perm = torch.randperm(x.shape[1])
    assert torch.allclose(model(x)[:, perm], model(x[:, perm]), atol=1e-10)


@pytest.mark.parametrize(
    ("encoder", "target", "principal_axes", "output_smoothing"), [
        ("linear", "residual", False, 0.0), ("linear", "centre", False, 0.0),
        ("orthogonal", "residual", False, 0.0), ("linear", "centre", False, 0.1),
        ("linear", "residual", True, 0.0), ("linear", "residual", True, 0.1)])
def test_translation_and_scale_equivariance(encoder: str, target: str, principal_axes: bool,
                                            output_smoothing: float) -> None:
    model = make(encoder=encoder, target=target, principal_axes=principal_axes,
                 output_smoothing=output_smoothing)
    x = sets()
    shift = torch.tensor([3.0, -7.5], dtype=torch.float64)
    scale = torch.tensor([0.05, 40.0], dtype=torch.float64)[:, None, None]  # one per set
    expected = model(x) * scale + shift
    assert torch.allclose(model(x * scale + shift), expected, rtol=1e-8, atol=1e-8)


def random_orthogonal(seed: int, reflect: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=g, dtype=torch.float64))
    return q * torch.tensor([-1.0, 1.0], dtype=torch.float64) if reflect else q


@pytest.mark.parametrize("reflect", [False, True])
def test_principal_axes_make_the_model_rotation_and_reflection_equivariant(
        reflect: bool) -> None:
    model = make(principal_axes=True, output_smoothing=0.1)
    x, q = sets(b=3, n=9), random_orthogonal(seed=5, reflect=reflect)
    assert torch.allclose(model(x @ q), model(x) @ q, atol=1e-9)
    # Guard: without the frame the same model is not rotation-equivariant.
    plain = make(output_smoothing=0.1)
    assert not torch.allclose(plain(x @ q), plain(x) @ q, atol=1e-3)


def test_principal_frame_gives_decreasing_uncorrelated_axes_with_positive_skew() -> None:
    x = sets(b=4, n=11, seed=3)
    mask = torch.ones(4, 11, dtype=torch.bool)
    mask[1, 6:] = False
    z, _, _ = normalize_set(x, mask)
    rotated, frame = to_principal_axes(z, mask)
    assert torch.allclose(rotated, z @ frame, atol=1e-12)
    assert torch.allclose(frame.mT @ frame, torch.eye(DIM, dtype=torch.float64).expand(4, -1, -1),
                          atol=1e-12)
    for i, m in enumerate(mask):
        along = rotated[i, m]  # [n_i, d]
        covariance = along.T @ along / len(along)
        assert abs(covariance[0, 1]) < 1e-12 and covariance[0, 0] > covariance[1, 1]
        assert (along.pow(3).mean(dim=0) > 0).all()
    # Padded points (whatever they hold) do not move the frame.
    garbage = x.clone()
    garbage[1, 6:] = 1e3
    assert torch.allclose(to_principal_axes(normalize_set(garbage, mask)[0], mask)[1], frame)


def test_principal_axes_rotations_stay_in_float32_under_autocast() -> None:
    z, _, _ = normalize_set(sets(b=3, n=9).float(), None)
    rotated, frame = to_principal_axes(z, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rotated_autocast, frame_autocast = to_principal_axes(z, None)
        back = from_principal_axes(rotated_autocast, frame_autocast)
    assert torch.equal(rotated_autocast, rotated) and torch.equal(frame_autocast, frame)
    assert back.dtype == torch.float32
    torch.testing.assert_close(back, z, atol=1e-6, rtol=0)  # bf16 would be off by ~1e-2


def test_model_is_not_trivially_equivariant() -> None:
    """Guard for the tests above: the randomised model really mixes points."""
    model = make()
    x = sets()
    moved = x.clone()
    moved[:, 0] += 1.0
    changed = (model(moved) - model(x))[:, 1:].abs().max()
    assert changed > 1e-3


# --------------------------------------------------------------------------------------------
# Padding.


@pytest.mark.parametrize(("attention", "principal_axes", "output_smoothing"), [
    ("softmax", False, 0.0), ("random_feature", False, 0.0), ("softmax", True, 0.0),
    ("softmax", False, 0.1)])
def test_padded_points_do_not_change_real_points(attention: str, principal_axes: bool,
                                                 output_smoothing: float) -> None:
    model = make(attention=attention, principal_axes=principal_axes,
                 output_smoothing=output_smoothing,
                 flow=FlowConfig(enabled=True, snr_source="estimated"))
    full, short = sets(1, 9, seed=1), sets(1, 5, seed=2)
    # Pad the short set to 9 points with garbage, including NaN and huge values.
    padded = torch.cat([short, torch.randn(1, 4, DIM, dtype=torch.float64) * 1e6], dim=1)
    padded[0, 6] = float("nan")
    empty = torch.full((1, 9, DIM), float("nan"), dtype=torch.float64)  # no real point at all
    points = torch.cat([full, padded, empty])
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0], mask[1, :5] = True, True

    out, aux = model.forward_with_aux(points, mask)
    snr = aux.snr_db
    assert torch.isfinite(out).all() and torch.isfinite(snr).all()
    ref_full, ref_snr_full = model.forward_with_aux(full)
    ref_short, ref_snr_short = model.forward_with_aux(short)
    ref_snr_full, ref_snr_short = ref_snr_full.snr_db, ref_snr_short.snr_db
    assert torch.allclose(out[0], ref_full[0], atol=1e-10)
    assert torch.allclose(out[1, :5], ref_short[0], atol=1e-10)
    assert torch.allclose(snr[:2], torch.cat([ref_snr_full, ref_snr_short]), atol=1e-10)
    assert (out[~mask] == 0).all()

    out.sum().backward()  # the empty set must not poison gradients either
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------
# Repetition and flow speed.

REPETITIONS = {
    "none": RepetitionConfig(),
    "cycle": RepetitionConfig(mode="cycle", factor=2),
    "layerwise": RepetitionConfig(mode="layerwise", factor=2),
    "grouped": RepetitionConfig(mode="grouped", group_sizes=[1, 2], group_factors=[3, 1]),
}
FLOWS = {"off": FlowConfig()} | {
    f"{p}-{'layer' if per else 'global'}-{dist}-{src}": FlowConfig(
        enabled=True, predictor=p, per_layer=per, distribution=dist, snr_source=src,
        estimator_hidden_dim=8)
    for p, per, dist, src in itertools.product(
        ["linear", "monotonic"], [True, False], ["direct", "fractional"], ["true", "estimated"])
}


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("repetition", list(REPETITIONS))
def test_every_repetition_and_flow_runs_forward_and_backward(repetition: str, flow: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(repetition=REPETITIONS[repetition], flow=FLOWS[flow]), DIM)
    model = randomized(model).train()
    x = sets().requires_grad_(False)
    snr_db = torch.tensor([5.0, 20.0], dtype=torch.float64)
    out, aux = model.forward_with_aux(x, snr_db=snr_db)
    snr_est = aux.snr_db
    assert out.shape == x.shape
    estimated = FLOWS[flow].enabled and FLOWS[flow].snr_source == "estimated"
    assert (snr_est is not None) == estimated
    loss = (out - x).square().mean() + (0.0 if snr_est is None else snr_est.square().mean())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


def test_true_snr_is_required_and_moves_the_prediction() -> None:
    model = make(flow=FlowConfig(enabled=True, snr_source="true"))
    x = sets()
    with pytest.raises(ValueError, match="snr_db"):
        model(x)
    low = model(x, snr_db=torch.tensor([0.0, 0.0], dtype=torch.float64))
    high = model(x, snr_db=torch.tensor([30.0, 30.0], dtype=torch.float64))
    assert not torch.allclose(low, high)


@pytest.mark.parametrize("per_layer", [True, False])
def test_monotonic_speed_is_positive_and_non_increasing(per_layer: bool) -> None:
    model = make(flow=FlowConfig(enabled=True, predictor="monotonic", per_layer=per_layer,
                                 snr_source="true"))
    with torch.no_grad():
        model.flow.predictor.slope.copy_(torch.randn_like(model.flow.predictor.slope) * 3)
    snr = torch.linspace(-40, 60, 50, dtype=torch.float64)
    speeds, _ = model.flow(torch.zeros(50, 3, DIM, dtype=torch.float64), None, snr)  # [50, L]
    assert (speeds > 0).all()
    assert (speeds.diff(dim=0) <= 0).all()


def test_speeds_start_at_one_and_fractional_divides_by_repeats() -> None:
    rep = RepetitionConfig(mode="grouped", group_sizes=[1, 2], group_factors=[3, 1])
    for predictor in ["linear", "monotonic"]:
        flow = FlowConfig(enabled=True, predictor=predictor, distribution="fractional",
                          snr_source="estimated")
        model = build_model(tiny_config(repetition=rep, flow=flow), DIM)
        speeds, estimate = model.flow(torch.randn(4, 6, DIM), None, None)
        # the estimator starts at snr_center_db, where every predictor gives s = 1
        assert torch.allclose(estimate, torch.full((4,), flow.snr_center_db))
        assert torch.allclose(speeds, torch.tensor([1 / 3, 1.0, 1.0]).expand(4, 3))


def test_shared_weights_have_the_parameter_count_of_num_layers_blocks() -> None:
    # Per block: 2 LayerNorms 4D, qkv 3D^2+3D, attention output D^2+D,
    # feed-forward (f = ff_multiplier) 2fD^2 + fD + D  =>  (4+2f) D^2 + (9+f) D.
    # Around the blocks: encoder dD + D, decoder Dd + d, final LayerNorm 2D.
    f = 2
    per_block = (4 + 2 * f) * D * D + (9 + f) * D
    expected = L * per_block + 2 * DIM * D + D + DIM + 2 * D
    for rep in REPETITIONS.values():
        model = build_model(tiny_config(repetition=rep), DIM)
        assert count_parameters(model) == expected
    assert build_model(tiny_config(repetition=REPETITIONS["grouped"]), DIM).schedule == [
        0, 0, 0, 1, 2]


# --------------------------------------------------------------------------------------------
# Random-feature attention.


def test_random_features_are_deterministic_given_the_seed() -> None:
    def features(seed: int) -> torch.Tensor:
        return SetAttention(D, H, AttentionConfig(type="random_feature", feature_seed=seed)
                            ).features

    assert torch.equal(features(3), features(3))
    assert not torch.equal(features(3), features(4))
    cfg = tiny_config(attention="random_feature")
    torch.manual_seed(0)
    a = build_model(cfg, DIM)
    torch.manual_seed(1)
    b = build_model(cfg, DIM)  # other weights, same features
    assert torch.equal(a.blocks[1].attn.features, b.blocks[1].attn.features)
    assert not torch.equal(a.blocks[0].attn.features, a.blocks[1].attn.features)


def test_random_features_approximate_softmax_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 20, 8, generator=g, dtype=torch.float64)
    q, k = 0.3 * q, 0.3 * k  # small logits: where the estimator's variance is small
    exact = softmax_attention(q, k, v)

    def error(m: int) -> float:
        w = orthogonal_gaussian_features(m, 8, torch.Generator().manual_seed(1)).double()
        return ((random_feature_attention(q, k, v, w) - exact).norm() / exact.norm()).item()

    # Error shrinks like 1/sqrt(m): a biased feature sampler would stall at a floor.
    assert error(64) < 0.15
    assert error(4096) < 0.02


def test_random_feature_module_matches_softmax_module_with_shared_weights() -> None:
    torch.manual_seed(0)
    exact = SetAttention(D, H, AttentionConfig()).double()
    approx = SetAttention(D, H, AttentionConfig(type="random_feature", num_features=2048)
                          ).double()
    approx.load_state_dict(exact.state_dict() | {"features": approx.features})
    x = 0.5 * torch.randn(2, 10, D, dtype=torch.float64)
    want = exact(x)
    assert ((approx(x) - want).norm() / want.norm()) < 0.05


# --------------------------------------------------------------------------------------------
# Output smoothing.


def two_clusters(n_each: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One set of two far apart clusters: points [1, 2 n, 2], labels [2 n], centres [2, 2]."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-5.0, 0.0], [5.0, 1.0]], dtype=torch.float64)
    labels = torch.arange(2).repeat_interleave(n_each)
    points = centres[labels] + 0.3 * torch.randn(2 * n_each, DIM, generator=g,
                                                 dtype=torch.float64)
    return points[None], labels, centres


def test_output_smoothing_removes_jitter_within_a_cluster() -> None:
    points, labels, centres = two_clusters()
    g = torch.Generator().manual_seed(1)
    predicted = (centres[labels] + 0.01 * torch.randn(points.shape[1], DIM, generator=g,
                                                      dtype=torch.float64))[None]
    smoothing = OutputSmoothing(initial_bandwidth=1.0).double()
    # Each cluster's predictions are replaced by their own mean; the far cluster gets no weight.
    means = torch.stack([predicted[0, labels == k].mean(0) for k in range(2)])
    assert (predicted[0] - means[labels]).abs().max() > 1e-2
    with torch.no_grad():
        torch.testing.assert_close(smoothing(points, predicted)[0], means[labels],
                                   atol=2e-4, rtol=0)


def test_output_smoothing_keeps_predictions_that_vary_smoothly() -> None:
    # Predictions spread evenly along a line (as between overlapping clusters): a symmetric
    # kernel narrower than the spread leaves the interior where it was.
    g = torch.Generator().manual_seed(2)
    along = torch.linspace(-1.0, 1.0, 201, dtype=torch.float64)
    predicted = torch.stack([along, 0.5 * along], dim=-1)[None]
    points = predicted + torch.randn(predicted.shape, generator=g, dtype=torch.float64)
    smoothing = OutputSmoothing(initial_bandwidth=0.05).double()
    with torch.no_grad():
        out = smoothing(points, predicted)
    interior = along.abs() < 0.7
    torch.testing.assert_close(out[0, interior], predicted[0, interior], atol=1e-9, rtol=0)
    assert not torch.allclose(out[0, ~interior], predicted[0, ~interior], atol=1e-4)


def test_output_smoothing_ignores_padded_points() -> None:
    points, labels, centres = two_clusters(n_each=5)
    predicted = centres[labels][None] + 0.1 * torch.randn(1, 10, DIM, dtype=torch.float64)
    # Padded predictions right next to real ones (they would be averaged in) and padded
    # points far away (they would inflate the noise scale).
    junk_predicted = predicted[:, :3] + 0.05
    junk_points = torch.full((1, 3, DIM), 1e3, dtype=torch.float64)
    mask = torch.tensor([[True] * 10 + [False] * 3])
    smoothing = OutputSmoothing(initial_bandwidth=1.0).double()
    with torch.no_grad():
        alone = smoothing(points, predicted)
        padded = smoothing(torch.cat([points, junk_points], 1),
                           torch.cat([predicted, junk_predicted], 1), mask)
    torch.testing.assert_close(padded[:, :10], alone)


def test_output_smoothing_needs_a_positive_bandwidth() -> None:
    with pytest.raises(ValueError, match="initial_bandwidth"):
        OutputSmoothing(initial_bandwidth=0.0)


def test_output_smoothing_runs_in_float32_under_autocast() -> None:
    points, labels, centres = two_clusters()
    points, centres = points.float(), centres.float()
    predicted = centres[labels][None] + 0.05 * torch.randn_like(points)
    smoothing = OutputSmoothing(initial_bandwidth=0.1)
    want = smoothing(points, predicted)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = smoothing(points, predicted)
    assert got.dtype == torch.float32 and torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# Init and presets.


@pytest.mark.parametrize("encoder", ["linear", "orthogonal"])
def test_residual_model_is_the_identity_at_init(encoder: str) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config(encoder=encoder), DIM).double()
    x = sets()
    assert torch.allclose(model(x), x, atol=1e-12)


def test_orthogonal_encoder_is_orthonormal_and_tied() -> None:
    model = build_model(tiny_config(encoder="orthogonal"), DIM).double()
    q = model.codec.basis.weight  # [D, d]
    assert torch.allclose(q.T @ q, torch.eye(DIM, dtype=torch.float64), atol=1e-6)
    # tied: only Q, the gain and the bias; no separate decoder matrix
    assert count_parameters(model.codec) == D * DIM + D + DIM


def test_bad_inputs_are_rejected() -> None:
    model = build_model(tiny_config(), DIM)
    with pytest.raises(ValueError, match="points"):
        model(torch.randn(2, 5, DIM + 1))
    with pytest.raises(ValueError, match="mask"):
        model(torch.randn(2, 5, DIM), torch.ones(2, 5))


def test_every_packaged_model_preset_builds() -> None:
    names = PresetStore().names("model")
    assert {"tiny", "small", "medium", "large"} <= set(names)
    counts = {}
    for name in names:
        config = resolve_config("quick_test", model=name).config
        model = build_model(config.model, config.data.dim, config.data.max_clusters)
        counts[name] = count_parameters(model)
        if name.startswith(("tiny", "small")):
            x = torch.randn(2, 16, config.data.dim)
            out, _ = model.forward_with_aux(x, snr_db=torch.tensor([5.0, 15.0]))
            assert out.shape == x.shape and torch.isfinite(out).all()
    assert counts["tiny"] < counts["small"] < counts["medium"] < counts["large"]
    assert counts["small_cycle"] == counts["small"]  # repetition shares weights
