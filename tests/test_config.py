"""Every shipped config loads, and the resolved TOML round-trips without secrets."""

from pathlib import Path

import pytest

from distillab.config import ConfigError, from_dict, load_config, to_toml

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    again = tmp_path / "run.toml"
    again.write_text(to_toml(cfg))
    assert load_config(again) == cfg


def test_resolved_config_names_the_key_variable_never_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    cfg = load_config(Path(__file__).parent.parent / "configs" / "openai-teacher.toml")
    text = to_toml(cfg)
    assert 'api_key_env = "OPENAI_API_KEY"' in text and "sk-secret-123" not in text


def test_bad_values_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown config key 'teacher.modle' \\(did you mean 'teacher.model'\\?\\)"):
        from_dict({"teacher": {"modle": "x"}})
    with pytest.raises(ConfigError, match="train.loss"):
        from_dict({"train": {"loss": "kl"}})
    with pytest.raises(ConfigError, match="run name"):
        from_dict({"name": "../x"})
