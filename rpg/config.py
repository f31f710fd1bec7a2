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
from typing import Any, Callable, Iterable, Mapping

import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """A configuration that does not satisfy the schema."""


# ----------------------------------------------------------------------------------------------------------------
# Schema defaults
# ----------------------------------------------------------------------------------------------------------------


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


_SCHEMA = load_schema()  # read once, for the dataclass defaults below


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
        default = sub.get("default")
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(default)
        elif isinstance(default, dict) and default and isinstance(instance.get(key), dict):
            # a mapping default is a base that the given mapping is merged onto, as a later config file is merged
            # onto an earlier one (architectures.models: a profile that changes one entry keeps the others)
            instance[key] = deep_update(default, instance[key])
        if key in instance:
            instance[key] = _fill_defaults(sub, instance[key])
    return instance


def schema_defaults(*path: str) -> dict:
    """The defaults of the schema's section at `path` (e.g. ``"architectures", "collect"``), filled in the way
    `validate_config` fills a config that leaves the section out."""
    node: Mapping = _SCHEMA
    for key in path:
        node = node["properties"][key]
    return _fill_defaults(node, copy.deepcopy(node.get("default", {})))


def neutral_values() -> dict[str, Any]:
    """Dotted key -> the value that reproduces results made before the key existed (the schema's `x-neutral`:
    its default, `x-neutral-value`: that value)."""
    out: dict[str, Any] = {}

    def walk(node: Mapping, path: tuple[str, ...]) -> None:
        for key, sub in node.get("properties", {}).items():
            if sub.get("x-neutral"):
                out[".".join((*path, key))] = schema_defaults(*path, key) if sub.get("type") == "object" \
                    else sub["default"]
            elif "x-neutral-value" in sub:
                out[".".join((*path, key))] = sub["x-neutral-value"]
            walk(sub, (*path, key))

    walk(_SCHEMA, ())
    return out


def _from_schema(*path: str, values: Mapping | None = None) -> Callable[[type], type]:
    """A frozen dataclass whose fields take their defaults from the schema section at `path` (or from `values`):
    the schema is the one place a default is written. Fields with an explicit `field(...)` keep it (nested
    sections); fields the schema gives no default stay required."""

    def wrap(cls: type) -> type:
        defaults = schema_defaults(*path) if values is None else values
        for name in cls.__dict__.get("__annotations__", {}):
            if name in cls.__dict__ or name not in defaults:
                continue
            value = _to_tuple(defaults[name])
            if isinstance(value, dict):
                value = field(default_factory=lambda v=value: copy.deepcopy(v))
            setattr(cls, name, value)
        return dataclass(frozen=True)(cls)

    return wrap


def _to_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------------------------------
# Sections (every default comes from the schema; a field's comment says what it means, the schema says the rest)
# ----------------------------------------------------------------------------------------------------------------


@_from_schema("data")
class DataConfig:
    root: str
    download: bool
    val_images: int


@_from_schema("backbone")
class BackboneConfig:
    source: str
    arch: str
    feature_dim: int
    img_size: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    label_smoothing: float
    flip_average: bool
    pretrained_file: str | None
    optimizer: str  # sgd (Nesterov) | adamw
    momentum: float
    warmup: float  # fraction of the steps with a linear ramp-up; linear decay to 0 afterwards
    translate: int
    flip: bool
    amp: str  # auto | bf16 | none
    stem_init: str  # random | whiten
    lookahead: bool
    compile_features: bool


@_from_schema("tasks")
class TasksConfig:
    ids: str | tuple[int, ...]
    unseen: tuple[int, ...]  # the paper's 20 held-out task ids
    table11: tuple[str, ...]  # Table 11's 10 embeddings, in its order
    flip_pair: tuple[str, ...]  # Table 12's seen embedding and its flip
    n_val: int
    n_seen_eval: int
    n_seen: int | None  # train on a seeded random subset of this many seen tasks (None = all)
    holdout_neighbours: bool  # keep unseen tasks' Hamming-1 neighbours and complements out of training
    shifted_domain_tasks: int | None  # train on at most this many tasks per shifted domain (None = all)
    label_free_domains: tuple[str, ...]  # shifted domains with no training or validation task (k = 0)


@_from_schema("zoo")
class ZooConfig:
    mode: str  # batched_heads | finetune
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    n_checkpoints: int
    save_every: int
    task_chunk: int
    epochs: int
    init: str  # shared | per_task
    # finetune mode only (the paper profile's recipe; defaults keep the plain one)
    loss: str  # cross_entropy | focal
    focal_gamma: float
    augment: str  # translate_flip | flip_autoaugment
    head_epochs: int
    head_lr: float
    min_lr: float | None
    final_steps: int


# ----------------------------------------------------------------------------------------------------------------
# Generator sizes (paper Table 15; Mamba d_conv 4, expand 2; denoiser kernel 7) plus the CPU default. The `rpg`
# section resolves as: the preset named by rpg.size, then every key of the section that is not null (the schema's
# null defaults mean "the preset's").
# ----------------------------------------------------------------------------------------------------------------
_STACK = dict(d_conv=4, expand=2, headdim=64, kernel_size=7, checkpoint_activations=False)  # every preset's
_CPU_TINY = dict(_STACK, token_size=256, d_model=256, n_layers=2, d_state=32,
                 denoiser_channels=(1, 16, 32, 64, 32, 16, 1))
RPG_MODELS: dict[str, dict] = {
    # CPU default: Tiny's token size and Mamba width, half-width denoiser (measured ~3x cheaper on 2 CPU cores).
    "cpu_tiny": _CPU_TINY,
    "tiny": dict(_STACK, token_size=256, d_model=256, n_layers=2, d_state=32,
                 denoiser_channels=(1, 32, 64, 128, 64, 32, 1)),
    "small": dict(_STACK, token_size=4096, d_model=4096, n_layers=2, d_state=128,
                  denoiser_channels=(1, 32, 64, 128, 64, 32, 1)),
    "base": dict(_STACK, token_size=8192, d_model=8192, n_layers=2, d_state=128,
                 denoiser_channels=(1, 32, 64, 128, 64, 32, 1)),
    # The paper's Large uses d_model 12288 then 16384; we keep one width per stack (16384).
    "large": dict(_STACK, token_size=16384, d_model=16384, n_layers=2, d_state=128,
                  denoiser_channels=(1, 64, 96, 64, 1)),
    # custom: cpu_tiny's values, meant to be overridden key by key
    "custom": _CPU_TINY,
}


# Paper Table 15: the generator version for a number of generated parameters (upper limits, exclusive).
PAPER_SIZE_LIMITS: tuple[tuple[float, str], ...] = (
    (50_000, "tiny"), (10_000_000, "small"), (50_000_000, "base"), (float("inf"), "large"))
TASK_BITS = 10  # the task condition: one bit per CIFAR-10 class


def paper_size(n_params: int) -> str:
    """The paper's generator version (Table 15) for `n_params` generated parameters."""
    return next(name for limit, name in PAPER_SIZE_LIMITS if n_params < limit)


def _model_values(section: Mapping) -> dict:
    """ModelConfig's values for an `rpg` section: the section's keys left out take the schema's defaults, then the
    preset named by `size`, overridden by every key that is not null."""
    section = {**schema_defaults("rpg"), **section}
    size = section["size"]
    if size == "auto":
        raise ValueError("RPG size 'auto' is resolved from a parameter count (architectures.rpg): name a preset here")
    if size not in RPG_MODELS:
        raise ValueError(f"unknown RPG size '{size}' (expected one of {', '.join(RPG_MODELS)})")
    values = {"condition_dim": TASK_BITS, **{key: None for key in section if key != "size"}, **RPG_MODELS[size]}
    values.update({key: _to_tuple(value) for key, value in section.items() if key != "size" and value is not None})
    return values


@_from_schema(values=_model_values({}))
class ModelConfig:
    """Generator architecture. Resolved from a preset in `RPG_MODELS` plus explicit overrides."""

    token_size: int
    recurrent: str  # mamba | lstm | transformer | none
    d_model: int
    n_layers: int
    d_state: int
    d_conv: int
    expand: int
    headdim: int
    denoiser_channels: tuple[int, ...]
    kernel_size: int
    position: str  # 2d | 1d | learnable
    permutation_state: bool
    condition: str  # none | task
    condition_dim: int  # the condition's width: the task bits (+ a one-hot domain with domain tasks)
    condition_hidden: int | None  # hidden width of the task MLP; None = d_model (the reference: 1024)
    condition_tokens: str  # all | last_k: which token positions the task condition is added to
    condition_k: int  # last_k: the number of last positions (the reference: 8)
    condition_domain: str  # onehot | stats | onehot_stats: a domain task's domain code (with `domains`)
    condition_dropout: float  # training: probability of the null task code (classifier-free guidance)
    guidance_scale: float  # sampling: null + scale * (conditional - null); 1 = the conditional alone
    checkpoint_activations: bool  # recompute the recurrent blocks in the backward pass (memory for time)
    checkpoint_tokens: int | None  # with checkpoint_activations: recompute segments of this many tokens


def resolve_model_config(section: Mapping) -> ModelConfig:
    """Preset named by `section['size']`, overridden by every non-null key of the section."""
    return ModelConfig(**_model_values(section))


@_from_schema("diffusion")
class DiffusionConfig:
    timesteps: int
    beta_start: float
    beta_end: float
    sampler: str  # ddpm | ddim
    sample_steps: int
    eta: float
    clip_x0: float | None
    prediction: str  # eps | x0 | v: what the denoiser outputs (rpg.diffusion.GaussianDiffusion)


@_from_schema("train")
class TrainConfig:
    steps: int
    batch_size: int
    diffusion_batch: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float | None
    ema: float | None
    amp: str  # none | cuda | auto | bf16: bfloat16 autocast of the generator's training and sampling
    eval_every: int
    save_every: int
    val_samples: int
    canonicalise: str  # none | sort | match: hidden-unit order of the heads before tokenising
    patience: int | None  # validations without a better score before stopping; None = run all `steps`
    position_lr_scale: float  # learnable positions: their rate is this times the schedule's


@_from_schema("generate")
class GenerateConfig:
    samples: int
    seen_samples: int
    mode: str  # sequential | partial | full
    tokens_per_call: int


@_from_schema("logging")
class LoggingConfig:
    wandb: bool
    wandb_mode: str
    project: str
    entity: str | None
    progress: bool


@_from_schema("table13")
class Table13Config:
    """Fine-tuning curves on unseen tasks (scratch / pretrained + fresh head / RPG-generated init)."""

    tasks: tuple[str, ...]
    epochs: tuple[int, ...]
    train_images: int | None
    test_images: int | None
    batch_size: int
    lr: float
    weight_decay: float
    seed_offset: int


@_from_schema("analysis")
class AnalysisConfig:
    """Inputs of the analysis notebooks (PCA of heads, similarity vs. accuracy)."""

    noise_magnitudes: tuple[float, ...]
    noise_repeats: int
    kernel: str


@_from_schema("domains")
class DomainsConfig:
    """Tasks that are (class set, image domain) pairs (the study's `domains` regime, issue 13; see
    `rpg.experiments.task_zoo.domains`). names = () is the 1022-task zoo of one domain (the plain images)."""

    names: tuple[str, ...]
    class_sets: int
    train_images: int
    val_images: int
    test_images: int


@_from_schema("study", "finetune_few")
class FinetuneFewConfig:
    """RPG-initialised fine-tuning with few labels (issue 31; `rpg.experiments.task_zoo.finetune_few`)."""

    regime: str
    shots: tuple[int | str, ...]  # labelled images per task; "all" = every training image
    steps: int | None  # None: the regime's zoo.steps
    eval_steps: tuple[int, ...]
    within: float
    holdout: float  # fraction of the k images that chooses the early-stopped recipe's step; 0 = none
    folds: int  # parts of the k images whose pooled left-out scores choose the cross-validated step; < 2 = none
    seed_offset: int


@_from_schema("study")
class StudyConfig:
    """The study of regimes (issue 13): which regime files, where, the overrides every regime shares, and the
    user's own methods scored beside the built-in ones (`module:callable` each, issue 31)."""

    regimes: tuple[str, ...]
    regime_dir: str
    common: str | None
    methods: tuple[str, ...]
    finetune_few: FinetuneFewConfig = field(default_factory=FinetuneFewConfig)


@_from_schema("architectures", "collect")
class CollectConfig:
    """How an architecture is trained and its checkpoints collected (`architectures.collect`; the recipe of
    `rpg.experiments.arch_study.collect.train_collection`)."""

    epochs: int
    batch_size: int
    optimizer: str  # sgd (Nesterov) | adamw
    lr: float
    weight_decay: float
    label_smoothing: float
    warmup: float  # fraction of the main phase with a linear ramp-up
    collect_lr_ratio: float  # constant LR of the collection phase, relative to lr
    n_checkpoints: int
    save_every: int  # optimisation steps between saved checkpoints
    runs: int  # independent training runs (seeds) in Table 1
    translate: int
    flip: bool
    amp: str  # none | bf16 | auto
    init_from: str | None  # None: train from scratch | "backbone": continue from the backbone rule's weights
    score_every: int  # score every k-th checkpoint (counted back from the last) on the test set


# Keys of `architectures` that one entry of `architectures.models` may set for itself (absent or null: the family's).
ARCH_MODEL_FAMILY_KEYS = ("samples", "sample_steps", "threads", "val_images", "bn_recompute_images",
                          "baseline_samples")
_ABSENT = {name: None for name in ARCH_MODEL_FAMILY_KEYS} | {s: {} for s in ("collect", "rpg", "train", "diffusion")}


@_from_schema(values={**_fill_defaults(_SCHEMA["properties"]["architectures"]["properties"]["models"]
                                       ["additionalProperties"], {}), **_ABSENT})
class ArchModelConfig:
    """One entry of `architectures.models`; `collect` / `rpg` / `train` / `diffusion` hold only the keys it
    overrides (the schema checks them against the full sections), and the keys of ARCH_MODEL_FAMILY_KEYS, when
    set, replace the family's for this architecture (a million-parameter row samples, scores and threads
    differently from a 3K-parameter one). Absent keys (None, {}) are the family's."""

    arch: str
    model_kwargs: Mapping[str, Any]
    img_size: int
    pretrained: bool
    pretrained_file: str | None
    collect: Mapping[str, Any]
    rpg: Mapping[str, Any]
    train: Mapping[str, Any]
    diffusion: Mapping[str, Any]
    samples: int | None
    sample_steps: int | tuple[int, ...] | None
    threads: int | None
    val_images: int | None
    bn_recompute_images: int | None
    baseline_samples: int | None


@_from_schema("architectures", "ablations")
class AblationsConfig:
    arch: str
    train: Mapping[str, Any]
    recurrent: tuple[str, ...]
    position: tuple[str, ...]
    permutation_runs: tuple[int, ...]
    token_size: tuple[int, ...]
    seeds: int


def _arch_models(models: Mapping) -> dict[str, ArchModelConfig]:
    return {name: _section(ArchModelConfig, entry) for name, entry in models.items()}


@_from_schema("architectures")
class ArchitecturesConfig:
    """Generation across architectures (Table 1 and its ablations). `rpg` and `train` are overrides of the
    top-level sections for these generators (resolved per architecture by `rpg.experiments.arch_study.study`)."""

    table1: tuple[str, ...]
    models: Mapping[str, ArchModelConfig] = field(
        default_factory=lambda: _arch_models(schema_defaults("architectures")["models"]))
    collect: CollectConfig = field(default_factory=CollectConfig)
    rpg: Mapping[str, Any]
    train: Mapping[str, Any]
    samples: int
    sample_steps: int | tuple[int, ...] | None  # DDIM steps when sampling (a list: chosen on validation)
    threads: int
    val_images: int
    bn_recompute_images: int  # > 0: also score generated BatchNorm nets with running stats recomputed on these
    baseline_samples: int | None  # models per baseline (None: as many as `samples`)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)


@_from_schema()
class Config:
    experiment: str
    seed: int
    device: str
    threads: int
    keep_freed_memory: bool
    results_dir: str
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    rpg: dict  # raw section: resolve with resolve_model_config
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
        """The generator's config; with domain tasks its condition is the task bits + the domain code
        (`rpg.condition_domain`: one-hot, statistics of the domain's images, or both)."""
        model = resolve_model_config(self.rpg)
        if self.domains.names and model.condition == "task":
            code = model.condition_domain
            width = (len(self.domains.names) * ("onehot" in code.split("_"))
                     + 2 * self.backbone.feature_dim * ("stats" in code.split("_")))
            model = dataclasses.replace(model, condition_dim=TASK_BITS + width)
        return model


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------------------------


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
    # A key of several forms (tasks.ids: `all` or a list of ids; sample_steps: a count, null or a list): the first
    # alternative that reads the strings as its values.
    for branch in schema.get("oneOf", []) + schema.get("anyOf", []):
        coerced = coerce_strings(branch, instance, root)
        if coerced != instance:
            return coerced
    return instance


# Keys of earlier versions: the error for one of them says what replaced it.
RENAMED_KEYS = {"bf16": "is now train.amp: `bf16: true` was `amp: cuda`, `bf16: false` is `amp: none`"}


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
            hints = [f"'{old}' {hint}" for old, hint in RENAMED_KEYS.items()
                     if err.validator == "additionalProperties" and f"'{old}'" in err.message]
            lines.append(f"config error at {where}: {err.message}" + "".join(f" ({h})" for h in hints))
        raise ConfigError("\n".join(lines))
    return instance


def _section(cls: type, values: Mapping) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _to_tuple(v) for k, v in values.items() if k in names})


def _architectures(raw: Mapping) -> ArchitecturesConfig:
    values = dict(raw)
    values["models"] = _arch_models(raw["models"])
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
        keep_freed_memory=full["keep_freed_memory"],
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
        study=_section(StudyConfig, {**full["study"],
                                     "finetune_few": _section(FinetuneFewConfig, full["study"]["finetune_few"])}),
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
