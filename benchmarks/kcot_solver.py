"""KCOT's Sinkhorn: ramtag's batched solver against POT, at equal iteration counts; precision; share of model time.

1. Speed and agreement on realistic KCOT problems (batch x 196 regions x labels; cost and region marginal
   built exactly as RAM builds them from cosine similarities), every solver running the same number of
   iterations (convergence checks disabled: tol 0), arms interleaved:
   - `ramtag`: ramtag.model.kcot.sinkhorn (batched, matrix products);
   - `pot_solve_batch`: POT's batched API `ot.batch.solve_batch(method="sinkhorn")` (also computes the OT value);
   - `pot_bregman_batch`: the bare iterations under it, `ot.batch.bregman_projection_batch` on K = exp(-C/reg);
   - `pot_sinkhorn_loop`: per-problem `ot.sinkhorn` in a Python loop (timed on a subset, scaled to the batch).
   Agreement: max |T_ramtag - T_pot| relative to max T, per arm.
2. Precision: similarities rounded to bf16 (what autocast produces) against fp32, through ramtag's solver
   (which solves in fp32 whatever comes in) and through POT's plain solver kept in bf16.
3. Share of model time: the ViT-B/16-sized RAM forward (random weights, adapters at 9-11) at 1,000 labels, with
   KCOT's functions timed inside it (converged with the default tolerance, and forced to 100 iterations).

    python benchmarks/kcot_solver.py            # a few minutes on 2 idle cores
    python benchmarks/kcot_solver.py --quick
"""

from __future__ import annotations

import argparse
import warnings

import torch

import common
from common import log
from stages import timed_kcot

REGIONS = 196
REG = 0.1
TARGET_KCOT_SHARE = 0.05


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: per-core figures; on shared cores 2 OpenMP threads that spin-wait "
        "make small kernels erratic, see the README)",
    )
    parser.add_argument("--shapes", default="32x80,128x80,512x80,32x1000,128x1000",
                        help="BATCHxLABELS list (default adds 512x1000 on GPU)")
    parser.add_argument("--iterations", type=int, default=50, help="Sinkhorn iterations every solver runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-problems", type=int, default=8, help="problems the per-problem ot.sinkhorn loop solves")
    parser.add_argument("--share-batch", type=int, default=None, help="images per RAM forward (default 8 CPU, 64 GPU)")
    parser.add_argument("--share-labels", type=int, default=1000)
    parser.add_argument("--share-repeats", type=int, default=3)
    parser.add_argument("--no-share", action="store_true", help="skip the share-of-model-time part (needs ViT-B)")
    parser.add_argument("--quick", action="store_true")
    return parser.parse_args()


def clip_like_features(batch: int, labels: int, seed: int, dim: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit region features [B, N, D] and label features [C, D] whose cosines sit where CLIP's do.

    A shared direction gives the mean cosine (about 0.22, CLIP ViT-B/16's typical image-text value) and
    independent noise its spread (about 0.035); a few labels are made to match a patch of regions, as
    objects in a picture do.
    """
    generator = torch.Generator().manual_seed(seed)
    common_direction = 0.53 * torch.randn(dim, generator=generator)
    label_noise = torch.randn(labels, dim, generator=generator)
    regions = common_direction + torch.randn(batch, REGIONS, dim, generator=generator)
    for image in range(batch):
        present = torch.randint(0, labels, (3,), generator=generator)
        for label in present.tolist():
            start = int(torch.randint(0, REGIONS - 20, (1,), generator=generator))
            regions[image, start:start + 20] += 0.3 * label_noise[label]
    label_features = common_direction + label_noise
    return torch.nn.functional.normalize(regions, dim=-1), torch.nn.functional.normalize(label_features, dim=-1)


def kcot_inputs(regions: torch.Tensor, label_features: torch.Tensor):
    """(region marginal, label marginal, cost, similarity) exactly as RAM builds them (similarity in fp32)."""
    from ramtag.model.kcot import kcot_cost, region_marginal, uniform_label_marginal

    similarity = regions.float() @ label_features.float().t()
    cost = kcot_cost(similarity, common.OPENAI_LOGIT_SCALE)
    return region_marginal(similarity), uniform_label_marginal(similarity), cost, similarity


def kcot_problem(batch: int, labels: int, seed: int, device: torch.device):
    regions, label_features = clip_like_features(batch, labels, seed)
    return kcot_inputs(regions.to(device), label_features.to(device))


def vecmat_sinkhorn(source, target, cost, reg: float, iterations: int) -> torch.Tensor:
    """A sketch, not ramtag's code: the same plain iterations with K c and K^T r written as (1 x n) @ (n x m)
    products, which CPU BLAS runs far faster than the (n x m) @ (m x 1) batched products (see the README)."""
    kernel = torch.exp(-(cost / reg - (cost / reg).amin()))
    kernel_t = kernel.transpose(1, 2)
    row, col = torch.ones_like(source), torch.ones_like(target)
    for _ in range(iterations):
        row = source / torch.bmm(col.unsqueeze(1), kernel_t).squeeze(1)
        col = target / torch.bmm(row.unsqueeze(1), kernel).squeeze(1)
    return row.unsqueeze(-1) * kernel * col.unsqueeze(-2)


def solver_arms(source, target, cost, iterations: int, loop_problems: int):
    """{arm: callable returning the plan (or its first `loop_problems` plans)}."""
    import ot
    import ot.batch

    from ramtag.model.kcot import sinkhorn

    def ramtag_arm():
        result = sinkhorn(source, target, cost, reg=REG, max_iter=iterations, tol=0.0)
        assert result.iterations == iterations and not result.log_domain
        return result.plan

    def pot_solve_batch():
        return ot.batch.solve_batch(cost, REG, source, target, max_iter=iterations, tol=0.0, method="sinkhorn").plan

    def pot_bregman():
        return ot.batch.bregman_projection_batch(torch.exp(-cost / REG), source, target, max_iter=iterations, tol=0.0)[
            "T"
        ]

    def pot_loop():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge": intended, the iteration count is fixed
            return torch.stack(
                [
                    ot.sinkhorn(source[i], target[i], cost[i], REG, numItermax=iterations, stopThr=0.0, warn=False)
                    for i in range(loop_problems)
                ]
            )

    def vecmat_arm():
        return vecmat_sinkhorn(source, target, cost, REG, iterations)

    return {"ramtag": ramtag_arm, "pot_solve_batch": pot_solve_batch, "pot_bregman_batch": pot_bregman,
            "pot_sinkhorn_loop": pot_loop, "vecmat_sketch": vecmat_arm}


def bench_solvers(args, device) -> list[dict]:
    rows = []
    for shape in args.shapes.split(","):
        batch, labels = (int(v) for v in shape.lower().split("x"))
        source, target, cost, _ = kcot_problem(batch, labels, seed=batch + labels, device=device)
        loop_problems = min(args.loop_problems, batch)
        arms = solver_arms(source, target, cost, args.iterations, loop_problems)
        plans = {name: arm() for name, arm in arms.items()}  # also the warm-up
        log(f"[solver] batch {batch}, {REGIONS} regions, {labels} labels, {args.iterations} iterations")
        samples = common.interleave(arms, args.repeats, warmup=0, device=device)
        reference = plans["ramtag"]
        scale = float(reference.abs().max())
        row = {"batch": batch, "regions": REGIONS, "labels": labels, "iterations": args.iterations}
        for name, seconds in samples.items():
            median = common.summary(seconds)["median"]
            if name == "pot_sinkhorn_loop":
                median *= batch / loop_problems  # scaled from the subset to the whole batch
                diff = (plans[name] - reference[:loop_problems]).abs().max()
            else:
                diff = (plans[name] - reference).abs().max()
            row[f"{name}_ms"] = 1000 * median
            if name != "ramtag":
                row[f"{name}_max_rel_diff"] = float(diff) / scale
        row["pot_solve_batch_over_ramtag"] = row["pot_solve_batch_ms"] / row["ramtag_ms"]
        row["pot_bregman_batch_over_ramtag"] = row["pot_bregman_batch_ms"] / row["ramtag_ms"]
        row["pot_sinkhorn_loop_over_ramtag"] = row["pot_sinkhorn_loop_ms"] / row["ramtag_ms"]
        row["vecmat_sketch_over_ramtag"] = row["vecmat_sketch_ms"] / row["ramtag_ms"]
        row["seconds"] = samples
        rows.append(row)
        del plans, source, target, cost
    return rows


def bench_precision(device, batch: int = 32, labels: int = 80, iterations: int = 100) -> list[dict]:
    """What bf16 does to the plan and the local logits, each solve running `iterations` iterations.

    Two separate effects: (a) autocast hands RAM bf16 features, so the cosines (computed in fp32 from them)
    move slightly, and the plan with them; (b) a solver that keeps bf16 throughout loses precision in its
    own arithmetic. (a) is compared with the fp32 plan; (b) with the fp32 solve of the same rounded inputs.
    """
    import ot.batch

    from ramtag.model.kcot import sinkhorn

    regions, label_features = clip_like_features(batch, labels, seed=7)
    regions, label_features = regions.to(device), label_features.to(device)

    def solve(inputs):
        source, target, cost, similarity = inputs
        return sinkhorn(source, target, cost, reg=REG, max_iter=iterations, tol=0.0).plan, similarity, source

    def compare(case: str, plan, similarity, source, reference) -> dict:
        ref_plan, ref_similarity, _ = reference
        plan = plan.float()
        finite = bool(torch.isfinite(plan).all())
        row = {"case": case, "finite": finite}
        if not finite:
            return row
        local = (plan * similarity.float()).sum(1)
        ref_local = (ref_plan * ref_similarity).sum(1)
        top = local.topk(5, dim=-1).indices.sort(-1).values
        ref_top = ref_local.topk(5, dim=-1).indices.sort(-1).values
        row.update({
            "plan_max_rel_diff": float((plan - ref_plan).abs().max() / ref_plan.abs().max()),
            "row_marginal_max_rel_err": float(((plan.sum(2) - source).abs() / source).max()),
            "local_logit_max_rel_diff": float(((local - ref_local).abs() / ref_local.abs()).max()),
            "top5_sets_equal": float((top == ref_top).all(-1).float().mean()),
        })
        return row

    exact = solve(kcot_inputs(regions, label_features))
    rows = [compare("fp32 features, fp32 solve (reference)", *exact, exact)]
    rounded_inputs = kcot_inputs(regions.to(torch.bfloat16), label_features.to(torch.bfloat16))
    rounded = solve(rounded_inputs)
    rows.append(compare("(a) bf16 features (autocast), ramtag solve vs fp32", *rounded, exact))
    # (b): the cost and marginals themselves handed over in bf16, against the fp32 solve of the same problem.
    source, target, cost, similarity = rounded_inputs
    low = [t.to(torch.bfloat16) for t in (source, target, cost)]
    upcast = sinkhorn(*low, reg=REG, max_iter=iterations, tol=0.0).plan
    rows.append(
        compare("(b) bf16 cost+marginals, ramtag (upcasts, solves in fp32)", upcast, similarity, source, rounded)
    )
    kept = ot.batch.bregman_projection_batch(torch.exp(-low[2] / REG), low[0], low[1], max_iter=iterations, tol=0.0)[
        "T"
    ]
    rows.append(compare("(b) bf16 cost+marginals, POT plain solver kept in bf16", kept, similarity, source, rounded))
    small = sinkhorn(*exact_inputs_small_reg(regions, label_features), reg=0.01, max_iter=iterations, tol=0.0)
    rows.append(
        {
            "case": "fp32, reg 0.01 (exp(-C/reg) spans e^-100: log domain)",
            "finite": bool(torch.isfinite(small.plan).all()),
            "log_domain": small.log_domain,
        }
    )
    return rows


def exact_inputs_small_reg(regions, label_features):
    source, target, cost, _ = kcot_inputs(regions, label_features)
    return source, target, cost


def bench_share(args, device) -> list[dict]:
    """KCOT's share of a ViT-B/16-sized RAM forward at `share_labels` labels (cases interleaved)."""
    from ramtag.model.config import KcotConfig

    clip = common.vitb_clip().to(device)
    model = common.ram_model(clip, trained=True).to(device)
    features = common.random_label_features(args.share_labels, int(clip.visual.proj.shape[1])).to(device)
    images = torch.randn(args.share_batch, 3, 224, 224, device=device)
    cases = {
        "default stop (tol 1e-3, at most 100 iterations)": KcotConfig(),
        "tol 1e-30 (runs until fp32 stops changing, at most 100)": KcotConfig(tol=1e-30),
    }
    measured = {name: {"total": [], "kcot": [], "iterations": []} for name in cases}

    def arm(name):
        def run():
            with timed_kcot(device) as timer, common.stopwatch() as watch:
                model(images, features, kcot=cases[name])
                common.synchronize(device)
            measured[name]["total"].append(watch["seconds"])
            measured[name]["kcot"].append(timer["seconds"])
            measured[name]["iterations"].append(timer["iterations"])
        return run

    with torch.inference_mode():
        model(images[:1], features)  # warm-up
        common.interleave({name: arm(name) for name in cases}, args.share_repeats, warmup=0, device=device)
    rows = []
    for name, values in measured.items():
        shares = [k / t for k, t in zip(values["kcot"], values["total"])]
        share = common.summary(shares)["median"]
        rows.append({
            "case": name, "batch": args.share_batch, "labels": args.share_labels,
            "model_ms_per_image": 1000 * common.summary(values["total"])["median"] / args.share_batch,
            "kcot_ms_per_image": 1000 * common.summary(values["kcot"])["median"] / args.share_batch,
            "kcot_share_of_model": share,
            "sinkhorn_iterations": common.summary(values["iterations"])["median"],
            f"share_below_{TARGET_KCOT_SHARE}": share < TARGET_KCOT_SHARE,
        })
        log(f"[share] {name}: {share:.2%} of model time")
    return rows


def main() -> None:
    args = parse_args()
    device = common.pick_device(args.device)
    threads = common.set_threads(args.threads)
    gpu = device.type == "cuda"
    if gpu and "512x1000" not in args.shapes:
        args.shapes += ",512x1000"
    if args.quick:
        args.shapes, args.iterations, args.repeats, args.share_repeats = "32x80,32x1000", 20, 2, 1
    args.share_batch = args.share_batch or (64 if gpu else (2 if args.quick else 8))
    machine = common.machine_info(device)
    solver_rows = bench_solvers(args, device)
    precision_rows = bench_precision(device)
    share_rows = [] if args.no_share else bench_share(args, device)
    payload = {"benchmark": "kcot_solver", "machine": machine, "threads": threads, "settings": vars(args),
               "solvers": solver_rows, "precision": precision_rows, "share": share_rows}
    path = common.write_results("kcot_solver", payload, device, quick=args.quick)
    common.print_table(
        f"Sinkhorn at {args.iterations} iterations each (ms per batch, medians of {args.repeats}; {device}, "
        f"{threads} threads)",
        [{k: v for k, v in r.items() if k != "seconds"} for r in solver_rows],
    )
    common.print_table("bf16 vs fp32 (batch 32, 80 labels, 100 iterations each)", precision_rows)
    if share_rows:
        common.print_table("KCOT share of the RAM forward (ViT-B/16-sized, adapters)", share_rows)
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
