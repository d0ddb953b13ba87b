"""The model card (README.md): Hub metadata, results, training data and recipe, how to load.

Metadata (library, tags, license, datasets, pipeline tag) is written with ``huggingface_hub``'s
``ModelCardData`` so the Hub parses it as it parses its own. Results come from a ``clipforge eval``
JSON (``{dataset: metrics}``) rendered by the evaluation package's ``markdown_table``. The usage examples
classify with the first class names of the first classification set in those results (the names its per-class
accuracies are keyed by, so the suite's own), and with generic labels only when no set names classes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from clipforge.models import BuiltModel


@dataclass
class CardInfo:
    """What the card says beyond the model itself."""

    name: str
    """Repository id (org/name) or folder name: the title and the name in the loading snippets."""
    source: str = ""
    """The exported checkpoint."""
    run_config: dict[str, Any] | None = None
    """The run's resolved config (config.yaml as a dict): training data and recipe."""
    eval_results: dict[str, Any] | None = None
    eval_source: str | None = None
    license: str = "mit"
    datasets: list[str] = field(default_factory=list)
    """Hub dataset ids for the metadata, besides those read from hf://datasets/... training URLs."""


def find_eval_results(run_dir: Path, checkpoint_name: str) -> tuple[Path, dict] | None:
    """The run's ``clipforge eval`` JSON for this checkpoint (``*{checkpoint_name}.json``), else the newest one."""
    files = sorted((run_dir / "eval").glob("*.json"), key=lambda path: path.stat().st_mtime)
    if not files:
        return None
    matching = [path for path in files if path.stem.endswith(checkpoint_name)]
    chosen = (matching or files)[-1]
    return chosen, json.loads(chosen.read_text())


def _sources(run_config: dict) -> list[dict]:
    data = run_config.get("data") or {}
    sources = list(data.get("sources") or [])
    if data.get("train_urls"):
        sources += [{"urls": urls} for urls in str(data["train_urls"]).split("::")]
    return sources


def hub_datasets(run_config: dict | None, extra: list[str]) -> list[str]:
    found = list(extra)
    for source in _sources(run_config or {}):
        match = re.match(r"hf://datasets/([^/@]+/[^/@]+)", str(source.get("urls", "")))
        if match and match.group(1) not in found:
            found.append(match.group(1))
    return found


def _results_section(info: CardInfo) -> str:
    if not info.eval_results:
        return "No `clipforge eval` results were found for this run.\n"
    from clipforge.evaluation import markdown_table

    try:
        table = markdown_table(info.eval_results)
    except (KeyError, TypeError, AttributeError):  # a results file of another shape: list its numbers
        rows = [
            f"| {name} | {key} | {value:.4g} |"
            for name, metrics in info.eval_results.items()
            if isinstance(metrics, dict)
            for key, value in metrics.items()
            if isinstance(value, (int, float))
        ]
        table = "\n".join(["| dataset | metric | value |", "|---|---|---|", *rows])
    return f"Zero-shot results from `clipforge eval` (`{info.eval_source}`):\n\n{table}\n"


RECIPE = (
    ("model.name", "architecture"),
    ("model.init_from", "initialised from"),
    ("loss.kind", "loss"),
    ("train.steps", "steps"),
    ("data.batch_size", "global batch size"),
    ("train.accum_steps", "accumulation"),
    ("optim.lr", "peak learning rate"),
    ("optim.warmup_steps", "warmup steps"),
    ("optim.weight_decay", "weight decay"),
    ("train.precision", "precision"),
    ("data.mode", "data mode"),
)


def _training_section(info: CardInfo) -> str:
    if not info.run_config:
        return "The training configuration was not available to the export.\n"
    lines = ["Training data:", ""]
    for source in _sources(info.run_config):
        weight = f" (weight {source['weight']})" if source.get("weight") not in (None, 1, 1.0) else ""
        lines.append(f"- `{source.get('urls')}`{weight}")
    lines += ["", "| setting | value |", "|---|---|"]
    for dotted, label in RECIPE:
        section, key = dotted.split(".")
        value = (info.run_config.get(section) or {}).get(key)
        if value is not None:
            lines.append(f"| {label} | `{value}` |")
    config_yaml = yaml.safe_dump(info.run_config, sort_keys=False)
    lines += [
        "",
        "<details><summary>Full resolved run config</summary>",
        "",
        "```yaml",
        config_yaml.rstrip(),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines) + "\n"


GENERIC_LABELS = ["cat", "dog", "car"]
NUM_EXAMPLE_LABELS = 5


def example_labels(eval_results: dict[str, Any] | None) -> tuple[str | None, list[str]]:
    """The dataset and first class names of the first classification set in ``eval_results`` (zero-shot first,
    then a linear probe), read from its per-class accuracies; ``(None, GENERIC_LABELS)`` when there is none."""
    sets = [(name, metrics) for name, metrics in (eval_results or {}).items() if isinstance(metrics, dict)]
    for task in ("zeroshot_classification", "linear_probe"):
        for name, metrics in sets:
            per_class = metrics.get("per_class_accuracy")
            if metrics.get("task") == task and isinstance(per_class, dict) and per_class:
                return name, [str(label) for label in per_class][:NUM_EXAMPLE_LABELS]
    return None, GENERIC_LABELS


def _labels_sentence(dataset: str | None) -> str:
    if dataset is None:
        return ""
    return f"The class names are the first of `{dataset}`, the classification set in the results above.\n\n"


def _towers_section(name: str, family: str | None, towers: dict[str, dict], labels: list[str]) -> str:
    """How to load the encoders of ``towers`` ({"text"|"image": {"folder", "class", "processor"}}, as written)."""
    embeds = {"text": "text_embeds", "image": "image_embeds"} if family == "clip" else {}
    texts = [f"a photo of a {label}" for label in labels]
    imports = [towers[tower]["class"] for tower in towers]
    imports += ["AutoImageProcessor"] if "image" in towers else []
    imports += ["AutoTokenizer"] if towers.get("text", {}).get("processor") else []
    lines = ["### transformers: the encoders alone", "", "```python", f"from transformers import {', '.join(imports)}"]
    if "text" in towers:
        text = towers["text"]
        lines += ["", f'text_encoder = {text["class"]}.from_pretrained("{name}", subfolder="{text["folder"]}")']
        if text["processor"]:
            padding = "padding=True" if family == "clip" else 'padding="max_length"'  # SigLIP attends to padding
            lines += [
                f'tokenizer = AutoTokenizer.from_pretrained("{name}", subfolder="{text["processor"]}")',
                f'inputs = tokenizer({texts!r}, {padding}, truncation=True, return_tensors="pt")',
            ]
        else:
            lines.append("inputs = {'input_ids': token_ids}  # from open_clip's tokenizer: see the conversion notes")
        lines.append(f"text_embeds = text_encoder(**inputs).{embeds.get('text', 'pooler_output')}")
    if "image" in towers:
        image = towers["image"]
        lines += [
            "",
            f'image_encoder = {image["class"]}.from_pretrained("{name}", subfolder="{image["folder"]}")',
            f'processor = AutoImageProcessor.from_pretrained("{name}", subfolder="{image["processor"]}", '
            'backend="pil")',
            f'image_embeds = image_encoder(**processor(images=image, return_tensors="pt")).'
            f"{embeds.get('image', 'pooler_output')}",
        ]
    lines += [
        "```",
        "",
        "Each subfolder is a model of its own, laid out as diffusers pipelines read their encoders; the embeddings "
        "are the full model's, not normalised.",
    ]
    return "\n".join(lines) + "\n"


def _usage_section(
    name: str,
    formats: list[str],
    family: str | None,
    context_length: int,
    towers: dict[str, dict] | None = None,
    eval_results: dict[str, Any] | None = None,
) -> str:
    dataset, labels = example_labels(eval_results)
    texts = [f"a photo of a {label}" for label in labels]
    parts = []
    if "hf" in formats and towers:
        note = _labels_sentence(dataset)
        parts.append(_towers_section(name, family, towers, labels) + ("\n" + note if note else ""))
    elif "hf" in formats and family == "siglip":
        parts.append(f"""### transformers

```python
from transformers import SiglipModel

model = SiglipModel.from_pretrained("{name}")
```
""")
    elif "hf" in formats:
        parts.append(f"""### transformers

```python
from transformers import CLIPModel, CLIPProcessor, pipeline

model = CLIPModel.from_pretrained("{name}")
processor = CLIPProcessor.from_pretrained("{name}")
inputs = processor(text={texts!r}, images=image, return_tensors="pt", padding=True)
probs = model(**inputs).logits_per_image.softmax(dim=-1)

classifier = pipeline("zero-shot-image-classification", model="{name}")
classifier(image, candidate_labels={labels!r})
```

{_labels_sentence(dataset)}The tokenizer is open_clip's BPE with a context of {context_length} tokens
(`truncation=True` cuts longer captions as open_clip does). Images that need resizing are preprocessed exactly as
in training's evaluation with `AutoImageProcessor.from_pretrained("{name}", backend="pil")`; the default
torchvision backend resizes tensors and differs slightly. open_clip also cleans text with `ftfy` and HTML
unescaping; for captions with curly quotes, ligatures, full-width letters or HTML entities apply
`open_clip.tokenizer.basic_clean` first to get identical token ids.
""")
    if "open_clip" in formats:
        parts.append(f"""### open_clip

```python
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:{name}")
tokenizer = open_clip.get_tokenizer("hf-hub:{name}")
```

A local copy loads with `"local-dir:PATH"` in place of `"hf-hub:{name}"`.
""")
    return "\n".join(parts)


def model_card(
    built: BuiltModel,
    info: CardInfo,
    formats: list[str],
    family: str | None,
    notes: list[str],
    towers: dict[str, dict] | None = None,
) -> ModelCard:
    """The README.md for an export folder written in ``formats`` ("hf", "open_clip"); ``towers``, where the "hf"
    format wrote encoders alone, is what ``write_transformers`` says it wrote of them."""
    encoders_alone = bool(towers) and "hf" in formats  # they cannot classify: no zero-shot tag, and no Hub widget
    tags = ["clip", "clipforge"] + ([] if encoders_alone else ["zero-shot-image-classification"])
    tags += (["siglip"] if family == "siglip" else []) + (["open_clip"] if "open_clip" in formats else [])
    data = ModelCardData(
        library_name="transformers" if "hf" in formats else "open_clip",
        license=info.license,
        tags=tags,
        datasets=hub_datasets(info.run_config, info.datasets) or None,
        pipeline_tag=None if encoders_alone else "zero-shot-image-classification",
    )
    text_cfg, vision_cfg = built.model_cfg.get("text_cfg", {}), built.model_cfg.get("vision_cfg", {})
    image_tower = (
        f"timm {vision_cfg['timm_model_name']}"
        if vision_cfg.get("timm_model_name")
        else "ResNet"
        if isinstance(vision_cfg.get("layers"), list)
        else "ViT"
    )
    body = [
        f"# {info.name}",
        "",
        f"A CLIP-style image–text dual encoder trained with clipforge from `{info.source}`: "
        f"architecture `{built.architecture}` ({image_tower} image tower at {vision_cfg.get('image_size')} px, "
        f"text transformer of width {text_cfg.get('width')} × {text_cfg.get('layers')} layers, context "
        f"{text_cfg.get('context_length')}; {built.model_cfg.get('embed_dim')}-d embeddings).",
        "",
        "## Results",
        "",
        _results_section(info),
        "## Training",
        "",
        _training_section(info),
        "## How to load",
        "",
        _usage_section(info.name, formats, family, text_cfg.get("context_length", 77), towers, info.eval_results),
    ]
    if notes:
        body += ["## Conversion notes", "", *[f"- {note}" for note in notes], ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
