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


def test_chunks_per_volume_and_same_study_settings():
    from volvlp_ray.config import same_study_mode

    organ = ["data.text_mode=organ", "train.batch_size=8"]
    cfg = load_config(None, [*organ, "data.chunks_per_volume=4"])
    assert cfg.data.chunks_per_volume == 4 and same_study_mode(cfg) == "soft"
    assert same_study_mode(load_config(None, [])) == "negative"  # the hard loss, one chunk per volume: as before
    assert same_study_mode(load_config(None, ["loss.kind=swca"])) == "soft"  # SWCA's own spatial rule
    assert same_study_mode(load_config(None, [*organ, "data.chunks_per_volume=4", "loss.same_study=ignore"])) == \
        "ignore"
    with pytest.raises(ConfigError, match="needs data.text_mode=organ and data.sampler=equal"):
        load_config(None, ["data.chunks_per_volume=2"])
    with pytest.raises(ConfigError, match="needs data.text_mode=organ and data.sampler=equal"):
        load_config(None, [*organ, "data.chunks_per_volume=2", "data.sampler=bucket"])
    with pytest.raises(ConfigError, match="multiple of data.chunks_per_volume=3"):
        load_config(None, [*organ, "data.chunks_per_volume=3"])
    with pytest.raises(ConfigError, match="loss.same_study='maybe' is not one of"):
        load_config(None, ["loss.same_study=maybe"])
    # `key=none` for a plain string key is the word (it parses as YAML null)
    assert load_config(None, ["loss.soft_norm=none"]).loss.soft_norm == "none"


def test_voided_by_names_the_setting_that_makes_a_key_inert():
    from volvlp_ray.config import voided_by

    sig = load_config(None, [])
    assert voided_by(sig, "loss.alpha") == "loss.kind=sigmoid (it applies to loss.kind=swca only)"
    assert voided_by(sig, "loss.same_study") == "data.chunks_per_volume=1 (no two chunks of one study share a step)"
    assert voided_by(sig, "data.chunk_depth").startswith("data.text_mode=report")
    assert "muon" in voided_by(sig, "train.muon_lr") and voided_by(sig, "train.lr") is None
    assert voided_by(sig, "model.init_logit_scale") is None and voided_by(sig, "model.init_logit_bias") is None
    swca = load_config(None, ["loss.kind=swca"])
    assert voided_by(swca, "loss.alpha") is None and voided_by(swca, "loss.spatial_sigma_mm") is None
    soft = load_config(None, ["loss.kind=swca", "loss.form=softmax"])
    assert "no bias" in voided_by(soft, "model.init_logit_bias") and "ring" in voided_by(soft, "loss.ring")
    assert "ring" in voided_by(load_config(None, ["loss.kind=clip"]), "loss.ring")
    k2 = load_config(None, ["data.text_mode=organ", "data.chunks_per_volume=2"])
    assert voided_by(k2, "loss.same_study") is None and voided_by(k2, "loss.spatial_sigma_mm") is None
    assert voided_by(load_config(None, ["loss.negation_pairs=0"]), "loss.pair_weight").startswith(
        "loss.negation_pairs=0")


def test_the_cli_makes_local_paths_absolute(tmp_path, monkeypatch):
    """Relative local paths are the user's (their working directory), fixed before any worker sees them; URIs kept."""
    monkeypatch.chdir(tmp_path)
    cfg, _ = parse_cli(["workspace=ws", "data.shards_dir=sh", "train.storage_path=s3://bucket/runs?region=x"])
    assert cfg.workspace == str(tmp_path / "ws") and cfg.data.shards_dir == str(tmp_path / "sh")
    assert cfg.train.storage_path == "s3://bucket/runs?region=x"
    assert parse_cli([])[0].workspace == str(tmp_path / "workspace")
