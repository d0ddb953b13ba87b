"""The ``eval`` section of the run config: zero-shot evaluation during and after training.

It lives outside ``clipforge.evaluation``, whose package imports torch and every evaluator (``evaluation/suite.py``
runs the suite), so that reading and validating a config (``clipforge train --help``, ``clipforge submit``) imports
neither.
"""

from __future__ import annotations

from dataclasses import dataclass

# The evaluation tasks and dataset layouts a suite entry (or `clipforge eval --dataset`) names; here, torch-free,
# so that the CLI's parser can offer them as choices without importing the evaluators.
TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
FORMATS = ("wds", "imagefolder", "hf")


@dataclass
class EvalConfig:
    """Zero-shot evaluation during and after training."""

    suite: str | None = None
    """Suite YAML (eval/*.yaml) run at the end of training and every eval.every_n_steps. None = no evaluation."""
    every_n_steps: int = 0
    """Also evaluate every N optimizer steps (0 = only at the end)."""
    batch_size: int = 256
    """Images per batch when embedding a benchmark."""
    num_workers: int = 2
    """DataLoader workers decoding benchmark images."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ValueError(f"eval.every_n_steps: must be >= 0, got {self.every_n_steps}")
