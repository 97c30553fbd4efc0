"""The Python API as the README shows it: ramtag.load -> encode_labels -> score, with every output field."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import ramtag


def test_load_encode_and_score(tiny_checkpoint):
    tagger = ramtag.load(checkpoint=tiny_checkpoint, device="cpu")
    labels = ["red circle", "blue star", "green square"]
    features = tagger.encode_labels(labels)
    assert features.shape[0] == 3
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)) for i in range(2)]
    images = torch.stack([tagger.transform()(p) for p in pictures])
    out = tagger.score(images, features)
    regions = out.similarity.shape[1]
    assert out.scores.shape == out.global_scores.shape == out.local_scores.shape == (2, 3)
    assert out.plan.shape == out.similarity.shape == (2, regions, 3)
    torch.testing.assert_close(out.scores, (out.global_scores + out.local_scores) / 2)
    torch.testing.assert_close(out.plan.sum(dim=1), torch.full((2, 3), 1 / 3), rtol=1e-4, atol=1e-6)
    # the same model scores the same images identically through the CLI's runtime
    again = ramtag.load(checkpoint=tiny_checkpoint, device="cpu").score(images, features)
    torch.testing.assert_close(again.scores, out.scores)


def test_overrides_reach_the_model_and_mistakes_are_plain_errors(tiny_checkpoint):
    import inspect

    import pytest

    assert "checkpoint" in inspect.signature(ramtag.load).parameters  # help() shows the real arguments
    assert ramtag.api.load is not None  # reachable after a bare `import ramtag`
    tagger = ramtag.load(
        checkpoint=tiny_checkpoint, device="cpu", ot_reg=0.5, ot_max_iter=7, scale_local_temperature=True
    )
    assert (tagger.config.kcot.reg, tagger.config.kcot.max_iter, tagger.config.scale_local_temperature) == (
        0.5,
        7,
        True,
    )
    with pytest.raises(ValueError, match="unknown override.*ot_regularisation"):
        ramtag.load(checkpoint=tiny_checkpoint, device="cpu", ot_regularisation=0.5)
    with pytest.raises(ValueError, match="no labels"):
        tagger.encode_labels([])
    size = tagger.config.preprocessing.image_size
    features = tagger.encode_labels(["cat"])
    with pytest.raises(
        ValueError, match=rf"images must be \[B, 3, {size}, {size}\].*got \[1, 3, {size + 1}, {size + 1}\]"
    ):
        tagger.score(torch.zeros(1, 3, size + 1, size + 1), features)
