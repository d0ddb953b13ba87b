"""``clipforge eval`` end to end, on each kind of model it takes, and its report files."""

import gzip
import json

import open_clip
import pytest
import torch
from checkpointing import weights_file
from eval_fixtures import assert_valid_png

from clipforge.cli import main
from clipforge.evaluation import benchmark_loader, load_benchmark, load_eval_model, load_suite, run_suite
from clipforge.evaluation.report import markdown_table
from clipforge.evaluation.zeroshot import build_classifier, embed_images


def numbers(results):
    """Every metric except timings (comparable across runs of the same model on the same data)."""
    return {
        name: {key: value for key, value in metrics.items() if key != "seconds"} for name, metrics in results.items()
    }


@pytest.fixture(scope="module")
def cli_results(trained_checkpoint, probe_suite, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_eval")
    assert (
        main(
            [
                "eval",
                str(trained_checkpoint),
                "--suite",
                str(probe_suite),
                "--out",
                str(out),
                "--quiet",
                "--workers",
                "1",
                "--batch-size",
                "100",
            ]
        )
        == 0
    )
    return out, json.loads((out / f"synthetic_{trained_checkpoint.name}.json").read_text())


def test_cli_writes_json_markdown_and_plots_equal_to_the_library(
    cli_results,
    trained_checkpoint,
    probe_suite,
):
    out, results = cli_results
    loaded = load_eval_model(str(trained_checkpoint))
    direct = run_suite(loaded.encoder, loaded.tokenizer, loaded.transform, load_suite(probe_suite), 100, 1)
    assert numbers(results) == json.loads(json.dumps(numbers(direct)))
    stem = f"synthetic_{trained_checkpoint.name}"
    table = (out / f"{stem}.md").read_text()
    assert table.startswith(markdown_table(results)) and "| shapes-probe | linear probe | top-1 |" in table
    for name in ("shapes", "colors", "shapes-probe"):
        assert_valid_png(out / f"{stem}_{name}_per_class.png")
    assert_valid_png(out / f"{stem}_retrieval_retrieval.png", min_bytes=50_000)
    probe = results["shapes-probe"]
    assert probe["num_train"] + probe["num_val"] == 1000 and probe["num_samples"] == 300
    # Frozen features of a briefly trained model separate shapes far better than its zero-shot prompts do.
    assert probe["acc1"] > max(0.3, results["shapes"]["acc1"] + 0.15)  # chance is 1/6
    examples = results["retrieval"]["examples"]
    assert len(examples) == 6 and all(len(example["top_images"]) == 5 for example in examples)


def test_default_output_is_the_run_directory(trained_checkpoint, synth_suite):
    assert (
        main(["eval", str(trained_checkpoint), "--suite", str(synth_suite), "--quiet", "--no-plots", "--workers", "0"])
        == 0
    )
    eval_dir = trained_checkpoint.parent.parent / "eval" / "adhoc"  # beside training's eval/step_N.json, not among
    assert (eval_dir / f"synthetic_{trained_checkpoint.name}.json").is_file()
    assert not list(eval_dir.glob("*.png"))


def test_open_clip_architecture_with_weights_and_open_clip_folder_load_the_same_model(
    trained_checkpoint, synth_data, tiny_resnet_json, tmp_path
):
    weights = tmp_path / "weights.safetensors"
    weights_file(trained_checkpoint, weights)
    folder = tmp_path / "open_clip_folder"
    folder.mkdir()
    reference = load_eval_model(str(trained_checkpoint))
    (folder / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": json.loads(open(tiny_resnet_json).read()),
                "preprocess_cfg": open_clip.get_model_preprocess_cfg(reference.encoder.model),
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="open_clip folder without weights"):
        load_eval_model(str(folder))  # open_clip itself would random-initialise here
    weights_file(trained_checkpoint, folder / "open_clip_model.safetensors")
    benchmark = load_benchmark(synth_data / "eval" / "retrieval")
    texts = [caption for index in range(8) for caption in benchmark.source.target(index)]
    for loaded in (load_eval_model(architecture=tiny_resnet_json, weights=str(weights)), load_eval_model(str(folder))):
        images = torch.stack([loaded.transform(benchmark.image(index)) for index in range(8)])
        expected = torch.stack([reference.transform(benchmark.image(index)) for index in range(8)])
        assert torch.equal(images, expected) and torch.equal(loaded.tokenizer(texts), reference.tokenizer(texts))
        assert torch.equal(loaded.encoder.encode_image(images), reference.encoder.encode_image(images))
        assert torch.equal(
            loaded.encoder.encode_text(loaded.tokenizer(texts)),
            reference.encoder.encode_text(reference.tokenizer(texts)),
        )
    with pytest.raises(ValueError, match="needs --weights"):
        load_eval_model(architecture=tiny_resnet_json)


def test_cli_with_architecture_and_weights(trained_checkpoint, synth_data, tiny_resnet_json, tmp_path):
    suite = tmp_path / "colors.yaml"
    suite.write_text(
        f"name: colors\ndatasets:\n  - name: colors\n    task: zeroshot_classification\n"
        f"    path: {synth_data / 'eval' / 'colors'}\n"
    )
    args = ["--suite", str(suite), "--quiet", "--no-plots", "--workers", "1", "--batch-size", "100"]
    assert main(["eval", str(trained_checkpoint), "--out", str(tmp_path / "a"), *args]) == 0
    assert (
        main(
            [
                "eval",
                "--model",
                tiny_resnet_json,
                "--weights",
                str(weights_file(trained_checkpoint, tmp_path / "model.safetensors")),
                "--out",
                str(tmp_path / "b"),
                *args,
            ]
        )
        == 0
    )
    from_checkpoint = json.loads((tmp_path / "a" / f"colors_{trained_checkpoint.name}.json").read_text())
    from_weights = json.loads((tmp_path / "b" / "colors_model.json").read_text())
    assert numbers(from_weights) == numbers(from_checkpoint) and from_weights["colors"]["acc1"] > 0.3


def test_amp_gives_close_embeddings_and_accuracy(trained_checkpoint, synth_data):
    fp32 = load_eval_model(str(trained_checkpoint))
    bf16 = load_eval_model(str(trained_checkpoint), amp=True)
    benchmark = load_benchmark(synth_data / "eval" / "colors")
    loader = benchmark_loader(benchmark, fp32.transform, 100, 0)
    (features, _), (features_amp, _) = embed_images(fp32.encoder, loader), embed_images(bf16.encoder, loader)
    assert features_amp.dtype == torch.float32 and not torch.equal(features, features_amp)  # bf16 really ran
    assert (features * features_amp).sum(dim=1).min() > 0.98  # cosine similarity per image
    classifiers = [
        build_classifier(loaded.encoder, loaded.tokenizer, benchmark.classnames, benchmark.templates)
        for loaded in (fp32, bf16)
    ]
    agree = ((features @ classifiers[0]).argmax(1) == (features_amp @ classifiers[1]).argmax(1)).float().mean()
    assert agree > 0.9


def test_missing_benchmark_data_says_where_and_how_before_loading_a_model(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.yaml").write_text("model:\n  name: no-such-architecture\n")  # building it would fail
    code = main(["eval", str(checkpoint), "--suite", "eval/imagenet1k.yaml", "--data-root", str(tmp_path / "bench")])
    error = capsys.readouterr().err
    assert code == 2 and "no-such-architecture" not in error
    expected = (
        f'hf download clip-benchmark/wds_imagenet1k --repo-type dataset --include "test/*" --include '
        f'"*.txt" --local-dir {tmp_path / "bench" / "wds_imagenet1k"}'
    )
    assert expected in error and f"{tmp_path / 'bench' / 'wds_imagenet1k'}/test/nshards.txt" in error


def open_clip_bpe_tokenizer():
    """A transformers CLIPTokenizer built offline from open_clip's bundled BPE merges (49,408 tokens)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(merge.split()) for merge in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab=dict(zip(vocab, range(len(vocab)))), merges=merges)


@pytest.fixture(scope="module")
def transformers_folder(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 24,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=32,
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), open_clip_bpe_tokenizer()
    )
    processor.save_pretrained(folder)
    return folder


def test_transformers_folder_matches_the_zero_shot_pipeline(transformers_folder, synth_data):
    from transformers import pipeline

    loaded = load_eval_model(str(transformers_folder))
    assert loaded.kind == "transformers"
    texts = ["a photo of a golden retriever.", "two small red triangles"]
    for ours, reference in zip(loaded.tokenizer(texts), open_clip.tokenize(texts, context_length=24)):
        end = reference.tolist().index(49407) + 1  # open_clip pads with 0 after the end token, transformers with it
        assert ours[:end].tolist() == reference[:end].tolist()
    benchmark = load_benchmark(synth_data / "eval" / "shapes")
    images = [benchmark.image(index) for index in range(24)]
    features = loaded.encoder.encode_image(torch.stack([loaded.transform(image) for image in images]))
    classifier = build_classifier(loaded.encoder, loaded.tokenizer, benchmark.classnames, ["a photo of a {c}."])
    scale = loaded.encoder.model.logit_scale.exp().item()
    ours = (scale * features @ classifier).softmax(dim=1)  # (24, 6)
    classify = pipeline("zero-shot-image-classification", model=str(transformers_folder), device="cpu")
    outputs = classify(images, candidate_labels=benchmark.classnames, hypothesis_template="a photo of a {}.")
    theirs = torch.tensor(
        [
            [next(o["score"] for o in output if o["label"] == name) for name in benchmark.classnames]
            for output in outputs
        ]
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_cli_on_a_transformers_folder(transformers_folder, synth_suite, tmp_path):
    assert (
        main(
            [
                "eval",
                str(transformers_folder),
                "--suite",
                str(synth_suite),
                "--out",
                str(tmp_path),
                "--quiet",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / f"synthetic_{transformers_folder.name}.json").read_text())
    assert results["shapes"]["num_samples"] == 300 and results["retrieval"]["num_texts"] == 500
    (transformers_folder / "tokenizer.json").rename(transformers_folder / "tokenizer.json.bak")
    vocab = transformers_folder / "vocab.json"
    moved = vocab.exists() and vocab.rename(transformers_folder / "vocab.json.bak")
    try:
        with pytest.raises(FileNotFoundError, match="without tokenizer files"):
            load_eval_model(str(transformers_folder))
    finally:
        (transformers_folder / "tokenizer.json.bak").rename(transformers_folder / "tokenizer.json")
        if moved:
            (transformers_folder / "vocab.json.bak").rename(vocab)
