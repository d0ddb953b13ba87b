"""Evaluation: zero-shot classification and retrieval, linear probes, on CLIP_benchmark-layout sets, image folders
and HF datasets; suites, reports and plots; model loading for ``clipforge eval``."""

from clipforge.eval_config import EvalConfig
from clipforge.evaluation.datasets import Benchmark, benchmark_loader, load_benchmark
from clipforge.evaluation.encoder import Encoder, HFClipEncoder, OpenClipEncoder
from clipforge.evaluation.linear_probe import linear_probe
from clipforge.evaluation.loading import EvalModel, load_eval_model
from clipforge.evaluation.report import headline, markdown_table, write_report
from clipforge.evaluation.retrieval import retrieval
from clipforge.evaluation.suite import load_suite, run_suite
from clipforge.evaluation.zeroshot import build_classifier, zero_shot_classification

__all__ = [
    "Benchmark",
    "Encoder",
    "EvalConfig",
    "EvalModel",
    "HFClipEncoder",
    "OpenClipEncoder",
    "benchmark_loader",
    "build_classifier",
    "headline",
    "linear_probe",
    "load_benchmark",
    "load_eval_model",
    "load_suite",
    "markdown_table",
    "retrieval",
    "run_suite",
    "write_report",
    "zero_shot_classification",
]
