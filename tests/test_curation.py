"""clipforge.curation: score shards with a model, filter the table, reshard the kept samples; synthetic --noise."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from clipforge.cli import main
from clipforge.curation.dedup import faiss_available, near_duplicates
from clipforge.curation.filter import FilterRules, apply_rules, balance, filter_scores, nonalpha_fraction
from clipforge.curation.reshard import reshard
from clipforge.curation.score import ModelSpec, score_shards
from clipforge.data.shards import SyntheticSpec, write_synthetic
from clipforge.data.teacher import TeacherEmbeddings, read_shard_embeddings, write_shard_embeddings
from clipforge.evaluation.loading import load_eval_model
from clipforge.models import ModelConfig, build_model

SPEC = dict(num_samples=300, samples_per_shard=100, image_size=32, num_eval_samples=12, num_retrieval_samples=6)
SPEC.update(num_eval_train_samples=0, num_workers=1)


@pytest.fixture(scope="module")
def noisy_and_clean(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("curation")
    write_synthetic(SyntheticSpec(out=str(root / "clean"), **SPEC), progress=False)
    write_synthetic(SyntheticSpec(out=str(root / "noisy"), noise=0.3, **SPEC), progress=False)
    return root / "clean", root / "noisy"


@pytest.fixture(scope="module")
def weights(tiny_resnet_json, tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=tiny_resnet_json)).model
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def scored(noisy_and_clean, tiny_resnet_json, weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scores")
    summary = score_shards(
        str(noisy_and_clean[1] / "train"), str(out), ModelSpec(None, tiny_resnet_json, weights), 64, 1, progress=False
    )
    assert summary["samples"] == 300 and summary["scored_now"] == 3
    return out


def samples_of(directory: Path) -> dict[str, dict[str, bytes]]:
    found = {}
    for path in sorted(directory.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, extension = member.name.split(".", 1)
                found.setdefault(key, {})[extension] = tar.extractfile(member).read()
    return found


def test_noise_replaces_the_listed_captions_with_another_samples_and_nothing_else(noisy_and_clean):
    clean, noisy = (samples_of(root / "train") for root in noisy_and_clean)
    listed = pd.read_csv(noisy_and_clean[1] / "train" / "noisy_keys.tsv", sep="\t", dtype=str)
    assert 0.2 < len(listed) / len(clean) < 0.4
    replaced = dict(zip(listed["key"], listed["caption_from"]))
    assert clean.keys() == noisy.keys()
    for key, sample in clean.items():
        assert noisy[key]["jpg"] == sample["jpg"]
        expected = clean[replaced[key]]["txt"] if key in replaced else sample["txt"]
        assert noisy[key]["txt"] == expected
        assert replaced.get(key) != key


def test_score_writes_aligned_embeddings_and_the_cosine(scored, noisy_and_clean, tiny_resnet_json, weights):
    table = pd.read_parquet(scored / "scores.parquet")
    assert list(table.columns)[:4] == ["key", "shard", "row", "score"]
    assert {"caption", "caption_words", "caption_chars", "width", "height"} <= set(table.columns)
    assert (table["width"] == 32).all() and len(table) == 300
    keys, image, text = read_shard_embeddings(scored, "00001")
    assert image.dtype == np.float16 and image.shape == (100, 64)
    part = table[table["shard"] == "00001"]
    assert list(part["key"]) == keys and list(part["row"]) == list(range(100))
    cosine = (image.astype(np.float32) * text.astype(np.float32)).sum(axis=1)
    np.testing.assert_allclose(part["score"], cosine, atol=3e-3)
    info = json.loads((scored / "teacher.json").read_text())
    assert info["embed_dim"] == 64 and info["temperature"] == pytest.approx(1 / info["logit_scale"])
    # the stored rows are what the model gives for that sample
    loaded = load_eval_model(None, tiny_resnet_json, weights)
    sample = samples_of(noisy_and_clean[1] / "train")[keys[7]]
    from clipforge.data.images import decode_rgb

    expected_image = loaded.encoder.encode_image(loaded.transform(decode_rgb(sample["jpg"]))[None])[0]
    expected_text = loaded.encoder.encode_text(loaded.tokenizer([sample["txt"].decode()]))[0]
    np.testing.assert_allclose(image[7].astype(np.float32), expected_image.numpy(), atol=2e-3)
    np.testing.assert_allclose(text[7].astype(np.float32), expected_text.numpy(), atol=2e-3)


def test_score_resumes_by_shard(scored, noisy_and_clean, tiny_resnet_json, weights):
    before = pd.read_parquet(scored / "scores.parquet")
    (scored / "00002.keys.json").unlink()
    spec = ModelSpec(None, tiny_resnet_json, weights)
    summary = score_shards(str(noisy_and_clean[1] / "train"), str(scored), spec, 64, 1, progress=False)
    assert summary["scored_now"] == 1 and summary["samples"] == 300
    pd.testing.assert_frame_equal(pd.read_parquet(scored / "scores.parquet"), before)


def test_score_refuses_another_models_folder(scored, noisy_and_clean, tiny_model_json, tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=tiny_model_json)).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    spec = ModelSpec(None, tiny_model_json, str(tmp_path / "vit.safetensors"))
    with pytest.raises(ValueError, match="holds embeddings of"):
        score_shards(str(noisy_and_clean[1] / "train"), str(scored), spec, 64, 1, progress=False)


def handmade_scores(directory: Path) -> pd.DataFrame:
    """Ten samples in two shards whose every rule outcome is known; samples 0 and 1 share an image embedding."""
    captions = [
        "a red cat on a mat",
        "a red cat on a mat again",
        "cat",
        "$$$ 1234 !!!",
        "a dog in the park",
        "a dog and a cat",
        "a tall picture of a dog",
        "a small blurry dog",
        "a bird over the sea",
        "a bird and a dog",
    ]
    width = [64, 64, 64, 64, 64, 64, 300, 20, 64, 64]
    height = [64, 64, 64, 64, 64, 64, 64, 20, 64, 64]
    score = [0.9, 0.8, 0.5, 0.4, 0.7, 0.3, 0.6, 0.65, 0.2, 0.75]
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(10, 16))
    vectors[1] = vectors[0] + 0.01 * rng.normal(size=16)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = []
    for shard, indices in (("00000", range(5)), ("00001", range(5, 10))):
        keys = [f"{shard}{i:04d}" for i in range(5)]
        write_shard_embeddings(directory, shard, keys, vectors[list(indices)], vectors[list(indices)])
        for row, (index, key) in enumerate(zip(indices, keys)):
            rows.append(
                dict(key=key, shard=shard, row=row, score=score[index], caption=captions[index])
                | dict(caption_words=len(captions[index].split()), caption_chars=len(captions[index]))
                | dict(width=width[index], height=height[index])
            )
    (directory / "teacher.json").write_text(json.dumps({"embed_dim": 16, "model": "handmade"}))
    table = pd.DataFrame(rows)
    table.to_parquet(directory / "scores.parquet", index=False)
    return table


def test_each_rule_removes_what_it_should(tmp_path):
    table = handmade_scores(tmp_path)
    assert nonalpha_fraction("$$$ 1234 !!!") > 0.8 and nonalpha_fraction("a cat") == 0
    rules = FilterRules(min_words=2, max_nonalpha=0.3, min_side=32, max_aspect=3.0, min_score=0.35)
    kept, records, _ = apply_rules(table, rules, tmp_path)
    assert [(r["name"], r["in"], r["out"]) for r in records] == [
        ("min_words", 10, 9),  # "cat"
        ("max_nonalpha", 9, 8),  # "$$$ 1234 !!!"
        ("min_side", 8, 7),  # 20 x 20
        ("max_aspect", 7, 6),  # 300 x 64
        ("min_score", 6, 4),  # 0.3, 0.2
    ]
    assert sorted(kept.index) == [0, 1, 4, 9]
    kept, records, _ = apply_rules(table, FilterRules(top_fraction=0.3), tmp_path)
    assert sorted(kept.index) == [0, 1, 9] and records[0]["parameters"]["threshold"] == pytest.approx(0.75)


@pytest.mark.parametrize("backend", ["blocks", "faiss"])
def test_dedup_keeps_the_better_scored_of_two_near_duplicates(tmp_path, backend):
    if backend == "faiss" and not faiss_available():
        pytest.skip("faiss is not installed")
    table = handmade_scores(tmp_path)
    kept, records, _ = apply_rules(table, FilterRules(dedup_threshold=0.95, dedup_backend=backend), tmp_path)
    assert 1 not in kept.index and 0 in kept.index and len(kept) == 9


def test_dedup_backends_agree_exactly_across_blocks():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 8))
    vectors = np.repeat(centres, 5, axis=0) + 0.15 * rng.normal(size=(200, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    blocks = near_duplicates(vectors, 0.9, "blocks", block=16)
    assert blocks.sum() < 200 and (blocks == near_duplicates(vectors, 0.9, "blocks", block=1000)).all()
    similarity = vectors[blocks] @ vectors[blocks].T
    assert (similarity[~np.eye(len(similarity), dtype=bool)] < 0.9).all()  # what is kept has no near-duplicate
    if faiss_available():
        assert (near_duplicates(vectors, 0.9, "faiss", block=16) == blocks).all()


def test_balancing_caps_frequent_entries_keeps_rare_ones_and_is_seeded():
    captions = pd.Series(["a dog"] * 300 + ["a cat"] * 5 + ["a bird"] * 2 + ["nothing here"] * 3)
    keep, before, after, unmatched = balance(captions, ["dog", "cat", "bird", "fish"], t=20, seed=0)
    assert before == {"dog": 300, "cat": 5, "bird": 2} and unmatched == 3
    assert after["cat"] == 5 and after["bird"] == 2 and 8 <= after["dog"] <= 35
    assert not keep[-3:].any()
    again, *_ = balance(captions, ["dog", "cat", "bird", "fish"], t=20, seed=0)
    other, *_ = balance(captions, ["dog", "cat", "bird", "fish"], t=20, seed=1)
    assert (keep == again).all() and (keep != other).any()


def test_filter_writes_the_kept_list_and_a_data_card(tmp_path):
    handmade_scores(tmp_path / "scores")
    (tmp_path / "entries.txt").write_text("dog\ncat\nbird\n")
    assert (
        main(
            ["prep", "filter", str(tmp_path / "scores"), "--out", str(tmp_path / "kept"), "--min-words", "2"]
            + ["--metadata", str(tmp_path / "entries.txt"), "--balance-t", "1"]
        )
        == 0
    )
    kept = pd.read_csv(tmp_path / "kept" / "kept.tsv", sep="\t", dtype=str)
    card = json.loads((tmp_path / "kept" / "card.json").read_text())
    assert card["samples_in"] == 10 and card["samples_out"] == len(kept)
    assert [rule["name"] for rule in card["rules"]] == ["min_words", "balance"]
    assert card["balance"]["before"]["dog"] == 5 and sum(card["histograms"]["CLIP score, in"]["counts"]) == 10
    markdown = (tmp_path / "kept" / "card.md").read_text()
    assert "| min_words | min_words=2 | 10 | 9 | 1 |" in markdown and "| dog | 5 |" in markdown


def test_reshard_writes_the_kept_samples_and_their_embeddings(scored, noisy_and_clean, tmp_path):
    card = filter_scores(str(scored), str(tmp_path / "kept"), FilterRules(top_fraction=0.5))
    kept = pd.read_csv(tmp_path / "kept" / "kept.tsv", sep="\t", dtype=str)
    out = tmp_path / "new"
    result = reshard(str(noisy_and_clean[1] / "train"), str(tmp_path / "kept"), str(out), 40, str(scored))
    assert result["samples_out"] == card["samples_out"] == len(kept) == 150
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 40, "00001.tar": 40, "00002.tar": 40, "00003.tar": 30}
    source, written = samples_of(noisy_and_clean[1] / "train"), samples_of(out)
    assert set(written) == set(kept["key"])
    assert all(written[key] == source[key] for key in written)
    teacher, original = TeacherEmbeddings(out), TeacherEmbeddings(scored)
    for shard in sorted(out.glob("*.keys.json")):
        name = shard.name.split(".")[0]
        for key in json.loads(shard.read_text())[::11]:
            new_row, old_row = teacher.lookup(f"{out}/{name}.tar", key), original.lookup(f"x/{key[:5]}.tar", key)
            np.testing.assert_array_equal(new_row[0], old_row[0])
            np.testing.assert_array_equal(new_row[1], old_row[1])
    assert (out / "reshard_card.md").is_file() and (out / "teacher.json").is_file()


def test_reshard_refuses_a_list_naming_an_unknown_shard(scored, noisy_and_clean, tmp_path):
    (tmp_path / "kept.tsv").write_text("shard\tkey\n00077\t000770001\n")
    with pytest.raises(FileNotFoundError, match="00077"):
        reshard(str(noisy_and_clean[1] / "train"), str(tmp_path / "kept.tsv"), str(tmp_path / "new"))


def test_score_cli_prints_a_summary(noisy_and_clean, tmp_path, capsys, tiny_resnet_json, weights):
    shards = noisy_and_clean[1] / "train" / "{00000..00000}.tar"
    arguments = ["--model", tiny_resnet_json, "--weights", weights, "--out", str(tmp_path / "s"), "--workers", "1"]
    code = main(["prep", "score", str(shards), *arguments, "--quiet"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 100 and summary["images_per_s"] > 0


def test_a_corrupt_image_gets_no_row_and_is_counted(tmp_path, tiny_resnet_json, weights):
    from clipforge.data.shards import write_tar

    good = Image.new("RGB", (32, 32), "red")
    import io

    buffer = io.BytesIO()
    good.save(buffer, format="JPEG")
    samples = [
        {"__key__": "000000000", "jpg": buffer.getvalue(), "txt": "a red square"},
        {"__key__": "000000001", "jpg": b"not a jpeg", "txt": "broken"},
    ]
    write_tar(tmp_path / "shards" / "00000.tar", iter(samples))
    summary = score_shards(
        str(tmp_path / "shards"), str(tmp_path / "s"), ModelSpec(None, tiny_resnet_json, weights), 8, 1, progress=False
    )
    assert summary["samples"] == 1 and summary["skipped"] == {"corrupt_image": 1}


def write_kept(path: Path, keys: list[str]) -> None:
    path.write_text("shard\tkey\n" + "".join(f"{key[:5]}\t{key}\n" for key in keys))


def test_reshard_writes_its_own_output_again_and_refuses_other_settings(noisy_and_clean, tmp_path):
    source = str(noisy_and_clean[1] / "train")
    keys = sorted(samples_of(noisy_and_clean[1] / "train"))
    kept, out = tmp_path / "kept.tsv", tmp_path / "new"
    write_kept(kept, keys[:25])
    reshard(source, str(kept), str(out), 10)
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 10, "00001.tar": 10, "00002.tar": 5}
    write_kept(kept, keys[:12])  # the filter run again, keeping fewer: no shard of the earlier list may stay
    reshard(source, str(kept), str(out), 10)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert set(samples_of(out)) == set(keys[:12])
    with pytest.raises(
        ValueError, match=r"holds shards written with other settings: samples_per_shard 10 \(this run: 5\)"
    ):
        reshard(source, str(kept), str(out), 5)
    reshard(source, str(kept), str(out), 5, overwrite=True)
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 2}


def test_reshard_with_nothing_to_write_fails_and_leaves_nothing(noisy_and_clean, tmp_path):
    source = str(noisy_and_clean[1] / "train")
    write_kept(tmp_path / "kept.tsv", ["000009999", "000019999"])  # shards that exist, keys that do not
    with pytest.raises(ValueError, match=r"kept.tsv: none of its 2 samples is in .*, so nothing was written"):
        reshard(source, str(tmp_path / "kept.tsv"), str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    write_kept(tmp_path / "kept.tsv", [])
    with pytest.raises(ValueError, match=r"kept.tsv: lists no samples"):
        reshard(source, str(tmp_path / "kept.tsv"), str(tmp_path / "new"))


def test_score_and_filter_refuse_an_out_they_cannot_write_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / "file")
    model = ModelSpec(None, "no-such-architecture", str(tmp_path / "no-weights.safetensors"))  # never loaded
    with pytest.raises(ValueError, match=rf"--out {out}: it is a file, not a folder"):
        score_shards(str(tmp_path / "no-shards"), out, model, progress=False)
    with pytest.raises(ValueError, match=rf"--out {out}: it is a file, not a folder"):
        filter_scores(str(tmp_path / "no-scores"), out, FilterRules())
