"""Export checked against the libraries that load it: transformers' CLIPModel, tokenizers, processor and pipeline,
open_clip's own ``local-dir:`` loader, huggingface_hub's model-card parser and HfApi's signatures."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shlex
import shutil
import tarfile
from pathlib import Path
from unittest import mock

import numpy as np
import open_clip
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import LocalTokenNotFoundError
from PIL import Image

from clipforge.cli import main
from clipforge.config import to_yaml
from clipforge.evaluation import OpenClipEncoder, build_classifier
from clipforge.export import CannotConvert, CardInfo, export_model, push_to_hub, write_transformers
from clipforge.export.card import photo_of
from clipforge.model_loading import load_init_weights
from clipforge.models import ModelConfig, build_model
from clipforge.train.config import load_config

TOLERANCE = 1e-5
CAPTIONS = [
    "a red circle",
    "two small blue stars!!!",
    "x",
    "a green square above a yellow triangle, on stripes",
    "a very long caption that keeps going " * 6,
]


def export(built, out: Path, formats=("hf",)) -> Path:
    export_model(built, out, formats, CardInfo(name=out.name))
    return out


@pytest.fixture(scope="module")
def exports(tiny_model_json, tmp_path_factory) -> dict:
    """Tiny random ViT CLIPs, one with GELU and one with QuickGELU, each with a folder holding both formats."""
    made = {}
    for activation in ("gelu", "quick_gelu"):
        torch.manual_seed(0)
        built = build_model(ModelConfig(name=tiny_model_json, force_quick_gelu=activation == "quick_gelu"))
        built.model.eval()
        made[activation] = (built, export(built, tmp_path_factory.mktemp(activation) / "tiny", ("hf", "open_clip")))
    return made


@pytest.fixture(params=["gelu", "quick_gelu"])
def clip_export(request, exports):
    return request.param, *exports[request.param]


@pytest.fixture
def gelu_export(exports):
    return "gelu", *exports["gelu"]


def images(count: int = 4, size: int = 32, seed: int = 0) -> list[Image.Image]:
    generator = np.random.default_rng(seed)
    return [Image.fromarray(generator.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@torch.no_grad()
def test_clip_model_gives_clipforge_embeddings(clip_export):
    from transformers import AutoImageProcessor, CLIPConfig, CLIPModel, CLIPProcessor

    activation, built, folder = clip_export
    hf = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    assert hf.config.vision_config.hidden_act == hf.config.text_config.hidden_act == activation
    pictures = images()
    pixels = torch.stack([built.eval_transform(picture) for picture in pictures])  # (4, 3, 32, 32)
    inputs = processor(text=CAPTIONS, images=pictures, return_tensors="pt", padding=True, truncation=True)
    torch.testing.assert_close(inputs["pixel_values"], pixels, atol=1e-6, rtol=0)
    # Images that need resizing: transformers' PIL backend resizes and crops exactly as open_clip's transform where
    # the crop's margin is not 4k+3 (here 0 and 29; the test on odd margins has the rest). Its default torchvision
    # backend resizes tensors, a few hundredths off.
    resized = images(2, size=45) + [images(1, size=77)[0].crop((0, 0, 77, 40))]
    pil_processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    torch.testing.assert_close(
        pil_processor(images=resized, return_tensors="pt")["pixel_values"],
        torch.stack([built.eval_transform(picture) for picture in resized]),
        atol=1e-6,
        rtol=0,
    )
    ours_image, ours_text = built.model.encode_image(pixels), built.model.encode_text(built.tokenizer(CAPTIONS))
    theirs_image = hf.get_image_features(pixel_values=pixels).pooler_output
    theirs_text = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert (theirs_image - ours_image).abs().max() < TOLERANCE
    assert (theirs_text.pooler_output - ours_text).abs().max() < TOLERANCE
    output = hf(**inputs)
    encoder = OpenClipEncoder(built.model)
    assert (output.image_embeds - encoder.encode_image(pixels)).abs().max() < TOLERANCE
    assert (output.text_embeds - encoder.encode_text(built.tokenizer(CAPTIONS))).abs().max() < TOLERANCE
    assert hf.logit_scale.item() == built.model.logit_scale.item()
    # The activation is carried, and it matters: the other one gives visibly different embeddings.
    config = CLIPConfig.from_pretrained(folder)
    other = "gelu" if activation == "quick_gelu" else "quick_gelu"
    config.vision_config.hidden_act = config.text_config.hidden_act = other
    wrong = CLIPModel.from_pretrained(folder, config=config).eval()
    assert (wrong.get_image_features(pixel_values=pixels).pooler_output - ours_image).abs().max() > 1e-3


WORDS = [
    "a photo of a cat.",
    "hello!!! wow?! ...",
    "emoji 🐱🚀!",
    "don't won't I'm we've they'll she'd it's",
    "café naïve Ünïcödé",
    "cafe\u0301 decomposed",
    "日本語のキャプション",
    "Ελληνικά и русский",
    "x",
    "  many   spaces\tand\nnewlines ",
    "numbers 12345 and 3.14 and 1,000,000",
    "UPPER case MiXeD",
    "<end_of_text> literal <start_of_text>",
    "a-b_c/d\\e|f~g`h",
    "İstanbul straße",
    "",
    "a very long caption about a dog running on the beach at sunset " * 4,
]
FTFY_CHANGES = ["It’s a “quoted” caption", "the ﬁsh", "ＦＵＬＬ ｗｉｄｔｈ", "Tom &amp; Jerry &lt;3", "mojibake: cafÃ©"]


def text_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(N, L) True up to and including the last end-of-text token (open_clip pads with 0, also the id of "!")."""
    length = tokens.shape[1] - (tokens.flip(1) == 49407).int().argmax(dim=1, keepdim=True)
    return torch.arange(tokens.shape[1]) < length


def test_tokenizers_give_open_clip_ids(gelu_export):
    from open_clip.tokenizer import basic_clean
    from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

    _, built, folder = gelu_export
    reference = built.tokenizer  # open_clip's SimpleTokenizer, context 24: long captions get truncated
    for tokenizer_class in (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer):
        tokenizer = tokenizer_class.from_pretrained(folder)
        encoded = tokenizer(WORDS, padding="max_length", truncation=True, return_tensors="pt")
        expected = reference(WORDS)
        mask = encoded["attention_mask"].bool()
        assert encoded["input_ids"].shape == expected.shape == (len(WORDS), 24)
        assert torch.equal(mask, text_mask(expected))  # the same lengths, up to and including the end of text
        assert torch.equal(encoded["input_ids"][mask], expected[mask])
        assert (encoded["input_ids"][~mask] == 49407).all() and (expected[~mask] == 0).all()  # pad ids differ
        # Captions that open_clip's ftfy/html cleaning changes give the same ids once cleaned the same way.
        cleaned = tokenizer(
            [basic_clean(text) for text in FTFY_CHANGES], padding="max_length", truncation=True, return_tensors="pt"
        )
        expected = reference(FTFY_CHANGES)
        assert torch.equal(cleaned["input_ids"][cleaned["attention_mask"].bool()], expected[text_mask(expected)])


def read_wds(root: Path) -> tuple[list[Image.Image], torch.Tensor]:
    """The images and labels of a CLIP_benchmark WebDataset split, read with tarfile (independent of our reader)."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, extension = member.name.rsplit(".", 1)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
    keys = sorted(samples)
    pictures = [
        Image.open(
            io.BytesIO(next(samples[key][ext] for ext in ("png", "jpg", "webp") if ext in samples[key]))
        ).convert("RGB")
        for key in keys
    ]
    return pictures, torch.tensor([int(samples[key]["cls"]) for key in keys])


def write_checkpoint(built, config_yaml: str, run_dir: Path, step: int = 30) -> Path:
    """A checkpoint as the trainer writes it (with its manifest, which every reader verifies)."""
    from checkpointing import save_checkpoint

    return save_checkpoint(run_dir / "checkpoints", built.model, step, config_yaml)


def test_pipeline_predicts_what_clipforge_eval_predicts(synth_data, tiny_model_json, tmp_path, caplog):
    """clipforge eval → clipforge export (CLI) → pipeline("zero-shot-image-classification"): the same labels."""
    from transformers import pipeline

    benchmark = tmp_path / "colors"
    shutil.copytree(synth_data / "eval" / "colors", benchmark)
    template = (benchmark / "zeroshot_classification_templates.txt").read_text().splitlines()[0]
    (benchmark / "zeroshot_classification_templates.txt").write_text(template + "\n")  # the pipeline takes one
    classnames = (benchmark / "classnames.txt").read_text().split()
    pictures, labels = read_wds(benchmark)
    cfg = load_config(None, ["data.train_urls=hf://datasets/org/shapes/{0..9}.tar", f"model.name={tiny_model_json}"])
    torch.manual_seed(0)
    built = build_model(cfg.model)
    model = built.model.eval()
    with torch.no_grad():  # a least-squares image projection, so that the tiny model's predictions vary by image
        pixels = torch.stack([built.eval_transform(picture) for picture in pictures])
        targets = model.encode_text(built.tokenizer([template.replace("{c}", name) for name in classnames]), True)
        model.visual.proj.copy_(torch.eye(model.visual.proj.shape[0]))
        model.visual.proj.copy_(torch.linalg.lstsq(model.encode_image(pixels), targets[labels]).solution)
    checkpoint = write_checkpoint(built, to_yaml(cfg), tmp_path / "run")
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        f"name: one\ndatasets:\n  - name: colors\n    task: zeroshot_classification\n    path: {benchmark}\n"
    )
    assert main(["eval", str(checkpoint), "--suite", str(suite), "--workers", "0", "--quiet", "--no-plots"]) == 0
    (results_file,) = (tmp_path / "run" / "eval").rglob("one_step_00000030.json")  # an ad-hoc eval: named to export
    results = json.loads(results_file.read_text())
    with caplog.at_level(logging.WARNING):
        command = ["export", str(checkpoint), "--format", "hf", "--out", str(tmp_path / "exported")]
        assert main([*command, "--eval-results", str(results_file)]) == 0
    assert "No pretrained weights loaded" not in caplog.text  # random init then the checkpoint: no false alarm
    umask = os.umask(0)
    os.umask(umask)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "exported").iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}, modes

    encoder = OpenClipEncoder(model)
    ours = (encoder.encode_image(pixels) @ build_classifier(encoder, built.tokenizer, classnames, [template])).argmax(1)
    classify = pipeline("zero-shot-image-classification", model=str(tmp_path / "exported"))
    answers = classify(
        pictures, candidate_labels=classnames, hypothesis_template=template.replace("{c}", "{}"), batch_size=100
    )
    theirs = torch.tensor([classnames.index(answer[0]["label"]) for answer in answers])
    assert len(set(ours.tolist())) == len(classnames)  # a real test: every class is predicted somewhere
    assert torch.equal(theirs, ours)
    assert (theirs == labels).float().mean().item() == pytest.approx(results["colors"]["acc1"])
    card = ModelCard.load(tmp_path / "exported" / "README.md")
    assert card.data.datasets == ["org/shapes"] and card.data.library_name == "transformers"
    assert card.text.lstrip().startswith("# run\n")  # titled after the run (RUN/checkpoints/step_N), not the folder
    assert "## Results" in card.text and f"| {results['colors']['acc1']:.1%} |" in card.text  # the eval table
    assert f"candidate_labels={classnames[:5]!r}" in card.text  # the usage example classifies the eval's classes


def test_open_clip_loads_the_open_clip_folder(clip_export):
    activation, built, folder = clip_export
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    loaded.eval()
    expected = built.model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()  # weights really loaded: open_clip only warns if none are
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert torch.equal(tokenizer(WORDS), built.tokenizer(WORDS))
    pictures = images(2, size=45)  # resized and cropped by both transforms
    pixels = torch.stack([preprocess(picture) for picture in pictures])
    assert torch.equal(pixels, torch.stack([built.eval_transform(picture) for picture in pictures]))
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), built.model.encode_image(pixels))
        assert torch.equal(loaded.encode_text(tokenizer(CAPTIONS)), built.model.encode_text(tokenizer(CAPTIONS)))
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"].get("quick_gelu", False) == (
        activation == "quick_gelu"
    )


def transformers_files_only(folder: Path) -> Path:
    """The CLIPModel files of an export, without the open_clip weights that init_from would prefer."""
    target = folder.parent / "hf_only"
    target.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, target / name)
    return target


def initialised(cfg: ModelConfig) -> torch.nn.Module:
    """The model as a run builds it: ``build_model``, then ``model.init_from``'s weights."""
    model = build_model(cfg).model
    load_init_weights(model, cfg.init_from)
    return model


def test_round_trip_open_clip_transformers_open_clip_is_bit_exact(clip_export, tiny_model_json):
    activation, built, folder = clip_export
    quick = activation == "quick_gelu"
    restored = initialised(
        ModelConfig(name=tiny_model_json, force_quick_gelu=quick, init_from=str(transformers_files_only(folder)))
    )
    assert restored.state_dict().keys() == built.model.state_dict().keys()
    for key, value in built.model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_init_from_refuses_another_architecture(clip_export, tiny_model_json, tmp_path):
    from conftest import TINY_MODEL

    activation, _, folder = clip_export
    source = str(transformers_files_only(folder))
    with pytest.raises(ValueError, match=r"model.init_from: .*hidden_act is '(quick_)?gelu' in the folder"):
        initialised(ModelConfig(name=tiny_model_json, force_quick_gelu=activation != "quick_gelu", init_from=source))
    smaller = tmp_path / "smaller.json"
    smaller.write_text(json.dumps({**TINY_MODEL, "embed_dim": 32}))
    with pytest.raises(ValueError, match="projection_dim is 64 in the folder, 32 in the model"):
        initialised(ModelConfig(name=str(smaller), init_from=source))


def test_resnet_tower_is_a_clear_error_for_transformers_and_exports_to_open_clip(tiny_resnet_json, tmp_path, capsys):
    built = build_model(ModelConfig(name=tiny_resnet_json))
    with pytest.raises(
        CannotConvert, match="cannot convert test-tiny-rn-32 to transformers: .*CLIPModel has no ResNet image tower"
    ):
        write_transformers(built, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    cfg = load_config(None, ["data.train_urls=x.tar", f"model.name={tiny_resnet_json}"])
    checkpoint = write_checkpoint(built, to_yaml(cfg), tmp_path / "run")
    assert main(["export", str(checkpoint), "--format", "both", "--out", str(tmp_path / "both")]) == 2
    assert "CLIPModel has no ResNet image tower" in capsys.readouterr().err
    assert not (tmp_path / "both").exists() and not list(tmp_path.glob(".both*"))
    assert main(["export", str(checkpoint), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    expected = built.model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in loaded.state_dict().items())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval().encode_image(pixels), built.model.eval().encode_image(pixels))
    card = ModelCard.load(tmp_path / "oc" / "README.md")
    assert card.data.library_name == "open_clip" and card.text.lstrip().startswith("# run\n")  # titled after the run
    assert f'create_model_and_transforms("local-dir:{tmp_path / "oc"}")' in card.text  # loaded from the folder


SIGLIP_VIT = "clipforge_test_siglip_vit"
TINY_SIGLIP = {  # open_clip's ViT-B-16-SigLIP layout scaled down; the name avoids "siglip", whose tokenizer downloads
    "embed_dim": 64,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {
        "image_size": 32,
        "timm_model_name": SIGLIP_VIT,
        "timm_model_pretrained": False,
        "timm_pool": "map",
        "timm_proj": "none",
    },
    "text_cfg": {
        "context_length": 24,
        "vocab_size": 49408,
        "width": 64,
        "heads": 2,
        "layers": 2,
        "no_causal_mask": True,
        "proj_bias": True,
        "pool_type": "last",
        "norm_kwargs": {"eps": 1e-6},
    },
}


@pytest.fixture(scope="module")
def siglip_vit() -> str:
    """A tiny timm ViT laid out as vit_base_patch16_siglip_224, registered with timm for open_clip to build."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if not timm.list_models(SIGLIP_VIT):

        def clipforge_test_siglip_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
            """vit_base_patch16_siglip_224 (no class token, MAP head) at 32 px, width 64, 2 layers."""
            kwargs = {key: value for key, value in kwargs.items() if not key.startswith(("pretrained", "cache"))}
            return VisionTransformer(
                img_size=32,
                patch_size=8,
                embed_dim=64,
                depth=2,
                num_heads=2,
                class_token=False,
                **{"global_pool": "map", **kwargs},
            )

        register_model(clipforge_test_siglip_vit)
    return SIGLIP_VIT


@pytest.fixture(scope="module")
def tiny_siglip_json(siglip_vit, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "test-tiny-sigmoid.json"
    path.write_text(json.dumps(TINY_SIGLIP))
    return str(path)


@torch.no_grad()
def test_siglip_architecture_converts_to_siglip_model(tiny_siglip_json, tmp_path):
    from transformers import SiglipModel

    torch.manual_seed(0)
    built = build_model(ModelConfig(name=tiny_siglip_json, init_logit_bias=-10.0, init_logit_scale=2.302585))
    model = built.model.eval()
    summary = export_model(built, tmp_path / "siglip", ("hf", "open_clip"), CardInfo(name="siglip"))
    assert summary["written"][0]["class"] == "SiglipModel" and "no tokenizer written" in summary["notes"][0]
    hf = SiglipModel.from_pretrained(tmp_path / "siglip").eval()
    pixels, tokens = torch.randn(3, 3, 32, 32), built.tokenizer(CAPTIONS)  # padded with 0 to 24, no mask
    image_difference = hf.get_image_features(pixel_values=pixels).pooler_output - model.encode_image(pixels)
    text_difference = hf.get_text_features(input_ids=tokens).pooler_output - model.encode_text(tokens)
    assert image_difference.abs().max() < TOLERANCE and text_difference.abs().max() < TOLERANCE
    assert hf.logit_bias.item() == model.logit_bias.item() and hf.logit_scale.item() == model.logit_scale.item()
    assert hf.config.vision_config.hidden_act == hf.config.text_config.hidden_act == "gelu"  # open_clip's exact GELU
    (tmp_path / "siglip" / "open_clip_config.json").unlink()  # init_from reads the transformers files then
    restored = initialised(ModelConfig(name=tiny_siglip_json, init_logit_bias=0.0, init_from=str(tmp_path / "siglip")))
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@torch.no_grad()
def test_siglip_with_a_local_transformers_tokenizer_runs_in_the_pipeline(siglip_vit, tmp_path):
    """Where open_clip's SigLIP tokenizer is a transformers one (here a local CLIP BPE standing in for SigLIP's
    sentencepiece, which needs a download), the pipeline gives open_clip's sigmoid scores: padding, no mask."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    from transformers import pipeline

    from clipforge.export.processor import clip_tokenizer

    clip_tokenizer(SimpleTokenizer(), 64).save_pretrained(tmp_path / "tokenizer")
    text_cfg = {
        **TINY_SIGLIP["text_cfg"],
        "hf_tokenizer_name": str(tmp_path / "tokenizer"),
        "context_length": 64,
        "tokenizer_kwargs": {"clean": "canonicalize"},
    }  # 64: the pipeline pads SigLIP text to 64, always
    (tmp_path / "test-tiny-sigmoid-hf.json").write_text(json.dumps({**TINY_SIGLIP, "text_cfg": text_cfg}))
    torch.manual_seed(0)
    built = build_model(
        ModelConfig(name=str(tmp_path / "test-tiny-sigmoid-hf.json"), init_logit_bias=0.0, init_logit_scale=2.302585)
    )
    assert isinstance(built.tokenizer, HFTokenizer)
    export_model(built, tmp_path / "out", ("hf", "open_clip"), CardInfo(name="out"))
    labels, pictures = ["red circle", "blue star", "green square"], images(3)
    classify = pipeline("zero-shot-image-classification", model=str(tmp_path / "out"))
    answers = classify(pictures, candidate_labels=labels, hypothesis_template="a photo of a {}")
    model = built.model.eval()
    image = model.encode_image(torch.stack([built.eval_transform(picture) for picture in pictures]), normalize=True)
    text = model.encode_text(built.tokenizer([f"a photo of a {label}" for label in labels]), normalize=True)
    expected = torch.sigmoid(image @ text.T * model.logit_scale.exp() + model.logit_bias)  # (3 images, 3 labels)
    scores = torch.tensor([[{a["label"]: a["score"] for a in answer}[label] for label in labels] for answer in answers])
    assert (scores - expected).abs().max() < TOLERANCE and expected.std() > 1e-3
    assert torch.equal(open_clip.get_tokenizer(f"local-dir:{tmp_path / 'out'}")(WORDS), built.tokenizer(WORDS))


def test_model_card_has_hub_metadata_results_recipe_and_usage(gelu_export, tmp_path):
    _, built, _ = gelu_export
    run_config = yaml.safe_load(
        to_yaml(
            load_config(
                None,
                [
                    "data.train_urls=hf://datasets/laion/pairs/{0..9}.tar::/data/cc12m/{0..3}.tar",
                    "train.steps=700",
                    "optim.lr=2e-3",
                ],
            )
        )
    )
    results = {
        "shapes": {
            "task": "zeroshot_classification",
            "acc1": 0.795,
            "acc5": 1.0,
            "mean_per_class_recall": 0.792,
            "chance_acc1": 1 / 6,
        }
    }
    card_info = CardInfo(
        name="org/tiny-clip",
        source="runs/demo/checkpoints/step_00000700",
        run_config=run_config,
        eval_results=results,
        eval_source="runs/demo/eval/synthetic_step_00000700.json",
        license="apache-2.0",
        datasets=["org/extra"],
    )
    export_model(built, tmp_path / "card", ("hf", "open_clip"), card_info)
    card = ModelCard.load(tmp_path / "card" / "README.md")
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "zero-shot-image-classification"
    assert {"clip", "clipforge", "open_clip"} <= set(card.data.tags)
    assert card.data.datasets == ["org/extra", "laion/pairs"]
    for expected in (
        "| shapes | classification | top-1 | 79.5% | 16.7% |",
        "`hf://datasets/laion/pairs/{0..9}.tar`",
        "`/data/cc12m/{0..3}.tar`",
        "| steps | `700` |",
        "| peak learning rate | `0.002` |",
        'CLIPModel.from_pretrained("org/tiny-clip")',
        'create_model_and_transforms("hf-hub:org/tiny-clip")',
    ):
        assert expected in card.text, expected


def fake_hub(files: list[str] | None) -> mock.NonCallableMagicMock:
    """An HfApi with HfApi's real signatures (a wrong argument fails) that answers as a Hub holding ``files``."""
    api = mock.create_autospec(HfApi, instance=True)
    api.repo_exists.return_value = files is not None
    api.list_repo_files.return_value = files or []
    api.upload_folder.return_value.commit_url = "https://huggingface.co/org/name/commit/abc"
    api.whoami.return_value = {"name": "me", "orgs": [{"name": "org"}]}
    return api


def test_push_creates_the_repo_and_uploads_with_revision_and_message(gelu_export):
    _, _, folder = gelu_export
    api = fake_hub(None)
    url = push_to_hub(folder, "org/name", private=True, revision="v1", commit_message="first", api=api)
    assert url == "https://huggingface.co/org/name/commit/abc"
    api.create_repo.assert_called_once_with("org/name", repo_type="model", private=True, exist_ok=True)
    api.create_branch.assert_called_once_with("org/name", branch="v1", repo_type="model", exist_ok=True)
    api.upload_folder.assert_called_once_with(
        repo_id="org/name",
        folder_path=folder,
        repo_type="model",
        revision="v1",
        commit_message="first",
        delete_patterns="*",
    )
    api = fake_hub([".gitattributes", "README.md", "clipforge_export.json", "model.safetensors"])  # ours: mirrored
    push_to_hub(folder, "org/name", api=api)
    api.create_repo.assert_not_called()
    api.create_branch.assert_not_called()
    assert api.upload_folder.call_args.kwargs["delete_patterns"] == "*"


def test_push_refuses_a_repo_clipforge_did_not_write_unless_forced(gelu_export):
    _, _, folder = gelu_export
    api = fake_hub([".gitattributes", "README.md", "pytorch_model.bin"])
    with pytest.raises(ValueError, match="org/theirs exists and was not written by clipforge .* --force"):
        push_to_hub(folder, "org/theirs", api=api)
    api.upload_folder.assert_not_called()
    push_to_hub(folder, "org/theirs", force=True, api=api)
    assert api.upload_folder.call_args.kwargs["delete_patterns"] is None  # forced: add and replace, delete nothing
    push_to_hub(folder, "org/empty", api=fake_hub([".gitattributes"]))  # an empty repo is fine


def test_cli_push_uses_hf_api_with_the_environment_token(gelu_export, tiny_model_json, tmp_path, monkeypatch):
    _, built, _ = gelu_export
    cfg = load_config(None, ["data.train_urls=x.tar", f"model.name={tiny_model_json}"])
    checkpoint = write_checkpoint(built, to_yaml(cfg), tmp_path / "run")
    api = fake_hub(None)
    api_class = mock.Mock(return_value=api)
    monkeypatch.setattr("clipforge.export.hub.HfApi", api_class)
    assert (
        main(
            [
                "export",
                str(checkpoint),
                "--out",
                str(tmp_path / "out"),
                "--push",
                "org/name",
                "--private",
                "--commit-message",
                "m",
            ]
        )
        == 0
    )
    api_class.assert_called_once_with(token=None)  # HfApi itself reads HF_TOKEN or the stored login
    assert api.upload_folder.call_args.kwargs["commit_message"] == "m"
    assert ModelCard.load(tmp_path / "out" / "README.md").text.count('from_pretrained("org/name")') == 2


PUSH_FAILURES = {
    "offline mode": (
        {"HF_HUB_OFFLINE": "1"},
        None,
        r"HF_HUB_OFFLINE is set, so nothing was pushed to org/name; the export is kept: unset it, then push it with",
    ),
    "no token": (
        {},
        LocalTokenNotFoundError("Token is required"),
        r"no Hugging Face token; the export is kept: set HF_TOKEN or run `hf auth login`, then push it with",
    ),
    "no network": (
        {},
        OSError("[Errno 111] Connection refused"),
        r"cannot reach the Hub \(OSError: \[Errno 111.*\); the export is kept: check the network or proxy, then",
    ),
    "a namespace the token cannot write": (
        {},
        None,
        r"the token belongs to me \(organisations: org\), who cannot write to elsewhere/; the export is kept: use a "
        r"token that can write to elsewhere/ \(or push to me/...\), then push it with",
    ),
}


@pytest.mark.parametrize("case", PUSH_FAILURES, ids=list(PUSH_FAILURES))
def test_a_push_that_cannot_happen_fails_in_one_line_before_any_upload(
    case, gelu_export, tiny_model_json, tmp_path, monkeypatch, capsys
):
    environment, whoami_error, expected = PUSH_FAILURES[case]
    _, built, _ = gelu_export
    cfg = load_config(None, ["data.train_urls=x.tar", f"model.name={tiny_model_json}"])
    checkpoint = write_checkpoint(built, to_yaml(cfg), tmp_path / "run")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    api = fake_hub(None)
    if whoami_error is not None:
        api.whoami.side_effect = whoami_error
    monkeypatch.setattr("clipforge.export.hub.HfApi", mock.Mock(return_value=api))
    repo = "elsewhere/name" if "namespace" in case else "org/name"
    out = tmp_path / "my exports" / "it's $HOME"  # a folder a shell would split, unquote and expand
    assert main(["export", str(checkpoint), "--out", str(out), "--push", repo, "--revision", "v 1"]) == 1
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (transformers' own progress bar for writing the weights comes before it)
    assert "Traceback" not in err and last.startswith(f"clipforge export: push to {repo} failed: "), err
    assert re.search(expected, last) and "FOLDER" not in last, last
    # The command it suggests is valid for that folder and repo: a POSIX shell gives hf exactly these words.
    command = re.search(r"then push it with `(.*)`$", last).group(1)
    assert shlex.split(command) == ["hf", "upload", repo, str(out.resolve()), ".", "--revision", "v 1"], command
    api.create_repo.assert_not_called()
    api.upload_folder.assert_not_called()
    assert (out / "model.safetensors").is_file()  # the local export stays


def test_export_replaces_only_its_own_folders(gelu_export, tmp_path):
    _, built, _ = gelu_export
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a clipforge export"):
        export(built, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    export(built, tmp_path / "again", ("hf", "open_clip"))
    export(built, tmp_path / "again", ("hf",))  # a re-export leaves no stale open_clip weights behind
    assert not (tmp_path / "again" / "open_clip_model.safetensors").exists()


def test_export_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0 and "--push" in capsys.readouterr().out


def card_snippets(folder: Path) -> list[str]:
    """The Python blocks of an export's model card."""
    return re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.DOTALL)


PETS = {  # a classification set as `clipforge eval` reports it: per-class accuracies keyed by the suite's class names
    "task": "zeroshot_classification",
    "acc1": 0.5,
    "per_class_accuracy": {name: 0.5 for name in ("abyssinian", "beagle", "birman", "boxer", "chihuahua", "pug")},
}
RETRIEVAL = {"task": "zeroshot_retrieval", "image_retrieval_recall@1": 0.5}


@torch.no_grad()
def test_the_cards_example_classifies_the_eval_classes_and_runs_on_the_folder(gelu_export, tmp_path):
    """The card's snippet runs as written (the Hub name being the local folder) with the first class names of the
    reported classification set; without results, or with retrieval only, a generic example stands in."""
    _, built, _ = gelu_export
    folder, expected = tmp_path / "card", ["abyssinian", "beagle", "birman", "boxer", "chihuahua"]
    export_model(built, folder, ("hf",), CardInfo(name=str(folder), eval_results={"flickr": RETRIEVAL, "pets": PETS}))
    (snippet,) = card_snippets(folder)
    assert f"candidate_labels={expected!r}" in snippet and "`pets`" in (folder / "README.md").read_text()
    assert repr([photo_of(name) for name in expected]) in snippet
    assert "a photo of an abyssinian" in snippet and "a photo of a beagle" in snippet
    namespace = {"image": images(1, size=45)[0]}
    exec(snippet, namespace)
    assert namespace["probs"].shape == (1, len(expected))
    for name, given in (("none", None), ("retrieval", {"flickr": RETRIEVAL})):
        export_model(built, tmp_path / name, ("hf",), CardInfo(name=name, eval_results=given))
        (snippet,) = card_snippets(tmp_path / name)
        assert "candidate_labels=['cat', 'dog', 'car']" in snippet
        assert "classification set" not in (tmp_path / name / "README.md").read_text()


class Records(logging.Handler):
    """Every record transformers logs while attached (its loggers do not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(record.getMessage() for record in self.records)


def load_reporting(model_class, folder: Path, **kwargs):
    """``model_class.from_pretrained`` with its loading info and whatever transformers logged while loading."""
    handler, logger = Records(), logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, handler.text


def assert_loads_cleanly(info: dict, log: str) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not re.search(r"UNEXPECTED|MISSING|MISMATCH|newly initialized", log), log


@pytest.fixture(scope="module")
def tower_exports(exports, tmp_path_factory) -> dict:
    """The GELU and QuickGELU models of ``exports`` written with --towers both, beside their combined folders."""
    made = {}
    for activation, (built, _) in exports.items():
        out = tmp_path_factory.mktemp(f"towers-{activation}") / "tiny-towers"
        summary = export_model(built, out, ("hf",), CardInfo(name=out.name), ("text", "image"))
        made[activation] = (out, summary)
    return made


@torch.no_grad()
def test_text_and_image_towers_load_alone_and_give_the_full_models_embeddings(clip_export, tower_exports):
    """Each tower loads into transformers' encoder-only class with no unexpected or missing key, and gives the
    embeddings of the combined CLIPModel and of the clipforge model; the combined folder does not load cleanly."""
    from transformers import (
        AutoImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )

    activation, built, combined = clip_export
    folder, summary = tower_exports[activation]
    assert sorted(path.name for path in folder.iterdir()) == [
        "README.md",
        "clipforge_export.json",
        "feature_extractor",
        "image_encoder",
        "text_encoder",
        "tokenizer",
    ]  # the encoders in place of the combined model, in diffusers' layout
    assert summary["written"][0]["towers"]["image"] == {
        "folder": "image_encoder",
        "class": "CLIPVisionModelWithProjection",
        "processor": "feature_extractor",
    }
    _, info, log = load_reporting(CLIPTextModelWithProjection, combined)  # the report this export removes
    assert len(info["unexpected_keys"]) > 20 and "UNEXPECTED" in log
    text_encoder, info, log = load_reporting(CLIPTextModelWithProjection, folder, subfolder="text_encoder")
    assert_loads_cleanly(info, log)
    image_encoder, info, log = load_reporting(CLIPVisionModelWithProjection, folder, subfolder="image_encoder")
    assert_loads_cleanly(info, log)
    assert text_encoder.config.hidden_act == image_encoder.config.hidden_act == activation

    full = CLIPModel.from_pretrained(combined).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    inputs = tokenizer(CAPTIONS, padding=True, truncation=True, return_tensors="pt")
    reference = CLIPProcessor.from_pretrained(combined)(
        text=CAPTIONS, padding=True, truncation=True, return_tensors="pt"
    )
    assert torch.equal(inputs["input_ids"], reference["input_ids"])
    text_embeds = text_encoder(**inputs).text_embeds
    assert (text_embeds - full.get_text_features(**inputs).pooler_output).abs().max() < TOLERANCE
    assert (text_embeds - built.model.encode_text(built.tokenizer(CAPTIONS))).abs().max() < TOLERANCE

    pictures = images(2, size=45) + images(2)  # resized and cropped, and already at the model's size
    processor = AutoImageProcessor.from_pretrained(folder, subfolder="feature_extractor", backend="pil")
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        pixels, torch.stack([built.eval_transform(picture) for picture in pictures]), atol=1e-6, rtol=0
    )
    image_embeds = image_encoder(pixel_values=pixels).image_embeds
    assert (image_embeds - full.get_image_features(pixel_values=pixels).pooler_output).abs().max() < TOLERANCE
    assert (image_embeds - built.model.encode_image(pixels)).abs().max() < TOLERANCE
    assert image_embeds.std() > 1e-3 and text_embeds.std() > 1e-3  # real numbers, not a constant both sides share


@torch.no_grad()
def test_siglip_towers_load_alone_as_siglip_text_and_vision_models(tiny_siglip_json, tmp_path):
    from transformers import SiglipModel, SiglipTextModel, SiglipVisionModel

    torch.manual_seed(0)
    built = build_model(ModelConfig(name=tiny_siglip_json, init_logit_bias=-10.0, init_logit_scale=2.302585))
    model = built.model.eval()
    export_model(built, tmp_path / "full", ("hf",), CardInfo(name="full"))
    summary = export_model(built, tmp_path / "towers", ("hf",), CardInfo(name="towers"), ("text", "image"))
    assert summary["written"][0]["towers"]["text"] == {
        "folder": "text_encoder",
        "class": "SiglipTextModel",
        "processor": None,
    }
    assert not (tmp_path / "towers" / "tokenizer").exists() and "no tokenizer written" in summary["notes"][0]
    assert load_reporting(SiglipTextModel, tmp_path / "full")[1]["unexpected_keys"]  # what the towers export removes
    text_encoder, info, log = load_reporting(SiglipTextModel, tmp_path / "towers", subfolder="text_encoder")
    assert_loads_cleanly(info, log)
    image_encoder, info, log = load_reporting(SiglipVisionModel, tmp_path / "towers", subfolder="image_encoder")
    assert_loads_cleanly(info, log)
    full = SiglipModel.from_pretrained(tmp_path / "full").eval()
    pixels, tokens = torch.randn(3, 3, 32, 32), built.tokenizer(CAPTIONS)  # open_clip's ids: padded with 0, no mask
    text_embeds = text_encoder(input_ids=tokens).pooler_output
    image_embeds = image_encoder(pixel_values=pixels).pooler_output
    assert (text_embeds - full.get_text_features(input_ids=tokens).pooler_output).abs().max() < TOLERANCE
    assert (text_embeds - model.encode_text(tokens)).abs().max() < TOLERANCE
    assert (image_embeds - full.get_image_features(pixel_values=pixels).pooler_output).abs().max() < TOLERANCE
    assert (image_embeds - model.encode_image(pixels)).abs().max() < TOLERANCE


def test_cli_towers_writes_the_encoder_asked_for_and_refuses_them_without_transformers(
    gelu_export, tiny_model_json, tmp_path, capsys
):
    _, built, _ = gelu_export
    cfg = load_config(None, ["data.train_urls=x.tar", f"model.name={tiny_model_json}"])
    checkpoint = write_checkpoint(built, to_yaml(cfg), tmp_path / "run")
    assert main(["export", str(checkpoint), "--towers", "text", "--format", "both", "--out", str(tmp_path / "t")]) == 0
    assert "encoders alone: text" in capsys.readouterr().out
    names = {path.name for path in (tmp_path / "t").iterdir()}
    assert {"text_encoder", "tokenizer", "open_clip_model.safetensors"} <= names
    assert not names & {"image_encoder", "feature_extractor", "config.json", "model.safetensors"}
    card = ModelCard.load(tmp_path / "t" / "README.md")
    assert card.data.pipeline_tag is None and "zero-shot-image-classification" not in card.data.tags
    assert f'CLIPTextModelWithProjection.from_pretrained("{tmp_path / "t"}", subfolder="text_encoder")' in card.text
    assert "image_encoder" not in card.text
    assert (
        main(["export", str(checkpoint), "--towers", "both", "--format", "open_clip", "--out", str(tmp_path / "o")])
        == 2
    )
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "towers ['text', 'image']" in error and "must include 'hf', got ['open_clip']" in error
    assert not (tmp_path / "o").exists()


@torch.no_grad()
def test_the_towers_cards_example_runs_on_the_folder(gelu_export, tmp_path):
    """The card of an encoders-only export loads them from their subfolders, as written, with the eval's classes."""
    _, built, _ = gelu_export
    folder = tmp_path / "towers-card"
    export_model(built, folder, ("hf",), CardInfo(name=str(folder), eval_results={"pets": PETS}), ("text", "image"))
    (snippet,) = card_snippets(folder)
    texts = [photo_of(name) for name in list(PETS["per_class_accuracy"])[:5]]
    assert repr(texts) in snippet
    image = images(1, size=45)[0]
    namespace = {"image": image}
    exec(snippet, namespace)
    assert (namespace["text_embeds"] - built.model.encode_text(built.tokenizer(texts))).abs().max() < TOLERANCE
    pixels = built.eval_transform(image)[None]  # (1, 3, 32, 32)
    assert (namespace["image_embeds"] - built.model.encode_image(pixels)).abs().max() < TOLERANCE


ENV_SECRET = "env-secret-0451-do-not-publish"
HUB_TOKEN = "hf_" + "Qx7" * 12  # a literal token, shaped as Hugging Face's are
API_KEY = "0123456789abcdef" * 2 + "01234567"  # a hex key: only its key's name says it is a credential


def test_no_environment_value_or_literal_token_reaches_any_exported_file(
    gelu_export, tiny_model_json, tmp_path, monkeypatch
):
    """A config that reads a token from the environment and holds literal ones: the checkpoint's config.yaml keeps
    the interpolation as written, the export never resolves it, and the card shows neither the environment's value
    nor a literal credential, in any file of the folder."""
    _, built, _ = gelu_export
    monkeypatch.setenv("CLIPFORGE_TEST_HUB_TOKEN", ENV_SECRET)
    authorised = (
        "pipe:curl -s -H 'Authorization: Bearer ${oc.env:CLIPFORGE_TEST_HUB_TOKEN}' https://example.com/{0..3}.tar"
    )
    cfg = load_config(None, [f'data.train_urls="{authorised}"', f"model.name={tiny_model_json}"])
    saved = yaml.safe_load(to_yaml(cfg))
    assert saved["data"]["train_urls"] == authorised  # saved as written (clipforge.config.to_yaml)
    saved["data"]["sources"] = [{"urls": f"https://me:{HUB_TOKEN}@example.com/{{0..1}}.tar", "weight": 2.0}]
    saved["logging"]["hf_token"] = HUB_TOKEN  # keys of a config from elsewhere: the export reads what is there
    saved["logging"]["wandb_api_key"] = API_KEY
    checkpoint = write_checkpoint(built, yaml.safe_dump(saved), tmp_path / "run")
    out = tmp_path / "out"
    assert main(["export", str(checkpoint), "--format", "both", "--out", str(out)]) == 0
    files = [path for path in out.rglob("*") if path.is_file()]
    assert {"README.md", "model.safetensors", "open_clip_config.json"} <= {path.name for path in files}
    for path in files:
        data = path.read_bytes()
        for secret in (ENV_SECRET, HUB_TOKEN, API_KEY):
            assert secret.encode() not in data, (secret, path.name)
    card = (out / "README.md").read_text()
    assert "Bearer ${oc.env:CLIPFORGE_TEST_HUB_TOKEN}" in card  # shown as written: a name, not a value
    assert "`https://me:<redacted>@example.com/{0..1}.tar` (weight 2.0)" in card  # the data are still named
    assert "hf_token: <redacted>" in card and "wandb_api_key: <redacted>" in card
    assert "caption_key: txt" in card  # a key that is not a credential is kept


def test_eval_and_export_read_a_checkpoints_model_section_alike(
    gelu_export, tiny_model_json, synth_suite, tmp_path, capsys
):
    """One reading of a checkpoint's config.yaml for both commands: the run's initial weights (model.init_from, and
    model.pretrained as earlier configs name it) are not read, since the checkpoint's own replace them; a model key
    ModelConfig does not know stops both with the same line."""
    from safetensors.torch import load_file

    from clipforge.evaluation import load_eval_model
    from clipforge.model_loading import read_checkpoint_config

    _, built, _ = gelu_export
    saved = yaml.safe_load(to_yaml(load_config(None, ["data.train_urls=x.tar", f"model.name={tiny_model_json}"])))
    saved["model"].update(init_from=str(tmp_path / "moved-away"), pretrained="openai")
    checkpoint = write_checkpoint(built, yaml.safe_dump(saved), tmp_path / "run")
    assert read_checkpoint_config(checkpoint) == (ModelConfig(name=tiny_model_json), saved)
    assert main(["export", str(checkpoint), "--format", "open_clip", "--out", str(tmp_path / "out")]) == 0
    exported = load_file(tmp_path / "out" / "open_clip_model.safetensors")
    evaluated = load_eval_model(str(checkpoint)).encoder.model.state_dict()
    for key, value in built.model.state_dict().items():
        assert torch.equal(exported[key], value) and torch.equal(evaluated[key], value), key

    saved["model"]["patch_dropot"] = 0.5
    misspelt = write_checkpoint(built, yaml.safe_dump(saved), tmp_path / "misspelt")
    errors = []
    for command in (
        ["export", str(misspelt), "--out", str(tmp_path / "out2")],
        ["eval", str(misspelt), "--suite", str(synth_suite), "--out", str(tmp_path / "results")],
    ):
        assert main(command) == 2
        errors.append(capsys.readouterr().err.strip().split(": error: ", 1)[1])
    assert errors[0] == errors[1] and errors[0].startswith(
        f"{misspelt / 'config.yaml'}: unknown model keys ['patch_dropot']"
    )
    assert not (tmp_path / "out2").exists() and not list((tmp_path / "results").glob("*.json"))


@pytest.mark.parametrize("repo", ["bad id/with spaces", "org/na..me", "a/b/c"])
def test_push_refuses_an_invalid_repo_id_before_any_export_work(
    repo, gelu_export, tiny_model_json, tmp_path, monkeypatch, capsys
):
    _, built, folder = gelu_export
    cfg = load_config(None, ["data.train_urls=x.tar", f"model.name={tiny_model_json}"])
    checkpoint = write_checkpoint(built, to_yaml(cfg), tmp_path / "run")
    hub = mock.Mock()
    monkeypatch.setattr("clipforge.export.hub.HfApi", hub)
    monkeypatch.setattr(
        "clipforge.model_loading.build_model", mock.Mock(side_effect=AssertionError("the model was built"))
    )
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out"), "--push", repo]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"clipforge export: error: --push {repo!r} is not a Hub repo id (NAME or ORG/NAME): "), err
    assert re.search(r"alphanumeric|--|form 'repo_name' or 'namespace/repo_name'", err), err  # the Hub's rule
    assert not (tmp_path / "out").exists()
    hub.assert_not_called()
    api = fake_hub(None)
    with pytest.raises(ValueError, match="is not a Hub repo id"):  # the library call checks it too, first
        push_to_hub(folder, repo, api=api)
    api.whoami.assert_not_called()


def write_results(path: Path, acc1: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"task": "zeroshot_classification", "acc1": acc1, "acc5": 1.0, "mean_per_class_recall": acc1}
    path.write_text(json.dumps({"shapes": {**metrics, "chance_acc1": 1 / 6}}))
    return path


def test_the_card_says_which_evaluation_its_numbers_come_from(gelu_export, tiny_model_json, tmp_path):
    """By default the card takes the training-time evaluation of the exported checkpoint and nothing else: not
    another checkpoint's, not an ad-hoc `clipforge eval` (which may have used other labels). It names the
    checkpoint, the suite, the datasets and the file; results named with --eval-results say what they evaluated."""
    _, built, _ = gelu_export
    saved = yaml.safe_load(to_yaml(load_config(None, ["data.train_urls=x.tar", f"model.name={tiny_model_json}"])))
    saved["eval"]["suite"] = "eval/shapes.yaml"
    checkpoint = write_checkpoint(built, yaml.safe_dump(saved), tmp_path / "run", step=30)
    evals = tmp_path / "run" / "eval"
    training = write_results(evals / "step_00000030.json", 0.75)
    for other in ("step_00000040.json", "mine_step_00000030.json", "adhoc/mine_step_00000030.json"):
        os.utime(write_results(evals / other, 0.0), (2e9, 2e9))  # newer than the training-time file
    latest = tmp_path / "run" / "checkpoints" / "latest"  # what users export
    if not latest.exists():
        latest.symlink_to(checkpoint.name)

    def card(*options: str) -> str:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
        assert main(["export", str(latest), "--format", "open_clip", "--out", str(out), *options]) == 0
        return (out / "README.md").read_text()

    text = card()
    assert "| 75.0% |" in text and "| 0.0% |" not in text, text
    assert (
        f"`clipforge eval` of checkpoint `step_00000030` with suite `eval/shapes.yaml` on `shapes` "
        f"(results file `{training}`):"
    ) in text
    named = evals / "adhoc" / "shapes_step_00000020.json"
    write_results(named, 0.5)
    text = card("--eval-results", str(named))
    assert "| 50.0% |" in text
    assert (
        "`clipforge eval` of checkpoint `step_00000020` (not the exported `step_00000030`) with suite `shapes` on "
        f"`shapes` (results file `{named}`):"
    ) in text
    training.unlink()  # this checkpoint was not evaluated in training: no numbers, rather than another model's
    text = card()
    assert "No `clipforge eval` results of checkpoint `step_00000030`" in text and "0.0%" not in text


@torch.no_grad()
def test_the_cards_snippets_load_the_export_folder_and_say_a_photo_of_an(gelu_export, tiny_model_json, tmp_path):
    """Not pushed, the card's snippets load the folder it was written to (the title stays the run's name); class
    names get the article they need, and keep their own."""
    _, built, _ = gelu_export
    cfg = load_config(None, ["data.train_urls=x.tar", f"model.name={tiny_model_json}"])
    checkpoint = write_checkpoint(built, to_yaml(cfg), tmp_path / "vit")
    names = ["an astronaut", "astronaut", "camera", "the moon", "eagle"]
    results = tmp_path / "results.json"
    scores = {name: 0.5 for name in names}
    results.write_text(json.dumps({"photos": {"task": "zeroshot_classification", "per_class_accuracy": scores}}))
    out = tmp_path / "exported" / "vit"
    assert main(["export", str(checkpoint), "--format", "both", "--out", str(out), "--eval-results", str(results)]) == 0
    text = (out / "README.md").read_text()
    assert text.count(f'.from_pretrained("{out}")') == 2 and '"vit"' not in text
    assert f'create_model_and_transforms("local-dir:{out}")' in text and "hf-hub:" in text  # and once pushed
    expected = ["a photo of an astronaut", "a photo of an astronaut", "a photo of a camera", "a photo of the moon"]
    assert repr(expected + ["a photo of an eagle"]) in text
    (snippet, _) = card_snippets(out)
    namespace = {"image": images(1, size=45)[0]}
    exec(snippet, namespace)  # runs as written, from any directory the folder path is valid in
    assert namespace["probs"].shape == (1, len(names))


ODD_MARGINS = {  # an image's size → the margin its centre crop removes after the shortest side is resized to 32
    (42, 40): 1,
    (44, 40): 3,
    (47, 40): 5,
    (49, 40): 7,
    (40, 44): 3,
    (40, 49): 7,
    (40, 47): 5,
    (128, 45): 59,
}


@torch.no_grad()
def test_the_processor_crops_as_clipforge_eval_except_at_a_margin_of_4k_plus_3(gelu_export):
    """Where the resized image leaves an odd margin to crop, torchvision's CenterCrop (open_clip's transform, which
    clipforge eval uses) puts the crop at round(margin / 2), rounding half to even, and transformers' processor (both
    backends) at floor(margin / 2). At a margin of 4k+1 they agree and the PIL backend gives clipforge's pixels
    exactly; at 4k+3 its crop sits one pixel further up or left, and otherwise matches to the last bit."""
    import torchvision.transforms.functional as TF
    from transformers import AutoImageProcessor

    _, built, folder = gelu_export
    pil = AutoImageProcessor.from_pretrained(folder, backend="pil")
    default = AutoImageProcessor.from_pretrained(folder)  # transformers 5: the torchvision backend
    resize, _crop, *rest = built.eval_transform.transforms
    generator = np.random.default_rng(0)
    for (width, height), margin in ODD_MARGINS.items():
        picture = Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))  # every shift shows
        resized = resize(picture)
        assert max(resized.size) - 32 == margin
        floor = TF.crop(resized, (resized.size[1] - 32) // 2, (resized.size[0] - 32) // 2, 32, 32)
        for step in rest:
            floor = step(floor)
        ours = built.eval_transform(picture)  # (3, 32, 32)
        theirs = pil(images=picture, return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(theirs, floor, atol=1e-6, rtol=0)  # transformers crops at floor(margin / 2)
        if margin % 4 == 3:
            assert (theirs - ours).abs().max() > 0.5, (width, height)  # one pixel apart
        else:
            torch.testing.assert_close(theirs, ours, atol=1e-6, rtol=0)
        tensors = default(images=picture, return_tensors="pt")["pixel_values"][0]
        assert (tensors - theirs).abs().mean() < 0.01  # the same crop; its tensor resize differs slightly
