"""The schema is the single source of defaults and closes every mapping; the typed config follows it exactly."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
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
    ("study", "finetune_few"): C.FinetuneFewConfig,
    ("architectures",): C.ArchitecturesConfig,
    ("architectures", "collect"): C.CollectConfig,
    ("architectures", "ablations"): C.AblationsConfig,
}
NESTED = {("architectures",): {"models", "collect", "ablations"},  # sections compared on their own
          ("study",): {"finetune_few"}}


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
    defaults = C.schema_defaults(*path)  # as validation fills a config that leaves the section out
    for name, prop in props.items():
        assert "default" in prop, f"{'.'.join(path)}.{name} has no default in the schema"
        if name in NESTED.get(path, ()):
            continue
        assert normalise(field_default(fields[name])) == normalise(defaults[name]), f"{'.'.join(path)}.{name}"


def test_model_entry_defaults_equal_the_schema():
    entry = subschema(("architectures", "models"))["additionalProperties"]
    fields = {f.name: f for f in dataclasses.fields(C.ArchModelConfig)}
    assert set(entry["properties"]) == set(fields)
    for name, prop in entry["properties"].items():
        if "default" in prop:
            assert normalise(field_default(fields[name])) == normalise(prop["default"]), name


def test_default_config_is_the_validated_empty_config():
    """Config() (dataclass defaults) and config_from_dict({}) (schema defaults) are the same configuration."""
    assert C.Config() == C.config_from_dict({})
    assert C.Config().model == C.config_from_dict({}).model == C.resolve_model_config({})


def _literal_defaults(tree: ast.AST) -> Iterator[str]:
    """`name = <literal>` class-level assignments of config dataclasses (a default written outside the schema)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                    call = stmt.value
                    derived = (isinstance(call, ast.Call) and getattr(call.func, "id", "") == "field"
                               and all(k.arg in ("default_factory", "compare", "repr") for k in call.keywords)
                               and not any(isinstance(k.value, ast.Constant) for k in call.keywords
                                           if k.arg == "default_factory"))
                    if not derived:
                        yield f"{node.name}.{ast.unparse(stmt.target)} = {ast.unparse(call)}"


def test_no_default_is_written_outside_the_schema():
    """Every config dataclass takes its defaults from the schema (`_from_schema`): none holds a literal; the
    workflow's rerun-neutral values come from the schema too, and the old default tables are gone."""
    source = Path(C.__file__).read_text()
    assert list(_literal_defaults(ast.parse(source))) == []
    for cls in (c for c in vars(C).values() if isinstance(c, type) and dataclasses.is_dataclass(c)):
        assert cls.__name__.endswith("Config"), cls
    package = Path(C.__file__).parent
    for name in ("BACKBONE_DEFAULTS", "BYO_DEFAULTS"):
        hits = [str(p) for p in package.rglob("*.py") if name in p.read_text()]
        assert hits == [], f"{name} in {hits}"
    from rpg.experiments.rules import NEUTRAL_DEFAULTS
    assert NEUTRAL_DEFAULTS == C.neutral_values()


def test_every_key_has_a_description():
    missing = []

    def walk(node: dict, path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            if "description" not in sub:
                missing.append(f"{path}{key}")
            walk(sub, f"{path}{key}.")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            walk(extra, f"{path}<name>.")

    walk(C.load_schema(), "")
    assert missing == [], f"{len(missing)} keys without a description: {missing}"


def test_default_profile_sets_only_what_users_change(repo_root):
    """config/config.yaml resolves to the schema defaults: it only names the keys a user is expected to change."""
    from rpg.config import read_config_file, validate_config

    assert validate_config(read_config_file(repo_root / "config" / "config.yaml")) == validate_config({})


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


def test_strings_from_the_command_line_are_coerced_in_keys_of_several_forms():
    """--config gives every nested value as a string; keys with oneOf forms coerce them like the others."""
    cfg = C.validate_config({"tasks": {"ids": ["1", "2"]},
                           "architectures": {"sample_steps": "20",
                                             "models": {"cnn_s": {"arch": "rpg_cnn_s", "sample_steps": ["10", "20"]}}}})
    assert cfg["tasks"]["ids"] == [1, 2]
    assert cfg["architectures"]["sample_steps"] == 20
    assert cfg["architectures"]["models"]["cnn_s"]["sample_steps"] == [10, 20]
    assert C.validate_config({"architectures": {"sample_steps": "null"}})["architectures"]["sample_steps"] is None
    assert C.validate_config({"tasks": {"ids": "all"}})["tasks"]["ids"] == "all"
    with pytest.raises(C.ConfigError, match="ids"):
        C.validate_config({"tasks": {"ids": ["one"]}})


def test_strings_from_the_command_line_are_coerced():
    """Snakemake's --config train='{steps: 1000}' gives nested strings; PyYAML reads 1e-3 as a string."""
    cfg = C.config_from_dict({"train": {"steps": "1000", "lr": "1e-3", "grad_clip": "null"},
                              "logging": {"progress": "false"},
                              "architectures": {"train": {"steps": "5"}, "rpg": {"token_size": "64"}}})
    assert (cfg.train.steps, cfg.train.lr, cfg.train.grad_clip, cfg.logging.progress) == (1000, 0.001, None, False)
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


def test_mapping_default_is_merged_under_a_given_mapping():
    """A profile that changes one entry of architectures.models keeps the others, as a later config file would."""
    base = C.validate_config({})["architectures"]
    full = C.validate_config({"architectures": {"models": {"cnn_1m": {"collect": {"epochs": 0}}}}})["architectures"]
    assert set(full["models"]) == set(base["models"])
    assert full["models"]["cnn_1m"] == C.deep_update(base["models"]["cnn_1m"], {"collect": {"epochs": 0}})


def test_byo_preset_sits_under_the_user_config(tmp_path):
    """rpg train: its preset (unconditional, permutation states) under --config, which overrides it."""
    from rpg.cli.main import BYO_PRESET

    user = tmp_path / "mine.yaml"
    user.write_text("train: {steps: 7}\n")
    cfg = C.load_config([BYO_PRESET, user])
    assert cfg.model.condition == "none" and cfg.model.permutation_state and cfg.train.steps == 7


def test_a_renamed_key_says_what_replaced_it():
    with pytest.raises(C.ConfigError, match=r"'bf16' is now train.amp"):
        C.validate_config({"train": {"bf16": True}})
