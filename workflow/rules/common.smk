# Config validation (schema in rpg/config.schema.yaml fills defaults and names bad keys), paths and input functions.
from pathlib import Path

from snakemake.exceptions import WorkflowError

from rpg.config import ConfigError, config_from_dict, validate_config
from rpg.experiments.rules import config_setting

try:
    config.update(validate_config(config))
except ConfigError as err:
    raise WorkflowError(f"invalid configuration:\n{err}")

CFG = config_from_dict(config)
EXP = CFG.experiment
RES = CFG.results_dir
GPU = 1 if CFG.device == "cuda" else 0


wildcard_constraints:
    experiment=r"[A-Za-z0-9_.-]+",


def out(stage, name):
    """results/<stage>/<experiment>/<name>"""
    return f"{RES}/{stage}/{EXP}/{name}"


def logfile(name):
    return f"{RES}/logs/{EXP}/{name}.log"


def benchfile(name):
    return f"{RES}/benchmarks/rules/{EXP}/{name}.tsv"


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


FEATURES = out("features", "features.safetensors")
ZOO_INDEX = out("zoo", "index.csv")
SPLIT = out("zoo", "split.json")


wildcard_constraints:
    task=r"\d{4}",


def task_ids():
    from rpg.experiments.task_zoo.pipeline import configured_task_ids

    return configured_task_ids(CFG)


def finetuned_checkpoints(wildcards):
    return [
        out("zoo", f"checkpoints/{t:04d}_{k}.safetensors")
        for t in task_ids()
        for k in range(CFG.zoo.n_checkpoints)
    ]


def evaluation_inputs(wildcards):
    """What scoring generated models needs: cached features (heads) or the images (full models)."""
    if CFG.zoo.mode == "batched_heads":
        return {"features": FEATURES}
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

_N_PARAMS = {}


def n_params(name):
    if name not in _N_PARAMS:
        _N_PARAMS[name] = AX.parameter_count(AX.arch_spec(CFG, name))
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
    return [arch_samples("ablation", name, v.id) for _, v in families[wildcards.family]]


def ablation_labels(wildcards):
    return [label for label, _ in ablation_variants()[1][wildcards.family]]


def setting(*keys):
    """params: the resolved config values a rule depends on (a change reruns it and everything downstream)."""
    return config_setting(config, *keys)


# ----------------------------------------------------------------------------------------------------------------
# Study of regimes (rules/study.smk, issue 13): each regime's config, and which zoo it uses
# ----------------------------------------------------------------------------------------------------------------
from rpg.experiments.task_zoo import study as ST

STUDY = f"{RES}/study"
_REGIME_CFG = {}


wildcard_constraints:
    regime=r"[A-Za-z0-9_]+",
    zookey=r"[a-z_]+_[0-9a-f]{8}",
    fkey=r"[0-9a-f]{8}",


def regime_cfg(name):
    if name not in _REGIME_CFG:
        _REGIME_CFG[name] = ST.regime_config(config, name)
    return _REGIME_CFG[name]


def regime_index(wildcards):
    """The regime's zoo index: the workflow's own zoo when its zoo settings are the same, else study/zoos/<key>/."""
    key = ST.zoo_key(config, regime_cfg(wildcards.regime))
    return ZOO_INDEX if key is None else f"{STUDY}/zoos/{key}/index.csv"


def zoo_owner(key):
    """The first regime whose zoo is study/zoos/<key>/ (its config builds that zoo)."""
    for name in CFG.study.regimes:
        if ST.zoo_key(config, regime_cfg(name)) == key:
            return name
    raise WorkflowError(f"no regime of study.regimes has zoo '{key}'")


def features_of(regime):
    """The features a regime's heads are trained and scored on: the workflow's, or its domain features."""
    key = ST.domain_features_key(regime_cfg(regime))
    return (
        FEATURES
        if key is None
        else f"{STUDY}/domain_features/{key}/features.safetensors"
    )


def regime_features(wildcards):
    return features_of(wildcards.regime)


def zoo_features(wildcards):
    return features_of(zoo_owner(wildcards.zookey))


def features_owner(key):
    """The first regime whose domain features are study/domain_features/<key>/."""
    for name in CFG.study.regimes:
        if ST.domain_features_key(regime_cfg(name)) == key:
            return name
    raise WorkflowError(f"no regime of study.regimes has domain features '{key}'")


def regime_setting(*keys, zoo=False):
    """params: the regime's config values a study rule depends on (see `setting`)."""
    if zoo:
        return lambda wc: config_setting(regime_cfg(zoo_owner(wc.zookey)), *keys)
    return lambda wc: config_setting(regime_cfg(wc.regime), *keys)
