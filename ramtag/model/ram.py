"""RAM: global CLIP scores plus KCOT-matched local scores, over any label vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ramtag.model.backbone import DualPathVision, PromptedText
from ramtag.model.config import KcotConfig, RamConfig
from ramtag.model.kcot import (
    kcot_cost,
    mask_teacher_distribution,
    region_marginal,
    sinkhorn,
    teacher_distribution,
    uniform_label_marginal,
)
from ramtag.model.loss import mmc_loss


@dataclass
class RamOutput:
    scores: torch.Tensor
    """Final scores [B, C]: mean of the global and local softmaxes (each row sums to 1)."""
    global_scores: torch.Tensor
    local_scores: torch.Tensor
    global_logits: torch.Tensor
    local_logits: torch.Tensor
    similarity: torch.Tensor
    """Cosine similarity of every region with every label [B, N, C]."""
    plan: torch.Tensor
    """KCOT transport plan [B, N, C] (no gradient)."""
    region_marginal: torch.Tensor
    sinkhorn_iterations: int
    """The most Sinkhorn iterations any image of the batch ran."""
    sinkhorn_image_iterations: torch.Tensor | None = None
    """[B] Sinkhorn iterations of each image."""


MATCHED_LOCAL_FACTOR = 4.0
"""`matched` local temperature = MATCHED_LOCAL_FACTOR · τ_g / C. At factor 1 the local logits sit on the global
branch's scale, which over-weights the local branch at 100 and 1,000 labels; 4 was chosen on synthetic stream 7
and checked on the held-out stream 11 (benchmarks/vocab_size.py, figures in benchmarks/README.md)."""

BatchMinimum = Callable[[torch.Tensor], torch.Tensor]


class RamModel(nn.Module):
    """RAM around a frozen open_clip CLIP.

    Trainable: the adapters, adapter tokens, deep text prompts and the two temperatures. Everything under
    `clip.` is frozen and never receives gradients.
    """

    def __init__(self, clip_model: nn.Module, config: RamConfig):
        super().__init__()
        self.config = config
        self.clip = clip_model
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        embed_dim = int(clip_model.visual.proj.shape[1])
        self.vision = DualPathVision(clip_model.visual, embed_dim, config.adapter_layers, config.adapter_tokens)
        self.text = PromptedText(clip_model, config.prompt_layers, config.prompt_tokens)
        self.logit_scale = float(clip_model.logit_scale.detach().exp())
        initial = config.temperature if config.temperature is not None else 1.0 / self.logit_scale
        self.temperature = nn.Parameter(torch.tensor(float(initial)))
        self.temperature_loc = nn.Parameter(torch.tensor(float(config.temperature_loc)))

    # -- state -------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """RAM's own tensors (adapters with batch-norm statistics, tokens, prompts, temperatures)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("clip.")}

    def train(self, mode: bool = True) -> "RamModel":
        super().train(mode)
        self.clip.eval()  # frozen backbone: no dropout, whatever the RAM parts do
        return self

    @property
    def training_free(self) -> bool:
        return not self.config.trained

    # -- labels -------------------------------------------------------------------------------------------
    def encode_labels(self, tokens: torch.Tensor, use_prompts: bool | None = None) -> torch.Tensor:
        """Unnormalised label features [C, D] from token ids; deep prompts only once trained."""
        if use_prompts is None:
            use_prompts = self.config.trained
        return self.text(tokens, use_prompts=use_prompts)

    def local_temperature(self, num_labels: int) -> torch.Tensor:
        """τ_loc for a vocabulary of `num_labels`: as stored, vocabulary-scaled, or matched to τ_g / C."""
        if self.config.local_temperature == "matched":
            # The plan gives every label 1/C of the mass, so τ_g / C would put the local logits exactly on the
            # global branch's scale; MATCHED_LOCAL_FACTOR keeps them a few times flatter than that.
            return self.temperature * (MATCHED_LOCAL_FACTOR / num_labels)
        train_size = self.config.train_vocabulary_size
        if self.config.scale_local_temperature and train_size:
            return self.temperature_loc * (train_size / num_labels)
        return self.temperature_loc

    # -- scoring ------------------------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        label_features: torch.Tensor,
        targets: torch.Tensor | None = None,
        teacher_label_features: torch.Tensor | None = None,
        kcot: KcotConfig | None = None,
        batch_minimum: BatchMinimum | None = None,
        vision: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> RamOutput:
        """Score images [B, 3, H, W] against label features [C, D].

        With `targets` ([B, C] multi-hot) and `teacher_label_features` (frozen, prompt-free features of the
        same labels) the transport cost gains the teacher's knowledge term, as in training. `vision` stands in
        for `self.vision` in this call, with its signature (a compiled copy of it, for inference).
        """
        kcot = kcot or self.config.kcot
        use_adapters = self.config.trained
        global_feature, regions = (vision or self.vision)(images, label_features, use_adapters=use_adapters)
        labels = F.normalize(label_features.float(), dim=-1)
        global_similarity = F.normalize(global_feature.float(), dim=-1) @ labels.t()
        similarity = F.normalize(regions.float(), dim=-1) @ labels.t()

        global_logits = global_similarity / self.temperature
        cost = kcot_cost(similarity, self.logit_scale)
        reg = kcot.reg
        if targets is not None and teacher_label_features is not None:
            knowledge = self.teacher_distribution(images, teacher_label_features, kcot)
            minimum = batch_minimum(knowledge.amin()) if batch_minimum is not None else None
            knowledge = mask_teacher_distribution(knowledge, targets, minimum)
            cost = cost - kcot.teacher_weight * torch.log(knowledge)
            reg = kcot.reg + kcot.teacher_weight
        with torch.no_grad():
            marginal = region_marginal(similarity.detach(), kcot.presence_temperature)
            solved = sinkhorn(
                marginal,
                uniform_label_marginal(similarity),
                cost.detach(),
                reg=reg,
                max_iter=kcot.max_iter,
                tol=kcot.tol,
                stop=kcot.stop,
                stop_scope=kcot.stop_scope,
            )
        plan = solved.plan.to(similarity.dtype)
        local_logits = (plan * similarity).sum(dim=1) / self.local_temperature(similarity.shape[-1])
        global_scores = global_logits.softmax(dim=-1)
        local_scores = local_logits.softmax(dim=-1)
        return RamOutput(
            scores=(global_scores + local_scores) / 2,
            global_scores=global_scores,
            local_scores=local_scores,
            global_logits=global_logits,
            local_logits=local_logits,
            similarity=similarity,
            plan=plan,
            region_marginal=marginal,
            sinkhorn_iterations=solved.iterations,
            sinkhorn_image_iterations=solved.image_iterations,
        )

    @torch.no_grad()
    def teacher_distribution(
        self, images: torch.Tensor, teacher_label_features: torch.Tensor, kcot: KcotConfig
    ) -> torch.Tensor:
        """The frozen teacher (CLIP with the value-value path, no adapter) P[b, region, label]."""
        _, regions = self.vision(images, use_adapters=False)
        labels = F.normalize(teacher_label_features.float(), dim=-1)
        similarity = F.normalize(regions.float(), dim=-1) @ labels.t()
        return teacher_distribution(similarity, self.logit_scale, kcot.teacher_sharpness)


def ram_loss(output: RamOutput, targets: torch.Tensor) -> torch.Tensor:
    """MMC on the global logits plus MMC on the local logits."""
    return mmc_loss(output.global_logits, targets) + mmc_loss(output.local_logits, targets)
