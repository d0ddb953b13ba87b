"""Zero-shot evaluation: classification and retrieval on CLIP_benchmark-layout sets, suites, reports."""

from clipforge.evaluation.encoder import Encoder, OpenClipEncoder
from clipforge.evaluation.retrieval import retrieval
from clipforge.evaluation.suite import EvalConfig, load_suite, markdown_table, run_suite
from clipforge.evaluation.zeroshot import build_classifier, zero_shot_classification

__all__ = ["Encoder", "EvalConfig", "OpenClipEncoder", "build_classifier", "load_suite", "markdown_table",
           "retrieval", "run_suite", "zero_shot_classification"]
