from pathlib import Path

import pytest

from clipforge.config import ConfigError, describe_fields, to_yaml
from clipforge.train.config import MOVED, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        assert isinstance(load_config(path), RunConfig)


def test_yaml_and_overrides_merge_in_order(tmp_path):
    path = write(tmp_path, "data:\n  train_urls: a/{0..3}.tar\n  batch_size: 64\noptim:\n  lr: 0.01\n")
    cfg = load_config(path, ["optim.lr=5e-4", "train.steps=7", "model.init_from=null"])
    assert cfg.data.batch_size == 64 and cfg.optim.lr == 5e-4 and cfg.train.steps == 7
    assert cfg.data.train_urls == "a/{0..3}.tar" and cfg.model.init_from is None


def test_unknown_key_is_named(tmp_path):
    path = write(tmp_path, "data:\n  train_urls: x.tar\n  batch_sise: 64\n")
    with pytest.raises(ConfigError, match=r"run.yaml.*data\.batch_sise"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        load_config(None, ["data.train_urls=x.tar", "optim.learning_rate=1"])


def test_wrong_type_is_named(tmp_path):
    path = write(tmp_path, "data:\n  train_urls: x.tar\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size.*lots"):
        load_config(path)


def test_missing_required_value_is_named():
    with pytest.raises(ConfigError, match=r"data\.sources: no training data"):
        load_config(None, [])


def test_invalid_value_is_named():
    with pytest.raises(ConfigError, match=r"loss\.kind.*'infonce'"):
        load_config(None, ["data.train_urls=x.tar", "loss.kind=infonce"])
    with pytest.raises(ConfigError, match=r"train\.precision"):
        load_config(None, ["data.train_urls=x.tar", "train.precision=fp8"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_a_moved_key_stops_in_one_line_naming_its_new_place(tmp_path, old, new):
    section, key = old.split(".")
    with pytest.raises(ConfigError) as raised:
        load_config(write(tmp_path, f"data:\n  train_urls: x.tar\n{section}:\n  {key}: 1\n"))
    message = str(raised.value)
    assert (
        "\n" not in message and message.startswith(str(tmp_path / "run.yaml")) and f"{old!r} is now {new!r}" in message
    )
    with pytest.raises(ConfigError, match=f"--set '{old}=1': key '{old}' is now '{new}'"):
        load_config(None, ["data.train_urls=x.tar", f"{old}=1"])
    # the new place is a key of the schema, and the old one is not (a stale entry in MOVED would hide a typo)
    assert new in describe_fields(RunConfig) and f"  {old} =" not in describe_fields(RunConfig)


def test_each_section_has_its_keys_and_the_train_section_only_its_own():
    cfg = load_config(
        None,
        [
            "data.train_urls=x.tar",
            "checkpoint.every=7",
            "checkpoint.resume=auto",
            "parallel.strategy=fsdp",
            "speed.compile=true",
            "logging.peak_tflops=3.5",
        ],
    )
    assert (cfg.checkpoint.every, cfg.checkpoint.resume, cfg.parallel.strategy) == (7, "auto", "fsdp")
    assert cfg.speed.compile is True and cfg.logging.peak_tflops == 3.5
    assert sorted(vars(cfg.train)) == [
        "accum_steps",
        "max_nonfinite_steps",
        "output_dir",
        "precision",
        "requeue",
        "seed",
        "steps",
        "tf32",
    ]


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["data.train_urls=x/{0..1}.tar", "optim.lr=0.002", "eval.suite=e.yaml"])
    again = load_config(write(tmp_path, to_yaml(cfg)))
    assert again == cfg


def test_every_field_is_documented():
    text = describe_fields(RunConfig)
    for line in text.splitlines():
        if line.startswith("      "):
            assert line.strip(), f"undocumented field above: {text}"
    assert "data.sources = []" in text and "optim.lr = 0.0005" in text


def test_saved_config_keeps_environment_interpolations_as_written(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPFORGE_TEST_TOKEN", "hf_notforfiles123")
    path = write(
        tmp_path,
        "data:\n  train_urls: 'pipe:curl -s -H \"Authorization: Bearer ${oc.env:CLIPFORGE_TEST_TOKEN}\" x.tar'\n"
        "train:\n  output_dir: runs/a\neval:\n  suite: ${train.output_dir}/suite.yaml\n"
        "logging:\n  wandb_run_name: ${data.train_urls}\n",
    )
    cfg = load_config(path)
    assert "hf_notforfiles123" in cfg.data.train_urls  # the run itself sees the value
    assert cfg.eval.suite == "runs/a/suite.yaml"
    saved = to_yaml(cfg)
    assert "hf_notforfiles123" not in saved
    assert "${oc.env:CLIPFORGE_TEST_TOKEN}" in saved
    assert "suite: runs/a/suite.yaml" in saved  # a plain reference is saved resolved
    assert "wandb_run_name: ${data.train_urls}" in saved  # a reference to an environment value is not
    again = load_config(write(tmp_path, saved))
    assert again.data.train_urls == cfg.data.train_urls and again.logging.wandb_run_name == cfg.data.train_urls


def test_yaml_mistake_in_an_override_is_one_line_with_a_hint():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.train_urls=x.tar", "data.sources=[{urls: data/x/{00000..00063}.tar}]"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("--set 'data.sources=[{urls: data/x/{00000..00063}.tar}]': the value is not valid YAML")
    assert "character 16 of the value ('{')" in message and "quote" in message
