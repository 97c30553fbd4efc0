"""Acceptance test of the model: ramtag reproduces the reference implementation's outputs.

Expected tensors were produced by running the reference (EricTan7/RAM) on CPU on weights that
tests/reference_weights.py regenerates from a seed; see tests/fixtures/parity/README.md. Here the same state dict
goes through ramtag's reference-checkpoint importer, so the importer's key mapping is under test too.
"""

from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch

from ramtag.model.checkpoint import model_from_reference_state
from ramtag.model.ram import ram_loss
from tests.reference_weights import (
    PARITY_CASES,
    load_parity_fixture,
    make_reference_images,
    make_reference_state_dict,
    spec_from_dict,
)

ATOL = 1e-4
RTOL = 1e-4


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    actual = actual.detach().float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module", params=PARITY_CASES)
def case(request):
    meta, expected = load_parity_fixture(request.param)
    spec = spec_from_dict(meta["spec"])
    torch.manual_seed(0)
    model = model_from_reference_state(make_reference_state_dict(spec, meta["weights_seed"]))
    # The fixtures were made on a batch of 3 with the reference's batch-wide stop; ramtag's default stops each
    # image on its own, which moves the plans of the images that converge first.
    model.config.kcot = dataclasses.replace(model.config.kcot, stop_scope="batch")
    images = make_reference_images(spec, meta["batch_size"], meta["input_seed"])
    seen, unseen = meta["labels_seen"], meta["labels_unseen"]
    tokens = open_clip.tokenize(
        [meta["template"].format(label) for label in seen + unseen], context_length=spec.context_length
    )
    return meta, expected, model, images, tokens, len(seen)


def test_tokenizer_matches_reference(case):
    _, expected, _, _, tokens, _ = case
    assert torch.equal(tokens, expected["text_tokens"])


def test_importer_infers_the_configuration(case):
    meta, _, model, _, _, _ = case
    spec = meta["spec"]
    assert model.config.adapter_layers == tuple(spec["adapter_layers"])
    assert model.config.prompt_layers == tuple(spec["text_prompt_layers"])
    assert model.config.adapter_tokens == spec["adapter_tokens"]
    assert model.config.prompt_tokens == spec["prompt_tokens"]
    assert model.logit_scale == pytest.approx(spec["logit_scale"], rel=1e-6)


@pytest.mark.parametrize("mode", ["eval_seen", "eval_gzsl", "eval_zsl"])
def test_inference_matches_reference(case, mode):
    _, expected, model, images, tokens, n_seen = case
    rows = {"eval_seen": slice(0, n_seen), "eval_gzsl": slice(None), "eval_zsl": slice(n_seen, None)}[mode]
    model.eval()
    with torch.no_grad():
        features = model.encode_labels(tokens)
        if mode == "eval_gzsl":
            _close(features, expected["eval_gzsl.text_features"], "text features")
        out = model(images, features[rows])
        if mode == "eval_seen":
            global_feature, regions = model.vision(images, features[rows])
            _close(global_feature, expected["eval_seen.global_features"], "global features")
            _close(regions[0], expected["eval_seen.region_features_image0"], "region features")
    _close(out.similarity, expected[f"{mode}.sim"], "similarity")
    _close(out.region_marginal, expected[f"{mode}.u"], "region marginal")
    _close(out.global_logits, expected[f"{mode}.logits_glb"], "global logits")
    _close(out.global_scores, expected[f"{mode}.score_glb"], "global score")
    assert out.sinkhorn_iterations == int(expected[f"{mode}.sinkhorn_iterations"])
    # Plan entries are of order 1/(regions x labels): compare relatively.
    _close(out.plan, expected[f"{mode}.plan"], "plan", rtol=1e-4, atol=1e-9)
    _close(out.local_logits, expected[f"{mode}.logits_loc"], "local logits")
    _close(out.local_scores, expected[f"{mode}.score_loc"], "local score")
    _close(out.scores, expected[f"{mode}.score"], "final score")


def test_training_forward_matches_reference(case):
    _, expected, model, images, tokens, n_seen = case
    target = expected["target"]
    model.train()
    try:
        teacher = model.encode_labels(tokens[:n_seen], use_prompts=False).detach()
        out = model(images, model.encode_labels(tokens[:n_seen]), targets=target, teacher_label_features=teacher)
        loss = ram_loss(out, target)
        loss.backward()
    finally:
        model.eval()
    with torch.no_grad():
        knowledge = model.teacher_distribution(images, teacher, model.config.kcot)
    _close(knowledge, expected["train.teacher_prob"], "teacher distribution", atol=1e-9)
    _close(knowledge.amin(), expected["train.teacher_min"], "teacher minimum", atol=1e-12)
    _close(out.similarity, expected["train.sim"], "similarity")
    assert out.sinkhorn_iterations == int(expected["train.sinkhorn_iterations"])
    _close(out.plan, expected["train.plan"], "plan", rtol=1e-4, atol=1e-9)
    _close(out.global_logits, expected["train.logits_glb"], "global logits")
    _close(out.local_logits, expected["train.logits_loc"], "local logits")
    _close(out.scores, expected["train.score"], "final score")
    _close(loss, expected["train.loss"], "MMC loss")
    _close(model.temperature.grad, expected["train.grad_temperature"], "temperature gradient", rtol=1e-3)
    _close(model.temperature_loc.grad, expected["train.grad_temperature_loc"], "local temperature gradient", rtol=1e-3)
    layers = model.config.adapter_layers
    token_norms = torch.stack([model.vision.adapter_tokens[str(i)].grad.norm() for i in layers])
    final_norms = torch.stack([model.vision.adapters[str(i)].project.weight.grad.norm() for i in layers])
    prompt_norms = torch.stack([model.text.prompts[str(i)].grad.norm() for i in model.config.prompt_layers])
    _close(token_norms, expected["train.grad_norm_adapt_embeds"], "adapter token gradients", rtol=1e-3)
    _close(final_norms, expected["train.grad_norm_adapter_final"], "adapter projection gradients", rtol=1e-3)
    _close(prompt_norms, expected["train.grad_norm_deep_embeds"], "deep prompt gradients", rtol=1e-3)
