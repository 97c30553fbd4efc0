"""The RAM model on a tiny open_clip CLIP: gradients, frozen early layers, training-free equality with
open_clip, score and plan invariants, the vocabulary-scaled temperature, adapter tokens and deep prompts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ramtag.model.backbone import DualPathVision, UnsupportedBackbone
from ramtag.model.config import KcotConfig, RamConfig
from ramtag.model.kcot import kcot_cost, mask_teacher_distribution, region_marginal, sinkhorn
from ramtag.model.ram import RamModel, ram_loss
from tests.model_fixtures import (
    CONTEXT_LENGTH,
    IMAGE_SIZE,
    LABELS,
    LOGIT_SCALE,
    PATCH_SIZE,
    images,
    multi_hot,
    tiny_clip,
    tiny_config,
    tiny_ram,
    tokens,
)

GRID = (IMAGE_SIZE // PATCH_SIZE) ** 2


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(seed=0)


@pytest.fixture(scope="module")
def trained(clip):
    return tiny_ram(seed=0, clip=clip)


def training_step(model: RamModel, batch: int = 3):
    """One training forward (teacher term, MMC) and backward, as the training loop runs it."""
    model.train()
    label_tokens = tokens()
    features = model.encode_labels(label_tokens)
    with torch.no_grad():
        teacher_features = model.encode_labels(label_tokens, use_prompts=False)
    targets = multi_hot(batch, len(LABELS), seed=1)
    output = model(images(batch, seed=2), features, targets=targets, teacher_label_features=teacher_features)
    loss = ram_loss(output, targets)
    loss.backward()
    return output, loss


# -- gradients and frozen layers --------------------------------------------------------------------------


def test_gradients_reach_only_trainable_parameters():
    model = tiny_ram(seed=3)
    output, loss = training_step(model)
    assert torch.isfinite(loss)
    frozen = {n: p for n, p in model.named_parameters() if n.startswith("clip.")}
    trainable = model.trainable_parameters()
    assert frozen and trainable
    assert set(frozen) | set(trainable) == {n for n, _ in model.named_parameters()}
    for name, parameter in frozen.items():
        assert not parameter.requires_grad, name
        assert parameter.grad is None, name
    # Every trainable part lies on the loss's path: adapters (both layers, every tensor), adapter tokens
    # (main stream), deep prompts (text encoder), and both temperatures.
    expected_groups = {"vision.adapters.2.", "vision.adapters.3.", "vision.adapter_tokens.2", "vision.adapter_tokens.3",
                       "text.prompts.2", "text.prompts.3", "temperature", "temperature_loc"}
    for group in expected_groups:
        assert any(n.startswith(group) for n in trainable), group
    for name, parameter in trainable.items():
        assert parameter.requires_grad, name
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert float(parameter.grad.abs().sum()) > 0, name
    # The plan is a constant of the loss (no gradient through Sinkhorn).
    assert not output.plan.requires_grad


def test_train_mode_keeps_the_backbone_in_eval_mode():
    model = tiny_ram(seed=4).train()
    assert model.vision.adapters["2"].training
    assert not model.clip.training
    assert not any(m.training for m in model.clip.modules())


@pytest.mark.parametrize("adapter_layers", [(2, 3), (3,)])
def test_layers_before_the_first_adapter_build_no_graph(adapter_layers):
    model = tiny_ram(seed=5, adapter_layers=adapter_layers)
    blocks = model.clip.visual.transformer.resblocks
    seen: dict[int, list[bool]] = {i: [] for i in range(len(blocks))}

    def recorder(index):
        def hook(module, inputs, output):
            seen[index].append(output.grad_fn is not None)
        return hook

    handles = [block.ln_1.register_forward_hook(recorder(i)) for i, block in enumerate(blocks)]
    stem = []
    handles.append(model.clip.visual.ln_pre.register_forward_hook(lambda m, i, o: stem.append(o.grad_fn is not None)))
    try:
        training_step(model)
    finally:
        for handle in handles:
            handle.remove()
    # Two passes through the tower: the student's (first) and the frozen teacher's (never a graph).
    assert stem == [False, False]
    first = adapter_layers[0]
    for index in range(len(blocks)):
        expected = [index >= first, False]
        assert seen[index] == expected, index


def test_backbone_grad_trains_every_layer_of_the_dual_path():
    """The demo build trains the CLIP through ramtag's dual path; by default the frozen tower has no graph."""
    model = tiny_ram(seed=5, adapter_layers=(2, 3))
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    model.clip.visual.requires_grad_(True)  # as the build has it: the CLIP itself is trained
    blocks = model.clip.visual.transformer.resblocks
    frozen_global, frozen_regions = model.vision(images, use_adapters=False)
    (frozen_global.sum() + frozen_regions.sum()).backward()
    assert model.clip.visual.conv1.weight.grad is None
    assert all(block.attn.in_proj_weight.grad is None for block in blocks)
    global_feature, regions = model.vision(images, use_adapters=False, backbone_grad=True)
    assert torch.allclose(global_feature, frozen_global) and torch.allclose(regions, frozen_regions)
    (global_feature.sum() + regions.sum()).backward()
    assert model.clip.visual.conv1.weight.grad is not None
    assert all(block.attn.in_proj_weight.grad is not None for block in blocks)


# -- training-free mode: the main stream is open_clip's own ------------------------------------------------


@pytest.mark.parametrize("with_layers", [True, False])
def test_training_free_matches_open_clip(clip, with_layers):
    layers = dict() if with_layers else dict(adapter_layers=(), prompt_layers=())
    model = tiny_ram(seed=0, clip=clip, trained=False, **layers)
    label_tokens = tokens()
    x = images(2, seed=6)
    with torch.no_grad():
        features = model.encode_labels(label_tokens)
        torch.testing.assert_close(features, clip.encode_text(label_tokens), rtol=1e-5, atol=1e-5)
        global_feature, regions = model.vision(x, features, use_adapters=model.config.trained)
        torch.testing.assert_close(global_feature, clip.encode_image(x), rtol=1e-5, atol=1e-5)
        output = model(x, features)
        cosine = F.normalize(clip.encode_image(x), dim=-1) @ F.normalize(clip.encode_text(label_tokens), dim=-1).t()
    assert regions.shape == (2, GRID, clip.visual.proj.shape[1])
    torch.testing.assert_close(output.global_logits, cosine * LOGIT_SCALE, rtol=1e-4, atol=1e-4)


def value_value_regions(clip, x: torch.Tensor) -> torch.Tensor:
    """Region features written from the method's definition, reading open_clip's own main-stream inputs.

    local = ln_pre output + Σ_blocks out_proj(softmax(v vᵀ / sqrt(d_head)) v), v the value projection of
    ln_1(main-stream block input), per head; regions = ln_post(local tokens without CLS) @ proj.
    """
    visual = clip.visual
    inputs = []
    handles = [
        b.register_forward_pre_hook(lambda m, args: inputs.append(args[0])) for b in visual.transformer.resblocks
    ]
    stem = []
    handles.append(visual.ln_pre.register_forward_hook(lambda m, i, o: stem.append(o)))
    try:
        clip.encode_image(x)
    finally:
        for handle in handles:
            handle.remove()
    local = stem[0]
    for block, main in zip(visual.transformer.resblocks, inputs):
        attn = block.attn
        width = main.shape[-1]
        value = F.linear(block.ln_1(main), attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])
        heads = attn.num_heads
        v = value.reshape(*value.shape[:2], heads, width // heads).transpose(1, 2)
        weights = torch.softmax(v @ v.transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(value.shape)
        local = local + attn.out_proj(mixed)
    return visual.ln_post(local[:, 1:]) @ visual.proj


def test_local_stream_is_value_value_attention_over_the_main_stream(clip):
    model = tiny_ram(seed=0, clip=clip, trained=False)
    x = images(2, seed=7)
    with torch.no_grad():
        _, regions = model.vision(x, use_adapters=False)
        expected = value_value_regions(clip, x)
    torch.testing.assert_close(regions, expected, rtol=1e-5, atol=1e-5)


# -- scores and the plan ------------------------------------------------------------------------------------


def test_scores_are_distributions_and_plan_has_kcot_marginals(trained):
    x = images(3, seed=8)
    with torch.no_grad():
        features = trained.encode_labels(tokens())
        output = trained(x, features, kcot=KcotConfig(stop="marginal", tol=1e-6, max_iter=10_000))
        default = trained(x, features)
    batch, labels = 3, len(LABELS)
    for scores in (output.scores, output.global_scores, output.local_scores):
        assert scores.shape == (batch, labels)
        assert (scores >= 0).all()
        torch.testing.assert_close(scores.sum(dim=1), torch.ones(batch))
    torch.testing.assert_close(output.scores, (output.global_scores + output.local_scores) / 2)
    torch.testing.assert_close(output.global_scores, output.global_logits.softmax(dim=1))
    torch.testing.assert_close(output.local_scores, output.local_logits.softmax(dim=1))
    # Plan: rows carry the region marginal (label presence), columns the uniform 1/C.
    assert output.plan.shape == (batch, GRID, labels)
    torch.testing.assert_close(output.region_marginal, region_marginal(output.similarity, 0.1))
    torch.testing.assert_close(output.plan.sum(dim=2), output.region_marginal, rtol=0, atol=1e-6)
    torch.testing.assert_close(output.plan.sum(dim=1), torch.full((batch, labels), 1 / labels), rtol=1e-5, atol=0)
    # The reference rule ends on a column update: columns hold exactly, rows approximately.
    torch.testing.assert_close(default.plan.sum(dim=1), torch.full((batch, labels), 1 / labels), rtol=1e-5, atol=0)
    assert 1 <= default.sinkhorn_iterations <= 100


def test_logits_follow_the_method(trained):
    x = images(2, seed=9)
    with torch.no_grad():
        features = trained.encode_labels(tokens())
        output = trained(x, features)
        global_feature, regions = trained.vision(x, features)
    labels = F.normalize(features, dim=-1)
    similarity = F.normalize(regions, dim=-1) @ labels.t()
    torch.testing.assert_close(output.similarity, similarity)
    torch.testing.assert_close(
        output.global_logits, F.normalize(global_feature, dim=-1) @ labels.t() / trained.temperature
    )
    expected_plan = sinkhorn(region_marginal(similarity), torch.full((2, len(LABELS)), 1 / len(LABELS)),
                             kcot_cost(similarity, LOGIT_SCALE), reg=0.1).plan
    torch.testing.assert_close(output.plan, expected_plan)
    torch.testing.assert_close(output.local_logits, (expected_plan * similarity).sum(dim=1) / trained.temperature_loc)


def test_training_cost_adds_the_masked_teacher_term(trained):
    x = images(2, seed=10)
    targets = torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 1]])
    with torch.no_grad():
        features = trained.encode_labels(tokens())
        teacher_features = trained.encode_labels(tokens(), use_prompts=False)
        output = trained(x, features, targets=targets, teacher_label_features=teacher_features)
        _, teacher_regions = trained.vision(x, use_adapters=False)
    # The teacher: CLIP with the value-value path, no adapter, prompt-free labels.
    teacher_similarity = F.normalize(teacher_regions, dim=-1) @ F.normalize(teacher_features, dim=-1).t()
    knowledge = torch.softmax(20.0 * torch.softmax(LOGIT_SCALE * teacher_similarity, dim=-1), dim=1)
    knowledge = mask_teacher_distribution(knowledge, targets)
    cost = kcot_cost(output.similarity, LOGIT_SCALE) - 0.05 * torch.log(knowledge)
    expected = sinkhorn(output.region_marginal, torch.full((2, 6), 1 / 6), cost, reg=0.1 + 0.05).plan
    torch.testing.assert_close(output.plan, expected)
    inference = trained(x, features)
    assert not torch.allclose(inference.plan, output.plan)


def test_batch_minimum_hook_supplies_the_teacher_minimum(trained):
    x = images(2, seed=11)
    targets = torch.tensor([[1.0, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 1]])
    received = []

    def global_minimum(local_minimum):
        received.append(float(local_minimum))
        return local_minimum * 1e-3  # another rank holds a smaller value

    with torch.no_grad():
        features = trained.encode_labels(tokens())
        teacher_features = trained.encode_labels(tokens(), use_prompts=False)
        local = trained(x, features, targets=targets, teacher_label_features=teacher_features)
        hooked = trained(
            x, features, targets=targets, teacher_label_features=teacher_features, batch_minimum=global_minimum
        )
        knowledge = trained.teacher_distribution(x, teacher_features, trained.config.kcot)
    assert received == [pytest.approx(float(knowledge.amin()))]
    assert not torch.allclose(local.plan, hooked.plan)


# -- the vocabulary-scaled local temperature ------------------------------------------------------------------


def test_vocabulary_scaled_local_temperature():
    train_size = 48
    model = tiny_ram(seed=12, train_vocabulary_size=train_size)
    x = images(2, seed=13)
    with torch.no_grad():
        features = model.encode_labels(tokens())
        plain = model(x, features)
        model.config.scale_local_temperature = True
        scaled = model(x, features)
    labels = len(LABELS)
    # τ' = τ · C_train / C, so the logits shrink by C_train / C (here 8: the local softmax sharpens less).
    torch.testing.assert_close(plain.local_logits / scaled.local_logits, torch.full((2, labels), train_size / labels))
    torch.testing.assert_close(scaled.global_logits, plain.global_logits)
    torch.testing.assert_close(scaled.plan, plain.plan)
    # Without a recorded training vocabulary the option has nothing to scale by.
    model.config.train_vocabulary_size = None
    with torch.no_grad():
        unrecorded = model(x, features)
    torch.testing.assert_close(unrecorded.local_logits, plain.local_logits)


def test_matched_local_temperature_puts_local_logits_on_one_scale_at_any_vocabulary_size():
    from ramtag.model.ram import MATCHED_LOCAL_FACTOR

    model = tiny_ram(seed=14)
    x = images(2, seed=15)
    with torch.no_grad():
        features = model.encode_labels(tokens())
        fixed = model(x, features)
        model.config.local_temperature = "matched"
        matched = model(x, features)
        model.config.scale_local_temperature = True  # superseded by `matched`
        model.config.train_vocabulary_size = 48
        still = model(x, features)
    labels = len(LABELS)
    # Both divide the same plan-weighted similarity Σ_i T·sim (whose label sums are 1/C): fixed by τ_loc,
    # matched by MATCHED_LOCAL_FACTOR · τ_g / C, so the local logit is C·Σ_i T·sim / (factor · τ_g).
    evidence = fixed.local_logits * model.temperature_loc
    torch.testing.assert_close(matched.local_logits, evidence * labels / (MATCHED_LOCAL_FACTOR * model.temperature))
    torch.testing.assert_close(matched.plan, fixed.plan)
    torch.testing.assert_close(matched.global_logits, fixed.global_logits)
    torch.testing.assert_close(still.local_logits, matched.local_logits)
    with pytest.raises(ValueError, match="local temperature"):
        RamConfig(local_temperature="sharp")


# -- adapter tokens and deep prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("adapter_tokens", [0, 1, 8])
def test_adapter_tokens_do_not_change_the_region_count(clip, adapter_tokens):
    model = tiny_ram(seed=0, clip=clip, adapter_tokens=adapter_tokens)
    with torch.no_grad():
        output = model(images(2, seed=14), model.encode_labels(tokens()))
    assert output.similarity.shape == (2, GRID, len(LABELS))
    assert output.plan.shape == (2, GRID, len(LABELS))
    assert len(model.vision.adapter_tokens) == (0 if adapter_tokens == 0 else 2)


def test_adapter_tokens_change_the_global_feature(clip):
    model = tiny_ram(seed=0, clip=clip)
    x = images(2, seed=15)
    with torch.no_grad():
        features = model.encode_labels(tokens())
        with_tokens, _ = model.vision(x, features)
        for token in model.vision.adapter_tokens.values():
            token.zero_()
        zeroed, _ = model.vision(x, features)
    # Zero tokens still take part in attention (as keys with value = bias); random ones must move the CLS.
    assert not torch.allclose(with_tokens, zeroed)


def prompted_last_layer_features(clip, label_tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Label features with deep prompts in the last text layer only, from the definition: insert the prompts
    after the start token, cut the sequence back to the context, run the block, drop the prompts, and pool at
    the end-of-text token's original index."""
    blocks = clip.transformer.resblocks
    captured = []
    handle = blocks[-1].register_forward_pre_hook(lambda m, args, kwargs: captured.append(args[0]), with_kwargs=True)
    try:
        clip.encode_text(label_tokens)
    finally:
        handle.remove()
    x = captured[0]
    count = prompts.shape[0]
    joined = torch.cat([x[:, :1], prompts.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)[:, :CONTEXT_LENGTH]
    out = blocks[-1](joined, attn_mask=clip.attn_mask)
    out = torch.cat([out[:, :1], out[:, 1 + count :]], dim=1)
    eot = label_tokens.argmax(dim=-1)
    pooled = clip.ln_final(out)[torch.arange(x.shape[0]), eot]
    return pooled @ clip.text_projection


def test_deep_prompts_change_label_features_and_pool_at_the_end_token(clip):
    model = tiny_ram(seed=0, clip=clip, prompt_layers=(3,), prompt_tokens=2)
    label_tokens = tokens()
    with torch.no_grad():
        prompted = model.encode_labels(label_tokens)
        plain = model.encode_labels(label_tokens, use_prompts=False)
        expected = prompted_last_layer_features(clip, label_tokens, model.text.prompts["3"])
    assert not torch.allclose(prompted, plain, atol=1e-3)
    torch.testing.assert_close(plain, clip.encode_text(label_tokens), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prompted, expected, rtol=1e-5, atol=1e-5)


def test_label_length_limit_leaves_room_for_prompts(clip):
    import open_clip

    from ramtag.engine.runtime import Runtime
    from ramtag.errors import VocabularyError

    model = tiny_ram(seed=0, clip=clip, prompt_tokens=2)
    template = model.config.template

    def label_with_end_token_at(position: int) -> str:
        for words in range(1, CONTEXT_LENGTH):
            label = " ".join(["cat"] * words)
            end = int(open_clip.tokenize([template.format(label)], context_length=CONTEXT_LENGTH).argmax())
            if end == position:
                return label
        raise AssertionError(f"no label puts the end token at {position}")

    # With 2 prompts after the start token, tokens up to index context - 1 - 2 stay inside the context.
    last_fitting = CONTEXT_LENGTH - 1 - 2
    assert model.text.max_label_position() == last_fitting
    fits, too_long = label_with_end_token_at(last_fitting), label_with_end_token_at(last_fitting + 1)
    runtime = Runtime(model=model, device=torch.device("cpu"), fingerprint="test")
    runtime.check_label_lengths([fits], [template])
    with pytest.raises(VocabularyError, match="too long"):
        runtime.check_label_lengths(["cat", too_long], [template], line_numbers=[1, 2])
    # A training-free model uses no prompts: the whole context is available.
    free = Runtime(model=tiny_ram(seed=0, clip=clip, trained=False), device=torch.device("cpu"), fingerprint="test")
    free.check_label_lengths([too_long], [template])


# -- unsupported configurations -------------------------------------------------------------------------------


def test_unsupported_towers_and_layers_are_refused(clip):
    with pytest.raises(UnsupportedBackbone):
        DualPathVision(nn.Linear(4, 4), 64, (), 0)
    with pytest.raises(ValueError, match="outside"):
        RamModel(clip, tiny_config(adapter_layers=(4,)))
    with pytest.raises(ValueError, match="outside"):
        RamModel(clip, tiny_config(prompt_layers=(7,)))
    model = tiny_ram(seed=0, clip=clip)
    with pytest.raises(ValueError, match="text_features"):
        model.vision(images(1), use_adapters=True)


def test_text_features_do_not_depend_on_the_padding_run():
    """Only positions up to the last end-of-text token (plus prompt room) are run: same features as full context."""
    from tests.model_fixtures import tiny_ram
    from tests.model_fixtures import tokens as _tokens

    # float64: the claim is structural (the padding run never reaches the features), so it must hold far below
    # float32 rounding, which differs between a short and a full-context matmul by about 2e-6 on some CPUs.
    model = tiny_ram(seed=3).double().eval()
    short = _tokens(["cat"])
    long_label = " ".join(["red"] * 10)  # end-of-text within the last positions: the whole context is run
    both = _tokens(["cat", long_label])
    with torch.no_grad():
        for use_prompts in (False, True):
            alone = model.text(short, use_prompts=use_prompts)
            together = model.text(both, use_prompts=use_prompts)
            torch.testing.assert_close(alone[0], together[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            model.text(both, use_prompts=False), model.clip.encode_text(both), rtol=1e-9, atol=1e-12
        )
