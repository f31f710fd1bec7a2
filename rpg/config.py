"""Configuration: YAML at the edges, frozen dataclasses inside.

The JSON schema `config.schema.yaml` beside this file is the single source of defaults. `load_config` reads one
or more YAML files (later files override earlier ones, deeply), validates the result against the schema, fills
in defaults and returns a `Config` of frozen dataclasses. Unknown or mistyped keys are errors that name them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A configuration that does not satisfy the schema."""


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    root: str = "data"
    download: bool = False
    val_images: int = 5000


@dataclass(frozen=True)
class BackboneConfig:
    source: str = "train"
    arch: str = "rpg_cifar_cnn"
    feature_dim: int = 128
    img_size: int = 32
    epochs: int = 8
    batch_size: int = 512
    lr: float = 0.4
    weight_decay: float = 5e-4
    label_smoothing: float = 0.2
    flip_average: bool = True
    pretrained_file: str | None = None


@dataclass(frozen=True)
class TasksConfig:
    ids: str | tuple[int, ...] = "all"
    # The paper's 20 held-out task ids, Table 11's 10 embeddings in its order, and Table 12's flip pair.
    unseen: tuple[int, ...] = (314, 482, 589, 197, 462, 111, 101, 278, 793, 279, 653, 238, 1001, 141, 884, 592, 502,
                               643, 383, 128)
    table11: tuple[str, ...] = ("0100010111", "0111110110", "0011101110", "0101111111", "0010000000", "0001100101",
                                "1111101001", "1010000011", "0100010110", "1100011001")
    flip_pair: tuple[str, ...] = ("1011101000", "0100010111")
    n_val: int = 20
    n_seen_eval: int = 50
    n_seen: int | None = None  # train on a seeded random subset of this many seen tasks (None = all)
    holdout_neighbours: bool = False  # keep unseen tasks' Hamming-1 neighbours and complements out of training
    shifted_domain_tasks: int | None = None  # train on at most this many tasks per shifted domain (None = all)


@dataclass(frozen=True)
class ZooConfig:
    mode: str = "batched_heads"
    steps: int = 300
    batch_size: int = 500
    lr: float = 1e-3
    weight_decay: float = 0.0
    n_checkpoints: int = 3
    save_every: int = 10
    task_chunk: int = 1022
    epochs: int = 1
    init: str = "shared"  # shared | per_task
    # finetune mode only (the paper profile's recipe; defaults keep the plain one)
    loss: str = "cross_entropy"  # cross_entropy | focal
    focal_gamma: float = 2.0
    augment: str = "translate_flip"  # translate_flip | flip_autoaugment
    head_epochs: int = 0
    head_lr: float = 0.01
    min_lr: float | None = None
    final_steps: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """Generator architecture. Resolved from a preset in `RPG_MODELS` plus explicit overrides."""

    token_size: int = 256
    recurrent: str = "mamba"  # mamba | lstm | transformer | none
    d_model: int = 256
    n_layers: int = 2
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    denoiser_channels: tuple[int, ...] = (1, 16, 32, 64, 32, 16, 1)
    kernel_size: int = 7
    position: str = "2d"  # 2d | 1d | learnable
    permutation_state: bool = False
    condition: str = "task"  # none | task
    condition_dim: int = 10
    condition_hidden: int | None = None  # hidden width of the task MLP; None = d_model (the reference: 1024)
    condition_tokens: str = "all"  # all | last_k: which token positions the task condition is added to
    condition_k: int = 8  # last_k: the number of last positions (the reference: 8)
    checkpoint_activations: bool = False  # recompute the recurrent blocks in the backward pass (memory for time)
    checkpoint_tokens: int | None = None  # with checkpoint_activations: recompute segments of this many tokens


# ----------------------------------------------------------------------------------------------------------------
# Sizes (paper Table 15; Mamba d_conv 4, expand 2; denoiser kernel 7) plus the CPU default.
# ----------------------------------------------------------------------------------------------------------------
RPG_MODELS: dict[str, dict] = {
    # CPU default: Tiny's token size and Mamba width, half-width denoiser (measured ~3x cheaper on 2 CPU cores).
    "cpu_tiny": dict(token_size=256, d_model=256, n_layers=2, d_state=32, denoiser_channels=(1, 16, 32, 64, 32, 16, 1)),
    "tiny": dict(token_size=256, d_model=256, n_layers=2, d_state=32, denoiser_channels=(1, 32, 64, 128, 64, 32, 1)),
    "small": dict(token_size=4096, d_model=4096, n_layers=2, d_state=128,
                  denoiser_channels=(1, 32, 64, 128, 64, 32, 1)),
    "base": dict(token_size=8192, d_model=8192, n_layers=2, d_state=128,
                 denoiser_channels=(1, 32, 64, 128, 64, 32, 1)),
    # The paper's Large uses d_model 12288 then 16384; we keep one width per stack (16384).
    "large": dict(token_size=16384, d_model=16384, n_layers=2, d_state=128, denoiser_channels=(1, 64, 96, 64, 1)),
    "custom": dict(),
}


# Paper Table 15: the generator version for a number of generated parameters (upper limits, exclusive).
PAPER_SIZE_LIMITS: tuple[tuple[float, str], ...] = (
    (50_000, "tiny"), (10_000_000, "small"), (50_000_000, "base"), (float("inf"), "large"))


def paper_size(n_params: int) -> str:
    """The paper's generator version (Table 15) for `n_params` generated parameters."""
    return next(name for limit, name in PAPER_SIZE_LIMITS if n_params < limit)


def resolve_model_config(section: Mapping) -> ModelConfig:
    """Preset named by `section['size']`, overridden by every non-null key of the section."""
    size = section.get("size", "cpu_tiny")
    if size == "auto":
        raise ValueError("RPG size 'auto' is resolved from a parameter count (architectures.rpg): name a preset here")
    if size not in RPG_MODELS:
        raise ValueError(f"unknown RPG size '{size}' (expected one of {', '.join(RPG_MODELS)})")
    values = dict(RPG_MODELS[size])
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key, value in section.items():
        if key in fields and value is not None:
            values[key] = tuple(value) if isinstance(value, list) else value
    return ModelConfig(**values)



@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    sampler: str = "ddim"
    sample_steps: int = 50
    eta: float = 0.0
    clip_x0: float | None = 4.0
    prediction: str = "eps"  # eps | x0 | v: what the denoiser outputs (rpg.diffusion.GaussianDiffusion)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 3000
    batch_size: int = 16
    diffusion_batch: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 1e-5
    grad_clip: float | None = 1.0
    ema: float | None = None
    bf16: bool = True
    eval_every: int = 500
    save_every: int = 500
    val_samples: int = 3
    canonicalise: str = "none"  # none | sort | match: hidden-unit order of the heads before tokenising
    patience: int | None = None  # validations without a better score before stopping; None = run all `steps`
    position_lr_scale: float = 1.0  # learnable positions: their rate is this times the schedule's


@dataclass(frozen=True)
class GenerateConfig:
    samples: int = 10
    seen_samples: int = 3
    mode: str = "partial"
    tokens_per_call: int = 256


@dataclass(frozen=True)
class LoggingConfig:
    wandb: bool = True
    wandb_mode: str = "offline"
    project: str = "rpg"
    entity: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class Table13Config:
    """Fine-tuning curves on unseen tasks (scratch / pretrained + fresh head / RPG-generated init)."""

    tasks: tuple[str, ...] = ("0100010111", "0111110110", "0011101110")
    epochs: tuple[int, ...] = (0, 1, 2)
    train_images: int | None = 5000
    test_images: int | None = 5000
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.01
    seed_offset: int = 13


@dataclass(frozen=True)
class AnalysisConfig:
    """Inputs of the analysis notebooks (PCA of heads, similarity vs. accuracy)."""

    noise_magnitudes: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    noise_repeats: int = 3
    kernel: str = "rpg"


@dataclass(frozen=True)
class DomainsConfig:
    """Tasks that are (class set, image domain) pairs (the study's `domains` regime, issue 13; see
    `rpg.experiments.task_zoo.domains`). names = () is the 1022-task zoo of one domain (the plain images)."""

    names: tuple[str, ...] = ()
    class_sets: int = 256
    train_images: int = 10000
    val_images: int = 2000
    test_images: int = 5000


@dataclass(frozen=True)
class StudyConfig:
    """The study of regimes (issue 13): which regime files, where, and the overrides every regime shares."""

    regimes: tuple[str, ...] = ("shared_init", "shared_init_sort", "per_task_init", "per_task_init_sort",
                                "per_task_init_match", "seen16", "seen64", "seen64_sort", "seen256", "seen64_per_task",
                                "seen64_per_task_sort", "holdout_neighbours", "domains", "domains_1200", "domains_few",
                                "domains_few_2400", "domains_few_cond1024", "domains_few_sort", "domains_few_d512x4")
    regime_dir: str = "config/experiments/regimes"
    common: str | None = "config/experiments/regimes/common.yaml"


@dataclass(frozen=True)
class CollectConfig:
    """How an architecture is trained and its checkpoints collected (`architectures.collect`; the recipe of
    `rpg.experiments.arch_study.collect.train_collection`)."""

    epochs: int = 4
    batch_size: int = 256
    optimizer: str = "sgd"  # sgd (Nesterov) | adamw
    lr: float = 0.1
    weight_decay: float = 0.0005
    label_smoothing: float = 0.0
    warmup: float = 0.1  # fraction of the main phase with a linear ramp-up
    collect_lr_ratio: float = 0.1  # constant LR of the collection phase, relative to lr
    n_checkpoints: int = 50
    save_every: int = 2  # optimisation steps between saved checkpoints
    runs: int = 1  # independent training runs (seeds) in Table 1
    translate: int = 2
    flip: bool = True
    amp: str = "none"  # none | bf16 | auto
    init_from: str | None = None  # None: train from scratch | "backbone": continue from the backbone rule's weights
    score_every: int = 1  # score every k-th checkpoint (counted back from the last) on the test set


# Keys of `architectures` that one entry of `architectures.models` may set for itself (absent or null: the family's).
ARCH_MODEL_FAMILY_KEYS = ("samples", "sample_steps", "threads", "val_images", "bn_recompute_images",
                          "baseline_samples")


@dataclass(frozen=True)
class ArchModelConfig:
    """One entry of `architectures.models`; `collect` / `rpg` / `train` / `diffusion` hold only the keys it
    overrides (the schema checks them against the full sections), and the keys of ARCH_MODEL_FAMILY_KEYS, when
    set, replace the family's for this architecture (a million-parameter row samples, scores and threads
    differently from a 3K-parameter one)."""

    arch: str
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    img_size: int = 32
    pretrained: bool = False
    pretrained_file: str | None = None
    collect: Mapping[str, Any] = field(default_factory=dict)
    rpg: Mapping[str, Any] = field(default_factory=dict)
    train: Mapping[str, Any] = field(default_factory=dict)
    diffusion: Mapping[str, Any] = field(default_factory=dict)
    samples: int | None = None
    sample_steps: int | tuple[int, ...] | None = None
    threads: int | None = None
    val_images: int | None = None
    bn_recompute_images: int | None = None
    baseline_samples: int | None = None


@dataclass(frozen=True)
class AblationsConfig:
    arch: str = "cnn_s"
    train: Mapping[str, Any] = field(default_factory=lambda: {"steps": 400, "diffusion_batch": 128})
    recurrent: tuple[str, ...] = ("none", "lstm", "transformer", "mamba")
    position: tuple[str, ...] = ("2d", "1d", "learnable")
    permutation_runs: tuple[int, ...] = (1, 3, 10)
    token_size: tuple[int, ...] = (64, 128, 256, 512)
    seeds: int = 1


@dataclass(frozen=True)
class ArchitecturesConfig:
    """Generation across architectures (Table 1 and its ablations). `rpg` and `train` are overrides of the
    top-level sections for these generators (resolved per architecture by `rpg.experiments.arch_study.study`)."""

    table1: tuple[str, ...] = ("cnn_s", "cnn_m", "vit_micro")
    models: Mapping[str, ArchModelConfig] = field(default_factory=dict)
    collect: CollectConfig = field(default_factory=CollectConfig)
    rpg: Mapping[str, Any] = field(default_factory=lambda: {"size": "cpu_tiny", "permutation_state": True})
    train: Mapping[str, Any] = field(default_factory=dict)
    samples: int = 10
    sample_steps: int | tuple[int, ...] | None = None  # DDIM steps when sampling (a list: chosen on validation)
    threads: int = 1
    val_images: int = 2000
    bn_recompute_images: int = 0  # > 0: also score generated BatchNorm nets with running stats recomputed on these
    baseline_samples: int | None = None  # models per baseline (None: as many as `samples`)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)


@dataclass(frozen=True)
class Config:
    experiment: str = "cifar10_binary"
    seed: int = 0
    device: str = "auto"
    threads: int = 2
    results_dir: str = "results"
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    rpg: dict = field(default_factory=dict)  # raw section: resolve with resolve_model_config
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    architectures: ArchitecturesConfig = field(default_factory=ArchitecturesConfig)
    table13: Table13Config = field(default_factory=Table13Config)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def model(self) -> ModelConfig:
        """The generator's config; with domain tasks its condition is the 10 class-set bits + a one-hot domain."""
        model = resolve_model_config(self.rpg)
        if self.domains.names and model.condition == "task":
            model = dataclasses.replace(model, condition_dim=10 + len(self.domains.names))
        return model


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------------


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def deep_update(base: dict, override: Mapping) -> dict:
    """Recursively merge `override` into a copy of `base` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fill_defaults(schema: Mapping, instance: Any) -> Any:
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return instance
    for key, sub in schema.get("properties", {}).items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            instance[key] = _fill_defaults(sub, instance[key])
    return instance


def _resolve_ref(schema: Mapping, root: Mapping) -> Mapping:
    """A subschema with a local `$ref` ("#/a/b") merged under its own keys (their own keys win)."""
    ref = schema.get("$ref")
    if not ref:
        return schema
    target: Any = root
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return {**_resolve_ref(target, root), **{k: v for k, v in schema.items() if k != "$ref"}}


def _parse_scalar(text: str, types: set[str]) -> Any:
    """`text` as the first of the schema's scalar types it spells (YAML 1.2 style: 1e-3 is a number)."""
    lowered = text.strip().lower()
    if "null" in types and lowered in ("null", "~", "none"):
        return None
    if "boolean" in types and lowered in ("true", "false"):
        return lowered == "true"
    for kind, convert in (("integer", int), ("number", float)):
        if kind in types:
            try:
                value = convert(text)
            except ValueError:
                continue
            return float(value) if kind == "number" and isinstance(value, int) else value
    return text


def coerce_strings(schema: Mapping, instance: Any, root: Mapping | None = None) -> Any:
    """Turn strings into the numbers, booleans or nulls the schema asks for, at any depth.

    Two sources give strings where a number is meant: Snakemake's ``--config train='{steps: 1000}'`` (nested
    values are parsed with YAML's BaseLoader) and PyYAML, which reads ``1e-3`` (no dot) as a string. A string
    that spells no value of an expected type is left alone, so validation still names it.
    """
    root = schema if root is None else root
    schema = _resolve_ref(schema, root)
    types = schema.get("type", [])
    types = {types} if isinstance(types, str) else set(types)
    if isinstance(instance, str) and types & {"integer", "number", "boolean", "null"} and "string" not in types:
        return _parse_scalar(instance, types)
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {k: coerce_strings(props[k] if k in props else extra if isinstance(extra, dict) else {}, v, root)
                for k, v in instance.items()}
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [coerce_strings(schema["items"], v, root) for v in instance]
    return instance


def validate_config(raw: Mapping) -> dict:
    """Validate a config dict against the schema, fill in defaults, and return the completed dict.

    Raises:
        ConfigError: naming the offending key (e.g. ``rpg: Additional properties are not allowed ('tokn' ...)``).
    """
    schema = load_schema()
    instance = _fill_defaults(schema, coerce_strings(schema, copy.deepcopy(dict(raw))))
    import jsonschema  # ~3 s to import (format checkers): only where a config is validated

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            where = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"config error at {where}: {err.message}")
        raise ConfigError("\n".join(lines))
    return instance


def _to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _section(cls: type, values: Mapping) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _to_tuple(v) for k, v in values.items() if k in names})


def _architectures(raw: Mapping) -> ArchitecturesConfig:
    values = dict(raw)
    values["models"] = {name: _section(ArchModelConfig, entry) for name, entry in raw["models"].items()}
    values["collect"] = _section(CollectConfig, raw["collect"])
    values["ablations"] = _section(AblationsConfig, raw["ablations"])
    return _section(ArchitecturesConfig, values)


def config_from_dict(raw: Mapping, *, validated: bool = False) -> Config:
    """Build a validated `Config` from a (possibly partial) dict.

    validated: `raw` is already the complete output of `validate_config` (a workflow job's config, validated once
        when Snakemake loaded the workflow), so it is not validated again.
    """
    full = dict(raw) if validated else validate_config(raw)
    return Config(
        experiment=full["experiment"],
        seed=full["seed"],
        device=full["device"],
        threads=full["threads"],
        results_dir=full["results_dir"],
        data=_section(DataConfig, full["data"]),
        backbone=_section(BackboneConfig, full["backbone"]),
        tasks=_section(TasksConfig, full["tasks"]),
        zoo=_section(ZooConfig, full["zoo"]),
        rpg=dict(full["rpg"]),
        diffusion=_section(DiffusionConfig, full["diffusion"]),
        train=_section(TrainConfig, full["train"]),
        generate=_section(GenerateConfig, full["generate"]),
        logging=_section(LoggingConfig, full["logging"]),
        architectures=_architectures(full["architectures"]),
        table13=_section(Table13Config, full["table13"]),
        analysis=_section(AnalysisConfig, full["analysis"]),
        study=_section(StudyConfig, full["study"]),
        domains=_section(DomainsConfig, full["domains"]),
        raw=full,
    )


def read_config_file(path: str | Path) -> dict:
    """One YAML config file as a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded


def load_config(paths: str | Path | Iterable[str | Path], overrides: Mapping | None = None) -> Config:
    """Read YAML file(s) (later ones override earlier ones), apply `overrides`, validate, return a Config."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    merged: dict = {}
    for path in paths:
        merged = deep_update(merged, read_config_file(path))
    if overrides:
        merged = deep_update(merged, overrides)
    return config_from_dict(merged)


def config_to_yaml(cfg: Config) -> str:
    """The fully resolved config (defaults filled in) as YAML, saved beside every result."""
    return yaml.safe_dump(cfg.raw, sort_keys=False)
