"""`ramtag train`: schedule, EMA, augmentation, sampling, settings, and short CPU runs on a tiny backbone."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ramtag.data.augment import TrainAugment
from ramtag.engine.train.batchnorm import GlobalBatchNorm2d, synchronise_batchnorms
from ramtag.engine.train.config import TrainConfig, read_config_file, resolve_config
from ramtag.engine.train.data import GlobalBatchSampler
from ramtag.engine.train.ema import TrainableEma
from ramtag.engine.train.recipe import TrainRecipe, train
from ramtag.engine.train.schedule import FLOOR, WARMUP_START, Schedule
from ramtag.errors import CheckpointError, DataError, UsageError
from ramtag.model.checkpoint import load_checkpoint
from tests.train_fixtures import LABELS, write_init_checkpoint, write_reference_json, write_shard


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster on one thread when the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    (root / "img").mkdir()
    (root / "img" / "corrupt.png").write_bytes(b"not a png")
    bad_rows = [("img/missing.png", ("red",)), ("img/corrupt.png", ("blue",))]
    return SimpleNamespace(
        root=root,
        init=write_init_checkpoint(root / "init.safetensors"),
        train=write_reference_json(root, "train.json", 14, seed=0, extra_rows=bad_rows),
        val=write_reference_json(root, "val.json", 8, seed=1),
    )


def settings(data, output: Path, **changes) -> TrainConfig:
    """16 entries, one missing: 15 images, 3 batches of 4 per epoch; 2 epochs."""
    base = dict(
        train=[str(data.train)], root=str(data.root), init=str(data.init), output=str(output), batch_size=4,
        epochs=2, num_workers=0, log_every=1, checkpoint_every=0, progress=False,
    )
    base.update(changes)
    return TrainConfig(**base)


def _metric_lines(output: Path, kind: str) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["kind"] == kind]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """Six steps in one go, with the plain cosine schedule (a different rate every step)."""
    output = tmp_path_factory.mktemp("straight")
    return settings(data, output, schedule="cosine"), train(settings(data, output, schedule="cosine"))


# -- schedule ---------------------------------------------------------------------------------------------


def test_reference_schedule_is_warm_up_then_the_start_of_a_60_epoch_cosine():
    schedule = Schedule("reference", steps_per_epoch=10, total_steps=60, warmup_epochs=3)
    per_epoch = [schedule.factor(epoch * 10) for epoch in range(6)]
    assert all(schedule.factor(epoch * 10 + 9) == per_epoch[epoch] for epoch in range(6))  # stepped per epoch
    for epoch, factor in enumerate(per_epoch, start=1):  # timm's CosineLRScheduler, epochs counted from 1
        if epoch < 3:
            expected = WARMUP_START + epoch * (1 - WARMUP_START) / 3
        else:
            expected = FLOOR + 0.5 * (1 - FLOOR) * (1 + math.cos(math.pi * epoch / 60))
        assert factor == pytest.approx(expected)
    assert per_epoch[0] == pytest.approx(0.34) and per_epoch[1] == pytest.approx(0.67)
    assert all(0.97 < f < 1.0 for f in per_epoch[2:]) and per_epoch[2:] == sorted(per_epoch[2:], reverse=True)


def test_plain_cosine_warms_up_then_decays_to_the_floor_over_the_run():
    schedule = Schedule("cosine", steps_per_epoch=10, total_steps=100, warmup_epochs=1)
    factors = [schedule.factor(step) for step in range(101)]
    assert factors[0] == pytest.approx(WARMUP_START)
    assert factors[10] == pytest.approx(1.0)
    assert factors[:11] == sorted(factors[:11]) and factors[10:] == sorted(factors[10:], reverse=True)
    assert factors[100] == pytest.approx(FLOOR)


# -- EMA --------------------------------------------------------------------------------------------------


def test_ema_warm_up_follows_short_runs_and_swapping_restores_the_live_weights():
    model = torch.nn.Linear(3, 1)
    ema = TrainableEma(model.state_dict(), decay=0.9997)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model.state_dict())
    # First update: decay min(0.9997, 1/10), so the average moves 90% of the way.
    assert torch.allclose(ema.shadow["weight"], start["weight"] + 0.9)
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.updates = 10**6
    assert ema.current_decay() == 0.9997
    live = model.weight.detach().clone()
    with ema.applied_to(model):
        assert torch.equal(model.weight, ema.shadow["weight"])
    assert torch.equal(model.weight, live)


# -- augmentation and sampling ----------------------------------------------------------------------------


def _picture(seed: int = 0):
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand((30, 50, 3), generator=gen) * 255).to(torch.uint8).numpy())


def test_augmentation_is_a_function_of_its_generator():
    augment = TrainAugment(size=32)
    image = _picture()
    first = augment(image, torch.Generator().manual_seed(5))
    assert first.shape == (3, 32, 32)
    assert torch.equal(first, augment(image, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augment(image, torch.Generator().manual_seed(6)))


def test_augmentation_off_is_the_reference_bicubic_squash_resize():
    from ramtag.data.images import squash_resize_normalize

    plain = TrainAugment(size=32, padding=0, flip=0.0, erase=0.0, photometric=False)
    image = _picture()
    expected = squash_resize_normalize(image, 32, (0.5,) * 3, (0.5,) * 3, interpolation="bicubic")
    assert torch.allclose(plain(image, torch.Generator().manual_seed(0)), expected.clamp(-1, 1), atol=1e-6)


def test_global_batches_are_the_same_whatever_the_number_of_processes():
    one = GlobalBatchSampler(size=23, global_batch=4, rank=0, world_size=1, seed=3)
    two = [GlobalBatchSampler(size=23, global_batch=4, rank=r, world_size=2, seed=3) for r in range(2)]
    for epoch in (0, 1):
        for sampler in [one, *two]:
            sampler.set_position(epoch, 0)
        whole = list(one)
        halves = [list(s) for s in two]
        assert len(whole) == 5  # 23 // 4, the partial batch dropped
        assert whole == [a + b for a, b in zip(*halves)]
    one.set_position(0, 0)
    epoch0 = list(one)
    one.set_position(1, 0)
    assert [i for _, i in epoch0[0]] != [i for _, i in list(one)[0]]  # reshuffled per epoch
    one.set_position(0, 3)
    assert list(one) == epoch0[3:]  # resuming skips batches without reading them


def test_global_batch_norm_is_plain_batch_norm_in_one_process():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    reference.load_state_dict(module.state_dict())
    assert synchronise_batchnorms(module, torch.device("cpu")) == 1
    assert isinstance(module[1], GlobalBatchNorm2d)
    assert set(module.state_dict()) == set(reference.state_dict())
    x = torch.randn(2, 3, 5, 5)
    assert torch.allclose(module.train()(x), reference.train()(x))


# -- settings ---------------------------------------------------------------------------------------------


def test_settings_precedence_defaults_then_file_then_options(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('train = ["a.json"]\nbatch-size = 8\nlr = 1e-4\n')
    config = resolve_config(path, {"lr": 2e-4, "epochs": None})
    assert (config.batch_size, config.lr, config.epochs) == (8, 2e-4, TrainConfig().epochs)
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("train:\n  batch_size: 16\n  train: [b.json]\n")
    assert resolve_config(yaml_path, {}).batch_size == 16
    with pytest.raises(UsageError, match="unknown training setting"):
        resolve_config(path, {"batch_sise": 3})
    with pytest.raises(UsageError, match="batch_size"):
        TrainConfig(train=["a"], batch_size=0)
    with pytest.raises(UsageError, match="best_metric"):
        TrainConfig(best_metric="zsl/accuracy")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3")
    with pytest.raises(UsageError, match="cannot parse"):
        read_config_file(bad)


@pytest.mark.parametrize("text, message", [
    ('max_steps = "two"', "max_steps must be an integer or unset, not 'two'"),
    ('lr = "fast"', "lr must be a finite number"),
    ("lr = nan", "lr must be a finite number, not nan"),
    ("max_steps = true", "max_steps must be an integer"),
    ('photometric = "false"', "photometric must be true or false"),
    ("batch_size = 8.5", "batch_size must be an integer"),
    ('adapter_layers = "1,x"', "adapter_layers must be a list of integers"),
])
def test_config_file_values_of_the_wrong_type_are_usage_errors(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(f'train = ["a.json"]\n{text}\n')
    with pytest.raises(UsageError, match=re.escape(message)):
        resolve_config(path, {})


def test_config_file_keys_may_be_written_as_the_options_are(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('train = ["a.json"]\nadapter-layers = "2, 0"\nworkers = 3\n')
    config = resolve_config(path, {})
    assert (config.adapter_layers, config.num_workers) == ([0, 2], 3)


# -- training runs ----------------------------------------------------------------------------------------


def test_a_run_trains_only_ram_parts_and_writes_its_outputs(data, straight):
    config, result = straight
    output = Path(config.output)
    assert result.steps == 6 and len(result.losses) == 6 and all(math.isfinite(x) for x in result.losses)
    assert [line["step"] for line in _metric_lines(output, "train")] == list(range(1, 7))
    assert TrainConfig.from_dict(json.loads((output / "train-config.json").read_text())) == config

    initial = load_checkpoint(data.init)
    trained = load_checkpoint(output / "checkpoint.safetensors")
    assert trained.config.trained and trained.config.train_vocabulary_size == len(LABELS)
    saved = load_file(output / "checkpoint-live.safetensors")
    for name, tensor in initial.clip.state_dict().items():
        assert torch.equal(saved[f"clip.{name}"], tensor), name  # the backbone never moves
    moved = [k for k, v in initial.trainable_state_dict().items() if not torch.equal(saved[k], v)]
    assert any(k.startswith("text.prompts") for k in moved) and any(k.startswith("vision.adapters") for k in moved)
    assert "temperature_loc" in moved
    ema = load_file(output / "checkpoint.safetensors")
    assert not torch.equal(ema["temperature_loc"], saved["temperature_loc"])  # export holds the EMA weights

    bad = (output / "bad-images.txt").read_text()
    assert "img/missing.png\tmissing file" in bad and "img/corrupt.png\tnot an image" in bad
    state = torch.load(output / "training-state.pt", weights_only=True)
    assert state["step"] == 6 and {"optimizers", "ema", "rng", "model", "scaler"} <= set(state)


def test_the_backbone_gets_no_gradient(data, tmp_path):
    recipe = TrainRecipe(settings(data, tmp_path / "run"))
    recipe.setup()
    batch = next(iter(recipe.batches.epoch(0, 0)))
    loss, _ = recipe._loss_step(batch)
    loss.backward()
    assert all(p.grad is None for p in recipe.model.clip.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.parameters)
    recipe.reporter.close()


def test_same_seed_same_loss_curve(data, straight, tmp_path):
    config, result = straight
    again = train(replace(config, output=str(tmp_path / "again")))
    assert again.losses == result.losses
    other = train(replace(config, output=str(tmp_path / "other"), seed=7, max_steps=2))
    assert other.losses != result.losses[:2]


def test_a_resumed_run_continues_the_same_loss_curve(straight, tmp_path):
    config, result = straight
    output = tmp_path / "resumed"
    first = train(replace(config, output=str(output), max_steps=3))
    # Worker processes do not change the data: each image's augmentation is seeded by (seed, epoch, index).
    second = train(replace(config, output=str(output), resume=True, num_workers=2))
    assert first.losses + second.losses == result.losses
    for name in ("checkpoint.safetensors", "checkpoint-live.safetensors"):
        straight_weights = load_file(Path(config.output) / name)
        resumed_weights = load_file(output / name)
        assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights), name
    assert [line["step"] for line in _metric_lines(output, "train")] == list(range(1, 7))


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_an_existing_one(straight, tmp_path):
    config, _ = straight
    with pytest.raises(UsageError, match="already holds a training run"):
        train(config)
    with pytest.raises(UsageError, match="lr"):
        train(replace(config, resume=True, lr=1.0))
    with pytest.raises(CheckpointError, match="no training state"):
        train(replace(config, output=str(tmp_path / "nothing"), resume=True))


def test_resume_refuses_changed_annotations_at_the_same_path(data, tmp_path):
    annotations = tmp_path / "train.json"
    annotations.write_text(Path(data.train).read_text())
    output = tmp_path / "run"
    train(settings(data, output, train=[str(annotations)], max_steps=1))
    document = json.loads(annotations.read_text())
    document["images"] = document["images"][1:]  # another data set under the same name
    annotations.write_text(json.dumps(document))
    with pytest.raises(UsageError, match="annotations .* changed since the run"):
        train(settings(data, output, train=[str(annotations)], max_steps=2, resume=True))


def test_validation_reports_zsl_and_gzsl_and_keeps_the_best(data, tmp_path):
    unseen = tmp_path / "unseen.txt"
    unseen.write_text("square\n")
    output = tmp_path / "run"
    result = train(
        settings(data, output, val=str(data.val), unseen=str(unseen), max_steps=2, val_every=1, progress=True)
    )
    lines = _metric_lines(output, "val")
    assert [line["step"] for line in lines] == [1, 2]
    assert {"zsl/mAP", "gzsl/mAP", "gzsl/F1@3", "live/zsl/mAP"} <= set(lines[0])
    best = max(lines, key=lambda line: line["gzsl/mAP"])
    assert result.best == {"metric": "gzsl/mAP", "value": best["gzsl/mAP"], "step": best["step"]}
    assert (output / "best.safetensors").exists()
    model = load_checkpoint(output / "checkpoint.safetensors")
    assert model.config.train_vocabulary_size == len(LABELS) - 1  # the unseen label is not trained on
    assert (output / "dropped-labels.txt").read_text().startswith("square\t")
    with pytest.raises(DataError, match="square"):
        train(settings(data, tmp_path / "strict", unseen=str(unseen), strict_labels=True, max_steps=1))


def test_tensorboard_without_the_package_is_a_usage_error(data, tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UsageError, match="tensorboard"):
            train(settings(data, tmp_path / "tb", tensorboard=True))
    else:
        train(settings(data, tmp_path / "tb", tensorboard=True, max_steps=1))
        assert any((tmp_path / "tb" / "tensorboard").iterdir())


def test_unusable_data_is_refused_before_training(data, tmp_path):
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"images": [["img/nowhere.png", ["red"]]]}))
    with pytest.raises(DataError, match="exist"):
        train(settings(data, tmp_path / "a", train=[str(missing)]))
    with pytest.raises(DataError, match="one batch"):
        train(settings(data, tmp_path / "b", batch_size=64))
    with pytest.raises(DataError, match="grad-accum"):
        train(settings(data, tmp_path / "c", grad_accum=4))
    with pytest.raises(DataError, match="not found"):  # the validation file too, not after the first steps
        train(settings(data, tmp_path / "v", val=str(tmp_path / "absent.json"), val_every=100))
    assert not (tmp_path / "v" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "v" / "metrics.jsonl").exists() or not (tmp_path / "v" / "metrics.jsonl").read_text()
    with pytest.raises(UsageError, match="differs from the --init checkpoint"):
        train(settings(data, tmp_path / "d", adapter_layers=[0]))


def test_a_fresh_model_gets_reference_defaults_clamped_to_the_backbone(data, tmp_path):
    free = write_init_checkpoint(tmp_path / "free.safetensors", trained=False)
    recipe = TrainRecipe(settings(data, tmp_path / "run", init=str(free)))
    recipe.setup()
    recipe.reporter.close()
    config = recipe.model.config
    assert config.trained and config.adapter_layers == (0, 1, 2) and config.prompt_layers == (0, 1, 2)  # last three
    assert (config.adapter_tokens, config.prompt_tokens, config.temperature_loc) == (8, 4, 2e-3)
    assert config.train_vocabulary_size == len(LABELS) and config.kcot.teacher_weight == 0.05
    with pytest.raises(UsageError, match="layers 0..2"):
        TrainRecipe(settings(data, tmp_path / "bad", init=str(free), adapter_layers=[5])).setup()


def test_shards_train_and_resume_on_the_same_stream(data, tmp_path):
    shards = [str(write_shard(tmp_path / f"part-{i}.tar", 6, seed=10 + i)) for i in range(2)]
    common = dict(train=shards, batch_size=4, schedule="constant")  # label space read from the shards
    straight = train(settings(data, tmp_path / "s", max_steps=4, **common))
    assert straight.steps == 4  # 12 samples counted from the shards: 3 steps an epoch
    first = train(settings(data, tmp_path / "r", max_steps=2, **common))
    second = train(settings(data, tmp_path / "r", max_steps=4, resume=True, **common))
    assert first.losses + second.losses == straight.losses


def test_cli_reads_a_config_file_and_options(data, tmp_path, capsys):
    from ramtag.cli import main

    config = tmp_path / "run.toml"
    config.write_text(
        f'train = ["{data.train}"]\nroot = "{data.root}"\ninit = "{data.init}"\nbatch_size = 2\nnum_workers = 0\n'
    )
    output = tmp_path / "out"

    def main_with_skipped_images(argv: list[str]) -> None:
        """The data holds a missing and a corrupt image: the run completes, skips them, and exits 3."""
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 3

    main_with_skipped_images(
        ["train", "--config", str(config), "-o", str(output), "--max-steps", "1", "--grad-accum", "2", "--no-progress"]
        + ["--ema-decay", "0"]
    )
    captured = capsys.readouterr()
    assert captured.out.strip() == str(output / "checkpoint.safetensors")
    assert "training image(s) were missing or unreadable and skipped" in captured.err
    assert "settings: {" not in captured.err and "train-config.json" in captured.err
    logged = (output / "train.log").read_text()
    assert "settings: {" in logged and "model: {" in logged  # the full record stays in the run folder
    saved = json.loads((output / "train-config.json").read_text())
    assert (saved["batch_size"], saved["grad_accum"], saved["max_steps"], saved["ema_decay"]) == (2, 2, 1, 0.0)
    assert not (output / "checkpoint-live.safetensors").exists()
    # settings from the run
    main_with_skipped_images(["train", "--resume", "-o", str(output), "--max-steps", "2", "--no-progress"])
    assert json.loads((output / "train-summary.json").read_text())["steps"] == 2
    # The saved settings of a resumed run start a new run when reused, as its refusal message advises.
    assert json.loads((output / "train-config.json").read_text())["resume"] is False
    saved_config = str(output / "train-config.json")
    main_with_skipped_images(["train", "--config", saved_config, "-o", str(tmp_path / "again"), "--no-progress"])
    assert json.loads((tmp_path / "again" / "train-summary.json").read_text())["steps"] == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "-o", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    assert "no training data" in capsys.readouterr().err


def test_kcot_options_reach_the_trained_model():
    from ramtag.engine.train.model import _kcot
    from ramtag.errors import UsageError as _UsageError

    kcot = _kcot(TrainConfig(ot_reg=0.2, ot_max_iter=50, ot_tol=1e-4, ot_stop="marginal", teacher_weight=0.1))
    assert (kcot.reg, kcot.max_iter, kcot.tol, kcot.stop, kcot.teacher_weight) == (0.2, 50, 1e-4, "marginal", 0.1)
    with pytest.raises(_UsageError):
        _kcot(TrainConfig(ot_stop="sometimes"))


def _record_step_gradients(monkeypatch) -> list[list[torch.Tensor]]:
    """Make every optimizer step record the gradients it is about to apply (before clipping)."""
    recorded: list[list[torch.Tensor]] = []
    original = TrainRecipe._optimizer_step

    def recording(self):
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        recorded.append(grads)
        return original(self)

    monkeypatch.setattr(TrainRecipe, "_optimizer_step", recording)
    return recorded


def test_gradient_accumulation_averages_the_micro_batch_gradients(data, tmp_path, monkeypatch):
    recorded = _record_step_gradients(monkeypatch)
    frozen = dict(lr=0.0, adapter_lr=0.0, token_lr=0.0, ema_decay=0.0)  # the weights stay put between steps
    train(settings(data, tmp_path / "accumulated", grad_accum=2, max_steps=1, **frozen))
    train(settings(data, tmp_path / "one-by-one", grad_accum=1, max_steps=2, **frozen))
    accumulated, first, second = recorded
    assert any(g.abs().sum() > 0 for g in first)
    for together, a, b in zip(accumulated, first, second):
        torch.testing.assert_close(together, (a + b) / 2, rtol=1e-5, atol=1e-8)
    assert not all(torch.allclose(a, b) for a, b in zip(first, second))  # two different micro-batches


def test_gradient_clipping_bounds_the_applied_update(data, tmp_path, monkeypatch):
    applied: list[float] = []
    original = TrainRecipe._optimizer_step

    def measuring(self):
        for optimizer in self.optimizers:  # read the gradients at the optimizer, after clipping
            step = optimizer.step

            def spy(*args, _step=step, _optimizer=optimizer, **kwargs):
                grads = [p.grad for group in _optimizer.param_groups for p in group["params"] if p.grad is not None]
                norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
                applied.append(float(torch.linalg.vector_norm(norms)))
                return _step(*args, **kwargs)

            optimizer.step = spy
        try:
            return original(self)
        finally:
            for optimizer in self.optimizers:
                del optimizer.step

    monkeypatch.setattr(TrainRecipe, "_optimizer_step", measuring)
    train(settings(data, tmp_path / "free", max_steps=1, schedule="cosine"))
    unclipped = math.sqrt(sum(n * n for n in applied))
    applied.clear()
    train(settings(data, tmp_path / "clipped", max_steps=1, schedule="cosine", clip_grad_norm=unclipped / 10))
    assert unclipped > 0
    assert math.sqrt(sum(n * n for n in applied)) == pytest.approx(unclipped / 10, rel=1e-4)
    line = _metric_lines(tmp_path / "clipped", "train")[0]
    assert line["grad_norm"] == pytest.approx(unclipped, rel=1e-4)  # the log reports the norm before clipping


# -- data that cannot train the label space ---------------------------------------------------------------


def _train_cli(argv: list[str]) -> int:
    from ramtag.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_training_on_img2dataset_captions_is_refused_and_says_what_it_met(data, tmp_path, capsys):
    from tests.train_fixtures import write_img2dataset_shard

    captions = ["a red ball on a wooden table"] * 3 + [f"photo {i} of a blue square in the snow" for i in range(9)]
    shard = write_img2dataset_shard(tmp_path / "00000.tar", captions, seed=0)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    output = tmp_path / "run"
    common = ["--init", str(data.init), "-o", str(output), "--batch-size", "4", "--workers", "0", "--no-progress"]
    assert _train_cli(["train", str(shard), "--labels", str(labels), *common]) == 2
    error = capsys.readouterr().err
    assert f"0 of {len(captions)} training image(s) have a label of the label space" in error
    most_often = "most often 'a red ball on a wooden table' (3)"
    assert f"{len(captions)} label occurrence(s) fall outside it, {most_often}" in error
    assert "read like captions" in error and "Traceback" not in error
    assert "nothing to learn" in (output / "train.log").read_text()  # the log says why the run stopped
    assert (output / "dropped-labels.txt").read_text().splitlines()[0] == "a red ball on a wooden table\t3"
    assert len((output / "dropped-labels.txt").read_text().splitlines()) == 10
    assert not (output / "checkpoint.safetensors").exists() and not (output / "training-state.pt").exists()


def test_tags_outside_the_label_space_in_shards_are_logged_as_for_annotation_files(data, tmp_path):
    from tests.train_fixtures import write_img2dataset_shard

    tags = ["red, round, blurry", "green, square", "blue, round, blurry, out of focus", "red, square"] * 2
    shard = write_img2dataset_shard(tmp_path / "00000.tar", tags, seed=1)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    output = tmp_path / "run"
    result = train(settings(data, output, train=[str(shard)], labels=str(labels), max_steps=1, batch_size=4))
    assert result.steps == 1
    log = (output / "train.log").read_text()
    dropped = "6 label occurrence(s) outside the seen label space dropped; 2 distinct: 'blurry' (4), 'out of focus' (2)"
    assert dropped in log
    assert json.loads((output / "train-summary.json").read_text())["dropped_label_occurrences"] == 6
