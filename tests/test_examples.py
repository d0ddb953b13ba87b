"""examples/: the scripts `make demo` ends with, run on a tiny ViT checkpoint exported by the CLI."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from checkpointing import save_checkpoint
from PIL import Image

from clipforge.cli import main
from clipforge.config import to_yaml
from clipforge.models import build_model
from clipforge.train.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model_format", ["hf", "open_clip"])
def test_zero_shot_ranks_as_the_trained_model_does(model_format, synth_data, tiny_model_json, tmp_path, capsys):
    """checkpoint → `clipforge export` → the example, in transformers' pipeline or open_clip: the model's ranking."""
    example = load_example("zero_shot")
    benchmark = synth_data / "eval" / "shapes"
    classnames = (benchmark / "classnames.txt").read_text().splitlines()
    template = (benchmark / "zeroshot_classification_templates.txt").read_text().splitlines()[0]
    cfg = load_config(None, ["data.train_urls=data/{0..9}.tar", f"model.name={tiny_model_json}"])
    torch.manual_seed(0)
    built = build_model(cfg.model)
    model = built.model.eval()
    samples = [example.test_image(benchmark, index) for index in range(12)]
    with torch.no_grad():  # a least-squares image projection, so that the tiny model ranks the true class first
        pixels = torch.stack([built.eval_transform(image) for image, _, _ in samples])
        labels = torch.tensor([label for _, label, _ in samples])
        texts = model.encode_text(built.tokenizer([template.replace("{c}", name) for name in classnames]), True)
        model.visual.proj.copy_(torch.eye(model.visual.proj.shape[0]))
        model.visual.proj.copy_(torch.linalg.lstsq(model.encode_image(pixels), texts[labels]).solution)
    checkpoint = save_checkpoint(tmp_path / "run" / "checkpoints", model, 30, to_yaml(cfg))
    assert main(["export", str(checkpoint), "--format", model_format, "--out", str(tmp_path / "out")]) == 0
    capsys.readouterr()

    index = 3
    assert example.main([str(tmp_path / "out"), str(benchmark), "--index", str(index), "--top", "6"]) == 0
    printed = capsys.readouterr().out
    image, label, where = samples[index]
    assert isinstance(image, Image.Image) and where in printed and f"true class: {classnames[label]}" in printed
    assert ("transformers.pipeline" if model_format == "hf" else "local-dir:") in printed
    ranking = [(float(score) / 100, name) for score, name in re.findall(r"^\s+([\d.]+)%\s+(\w+)$", printed, re.M)]
    with torch.no_grad():
        logits = model.logit_scale.exp() * model.encode_image(pixels[index : index + 1], True) @ texts.T
    expected = sorted(zip(logits[0].softmax(0).tolist(), classnames), reverse=True)
    assert [name for _, name in ranking] == [name for _, name in expected]
    assert [score for score, _ in ranking] == pytest.approx([score for score, _ in expected], abs=1e-3)
    assert ranking[0][1] == classnames[label]


def test_zero_shot_runs_a_batchnorm_tower_as_open_clip_in_eval_mode_does(
    trained_checkpoint, synth_data, tmp_path, capsys
):
    """The demo's CLIP-ResNet: open_clip hands the model back in training mode, where BatchNorm would normalise the
    one image by itself; the example must rank as the model in eval mode does."""
    import open_clip

    example = load_example("zero_shot")
    benchmark = synth_data / "eval" / "shapes"
    out = tmp_path / "out"
    assert main(["export", str(trained_checkpoint), "--format", "open_clip", "--out", str(out)]) == 0
    capsys.readouterr()
    assert example.main([str(out), str(benchmark), "--index", "3", "--top", "6"]) == 0
    printed = capsys.readouterr().out
    ranking = [(float(score) / 100, name) for score, name in re.findall(r"^\s+([\d.]+)%\s+(\w+)$", printed, re.M)]

    clip, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    clip.eval()
    classnames = (benchmark / "classnames.txt").read_text().splitlines()
    template = (benchmark / "zeroshot_classification_templates.txt").read_text().splitlines()[0]
    image, _, _ = example.test_image(benchmark, 3)
    tokens = open_clip.get_tokenizer(f"local-dir:{out}")([template.replace("{c}", name) for name in classnames])
    with torch.no_grad():
        image_features = clip.encode_image(preprocess(image).unsqueeze(0), normalize=True)
        logits = clip.logit_scale.exp() * image_features @ clip.encode_text(tokens, normalize=True).T
    expected = sorted(zip(logits[0].softmax(0).tolist(), classnames), reverse=True)
    assert [name for _, name in ranking] == [name for _, name in expected]
    assert [score for score, _ in ranking] == pytest.approx([score for score, _ in expected], abs=1e-3)


def test_zero_shot_reads_an_image_folder_as_it_reads_the_same_set_in_webdataset_shards(
    trained_checkpoint, synth_data, tmp_path, capsys
):
    """PATH/test/CLASS/*.jpg and PATH/CLASS/*.jpg: the same image gets the same true class and the same ranking as
    in the WebDataset benchmark it was copied from."""
    from eval_fixtures import write_imagefolder

    example = load_example("zero_shot")
    benchmark = synth_data / "eval" / "shapes"
    folder = write_imagefolder(benchmark, tmp_path / "folder")  # files named after their index in the shards
    (folder / "test" / "zeroshot_classification_templates.txt").write_text(
        (folder / "zeroshot_classification_templates.txt").read_text()
    )
    out = tmp_path / "out"
    assert main(["export", str(trained_checkpoint), "--format", "open_clip", "--out", str(out)]) == 0
    capsys.readouterr()

    def ranking(path, index):
        """Where the image is, its true class, and the ranked "score name" lines (the label list's order is the
        layout's own: sorted folders, or classnames.txt)."""
        assert example.main([str(out), str(path), "--index", str(index), "--top", "6"]) == 0
        call, labels, *ranked = capsys.readouterr().out.splitlines()
        return call.rsplit(" ", 1)[1], labels.rsplit("true class: ", 1)[1], ranked

    for index in (0, 200):
        where, true_class, from_folder = ranking(folder, index)
        assert ranking(folder / "test", index) == (where, true_class, from_folder)
        class_name, file_name = where.split("/")
        _, true_in_shards, from_shards = ranking(benchmark, int(file_name.split(".")[0]))
        assert from_folder == from_shards and len(from_folder) == 6
        assert true_class == true_in_shards == class_name
    with pytest.raises(ValueError, match="--index 300: .* holds 300 images"):
        example.test_image(folder, 300)


def test_zero_shot_names_a_bad_index_and_a_folder_that_is_no_export(synth_data, tmp_path):
    example = load_example("zero_shot")
    with pytest.raises(ValueError, match="--index 100000"):
        example.test_image(synth_data / "eval" / "shapes", 100000)
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        example.main([str(tmp_path), str(synth_data / "eval" / "shapes")])
