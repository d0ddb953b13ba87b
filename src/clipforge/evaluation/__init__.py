"""Evaluation: zero-shot classification and retrieval, linear probes, on CLIP_benchmark-layout sets, image folders
and HF datasets; dense evaluation (segmentation by linear probe and zero-shot, referring expressions) on
segmentation folders and referring-expression JSON; suites, reports and plots; embedding health; model loading for
``clipforge eval``.

The names below are imported on first use (PEP 562), not with the package, so that ``clipforge.evaluation.config``
(the ``eval`` section and the suite schema, read by every command) imports no torch. The functions named as their
modules (``retrieval``, ``linear_probe``) are imported from those modules: a package attribute of that name is the
module once it is imported.
"""

import importlib

_EXPORTS = {
    "EvalConfig": "clipforge.evaluation.config",
    "Benchmark": "clipforge.evaluation.datasets",
    "benchmark_loader": "clipforge.evaluation.datasets",
    "load_benchmark": "clipforge.evaluation.datasets",
    "DenseFeatures": "clipforge.evaluation.dense",
    "encode_dense": "clipforge.evaluation.dense",
    "dense_kind": "clipforge.evaluation.dense_datasets",
    "load_referring_set": "clipforge.evaluation.dense_datasets",
    "load_segmentation_set": "clipforge.evaluation.dense_datasets",
    "Encoder": "clipforge.evaluation.encoder",
    "HFClipEncoder": "clipforge.evaluation.encoder",
    "OpenClipEncoder": "clipforge.evaluation.encoder",
    "EvalModel": "clipforge.evaluation.loading",
    "load_eval_model": "clipforge.evaluation.loading",
    "headline": "clipforge.evaluation.report",
    "markdown_table": "clipforge.evaluation.report",
    "write_report": "clipforge.evaluation.report",
    "referring_expressions": "clipforge.evaluation.referring",
    "linear_probe_segmentation": "clipforge.evaluation.segmentation",
    "zero_shot_segmentation": "clipforge.evaluation.segmentation",
    "load_suite": "clipforge.evaluation.suite",
    "run_suite": "clipforge.evaluation.suite",
    "build_classifier": "clipforge.evaluation.zeroshot",
    "zero_shot_classification": "clipforge.evaluation.zeroshot",
    "embedding_health": "clipforge.evaluation.health",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
