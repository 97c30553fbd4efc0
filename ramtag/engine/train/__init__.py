"""`ramtag train`: fit RAM's Ladder Local Adapters, adapter tokens, deep prompts and temperatures.

The package, by job: `recipe` (setup -> train -> save; `train()` is the entry), `config` (TrainConfig, config
files), `data` (label space, per-rank batches), `model` (the model to train, optimizer groups, precision),
`schedule` (learning rates), `ema`, `batchnorm` (statistics over all ranks), `validation`, `state` (the
training-state file and the run folder's files) and `log` (train.log, metrics.jsonl; the progress bar is
ramtag.engine.reporter's, as for tag and eval). Augmentation is ramtag.data.augment; every collective is
ramtag.engine.dist's. This module imports nothing, so the CLI reads `config` without loading torch.

One optimizer step is `grad_accum` calls of `_loss_step`: the MMC loss on the global and local logits of the
batch, with KCOT's teacher term in the transport cost.

Distributed runs (`torchrun --nproc-per-node N -m ramtag train ...`) see the global batch wherever the method
looks across it, so that one step of N processes with batch b equals one step of one process with batch N·b:

* the MMC softmax spans every image-label pair of the global batch: each rank gathers all ranks' logits and
  targets (its own slice keeps its gradient) and computes the same loss;
* the teacher's minimum, which fills the non-ground-truth entries, is the minimum over all ranks;
* the adapters' batch-norm statistics span all ranks (SyncBatchNorm on CUDA, `GlobalBatchNorm2d` elsewhere);
* there is no DDP wrapper: each rank's backward covers its own slice of the global loss, and the trainable
  gradients are all-reduced with SUM (not DDP's average), which gives exactly the gradient of the global loss.

Departures from the reference (github.com/EricTan7/RAM), all deliberate:

* its MMC loss and teacher minimum are per rank (per-GPU batch), so its multi-GPU runs optimise a different
  objective from its single-GPU runs; here both span the global batch. (The teacher minimum barely matters: it
  fills whole label columns of the cost with one constant, which a balanced transport plan ignores; only
  Sinkhorn's stopping point can see it.)
* its single-GPU loader does not shuffle; here every epoch is a seeded permutation, the same for any number of
  processes (see ramtag.engine.train.data);
* its EMA is re-created from the live weights at every epoch; here one EMA runs through the whole training,
  with the warm-up min(decay, (1 + t) / (10 + t));
* augmentation: same kinds and strengths, applied at the training size (see ramtag.data.augment);
* `--grad-accum` has no reference counterpart: the MMC softmax spans one micro-batch (of every rank), so
  accumulating k batches of b is not the same objective as one batch of k·b.

Only rank 0 writes files. Outputs in `output`: `checkpoint.safetensors` (the EMA weights when EMA is on: what
to tag and evaluate with), `checkpoint-live.safetensors` (the live weights, with EMA on), `best.safetensors`
(best validation metric), `training-state.pt` (resume), `train-config.json`, `metrics.jsonl`, `train.log`,
`bad-images.txt`, `dropped-labels.txt`, `train-summary.json`.
"""
