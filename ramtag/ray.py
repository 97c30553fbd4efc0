"""RAM inside a Ray Dataset you already hold: ``ds.map_batches(Tagger, ...)``.

    import ray
    from ramtag.ray import Tagger

    ds = ray.data.read_parquet("s3://bucket/images/")           # an `image` column of bytes (or HF structs)
    tags = ds.map_batches(
        Tagger,
        fn_constructor_kwargs={"labels": "vocab.txt", "checkpoint": "ram.safetensors", "key_column": "id"},
        batch_size=256, concurrency=4, num_gpus=1,
    )
    tags.write_parquet("s3://bucket/tags/")

Each actor loads the model once (the constructor) and tags one batch per call. Every input row gets an output
row: an image that cannot be decoded gets its ``error`` and no tags, as in ``ramtag tag``, never a dropped row or a
failed task. The image column may hold encoded bytes (``read_binary_files``, img2dataset's parquet ``jpg``), Hugging
Face image structs (``{"bytes": ..., "path": ...}``), or decoded HWC uint8 arrays (``read_images``).

This needs Ray only where Ray runs it: the class itself imports nothing from Ray, so it pickles to workers that
have ramtag installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ramtag.data.images import PIL_LIMIT, ImageDecodeError, decode_image
from ramtag.messages import one_line

__all__ = ["Tagger"]


class Tagger:
    """A callable class for ``Dataset.map_batches``: a batch of images in, keys, tags and scores out.

    Output columns: ``key``, ``tags`` (labels, best first), ``tag_scores``, ``error`` (None when tagged),
    ``scores`` (every label in vocabulary order, with ``all_scores``), and the ``keep_columns`` as given.
    The key is ``key_column``'s value; without one, a ``path`` column (``read_images(include_paths=True)``,
    ``read_binary_files(include_paths=True)``) or the Hugging Face struct's path. A batch with none of these is
    refused rather than keyed by position, which would not survive a retried task.
    """

    def __init__(
        self,
        labels: str | Sequence[str],
        *,
        checkpoint: str | None = None,
        model: str = "ViT-B-16-quickgelu",
        pretrained: str | None = "openai",
        device: str = "auto",
        precision: str = "auto",
        top_k: int = 5,
        threshold: float | None = None,
        all_scores: bool = False,
        image_column: str = "image",
        key_column: str | None = None,
        keep_columns: Sequence[str] = (),
        templates: Sequence[str] | None = None,
        max_pixels: int | None = PIL_LIMIT,
    ) -> None:
        from ramtag.engine.runtime import autocast_dtype, load_runtime
        from ramtag.engine.vocabulary import encode_vocabulary, load_vocabulary

        if top_k < 0:
            raise ValueError("top_k must be 0 (no limit) or more")
        self.runtime = load_runtime(checkpoint, model=model, pretrained=pretrained, device=device)
        if isinstance(labels, str):
            vocabulary = load_vocabulary(self.runtime, labels, templates)
        else:
            vocabulary = encode_vocabulary(self.runtime, labels, templates)
        self.labels = np.array(vocabulary.labels, dtype=object)
        self.features = vocabulary.features.to(self.runtime.device)
        self.autocast = autocast_dtype(precision, self.runtime.device)
        self.transform = self.runtime.transform()
        self.top_k, self.threshold, self.all_scores = top_k, threshold, all_scores
        self.image_column, self.key_column, self.keep_columns = image_column, key_column, list(keep_columns)
        self.max_pixels = max_pixels

    def _image(self, value: Any):
        """One cell of the image column -> an RGB PIL image (raises ImageDecodeError with the row's reason)."""
        from PIL import Image

        if isinstance(value, Mapping):  # a Hugging Face image struct
            data = value.get("bytes")
            if data is None:
                raise ImageDecodeError("the image struct holds no bytes")
            return decode_image(bytes(data), max_pixels=self.max_pixels)
        if isinstance(value, (bytes, bytearray, memoryview, np.bytes_)):
            return decode_image(bytes(value), max_pixels=self.max_pixels)
        if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
            return Image.fromarray(value).convert("RGB")  # read_images decoded it already
        if value is None:
            raise ImageDecodeError("no image in this row")
        raise ImageDecodeError(f"unsupported image value of type {type(value).__name__}")

    def _keys(self, batch: Mapping[str, Any], size: int) -> list[str]:
        column = self.key_column or ("path" if "path" in batch else None)
        if column is not None:
            if column not in batch:
                raise KeyError(f"key column {column!r} is not in the batch (columns: {sorted(batch)})")
            return [str(key) for key in batch[column]]
        keys = []
        for value in batch[self.image_column][:size]:
            path = value.get("path") if isinstance(value, Mapping) else None
            if not path:
                raise KeyError(
                    f"no key for the rows: name a key_column (columns: {sorted(batch)}), or read the images with "
                    "include_paths=True"
                )
            keys.append(str(path))
        return keys

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        from ramtag.selection import select_tags

        if self.image_column not in batch:
            raise KeyError(f"image column {self.image_column!r} is not in the batch (columns: {sorted(batch)})")
        column = batch[self.image_column]
        size = len(column)
        keys = self._keys(batch, size)
        errors: list[str | None] = [None] * size
        tensors, good = [], []
        for index in range(size):
            try:
                tensors.append(self.transform(self._image(column[index])))
                good.append(index)
            except ImageDecodeError as exc:
                errors[index] = one_line(exc.reason)
        tags: list[list[str]] = [[] for _ in range(size)]
        tag_scores: list[list[float]] = [[] for _ in range(size)]
        every = np.full((size, len(self.labels)), np.nan, dtype=np.float32) if self.all_scores else None
        if good:
            output = self.runtime.score(torch.stack(tensors), self.features, self.autocast)
            scores = output.scores.float()
            selection = select_tags(scores, top_k=self.top_k, threshold=self.threshold)
            for row, index in enumerate(good):
                pairs = selection.row(row)
                tags[index] = [str(self.labels[label]) for label, _ in pairs]
                tag_scores[index] = [score for _, score in pairs]
            if every is not None:
                every[good] = scores.cpu().numpy()
        result: dict[str, Any] = {
            "key": np.array(keys, dtype=object),
            "tags": _object_array(tags),
            "tag_scores": _object_array(tag_scores),
            "error": np.array(errors, dtype=object),
        }
        if every is not None:
            result["scores"] = every
        for name in self.keep_columns:
            result[name] = batch[name]
        return result


def _object_array(rows: list[list]) -> np.ndarray:
    """A 1-D object array of lists (np.array would make a 2-D array when every list has the same length)."""
    array = np.empty(len(rows), dtype=object)
    array[:] = rows
    return array
