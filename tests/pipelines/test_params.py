"""params.yaml and conf/: every preset composes and loads, params.yaml is the small composition,
overrides apply, mistakes are named."""

from __future__ import annotations

import pytest
import yaml

from components.config import ConfigError
from pipelines.params import REPO_PARAMS, compose, conf_dir, load_params, preset_names

CONF = REPO_PARAMS.parent / "conf"


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_every_preset_of_the_repository_loads(preset):
    params, name = load_params(REPO_PARAMS, preset)
    assert name == preset
    assert params.generate.rows > 0


def test_the_presets_are_the_files_of_conf_preset():
    assert sorted(preset_names(REPO_PARAMS)) == ["base", "small", "tiny"]
    assert conf_dir(REPO_PARAMS) == CONF.resolve()


def test_params_yaml_is_the_small_composition_so_dvc_shows_what_runs():
    """`dvc repro` reads params.yaml as it is: it must be what Hydra composes for the default
    preset (`distillery params --preset small --composed > params.yaml` after editing conf/)."""
    assert yaml.safe_load(REPO_PARAMS.read_text()) == compose(CONF, "small")
    as_file, name = load_params(REPO_PARAMS)
    composed, _ = load_params(REPO_PARAMS, "small")
    assert name == "small" and as_file == composed


def test_without_a_preset_the_file_is_read_as_it_is(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("preset: tiny\ngenerate: {rows: 17}\n", encoding="utf-8")
    params, name = load_params(p)
    assert (name, params.generate.rows) == ("tiny", 17)  # no preset laid over it: what DVC shows runs
    with pytest.raises(ConfigError, match="no presets and no conf/ folder"):
        load_params(p, "small")


def test_composition_errors_are_one_line_naming_the_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; known: base, small, tiny"):
        load_params(REPO_PARAMS, "huge")


def test_tiny_is_smaller_than_small():
    tiny, _ = load_params(REPO_PARAMS, "tiny")
    small, _ = load_params(REPO_PARAMS, "small")
    assert tiny.generate.rows < small.generate.rows


def test_file_preset_key_is_the_default(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("preset: tiny\ngenerate: {rows: 10}\npresets:\n  tiny: {generate: {rows: 7}}\n", encoding="utf-8")
    params, name = load_params(p)
    assert (name, params.generate.rows) == ("tiny", 7)


def test_overrides_win(tmp_path):
    params, _ = load_params(REPO_PARAMS, "tiny", {"filter": {"folds": 4}})
    assert params.filter.folds == 4


@pytest.mark.parametrize("text, fragment", [
    ("generate: {rowz: 3}\npresets: {small: {}}\n", "generate.rowz"),
    ("generate: {rows: 3}\npresets: {small: {filter: {foldz: 2}}}\n", "presets.small.filter.foldz"),
    ("generate: {rows: three}\npresets: {small: {}}\n", "generate.rows"),
    ("stages: {}\npresets: {small: {}}\n", "stages"),
    ("preset: huge\npresets: {small: {}}\n", "unknown preset 'huge'"),
    ("generate: [1, 2\n", "not valid YAML: line 2"),
])
def test_mistakes_are_named(tmp_path, text, fragment):
    p = tmp_path / "params.yaml"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=None) as err:
        load_params(p)
    assert fragment in str(err.value)
    assert str(p) in str(err.value)


def test_kfp_struct_numbers_are_accepted_for_ints():
    # KFP passes dict parameters as protobuf Structs, where 3 arrives as 3.0
    params, _ = load_params(REPO_PARAMS, "tiny", {"generate": {"rows": 30.0}})
    assert params.generate.rows == 30 and isinstance(params.generate.rows, int)
    with pytest.raises(ConfigError, match="generate.rows"):
        load_params(REPO_PARAMS, "tiny", {"generate": {"rows": 30.5}})


def test_a_mapping_override_replaces_the_mapping_while_sections_merge():
    params, _ = load_params(REPO_PARAMS, "tiny", {"source": {"fields": {"prompt": "question", "response": "answer"}},
                                                  "filter": {"folds": 4}})
    assert params.source.fields == {"prompt": "question", "response": "answer"}
    assert params.filter.folds == 4 and params.filter.num_perm == 64  # tiny's own value kept
