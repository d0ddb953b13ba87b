"""The model card (README.md): Hub metadata, results, training data and recipe, how to load.

Metadata (library, tags, license, datasets, pipeline tag) is written with ``huggingface_hub``'s
``ModelCardData`` so the Hub parses it as it parses its own. Results come from a ``clipforge eval``
JSON (``{dataset: metrics}``) rendered by ``clipforge.eval_results.markdown_table``, introduced by which
evaluation made them: the file, the suite and the checkpoint it evaluated. By default that is the training-time
evaluation of the exported checkpoint (``RUN/eval/step_N.json``); an ad-hoc ``clipforge eval`` is used only when
named. The usage examples load the Hub repo, or the export folder when nothing is pushed, and classify with the
first class names of the first classification set in those results (the names its per-class accuracies are keyed
by, so the suite's own), and with generic labels only when no set names classes.

The run config is shown as saved with the checkpoint, never resolved (``${oc.env:...}`` stays as written), with
credentials redacted (``clipforge.export.redact``).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData

from clipforge.eval_results import markdown_table
from clipforge.export.redact import redact, redact_text
from clipforge.models import BuiltModel


@dataclass
class CardInfo:
    """What the card says beyond the model itself."""

    name: str
    """Repository id (org/name) or folder name: the title and, unless ``folder`` is set, the name in the loading
    snippets."""
    source: str = ""
    """The exported checkpoint."""
    step: str | None = None
    """The exported checkpoint's name (``step_N``), which the results are checked against."""
    folder: str | None = None
    """The export folder as the user named it: the loading snippets load it (``local-dir:`` for open_clip) in place
    of the Hub repo ``name``, for an export that is not pushed."""
    run_config: dict[str, Any] | None = None
    """The run's config as saved with the checkpoint (config.yaml as a dict, interpolations unresolved): training
    data and recipe. Credentials in it are redacted on the card."""
    eval_results: dict[str, Any] | None = None
    eval_source: str | None = None
    """The results file."""
    eval_suite: str | None = None
    """The suite that made the results (a path or a suite name), when known."""
    eval_step: str | None = None
    """The checkpoint the results evaluated (``step_N``), when known."""
    license: str = "mit"
    datasets: list[str] = field(default_factory=list)
    """Hub dataset ids for the metadata, besides those read from hf://datasets/... training URLs."""


def find_eval_results(run_dir: Path, checkpoint_name: str) -> tuple[Path, dict] | None:
    """The training-time evaluation of checkpoint ``checkpoint_name`` (``RUN/eval/step_N.json``, as the trainer
    writes it), or None. Results of other checkpoints, and ad-hoc ``clipforge eval`` runs, are not taken: the card
    must not publish numbers of another model, or of a suite or labels the run was not evaluated with."""
    path = run_dir / "eval" / f"{checkpoint_name}.json"
    return (path, json.loads(path.read_text())) if path.is_file() else None


def eval_origin(path: Path, run_config: dict | None = None) -> tuple[str | None, str | None]:
    """(suite, checkpoint) that a results file's name records: the trainer writes ``step_N.json`` with the run's
    ``eval.suite``; ``clipforge eval`` writes ``SUITE_CHECKPOINT.json``. ``None`` where the name does not say."""
    match = re.fullmatch(r"(?:(.+)_)?(step_\d+)", Path(path).stem)
    if match is None:
        return None, None
    if match.group(1) is not None:
        return match.group(1), match.group(2)
    suite = ((run_config or {}).get("eval") or {}).get("suite")
    return (str(suite) if suite is not None else None), match.group(2)


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
        checkpoint = f"checkpoint `{info.step}`" if info.step else "the exported checkpoint"
        return (
            f"No `clipforge eval` results of {checkpoint}: none were written during training (`RUN/eval/step_N.json`) "
            "and none were named (`clipforge export --eval-results FILE`).\n"
        )
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
    return f"{_results_origin(info)}:\n\n{table}\n"


def _results_origin(info: CardInfo) -> str:
    """Which evaluation the numbers come from: checkpoint, suite, datasets and file."""
    if info.eval_step is None:
        checkpoint = "a checkpoint its file name does not record"
    elif info.step is not None and info.eval_step != info.step:
        checkpoint = f"checkpoint `{info.eval_step}` (not the exported `{info.step}`)"
    else:
        checkpoint = f"checkpoint `{info.eval_step}`"
    suite = f" with suite `{redact_text(info.eval_suite)}`" if info.eval_suite else ""
    names = [name for name, metrics in (info.eval_results or {}).items() if isinstance(metrics, dict)]
    datasets = f" on {', '.join(f'`{name}`' for name in names)}" if names else ""
    return f"`clipforge eval` of {checkpoint}{suite}{datasets} (results file `{info.eval_source}`)"


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
        "<details><summary>Full run config, as saved with the checkpoint (interpolations such as `${oc.env:...}` "
        "unresolved, credentials redacted)</summary>",
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


def photo_of(label: str) -> str:
    """``"a photo of a/an LABEL"``, or ``"a photo of LABEL"`` where the label brings its own article."""
    if label.split(" ", 1)[0].lower() in ("a", "an", "the"):
        return f"a photo of {label}"
    article = "an" if label[:1].lower() in tuple("aeiou") else "a"  # by the first letter: a guess, not phonetics
    return f"a photo of {article} {label}"


def _labels_sentence(dataset: str | None) -> str:
    if dataset is None:
        return ""
    return f"The class names are the first of `{dataset}`, the classification set in the results above.\n\n"


def _towers_section(name: str, family: str | None, towers: dict[str, dict], labels: list[str]) -> str:
    """How to load the encoders of ``towers`` ({"text"|"image": {"folder", "class", "processor"}}, as written)."""
    embeds = {"text": "text_embeds", "image": "image_embeds"} if family == "clip" else {}
    texts = [photo_of(label) for label in labels]
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
    folder: str | None = None,
) -> str:
    """How to load the export: from the Hub repo ``name``, or from ``folder`` where the export is not pushed."""
    name = folder or name
    dataset, labels = example_labels(eval_results)
    texts = [photo_of(label) for label in labels]
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
(`truncation=True` cuts longer captions as open_clip does). `AutoImageProcessor.from_pretrained("{name}",
backend="pil")` gives the pixels of training's evaluation (open_clip's transform) except where the centre crop of
the resized image has a margin of 4k+3 pixels: open_clip's torchvision crop rounds half that margin to even,
transformers rounds it down, so the crop sits one pixel apart. The default torchvision backend also resizes
tensors, slightly differently. open_clip also cleans text with `ftfy` and HTML unescaping; for captions with curly
quotes, ligatures, full-width letters or HTML entities apply `open_clip.tokenizer.basic_clean` first to get
identical token ids.
""")
    if "open_clip" in formats:
        where, other = (f"local-dir:{folder}", "hf-hub:ORG/NAME") if folder else (f"hf-hub:{name}", "local-dir:PATH")
        parts.append(f"""### open_clip

```python
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("{where}")
tokenizer = open_clip.get_tokenizer("{where}")
```

{"Pushed to the Hub" if folder else "A local copy"} loads with `"{other}"` in place of `"{where}"`.
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
    info = dataclasses.replace(info, run_config=redact(info.run_config) if info.run_config else None)
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
        _usage_section(
            info.name, formats, family, text_cfg.get("context_length", 77), towers, info.eval_results, info.folder
        ),
    ]
    if notes:
        body += ["## Conversion notes", "", *[f"- {note}" for note in notes], ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))
