"""Zero-shot classification with an exported model, through transformers or open_clip alone: `make demo`'s last step.

    python examples/zero_shot.py runs/demo/export/open_clip data/synth/eval/shapes
    python examples/zero_shot.py runs/vit/export/hf data/synth/eval/shapes

    python examples/zero_shot.py runs/demo/export/open_clip my_photos      # my_photos/CLASS/*.jpg

MODEL is a folder written by `clipforge export CHECKPOINT`: with `--format hf` (config.json) it runs in
`transformers.pipeline("zero-shot-image-classification")`, with `--format open_clip` (open_clip_config.json) in
`open_clip.create_model_and_transforms("local-dir:MODEL")`. BENCHMARK is a zero-shot classification set, either in
CLIP_benchmark's WebDataset layout (test/*.tar of KEY.jpg|png|webp + KEY.cls, classnames.txt,
zeroshot_classification_templates.txt), such as the held-out sets `clipforge prep synthetic` writes, or an image
folder, BENCHMARK/CLASS/*.jpg or BENCHMARK/test/CLASS/*.jpg (class names: the folder names with `_` read as a space,
unless BENCHMARK/classnames.txt lists them in sorted folder order; the template: the first line of
BENCHMARK/zeroshot_classification_templates.txt, else "a photo of a {}."). The script takes one test image, ranks
the benchmark's class names written with its first template (the pipeline takes one template; `clipforge eval`
averages all of them) and prints the ranking beside the true class. It imports nothing from clipforge: this is the
code a user of the exported model runs.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEFAULT_TEMPLATE = "a photo of a {}."


def is_image_folder(benchmark: Path) -> bool:
    """An image folder (BENCHMARK/CLASS/*.jpg or BENCHMARK/test/CLASS/*.jpg) rather than WebDataset shards."""
    return not any((benchmark / "test").glob("*.tar"))


def class_folders(benchmark: Path) -> list[Path]:
    """The class folders of an image folder's test split, in sorted order (torchvision's ImageFolder order)."""
    split = benchmark / "test" if (benchmark / "test").is_dir() else benchmark
    folders = sorted(path for path in split.iterdir() if path.is_dir())
    if not folders:
        raise FileNotFoundError(f"{benchmark}: neither test/*.tar shards nor class folders (CLASS/*.jpg)")
    return folders


def classnames_and_template(benchmark: Path) -> tuple[list[str], str]:
    """The class names (classnames.txt, else an image folder's folder names) and the first template, with {}."""
    names_file, templates_file = benchmark / "classnames.txt", benchmark / "zeroshot_classification_templates.txt"
    if names_file.is_file():
        classnames = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    elif is_image_folder(benchmark):
        classnames = [folder.name.replace("_", " ") for folder in class_folders(benchmark)]
    else:
        raise FileNotFoundError(f"{names_file} is missing")
    templates = (
        [line for line in templates_file.read_text().splitlines() if line.strip()] if templates_file.is_file() else []
    )
    return classnames, (templates[0] if templates else DEFAULT_TEMPLATE).replace("{c}", "{}")


def test_image(benchmark: Path, index: int) -> tuple[Image.Image, int, str]:
    """The ``index``-th test image, its label and where it is: in key order in the first shard of a WebDataset
    benchmark (the name in the tar), or in class then file-name order in an image folder (CLASS/FILE)."""
    if is_image_folder(benchmark):
        return folder_image(benchmark, index)
    shards = sorted((benchmark / "test").glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"{benchmark}/test holds no *.tar shards")
    with tarfile.open(shards[0]) as tar:
        members = {member.name: member for member in tar.getmembers() if member.isfile()}
        keys = sorted({name.rsplit(".", 1)[0] for name in members if name.endswith(".cls")})
        if not 0 <= index < len(keys):
            raise ValueError(f"--index {index}: {shards[0]} holds {len(keys)} samples")
        key = keys[index]
        name = next(f"{key}.{ext}" for ext in IMAGE_EXTENSIONS if f"{key}.{ext}" in members)
        image = Image.open(io.BytesIO(tar.extractfile(members[name]).read())).convert("RGB")
        label = int(tar.extractfile(members[f"{key}.cls"]).read())
    return image, label, f"{shards[0].name}:{name}"


def folder_image(benchmark: Path, index: int) -> tuple[Image.Image, int, str]:
    samples = [
        (path, label)
        for label, folder in enumerate(class_folders(benchmark))
        for path in sorted(folder.iterdir())
        if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
    ]
    if not 0 <= index < len(samples):
        raise ValueError(f"--index {index}: {benchmark} holds {len(samples)} images")
    path, label = samples[index]
    return Image.open(path).convert("RGB"), label, f"{path.parent.name}/{path.name}"


def rank_with_transformers(model: str, image: Image.Image, labels: list[str], template: str) -> list[tuple[float, str]]:
    from transformers import pipeline

    classify = pipeline("zero-shot-image-classification", model=model)
    return [
        (answer["score"], answer["label"])
        for answer in classify(image, candidate_labels=labels, hypothesis_template=template)
    ]


def rank_with_open_clip(model: str, image: Image.Image, labels: list[str], template: str) -> list[tuple[float, str]]:
    import open_clip
    import torch

    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model}")
    clip.eval()  # open_clip returns the model in training mode: BatchNorm (a ResNet tower) would use this one image
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model}")
    with torch.no_grad():
        image_features = clip.encode_image(preprocess(image).unsqueeze(0), normalize=True)
        text_features = clip.encode_text(tokenizer([template.format(label) for label in labels]), normalize=True)
        scores = (clip.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)[0]
    return sorted(zip(scores.tolist(), labels), reverse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="folder written by clipforge export (--format hf or open_clip)")
    parser.add_argument(
        "benchmark",
        help="zero-shot classification benchmark folder, e.g. data/synth/eval/shapes, or an image folder "
        "(BENCHMARK/CLASS/*.jpg or BENCHMARK/test/CLASS/*.jpg)",
    )
    parser.add_argument(
        "--index", type=int, default=0, help="which test image (in key order, or class then file order; default 0)"
    )
    parser.add_argument("--top", type=int, default=3, help="how many labels to print (default 3)")
    args = parser.parse_args(argv)

    folder, benchmark = Path(args.model), Path(args.benchmark)
    classnames, template = classnames_and_template(benchmark)
    image, label, where = test_image(benchmark, args.index)
    if (folder / "config.json").is_file():
        call = f'transformers.pipeline("zero-shot-image-classification", model="{folder}")'
        ranking = rank_with_transformers(str(folder), image, classnames, template)
    elif (folder / "open_clip_config.json").is_file():
        call = f'open_clip.create_model_and_transforms("local-dir:{folder}")'
        ranking = rank_with_open_clip(str(folder), image, classnames, template)
    else:
        raise FileNotFoundError(f"{folder}: neither config.json (transformers) nor open_clip_config.json (open_clip)")
    print(f"{call} on held-out image {where}")
    print(f'labels: {", ".join(classnames)}; template: "{template}"; true class: {classnames[label]}')
    for score, name in ranking[: args.top]:
        print(f"  {score:6.1%}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
