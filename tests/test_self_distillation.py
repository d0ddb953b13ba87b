"""SigLIP 2's self-distillation and masked prediction (clipforge.losses.self_distillation): the view forward is
open_clip's, resized as open_clip resizes, and a masked patch is not seen; the EMA teacher follows its formula, gets
no gradient and is not optimised; the local crops are a function of the sample and its place; the FLOPs match a
hand count; with every term on, 2 gloo ranks (DDP and FSDP) give one process's gradients; a resume across the
switch-on is bit-identical and exports leave the teacher out; each objective is timed in the step's breakdown."""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil

import open_clip
import pytest
import torch
from ranks import run_ranks
from small_runs import prepared_with_terms, records, small_run_config

from clipforge.checkpoints import read_weights
from clipforge.data import DataConfig, build_train_loader
from clipforge.data.images import ImageTransform
from clipforge.data.views import LocalCrops, crop_box
from clipforge.losses import ObjectiveContext, build_objectives
from clipforge.losses.config import LossConfig, TermConfig
from clipforge.losses.self_distillation import build, run_vision
from clipforge.models import ModelConfig, build_model
from clipforge.train.config import load_config
from clipforge.train.loop import train

TOKENIZER = open_clip.get_tokenizer("ViT-B-32", context_length=24)
PREPROCESS = {"size": (32, 32), "mean": (0.5, 0.4, 0.3), "std": (0.25, 0.2, 0.3), "interpolation": "bicubic"}
LOCAL_BATCH = 4
OPTIONS = {"local_crops": 2, "head_hidden": 32, "head_dim": 16, "prototypes": 48, "momentum": 0.9}
LOCCA = {"depth": 1, "bins": 16, "max_regions": 2}


def tiny(tiny_model_json):
    torch.manual_seed(0)
    return build_model(ModelConfig(name=tiny_model_json)).model


def constant(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def make(model, context=None, **options):
    return build({**OPTIONS, **options}, context or ObjectiveContext(model=model))


def test_the_view_forward_is_open_clips_and_resizes_as_open_clip_does(tiny_model_json, tmp_path):
    model = tiny(tiny_model_json)
    visual = model.visual.eval()
    images = torch.randn(3, 3, 32, 32)
    pooled, tokens = run_vision(visual, images)
    visual.output_tokens = True
    expected_pooled, expected_tokens = visual(images)
    visual.output_tokens = False
    assert torch.allclose(pooled, expected_pooled, atol=1e-6, rtol=0)
    assert torch.allclose(tokens, expected_tokens, atol=1e-6, rtol=0)
    assert tokens.shape == (3, 16, 64)

    # at 16 px: the tower open_clip makes for 16 px images from these weights (its resize_pos_embed)
    config = json.loads(open(tiny_model_json).read())
    config["vision_cfg"]["image_size"] = 16
    (tmp_path / "small.json").write_text(json.dumps(config))
    small = build_model(ModelConfig(name=str(tmp_path / "small.json"))).model
    state = {f"visual.{name}": value for name, value in visual.state_dict().items()}
    open_clip.model.resize_pos_embed(state, small)
    small.visual.load_state_dict({name.removeprefix("visual."): value for name, value in state.items()})
    crops = torch.randn(5, 3, 16, 16)
    pooled, tokens = run_vision(visual, crops)
    assert tokens.shape == (5, 4, 64)
    assert torch.allclose(pooled, small.visual.eval()(crops), atol=1e-5, rtol=0)

    # a masked patch is replaced by the token: its pixels change nothing, an unmasked patch's do
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, [0, 5, 15]] = True
    token = torch.randn(64)
    masked, _ = run_vision(visual, images, mask, token)
    changed = images.clone()
    changed[:, :, 8:16, 8:16] += 1  # patch 5 (row 1, column 1 of the 4 × 4 grid)
    assert torch.equal(run_vision(visual, changed, mask, token)[0], masked)
    changed[:, :, 0:8, 8:16] += 1  # patch 1, not masked
    assert not torch.allclose(run_vision(visual, changed, mask, token)[0], masked)
    assert not torch.allclose(masked, run_vision(visual, images)[0])
    assert torch.equal(run_vision(visual, images, torch.zeros_like(mask), token)[0], run_vision(visual, images)[0])


def test_the_teacher_follows_the_ema_formula_and_gets_no_gradient(tiny_model_json):
    from clipforge.train.optim import OptimConfig, build_optimizer
    from clipforge.train.parallel import attach_objectives

    model = tiny(tiny_model_json)
    steps = {"now": 3}
    context = ObjectiveContext(model=model, step=lambda: steps["now"], total_steps=13)
    objective = make(model, context)
    teacher = objective.teacher
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    with torch.no_grad():  # the student moves on before the switch: the teacher is copied at the switch, not before
        for parameter in [*model.visual.parameters(), *objective.head.parameters()]:
            parameter.add_(torch.randn_like(parameter) * 0.1)
    objective.before_forward({})
    assert int(objective.switched_on) == 3
    for name, parameter in model.visual.named_parameters():
        assert torch.equal(dict(teacher["visual"].named_parameters())[name], parameter), name
    assert torch.equal(teacher["patch_head"].prototypes, objective.patch_head.prototypes)

    def pairs():
        student = dict(objective.named_parameters()) | {f"visual.{n}": p for n, p in model.visual.named_parameters()}
        return {name: (parameter, student[name]) for name, parameter in teacher.named_parameters()}

    for step, momentum in [(3, 0.9), (8, 0.95), (13, 1.0)]:  # a cosine from 0.9 at the switch to 1 at the end
        steps["now"] = step
        assert math.isclose(objective.momentum(), momentum, abs_tol=1e-12)
    steps["now"] = 8
    with torch.no_grad():
        for parameter in [*model.visual.parameters(), *objective.head.parameters(), *objective.patch_head.parameters()]:
            parameter.add_(torch.randn_like(parameter) * 0.1)
    before = {name: (t.clone(), s.clone()) for name, (t, s) in pairs().items()}
    objective.after_update(torch.tensor(False))  # a skipped update moves nothing
    assert all(torch.equal(pairs()[name][0], t) for name, (t, _) in before.items())
    objective.after_update(torch.tensor(True))
    assert len(before) == len(list(teacher.parameters())) > 10
    for name, (t, s) in before.items():
        expected = 0.95 * t.double() + 0.05 * s.double()
        assert torch.allclose(pairs()[name][0].double(), expected, atol=1e-6, rtol=0), name
        assert not torch.equal(pairs()[name][0], t), name

    objectives = build_objectives(
        LossConfig(terms=[TermConfig(name="self_distillation", options=OPTIONS)]), ObjectiveContext(model=model)
    )
    attach_objectives(model, objectives)
    sd = objectives.members[1].member
    sd.before_forward({})
    batch = fake_batch(LOCAL_BATCH)
    outputs = model(batch["images"], batch["texts"])
    terms = objectives(outputs, batch)
    assert terms["self_distillation"] > 0 and terms["masked_prediction"] > 0
    sum(terms.values()).backward()
    assert all(parameter.grad is None for parameter in sd.teacher.parameters())
    assert sd.mask_token.grad is not None and model.visual.conv1.weight.grad is not None
    optimized = {id(p) for group in build_optimizer(OptimConfig(), model).param_groups for p in group["params"]}
    assert not optimized & {id(parameter) for parameter in sd.teacher.parameters()}
    assert id(sd.mask_token) in optimized and id(sd.head.prototypes) in optimized


def normalized(images: torch.Tensor) -> torch.Tensor:
    return ImageTransform(size=(32, 32), mean=PREPROCESS["mean"], std=PREPROCESS["std"]).normalize(images)


def fake_batch(size: int, seed: int = 3, crops: int = OPTIONS["local_crops"]):
    """A batch as the loader makes it for siglip + locca + self_distillation: normalised images, tokens, regions and
    the local crops of each uint8 image."""
    generator = torch.Generator().manual_seed(seed)
    pictures = torch.randint(0, 256, (size, 3, 32, 32), generator=generator, dtype=torch.uint8)
    captions = ["a red circle left of a small blue star", "two shapes", "a green square"]
    texts = TOKENIZER([captions[i % 3] for i in range(size)])
    make_crops = LocalCrops(crops, 16, (0.05, 0.4))
    local = torch.stack([make_crops(picture, captions[i % 3]) for i, picture in enumerate(pictures)])
    count = torch.randint(0, 3, (size,), generator=generator)
    region_captions = torch.zeros(size, 2, 24, dtype=torch.long)
    boxes = torch.zeros(size, 2, 4)
    for row in range(size):
        for k in range(int(count[row])):
            region_captions[row, k] = TOKENIZER(["the red circle"])[0]
            corner = torch.rand(2, generator=generator) * 0.5
            boxes[row, k] = torch.cat([corner, corner + 0.2])
    return {"images": normalized(pictures), "texts": texts, "local_crops": local, "region_captions": region_captions,
            "region_boxes": boxes, "region_count": count}  # fmt: skip


def test_local_crops_are_random_resized_crops_fixed_by_the_sample(synth_data, tiny_model_json):
    rng = random.Random(0)
    for _ in range(500):
        top, left, height, width = crop_box(30, 40, (0.05, 0.4), rng)
        assert 0 <= top and top + height <= 30 and 0 <= left and left + width <= 40
        assert 0.05 * 1200 * 0.8 <= height * width <= 0.4 * 1200 * 1.2 and 3 / 4 * 0.9 <= width / height <= 4 / 3 * 1.1
    # an image whose pixel (y, x) holds x in the red and y in the green: a crop shows a rectangle of it, resized
    ys, xs = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    ramp = torch.stack([xs * 4, ys * 4, torch.zeros_like(xs)]).to(torch.uint8)
    crops = LocalCrops(16, 16, (0.1, 0.4))(ramp, "ramps")
    assert crops.shape == (16, 3, 16, 16) and crops.dtype == torch.float32
    spans = set()
    for crop in crops:
        red, green = crop[0], crop[1]
        assert (green[1:] >= green[:-1] - 1).all()  # rows go down the image
        assert (red[:, 1:] >= red[:, :-1] - 1).all() or (red[:, 1:] <= red[:, :-1] + 1).all()  # flipped or not
        spans.add(round(float(red.max() - red.min())))
    assert len(spans) > 4  # crops of different sizes
    assert torch.equal(LocalCrops(16, 16, (0.1, 0.4))(ramp, "ramps"), crops)
    other = ramp.clone()
    other[2, 0, 0] = 1  # one pixel of another image: other crops
    assert not torch.equal(LocalCrops(16, 16, (0.1, 0.4))(other, "ramps"), crops)

    def batches():
        cfg = DataConfig(
            train_urls=f"{synth_data}/train/{{00000..00001}}.tar", batch_size=8, num_workers=2, shuffle_buffer=20
        )
        objective = make(tiny(tiny_model_json))
        loader = build_train_loader(cfg, PREPROCESS, TOKENIZER, fields=objective.batch_fields)
        return [next(loader) for _ in range(2)]

    first, again = batches(), batches()  # a restart: the same samples at the same places get the same crops
    make_crops = LocalCrops(2, 16, (0.05, 0.4))
    for a, b in zip(first, again):
        assert a["keys"] == b["keys"] and torch.equal(a["local_crops"], b["local_crops"])
        assert a["local_crops"].shape == (8, 2, 3, 16, 16)
        assert a["images"].dtype == torch.uint8  # the crops are the training image's, made in the workers
        assert all(torch.equal(make_crops(image, ""), crops) for image, crops in zip(a["images"], a["local_crops"]))
    assert not torch.equal(first[0]["local_crops"][0], first[0]["local_crops"][1])


def test_options_are_checked_by_name_and_a_resnet_refused(tiny_model_json, tiny_resnet_json):
    model = tiny(tiny_model_json)
    with pytest.raises(ValueError, match=r"loss.terms\[0\] \(self_distillation\): unknown options \['crops'\]"):
        build_objectives(
            LossConfig(terms=[TermConfig(name="self_distillation", options={"crops": 2})]),
            ObjectiveContext(model=model),
        )
    for options, message in [
        ({"local_size": 12}, "not a multiple of the 8 px patch"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"local_scale": (0.5, 0.2)}, "local_scale"),
        ({"teacher_temperature": 0}, "positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            make(model, **options)
    assert make(model).local_size == 16 and make(model, local_size=24).local_size == 24
    resnet = build_model(ModelConfig(name=tiny_resnet_json)).model
    with pytest.raises(ValueError, match="needs an open_clip ViT image tower .* ModifiedResNet"):
        make(resnet)


def test_the_flop_count_is_the_hand_count(tiny_model_json):
    from clipforge.train.flops import count_train_flops

    model = tiny(tiny_model_json)
    objective = make(model, local_crops=3, mask_ratio=0.25)
    width, layers, patch, embed, hidden, dim, prototypes = 64, 2, 8, 64, 32, 16, 48

    def tower(patches: int) -> int:  # patch embedding, blocks (projections, attention, MLP), pooled projection
        tokens = patches + 1
        block = 2 * tokens * 4 * width * width + 4 * tokens * tokens * width + 2 * tokens * 2 * width * 4 * width
        return 2 * patches * 3 * patch * patch * width + layers * block + 2 * width * embed

    def head(inputs: int) -> int:
        return 2 * (inputs * hidden + hidden * hidden + hidden * dim + dim * prototypes)

    def embedding(patches: int) -> int:
        return 2 * patches * 3 * patch * patch * width

    masked = 4  # a quarter of 16 patches
    teacher = tower(16) + head(embed) + masked * head(width)
    # the backward is twice the forward, less the pixels' gradient; the masked view's pooled output is unused
    local = 3 * (3 * (tower(4) + head(embed)) - embedding(4))
    masked_view = tower(16) + 2 * (tower(16) - 2 * width * embed) - embedding(16) + 3 * masked * head(width)
    assert objective.train_flops(17) == teacher + local + masked_view
    assert all(parameter.grad is None for parameter in model.parameters())  # the count leaves no gradient behind
    options = {**OPTIONS, "local_crops": 3, "mask_ratio": 0.25}
    loss = LossConfig(kind="siglip", terms=[TermConfig(name="self_distillation", options=options)])
    counted = count_train_flops(ModelConfig(name=tiny_model_json), loss=loss)
    assert counted.objectives == teacher + local + masked_view
    # switched on after 40% of 10 steps: charged from the 5th step (after 4 taken), for six tenths of the run
    later = LossConfig(kind="siglip", terms=[TermConfig(name="self_distillation", start=0.4, options=options)])
    staged = count_train_flops(ModelConfig(name=tiny_model_json), loss=later, total_steps=10)
    assert staged.objectives == 0 and staged.staged == ((4, teacher + local + masked_view),)
    towers = counted.train() - counted.objectives
    assert staged.train(step=3) == towers and staged.train(step=4) == staged.train() == counted.train()
    assert staged.run_mean(10) == pytest.approx(towers + 0.6 * (teacher + local + masked_view))


def test_each_objective_is_timed_as_its_own_part_of_the_loss(tiny_model_json):
    from clipforge.train.optim import OptimConfig, build_optimizer
    from clipforge.train.parallel import attach_objectives
    from clipforge.train.profile import StepRecorder
    from clipforge.train.step import build_step

    model_cfg = ModelConfig(name=tiny_model_json, init_logit_bias=-10)
    model = build_model(model_cfg).model
    cfg = LossConfig(
        kind="siglip",
        terms=[TermConfig(name="locca", options=LOCCA), TermConfig(name="self_distillation", options=OPTIONS)],
    )
    objectives = build_objectives(cfg, ObjectiveContext(model=model))
    attach_objectives(model, objectives)
    objectives.bind(model)
    optimizer = build_optimizer(OptimConfig(), model)
    step = build_step(model, objectives, optimizer, constant(optimizer), device="cpu", precision="fp32",
                      grad_clip_norm=None, max_logit_scale=100.0)  # fmt: skip
    batch = fake_batch(LOCAL_BATCH)
    outputs = step._forward(model, batch["images"], batch["texts"])
    seen = []
    recorder = StepRecorder(1, "cpu", seen.append)
    with recorder.part("loss"):  # as the step times the loss, each member inside it
        terms = objectives(outputs, batch, part=recorder.part)
    recorder.finish()
    parts = seen[0].breakdown
    for name in ("loss/contrastive", "loss/locca", "loss/self_distillation"):
        assert parts[name] > 0, name
    inner = parts["loss/contrastive"] + parts["loss/locca"] + parts["loss/self_distillation"]
    assert inner <= parts["loss"] and parts["loss/self_distillation"] > parts["loss/contrastive"]
    assert set(terms) == {"contrastive", *(f"locca_{t}" for t in ("caption", "referring", "grounded")),
                          "self_distillation", "masked_prediction"}  # fmt: skip
    calls = []

    @contextlib.contextmanager
    def part(name):
        calls.append(name)
        yield

    objectives(outputs, batch, part=part)
    assert calls == ["loss/contrastive", "loss/locca", "loss/self_distillation"]


def _step(model_json: str, rank: int, world_size: int, strategy: str | None, ranks: int = 2):
    from torch.distributed.tensor import DTensor

    from clipforge.train.optim import OptimConfig, build_optimizer
    from clipforge.train.step import build_step

    def full(tensor):
        return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()

    torch.manual_seed(0)
    model_cfg = ModelConfig(name=model_json, init_logit_bias=-10)
    cfg = LossConfig(
        kind="siglip",
        terms=[TermConfig(name="locca", options=LOCCA), TermConfig(name="self_distillation", options=OPTIONS)],
    )
    built, objectives, prepared = prepared_with_terms(model_cfg, cfg, rank, world_size, strategy)
    objectives.bind(built.model)
    optimizer = build_optimizer(OptimConfig(), built.model)
    step = build_step(prepared.model, objectives, optimizer, constant(optimizer), device="cpu", precision="fp32",
                      grad_clip_norm=None, max_logit_scale=100.0)  # fmt: skip
    batch = fake_batch(LOCAL_BATCH * ranks)  # the global batch of `ranks` ranks; this process's part of it
    local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH) if strategy else slice(None)
    parameters = dict(built.model.named_parameters())
    teacher = [name for name in parameters if ".teacher." in name]

    def student_of(name: str) -> str:
        return (
            "visual." + name.split(".teacher.visual.")[1]
            if ".teacher.visual." in name
            else name.replace(".teacher.", ".")
        )

    before = {name: full(parameters[student_of(name)]) for name in teacher}
    out = step({name: value[local] for name, value in batch.items()})
    grads = {name: full(p.grad) for name, p in parameters.items() if p.grad is not None}
    # the teacher took the student's weights at the switch (this step), then one EMA update, done on the shards:
    # it equals the formula on the whole tensors, 0.9 · the student before the step + 0.1 · after it
    ema_error = max(
        float((full(parameters[name]) - (0.9 * before[name] + 0.1 * full(parameters[student_of(name)]))).abs().max())
        for name in teacher
    )
    moved = sum(not torch.equal(full(parameters[name]), before[name]) for name in teacher)
    sharded = {name for name in teacher if isinstance(parameters[name], DTensor)}
    return {
        "terms": {name: float(value) for name, value in out["terms"].items()},
        "grads": grads,
        "ema_error": ema_error,
        "moved": moved,
        "teachers": len(teacher),
        "sharded_teacher": sharded,
        "center": objectives.members[2].member.center.clone(),
    }


def _rank_worker(rank, world_size, model_json):
    return {strategy: _step(model_json, rank, world_size, strategy, world_size) for strategy in ("ddp", "fsdp")}


@pytest.mark.parametrize("ranks", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_gloo_ranks_equal_one_process_with_every_term_on(tiny_model_json, tmp_path, ranks):
    results = run_ranks(_rank_worker, ranks, tmp_path / "ranks", tiny_model_json, timeout=500)
    reference = _step(tiny_model_json, 0, 1, None, ranks)
    terms = reference["terms"]
    assert all(terms[name] > 0 for name in ("contrastive", "locca_caption", "self_distillation", "masked_prediction"))
    assert "objectives.members.2.member.mask_token" in reference["grads"]
    assert not [name for name in reference["grads"] if ".teacher." in name]  # the teacher gets no gradient
    assert results[0]["fsdp"]["sharded_teacher"] and not results[0]["ddp"]["sharded_teacher"]
    for strategy in ("ddp", "fsdp"):
        distributed = results[0][strategy]["grads"]
        assert reference["grads"].keys() == distributed.keys(), strategy
        for name, grad in reference["grads"].items():
            scale = grad.abs().max().clamp_min(1e-12)
            assert (distributed[name] - grad).abs().max() <= 1e-5 * scale, (strategy, name)
        for name in ("self_distillation", "masked_prediction", "contrastive"):
            mean = sum(result[strategy]["terms"][name] for result in results) / ranks
            assert abs(mean - terms[name]) <= 1e-5 * terms[name], (strategy, name)
        for result in results:  # the centres moved to the global batch's mean, the same on every rank
            assert torch.allclose(result[strategy]["center"], reference["center"], atol=1e-6, rtol=0), strategy
        for result in results:
            assert result[strategy]["ema_error"] <= 1e-6 and result[strategy]["moved"] > 10, strategy
    assert reference["ema_error"] <= 1e-6 and reference["teachers"] == results[0]["fsdp"]["teachers"] > 10


def run_config(data, tiny_model_json, out, *extra):
    terms = (
        "loss.terms=[{name: self_distillation, weight: 1.0, start: 0.6, options: {local_crops: 2, head_hidden: 32, "
        "head_dim: 16, prototypes: 48, masked_weight: 0.25}}]"
    )
    return small_run_config(data, tiny_model_json, out, "model.init_logit_bias=-10", "loss.kind=siglip", terms, *extra)


def test_a_resume_across_the_switch_is_exact_and_exports_leave_the_teacher_out(synth_data, tiny_model_json, tmp_path):
    from transformers import CLIPModel

    from clipforge.export import export_model
    from clipforge.model_loading import load_checkpoint_model

    common = ("train.steps=6", "checkpoint.every=1", "checkpoint.keep_last=6")  # on from step ceil(0.6 · 6) = 4
    train(run_config(synth_data, tiny_model_json, tmp_path / "full", *common))
    logged = {r["step"]: r for r in records(tmp_path / "full") if "train/self_distillation" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert all(logged[step]["train/self_distillation"] == 0 for step in (1, 2, 3))
    assert all(logged[step]["train/self_distillation"] > 0 < logged[step]["train/masked_prediction"] for step in (5, 6))
    checkpoints = tmp_path / "full" / "checkpoints"
    weights = read_weights(checkpoints / "latest")
    prefix = "objectives.members.1.member."
    assert int(weights[prefix + "switched_on"]) in (3, 4)
    assert not torch.equal(weights[prefix + "teacher.visual.conv1.weight"], weights["visual.conv1.weight"])
    early = read_weights(checkpoints / "step_00000003")
    assert int(early[prefix + "switched_on"]) == -1

    assert int(read_weights(checkpoints / "step_00000005")[prefix + "switched_on"]) in (3, 4)
    for start in (3, 5):  # across the switch, and after it (the teacher and its switch step come from the checkpoint)
        partial = tmp_path / f"partial{start}"
        (partial / "checkpoints").mkdir(parents=True)
        name = f"step_{start:08d}"
        shutil.copytree(checkpoints / name, partial / "checkpoints" / name)
        train(run_config(synth_data, tiny_model_json, partial, *common, "checkpoint.resume=latest"))
        resumed = read_weights(partial / "checkpoints" / "latest")
        assert weights.keys() == resumed.keys()
        assert all(torch.equal(weights[name], resumed[name]) for name in weights), [
            name for name in weights if not torch.equal(weights[name], resumed[name])
        ]
        terms = ("train/self_distillation", "train/masked_prediction", "train/contrastive")
        full = {step: [r[t] for t in terms] for step, r in logged.items() if step > start}
        assert {r["step"]: [r[t] for t in terms] for r in records(partial) if terms[0] in r} == full

    export_model(load_checkpoint_model(checkpoints / "latest"), tmp_path / "export", ("hf",))
    _, info = CLIPModel.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_gradcache_refuses_it_and_the_planner_sizes_its_crops(tiny_model_json, tmp_path):
    """GradCache caches the towers' outputs, which this objective cannot use (it runs the tower itself): refused in
    one line. ``clipforge plan`` plans the heaviest step, with every term on (this one starts half way), makes its
    crops field from the shape the objective declares, and counts the teacher as objective memory."""
    from clipforge.train.memory import FakeRun

    data = "data.train_urls=/nowhere/{0..1}.tar"  # planning reads no data
    common = [data, "train.steps=10", f"model.name={tiny_model_json}", "model.init_logit_bias=-10", "loss.kind=siglip"]
    late = "{name: self_distillation, start: 0.5, options: {local_crops: 2, head_dim: 16, prototypes: 48}}"
    locca = "{name: locca, options: {depth: 1, bins: 16, max_regions: 2}}"

    def planned(*terms: str):
        with FakeRun(load_config(None, [*common, f"loss.terms=[{', '.join(terms)}]", "data.batch_size=8"]), 2) as run:
            return run.step(8)

    crops, plain = planned(late), planned()
    assert crops.parts["batch"] - plain.parts["batch"] == 8 * 2 * 3 * 16 * 16 * 4  # 8 × 2 crops, 3 × 16 × 16 fp32
    assert crops.parts["objective_modules"] > 0 == plain.parts["objective_modules"]  # the heads and the teacher

    def work(step) -> int:  # what the step makes: the student's views add theirs when the term is planned on
        return step.parts["activations"] + step.parts["loss_buffers"] + step.parts["backward_temporaries"]

    assert work(crops) > 1.3 * work(plain)
    assert planned(locca, late).peak > crops.peak  # with LocCa, whose target positions fake tensors cannot count
    alone = "loss.terms=[{name: self_distillation, options: {local_crops: 2, prototypes: 48}}]"
    cfg = load_config(None, [*common, alone, "train.accum_steps=2", "data.batch_size=8"])
    with pytest.raises(ValueError, match="runs the towers itself.*train.accum_steps=1"), FakeRun(cfg, 1):
        pass
