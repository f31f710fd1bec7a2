"""The study of regimes (issue 13): what generation adds over the baselines, regime by regime.

A regime is the workflow's config plus `study.common` (the study's smaller budget) plus
`<study.regime_dir>/<name>.yaml` (which may name a `base:` regime file to start from); it reuses the workflow's
backbone and cached features (a regime may not change `data`, `backbone` or `seed`) and runs through the default
DAG's rules, its name the rules' `regime` wildcard (`Regimes`): `<results_dir>/<stage>/<name>/`, its tables under
`<results_dir>/study/<name>/`. Regimes whose zoo settings agree share one zoo: the workflow's own zoo when they equal
its settings, else `<results_dir>/zoo/<key>/`. `gather_study` turns every regime's scored models into one long
table, `unseen_study.csv`: one row per regime x task group (unseen / seen) x method (the originals, RPG, each
baseline and each method of `study.methods`, `rpg.experiments.task_zoo.methods`), with plain and balanced accuracy
of the best and the mean of each task's heads in percent, the gap to the originals, and the heads' novelty.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from rpg.config import deep_update, read_config_file, validate_config
from rpg.evaluation import (ACCURACY, BALANCED_ACCURACY, KIND, KIND_ORIGINAL, KIND_RPG, NOVELTY, best_baseline,
                            best_baseline_column, minus_baseline_column)
from rpg.experiments.rules import NEUTRAL_DEFAULTS
from rpg.experiments.task_zoo.baselines import BASELINES
from rpg.experiments.task_zoo.tasks import split_task_id
from rpg.utils import write_csv_atomic

SHARED_KEYS = ("data", "backbone", "seed")  # what the regimes share with the workflow (its backbone and features)
ZOO_KEYS = ("seed", "tasks.ids", "zoo", "domains")  # what a zoo depends on (the zoo rule's setting)


def _get(raw: Mapping, dotted: str):
    value = raw
    for part in dotted.split("."):
        value = value[part]
    return value


def regime_overrides(regime_dir: str | Path, name: str, _seen: tuple[str, ...] = ()) -> dict:
    """The overrides of regime file `<regime_dir>/<name>.yaml`. A file may start from another regime's with
    `base: <regime>` (e.g. one-change variants of `domains_few`); its own keys override the base's.

    Raises:
        ValueError: the bases form a cycle.
    """
    if name in _seen:
        raise ValueError(f"regime files form a cycle of bases: {' -> '.join((*_seen, name))}")
    own = read_config_file(Path(regime_dir) / f"{name}.yaml")
    parent = own.pop("base", None)
    return deep_update(regime_overrides(regime_dir, parent, (*_seen, name)), own) if parent else own


def regime_results_dir(base: Mapping, name: str) -> str:
    """Where regime `name` keeps its tables: `<results_dir>/study/<name>` (the workflow's own for its experiment)."""
    return base["results_dir"] if name == base["experiment"] else str(Path(base["results_dir"]) / "study" / name)


def regime_config(base: Mapping, name: str) -> dict:
    """The validated, complete config dict of regime `name` (see the module docstring).

    Args:
        base: the workflow's validated config dict (Snakemake's `config`).
    Raises:
        ValueError: the regime changes a key it must share with the workflow (`SHARED_KEYS`).
    """
    study = base["study"]
    if name not in study["regimes"]:
        raise ValueError(f"unknown regime '{name}' (study.regimes: {', '.join(study['regimes'])})")
    raw = copy.deepcopy(dict(base))
    if study.get("common"):
        raw = deep_update(raw, read_config_file(study["common"]))
    raw = deep_update(raw, regime_overrides(study["regime_dir"], name))
    raw["experiment"] = f"{base['experiment']}_study_{name}"
    raw["results_dir"] = regime_results_dir(base, name)
    full = validate_config(raw)
    for key in SHARED_KEYS:
        if _get(full, key) != _get(base, key):
            raise ValueError(f"regime '{name}' changes '{key}': the regimes reuse the workflow's backbone and features")
    return full


def zoo_key(base: Mapping, regime: Mapping) -> str | None:
    """None when the regime's zoo is the workflow's own; else the name of its zoo folder under zoo/:
    `<zoo.init>_<hash of the zoo settings>`."""
    def settings(cfg: Mapping) -> dict:  # `domains` only where set, so that other zoos keep their keys
        return {key: _get(cfg, key) for key in ZOO_KEYS
                if key not in NEUTRAL_DEFAULTS or _get(cfg, key) != NEUTRAL_DEFAULTS[key]}

    own = settings(regime)
    if own == settings(base):
        return None
    digest = hashlib.sha1(json.dumps(own, sort_keys=True, default=str).encode()).hexdigest()[:8]
    prefix = "domains_" if regime["domains"]["names"] else ""
    return f"{prefix}{regime['zoo']['init']}_{digest}"


def domain_features_key(regime: Mapping) -> str | None:
    """None for a regime without domain tasks (it reads the workflow's features); else the key of its domain
    features (folder features/domains_<key>/): a hash of what they depend on (domains and image counts, not the
    class sets), so regimes that differ only in their tasks share one extraction."""
    dom = regime["domains"]
    if not dom["names"]:
        return None
    settings = {k: v for k, v in dom.items() if k != "class_sets"}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


class Regimes:
    """The workflow's regimes, for its rules (workflow/rules/common.smk) and their scripts: the default profile is
    the regime named by `experiment` (the workflow's own config), every name of `study.regimes` another.

    A job names its regime by a wildcard: `regime`; or `zoo`, a zoo folder (the experiment's own, or a `zoo_key`
    shared by the regimes with those zoo settings); or `domains`, a folder of domain features
    (`domains_<domain_features_key>`); or `results_dir`, the folder of a regime's tables (`regime_results_dir`).
    Its config is that of the first regime (in this order) with that value.
    """

    def __init__(self, base: Mapping):
        self.base = base
        self.default = base["experiment"]
        if self.default in base["study"]["regimes"]:
            raise ValueError(f"study.regimes names the experiment '{self.default}' (the default profile's regime)")
        self.names = [self.default, *base["study"]["regimes"]]
        self._configs = {self.default: dict(base)}

    def config(self, name: str) -> dict:
        """The validated config dict of regime `name` (cached)."""
        if name not in self._configs:
            self._configs[name] = regime_config(self.base, name)
        return self._configs[name]

    def zoo(self, name: str) -> str:
        return zoo_key(self.base, self.config(name)) or self.default

    def domains(self, name: str) -> str | None:
        key = domain_features_key(self.config(name))
        return None if key is None else f"domains_{key}"

    def results_dir(self, name: str) -> str:
        return regime_results_dir(self.base, name)

    def owner(self, wildcards) -> str:
        """The regime whose config runs a job with these wildcards (a mapping or Snakemake's wildcards)."""
        wildcards = dict(wildcards.items())
        if "regime" in wildcards:
            return wildcards["regime"]
        for key, of in (("zoo", self.zoo), ("domains", self.domains), ("results_dir", self.results_dir)):
            if key in wildcards:
                name = next((n for n in self.names if of(n) == wildcards[key]), None)
                if name is None:
                    raise ValueError(f"no regime of study.regimes has {key} '{wildcards[key]}'")
                return name
        return self.default

    def job_config(self, wildcards) -> dict:
        return self.config(self.owner(wildcards))


def job_config(smk) -> dict:
    """The config dict a workflow job runs on: its regime's (`Regimes.owner` of the job's wildcards)."""
    return Regimes(smk.config).job_config(smk.wildcards)


# ----------------------------------------------------------------------------------------------------------------
# Gathering
# ----------------------------------------------------------------------------------------------------------------


def method_key(spec: str) -> str:
    """The folder of a `study.methods` entry (`module:callable`) under `<results_dir>/methods/<regime>/`."""
    return re.sub(r"[^A-Za-z0-9_.]", ".", spec)


def method_order(kinds: Sequence[str]) -> list[str]:
    """The study table's order of methods: originals, RPG, the built-in baselines, then the others as found."""
    first = [k for k in (KIND_ORIGINAL, KIND_RPG, *BASELINES) if k in kinds]
    return first + [k for k in dict.fromkeys(kinds) if k not in first]


def _method_rows(samples: pd.DataFrame, group: str) -> list[dict]:
    """One row per method (samples.csv kind) of `group`: best-of-n and mean over each task's heads, in percent,
    averaged over the tasks where the method answered, and against the originals of those tasks."""
    part = samples[samples.group == group]
    metrics = [ACCURACY, BALANCED_ACCURACY]
    originals = 100 * part[part[KIND] == KIND_ORIGINAL].groupby("task_id")[metrics].mean()
    rows = []
    for kind in method_order(list(part[KIND].unique())):
        per_task = part[part[KIND] == kind].groupby("task_id")
        row = {"group": group, "method": kind, "n_tasks": per_task.ngroups, "n_heads": int(per_task.size().max())}
        stats = {"best": 100 * per_task[metrics].max(), "mean": 100 * per_task[metrics].mean()}
        for stat, values in stats.items():
            row.update({f"{metric}_{stat}": values[metric].mean() for metric in metrics})
        for stat, values in stats.items():
            minus = values - originals.loc[values.index]
            row.update({f"minus_original{short}_{stat}": minus[metric].mean()
                        for metric, short in ((ACCURACY, ""), (BALANCED_ACCURACY, "_bal"))})
        for name in NOVELTY:  # mean over tasks of the task's mean (the originals: the zoo's own spread)
            row[name] = per_task[name].mean().mean() if name in part else float("nan")
        rows.append(row)
    return rows


def label_free_samples(samples: pd.DataFrame, cfg: Mapping) -> pd.DataFrame | None:
    """The unseen rows of a regime's samples whose task is in a domain of `tasks.label_free_domains`, as group
    `unseen_label_free` (None without such domains)."""
    free = [cfg["domains"]["names"].index(n) for n in cfg["tasks"]["label_free_domains"]]
    if not free:
        return None
    unseen = samples[samples.group == "unseen"]
    return unseen[[split_task_id(int(t))[1] in free for t in unseen.task_id]].assign(group="unseen_label_free")


def _best_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Per group: the best baseline among those present on every task of the group (`rpg.evaluation.best_baseline`
    on their mean accuracy), RPG's best-of-n minus it, and every method's best-of-n minus it (`best_minus_baseline`)."""
    for group, part in frame.groupby("group"):
        # a mean over a subset (the complement swap exists where the complement trains, e.g. 5 of 20 domain pairs)
        # is not comparable with RPG's over all tasks
        n_tasks = int(part.loc[part.method == KIND_ORIGINAL, "n_tasks"].max())
        base = part[part.method.isin(BASELINES) & (part.n_tasks == n_tasks)]
        name, best = best_baseline(dict(zip(base.method, base.accuracy_mean)))
        rpg = part.loc[part.method == KIND_RPG, "accuracy_best"]
        rows = frame.group == group
        frame.loc[rows, "best_baseline"] = name
        frame.loc[rows, best_baseline_column()] = best
        frame.loc[rows, minus_baseline_column("best")] = float(rpg.iloc[0]) - best if len(rpg) else float("nan")
        frame.loc[rows, "best_minus_baseline"] = frame.loc[rows, "accuracy_best"] - best
    return frame


def gather_study(regimes: Mapping[str, Mapping], configs: Mapping[str, Mapping] | None = None) -> pd.DataFrame:
    """The study table: one row per regime x task group x method. Groups: unseen, seen, and unseen_label_free (the
    unseen pairs in the regime's `tasks.label_free_domains`, where the per-domain head baselines do not exist).

    Args:
        regimes: name -> {"samples": [samples.csv of rule generate (originals, RPG, the baselines), then one per
            `study.methods` entry (rule study_method)], "rpg_summary": json (train_conditional_rpg's)}.
        configs: name -> the regime's config dict (adds its zoo init, canonicalisation, training tasks and steps).
    Returns:
        columns regime, group, method (a samples.csv kind: original, rpg, each baseline, each study method),
        n_tasks, n_heads (per task, at most), `<metric>_<stat>` for metric accuracy / balanced_accuracy and stat best
        (best of the task's heads) / mean (mean over them), percent, means over the group's tasks;
        `minus_original[_bal]_<stat>` (points against the originals' mean on the same tasks); the novelty means
        (`rpg.evaluation.NOVELTY`; originals: the zoo's own spread); the regime's RPG summary (training tasks,
        steps, seen-validation score beside the originals'); `best_baseline`, `best_baseline_acc`,
        `rpg_best_minus_baseline_acc` and `best_minus_baseline` (`_best_baseline`); the regime's settings.
    """
    frames = []
    for name, paths in regimes.items():
        samples = pd.concat([pd.read_csv(p, dtype={"embedding": str}) for p in paths["samples"]], ignore_index=True)
        rows = _method_rows(samples, "unseen") + _method_rows(samples, "seen")
        free = label_free_samples(samples, configs[name]) if configs and name in configs else None
        if free is not None:
            rows += _method_rows(free, "unseen_label_free")
        frame = pd.DataFrame(rows)
        frame.insert(0, "regime", name)
        summary = json.loads(Path(paths["rpg_summary"]).read_text())
        frame["n_train_tasks"] = summary.get("n_train_tasks")
        frame["rpg_steps"] = summary.get("steps")
        frame["rpg_best_step"] = summary.get("best_step")
        frame["val_score"] = 100 * summary["best_score"] if summary.get("best_score") is not None else float("nan")
        frame["val_original"] = (100 * summary["val_original_accuracy"]
                                 if summary.get("val_original_accuracy") is not None else float("nan"))
        if configs and name in configs:
            cfg = configs[name]
            frame["zoo_init"] = cfg["zoo"]["init"]
            frame["canonicalise"] = cfg["train"]["canonicalise"]
            frame["holdout_neighbours"] = cfg["tasks"]["holdout_neighbours"]
            frame["shifted_domain_tasks"] = cfg["tasks"]["shifted_domain_tasks"]
            frame["domains"] = ",".join(cfg["domains"]["names"])  # empty: the plain images only
            frame["label_free_domains"] = ",".join(cfg["tasks"]["label_free_domains"])
        frames.append(_best_baseline(frame))
    return pd.concat(frames, ignore_index=True).round(3)


# What makes two regimes the same task setting: the zoo (init), the training split and the tasks' domains. Regimes
# that agree on these differ only in the generator (its size, steps, prediction, canonicalisation, ...): variants.
SETTING_COLUMNS = ("zoo_init", "n_train_tasks", "holdout_neighbours", "shifted_domain_tasks", "domains",
                   "label_free_domains")


def variants_chosen_on_validation(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per task setting (regimes that agree on SETTING_COLUMNS): the regime whose RPG scores best on
    seen-task validation (`val_score`; first listed on a tie), never chosen on the unseen tasks' test accuracy.

    Args:
        frame: the study table (`gather_study`).
    Returns:
        columns setting (the setting's first regime, in the table's order), regime (the one chosen), variants
        (how many regimes the setting has), in the order of the settings' first rows.
    """
    missing = [c for c in ("regime", "val_score", *SETTING_COLUMNS) if c not in frame.columns]
    if missing:
        raise ValueError(f"the study table has no column {missing} (written by an older gather_study?)")
    regimes = frame.drop_duplicates("regime").reset_index(drop=True)
    key = regimes[list(SETTING_COLUMNS)].map(str).agg("|".join, axis=1)  # NaN -> "nan": no setting lost
    rows = []
    for _, group in regimes.groupby(key, sort=False):
        chosen = group.loc[group["val_score"].fillna(float("-inf")).idxmax()]  # idxmax: the first of equal scores
        rows.append({"setting": group["regime"].iloc[0], "regime": chosen["regime"], "variants": len(group)})
    return pd.DataFrame(rows, columns=["setting", "regime", "variants"])


def write_study(regimes: Mapping[str, Mapping], configs: Mapping[str, Mapping] | None,
                out_csv: str | Path) -> pd.DataFrame:
    frame = gather_study(regimes, configs)
    write_csv_atomic(out_csv, frame)
    return frame


def study_regimes(base: Mapping, names: Sequence[str] | None = None) -> dict[str, dict]:
    """name -> regime config dict, for `names` (default: every regime of `study.regimes`)."""
    return {name: regime_config(base, name) for name in (names or base["study"]["regimes"])}
