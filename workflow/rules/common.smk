# Config validation (schema in rpg/config.schema.yaml fills defaults and names bad keys), regimes, paths and input
# functions.
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError

from rpg.config import ConfigError, config_from_dict, validate_config
from rpg.experiments.rules import config_setting
from rpg.experiments.task_zoo import study as ST

try:
    config.update(validate_config(config))
except ConfigError as err:
    raise WorkflowError(f"invalid configuration:\n{err}")

CFG = config_from_dict(config)
EXP = CFG.experiment
RES = CFG.results_dir
GPU = 1 if CFG.device == "cuda" else 0
# The default profile is the regime named by `experiment`; the study's regimes (study.regimes) are the others. The
# task-zoo rules take a regime as a wildcard and run on its config (rpg.experiments.task_zoo.study.Regimes).
REGIMES = ST.Regimes(config)


wildcard_constraints:
    experiment=r"[A-Za-z0-9_.-]+",
    regime="|".join(map(re.escape, REGIMES.names)),
    zoo=re.escape(EXP) + r"|[a-z_]+_[0-9a-f]{8}",  # the experiment's own zoo, or a study zoo (study.zoo_key)
    domains=r"domains_[0-9a-f]{8}",
    results_dir="|".join(re.escape(REGIMES.results_dir(name)) for name in REGIMES.names),
    table=r"table11|table16|table12|seen_summary",
    task=r"\d{4}",


def _of(wildcard):
    return EXP if wildcard is None else f"{{{wildcard}}}"


def at(stage, key, name):
    """results/<stage>/<key>/<name>: key is the experiment, a regime, a zoo or a domain-features folder."""
    return f"{RES}/{stage}/{key}/{name}"


def out(stage, name, of=None):
    """results/<stage>/<experiment>/<name>; of: a wildcard in place of the experiment (regime, zoo, domains)."""
    return at(stage, _of(of), name)


def logfile(name, of=None):
    return f"{RES}/logs/{_of(of)}/{name}.log"


def benchfile(name, of=None):
    return f"{RES}/benchmarks/rules/{_of(of)}/{name}.tsv"


def cifar10_input(wildcards):
    """The CIFAR-10 archive (or extracted folder); a clear error when it is missing and downloads are off."""
    root = Path(CFG.data.root)
    for candidate in (root / "cifar-10-python.tar.gz", root / "cifar-10-batches-py"):
        if candidate.exists():
            return str(candidate)
    if CFG.data.download:
        return []
    raise WorkflowError(
        f"CIFAR-10 not found under '{root}/'. Copy cifar-10-python.tar.gz there "
        f"(on the project machines: cp ../shared/data/cifar-10-python.tar.gz {root}/), "
        "or set data.download: true where the internet is reachable."
    )


# The default profile's files (the analyses read them)
FEATURES = out("features", "features.safetensors")
ZOO_INDEX = out("zoo", "index.csv")
SPLIT = out("zoo", "split.json")


def job_config(wildcards):
    """The config dict of the job's regime (the workflow's own for the default profile)."""
    try:
        return REGIMES.job_config(wildcards)
    except ValueError as err:
        raise WorkflowError(str(err))


def regime_setting(*keys):
    """params: the values of the job's regime config that a rule depends on (see `setting`)."""
    return lambda wildcards: config_setting(job_config(wildcards), *keys)


def regime_file(stage, name):
    """Input function: results/<stage>/<regime>/<name> of the job's regime (`REGIMES.owner` of its wildcards)."""
    return lambda wildcards: at(stage, REGIMES.owner(wildcards), name)


def zoo_index(wildcards):
    """The regime's zoo: the experiment's own when its zoo settings are the same, else a shared study zoo."""
    return at("zoo", REGIMES.zoo(REGIMES.owner(wildcards)), "index.csv")


def regime_features(wildcards):
    """The features the regime's heads are trained and scored on: the workflow's, or its domain features."""
    domains = REGIMES.domains(REGIMES.owner(wildcards))
    return (
        FEATURES if domains is None else at("features", domains, "features.safetensors")
    )


def finetuned_checkpoints(wildcards):
    from rpg.experiments.task_zoo.pipeline import configured_task_ids

    cfg = config_from_dict(job_config(wildcards), validated=True)
    return [
        at("zoo", wildcards.zoo, f"checkpoints/{t:04d}_{k}.safetensors")
        for t in configured_task_ids(cfg)
        for k in range(cfg.zoo.n_checkpoints)
    ]


def evaluation_inputs(wildcards):
    """What scoring generated models needs: cached features (heads) or the images (full models)."""
    if CFG.zoo.mode == "batched_heads":
        return {"features": regime_features(wildcards)}
    return {"images": cifar10_input(wildcards)}


all_targets = [
    f"{RES}/table11.csv",
    f"{RES}/table16.csv",
    f"{RES}/table12.csv",
    f"{RES}/seen_summary.csv",
]


# ----------------------------------------------------------------------------------------------------------------
# Table 1 family (rules/table1.smk): architectures, variants, ablations
# ----------------------------------------------------------------------------------------------------------------
from rpg.experiments.arch_study import study as AX

ARCH_RES = f"{RES}/table1"

# Every configured architecture built once, now: one that timm cannot build fails here, naming its config key.
try:
    _N_PARAMS = AX.architecture_sizes(CFG)
except ConfigError as err:
    raise WorkflowError(f"invalid configuration:\n{err}")


def n_params(name):
    return _N_PARAMS[name]


def main_variant(name):
    return AX.main_variant(CFG, name, n_params(name)).id


def ablation_variants():
    name = CFG.architectures.ablations.arch
    return name, AX.ablation_variants(CFG, n_params(name))


def arch_samples(study, name, variant):
    return f"{ARCH_RES}/{study}/generated/{name}/{variant}/samples.csv"


def collection_runs(wildcards):
    runs = AX.Variant.parse(wildcards.variant).runs
    return [f"{ARCH_RES}/collections/{wildcards.arch}/run{r}" for r in range(runs)]


def collect_init(wildcards):
    """The backbone rule's weights for an architecture collected with collect.init_from: backbone (else none)."""
    if AX.arch_spec(CFG, wildcards.arch).recipe.init_from == "backbone":
        return [out("backbone", "backbone.safetensors")]
    return []


def collect_setting(wildcards):
    """What a collection depends on (a change re-trains it): architecture, data split and recipe."""
    spec = AX.arch_spec(CFG, wildcards.arch)
    return repr(
        (
            spec.arch,
            spec.model_kwargs,
            spec.img_size,
            spec.pretrained,
            spec.recipe,
            CFG.data,
            CFG.seed,
        )
    )


def generator_setting(wildcards):
    """What a generator depends on beyond its collection: its config, the diffusion settings and the validation
    images that pick its best step."""
    spec = AX.arch_spec(CFG, wildcards.arch, wildcards.study)
    return repr(
        (
            spec.rpg,
            spec.train,
            spec.diffusion,
            CFG.generate,
            spec.samples,
            spec.val_images,
        )
    )


def generation_setting(wildcards):
    """What sampling a generator's models depends on beyond the generator: its setting, the DDIM steps
    (architectures.sample_steps) and how the models and baselines are scored (generation-only keys: they rerun
    no training)."""
    spec = AX.arch_spec(CFG, wildcards.arch, wildcards.study)
    return repr(
        (
            generator_setting(wildcards),
            spec.sample_steps,
            spec.bn_recompute_images,
            spec.baseline_samples,
        )
    )


def arch_threads(wildcards):
    """Threads of an architecture's jobs (architectures.threads, or its own entry's)."""
    return AX.arch_spec(CFG, wildcards.arch).threads


def ablation_inputs(wildcards):
    name, families = ablation_variants()
    n = n_params(name)
    return [arch_samples(AX.ablation_study(CFG, name, v, n), name, v.id) for _, v in families[wildcards.family]]


def ablation_labels(wildcards):
    return [label for label, _ in ablation_variants()[1][wildcards.family]]


def setting(*keys):
    """params: the resolved config values a rule depends on (a change reruns it and everything downstream)."""
    return config_setting(config, *keys)


def study_samples(wildcards):
    """Per regime of study.regimes: its samples.csv (rule generate), then one per study method, in that order."""
    return [
        path
        for regime in CFG.study.regimes
        for path in [
            at("generated", regime, "samples.csv"),
            *(f"{RES}/methods/{regime}/{key}/samples.csv" for key in STUDY_METHODS),
        ]
    ]


# The regime of RPG-initialised fine-tuning with few labels (rule study_finetune_few).
FINETUNE_FEW_REGIME = CFG.study.finetune_few.regime


def finetune_few_dir(wildcards=None):
    """The results folder of study.finetune_few.regime, which must be a regime of study.regimes."""
    if FINETUNE_FEW_REGIME not in CFG.study.regimes:
        raise WorkflowError(
            f"study.finetune_few.regime '{FINETUNE_FEW_REGIME}' is not in study.regimes "
            f'(e.g. --config "study={{regimes: [{FINETUNE_FEW_REGIME}]}}")'
        )
    return REGIMES.results_dir(FINETUNE_FEW_REGIME)
