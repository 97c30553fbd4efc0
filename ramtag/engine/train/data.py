"""Training batches: each rank's share of every global batch, reproducible from the seed and the data position.

Annotation files: every epoch is a permutation of the images seeded by (seed, epoch); global batch j is
images j·B .. (j+1)·B of it (the last partial batch is dropped, as in the reference) and rank r of w takes
the r-th 1/w of each. So the global batches are the same whatever the number of processes, and resuming at
batch j needs no decoding of the batches before it. Each image's augmentation is seeded by
(seed, epoch, index), independent of DataLoader workers.

WebDataset shards: an endless stream per rank, pass after pass over a seeded permutation of the shards (rank
r reads every w-th), with failed samples removed and good ones re-batched to exactly B / w. Augmentation is
seeded per worker and sample number within the pass. Resuming replays the pass up to the saved sample count
(those samples are decoded again and discarded: slower, but the same stream).

Missing image files are found before training starts (one stat each) and left out; images that fail to
decode are set aside in their batch, which is then smaller. Both are listed in `bad-images.txt`.

The label space (`training_labels`) is the `--labels` file, else the data's class list, else every label the data
holds; `--unseen` labels are held out of it. Labels outside the seen space are dropped and counted.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from ramtag.data.augment import TrainAugment, sample_seed
from ramtag.data.labelled import LabelledItem, LabelledSource, resolve_label_space
from ramtag.data.labelled_samples import (
    LabelledBatch,
    LabelledFiles,
    LabelledShards,
    checked_batches,
    collate_labelled,
    strict_error,
)
from ramtag.engine.signals import decode_worker_init
from ramtag.errors import DataError
from ramtag.messages import listed


@dataclass(frozen=True)
class TrainingLabels:
    seen: tuple[str, ...]
    """The labels trained on."""
    unseen: tuple[str, ...]
    """Held out (`--unseen`): never trained on, validated as ZSL/GZSL."""
    space: tuple[str, ...]
    """Every label of the label space, held-out ones included (what `.cls` indices point into)."""
    origin: str
    """Where the label space came from, for the log."""
    shard_items: list[LabelledItem] = field(default_factory=list)
    """Shards whose labels had to be read up front (for the label space or the epoch size): their items."""


def training_labels(
    source: LabelledSource,
    listed_labels: Sequence[str] | None,
    unseen: Sequence[str],
    read_shard_labels: bool,
    log: Callable[[str], None],
) -> TrainingLabels:
    """The label space of a run; `read_shard_labels` asks for one pass over the shards' labels (the epoch size)."""
    listed_labels = list(listed_labels) if listed_labels is not None else None
    found_in_data = listed_labels is None
    shard_items: list[LabelledItem] = []
    if source.is_shards and (listed_labels is None or read_shard_labels):
        # One pass over the shards' label members (images are not decoded): the label space and the epoch size.
        log("reading every shard's labels once (pass --labels and --samples-per-epoch to skip this)")
        shard_items = source.labelled_items(listed_labels)
        if listed_labels is None:
            listed_labels = list(dict.fromkeys(label for item in shard_items for label in item.labels))
            if not listed_labels:
                raise DataError(f"{source.description}: no labelled sample in the shards")
    space = resolve_label_space(source, listed_labels)
    if found_in_data and listed_labels is not None:
        space = replace(space, origin=f"labels found in {source.description}")
    return _held_out(space, tuple(unseen), shard_items, log)


def _held_out(space, unseen: tuple[str, ...], shard_items: list[LabelledItem], log) -> TrainingLabels:
    absent = [label for label in unseen if label not in space.labels]
    if absent:  # normal when the data carries seen labels only, but a typo would leave its label in training
        log(
            f"warning: {len(absent)} --unseen label(s) are not in the label space ({space.origin}), so nothing is "
            f"held out for them: {', '.join(absent[:10])}{' …' if len(absent) > 10 else ''}"
        )
    held_out = set(unseen)
    seen = tuple(label for label in space.labels if label not in held_out)
    if not seen:
        raise DataError("no seen labels to train on: every label of the label space is in --unseen")
    return TrainingLabels(seen, unseen, tuple(space.labels), space.origin, shard_items)


def training_items(
    source: LabelledSource, labels: TrainingLabels, strict: bool
) -> tuple[list[LabelledItem], dict[str, str], Counter[str]]:
    """The items to train on with their labels cut to the seen space, the missing image files (key: reason),
    and the label occurrences dropped. Shards: the items read up front, labels as they are (the stream cuts
    them), their drops counted here; streamed shards count their drops as they are read."""
    seen = set(labels.seen)
    dropped: Counter[str] = Counter()
    if source.is_shards:
        dropped.update(label for item in labels.shard_items for label in item.labels if label not in seen)
        return labels.shard_items, {}, dropped
    items, missing = find_missing_files(source.items)
    for item in source.items:
        dropped.update(label for label in item.labels if label not in seen)
    if dropped and strict:
        raise strict_error(source.description, dropped)
    items = [LabelledItem(i.key, i.path, tuple(label for label in i.labels if label in seen)) for i in items]
    if not items:
        raise DataError(f"{source.description}: none of the {len(source.items)} image files exist")
    return items, dict(missing), dropped


MIN_LABELLED_FRACTION = 0.01
"""Training refuses data where fewer images than this carry a seen label: there is (almost) nothing to learn."""


def nothing_to_learn(
    source: LabelledSource, items: Sequence[LabelledItem], labels: TrainingLabels, dropped: Counter[str]
) -> str | None:
    """Why `items` cannot train the seen labels (fewer than MIN_LABELLED_FRACTION of the images carry one),
    or None when they can. Says how many label occurrences fall outside the label space and which most often."""
    seen = set(labels.seen)
    labelled = sum(1 for item in items if any(label in seen for label in item.labels))
    if labelled > 0 and labelled >= MIN_LABELLED_FRACTION * len(items):
        return None
    held_out = set(labels.unseen)
    outside = Counter({label: count for label, count in dropped.items() if label not in held_out})
    common = listed([f"{label!r} ({count})" for label, count in outside.most_common()], quote=False)
    problem = (
        f"{source.description}: {labelled} of {len(items)} training image(s) have a label of the label space "
        f"({labels.origin}, {len(labels.seen)} seen label(s)), so there is nothing to learn; "
        f"{sum(outside.values())} label occurrence(s) fall outside it" + (f", most often {common}" if outside else "")
    )
    words = [len(label.split()) for label, _ in outside.most_common(20)]
    if words and sorted(words)[len(words) // 2] >= 4:
        problem += (
            ". They read like captions: training needs label names (a .txt member with one label a line or "
            'comma-separated, or a .json member {"labels": [...]}) that --labels lists'
        )
    return problem


class _SeededAugment:
    """The augmentation with a seed set by the dataset just before each image is transformed."""

    def __init__(self, augment: TrainAugment):
        self.augment = augment
        self.seed = 0

    def __call__(self, image) -> torch.Tensor:  # a PIL image
        return self.augment(image, torch.Generator().manual_seed(self.seed))


class _CountingAugment:
    """The augmentation seeded by (run seed, pass, worker, sample number in this worker): for shard streams."""

    def __init__(self, augment: TrainAugment, seed: int, pass_index: int):
        self.augment = augment
        self.seed = seed
        self.pass_index = pass_index
        self.count = 0

    def __call__(self, image) -> torch.Tensor:  # a PIL image
        info = get_worker_info()
        worker = info.id if info is not None else 0
        seed = sample_seed(self.seed, self.pass_index, (worker << 40) + self.count)
        self.count += 1
        return self.augment(image, torch.Generator().manual_seed(seed))


class _EpochFiles(Dataset):
    """Items are (epoch, index) pairs so that each image's augmentation is seeded by both."""

    def __init__(self, files: LabelledFiles, augment: _SeededAugment, seed: int):
        self.files = files
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        self.augment.seed = sample_seed(self.seed, epoch, index)
        return self.files[index]


class GlobalBatchSampler(Sampler):
    """This rank's slice of each global batch of a seeded per-epoch permutation, from a start batch on."""

    def __init__(self, size: int, global_batch: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} does not split evenly over {world_size} processes")
        self.size = size
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start = epoch, start_batch

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order(self.epoch)
        for batch in range(self.start, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, int(i)) for i in order[first : first + self.local_batch]]


@dataclass
class StreamPosition:
    """Where a shard stream stands: the pass and how many raw samples of it this rank has used."""

    pass_index: int = 0
    consumed: int = 0


def find_missing_files(items: Sequence[LabelledItem]) -> tuple[list[LabelledItem], list[tuple[str, str]]]:
    """Split items into those whose image file exists and (key, reason) for the others."""
    present, missing = [], []
    for item in items:
        if item.path is not None and os.path.isfile(item.path):
            present.append(item)
        else:
            missing.append((item.key, "missing file" if item.path and not os.path.exists(item.path) else "not a file"))
    return present, missing


@dataclass
class TrainBatches:
    """Every rank's local training batches; see the module docstring for the two kinds of data."""

    source: LabelledSource
    items: list[LabelledItem]
    classes: tuple[str, ...]
    augment: TrainAugment
    global_batch: int
    rank: int
    world_size: int
    seed: int
    num_workers: int
    pin_memory: bool = False
    samples_per_epoch: int | None = None
    """Shards only: how many samples make an epoch (counted from the data when not given)."""
    strict_labels: bool = False
    cls_classes: tuple[str, ...] | None = None
    """Shards only: the label list that `.cls` indices point into (default: `classes`)."""
    stream: StreamPosition = field(default_factory=StreamPosition)

    def __post_init__(self) -> None:
        if self.global_batch % self.world_size:
            raise DataError(f"batch size {self.global_batch} does not split evenly over {self.world_size} processes")
        self.local_batch = self.global_batch // self.world_size
        if self.source.is_shards:
            if len(self.source.shards) < self.world_size:
                raise DataError(
                    f"{len(self.source.shards)} shard(s) for {self.world_size} processes: every process needs a shard"
                )
            size = self.samples_per_epoch or len(self.items)
        else:
            size = len(self.items)
            self._augment = _SeededAugment(self.augment)
            self.files = LabelledFiles(
                list(enumerate(self.items)), self.classes, transform=self._augment, label_space=self.classes
            )
            self.sampler = GlobalBatchSampler(size, self.global_batch, self.rank, self.world_size, self.seed)
        self.size = size
        if size < self.global_batch:
            raise DataError(
                f"{size} training image(s) do not fill one batch of {self.global_batch}: lower --batch-size"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def epoch(self, epoch: int, start_batch: int) -> Iterator[LabelledBatch]:
        """Local batches `start_batch` .. end of `epoch` (shards: the next ones from the endless stream)."""
        if self.source.is_shards:
            yield from self._shard_batches(self.batches_per_epoch - start_batch)
            return
        self.sampler.set_position(epoch, start_batch)
        dataset = _EpochFiles(self.files, self._augment, self.seed)
        loader = DataLoader(
            dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate_labelled,
            pin_memory=self.pin_memory,
            worker_init_fn=decode_worker_init,
        )
        yield from loader

    # -- shards -----------------------------------------------------------------------------------------
    def _shard_loader(self, pass_index: int) -> DataLoader:
        order = torch.randperm(
            len(self.source.shards), generator=torch.Generator().manual_seed(self.seed * 7919 + pass_index)
        )
        shards = [self.source.shards[i] for i in order]
        dataset = LabelledShards(
            shards,
            self.classes,
            _CountingAugment(self.augment, self.seed, pass_index),
            label_space=self.classes,
            cls_classes=self.cls_classes,
            strict=self.strict_labels,
            rank=self.rank,
            world_size=self.world_size,
        )
        mine = len(shards[self.rank :: self.world_size])
        return DataLoader(
            dataset,
            batch_size=self.local_batch,
            num_workers=min(self.num_workers, mine),
            collate_fn=collate_labelled,
            pin_memory=self.pin_memory,
            worker_init_fn=decode_worker_init,
        )

    def _shard_batches(self, count: int) -> Iterator[LabelledBatch]:
        emitted = 0
        while emitted < count:
            position = self.stream
            raw = 0
            emitted_before = emitted
            good: list[tuple[torch.Tensor, torch.Tensor, str, int]] = []
            failed: list[tuple[str, str]] = []
            dropped = None
            for batch in checked_batches(self._shard_loader(position.pass_index)):
                start = raw
                raw += len(batch) + len(batch.failed)
                if raw <= position.consumed:
                    continue  # replaying up to the saved position
                failed.extend(batch.failed)
                dropped = batch.dropped if dropped is None else dropped + batch.dropped
                for i in range(len(batch)):
                    index = start + len(batch.failed) + i
                    if index >= position.consumed:
                        good.append((batch.images[i], batch.targets[i], batch.keys[i], index))
                while len(good) >= self.local_batch:
                    chunk, good = good[: self.local_batch], good[self.local_batch :]
                    self.stream = StreamPosition(position.pass_index, chunk[-1][3] + 1)
                    yield LabelledBatch(
                        images=torch.stack([c[0] for c in chunk]),
                        targets=torch.stack([c[1] for c in chunk]),
                        keys=[c[2] for c in chunk],
                        orders=[(position.pass_index, c[3]) for c in chunk],
                        failed=failed,
                        dropped=dropped if dropped is not None else batch.dropped,
                    )
                    failed, dropped = [], None
                    emitted += 1
                    if emitted >= count:
                        return
            if emitted == emitted_before and position.consumed == 0:
                raise DataError(
                    f"a whole pass over this process's shards gave fewer than {self.local_batch} usable images"
                )
            # Leftover good samples at the end of a pass are dropped, like the last partial batch of files.
            self.stream = StreamPosition(position.pass_index + 1, 0)
