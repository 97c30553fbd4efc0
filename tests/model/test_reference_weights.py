"""The reference-layout weight generator and the parity fixtures it pairs with."""

from __future__ import annotations

import json

import pytest
import torch

from tests.reference_weights import (
    PARITY_CASES,
    PARITY_DIR,
    ReferenceSpec,
    load_parity_fixture,
    make_reference_images,
    make_reference_state_dict,
    spec_from_dict,
    spec_to_dict,
)

CUSTOM_SPEC = ReferenceSpec(
    adapter_layers=(7, 10),
    adapter_tokens=3,
    text_prompt_layers=(5, 6, 7, 8, 9, 10, 11),
    prompt_tokens=2,
    temperature=0.0125,
    temperature_loc=3e-3,
)
TRAINABLE_MARKERS = (".adapt_embeds", ".conv_adapter.", ".deep_embeds")


@pytest.fixture(scope="module")
def default_state() -> dict[str, torch.Tensor]:
    return make_reference_state_dict(ReferenceSpec(), seed=0)


@pytest.fixture(scope="module")
def custom_state() -> dict[str, torch.Tensor]:
    return make_reference_state_dict(CUSTOM_SPEC, seed=0)


def _is_fp16_exact(tensor: torch.Tensor) -> bool:
    return torch.equal(tensor.half().float(), tensor)


def _backbone(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix) and not any(m in k for m in TRAINABLE_MARKERS)
    }


def test_same_seed_same_weights_other_seed_other_weights(default_state):
    again = make_reference_state_dict(ReferenceSpec(), seed=0)
    other = make_reference_state_dict(ReferenceSpec(), seed=1)
    assert list(again) == list(default_state)
    assert all(torch.equal(again[k], default_state[k]) for k in default_state)
    assert not torch.equal(other["clip_model.visual.proj"], default_state["clip_model.visual.proj"])


def test_top_level_layout(default_state):
    extra = {k for k in default_state if not k.startswith(("clip_model.", "clip_model_teacher."))}
    assert extra == {"temperature", "temperature_loc"}
    assert all(v.dtype == torch.float32 for k, v in default_state.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("spec_name", ["default", "custom"])
def test_adapters_and_prompts_sit_exactly_at_the_spec_layers(spec_name, default_state, custom_state):
    spec, state = (ReferenceSpec(), default_state) if spec_name == "default" else (CUSTOM_SPEC, custom_state)
    token_layers = {int(k.split(".")[4]) for k in state if k.endswith(".adapt_embeds")}
    adapter_layers = {int(k.split(".")[4]) for k in state if ".conv_adapter." in k}
    prompt_layers = {int(k.split(".")[3]) for k in state if k.endswith(".deep_embeds")}
    assert token_layers == adapter_layers == set(spec.adapter_layers)
    assert prompt_layers == set(spec.text_prompt_layers)
    for i in spec.adapter_layers:
        block = f"clip_model.visual.transformer.resblocks.{i}"
        assert state[f"{block}.adapt_embeds"].shape == (spec.adapter_tokens, spec.vision_width)
        adapter = f"{block}.conv_adapter"
        assert state[f"{adapter}.conv_adapter_layers1.0.weight"].shape == (512, spec.vision_width, 1, 1)
        assert state[f"{adapter}.conv_adapter_layers2.0.weight"].shape == (512, spec.vision_width, 3, 3)
        assert state[f"{adapter}.conv_adapter_layers.weight"].shape == (2, 2, 3, 3)
        assert state[f"{adapter}.conv_adapter_final.weight"].shape == (spec.vision_width, 512, 1, 1)
    for i in spec.text_prompt_layers:
        deep = state[f"clip_model.transformer.resblocks.{i}.deep_embeds"]
        assert deep.shape == (spec.prompt_tokens, spec.text_width)


def test_vision_attention_is_renamed_and_text_attention_is_not(default_state):
    vision = [k for k in default_state if k.startswith("clip_model.visual.transformer.") and ".attn." in k]
    text = [k for k in default_state if k.startswith("clip_model.transformer.") and ".attn." in k]
    assert vision and all(".attn.qkv." in k or ".attn.out_proj." in k for k in vision)
    assert text and all(".attn.in_proj_" in k or ".attn.out_proj." in k for k in text)
    last = "clip_model.visual.transformer.resblocks.11.attn"
    for name in ("qkv.weight", "qkv.bias", "out_proj.weight", "out_proj.bias"):
        assert torch.equal(default_state[f"clip_model.visual.attn.{name}"], default_state[f"{last}.{name}"])


def test_teacher_is_the_students_backbone(default_state):
    student = _backbone(default_state, "clip_model.")
    prefix = "clip_model_teacher."
    teacher = {k[len(prefix) :]: v for k, v in default_state.items() if k.startswith(prefix)}
    assert set(teacher) == set(student)
    assert all(torch.equal(teacher[k], student[k]) for k in student)


def test_backbone_and_tokens_hold_fp16_values_adapters_do_not(default_state):
    backbone = _backbone(default_state, "clip_model.")
    rounded = {k: v for k, v in backbone.items() if k != "logit_scale"}
    assert all(_is_fp16_exact(v) for v in rounded.values())
    tokens = [v for k, v in default_state.items() if k.endswith((".adapt_embeds", ".deep_embeds"))]
    assert tokens and all(_is_fp16_exact(v) for v in tokens)
    adapter_convs = [v for k, v in default_state.items() if ".conv_adapter." in k and k.endswith("0.weight")]
    assert not all(_is_fp16_exact(v) for v in adapter_convs)


def test_logit_scale_and_temperatures(default_state, custom_state):
    assert default_state["clip_model.logit_scale"].exp().item() == pytest.approx(100.0, rel=1e-6)
    assert default_state["temperature"].item() == pytest.approx(0.01, rel=1e-6)
    assert default_state["temperature_loc"].item() == pytest.approx(2e-3, rel=1e-6)
    assert custom_state["temperature"].item() == pytest.approx(0.0125, rel=1e-6)
    assert custom_state["temperature_loc"].item() == pytest.approx(3e-3, rel=1e-6)


def test_batch_norm_statistics_are_not_the_identity(default_state):
    means = [v for k, v in default_state.items() if k.endswith("running_mean")]
    variances = [v for k, v in default_state.items() if k.endswith("running_var")]
    counts = [v for k, v in default_state.items() if k.endswith("num_batches_tracked")]
    assert len(means) == len(variances) == len(counts) == 2 * 3
    assert all(m.abs().mean() > 0.05 for m in means)
    assert all(0.5 <= v.min() and v.max() <= 1.5 and v.std() > 0.1 for v in variances)
    assert all(c.dtype == torch.int64 and c.ndim == 0 and c > 0 for c in counts)


def test_spec_json_round_trip_and_validation():
    spec = CUSTOM_SPEC
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))) == spec
    assert ReferenceSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown"):
        spec_from_dict({"embed_dim": 512, "colour": "blue"})
    for bad in ({"embed_dim": 256}, {"vision_layers": 6}, {"adapter_layers": (12,)}, {"text_width": 100}):
        with pytest.raises(ValueError):
            ReferenceSpec(**bad)


def test_images_are_deterministic_and_image_like():
    spec = ReferenceSpec()
    images = make_reference_images(spec, batch=3, seed=5)
    assert images.shape == (3, 3, 32, 32)
    assert torch.equal(images, make_reference_images(spec, batch=3, seed=5))
    assert -1.0 <= images.min() and images.max() <= 1.0


# ---- the committed fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=PARITY_CASES)
def parity_case(request):
    meta, tensors = load_parity_fixture(request.param)
    return meta, tensors


def test_fixture_tensors_match_their_description(parity_case):
    meta, tensors = parity_case
    assert set(tensors) == set(meta["tensors"])
    for name, info in meta["tensors"].items():
        assert list(tensors[name].shape) == info["shape"], name
        assert str(tensors[name].dtype) == f"torch.{info['dtype']}", name
        assert info["description"]


def test_fixture_shapes_follow_spec_and_labels(parity_case):
    meta, tensors = parity_case
    spec = spec_from_dict(meta["spec"])
    batch, regions = meta["batch_size"], spec.grid_size**2
    n_seen, n_unseen = len(meta["labels_seen"]), len(meta["labels_unseen"])
    label_counts = {"eval_seen": n_seen, "eval_gzsl": n_seen + n_unseen, "eval_zsl": n_unseen, "train": n_seen}
    for mode, labels in label_counts.items():
        assert tensors[f"{mode}.plan"].shape == (batch, regions, labels)
        assert tensors[f"{mode}.score"].shape == (batch, labels)
    assert tensors["text_tokens"].shape == (n_seen + n_unseen, spec.context_length)
    assert tensors["eval_gzsl.text_features"].shape == (n_seen + n_unseen, spec.embed_dim)
    assert tensors["target"].shape == (batch, n_seen)
    assert tensors["train.grad_norm_adapt_embeds"].shape == (len(spec.adapter_layers),)
    assert tensors["train.grad_norm_deep_embeds"].shape == (len(spec.text_prompt_layers),)


def test_fixture_inputs_regenerate(parity_case):
    meta, tensors = parity_case
    spec = spec_from_dict(meta["spec"])
    images = make_reference_images(spec, meta["batch_size"], meta["input_seed"])
    assert torch.equal(images.sum(dim=(1, 2, 3)), tensors["image_checksum"])


def test_fixture_tokens_are_what_open_clip_produces(parity_case):
    open_clip = pytest.importorskip("open_clip")
    meta, tensors = parity_case
    prompts = [meta["template"].format(label) for label in meta["labels_seen"] + meta["labels_unseen"]]
    assert torch.equal(open_clip.tokenize(prompts).to(torch.int64), tensors["text_tokens"])


def _mmc(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_prob = torch.log_softmax(logits.reshape(-1).double(), dim=0)
    return -(target.reshape(-1).double() * log_prob).sum() / target.sum().clamp_min(1)


def _sinkhorn_reference_rule(cost: torch.Tensor, u: torch.Tensor, reg: float, iterations: int) -> torch.Tensor:
    """Plain-domain Sinkhorn from the rule's definition, with a fixed number of iterations, in float64."""
    kernel = torch.exp(-cost.double() / reg)
    labels = torch.full(cost.shape[::2], 1.0 / cost.shape[-1], dtype=torch.float64)
    col = torch.ones_like(labels)
    for _ in range(iterations):
        row = u.double() / (kernel @ col.unsqueeze(-1)).squeeze(-1)
        col = labels / (kernel.transpose(1, 2) @ row.unsqueeze(-1)).squeeze(-1)
    return row.unsqueeze(-1) * kernel * col.unsqueeze(-2)


@pytest.mark.parametrize("mode", ["eval_seen", "eval_gzsl", "eval_zsl", "train"])
def test_fixture_is_internally_consistent(parity_case, mode):
    """The stored quantities relate as the README says (guards against a mislabelled capture)."""
    meta, t = parity_case
    spec = spec_from_dict(meta["spec"])
    close = dict(rtol=1e-5, atol=1e-6)
    for part in ("score", "score_glb", "score_loc"):
        torch.testing.assert_close(t[f"{mode}.{part}"].sum(-1), torch.ones(meta["batch_size"]), **close)
    torch.testing.assert_close(t[f"{mode}.score_glb"], t[f"{mode}.logits_glb"].softmax(-1), **close)
    torch.testing.assert_close(t[f"{mode}.score_loc"], t[f"{mode}.logits_loc"].softmax(-1), **close)
    torch.testing.assert_close(t[f"{mode}.score"], (t[f"{mode}.score_glb"] + t[f"{mode}.score_loc"]) / 2, **close)
    sim, plan = t[f"{mode}.sim"], t[f"{mode}.plan"]
    temperature_loc = spec.temperature_loc
    torch.testing.assert_close(t[f"{mode}.logits_loc"], (plan * sim).sum(1) / temperature_loc, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t[f"{mode}.u"], (sim.amax(-1) / 0.1).softmax(-1), **close)
    reg = meta["ot"]["reg_train"] if mode == "train" else meta["ot"]["reg_eval"]
    iterations = int(t[f"{mode}.sinkhorn_iterations"])
    expected_plan = _sinkhorn_reference_rule(t[f"{mode}.cost"], t[f"{mode}.u"], reg, iterations)
    torch.testing.assert_close(plan.double(), expected_plan, rtol=1e-5, atol=0)
    cost_kcot = 1 - (spec.logit_scale * sim).softmax(-1)
    if mode != "train":
        torch.testing.assert_close(t[f"{mode}.cost"], cost_kcot, **close)
        return
    torch.testing.assert_close(t["train.cost_kcot"], cost_kcot, **close)
    prob, target = t["train.teacher_prob"], t["target"]
    assert t["train.teacher_min"] == prob.min()
    masked = torch.where(target.unsqueeze(1).bool(), prob, prob.min())
    assert torch.equal(t["train.teacher_prob_masked"], masked)
    teacher_weight = meta["ot"]["teacher_weight"]
    torch.testing.assert_close(t["train.cost"], cost_kcot - teacher_weight * masked.log(), **close)
    torch.testing.assert_close(t["train.loss_glb"].double(), _mmc(t["train.logits_glb"], target), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["train.loss_loc"].double(), _mmc(t["train.logits_loc"], target), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t["train.loss"], t["train.loss_glb"] + t["train.loss_loc"], **close)


def test_fixture_readme_exists():
    assert (PARITY_DIR / "README.md").is_file()
