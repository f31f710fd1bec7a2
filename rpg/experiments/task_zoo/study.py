"""The study of regimes (issue 13): what generation adds over the baselines, regime by regime.

A regime is the workflow's config plus `study.common` (the study's smaller budget) plus
`<study.regime_dir>/<name>.yaml` (which may name a `base:` regime file to start from); it reuses the workflow's
backbone and cached features (a regime may not change `data`, `backbone` or `seed`) and runs through the default
DAG's rules, its name the rules' `regime` wildcard (`Regimes`): `<results_dir>/<stage>/<name>/`, its tables under
`<results_dir>/study/<name>/`. Regimes whose zoo settings agree share one zoo: the workflow's own zoo when they equal
its settings, else `<results_dir>/zoo/<key>/`. `gather_study` turns every regime's tables into one long table,
`unseen_study.csv`: one row per regime x task group (unseen / seen) x method (originals, RPG best / mean, each
baseline), with plain and balanced accuracy in percent, the gap to the originals, and the novelty of RPG's samples.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from rpg.config import deep_update, read_config_file, validate_config
from rpg.evaluation import NOVELTY, best_baseline, best_baseline_column, minus_baseline_column
from rpg.experiments.rules import NEUTRAL_DEFAULTS
from rpg.experiments.task_zoo.baselines import BASELINES
from rpg.experiments.task_zoo.tasks import split_task_id
from rpg.utils import write_csv_atomic

SHARED_KEYS = ("data", "backbone", "seed")  # what the regimes share with the workflow (its backbone and features)
ZOO_KEYS = ("seed", "tasks.ids", "zoo", "domains")  # what a zoo depends on (the zoo rule's setting)
METHODS = ("original", "original_best", "rpg_best", "rpg_mean", *BASELINES)


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


def _method_rows(table: pd.DataFrame, group: str) -> list[dict]:
    """Rows per method from the `mean` row of a table16 / seen_summary table (columns of `tables._task_rows`)."""
    per_task = table[table.embedding.astype(str) != "mean"]
    mean = per_task.drop(columns=["embedding", "task_id", "positive_classes", "best_baseline"]).apply(
        pd.to_numeric, errors="coerce").mean()
    rows = []
    for method in METHODS:
        col = {"original": "original", "original_best": "original_best", "rpg_best": "rpg_best",
               "rpg_mean": "rpg_mean"}.get(method, method)
        if f"{col}_acc" not in mean or pd.isna(mean[f"{col}_acc"]):
            continue
        present = per_task[f"{col}_acc"].notna()
        row = {"group": group, "method": method, "n_tasks": int(present.sum()),
               "accuracy": mean[f"{col}_acc"], "balanced_accuracy": mean[f"{col}_bal_acc"],
               # against the originals of the tasks where the method exists (complement: not everywhere)
               "minus_original": (per_task.loc[present, f"{col}_acc"] - per_task.loc[present, "original_acc"]).mean(),
               "minus_original_bal": (per_task.loc[present, f"{col}_bal_acc"]
                                      - per_task.loc[present, "original_bal_acc"]).mean()}
        kind = "rpg" if method.startswith("rpg") else "original" if method == "original" else None
        for name in NOVELTY:
            row[name] = mean.get(f"{kind}_{name}", float("nan")) if kind else float("nan")
        rows.append(row)
    return rows


def label_free_tasks(table16: pd.DataFrame, cfg: Mapping) -> pd.DataFrame | None:
    """The rows of a regime's table16 whose task is in a domain of `tasks.label_free_domains` (None without)."""
    free = [cfg["domains"]["names"].index(n) for n in cfg["tasks"]["label_free_domains"]]
    if not free:
        return None
    per_task = table16[table16.embedding.astype(str) != "mean"]
    return per_task[[split_task_id(int(t))[1] in free for t in per_task.task_id]]


def gather_study(regimes: Mapping[str, Mapping[str, str | Path]], configs: Mapping[str, Mapping] | None = None
                 ) -> pd.DataFrame:
    """One long table of every regime's results.

    Args:
        regimes: name -> {"table16": csv, "seen_summary": csv, "rpg_summary": json (train_conditional_rpg's)}.
        configs: name -> the regime's config dict (adds its zoo init, canonicalisation, training tasks and steps).
    Returns:
        columns regime, group (unseen, seen, and unseen_label_free: the unseen pairs in the regime's
        `tasks.label_free_domains`, where the per-domain head baselines do not exist), method, n_tasks, accuracy,
        balanced_accuracy (percent, means over the group's tasks),
        minus_original(_bal) (points), the novelty means (RPG rows: its samples; original: the zoo's own spread),
        best_baseline, best_baseline_acc and rpg_best_minus_baseline_acc (per regime and group: RPG best minus the
        best baseline's mean accuracy, `rpg.evaluation.best_baseline`), and the regime's settings.
    """
    frames = []
    for name, paths in regimes.items():
        unseen = pd.read_csv(paths["table16"], dtype={"embedding": str})
        rows = (_method_rows(unseen, "unseen")
                + _method_rows(pd.read_csv(paths["seen_summary"], dtype={"embedding": str}), "seen"))
        free = label_free_tasks(unseen, configs[name]) if configs and name in configs else None
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
        for group, part in frame.groupby("group"):
            # Only baselines present on every task of the group: a mean over a subset (the complement swap exists
            # where the complement trains, e.g. 5 of 20 domain pairs) is not comparable with RPG's over all.
            base = part[part.method.isin(BASELINES) & (part.n_tasks == part.n_tasks.max())]
            name, best = best_baseline(dict(zip(base.method, base.accuracy)))
            rpg = part.loc[part.method == "rpg_best", "accuracy"]
            frame.loc[frame.group == group, best_baseline_column()] = best
            frame.loc[frame.group == group, minus_baseline_column("best")] = (
                float(rpg.iloc[0]) - best if len(rpg) else float("nan"))
            frame.loc[frame.group == group, "best_baseline"] = name
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).round(3)


def write_study(regimes: Mapping[str, Mapping[str, str | Path]], configs: Mapping[str, Mapping] | None,
                out_csv: str | Path) -> pd.DataFrame:
    frame = gather_study(regimes, configs)
    write_csv_atomic(out_csv, frame)
    return frame


def study_regimes(base: Mapping, names: Sequence[str] | None = None) -> dict[str, dict]:
    """name -> regime config dict, for `names` (default: every regime of `study.regimes`)."""
    return {name: regime_config(base, name) for name in (names or base["study"]["regimes"])}
