from pathlib import Path

import pytest
import torch

from clipforge.model_loading import load_init_weights, load_weights
from clipforge.models import ModelConfig, build_model


def build_initialised(cfg: ModelConfig):
    """The model as a run builds it: ``build_model``, then ``model.init_from``'s weights."""
    built = build_model(cfg)
    load_init_weights(built.model, cfg.init_from)
    return built


def test_builds_open_clip_architecture_by_name():
    built = build_model(ModelConfig(name="RN50"))  # any open_clip name; RN50 to show non-ViT towers work
    assert built.architecture == "RN50" and built.model_cfg["embed_dim"] == 1024


def test_builds_project_json_config_and_normalises_embeddings(tiny_model_json):
    built = build_model(ModelConfig(name=tiny_model_json))
    model = built.model.eval()
    images, texts = torch.randn(3, 3, 32, 32), built.tokenizer(["a red circle", "two blue stars", "x"])
    assert texts.shape == (3, 24)
    out = model(images, texts)
    for key in ("image_features", "text_features"):
        assert out[key].shape == (3, 64)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_demo_architecture_is_shipped():
    built = build_model(ModelConfig(name="tiny-vit-64"))
    assert built.model_cfg["vision_cfg"]["image_size"] == 64


def test_loads_local_weights_file_and_checkpoint_dir(tiny_model_json, tmp_path):
    from checkpointing import save_checkpoint

    source = build_model(ModelConfig(name=tiny_model_json)).model
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    checkpoint = save_checkpoint(tmp_path / "checkpoints", source)
    for init_from in (tmp_path / "weights.pt", checkpoint):
        loaded = build_initialised(ModelConfig(name=tiny_model_json, init_from=str(init_from))).model
        for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name


def test_bad_names_and_paths_are_clear_errors(tiny_model_json, tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Q-99'"):
        build_model(ModelConfig(name="ViT-Q-99"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model(ModelConfig(name=str(tmp_path / "missing.json")))
    model = build_model(ModelConfig(name=tiny_model_json)).model
    with pytest.raises(FileNotFoundError, match="neither manifest.json"):
        load_weights(model, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.init_from: .* does not exist"):
        build_initialised(ModelConfig(name=tiny_model_json, init_from=str(tmp_path / "missing.pt")))


def test_text_trimming_gives_the_same_features_and_gradients(tiny_model_json):
    """Cutting the padding after the batch's last EOT token changes nothing but the work (causal mask, EOT pooling)."""
    import copy

    from references import naive_clip_loss

    from clipforge.models import enable_text_trimming

    torch.manual_seed(0)
    built = build_model(ModelConfig(name=tiny_model_json))
    # float64: the two are the same computation; in fp32 kernels for other shapes round differently (~1e-4)
    full_model, trimmed_model = built.model.double(), copy.deepcopy(built.model).double()
    assert enable_text_trimming(trimmed_model)
    captions = ["a red circle", "two small blue squares above a large green star on a striped background", "x", "a cat"]
    tokens = built.tokenizer(captions)
    length = int(tokens.argmax(dim=1).max()) + 1
    assert length < tokens.shape[1]
    images = torch.randn(len(captions), 3, 32, 32, dtype=torch.float64)
    results = []
    for model, texts in ((full_model, tokens), (trimmed_model, tokens[:, :length])):
        out = model(images, texts)
        loss = naive_clip_loss(out["image_features"], out["text_features"], out["logit_scale"].exp())
        loss.backward()
        results.append(
            (
                out["text_features"].detach(),
                loss.detach(),
                {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None},
            )
        )
    (full_features, full_loss, full_grads), (trim_features, trim_loss, trim_grads) = results
    torch.testing.assert_close(trim_features, full_features, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(trim_loss, full_loss, rtol=1e-10, atol=1e-12)
    assert full_grads.keys() == trim_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(
            trim_grads[name],
            full_grads[name],
            rtol=1e-9,
            atol=1e-11,
            msg=lambda message, name=name: f"{name}: {message}",
        )
    # full-length tokens (evaluation) still go through the trimmed model unchanged
    torch.testing.assert_close(trimmed_model.encode_text(tokens), full_model.encode_text(tokens))


def test_text_trimming_is_refused_where_it_would_change_the_result(tmp_path):
    import json

    from conftest import TINY_MODEL

    from clipforge.models import enable_text_trimming

    # a text tower without the causal mask (as SigLIP's): padding is attended to, so cutting it changes the result
    config = {**TINY_MODEL, "text_cfg": {**TINY_MODEL["text_cfg"], "no_causal_mask": True, "pool_type": "last"}}
    (tmp_path / "bidirectional.json").write_text(json.dumps(config))
    model = build_model(ModelConfig(name=str(tmp_path / "bidirectional.json"))).model
    assert not enable_text_trimming(model)


class _RunsCode:
    """A pickled object whose unpickling would run code (touch a file): what weights_only=True refuses."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_a_pickle_that_would_run_code_is_refused_in_one_line_and_never_run(
    tiny_model_json, synth_suite, tmp_path, capsys
):
    from clipforge.cli import main

    evil, marker = tmp_path / "weights.pt", tmp_path / "code-ran"
    torch.save({"visual.proj": _RunsCode(str(marker))}, evil)
    with pytest.raises(ValueError) as refused:
        build_initialised(ModelConfig(name=tiny_model_json, init_from=str(evil)))
    message = str(refused.value)
    assert message.startswith(f"model.init_from: {evil} is not a weights-only file") and "\n" not in message
    assert "(Unsupported global: GLOBAL " in message, message  # what weights_only refused
    # clipforge eval --weights: the same line, no traceback, exit 2
    code = main(["eval", "--model", tiny_model_json, "--weights", str(evil), "--suite", str(synth_suite)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"{evil} is not a weights-only file" in err, err
    assert not marker.exists()  # the code never ran


def test_a_file_torch_cannot_read_is_one_line_naming_it(tiny_model_json, tmp_path):
    model = build_model(ModelConfig(name=tiny_model_json)).model
    whole = tmp_path / "whole.pt"
    torch.save(model.state_dict(), whole)
    for name, data in (("empty.pt", b""), ("cut.pt", whole.read_bytes()[: whole.stat().st_size // 2])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{tmp_path / name} is not a weights file torch.load can read"):
            load_weights(model, str(tmp_path / name))


def test_an_open_clip_folder_whose_weights_would_run_code_is_one_line_in_eval(
    tiny_model_json, synth_suite, tmp_path, capsys
):
    import json

    from clipforge.cli import main

    folder, marker = tmp_path / "open_clip_folder", tmp_path / "code-ran"
    folder.mkdir()
    model_cfg = json.loads(Path(tiny_model_json).read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.save({"visual.proj": _RunsCode(str(marker))}, folder / "open_clip_pytorch_model.bin")
    code = main(["eval", str(folder), "--suite", str(synth_suite)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{folder / 'open_clip_pytorch_model.bin'} is not a weights-only file" in err, err
    assert not marker.exists()


def test_export_of_a_run_directory_suggests_its_latest_checkpoint(tmp_path, capsys):
    from clipforge.cli import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  name: tiny-rn-64\n")  # as training leaves a run directory
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{run} is a run directory, not a checkpoint: did you mean {run / 'checkpoints' / 'latest'}?" in err, err
    assert not (tmp_path / "out").exists()


def test_a_run_starts_from_the_weights_of_init_from(synth_data, tiny_model_json, tmp_path):
    """``build_model`` initialises randomly; the run's build step loads ``model.init_from`` into the model before
    anything is attached to it or wraps it."""
    from checkpointing import save_checkpoint

    from clipforge.distributed import DistInfo
    from clipforge.train.build import build_run
    from clipforge.train.config import load_config

    torch.manual_seed(1)
    source = build_model(ModelConfig(name=tiny_model_json)).model
    checkpoint = save_checkpoint(tmp_path / "source", source)
    cfg = load_config(
        None,
        [
            f"data.train_urls={synth_data}/train/{{00000..00005}}.tar",
            "data.num_workers=0",
            f"model.name={tiny_model_json}",
            f"model.init_from={checkpoint}",
            f"train.output_dir={tmp_path / 'run'}",
        ],
    )
    started = build_run(cfg, DistInfo(), lambda: False).built.model.state_dict()
    assert any(not torch.equal(value, started[key]) for key, value in build_model(cfg.model).model.state_dict().items())
    for key, value in source.state_dict().items():
        assert torch.equal(started[key], value), key
