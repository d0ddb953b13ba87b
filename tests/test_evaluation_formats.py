"""Benchmark inputs: the WebDataset reader against webdataset's own, and one set in three formats."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from eval_fixtures import write_hf, write_imagefolder
from PIL import Image

from clipforge.data.images import IMAGE_EXTENSIONS
from clipforge.data.shards import write_tar
from clipforge.evaluation import OpenClipEncoder, benchmark_loader, load_benchmark, load_suite, run_suite
from clipforge.evaluation.datasets import CLIP_BENCHMARK_IMAGE_ORDER, detect_format
from clipforge.evaluation.zeroshot import embed_images
from clipforge.models import ModelConfig, build_model


def webdataset_reference(root, split="test"):
    """(image array, target) per sample as CLIP_benchmark reads the directory (webdataset underneath)."""
    from clip_benchmark.datasets.builder import build_wds_dataset

    dataset = build_wds_dataset(root.name, transform=np.asarray, split=split, data_dir=str(root))
    return list(dataset)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed_wds(tmp_path_factory):
    """Two shards; webp, png and jpg images, an upper-case extension, keys in a sub-folder, a metadata member to
    ignore."""
    root = tmp_path_factory.mktemp("mixed")
    generator = np.random.default_rng(0)
    formats = (("webp", "WEBP"), ("png", "PNG"), ("jpg", "JPEG"), ("PNG", "PNG"))
    for shard in range(2):
        samples = []
        for index in range(7):
            image = Image.fromarray(generator.integers(0, 255, (12 + index, 10, 3), dtype=np.uint8))
            extension, fmt = formats[(shard + index) % len(formats)]
            samples.append(
                {
                    "__key__": f"part{shard}/s_{index:03d}" if index % 2 else f"s{shard}_{index:03d}",
                    extension: encode(image, fmt),
                    "cls": str((shard * 7 + index) % 3),
                }
            )
        write_tar(root / "test" / f"{shard}.tar", iter(samples))
    with tarfile.open(root / "test" / "0.tar", "a") as tar:  # webdataset skips a top-level __name__ member
        tar.addfile(tarfile.TarInfo("__meta__"), io.BytesIO())
    (root / "test" / "nshards.txt").write_text("2\n")
    (root / "classnames.txt").write_text("zero\none\ntwo\n")
    (root / "zeroshot_classification_templates.txt").write_text("a {c}.\n")
    return root


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")
def test_wds_reader_matches_webdataset_sample_for_sample(mixed_wds, synth_data):
    for root in (mixed_wds, synth_data / "eval" / "retrieval", synth_data / "eval" / "shapes"):
        benchmark = load_benchmark(root)
        reference = webdataset_reference(root)
        assert len(benchmark) == len(reference) > 0
        for index, (image, target) in enumerate(reference):
            np.testing.assert_array_equal(np.asarray(benchmark.image(index)), image)
            expected = target.splitlines() if isinstance(target, str) else target
            assert benchmark.source.target(index) == expected
    assert load_benchmark(mixed_wds).classnames == ["zero", "one", "two"]
    assert load_benchmark(mixed_wds).source.keys[:3] == ["s0_000", "part0/s_001", "s0_002"]


def test_the_benchmark_reader_knows_the_training_readers_image_extensions():
    assert sorted(CLIP_BENCHMARK_IMAGE_ORDER) == sorted(IMAGE_EXTENSIONS)


def test_one_set_in_three_formats_gives_identical_embeddings_and_metrics(synth_data, tiny_resnet_json, tmp_path):
    shapes, retrieval = synth_data / "eval" / "shapes", synth_data / "eval" / "retrieval"
    folder = write_imagefolder(shapes, tmp_path / "shapes_folder")
    hf_shapes = write_hf(shapes, tmp_path / "shapes_hf", "classification")
    hf_retrieval = write_hf(retrieval, tmp_path / "retrieval_hf", "retrieval")
    assert [detect_format(p) for p in (shapes, folder, hf_shapes)] == ["wds", "imagefolder", "hf"]
    torch.manual_seed(0)
    built = build_model(ModelConfig(name=tiny_resnet_json))
    encoder = OpenClipEncoder(built.model.eval())

    def embedded(path, **kwargs):
        benchmark = load_benchmark(path, **kwargs)
        return embed_images(encoder, benchmark_loader(benchmark, built.eval_transform, 100, 1))

    wds_features, wds_labels = embedded(shapes)
    hf_features, hf_labels = embedded(hf_shapes)
    assert torch.equal(wds_features, hf_features) and torch.equal(wds_labels, hf_labels)
    wds_retrieval, wds_captions = embedded(retrieval, kind="retrieval")
    hf_retrieval_features, hf_captions = embedded(hf_retrieval, kind="retrieval")
    assert torch.equal(wds_retrieval, hf_retrieval_features) and wds_captions == hf_captions

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        json.dumps(
            {
                "name": "formats",
                "datasets": [
                    {"name": "wds", "task": "zeroshot_classification", "path": str(shapes)},
                    {"name": "folder", "task": "zeroshot_classification", "path": str(folder), "format": "imagefolder"},
                    {
                        "name": "hf",
                        "task": "zeroshot_classification",
                        "path": str(hf_shapes),
                        "templates": str(shapes / "zeroshot_classification_templates.txt"),
                    },
                    {"name": "wds-retrieval", "task": "zeroshot_retrieval", "path": str(retrieval)},
                    {"name": "hf-retrieval", "task": "zeroshot_retrieval", "path": str(hf_retrieval)},
                ],
            }
        )
    )
    results = run_suite(encoder, built.tokenizer, built.eval_transform, load_suite(suite), 100, 1)
    # The image folder orders classes alphabetically, so its label indices differ; the metrics must not.
    for name in ("folder", "hf"):
        for key in ("acc1", "acc5", "mean_per_class_recall", "per_class_accuracy", "num_samples"):
            assert results[name][key] == results["wds"][key], (name, key)
    for key, value in results["wds-retrieval"].items():
        if "recall" in key or key == "examples":
            assert results["hf-retrieval"][key] == value, key


def test_imagefolder_class_names_and_overrides(tmp_path):
    for name in ("golden_retriever", "tabby_cat"):
        (tmp_path / "pets" / "test" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "pets" / "test" / name / "a.png")
    benchmark = load_benchmark(tmp_path / "pets", templates=["a photo of a {c}."])
    assert benchmark.classnames == ["golden retriever", "tabby cat"] and benchmark.format == "imagefolder"
    (tmp_path / "pets" / "classnames.txt").write_text("dog\ncat\n")
    assert load_benchmark(tmp_path / "pets").classnames == ["dog", "cat"]
    assert load_benchmark(tmp_path / "pets", classnames=["x", "y"]).classnames == ["x", "y"]
    with pytest.raises(FileNotFoundError, match="without a 'train' sub-folder"):
        load_benchmark(tmp_path / "pets", split="train")


def test_hf_dataset_errors_name_the_columns_and_splits(tmp_path):
    import datasets

    table = {"image": [{"bytes": encode(Image.new("RGB", (4, 4)), "PNG"), "path": None}], "score": [0.5]}
    features = datasets.Features({"image": datasets.Image(), "score": datasets.Value("float32")})
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(
        str(tmp_path / "hf")
    )
    with pytest.raises(ValueError, match=r"no split 'test'.*validation"):
        load_benchmark(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"no label column \(columns: \['image', 'score'\]\)"):
        load_benchmark(tmp_path / "hf", split="validation")
    with pytest.raises(ValueError, match="no caption column"):
        load_benchmark(tmp_path / "hf", split="validation", kind="retrieval")
