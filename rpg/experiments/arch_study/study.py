"""Generation across architectures (paper §2a): the stages behind table1.csv and ablations/*.csv.

collect_run       train run r of an architecture, save its checkpoint collection (rpg.experiments.arch_study.collect)
train_variant     train an unconditional RPG on a collection (rpg.unconditional), validated on held-out images
generate_variant  sample full models, evaluate them and the originals on the test set, beside the baselines
                  (noise at the samples' novelty, average of 16, per-parameter Gaussian) and every model's novelty
                  (rpg.experiments.arch_study.baselines)
write_table1 / write_ablation   the tables

A *variant* is one generator setting on one architecture's collection, named by what the ablations vary:
``<recurrent>-<position>-<perm|noperm>-runs<R>-tok<token size>[-seed<k>]`` (e.g. ``mamba-2d-perm-runs1-tok256``).
Table 1 uses each architecture's configured setting; an ablation changes one thing of the ablation architecture's
setting, so variants that coincide (e.g. Mamba in the recurrent family and 2-D in the position family) are trained
once. `-seed<k>` (k >= 1) is an independent replicate of the same setting: the generator's training and sampling
draw from seed + k * SEED_STRIDE (`architectures.ablations.seeds` replicates per setting; replicate 0 has no suffix).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import timm
import torch

from rpg.vision.architectures import build_model, count_parameters
from rpg.checkpoint import load_rpg
from rpg.evaluation import (ACCURACY, GAP_BEST, GAP_MEAN, KIND, KIND_ORIGINAL, KIND_RPG, L2_NOVELTY, L2_SPREAD,
                            MAX_IOU_ORIGINAL, STATS, acc_column)
from rpg.experiments.arch_study.baselines import (RPG_BN_RECOMPUTED, StateDict, compare_with_collection,
                                                  summary_columns)
from rpg.experiments.arch_study.collect import collection_files, predictions_name, train_collection
from rpg.vision.evaluate import ImageEvaluator, has_batchnorm, recompute_batchnorm_statistics
from rpg.config import (ARCH_MODEL_FAMILY_KEYS, CollectConfig, Config, ConfigError, DiffusionConfig, ModelConfig,
                        TrainConfig, config_to_yaml, paper_size, resolve_model_config)
from rpg.data import load_cifar10, split_train_val
from rpg.tracking import start_tracking
from rpg.generate import sample_models
from rpg.model import RPG
from rpg.tokenize import Tokenizer
from rpg.unconditional import peak_rss_mb, train_on_collection
from rpg.utils import (load_safetensors, read_safetensors_metadata, resolve_device, save_safetensors_atomic,
                       write_csv_atomic, write_json_atomic, write_text_atomic)

STUDIES = ("main", "ablation")  # Table 1 generators / ablation generators (shorter training, ablations.train)
VARIANT_PATTERN = (r"(mamba|lstm|transformer|none)-(2d|1d|learnable)-(perm|noperm)-runs(\d+)-tok(\d+)"
                   r"(?:-seed([1-9]\d*))?")
SEED_STRIDE = 7919  # replicate k of a variant trains and samples from cfg.seed + k * SEED_STRIDE
ABLATION_FAMILIES = ("recurrent", "position", "permutation", "token_size")


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """One architecture of the experiment, with its overrides applied."""

    name: str
    arch: str
    model_kwargs: dict
    img_size: int
    pretrained: bool
    pretrained_file: str | None
    recipe: CollectConfig
    rpg: dict  # raw generator section (sizes resolved per variant)
    train: TrainConfig
    diffusion: DiffusionConfig
    samples: int  # generated models per variant
    sample_steps: int | tuple[int, ...] | None  # DDIM steps (a tuple: chosen on validation images)
    threads: int
    val_images: int
    bn_recompute_images: int
    baseline_samples: int | None


@dataclass(frozen=True)
class Variant:
    recurrent: str
    position: str
    permutation_state: bool
    runs: int
    token_size: int
    seed: int = 0  # replicate index (0: the setting's first generator)

    @property
    def id(self) -> str:
        perm = "perm" if self.permutation_state else "noperm"
        replicate = f"-seed{self.seed}" if self.seed else ""
        return f"{self.recurrent}-{self.position}-{perm}-runs{self.runs}-tok{self.token_size}{replicate}"

    @classmethod
    def parse(cls, text: str) -> "Variant":
        m = re.fullmatch(VARIANT_PATTERN, text)
        if m is None:
            raise ValueError(f"'{text}' is not a variant name (expected e.g. mamba-2d-perm-runs1-tok256 or "
                             "mamba-2d-perm-runs1-tok256-seed2)")
        rec, pos, perm, runs, tok, seed = m.groups()
        return cls(rec, pos, perm == "perm", int(runs), int(tok), int(seed or 0))

    def seed_of(self, base: int) -> int:
        """The seed this replicate's generator trains and samples from."""
        return base + SEED_STRIDE * self.seed


def arch_spec(cfg: Config, name: str, study: str = "main") -> ArchSpec:
    """The architecture `name` of `architectures.models` with the global collect / rpg / train / diffusion sections
    and the family's sampling and scoring keys applied under its own (and, for study "ablation",
    `architectures.ablations.train`). The schema has checked every override's keys."""
    if study not in STUDIES:
        raise ValueError(f"unknown study '{study}' (expected one of {', '.join(STUDIES)})")
    section = cfg.architectures
    if name not in section.models:
        raise ValueError(f"unknown architecture '{name}' (configured: {', '.join(section.models)})")
    entry = section.models[name]
    # canonicalise orders the hidden units of the task zoo's heads: whole models keep their own order, so the
    # top-level train.canonicalise neither applies here nor reruns these generators
    train = {"canonicalise": "none", **section.train, **entry.train,
             **(section.ablations.train if study == "ablation" else {})}
    return ArchSpec(
        name=name, arch=entry.arch, model_kwargs=dict(entry.model_kwargs), img_size=entry.img_size,
        pretrained=entry.pretrained, pretrained_file=entry.pretrained_file,
        recipe=dataclasses.replace(section.collect, **entry.collect), rpg={**section.rpg, **entry.rpg},
        train=dataclasses.replace(cfg.train, **{k: tuple(v) if isinstance(v, list) else v for k, v in train.items()}),
        diffusion=dataclasses.replace(cfg.diffusion, **entry.diffusion),
        **{key: section_or_entry(section, entry, key) for key in ARCH_MODEL_FAMILY_KEYS},
    )


def section_or_entry(section: Any, entry: Any, key: str) -> Any:
    """The entry's value of a family key, else the family's (a list read from YAML becomes a tuple)."""
    value = getattr(entry, key)
    value = getattr(section, key) if value is None else value
    return tuple(value) if isinstance(value, list) else value


def base_model_config(spec: ArchSpec, n_params: int) -> ModelConfig:
    """The architecture's generator setting (unconditional), preset chosen by parameter count for size: auto."""
    raw = dict(spec.rpg)
    if raw.get("size", "cpu_tiny") == "auto":
        raw["size"] = paper_size(n_params)
    return dataclasses.replace(resolve_model_config(raw), condition="none")


def main_variant(cfg: Config, name: str, n_params: int) -> Variant:
    """The Table 1 setting of an architecture, as a variant."""
    spec = arch_spec(cfg, name)
    m = base_model_config(spec, n_params)
    return Variant(m.recurrent, m.position, m.permutation_state, cfg.architectures.collect.runs, m.token_size)


def variant_model_config(spec: ArchSpec, variant: Variant, n_params: int) -> ModelConfig:
    return dataclasses.replace(base_model_config(spec, n_params), recurrent=variant.recurrent,
                               position=variant.position, permutation_state=variant.permutation_state,
                               token_size=variant.token_size)


def ablation_variants(cfg: Config, n_params: int) -> dict[str, list[tuple[str, Variant]]]:
    """family -> [(setting label, variant)] for the ablation architecture: each setting `ablations.seeds` times
    (replicates 0, 1, ... in order, under the same label)."""
    ab = cfg.architectures.ablations
    base = main_variant(cfg, ab.arch, n_params)
    rep = dataclasses.replace
    settings = {
        "recurrent": [(r, rep(base, recurrent=r)) for r in ab.recurrent],
        "position": [(p, rep(base, position=p)) for p in ab.position],
        "permutation": [(f"{'with' if on else 'without'} permutation state, {r} run{'s' * (r > 1)}",
                         rep(base, permutation_state=on, runs=r))
                        for r in ab.permutation_runs for on in (True, False)],
        "token_size": [(str(t), rep(base, token_size=t)) for t in ab.token_size],
    }
    return {family: [(label, rep(v, seed=k)) for label, v in rows for k in range(ab.seeds)]
            for family, rows in settings.items()}


def ablation_study(cfg: Config, name: str, variant: Variant, n_params: int) -> str:
    """The study whose generator an ablation variant of architecture `name` is: "main" when it is the Table 1
    generator itself (the row is in `architectures.table1`, the variant is its setting with replicate 0, and
    `architectures.ablations.train` leaves the row's training unchanged, e.g. `config/experiments/
    ablations_cnn_m.yaml`), so that the one generator is trained and scored once; "ablation" otherwise. Same seed,
    same settings, same files: the numbers are those the ablation would have trained."""
    if (name in cfg.architectures.table1 and variant == main_variant(cfg, name, n_params)
            and arch_spec(cfg, name, "ablation") == arch_spec(cfg, name, "main")):
        return "main"
    return "ablation"


def parameter_count(spec: ArchSpec) -> int:
    """Parameters of the architecture, built once on the meta device (shapes without weights: the paper's 86M ViT
    in ~0.1 s instead of ~3 s), without pretrained weights."""
    with torch.device("meta"):
        return count_parameters(build_model(spec.arch, spec.model_kwargs))


def architecture_sizes(cfg: Config) -> dict[str, int]:
    """Parameters of every entry of `architectures.models`, each built once: what the workflow checks when it
    loads its config, so that an architecture timm cannot build (an unknown name, a misspelt or wrong
    `model_kwargs` key) is one ConfigError naming the entry's key before any job starts, not a traceback in one.

    Raises:
        ConfigError: also for a `table1` name or the `ablations.arch` that is not an entry of `models`.
    """
    section = cfg.architectures
    for where, names in (("table1", section.table1), ("ablations.arch", [section.ablations.arch])):
        unknown = [n for n in names if n not in section.models]
        if unknown:
            raise ConfigError(f"config error at architectures.{where}: {', '.join(map(repr, unknown))} is not an "
                              f"entry of architectures.models (configured: {', '.join(section.models)})")
    sizes = {}
    for name in section.models:
        spec = arch_spec(cfg, name)
        try:
            sizes[name] = parameter_count(spec)
        except Exception as err:  # a model's constructor raises what it likes for arguments it refuses
            if not timm.is_model(spec.arch):
                raise ConfigError(f"config error at architectures.models.{name}.arch: {err}") from err
            raise ConfigError(f"config error at architectures.models.{name}.model_kwargs: {spec.arch} cannot be "
                              f"built with {spec.model_kwargs}: {type(err).__name__}: {err}") from err
    return sizes


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ImageData:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val: ImageEvaluator
    test: ImageEvaluator


def load_image_data(cfg: Config, spec: ArchSpec, device: torch.device) -> ImageData:
    """Training images minus the held-out validation images (`data.val_images`, seeded as the zoo's), the first
    `spec.val_images` of those for validation, and the full test set, at the architecture's input size."""
    data = load_cifar10(cfg.data.root, download=cfg.data.download)
    train_idx, val_idx = split_train_val(data, cfg.data.val_images, cfg.seed)
    val_idx = val_idx[: spec.val_images]
    return ImageData(
        data.train_images[train_idx], data.train_labels[train_idx],
        ImageEvaluator(data.train_images[val_idx], data.train_labels[val_idx], img_size=spec.img_size, device=device),
        ImageEvaluator(data.test_images, data.test_labels, img_size=spec.img_size, device=device),
    )


def run_seed(cfg: Config, run: int) -> int:
    return cfg.seed + 1000 * (run + 1)


# ----------------------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------------------


def collect_run(cfg: Config, name: str, run: int, out_dir: str | Path,
                init_file: str | Path | None = None) -> pd.DataFrame:
    """Train run `run` of architecture `name` and save its checkpoint collection to `out_dir`.

    init_file: the backbone rule's weights, for an architecture collected with ``collect.init_from: backbone``.
    """
    spec = arch_spec(cfg, name)
    device = resolve_device(cfg.device)
    init_state = None
    if spec.recipe.init_from == "backbone":
        if init_file is None:
            raise ValueError(f"architecture '{name}' is collected from the backbone (collect.init_from: backbone): "
                             "pass the backbone rule's weights")
        init_state = load_safetensors(init_file)[0]
        template = build_model(spec.arch, spec.model_kwargs).state_dict()
        if {k: tuple(v.shape) for k, v in template.items()} != {k: tuple(v.shape) for k, v in init_state.items()}:
            raise ValueError(f"the backbone {init_file} does not fit architecture '{name}' ({spec.arch} with "
                             f"{spec.model_kwargs}): set its arch / model_kwargs to backbone.arch and its feature_dim")
    data = load_image_data(cfg, spec, device)
    return train_collection(data.train_images, data.train_labels, arch=spec.arch, model_kwargs=spec.model_kwargs,
                            recipe=spec.recipe, seed=run_seed(cfg, run), out_dir=out_dir,
                            evaluators={"test": data.test}, img_size=spec.img_size, pretrained=spec.pretrained,
                            pretrained_file=spec.pretrained_file, device=device, run=run,
                            progress=cfg.logging.progress, init_state=init_state)


def variant_collection(spec: ArchSpec, run_dirs: Sequence[str | Path], runs: int) -> list[Path]:
    """The checkpoint files a variant of `runs` training runs learns from: the first `runs` of `run_dirs`."""
    if len(run_dirs) < runs:
        raise ValueError(f"the variant needs {runs} training runs, got {len(run_dirs)} collections")
    n = spec.recipe.n_checkpoints
    return collection_files(list(run_dirs)[:runs], n, n)


def train_variant(cfg: Config, name: str, variant_id: str, run_dirs: Sequence[str | Path], out_dir: str | Path,
                  study: str = "main") -> dict:
    """Train the generator of `variant_id` on the first `runs` collections of architecture `name`."""
    spec = arch_spec(cfg, name, study)
    variant = Variant.parse(variant_id)
    device = resolve_device(cfg.device)
    files = variant_collection(spec, run_dirs, variant.runs)
    state_dicts = [load_safetensors(f)[0] for f in files]
    n_params = sum(v.numel() for v in state_dicts[0].values() if v.is_floating_point())
    template = build_model(spec.arch, spec.model_kwargs).to(device)  # scores generated weights
    model_cfg = variant_model_config(spec, variant, count_parameters(template))
    data = load_image_data(cfg, spec, device)
    tracker = start_tracking(cfg.logging, name=f"{study}-{name}-{variant_id}", group="table1", job_type="train_rpg",
                             config={"architecture": name, "variant": variant_id, "study": study, **cfg.raw},
                             directory=Path(cfg.results_dir) / "wandb")
    summary = train_on_collection(
        state_dicts, out_dir, model_cfg=model_cfg, diffusion_cfg=spec.diffusion, train_cfg=spec.train,
        seed=variant.seed_of(cfg.seed), device=device, score_fn=data.val.state_dict_scorer(template),
        names=[str(f) for f in files], tracker=tracker,
        progress=cfg.logging.progress, force=True)  # the workflow's config decides: a new step count retrains
    tracker.finish()
    summary = {**summary, "architecture": name, "variant": variant_id, "study": study, "n_state_dict_params": n_params,
               "collection": [str(f) for f in files]}
    write_json_atomic(Path(out_dir) / "summary.json", summary)
    return summary


def generate_variant(cfg: Config, name: str, variant_id: str, rpg_path: str | Path, run_dirs: Sequence[str | Path],
                     out_dir: str | Path, study: str = "main") -> pd.DataFrame:
    """Sample `spec.samples` models, save them ready to load, and score them and the originals (test set).

    Writes ``samples.csv`` (kind original / rpg / a baseline of `baselines.BASELINES`, accuracy and the novelty
    columns l2_novelty, max_iou_original, l2_spread: see rpg.experiments.arch_study.baselines) and
    ``models/{i:02d}.safetensors`` (weights plus the architecture metadata
    `rpg.vision.architectures.model_from_metadata` rebuilds them from). The baselines cost one test-set evaluation
    per collection checkpoint (for the mistake overlap) and 3 x `spec.baseline_samples` more.
    """
    spec = arch_spec(cfg, name, study)
    variant = Variant.parse(variant_id)
    device = resolve_device(cfg.device)
    data = load_image_data(cfg, spec, device)
    model, tokenizer, diffusion_cfg, meta = load_rpg(rpg_path, device)
    seed = variant.seed_of(cfg.seed)
    template = build_model(spec.arch, spec.model_kwargs).to(device)
    sds, gen_seconds, diffusion_cfg, steps_val = sample_with_chosen_steps(
        cfg, spec, model, tokenizer, diffusion_cfg, seed, data.val.state_dict_scorer(template))

    files = variant_collection(spec, run_dirs, variant.runs)
    arch_meta = {k: v for k, v in read_safetensors_metadata(files[0]).items()
                 if k in ("arch", "model_kwargs", "img_size", "num_classes")}
    models_dir = Path(out_dir) / "models"
    for i, sd in enumerate(sds):
        save_safetensors_atomic(sd, models_dir / f"{i:02d}.safetensors",
                                {**arch_meta, "generator": str(rpg_path), "sample": i})
    # the checkpoints scored on the test set when collected (collect.score_every): the "original" rows
    scored = [i for i, f in enumerate(files) if "test_accuracy" in read_safetensors_metadata(f)]
    variants = {}
    n_bn = spec.bn_recompute_images
    if n_bn > 0 and has_batchnorm(template):
        variants[RPG_BN_RECOMPUTED] = bn_recomputed(template, sds, data, n_bn, seed=seed + 37)
    pred_files = [files[i].with_name(predictions_name(int(files[i].stem))) for i in scored]
    scored_preds = (torch.stack([load_safetensors(f)[0]["test"] for f in pred_files])
                    if all(f.is_file() for f in pred_files) else None)
    table, baseline_settings = compare_with_collection(
        [load_safetensors(f)[0] for f in files], sds, data.test.state_dict_predictor(template), data.test.labels,
        seed=seed + 31, scored=scored, n_baseline=spec.baseline_samples, variants=variants,
        scored_preds=scored_preds)
    table = _with_sources(table, [files[i] for i in scored], models_dir)
    table["architecture"], table["variant"] = name, variant_id
    write_json_atomic(Path(out_dir) / "summary.json", {
        "training": read_json(Path(rpg_path).parent / "summary.json"), "seconds_per_model": gen_seconds,
        "baselines": baseline_settings, "bn_recompute_images": n_bn if variants else 0,
        "sampler": diffusion_cfg.sampler,
        "sample_steps": diffusion_cfg.sample_steps if diffusion_cfg.sampler == "ddim" else diffusion_cfg.timesteps,
        "sample_steps_val_accuracy": steps_val, "mode": cfg.generate.mode, "peak_rss_mb": peak_rss_mb(),
        "rpg_step": meta.get("step")})
    write_csv_atomic(Path(out_dir) / "samples.csv", table)
    return table


def sample_with_chosen_steps(cfg: Config, spec: ArchSpec, model: RPG, tokenizer: Tokenizer,
                             diffusion_cfg: DiffusionConfig, seed: int, val_score: Callable[[StateDict], float]
                             ) -> tuple[list[StateDict], float, DiffusionConfig, dict[int, float]]:
    """`spec.samples` models sampled with `spec.sample_steps` DDIM steps; given a list, the step
    count whose models score best on the held-out validation images (the first of the list on a tie, so list the
    cheapest first). Returns the models, seconds per model at the chosen count, the diffusion settings used and the
    validation accuracy (%) of the mean model per candidate ({} without a choice).

    Why choose: the right count depends on the network (measured with the same generators: DDIM-50 is 2.6 / 0.7
    points better than DDIM-10 on the average CNN model, 2.3 points worse on the ViT's; README), and choosing it on
    the test images would report a tuned number. Every candidate starts from the same noise (`sample_variant`)."""
    setting = spec.sample_steps
    choose = isinstance(setting, (tuple, list)) and diffusion_cfg.sampler == "ddim"
    if not choose:  # one count: the configured int, else the generator's own (null, or a list under DDPM)
        diffusion_cfg = with_sample_steps(diffusion_cfg, setting if isinstance(setting, int) else None)
        sds, seconds = sample_variant(cfg, spec, model, tokenizer, diffusion_cfg, seed)
        return sds, seconds, diffusion_cfg, {}
    scores: dict[int, float] = {}
    best: tuple[float, list[StateDict], float, DiffusionConfig] | None = None  # only the best models are kept
    for steps in map(int, setting):
        candidate_cfg = with_sample_steps(diffusion_cfg, steps)
        sds, seconds = sample_variant(cfg, spec, model, tokenizer, candidate_cfg, seed)
        scores[steps] = 100.0 * sum(val_score(sd) for sd in sds) / len(sds)
        if best is None or scores[steps] > best[0]:
            best = (scores[steps], sds, seconds, candidate_cfg)
    assert best is not None  # the schema requires at least one candidate
    return best[1], best[2], best[3], scores


def with_sample_steps(diffusion_cfg: DiffusionConfig, sample_steps: int | None) -> DiffusionConfig:
    """The generator's diffusion settings sampling with `sample_steps` DDIM steps (None, or a DDPM sampler: as
    trained)."""
    if sample_steps is None or diffusion_cfg.sampler != "ddim":
        return diffusion_cfg
    return dataclasses.replace(diffusion_cfg, sample_steps=sample_steps)


def sample_variant(cfg: Config, spec: ArchSpec, model: RPG, tokenizer: Tokenizer,
                   diffusion_cfg: DiffusionConfig, seed: int) -> tuple[list[StateDict], float]:
    """`spec.samples` state dicts from a loaded generator, and the wall seconds per model.

    The initial noise depends on `seed` only, so two step counts (or two runs) start from the same noise."""
    n = spec.samples
    start = time.perf_counter()
    sds = sample_models(model, tokenizer, diffusion_cfg, n, seed=seed + 29, mode=cfg.generate.mode,
                        tokens_per_call=cfg.generate.tokens_per_call, amp=spec.train.amp)
    return sds, (time.perf_counter() - start) / n


def bn_recomputed(template: torch.nn.Module, state_dicts: Sequence[dict[str, torch.Tensor]], data: ImageData,
                  n_images: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The state dicts with their BatchNorm running statistics recomputed on `n_images` random training images."""
    pick = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(seed))[:n_images]
    images, out = data.train_images[pick], []
    for sd in state_dicts:
        template.load_state_dict(dict(sd), strict=True)
        recompute_batchnorm_statistics(template, images, data.test.prepare)
        out.append({k: v.detach().cpu().clone() for k, v in template.state_dict().items()})
    return out


def _with_sources(table: pd.DataFrame, files: Sequence[Path], models_dir: Path) -> pd.DataFrame:
    """Add run and file to the rows of `compare_with_collection`; an original's accuracy is the one measured when
    it was collected (its metadata; the same evaluator), baselines have no file (run -1). `files`: the scored
    originals, in the order of their rows."""
    table = table.copy()
    table["run"], table["file"] = -1, ""
    orig = (table[KIND] == KIND_ORIGINAL).to_numpy()
    meta = [read_safetensors_metadata(f) for f in files]
    table.loc[orig, "run"] = [int(m["run"]) for m in meta]
    table.loc[orig, "file"] = [str(f) for f in files]
    table.loc[orig, ACCURACY] = [float(m["test_accuracy"]) for m in meta]
    gen = (table[KIND] == KIND_RPG).to_numpy()
    table.loc[gen, "file"] = [str(models_dir / f"{i:02d}.safetensors") for i in table.loc[gen, "index"]]
    return table[[KIND, "index", "run", "file", ACCURACY, L2_NOVELTY, MAX_IOU_ORIGINAL, L2_SPREAD]]


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def summarise_variant(samples_csv: str | Path) -> dict[str, Any]:
    """One table row from a variant's samples.csv and the summary.json beside it (generation + training)."""
    samples = pd.read_csv(samples_csv)
    timing = read_json(Path(samples_csv).with_name("summary.json"))
    train = timing["training"]
    name, variant = samples["architecture"].iloc[0], samples["variant"].iloc[0]
    orig = samples.loc[samples[KIND] == KIND_ORIGINAL, ACCURACY] * 100
    gen = samples.loc[samples[KIND] == KIND_RPG, ACCURACY] * 100
    return {
        "architecture": name, "variant": variant, "params": int(train["n_params_generated"]),
        "tokens": int(train["n_tokens"]), "token_size": int(train["token_size"]),
        **{acc_column(KIND_ORIGINAL, stat): value for stat, value in zip(STATS, (orig.max(), orig.mean(), orig.min()))},
        **{acc_column(KIND_RPG, stat): value for stat, value in zip(STATS, (gen.max(), gen.mean(), gen.min()))},
        "n_original": len(orig), "n_samples": len(gen),
        GAP_BEST: orig.max() - gen.max(), GAP_MEAN: orig.mean() - gen.mean(),
        "sampler": timing["sampler"], "sample_steps": int(timing["sample_steps"]),
        # the candidates' validation accuracy (%) when architectures.sample_steps is a list, e.g. "10:49.1 50:50.2"
        "sample_steps_val": " ".join(f"{k}:{v:.2f}" for k, v in timing.get("sample_steps_val_accuracy", {}).items()),
        "train_steps": int(train["steps"]), "best_step": int(train["best_step"]),
        "max_steps": train.get("max_steps"), "hit_max_steps": train.get("hit_max_steps"),
        "stopped_early": train.get("stopped_early"),
        "train_seconds": float(train["seconds"]), "train_peak_rss_mb": float(train["peak_rss_mb"]),
        "generator_params": int(train["generator_params"]),
        "seconds_per_model": float(timing["seconds_per_model"]),
        **(summary_columns(samples) if L2_NOVELTY in samples.columns else {}),
    }


def _write_table(cfg: Config, rows: list[dict[str, Any]], out_csv: str | Path) -> pd.DataFrame:
    """The table and, beside it, the resolved config that produced it (`<name>.config.yaml`)."""
    table = pd.DataFrame(rows).round(4)
    write_csv_atomic(out_csv, table)
    write_text_atomic(Path(out_csv).with_suffix(".config.yaml"), config_to_yaml(cfg))
    return table


def write_table1(cfg: Config, samples_csvs: Sequence[str | Path], out_csv: str | Path) -> pd.DataFrame:
    """table1.csv: one row per architecture (its Table 1 variant)."""
    return _write_table(cfg, [summarise_variant(p) for p in samples_csvs], out_csv)


# Columns of an ablation row given as the mean over the setting's replicates with their standard deviation beside.
REPLICATE_STD_COLUMNS = (*(acc_column(KIND_RPG, stat) for stat in STATS), GAP_BEST, GAP_MEAN, "best_step",
                         "train_seconds")


def write_ablation(cfg: Config, family: str, labels: Sequence[str], samples_csvs: Sequence[str | Path],
                   out_csv: str | Path, replicates_csv: str | Path) -> pd.DataFrame:
    """ablations/<family>.csv: one row per setting of the family, its numbers the mean over the setting's replicates
    (`architectures.ablations.seeds`; `n_seeds`, and `<column>_std` for REPLICATE_STD_COLUMNS, the sample standard
    deviation, NaN for one replicate). Every replicate's own row goes to `replicates_csv`."""
    if len(labels) != len(samples_csvs):
        raise ValueError(f"{len(labels)} labels for {len(samples_csvs)} variants")
    per_seed = pd.DataFrame([{"family": family, "setting": label, **summarise_variant(p)}
                             for label, p in zip(labels, samples_csvs)])
    write_csv_atomic(replicates_csv, per_seed.round(4))
    rows = []
    for label in dict.fromkeys(labels):  # the settings in their configured order
        group = per_seed[per_seed.setting == label]
        row = {column: (group[column].mean() if pd.api.types.is_numeric_dtype(group[column])
                        and not pd.api.types.is_bool_dtype(group[column]) else group[column].iloc[0])
               for column in group.columns}
        row["variant"] = " ".join(group.variant)
        row["n_seeds"] = len(group)
        row.update({f"{column}_std": group[column].std() for column in REPLICATE_STD_COLUMNS})
        row["hit_max_steps"] = bool(group.hit_max_steps.fillna(False).any())
        rows.append(row)
    return _write_table(cfg, rows, out_csv)
