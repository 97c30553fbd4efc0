"""Where a tagging run spends its time: decode, model (without KCOT), KCOT, selection and writing.

Measured serially in one process, stage by stage, on the same images and model as the throughput arms.
KCOT is timed by wrapping the KCOT functions that `ramtag.model.ram` calls (cost, marginals, Sinkhorn),
so the model is run unchanged.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from common import autocast, synchronize

KCOT_FUNCTIONS = ("kcot_cost", "region_marginal", "uniform_label_marginal", "sinkhorn")


@contextmanager
def timed_kcot(device: torch.device) -> Iterator[dict[str, float]]:
    """Accumulate the seconds spent in KCOT's functions (and Sinkhorn iterations) while inside."""
    import ramtag.model.ram as ram_module

    totals = {"seconds": 0.0, "calls": 0, "iterations": 0}
    originals = {name: getattr(ram_module, name) for name in KCOT_FUNCTIONS}

    def wrap(function):
        def timed(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            synchronize(device)
            totals["seconds"] += time.perf_counter() - start
            if hasattr(result, "iterations"):
                totals["calls"] += 1
                totals["iterations"] += result.iterations
            return result

        return timed

    for name, function in originals.items():
        setattr(ram_module, name, wrap(function))
    try:
        yield totals
    finally:
        for name, function in originals.items():
            setattr(ram_module, name, function)


def model_seconds(
    runtime, batches: list[torch.Tensor], features: torch.Tensor, precision: str
) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    """(seconds for all batches, KCOT totals, scores per batch)."""
    device = runtime.device
    scores = []
    with timed_kcot(device) as kcot:
        synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            with torch.inference_mode(), autocast(device, precision):
                scores.append(runtime.model(batch, features).scores.float())
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, kcot, scores


def stage_breakdown(runtime, folder: Path, labels: list[str], batches: list[torch.Tensor], features: torch.Tensor,
                    out_dir: Path, precision: str, top_k: int = 5) -> dict[str, float]:
    """Seconds per image in each stage of `ramtag tag`, each measured alone in this process (decoding on one
    thread, as a DataLoader worker runs it; the model on this process's threads)."""
    from ramtag.data.assemble import finish_units
    from ramtag.data.layout import _unlock_output, prepare_output
    from ramtag.data.parts import UnitPartWriter
    from ramtag.data.records import FileDataset
    from ramtag.data.rows import TagBatch, schema_with_metadata, table_schema
    from ramtag.data.sources import plan_inputs
    from ramtag.data.units import UnitEnd
    from ramtag.selection import select_tags

    plan = plan_inputs([str(folder)])
    dataset = FileDataset(plan.files_for_rank(0, 1), runtime.transform())
    count = len(dataset)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker, where `ramtag tag` decodes
    try:
        start = time.perf_counter()
        records = [dataset[i] for i in range(count)]
        decode = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    if any(r.image is None for r in records):
        raise RuntimeError("a benchmark image failed to decode")

    model_total, kcot, scores = model_seconds(runtime, batches, features, precision)

    start = time.perf_counter()
    layout = prepare_output(out_dir / "stages.parquet", overwrite=True, identity={})
    metadata = {"benchmark": True}
    writer = UnitPartWriter(layout.work_dir, schema_with_metadata(table_schema(), metadata), labels, run=layout.run)
    offset = 0
    keys = [r.key for r in records]
    for batch_scores in scores:  # as `ramtag tag` writes them: the rows of one work unit, committed, assembled
        selection = select_tags(batch_scores, top_k=top_k)
        rows = len(batch_scores)
        batch = TagBatch.from_selection(keys[offset:offset + rows], keys[offset:offset + rows], selection)
        writer.write(batch, [0] * rows)
        offset += rows
    writer.commit(UnitEnd(0, None, (), 0, 0, {}))
    writer.close()
    finish_units(layout.output, layout.kind, layout.work_dir, [0], metadata, table_schema())
    _unlock_output(layout.output)
    write = time.perf_counter() - start

    kcot_seconds = kcot["seconds"]
    stages = {
        "decode_resize": decode,
        "model_without_kcot": model_total - kcot_seconds,
        "kcot": kcot_seconds,
        "select_write": write,
    }
    total = sum(stages.values())
    result = {f"{name}_ms_per_image": 1000 * value / count for name, value in stages.items()}
    result.update({f"{name}_share": value / total for name, value in stages.items()})
    result["kcot_share_of_model"] = kcot_seconds / model_total
    result["sinkhorn_iterations_mean"] = kcot["iterations"] / max(1, kcot["calls"])
    return result
