"""The schema is the single source of defaults and closes every mapping; the typed config follows it exactly."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import pytest

from rpg import config as C

# schema path (under `properties`) -> the dataclass that holds that section
SECTIONS = {
    ("data",): C.DataConfig,
    ("backbone",): C.BackboneConfig,
    ("tasks",): C.TasksConfig,
    ("zoo",): C.ZooConfig,
    ("diffusion",): C.DiffusionConfig,
    ("train",): C.TrainConfig,
    ("generate",): C.GenerateConfig,
    ("logging",): C.LoggingConfig,
    ("table13",): C.Table13Config,
    ("analysis",): C.AnalysisConfig,
    ("study",): C.StudyConfig,
    ("architectures",): C.ArchitecturesConfig,
    ("architectures", "collect"): C.CollectConfig,
    ("architectures", "ablations"): C.AblationsConfig,
}
NESTED = {"models", "collect", "ablations"}  # sections of `architectures` compared on their own


def subschema(path: tuple[str, ...]) -> dict:
    node = C.load_schema()
    for key in path:
        node = node["properties"][key]
    return node


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(normalise(v) for v in value)
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    return value


@pytest.mark.parametrize("path", sorted(SECTIONS), ids=".".join)
def test_dataclass_defaults_equal_the_schema(path):
    cls, schema = SECTIONS[path], subschema(path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    props = schema["properties"]
    assert set(props) == set(fields), f"schema vs {cls.__name__}: {set(props) ^ set(fields)}"
    for name, prop in props.items():
        if path == ("architectures",) and name in NESTED:
            continue
        assert "default" in prop, f"{'.'.join(path)}.{name} has no default in the schema"
        assert normalise(field_default(fields[name])) == normalise(prop["default"]), f"{'.'.join(path)}.{name}"


def test_model_entry_defaults_equal_the_schema():
    entry = subschema(("architectures", "models"))["additionalProperties"]
    fields = {f.name: f for f in dataclasses.fields(C.ArchModelConfig)}
    assert set(entry["properties"]) == set(fields)
    for name, prop in entry["properties"].items():
        if "default" in prop:
            assert normalise(field_default(fields[name])) == normalise(prop["default"]), name


def test_rpg_section_names_model_fields():
    names = set(subschema(("rpg",))["properties"]) - {"size"}
    assert names <= {f.name for f in dataclasses.fields(C.ModelConfig)}


def mappings(node: Any, where: str = "") -> Iterator[tuple[str, dict]]:
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield where, node
        for key in ("properties",):
            for name, sub in node.get(key, {}).items():
                yield from mappings(sub, f"{where}.{name}" if where else name)
        if isinstance(node.get("additionalProperties"), dict):
            yield from mappings(node["additionalProperties"], f"{where}.*")


def test_every_mapping_is_closed():
    """additionalProperties false, a schema for the values, an explicit key pattern, or a $ref to a closed one."""
    open_ = [where for where, node in mappings(C.load_schema())
             if node.get("additionalProperties") is not False and not isinstance(node.get("additionalProperties"), dict)
             and "propertyNames" not in node and "$ref" not in node]
    assert not open_, open_


@pytest.mark.parametrize("raw, where", [
    ({"architectures": {"rpg": {"tokn_size": 64}}}, "architectures.rpg"),
    ({"architectures": {"train": {"stepz": 5}}}, "architectures.train"),
    ({"architectures": {"ablations": {"train": {"lrr": 1.0}}}}, "architectures.ablations.train"),
    ({"architectures": {"models": {"x": {"arch": "rpg_cnn_s", "collect": {"epoch": 1}}}}},
     "architectures.models.x.collect"),
    ({"zoo": {"stepz": 3}}, "zoo"),
])
def test_unknown_nested_key_names_its_path(raw, where):
    with pytest.raises(C.ConfigError, match=f"config error at {where}:.*was unexpected"):
        C.config_from_dict(raw)


def test_strings_from_the_command_line_are_coerced():
    """Snakemake's --config train='{steps: 1000}' gives nested strings; PyYAML reads 1e-3 as a string."""
    cfg = C.config_from_dict({"train": {"steps": "1000", "lr": "1e-3", "grad_clip": "null", "bf16": "false"},
                              "architectures": {"train": {"steps": "5"}, "rpg": {"token_size": "64"}}})
    assert (cfg.train.steps, cfg.train.lr, cfg.train.grad_clip, cfg.train.bf16) == (1000, 0.001, None, False)
    assert cfg.architectures.train["steps"] == 5 and cfg.architectures.rpg["token_size"] == 64
    with pytest.raises(C.ConfigError, match="train.steps: 'many' is not of type 'integer'"):
        C.config_from_dict({"train": {"steps": "many"}})


def test_architectures_section_is_typed():
    cfg = C.config_from_dict({})
    assert isinstance(cfg.architectures, C.ArchitecturesConfig)
    assert isinstance(cfg.architectures.collect, C.CollectConfig) and cfg.architectures.collect.lr == 0.1
    assert isinstance(cfg.architectures.models["cnn_s"], C.ArchModelConfig)


EXPERIMENTS = sorted((C.SCHEMA_PATH.parents[1] / "config" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("overlay", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_config_loads_on_the_default(overlay):
    """Each `config/experiments/*.yaml` is an overlay of the default profile that the schema accepts (a renamed or
    removed key fails here, not half-way through a run), and it sends its outputs to a results folder of its own."""
    default = C.SCHEMA_PATH.parents[1] / "config" / "config.yaml"
    cfg = C.load_config([default, overlay])
    assert cfg.results_dir != C.load_config(default).results_dir
