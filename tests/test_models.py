import pytest
import torch

from clipforge.models import ModelConfig, build_model, load_weights


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
    from safetensors.torch import save_file

    source = build_model(ModelConfig(name=tiny_model_json)).model
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "ckpt" / "model.safetensors")
    for init_from in (tmp_path / "weights.pt", tmp_path / "ckpt"):
        loaded = build_model(ModelConfig(name=tiny_model_json, init_from=str(init_from))).model
        for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name


def test_bad_names_and_paths_are_clear_errors(tiny_model_json, tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'ViT-Q-99'"):
        build_model(ModelConfig(name="ViT-Q-99"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model(ModelConfig(name=str(tmp_path / "missing.json")))
    model = build_model(ModelConfig(name=tiny_model_json)).model
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_weights(model, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.init_from: .* does not exist"):
        build_model(ModelConfig(name=tiny_model_json, init_from=str(tmp_path / "missing.pt")))
