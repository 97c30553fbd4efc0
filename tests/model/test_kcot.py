"""KCOT: the batched Sinkhorn solver against POT and against the reference rule's definition; each image's
plan independent of its batch mates; cost, marginals and the teacher term against their formulas."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from ramtag.model.config import KcotConfig, RamConfig
from ramtag.model.kcot import (
    STOP_RULES,
    STOP_SCOPES,
    kcot_cost,
    mask_teacher_distribution,
    region_marginal,
    sinkhorn,
    teacher_distribution,
    uniform_label_marginal,
)

LOGIT_SCALE = 100.0


def kcot_problem(batch: int, regions: int, labels: int, seed: int, dtype=torch.float32):
    """A KCOT-shaped problem: cost and region marginal from random unit-vector similarities."""
    gen = torch.Generator().manual_seed(seed)
    regions_f = torch.nn.functional.normalize(
        torch.randn(batch, regions, 32, generator=gen, dtype=torch.float64), dim=-1
    )
    labels_f = torch.nn.functional.normalize(torch.randn(labels, 32, generator=gen, dtype=torch.float64), dim=-1)
    similarity = (regions_f @ labels_f.t()).to(dtype)
    source = region_marginal(similarity)
    target = uniform_label_marginal(similarity)
    return source, target, kcot_cost(similarity, LOGIT_SCALE), similarity


def random_problem(batch: int, regions: int, labels: int, seed: int, dtype=torch.float64):
    """Random costs in [0, 1) and a non-uniform source marginal."""
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(batch, regions, labels, generator=gen, dtype=dtype)
    source = torch.softmax(torch.randn(batch, regions, generator=gen, dtype=dtype) * 2, dim=-1)
    target = torch.softmax(torch.randn(batch, labels, generator=gen, dtype=dtype), dim=-1)
    return source, target, cost


def reference_rule_loop(source, target, cost, reg, max_iter, tol):
    """The reference stopping rule written from its definition, in the plain domain.

    K = exp(-C/reg); r = a / (K c); c = b / (Kᵀ r); stop when mean |r - r_prev| < tol for every image;
    T = diag(r) K diag(c). Returns (plan, iterations).
    """
    kernel = torch.exp(-cost / reg)
    row = torch.ones_like(source)
    col = torch.ones_like(target)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        previous = row
        row = source / torch.einsum("bij,bj->bi", kernel, col)
        col = target / torch.einsum("bij,bi->bj", kernel, row)
        if bool(((row - previous).abs().mean(dim=1) < tol).all()):
            break
    return row[:, :, None] * kernel * col[:, None, :], iterations


def reference_rule_alone(source, target, cost, reg, max_iter, tol):
    """The reference rule applied to each image alone (a batch of one): (plans stacked, iterations per image)."""
    solved = [
        reference_rule_loop(source[i : i + 1], target[i : i + 1], cost[i : i + 1], reg, max_iter, tol)
        for i in range(cost.shape[0])
    ]
    return torch.cat([plan for plan, _ in solved]), [iterations for _, iterations in solved]


def reference_rule_expected(source, target, cost, reg, max_iter, tol, stop_scope):
    """What each stopping scope must reproduce: the rule over the whole batch, or over each image alone."""
    if stop_scope == "batch":
        plan, iterations = reference_rule_loop(source, target, cost, reg, max_iter, tol)
        return plan, [iterations] * cost.shape[0]
    return reference_rule_alone(source, target, cost, reg, max_iter, tol)


def mixed_domain_problem(batch: int, seed: int, dtype=torch.float64):
    """KCOT problems whose cost contrasts differ per image: at reg 0.1 the scaled costs span from about 3 to
    about 45, so some images need the log domain (span over 30) and the others do not."""
    source, target, cost, _ = kcot_problem(batch=batch, regions=49, labels=10, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1000)
    contrast = 0.3 + 4.2 * torch.rand(batch, generator=gen, dtype=dtype)
    return source, target, cost * contrast[:, None, None]


# -- Sinkhorn, `marginal` rule, against POT --------------------------------------------------------------


@pytest.mark.parametrize("reg, log_domain", [(0.1, False), (0.5, False), (0.02, True)])
def test_marginal_rule_matches_pot(reg, log_domain):
    source, target, cost = random_problem(batch=3, regions=16, labels=6, seed=1)
    result = sinkhorn(source, target, cost, reg, max_iter=100_000, tol=1e-12, stop="marginal")
    assert result.log_domain is log_domain
    assert result.plan.dtype == torch.float64
    for i in range(cost.shape[0]):
        expected = ot.sinkhorn(
            source[i].numpy(), target[i].numpy(), cost[i].numpy(), reg, numItermax=100_000, stopThr=1e-14
        )
        np.testing.assert_allclose(result.plan[i].numpy(), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.plan.sum(dim=2).numpy(), source.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.plan.sum(dim=1).numpy(), target.numpy(), rtol=0, atol=1e-6)


def test_marginal_rule_stops_when_row_sums_hold():
    source, target, cost = random_problem(batch=2, regions=10, labels=5, seed=2)
    loose = sinkhorn(source, target, cost, 0.1, max_iter=10_000, tol=1e-3, stop="marginal")
    tight = sinkhorn(source, target, cost, 0.1, max_iter=10_000, tol=1e-10, stop="marginal")
    assert loose.iterations < tight.iterations < 10_000
    assert float((loose.plan.sum(dim=2) - source).abs().amax()) < 1e-3
    assert float((tight.plan.sum(dim=2) - source).abs().amax()) < 1e-10
    # One iteration fewer would not have satisfied the rule.
    before = sinkhorn(source, target, cost, 0.1, max_iter=tight.iterations - 1, tol=1e-10, stop="marginal")
    assert float((before.plan.sum(dim=2) - source).abs().amax()) >= 1e-10


# -- Sinkhorn, `reference` rule, against its definition ----------------------------------------------------


@pytest.mark.parametrize("stop_scope", STOP_SCOPES)
@pytest.mark.parametrize("reg, offset", [(0.1, 0.0), (0.15, 0.0), (0.15, 0.5)])
def test_reference_rule_matches_plain_loop_float32(reg, offset, stop_scope):
    # A positive offset (as the teacher's -log P term adds) scales r by exp(offset/reg): the rule measures
    # r itself, so the solver may not rescale it away when it tests convergence.
    source, target, cost, _ = kcot_problem(batch=4, regions=49, labels=10, seed=3)
    cost = cost + offset
    expected, expected_iterations = reference_rule_expected(
        source, target, cost, reg, max_iter=100, tol=1e-3, stop_scope=stop_scope
    )
    result = sinkhorn(source, target, cost, reg, max_iter=100, tol=1e-3, stop="reference", stop_scope=stop_scope)
    assert not result.log_domain
    assert 1 < min(expected_iterations) and max(expected_iterations) < 100  # the rule, not the limit, stopped
    assert result.image_iterations.tolist() == expected_iterations
    assert result.iterations == max(expected_iterations)
    torch.testing.assert_close(result.plan, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("max_iter", [1, 2, 7])
def test_reference_rule_equal_iteration_counts(max_iter):
    source, target, cost, _ = kcot_problem(batch=3, regions=16, labels=6, seed=4)
    expected, iterations = reference_rule_loop(source, target, cost, 0.1, max_iter=max_iter, tol=1e-30)
    result = sinkhorn(source, target, cost, 0.1, max_iter=max_iter, tol=1e-30, stop="reference")
    assert result.iterations == iterations == max_iter
    torch.testing.assert_close(result.plan, expected, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("reg", [0.1, 0.01])
def test_plan_ignores_a_constant_cost_offset(reg):
    # Balanced OT: adding a constant to every cost changes the scalings, not the plan. (The `reference` rule
    # measures the scalings themselves, so its stopping point moves; the marginal rule's does not.)
    source, target, cost, _ = kcot_problem(batch=2, regions=16, labels=6, seed=17, dtype=torch.float64)
    base = sinkhorn(source, target, cost, reg, max_iter=30, tol=1e-300, stop="marginal")
    shifted = sinkhorn(source, target, cost + 3.0, reg, max_iter=30, tol=1e-300, stop="marginal")
    torch.testing.assert_close(shifted.plan, base.plan, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("stop_scope", STOP_SCOPES)
def test_reference_rule_float64_is_exact(stop_scope):
    source, target, cost, _ = kcot_problem(batch=3, regions=16, labels=6, seed=5, dtype=torch.float64)
    expected, iterations = reference_rule_expected(
        source, target, cost, 0.1, max_iter=100, tol=1e-3, stop_scope=stop_scope
    )
    result = sinkhorn(source, target, cost, 0.1, stop="reference", stop_scope=stop_scope)
    assert result.image_iterations.tolist() == iterations
    torch.testing.assert_close(result.plan, expected, rtol=1e-10, atol=0)


# -- log domain ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", [0.01, 0.02])
def test_log_domain_float64_matches_plain_loop(reg):
    # cost / reg spans up to 100: the solver leaves the plain domain; float64 exp(-100) is still finite,
    # so the plain loop is a valid reference here.
    source, target, cost, _ = kcot_problem(batch=3, regions=16, labels=6, seed=6, dtype=torch.float64)
    expected, _ = reference_rule_loop(source, target, cost, reg, max_iter=40, tol=1e-300)
    assert torch.isfinite(expected).all()
    result = sinkhorn(source, target, cost, reg, max_iter=40, tol=1e-300, stop="reference")
    assert result.log_domain and result.iterations == 40
    torch.testing.assert_close(result.plan, expected, rtol=1e-9, atol=1e-300)


def test_log_domain_float32_matches_float64_plain_loop():
    source, target, cost, _ = kcot_problem(batch=3, regions=16, labels=6, seed=7, dtype=torch.float64)
    reg = 0.01
    expected, _ = reference_rule_loop(source, target, cost, reg, max_iter=40, tol=1e-300)
    result = sinkhorn(source.float(), target.float(), cost.float(), reg, max_iter=40, tol=1e-30, stop="reference")
    assert result.log_domain and result.plan.dtype == torch.float32
    assert result.iterations == 40
    # Potentials reach |log r| ~ cost/reg ~ 100 in float32 (eps 1.2e-7): relative plan error ~1e-5.
    scale = float(expected.abs().amax())
    torch.testing.assert_close(result.plan.double(), expected, rtol=1e-4, atol=1e-6 * scale)
    # The plain float32 loop underflows here: the reason the log domain exists.
    plain32, _ = reference_rule_loop(source.float(), target.float(), cost.float(), reg, max_iter=40, tol=1e-30)
    assert not torch.isfinite(plain32).all()


def test_log_domain_with_large_costs():
    source, target, cost = random_problem(batch=2, regions=12, labels=5, seed=8)
    large = cost * 50.0  # cost / reg spans 500 at reg 0.1
    expected, _ = reference_rule_loop(source, target, large, 0.1, max_iter=30, tol=1e-300)
    result = sinkhorn(source, target, large, 0.1, max_iter=30, tol=1e-300)
    assert result.log_domain
    torch.testing.assert_close(result.plan, expected, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reg", [0.01, 0.1])
@pytest.mark.parametrize("stop", ["reference", "marginal"])
def test_no_nan_or_inf_at_small_reg_and_half_precision(dtype, reg, stop):
    source, target, cost, _ = kcot_problem(batch=4, regions=49, labels=20, seed=9, dtype=dtype)
    result = sinkhorn(source, target, cost, reg, max_iter=100, tol=1e-3, stop=stop)
    plan = result.plan
    assert plan.dtype == torch.float32  # half-precision inputs are solved in float32
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    # The last update fits the label marginal exactly, so the plan carries the label marginal's mass (1 up to
    # the rounding of 1/labels in half precision).
    torch.testing.assert_close(plan.sum(dim=1), target.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(plan.sum(dim=(1, 2)), target.float().sum(dim=1), rtol=1e-4, atol=0)


# -- batching -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reg", [0.1, 0.01])
def test_batched_equals_per_image_at_fixed_iterations(reg):
    source, target, cost, _ = kcot_problem(batch=4, regions=16, labels=6, seed=10, dtype=torch.float64)
    batched = sinkhorn(source, target, cost, reg, max_iter=25, tol=1e-300)
    for i in range(4):
        single = sinkhorn(source[i : i + 1], target[i : i + 1], cost[i : i + 1], reg, max_iter=25, tol=1e-300)
        torch.testing.assert_close(batched.plan[i : i + 1], single.plan, rtol=1e-9, atol=1e-300)


def test_batch_scope_waits_for_every_image():
    # Different cost contrasts per image make them converge at different iterations.
    source, target, cost, _ = kcot_problem(batch=4, regions=16, labels=6, seed=11, dtype=torch.float64)
    cost = cost * torch.tensor([0.2, 0.5, 1.0, 2.0], dtype=torch.float64)[:, None, None]
    singles = [sinkhorn(source[i : i + 1], target[i : i + 1], cost[i : i + 1], 0.1) for i in range(4)]
    counts = [s.iterations for s in singles]
    assert len(set(counts)) > 1
    batched = sinkhorn(source, target, cost, 0.1, stop_scope="batch")
    assert batched.iterations == max(counts)
    assert batched.image_iterations.tolist() == [max(counts)] * 4
    slowest = counts.index(max(counts))
    torch.testing.assert_close(batched.plan[slowest], singles[slowest].plan[0], rtol=1e-9, atol=1e-300)
    # The images that converged earlier kept iterating, so their plans moved on from their own stop.
    fastest = counts.index(min(counts))
    assert not torch.allclose(batched.plan[fastest], singles[fastest].plan[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("stop", STOP_RULES)
def test_per_image_scope_is_the_batch_rule_applied_to_each_image_alone(stop):
    # The reference's own (batch-wide) rule on a batch of one is what each image of a per-image batch gets:
    # the same iteration count, the same solver, the same plan. (Float64: CPU BLAS rounds a product by an ulp
    # differently with the operand's alignment in memory, so plans agree to rounding, not bit for bit.)
    source, target, cost = mixed_domain_problem(batch=12, seed=21)
    batched = sinkhorn(source, target, cost, 0.1, stop=stop)
    assert len(set(batched.image_iterations.tolist())) > 1
    assert batched.image_log_domain.any() and not batched.image_log_domain.all()
    for i in range(12):
        alone = sinkhorn(source[i : i + 1], target[i : i + 1], cost[i : i + 1], 0.1, stop=stop, stop_scope="batch")
        torch.testing.assert_close(batched.plan[i], alone.plan[0], rtol=1e-12, atol=1e-300)
        assert int(batched.image_iterations[i]) == alone.iterations
        assert bool(batched.image_log_domain[i]) == alone.log_domain


@pytest.mark.parametrize("stop", STOP_RULES)
def test_plans_do_not_depend_on_batch_mates(stop):
    # Issue 14: the same image got a different plan at batch 1 and 32 (the batch stopped together and chose
    # one solver for all). 32 images, some solved in the log domain and some not, stopping at many different
    # iterations: batches of 1, 7 (the last one short) and 32, and the batch reversed, give the same iteration
    # counts and the same plans (to float64 rounding; see above).
    source, target, cost = mixed_domain_problem(batch=32, seed=22)
    whole = sinkhorn(source, target, cost, 0.1, stop=stop)
    assert len(set(whole.image_iterations.tolist())) > 5
    assert 0 < int(whole.image_log_domain.sum()) < 32
    for size in (1, 7):
        parts = [
            sinkhorn(source[i : i + size], target[i : i + size], cost[i : i + size], 0.1, stop=stop)
            for i in range(0, 32, size)
        ]
        assert torch.equal(torch.cat([part.image_iterations for part in parts]), whole.image_iterations), size
        torch.testing.assert_close(torch.cat([part.plan for part in parts]), whole.plan, rtol=1e-12, atol=1e-300)
    reverse = torch.arange(31, -1, -1)
    flipped = sinkhorn(source[reverse], target[reverse], cost[reverse], 0.1, stop=stop)
    torch.testing.assert_close(flipped.plan, whole.plan[reverse], rtol=1e-12, atol=1e-300)


def test_sinkhorn_rejects_bad_arguments():
    source, target, cost = random_problem(batch=1, regions=4, labels=3, seed=12)
    with pytest.raises(ValueError, match="stopping rule"):
        sinkhorn(source, target, cost, 0.1, stop="sometimes")
    with pytest.raises(ValueError, match="positive"):
        sinkhorn(source, target, cost, 0.0)
    with pytest.raises(ValueError, match="scope"):
        sinkhorn(source, target, cost, 0.1, stop_scope="sometimes")
    with pytest.raises(ValueError, match="iteration"):
        sinkhorn(source, target, cost, 0.1, max_iter=0)


# -- cost, marginals and the teacher term ---------------------------------------------------------------------


def test_kcot_cost_is_one_minus_label_softmax():
    _, _, _, similarity = kcot_problem(batch=2, regions=9, labels=7, seed=13, dtype=torch.float64)
    cost = kcot_cost(similarity, LOGIT_SCALE)
    scaled = torch.exp(LOGIT_SCALE * similarity)
    expected = 1.0 - scaled / scaled.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(cost, expected, rtol=0, atol=1e-12)
    assert ((cost >= 0) & (cost <= 1)).all()
    # Each region's cost row sums to (labels - 1): one unit of softmax mass is taken off.
    torch.testing.assert_close(cost.sum(dim=-1), torch.full((2, 9), 6.0, dtype=torch.float64))


def test_region_marginal_is_presence_softmax_over_regions():
    _, _, _, similarity = kcot_problem(batch=3, regions=9, labels=7, seed=14, dtype=torch.float64)
    marginal = region_marginal(similarity, temperature=0.1)
    best = similarity.max(dim=-1).values
    expected = torch.exp(best / 0.1) / torch.exp(best / 0.1).sum(dim=-1, keepdim=True)
    torch.testing.assert_close(marginal, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(marginal.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(marginal.argmax(dim=1), best.argmax(dim=1))


def test_uniform_label_marginal():
    similarity = torch.zeros(2, 5, 8)
    assert torch.equal(uniform_label_marginal(similarity), torch.full((2, 8), 1 / 8))


def test_teacher_distribution_is_region_softmax_of_sharpened_label_softmax():
    _, _, _, similarity = kcot_problem(batch=2, regions=9, labels=5, seed=15, dtype=torch.float64)
    distribution = teacher_distribution(similarity, LOGIT_SCALE, sharpness=20.0)
    per_region = torch.exp(LOGIT_SCALE * similarity)
    per_region = per_region / per_region.sum(dim=-1, keepdim=True)
    expected = torch.exp(20.0 * per_region) / torch.exp(20.0 * per_region).sum(dim=1, keepdim=True)
    torch.testing.assert_close(distribution, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(distribution.sum(dim=1), torch.ones(2, 5, dtype=torch.float64))


def test_mask_teacher_distribution_uses_the_batch_minimum():
    gen = torch.Generator().manual_seed(16)
    distribution = torch.rand(2, 4, 3, generator=gen) + 0.5
    distribution[0, 2, 1] = 0.01  # the batch minimum lies in image 0
    targets = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    masked = mask_teacher_distribution(distribution, targets)
    present = targets.bool()[:, None, :].expand_as(distribution)
    assert torch.equal(masked[present], distribution[present])
    # Image 1's absent label takes the minimum over the whole batch (from image 0), not its own.
    assert torch.all(masked[~present] == 0.01)
    assert float(distribution[1].amin()) > 0.01


def test_mask_teacher_distribution_uses_an_injected_minimum():
    distribution = torch.full((1, 3, 2), 0.5)
    targets = torch.tensor([[1.0, 0.0]])
    masked = mask_teacher_distribution(distribution, targets, batch_minimum=torch.tensor(1e-6))
    assert torch.equal(masked[0, :, 0], torch.full((3,), 0.5))
    assert torch.equal(masked[0, :, 1], torch.full((3,), 1e-6))


# -- settings --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(reg=0.0),
        dict(reg=-0.1),
        dict(max_iter=0),
        dict(tol=0.0),
        dict(tol=-1e-3),
        dict(stop="converged"),
        dict(stop_scope="never"),
    ],
)
def test_kcot_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        KcotConfig(**bad)


def test_kcot_config_defaults_are_the_reference_settings():
    config = KcotConfig()
    assert (config.reg, config.teacher_weight, config.max_iter, config.tol, config.stop) == (
        0.1,
        0.05,
        100,
        1e-3,
        "reference",
    )
    # The reference's rule, tested on each image alone: scores that do not depend on the batch.
    assert config.stop_scope == "per_image"


def test_ram_config_round_trips_and_validates():
    config = RamConfig(adapter_layers=[3, 1], kcot=dict(reg=0.2, stop="marginal"))
    assert config.adapter_layers == (1, 3)
    again = RamConfig.from_dict(config.to_dict())
    assert again == config and isinstance(again.kcot, KcotConfig)
    with pytest.raises(ValueError, match="unknown"):
        RamConfig.from_dict({**config.to_dict(), "surprise": 1})
    with pytest.raises(ValueError):
        RamConfig(template="no placeholder")
    with pytest.raises(ValueError):
        RamConfig(adapter_tokens=-1)
    with pytest.raises(ValueError):
        RamConfig(kcot=dict(reg=0))
