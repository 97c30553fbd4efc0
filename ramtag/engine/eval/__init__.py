"""`ramtag eval`: metrics of a model (or of a score table) on labelled images, baselines, calibration, reports.

The package, by job:

* `types`: settings, protocols, arms, results and the Calibration they carry; imports no other module here.
* `protocol`: the steps both scorers share (open the data, plan ZSL/GZSL or multi-label, one arm's metrics,
  warnings).
* `model`: score with a model, one pass per protocol, with the baselines, on one process or many (torchrun).
* `table`: score a `ramtag tag --all-scores` table instead, matched to the annotations by key.
* `calibrate`: per-label thresholds fitted on an evaluation, and their file.
* `render`: the terminal tables, the JSON report and the Markdown summary; `plots`: the PNG plots.
* `run`: the command from end to end: check the report targets, score, write the reports.

Rendering never imports the scoring loops, and the types import nothing else of the package
(tests/test_layers.py holds both). This module imports nothing, so importing a part does not load the rest.
"""
