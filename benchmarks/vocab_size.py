"""How the bundled demo model scores small and large vocabularies, and whether a vocabulary-matched local
temperature helps (issue 16: "green circle" 0.500 on every image of a 3-label vocabulary).

Why it happens: KCOT's plan has a uniform label marginal, so Σ_i T[b,i,c] = 1/C and the local logit is
(1/C)·(transport-weighted mean cosine)/τ_loc. τ_loc = 2e-3 (the reference's COCO value) gives the local branch
an inverse temperature of 1/(C·τ_loc): 167 at 3 labels, 25 at 20, 0.5 at 1,000, against the global branch's
fixed 1/τ_g (17 for the demo). Small vocabularies saturate the local softmax (one-hot), large ones flatten it.

Rules, each applied to the same forward pass of each vocabulary (the temperature does not change the plan):
  clip_global   the global branch alone, softmax(cos/τ_g)
  fixed         τ_loc as stored (2e-3): what `ramtag tag --model demo` wrote before this study
  global_scale  τ_loc = τ_g/C: local logits C·E/τ_g, E = Σ_i T·sim, exactly on the global branch's scale
  matched       τ_loc = 4·τ_g/C (ramtag's `matched` rule, RamConfig.local_temperature): a quarter of that scale

The factor 4 was chosen on stream 7; the default stream here, 11, is held out from that choice.

Vocabularies: for 2, 3 and 5 labels, random subsets of the synthetic benchmark's 20 labels; 20 is the whole
set; 100 and 1,000 add real CLIP words as distractors (scored on the 20 benchmark columns). "Phrase"
vocabularies mix single labels with "colour shape" phrases (a phrase is present when one object has both),
like the issue's `red, blue, green circle`. The images are the synthetic scenes `ramtag data synth` writes
(same generator, stream `--seed`), with their ground truth.

Metrics: mAP (per label over images, labels with a positive), P@1 (the top label of an image is present,
over images with at least one vocabulary label present), `local saturated` (share of images whose top local
score is above 0.99), `same top` (share of images whose top label is the vocabulary's most frequent top label:
near 1, one label wins everywhere, as "green circle" did) and, for phrase vocabularies, how often the top
label is a phrase against the phrases' share of the vocabulary.

    python benchmarks/vocab_size.py                # 400 images, 20 subsets per small size
    python benchmarks/vocab_size.py --quick
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from ramtag.data.synth import ALL_LABELS, COLOURS, SHAPES
from ramtag.engine.runtime import load_runtime
from ramtag.metrics import mean_average_precision

from common import log, print_table, write_results
from demo_study import distractor_labels, synthetic_images

SATURATED = 0.99
RULES = ("clip_global", "fixed", "global_scale", "matched")


def phrase_targets(scenes, phrase: str) -> np.ndarray:
    colour, shape = phrase.split(" ", 1)
    return np.array([any(o.colour == colour and o.shape == shape for o in s.objects) for s in scenes], np.float32)


def targets_for(data, labels: list[str]) -> np.ndarray:
    """[N, C] ground truth for the vocabulary; distractor words are never present."""
    columns = []
    for label in labels:
        if label in ALL_LABELS:
            columns.append(data.targets[:, ALL_LABELS.index(label)])
        elif " " in label:
            columns.append(phrase_targets(data.scenes, label))
        else:
            columns.append(np.zeros(len(data.scenes), np.float32))
    return np.stack(columns, axis=1)


@torch.no_grad()
def branch_evidence(runtime, images: torch.Tensor, labels: list[str], batch_size: int = 100):
    """(global cosines [N, C], E = Σ_i T·sim [N, C]) from ramtag's own scoring of `labels`."""
    features = runtime.encode_labels(labels)
    model = runtime.model
    tau_loc = float(model.local_temperature(len(labels)))
    tau_g = float(model.temperature)
    cosines, evidence = [], []
    for start in range(0, len(images), batch_size):
        out = runtime.score(images[start:start + batch_size], features)
        cosines.append(out.global_logits.float().cpu() * tau_g)
        evidence.append(out.local_logits.float().cpu() * tau_loc)
    return torch.cat(cosines).numpy(), torch.cat(evidence).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def local_temperatures(model, count: int) -> dict[str, float]:
    """τ_loc of each rule for `count` labels; `fixed` and `matched` come from the model's own code."""
    saved = model.config.local_temperature
    try:
        temperatures = {}
        for rule in ("fixed", "matched"):
            model.config.local_temperature = rule
            temperatures[rule] = float(model.local_temperature(count).detach())
    finally:
        model.config.local_temperature = saved
    temperatures["global_scale"] = float(model.temperature.detach()) / count
    return temperatures


def rule_scores(rule: str, cosines: np.ndarray, evidence: np.ndarray, tau_g: float, tau_loc: dict[str, float]):
    """(final scores, local scores or None) for one temperature rule."""
    glb = softmax(cosines / tau_g)
    if rule == "clip_global":
        return glb, None
    local = softmax(evidence / tau_loc[rule])
    return (glb + local) / 2, local


def metrics(scores: np.ndarray, local: np.ndarray | None, targets: np.ndarray, scored: list[int]) -> dict:
    row = {"mAP": mean_average_precision(scores[:, scored], targets[:, scored])[0]}
    any_present = targets.any(axis=1)
    top = scores.argmax(axis=1)
    row["P@1"] = float(targets[np.arange(len(top)), top][any_present].mean())
    row["same top"] = float(np.bincount(top, minlength=scores.shape[1]).max() / len(top))
    if local is not None:
        row["local saturated"] = float((local.max(axis=1) > SATURATED).mean())
    return row


def vocabularies(size: int, subsets: int, rng: np.random.Generator, seed: int) -> list[list[str]]:
    if size < len(ALL_LABELS):
        return [list(rng.choice(ALL_LABELS, size=size, replace=False)) for _ in range(subsets)]
    extra = size - len(ALL_LABELS)
    return [list(ALL_LABELS) + (distractor_labels(extra, seed, set(ALL_LABELS)) if extra else [])]


def phrase_vocabularies(size: int, subsets: int, rng: np.random.Generator) -> list[list[str]]:
    """`size` labels, a third of them (at least one) "colour shape" phrases, the rest single labels."""
    phrases = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    count = max(1, size // 3)
    return [
        list(rng.choice(phrases, size=count, replace=False)) + list(rng.choice(ALL_LABELS, size - count, False))
        for _ in range(subsets)
    ]


def study(runtime, data, family: str, sizes: list[int], subsets: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    tau_g = float(runtime.model.temperature.detach())
    rows = []
    for size in sizes:
        vocabs = phrase_vocabularies(size, subsets, rng) if family == "phrases" else vocabularies(
            size, subsets, rng, seed
        )
        per_rule: dict[str, list[dict]] = {rule: [] for rule in RULES}
        phrase_wins = []
        for labels in vocabs:
            targets = targets_for(data, labels)
            scored = [i for i, label in enumerate(labels) if label in ALL_LABELS or " " in label]
            if not targets[:, scored].any():
                continue
            cosines, evidence = branch_evidence(runtime, data.images, labels)
            tau_loc = local_temperatures(runtime.model, len(labels))
            is_phrase = np.array([" " in label for label in labels])
            for rule in RULES:
                scores, local = rule_scores(rule, cosines, evidence, tau_g, tau_loc)
                per_rule[rule].append(metrics(scores, local, targets, scored))
                if family == "phrases":
                    phrase_wins.append((rule, float(is_phrase[scores.argmax(axis=1)].mean())))
        for rule, results in per_rule.items():
            row = {"family": family, "labels": size, "vocabularies": len(results), "rule": rule}
            row.update({key: float(np.mean([r[key] for r in results])) for key in results[0]})
            wins = [share for name, share in phrase_wins if name == rule]
            if wins:
                row["top is a phrase"] = float(np.mean(wins))
                row["phrase share"] = max(1, size // 3) / size
            rows.append(row)
        log(f"{family} {size} labels: {len(vocabs)} vocabularies done")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="benchmark images")
    parser.add_argument("--seed", type=int, default=11, help="synthetic stream (held out: neither the demo CLIP nor "
                        "the choice of the matched factor saw it)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 5, 20, 100, 1000])
    parser.add_argument("--phrase-sizes", type=int, nargs="+", default=[3, 5, 20])
    parser.add_argument("--subsets", type=int, default=20, help="random vocabularies per size below 20")
    parser.add_argument("--quick", action="store_true", help="100 images, 4 subsets, sizes 3, 20, 100")
    args = parser.parse_args()
    if args.quick:
        args.n, args.subsets, args.sizes, args.phrase_sizes = 100, 4, [3, 20, 100], [3]
    torch.manual_seed(0)
    # The fixed rule is the model's stored τ_loc, whatever the model's own default rule is now.
    runtime = load_runtime(model="demo", device="cpu", overrides={"local_temperature": "fixed"})
    started = time.perf_counter()
    data = synthetic_images(runtime, args.n, args.seed)
    rows = study(runtime, data, "words", args.sizes, args.subsets, args.seed)
    rows += study(runtime, data, "phrases", args.phrase_sizes, args.subsets, args.seed + 1)
    model = runtime.model
    tau_g, tau_loc = float(model.temperature.detach()), float(model.temperature_loc.detach())
    payload = {
        "rows": rows,
        "settings": vars(args),
        "temperatures": {"tau_g": tau_g, "tau_loc": tau_loc},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "python": platform.python_version()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    path = write_results("vocab_size", payload, runtime.device, quick=args.quick)
    columns = ["family", "labels", "vocabularies", "rule", "mAP", "P@1", "same top", "local saturated",
               "top is a phrase", "phrase share"]
    print_table(f"demo model, {args.n} synthetic images (seed {args.seed}); τ_g = {tau_g:.4f}, τ_loc = {tau_loc:.0e}",
                rows, columns)
    print(f"\nwritten to {path} in {payload['seconds']} s")


if __name__ == "__main__":
    main()
