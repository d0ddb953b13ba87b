"""LocCa's decoder objective (clipforge.losses.locca) and the grounded regions it reads (clipforge.data.regions):
boxes follow the image into its training crop, coordinates round-trip through their tokens, each task's sequence
holds what it should, the decoder trains beside the sigmoid loss and resumes bit for bit, exports leave it out, its
gradients on 2 gloo ranks (DDP and FSDP) equal one process, and its FLOPs are counted."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from ranks import run_ranks
from small_runs import prepared_with_terms, records, small_run_config

from clipforge.checkpoints import read_weights
from clipforge.data import DataConfig, build_train_loader
from clipforge.data.images import ImageTransform
from clipforge.data.regions import MIN_VISIBLE, crop_regions, parse_regions
from clipforge.data.shards import SyntheticSpec, write_synthetic, write_tar
from clipforge.losses import ObjectiveContext, build_objectives
from clipforge.losses.config import LossConfig, TermConfig
from clipforge.losses.locca import TASKS, build, dequantize, quantize
from clipforge.losses.objective import RegionsField
from clipforge.models import ModelConfig, build_model
from clipforge.train.flops import ATTENTION_FLOPS, count_train_flops
from clipforge.train.loop import train

PREPROCESS = {"size": (32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "interpolation": "bicubic"}
TOKENIZER = open_clip.get_tokenizer("ViT-B-32", context_length=24)
BACKGROUND, FILL = (40, 160, 60), (230, 30, 200)
LOCAL_BATCH = 6
OPTIONS = {"depth": 1, "bins": 64, "referring": 0.35, "grounded": 0.35, "parallel": 0.5, "max_regions": 4}


@pytest.fixture(scope="module")
def grounded_data(tmp_path_factory):
    """384 grounded scenes (every sample carries KEY.regions.json) in 6 shards at 32 px."""
    out = tmp_path_factory.mktemp("grounded")
    spec = SyntheticSpec(
        out=str(out),
        num_samples=384,
        samples_per_shard=64,
        image_size=32,
        num_eval_samples=20,
        num_retrieval_samples=10,
        num_eval_train_samples=0,
        num_dense_samples=0,
        scenes=1.0,
    )
    write_synthetic(spec, progress=False)
    return out


def picture(width: int, height: int, box: tuple[int, int, int, int], fmt: str) -> bytes:
    """A plain background with one rectangle of another colour at ``box`` (x0, y0, x1, y1; exclusive max)."""
    array = np.full((height, width, 3), BACKGROUND, np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = FILL
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("width,height,fmt,size", [(120, 90, "PNG", 48), (960, 720, "JPEG", 64)])
def test_a_box_lands_on_the_pixels_the_crop_shows_of_it(width, height, fmt, size):
    """The rectangle's box, moved into the crop by the loader's rule, covers the rectangle's pixels in the output
    (a JPEG that large is decoded at a reduced size); boxes mostly outside the crop are dropped."""
    box = (width // 5, height // 3, width // 2, height * 9 // 10)
    data = picture(width, height, box, fmt)
    transform = ImageTransform(size=(size, size), scale=(0.2, 1.0), ratio=(0.6, 1.6))
    kept = 0
    for seed in range(40):
        image, crop = transform.with_crop_box(data, random.Random(seed))
        assert torch.equal(image, transform(data, random.Random(seed)))  # the crop the training image gets
        boxes, captions = crop_regions([(tuple(map(float, box)), "the rectangle")], crop, 4)
        x0, y0, x1, y1 = box
        inside = max(0.0, min(x1, crop[2]) - max(x0, crop[0])) * max(0.0, min(y1, crop[3]) - max(y0, crop[1]))
        assert bool(boxes) == (inside >= MIN_VISIBLE * (x1 - x0) * (y1 - y0)), seed
        if not boxes:
            continue
        kept += 1
        assert captions == ["the rectangle"]
        green = image[1].float().numpy()  # the fill has little green, the background much
        centre = (np.arange(size) + 0.5) / size  # output pixel centres in [0, 1] of the crop
        margin = 1.5 / size  # the antialiased resize blurs an edge over about a pixel
        nx0, ny0, nx1, ny1 = boxes[0]
        cols_in = (centre > nx0 + margin) & (centre < nx1 - margin)
        rows_in = (centre > ny0 + margin) & (centre < ny1 - margin)
        cols_out = (centre < nx0 - margin) | (centre > nx1 + margin)
        rows_out = (centre < ny0 - margin) | (centre > ny1 + margin)
        assert (green[np.ix_(rows_in, cols_in)] < 70).all(), seed
        outside = rows_out[:, None] | cols_out[None, :]
        assert (green[outside] > 120).all(), seed
    assert 10 < kept < 40  # both kinds of crop were met


def test_regions_json_is_checked_and_cleaned():
    good = {"boxes": [[1, 2, 5, 9], [0, 0, 3.5, 4]], "captions": ["  the RED   circle ", ""], "names": ["x", "y"]}
    assert parse_regions(json.dumps(good).encode()) == [((1.0, 2.0, 5.0, 9.0), "the RED circle"), ((0, 0, 3.5, 4), "")]
    for bad, message in [
        (b"{", "does not parse"),
        (b"[]", 'list "boxes"'),
        (json.dumps({"boxes": [[0, 0, 1, 1]]}).encode(), "one per box"),
        (json.dumps({"boxes": [[0, 0, 1]], "captions": ["a"]}).encode(), "box 0"),
        (json.dumps({"boxes": [[4, 0, 1, 1]], "captions": ["a"]}).encode(), "x0 < x1"),
        (json.dumps({"boxes": [[0, 0, 1, 1]], "captions": [3]}).encode(), "caption 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_regions(bad)
    # an empty caption is dropped, a box half inside kept and clipped, one mostly outside dropped
    regions = [((0, 0, 10, 10), "whole"), ((5, 0, 15, 10), "half"), ((8, 0, 18, 10), "mostly out"), ((1, 1, 2, 2), "")]
    boxes, captions = crop_regions(regions, (0.0, 0.0, 10.0, 20.0), 8)
    assert captions == ["whole", "half"] and boxes == [(0.0, 0.0, 1.0, 0.5), (0.5, 0.0, 1.0, 0.5)]
    assert crop_regions(regions, (0.0, 0.0, 10.0, 20.0), 1)[1] == ["whole"]


def loader(urls, max_regions=4, **overrides):
    cfg = DataConfig(train_urls=urls, batch_size=16, num_workers=0, shuffle_buffer=20, shuffle_initial=5, **overrides)
    return build_train_loader(cfg, PREPROCESS, TOKENIZER, fields=(RegionsField(max_regions),))


def members(url: str, suffix: str) -> dict[str, bytes]:
    with tarfile.open(url) as tar:
        return {m.name.split(".", 1)[0]: tar.extractfile(m).read() for m in tar if m.name.endswith("." + suffix)}


def test_the_loader_gives_each_sample_its_regions_in_fixed_shapes(grounded_data, synth_data):
    url = f"{grounded_data}/train/00000.tar"
    batch = next(loader(url))
    assert batch["region_boxes"].shape == (16, 4, 4) and batch["region_boxes"].dtype == torch.float32
    assert batch["region_captions"].shape == (16, 4, 24) and batch["region_count"].shape == (16,)
    stored = members(url, "regions.json")
    for row, key in enumerate(batch["keys"]):
        count = int(batch["region_count"][row])
        captions = TOKENIZER(json.loads(stored[key])["captions"])
        assert 1 <= count <= min(4, len(captions))
        boxes = batch["region_boxes"][row]
        assert ((boxes[:count] >= 0) & (boxes[:count] <= 1)).all()
        assert (boxes[:count, 0] < boxes[:count, 2]).all() and (boxes[:count, 1] < boxes[:count, 3]).all()
        assert not boxes[count:].any() and not batch["region_captions"][row, count:].any()
        # the kept regions are the member's, in its order (a crop may leave out one mostly outside it)
        found = [next(i for i, caption in enumerate(captions) if torch.equal(caption, kept))
                 for kept in batch["region_captions"][row, :count]]  # fmt: skip
        assert found == sorted(found)
    plain = next(loader(f"{synth_data}/train/00000.tar"))  # web-like shards: no regions, count 0
    assert not plain["region_count"].any() and not plain["region_boxes"].any()
    cfg = DataConfig(train_urls=url, batch_size=16, num_workers=0, shuffle_buffer=20)
    assert "region_count" not in next(build_train_loader(cfg, PREPROCESS, TOKENIZER))  # nobody asked: not read


def test_a_malformed_regions_member_is_skipped_and_counted(tmp_path, grounded_data):
    samples = []
    for index in range(40):
        image = picture(40, 40, (5, 5, 20, 20), "PNG")
        regions = {"boxes": [[5, 5, 20, 20]], "captions": ["the square"]} if index % 4 else {"boxes": "nope"}
        samples.append(
            {"__key__": f"{index:04d}", "png": image, "txt": b"a square", "regions.json": json.dumps(regions)}
        )
    write_tar(tmp_path / "00000.tar", samples)
    batches = loader(str(tmp_path / "00000.tar"), max_regions=2)
    batch = next(batches)
    assert (batch["region_count"] == 1).all()
    sides = batch["region_boxes"][:, 0, 2:] - batch["region_boxes"][:, 0, :2]  # 15 px of a 36-40 px crop side
    assert ((sides >= 0.375) & (sides <= 15 / 36)).all()
    assert 1 <= batches.skipped["bad_regions"] <= 10


def make(model, **options):
    return build({**OPTIONS, **options}, ObjectiveContext(model=model))


def fake_batch(size: int, seed: int = 3, regions: bool = True):
    generator = torch.Generator().manual_seed(seed)
    captions = ["a red circle left of a small blue star", "two shapes", "a green square"]
    texts = TOKENIZER([captions[i % 3] for i in range(size)])
    phrases = TOKENIZER(["the red circle", "a blue star at the top", "the square"])
    count = torch.randint(1, 4, (size,), generator=generator) * regions
    region_captions = torch.zeros(size, 4, 24, dtype=torch.long)
    boxes = torch.zeros(size, 4, 4)
    for row in range(size):
        for k in range(int(count[row])):
            region_captions[row, k] = phrases[(row + k) % 3]
            corner = torch.rand(2, generator=generator) * 0.5
            boxes[row, k] = torch.cat([corner, corner + 0.1 + torch.rand(2, generator=generator) * 0.4])
    images = torch.rand(size, 3, 32, 32, generator=generator) * 2 - 1
    return {"images": images, "texts": texts, "region_captions": region_captions, "region_boxes": boxes,
            "region_count": count}  # fmt: skip


def test_coordinates_round_trip_within_half_a_bin():
    values = torch.cat([torch.rand(10_000), torch.tensor([0.0, 1.0, 0.5, 1 / 64, 63 / 64])])
    for bins in (1, 7, 64, 1000):
        indices = quantize(values, bins)
        assert indices.min() >= 0 and indices.max() <= bins - 1
        assert (dequantize(indices, bins) - values).abs().max() <= 0.5 / bins + 1e-6


def test_each_task_sequence_holds_its_prefix_and_targets(tiny_model_json):
    objective = make(build_model(ModelConfig(name=tiny_model_json)).model)
    batch = fake_batch(64)
    inputs, targets, target_task, mask = objective.sequences(batch)
    vocab, bins = 49408, OPTIONS["bins"]
    seen = set()
    for row in range(64):
        chosen = target_task[row][target_task[row] >= 0]
        assert len(set(chosen.tolist())) == 1
        task = TASKS[int(chosen[0])]
        seen.add(task)
        where = target_task[row] >= 0
        if task == "caption":
            expected = batch["texts"][row, 1 : int(batch["texts"][row].argmax()) + 1]  # after the start token
            assert torch.equal(targets[row][where], expected)
            parallel = bool(mask[row, 0].all())
            assert parallel == (inputs[row, 1:] == vocab + bins + 3).all()  # mask tokens, no causal mask
            if not parallel:
                assert torch.equal(mask[row, 0], torch.ones(27, 27, dtype=torch.bool).tril())
                assert torch.equal(inputs[row, 1 : len(expected)], expected[:-1])  # teacher forcing
            continue
        assert torch.equal(mask[row, 0], torch.ones(27, 27, dtype=torch.bool).tril())
        phrases = [p[1 : int(p.argmax()) + 1] for p in batch["region_captions"][row, : batch["region_count"][row]]]
        coordinates = targets[row][where] if task == "referring" else inputs[row, 1:5]
        assert ((coordinates >= vocab) & (coordinates < vocab + bins)).all()
        box = dequantize(coordinates - vocab, bins)
        region = int((batch["region_boxes"][row] - box).abs().amax(dim=1).argmin())
        assert (batch["region_boxes"][row, region] - box).abs().max() <= 0.5 / bins + 1e-6
        assert region < batch["region_count"][row]
        if task == "referring":  # [REF] phrase → its box
            assert inputs[row, 0] == vocab + bins + 1 and torch.equal(
                inputs[row, 1 : 1 + len(phrases[region])], phrases[region]
            )
        else:  # [GND] box → its phrase
            assert inputs[row, 0] == vocab + bins + 2 and torch.equal(targets[row][where], phrases[region])
    assert seen == set(TASKS)
    # the draws are a function of the step and the sample's place in the global batch
    again = objective.sequences(batch)
    assert all(torch.equal(a, b) for a, b in zip(again, (inputs, targets, target_task, mask)))
    objective.step = lambda: 7
    assert not torch.equal(objective.sequences(batch)[2], target_task)
    web = fake_batch(64, regions=False)  # no regions: captioning alone
    assert set(objective.sequences(web)[2].unique().tolist()) == {-1, 0}


def test_the_task_shares_follow_the_options(tiny_model_json):
    objective = make(build_model(ModelConfig(name=tiny_model_json)).model, referring=0.2, grounded=0.3, parallel=0.4)
    batch = fake_batch(500)
    counts, parallel, captions = torch.zeros(3), 0, 0
    for step in range(4):
        objective.step = lambda step=step: step
        _, _, target_task, mask = objective.sequences(batch)
        first = target_task.max(dim=1).values
        counts += torch.bincount(first, minlength=3)
        caption = first == 0
        captions += int(caption.sum())
        parallel += int(mask[caption, 0, 0, -1].sum())
    shares = counts / counts.sum()
    assert abs(shares[1] - 0.2) < 0.04 and abs(shares[2] - 0.3) < 0.04
    assert abs(parallel / captions - 0.4) < 0.06


def test_options_are_checked_by_name(tiny_model_json):
    model = build_model(ModelConfig(name=tiny_model_json)).model
    with pytest.raises(ValueError, match=r"loss.terms\[0\] \(locca\): unknown options \['layers'\]"):
        build_objectives(
            LossConfig(terms=[TermConfig(name="locca", options={"layers": 2})]), ObjectiveContext(model=model)
        )
    for options, message in [
        ({"referring": 0.7, "grounded": 0.5}, "at most 1"),
        ({"parallel": 1.5}, "probability"),
        ({"bins": 0}, "bins must be at least 1"),
        ({"width": 60, "heads": 7}, "not a multiple"),
    ]:
        with pytest.raises(ValueError, match=message):
            make(model, **options)


def test_the_flop_count_adds_the_decoder(tiny_model_json):
    from torch.utils.flop_counter import FlopCounterMode

    built = build_model(ModelConfig(name=tiny_model_json))
    objective = make(built.model, logits_chunk=0, width=32, heads=2)
    outputs = {"image_tokens": torch.randn(LOCAL_BATCH, 17, 64, requires_grad=True)}
    batch = fake_batch(LOCAL_BATCH)
    with FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        sum(objective(outputs, batch).values()).backward()
    # the head runs at the target positions only; the count charges it at every content position (an upper bound)
    targets = int((objective.sequences(batch)[2] >= 0).sum())
    head = 3 * 2 * 32 * objective.decoder.head.out_features  # forward and backward, per position, width 32
    counted = LOCAL_BATCH * objective.train_flops(17)  # 1 class token + 16 patches
    assert counter.get_total_flops() == counted - (LOCAL_BATCH * objective.content - targets) * head
    assert 0 < targets < LOCAL_BATCH * objective.content
    plain = count_train_flops(ModelConfig(name=tiny_model_json))
    loss = LossConfig(terms=[TermConfig(name="locca", options={**OPTIONS, "width": 32, "heads": 2})])
    counted = count_train_flops(ModelConfig(name=tiny_model_json), loss=loss)
    assert counted.objectives == objective.train_flops(17) > 0
    assert counted.train() > plain.train() + counted.objectives  # and the last blocks run at every token
    assert (
        count_train_flops(ModelConfig(name=tiny_model_json), pooled_last_block=False).image_train == counted.image_train
    )
    locked = count_train_flops(ModelConfig(name=tiny_model_json, lock_image=True), loss=loss)
    assert (
        locked.objectives == objective.train_flops(17, image_trainable=False) == counted.objectives - 2 * 17 * 64 * 32
    )


def run_config(data, tiny_model_json, out, *extra):
    terms = "loss.terms=[{name: locca, weight: 1.0, options: {depth: 1, bins: 64, referring: 0.35, grounded: 0.35}}]"
    return small_run_config(data, tiny_model_json, out, "model.init_logit_bias=-10", "loss.kind=siglip", terms, *extra)


def test_it_trains_beside_the_sigmoid_loss_resumes_exactly_and_stays_out_of_exports(
    grounded_data, tiny_model_json, tmp_path
):
    from transformers import CLIPModel

    from clipforge.export import export_model
    from clipforge.model_loading import load_checkpoint_model

    common = ("train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=5")
    train(run_config(grounded_data, tiny_model_json, tmp_path / "full", *common))
    logged = [r for r in records(tmp_path / "full") if "train/locca_caption" in r]
    assert len(logged) == 6
    assert all(r[f"train/locca_{task}"] > 0 for r in logged for task in TASKS)  # every task in every step
    assert all(r["train/contrastive"] > 0 for r in logged)
    checkpoints = tmp_path / "full" / "checkpoints"
    weights = read_weights(checkpoints / "latest")
    assert weights["objectives.members.1.member.decoder.head.weight"].shape == (49408 + 64 + 4, 64)

    (tmp_path / "partial" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints / "step_00000003", tmp_path / "partial" / "checkpoints" / "step_00000003")
    train(run_config(grounded_data, tiny_model_json, tmp_path / "partial", *common, "checkpoint.resume=latest"))
    resumed = read_weights(tmp_path / "partial" / "checkpoints" / "latest")
    assert weights.keys() == resumed.keys()
    assert all(torch.equal(weights[name], resumed[name]) for name in weights)
    terms = [f"train/locca_{task}" for task in TASKS]
    full = {r["step"]: [r[t] for t in terms] for r in records(tmp_path / "full") if r["step"] > 3 and terms[0] in r}
    assert {r["step"]: [r[t] for t in terms] for r in records(tmp_path / "partial") if terms[0] in r} == full

    export_model(load_checkpoint_model(checkpoints / "latest"), tmp_path / "export", ("hf",))
    _, info = CLIPModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_shards_without_regions_train_captioning_alone(synth_data, tiny_model_json, tmp_path):
    train(run_config(synth_data, tiny_model_json, tmp_path / "web", "train.steps=2"))
    logged = [r for r in records(tmp_path / "web") if "train/locca_caption" in r]
    assert len(logged) == 2
    assert all(
        r["train/locca_caption"] > 0 and r["train/locca_referring"] == r["train/locca_grounded"] == 0 for r in logged
    )


def _gradients(model_json: str, rank: int, world_size: int, strategy: str | None, ranks: int = 2):
    from torch.distributed.tensor import DTensor

    from clipforge.train.optim import OptimConfig, build_optimizer
    from clipforge.train.step import build_step

    torch.manual_seed(0)
    model_cfg = ModelConfig(name=model_json, init_logit_bias=-10)
    options = {**OPTIONS, "logits_chunk": 4}  # the recomputed logits too, in chunks of 4 sequences
    cfg = LossConfig(kind="siglip", terms=[TermConfig(name="locca", options=options)])
    built, objectives, prepared = prepared_with_terms(model_cfg, cfg, rank, world_size, strategy)
    optimizer = build_optimizer(OptimConfig(), built.model)
    step = build_step(
        prepared.model,
        objectives,
        optimizer,
        None,
        device="cpu",
        precision="fp32",
        grad_clip_norm=None,
        max_logit_scale=100.0,
    )
    batch = fake_batch(LOCAL_BATCH * ranks)  # the global batch of `ranks` ranks; this process's part of it
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH) if strategy else slice(None)
    out = step.backward({name: value[local] for name, value in batch.items()})
    grads, sharded = {}, set()
    for name, parameter in built.model.named_parameters():
        if parameter.grad is not None:
            grad = parameter.grad
            grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().clone()
            if isinstance(grad, DTensor):
                sharded.add(name)
    return {name: float(value) for name, value in out["terms"].items()}, grads, sharded


def _rank_worker(rank, world_size, model_json):
    return {strategy: _gradients(model_json, rank, world_size, strategy, world_size) for strategy in ("ddp", "fsdp")}


@pytest.mark.parametrize("ranks", [2, 4])
def test_gloo_ranks_equal_one_process_under_ddp_and_fsdp(tiny_model_json, tmp_path, ranks):
    results = run_ranks(_rank_worker, ranks, tmp_path / "ranks", tiny_model_json, timeout=500)
    terms, reference, _ = _gradients(tiny_model_json, 0, 1, None, ranks)
    assert all(terms[f"locca_{task}"] > 0 for task in TASKS)
    decoder = [name for name in reference if ".decoder." in name]
    assert "objectives.members.1.member.decoder.head.weight" in decoder and len(decoder) > 20
    head = "objectives.members.1.member.decoder.head.weight"
    assert head in results[0]["fsdp"][2] and not results[0]["ddp"][2]  # FSDP really shards the decoder
    for strategy in ("ddp", "fsdp"):
        distributed = results[0][strategy][1]
        assert reference.keys() == distributed.keys(), strategy
        for name, grad in reference.items():
            scale = grad.abs().max().clamp_min(1e-12)
            assert (distributed[name] - grad).abs().max() <= 1e-5 * scale, (strategy, name)
        # each rank logs its share of a task's tokens scaled by the world size: their mean is the global mean
        for task in TASKS:
            mean = sum(result[strategy][0][f"locca_{task}"] for result in results) / ranks
            assert abs(mean - terms[f"locca_{task}"]) <= 1e-5 * terms[f"locca_{task}"], (strategy, task)
