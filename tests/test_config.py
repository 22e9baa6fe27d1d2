"""The config tree: defaults, YAML partial instances, dotted overrides, clear errors."""

from pathlib import Path

import pytest
import yaml

from volvlp_ray.config import Config, ConfigError, config_to_dict, load_config, parse_cli

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_default_yaml_equals_dataclass_defaults():
    path = Path(__file__).parents[1] / "configs" / "default.yaml"
    assert config_to_dict(load_config(path)) == config_to_dict(Config())
    assert yaml.safe_load(path.read_text()) == config_to_dict(Config())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_required_keys_exist_with_their_meaning(tmp_path):
    ws = str(tmp_path / "x")
    cfg = load_config(None, [f"workspace={ws}", "train.steps=50", "train.checkpoint_every=5", "data.num_volumes=7",
                             "scaling.num_workers=3", "scaling.use_gpu=true", "loss.kind=clip",
                             "model.preset=small", "seed=3"])
    assert (cfg.workspace, cfg.train.steps, cfg.train.checkpoint_every, cfg.data.num_volumes) == (ws, 50, 5, 7)
    assert (cfg.scaling.num_workers, cfg.scaling.use_gpu, cfg.loss.kind, cfg.model.preset, cfg.seed) == (
        3, True, "clip", "small", 3)


def test_override_beats_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 9\n  lr: 0.5\n")
    cfg = load_config(p, ["train.steps=11"])
    assert cfg.train.steps == 11 and cfg.train.lr == 0.5


def test_unknown_key_names_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.stepz=5"])
    assert "train.stepz" in str(e.value) and "steps" in str(e.value) and "checkpoint_every" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["nonsense=1"])
    assert "workspace" in str(e.value) and "train" in str(e.value)
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  presett: base\n")
    with pytest.raises(ConfigError, match="model.presett"):
        load_config(p)


@pytest.mark.parametrize("override,match", [
    ("train.steps=abc", "integer"),
    ("loss.kind=triplet", "loss.kind"),
    ("loss.alpha=1.5", "alpha"),
    ("model.patch=[4,16]", "patch"),
    ("data.in_plane_size=65", "multiple"),
    ("scaling.use_gpu=maybe", "true/false"),
    ("train=5", "section"),
    ("trainsteps", "key.sub=value"),
])
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_cli_parsing_and_none():
    cfg, args = parse_cli(["train.steps=3", "run_name=none", "tracking.tracking_uri=sqlite:///x.db"])
    assert cfg.train.steps == 3 and cfg.run_name is None and cfg.tracking.tracking_uri == "sqlite:///x.db"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_cluster_runtime_env_parses():
    env = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "runtime_env.yaml").read_text())
    assert "workspace/" in env["excludes"] and ".venv/" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())
