"""The views of `rpg docs`: each renders one part of a page (a table, a number) from the reference results.

A view is a function registered in `VIEWS` by name (`@view("table1")`); a page's marker
`<!-- rendered: table1 ... -->` calls it with the reference results and the marker's remaining words.
The baselines shown are each family's `BASELINES` (its registry entries), in the order the tables hold them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from rpg.evaluation import best_baseline
from rpg.experiments.arch_study import baselines as arch_baselines
from rpg.experiments.rule_times import group_totals
from rpg.experiments.task_zoo import baselines as zoo_baselines

MINUS = "\u2212"
ARCH_BASELINES = arch_baselines.BASELINES
ARCH_BASELINE_NAMES = {"noise": "noise", "average16": "average of 16", "gaussian": "Gaussian"}
ZOO_BASELINES = zoo_baselines.BASELINES
TIE = 0.1  # points: RPG's best-of-n within this of the best baseline is a tie


class DocsError(ValueError):
    """A page names a view or a reference file that does not exist."""


# ------------------------------------------------------------------------------------------------------ reading
@dataclass
class Reference:
    """The committed reference results under `root` (`docs/reference` of a checkout), read once each."""

    root: Path
    _cache: dict = field(default_factory=dict)

    def path(self, name: str) -> Path:
        """`table16` -> table16/table16.csv; `ablations/recurrent` -> ablations/recurrent.csv; any file by its
        relative path (with a suffix)."""
        rel = Path(name)
        if not rel.suffix:
            rel = rel / f"{rel.name}.csv" if len(rel.parts) == 1 else rel.with_suffix(".csv")
        path = self.root / rel
        if not path.exists():
            raise DocsError(f"no reference file {path}")
        return path

    def csv(self, name: str) -> pd.DataFrame:
        path = self.path(name)
        if path not in self._cache:
            self._cache[path] = pd.read_csv(path, dtype={"embedding": str, "k": str})
        return self._cache[path]


def col(row: pd.Series, name: str):
    """A column of the evaluation layer's vocabulary (`rpg.evaluation`); NaN where the table has none (e.g. the
    std over seeds of an ablation run once)."""
    return row[name] if name in row.index else float("nan")


# --------------------------------------------------------------------------------------------------- formatting
def num(x, spec: str = ".2f") -> str:
    """A number as a page shows it: `spec` is a format spec (`.2f`, `,.0f`, `+.2f`, `%` for a percentage of a
    fraction, `s` for text); NaN / missing is an em dash; negative numbers get a typographic minus."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "\u2014"
    if spec == "s":
        return str(x)
    if spec == "%":
        return f"{100 * float(x):.1f} %"
    text = format(int(round(float(x))) if spec.endswith("d") else float(x), spec)
    return MINUS + text[1:] if text.startswith("-") else text


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def pair(a, b, spec: str = ".2f") -> str:
    return f"{num(a, spec)} ({num(b, spec)})"


# ------------------------------------------------------------------------------------------------------- views
VIEWS: dict[str, Callable[..., str]] = {}


def view(name: str):
    def register(fn):
        VIEWS[name] = fn
        return fn
    return register


def _matching(df: pd.DataFrame, selector: str) -> pd.DataFrame:
    """The rows matching every `key=value` of `key=value[,key=value]` (string comparison); all rows for ""."""
    mask = pd.Series(True, index=df.index)
    for part in filter(None, selector.split(",")):
        key, _, value = part.partition("=")
        if key not in df.columns:
            raise DocsError(f"no column {key!r} to select on (columns: {', '.join(df.columns)})")
        mask &= df[key].astype(str) == value
    return df[mask]


def _select(df: pd.DataFrame, selector: str) -> pd.Series:
    """`key=value[,key=value]` (string comparison) or `row=N` -> the one matching row."""
    key, _, value = selector.partition("=")
    if key == "row":
        return df.iloc[int(value)]
    hits = _matching(df, selector)
    if len(hits) != 1:
        raise DocsError(f"selector {selector!r} matches {len(hits)} rows, not 1")
    return hits.iloc[0]


@view("value")
def v_value(ref: Reference, table: str, selector: str, column: str, spec: str = ".2f") -> str:
    """One number of a CSV, for prose: `value table16 embedding=mean rpg_best_acc .2f`."""
    row = _select(ref.csv(table), selector)
    return num(col(row, column), spec)


@view("machine")
def v_machine(ref: Reference, folder: str) -> str:
    """The CPU that produced a folder's results, from its lscpu.txt (model, cores, bf16 matrix units)."""
    lscpu = ref.root / folder / "lscpu.txt"
    if not lscpu.exists():
        return (ref.root / folder / "machine.txt").read_text().strip()
    fields = dict(line.split(":", 1) for line in lscpu.read_text().splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("Model name", "unknown CPU")
    cores = fields.get("CPU(s)")
    flags = fields.get("Flags", "")
    amx = "AMX-BF16" if "amx_bf16" in flags else ("no AMX" if flags else None)
    return ", ".join(p for p in (model, f"{cores} cores" if cores else None, amx) if p)


@view("wins")
def v_wins(ref: Reference, table: str) -> str:
    """RPG's best-of-n against the best baseline per task: `W wins, T ties, L losses` (tie: within TIE points)."""
    df = ref.csv(table)
    d = df[df["embedding"] != "mean"]["rpg_best_minus_baseline_acc"]
    return f"{(d > TIE).sum()} wins, {(d.abs() <= TIE).sum()} ties, {(d < -TIE).sum()} losses"


def _zoo_mean(ref: Reference, table: str) -> pd.Series:
    return _select(ref.csv(table), "embedding=mean")


def _in(folder: str, table: str) -> str:
    """`table16` of another run's folder (`zoo_x0/table16`), or the reference table itself."""
    return f"{folder}/{table}" if folder else table


def _arch_best_baseline(row: pd.Series) -> tuple[str, float]:
    return best_baseline({b: col(row, f"{b}_mean_acc") for b in ARCH_BASELINES})


ZOO_TABLES = (("table11", "Table 11 (10 unseen tasks)"), ("table16", "Table 16 (20 unseen tasks)"),
              ("seen_summary", "seen tasks (50, 3 samples each)"))


@view("headline")
def v_headline(ref: Reference) -> str:
    """README's one table: RPG against the originals and the best simple baseline, every table of `all`."""
    rows = []
    for table, label in ZOO_TABLES:
        m = _zoo_mean(ref, table)
        rows.append([label, num(m["original_acc"]), num(m["rpg_best_acc"]), num(m["rpg_mean_acc"]),
                     num(m["best_baseline_acc"]), num(m["rpg_best_minus_baseline_acc"], "+.2f")])
    for _, r in ref.csv("table1").iterrows():
        name, base = _arch_best_baseline(r)
        rows.append([f"Table 1: `{r['architecture']}` ({num(r['params'], ',d')} parameters)",
                     num(col(r, "original_mean_acc")), num(col(r, "rpg_best_acc")), num(col(r, "rpg_mean_acc")),
                     f"{num(base)} ({ARCH_BASELINE_NAMES[name]})", num(col(r, "rpg_mean_minus_baseline_acc"), "+.2f")])
    return md_table(["rows (test accuracy %)", "originals (mean)", "RPG best-of-10", "RPG mean",
                     "best baseline", "RPG − best baseline"], rows)


@view("zoo_summary")
def v_zoo_summary(ref: Reference, folder: str = "") -> str:
    """Tables 11 / 16 / seen summary: originals, RPG and every baseline (mean rows; balanced in brackets)."""
    rows = []
    for table, label in ZOO_TABLES:
        table = _in(folder, table)
        m = _zoo_mean(ref, table)
        rows.append([label, pair(m["original_acc"], m["original_bal_acc"]), num(m["original_best_acc"]),
                     pair(m["rpg_best_acc"], m["rpg_best_bal_acc"]), num(m["rpg_mean_acc"])]
                    + [num(m[f"{b}_acc"]) for b in ZOO_BASELINES]
                    + [pair(m["best_baseline_acc"], m["best_baseline_bal_acc"]),
                       pair(m["rpg_best_minus_baseline_acc"], m["rpg_best_minus_baseline_bal_acc"], "+.2f"),
                       v_wins(ref, table)])
    return md_table(["rows", "originals (bal.)", "originals best of 3", "RPG best-of-10 (bal.)", "RPG mean"]
                    + list(ZOO_BASELINES) + ["best baseline (bal.)", "RPG best − best baseline (bal.)",
                                             "per task"], rows)


@view("zoo_novelty")
def v_zoo_novelty(ref: Reference, folder: str = "") -> str:
    """Novelty of the generated heads beside the originals' own (mean rows)."""
    rows = []
    for table, label in ZOO_TABLES:
        m = _zoo_mean(ref, _in(folder, table))
        rows.append([label, num(m["rpg_l2_novelty"]), num(m["original_l2_novelty"]), num(m["rpg_max_iou_original"]),
                     num(m["original_max_iou_original"]), num(m["rpg_pairwise_iou"]), num(m["original_pairwise_iou"])])
    return md_table(["rows", "RPG: L2 to nearest training checkpoint", "originals: the same",
                     "RPG: max wrong-prediction IoU vs the task's originals", "originals among themselves",
                     "IoU between a task's samples", "between its originals"], rows)


@view("zoo_tasks")
def v_zoo_tasks(ref: Reference, table: str) -> str:
    """One row per task: originals, RPG, the best baseline and its name."""
    rows = []
    for _, r in ref.csv(table).iterrows():
        rows.append([f"`{r['embedding']}`", num(r["positive_classes"], "s") if isinstance(r["positive_classes"], str)
                     else "", num(r["original_acc"]), num(r["rpg_best_acc"]), num(r["rpg_mean_acc"]),
                     num(r["best_baseline"], "s") if isinstance(r["best_baseline"], str) else "",
                     num(r["best_baseline_acc"]), num(r["rpg_best_minus_baseline_acc"], "+.2f")])
    return md_table(["task", "positive classes", "originals", "RPG best-of-10", "RPG mean", "best baseline", "its acc.",
                     "RPG best − best baseline"], rows)


@view("table12")
def v_table12(ref: Reference) -> str:
    df = ref.csv("table12")
    classes = [c for c in df.columns if c not in ("embedding", "task_id", "model", "n_models", "accuracy",
                                                  "balanced_accuracy")]
    rows = [[f"`{r['embedding']}`", r["model"], num(r["n_models"], "d"), num(r["accuracy"])]
            + [num(r[c], ".1f") for c in classes] for _, r in df.iterrows()]
    return md_table(["task", "model", "models", "accuracy"] + classes, rows)


@view("table13")
def v_table13(ref: Reference) -> str:
    df = ref.csv("table13")
    mean = df[df["embedding"] == "mean"]
    epochs = sorted(mean["epoch"].unique())
    labels = {"scratch": "from scratch", "finetune": "pretrained + fresh head", "rpg": "RPG init + fine-tune"}
    rows = [[labels.get(arm, arm)] + [num(mean[(mean["arm"] == arm) & (mean["epoch"] == e)]["accuracy"].iloc[0])
                                      for e in epochs] for arm in mean["arm"].unique()]
    return md_table(["epoch"] + [str(e) for e in epochs], rows)


def _rule_jobs(ref: Reference, folder: str, group: str = "", prefix: str = "") -> pd.DataFrame:
    """The rows of a run's `rule_times.csv`, only `group`'s when given (`*`: every group, for a marker that
    needs the next argument) and only jobs starting with one of the comma-separated `prefix`es when given."""
    df = ref.csv(f"{folder}/rule_times")
    if group and group != "*":
        df = df[df["group"] == group]
    if prefix:
        df = df[df["job"].str.startswith(tuple(prefix.split(",")))]
    return df


@view("rule_times")
def v_rule_times(ref: Reference, folder: str, group: str = "", prefix: str = "") -> str:
    """Per-job wall / CPU seconds and peak memory of a run (`rule_times.csv`), with the total."""
    df = _rule_jobs(ref, folder, group, prefix)
    rows = [[f"`{r['job']}`", num(r["wall_s"], ",.0f"), num(r["cpu_s"], ",.0f"), num(r["max_rss_mb"], ",.0f")]
            for _, r in df.iterrows()]
    rows.append(["**all jobs**", num(df["wall_s"].sum(), ",.0f"), num(df["cpu_s"].sum(), ",.0f"),
                 num(df["max_rss_mb"].max(), ",.0f")])
    return md_table(["job", "wall s", "CPU s", "peak RSS MB"], rows)


@view("rule_times_vs")
def v_rule_times_vs(ref: Reference, folder: str, other: str, group: str = "", prefix: str = "") -> str:
    """The jobs two runs share (`rule_times.csv` of `folder` and of `other`): wall seconds of each and their
    ratio (other / folder), with the total; `group` and `prefix` select jobs as in `rule_times`."""
    a, b = (_rule_jobs(ref, name, group, prefix).set_index("job")["wall_s"] for name in (folder, other))
    both = a.index.intersection(b.index)
    if not len(both):
        raise DocsError(f"{folder} and {other} share no job")
    rows = [[f"`{job}`", num(a[job], ",.0f"), num(b[job], ",.0f"), num(b[job] / a[job], ".2f")] for job in both]
    rows.append(["**these jobs**", num(a[both].sum(), ",.0f"), num(b[both].sum(), ",.0f"),
                 num(b[both].sum() / a[both].sum(), ".2f")])
    return md_table(["job", f"wall s: {folder}", f"wall s: {other}", "ratio"], rows)


@view("rule_groups")
def v_rule_groups(ref: Reference, folder: str) -> str:
    """Per group of a run's `rule_times.csv` (a regime, a shared backbone or zoo): jobs, wall / CPU seconds and
    peak memory, with the total: where a study's time went."""
    totals = group_totals(ref.csv(f"{folder}/rule_times"))
    rows = [[f"`{r['group']}`", str(r["jobs"]), num(r["wall_s"], ",.0f"), num(r["cpu_s"], ",.0f"),
             num(r["max_rss_mb"], ",.0f")] for _, r in totals.iterrows()]
    rows.append(["**all**", str(totals["jobs"].sum()), num(totals["wall_s"].sum(), ",.0f"),
                 num(totals["cpu_s"].sum(), ",.0f"), num(totals["max_rss_mb"].max(), ",.0f")])
    return md_table(["group", "jobs", "wall s", "CPU s", "peak RSS MB"], rows)


@view("rule_total")
def v_rule_total(ref: Reference, folder: str, column: str, group: str = "", prefix: str = "") -> str:
    """A sum over jobs, for prose: `rule_total table11 cpu_s cifar10_binary`; `minutes` gives wall min."""
    df = _rule_jobs(ref, folder, group, prefix)
    if column == "minutes":
        return num(df["wall_s"].sum() / 60, ".0f")
    return num(df[column].sum(), ",.0f")


@view("target_times")
def v_target_times(ref: Reference, table: str) -> str:
    """A run timed target by target (`rpg.experiments.target_times`): each target's marginal wall minutes (what it
    added to the targets above it), the running total, and the whole run."""
    df = ref.csv(table)
    failed = df[df["rc"] != 0]
    if len(failed):
        raise DocsError(f"{table}: target {failed['target'].iloc[0]!r} failed (exit {failed['rc'].iloc[0]}); "
                        "a failed run is not a reference")
    minutes = df["wall_s"] / 60
    rows = [[f"`{r['target']}`", num(m, ".1f"), num(total, ".1f")]
            for (_, r), m, total in zip(df.iterrows(), minutes, minutes.cumsum())]
    rows.append(["**the whole run**", num(minutes.sum(), ".1f"), ""])
    return md_table(["target (in order)", "wall min it added", "wall min so far"], rows)


@view("run_minutes")
def v_run_minutes(ref: Reference, table: str, selector: str = "") -> str:
    """Wall minutes of a timed run (`target_times` rows), for prose: all rows, or those matching `key=value`."""
    df = _matching(ref.csv(table), selector)
    if df.empty:
        raise DocsError(f"{table}: no row matches {selector!r}")
    return num(df["wall_s"].sum() / 60, ".0f")


@view("table1")
def v_table1(ref: Reference, folder: str = "table1") -> str:
    """One row per architecture of `<folder>/table1.csv`: originals, RPG, baselines, novelty, steps."""
    rows = []
    for _, r in ref.csv(f"{folder}/table1").iterrows():
        name, base = _arch_best_baseline(r)
        rows.append([f"`{r['architecture']}`", num(r["params"], ",d"),
                     f"{num(col(r, 'original_best_acc'))} / {num(col(r, 'original_mean_acc'))}",
                     f"{num(col(r, 'rpg_best_acc'))} / {num(col(r, 'rpg_mean_acc'))} / {num(col(r, 'rpg_min_acc'))}",
                     f"{num(col(r, 'gap_best'))} / {num(col(r, 'gap_mean'))}",
                     num(r["sample_steps"], "d") + ("" if pd.isna(r["sample_steps_val"])  # one candidate: none
                                                    else f" ({r['sample_steps_val']})"),
                     " / ".join(num(col(r, f"{b}_mean_acc")) for b in ARCH_BASELINES),
                     num(col(r, "rpg_mean_minus_baseline_acc"), "+.2f"),
                     f"{num(col(r, 'rpg_l2_novelty'))} / {num(col(r, 'original_l2_novelty'), '.3f')}",
                     num(col(r, "rpg_spread_ratio")),
                     f"{num(col(r, 'rpg_max_iou_original'))} / {num(col(r, 'original_max_iou_original'))}",
                     f"{num(r['best_step'], ',d')} / {num(r['max_steps'], ',d')}"])
    return md_table(["architecture", "params", "original best / mean", "RPG best / mean / min", "gap best / mean",
                     "DDIM steps (validation % per candidate)", "noise / average of 16 / Gaussian: mean",
                     "RPG mean − best baseline", "L2 to nearest checkpoint: RPG / checkpoints' own",
                     "spread vs collection", "wrong-prediction IoU: RPG / originals", "best step / max"], rows)


@view("ablations")
def v_ablations(ref: Reference, folder: str, *families: str) -> str:
    """One row per setting of each family: RPG best / mean (± std over seeds when there are several)."""
    rows = []
    for family in families or ("recurrent", "position", "permutation", "token_size"):
        for _, r in ref.csv(f"{folder}/{family}").iterrows():
            seeds = r.get("n_seeds", 1)
            std = isinstance(seeds, (int, float)) and not math.isnan(seeds) and seeds > 1
            best, mean = num(col(r, "rpg_best_acc")), num(col(r, "rpg_mean_acc"))
            if std:
                best += f" ± {num(col(r, 'rpg_best_acc_std'))}"
                mean += f" ± {num(col(r, 'rpg_mean_acc_std'))}"
            _, base = _arch_best_baseline(r)
            rows.append([family, num(r["setting"], "s"), f"`{r['architecture']}`", num(r["tokens"], "d"),
                         best, mean, num(col(r, "original_mean_acc")), num(base),
                         num(col(r, "rpg_l2_novelty")), num(r["sample_steps"], "d") if not std else "per seed",
                         num(seeds if std else 1, "d")])
    return md_table(["family", "setting", "architecture", "tokens", "RPG best", "RPG mean", "originals mean",
                     "best baseline mean", "L2 to nearest checkpoint", "DDIM steps", "seeds"], rows)


STUDY_OWN = ("original", "rpg", *ZOO_BASELINES)  # the study table's built-in methods; any other is study.methods'


def _study_cell(part: pd.DataFrame, method: str, n_tasks: int) -> str:
    """A method's mean accuracy over the unseen tasks (with several heads per task: best of n / mean); where it
    exists on fewer tasks than the group has (the complement swap), the count is named: that mean is over other
    tasks and is no comparison."""
    if method not in part.index:
        return "\u2014"
    row = part.loc[method]
    acc = num(row["accuracy_mean"])
    if row["n_heads"] > 1:
        acc = f"{num(row['accuracy_best'])} / {acc}"
    n = row["n_tasks"]
    return acc if n >= n_tasks else f"{acc} ({num(n, 'd')} tasks)"


def _study_unseen(ref: Reference) -> pd.DataFrame:
    df = ref.csv("unseen_study")
    return df[df["group"] == "unseen"]


def _rpg_samples(df: pd.DataFrame) -> str:
    """How many samples per task RPG's best is of: the number, or `n` where the regimes differ."""
    n = df.loc[df["method"] == "rpg", "n_heads"].unique()
    return num(n[0], "d") if len(n) == 1 else "n"


@view("unseen_study")
def v_unseen_study(ref: Reference, *regimes: str) -> str:
    """One row per regime (unseen tasks): seen-validation score, originals, RPG, each baseline, each method of
    study.methods (best of its heads / mean where it gives several), novelty."""
    return _study_table(ref, "unseen_study", "unseen", regimes)


@view("study_variants")
def v_study_variants(ref: Reference, group: str = "unseen", *regimes: str) -> str:
    """`unseen_study` of the variant runs (unseen_study/variants/variants.csv) for one task group: `unseen`, or
    `unseen_label_free` (the unseen pairs of a label-free domain)."""
    return _study_table(ref, "unseen_study/variants/variants", group, regimes)


def _study_table(ref: Reference, table: str, group: str, regimes: tuple[str, ...]) -> str:
    df = ref.csv(table)
    df = df[df["group"] == group]
    if df.empty:
        raise DocsError(f"{table} has no group {group!r}")
    others = [m for m in dict.fromkeys(df["method"]) if m not in STUDY_OWN]
    rows = []
    for regime in regimes or df["regime"].unique():
        part = df[df["regime"] == regime].set_index("method")
        if part.empty:
            raise DocsError(f"{table} has no regime {regime!r} in group {group!r}")
        o, rpg = part.loc["original"], part.loc["rpg"]
        rows.append([f"`{regime}`", num(o["n_train_tasks"], ",d"), num(o["rpg_steps"], ",d"),
                     f"{num(o['val_score'], '.1f')} / {num(o['val_original'], '.1f')}",
                     pair(o["accuracy_mean"], o["balanced_accuracy_mean"]),
                     pair(rpg["accuracy_best"], rpg["balanced_accuracy_best"]), num(rpg["accuracy_mean"])]
                    + [_study_cell(part, m, o["n_tasks"]) for m in (*ZOO_BASELINES, *others)]
                    + [f"{num(o['rpg_best_minus_baseline_acc'], '+.2f')} (`{o['best_baseline']}`)",
                       f"{num(rpg['l2_novelty'])} ({num(o['l2_novelty'])})", num(rpg["max_iou_original"])])
    return md_table(["regime", "training tasks", "RPG steps", "seen-val RPG / originals", "originals (bal.)",
                     f"RPG best of {_rpg_samples(df)} (bal.)", "RPG mean"] + list(ZOO_BASELINES)
                    + [f"`{m}`" for m in others]
                    + ["RPG best − best baseline", "RPG L2 novelty (originals')", "RPG max IoU vs originals"], rows)


FINETUNE_ARMS = {"rpg": "RPG's sample (chosen on the k images)", "zoo_init": "the zoo's initial head",
                 "fresh": "a fresh random head"}


RECIPE_LABELS = {"early": ", early-stopped", "cv": ", stopped by cross-validation"}


def _recipe_suffixes() -> dict[str, str]:
    """Recipe name -> the arm-name suffix of its rows in finetune_few.csv."""
    from rpg.experiments.task_zoo.finetune_few import CV, EARLY

    return {"early": EARLY, "cv": CV}


def _recipe_of(arm: str) -> str:
    return next((name for name, suffix in _recipe_suffixes().items() if arm.endswith(suffix)), "fixed")


def _finetune_summary(ref: Reference, within: str, table: str, recipe: str) -> pd.DataFrame:
    """`images_needed` of a fine-tuning run; recipe `fixed` / `early` / `cv` keeps that recipe's arms, `all` all."""
    from rpg.experiments.task_zoo.finetune_few import images_needed

    if recipe not in ("all", "fixed", *_recipe_suffixes()):
        raise DocsError(f"recipe {recipe!r}: all, fixed, {', '.join(_recipe_suffixes())}")
    df = images_needed(ref.csv(table), float(within))
    return df if recipe == "all" else df[df["arm"].map(_recipe_of) == recipe]


def _arm_label(arm: str) -> str:
    from rpg.experiments.task_zoo.finetune_few import base_arm

    base = base_arm(arm)
    return FINETUNE_ARMS.get(base, f"`{base}`") + RECIPE_LABELS.get(_recipe_of(arm), "")


@view("finetune_few")
def v_finetune_few(ref: Reference, within: str = "1", table: str = "finetune_few", recipe: str = "all") -> str:
    """Fine-tuning unseen heads on k images (`finetune_few.csv`, or another run's `table`): per arm the mean test
    accuracy at the last step for each k, the originals', and the smallest k within `within` points of them; only
    the `fixed`, `early`-stopped or `cv` (cross-validated) recipe's arms when `recipe` says so."""
    df = _finetune_summary(ref, within, table, recipe)
    shots = [c for c in df.columns if c.startswith("k=")]
    rows = [[f"`{r['arm']}`", num(r["n_tasks"], "d")] + [num(r[c]) for c in shots]
            + [num(r["original"]), str(r["needs"])] for _, r in df.iterrows()]
    return md_table(["start", "tasks"] + [c.replace("k=", "k = ") for c in shots]
                    + ["originals", f"k within {within} point"], rows)


@view("finetune_few_needs")
def v_finetune_few_needs(ref: Reference, within: str = "1", table: str = "finetune_few", recipe: str = "all"
                         ) -> str:
    """The same as prose: how many labelled images each start needs to come within `within` points."""
    df = _finetune_summary(ref, within, table, recipe)
    parts = [f"{_arm_label(r['arm'])}: "
             + ("not within reach even with all its training images" if r["needs"] == "none" else
                "all its training images" if r["needs"] == "all" else f"{r['needs']} images")
             for _, r in df.iterrows()]
    return "; ".join(parts)
def _span(values: pd.Series, spec: str) -> str:
    low, high = num(values.min(), spec), num(values.max(), spec)
    return low if low == high else f"{low} to {high}"


@view("unseen_study_summary")
def v_unseen_study_summary(ref: Reference) -> str:
    """The README's summary of the study: over its task settings (regimes that differ only in the generator are one
    setting's variants; the variant shown is the one best on seen-task validation), in how many RPG's best of n
    beats, ties or loses to the best baseline (tie: within TIE points), by how much, and how far from the originals."""
    from rpg.experiments.task_zoo.study import variants_chosen_on_validation

    df = _study_unseen(ref)
    chosen = variants_chosen_on_validation(df)
    rpg = df[df["method"] == "rpg"].set_index("regime").loc[chosen["regime"]]
    gap = rpg["rpg_best_minus_baseline_acc"]
    label = {r: (f"`{s}`" if s == r else f"`{s}`, variant `{r}`") for s, r in zip(chosen["setting"], chosen["regime"])}
    wins = gap[gap > TIE]
    named = ""
    if len(wins):
        below = -rpg.loc[wins.index, "minus_original_best"]
        named = (f" ({', '.join(label[r] for r in wins.index)}: {_span(wins, '+.2f')} points, yet "
                 f"{_span(below, '.2f')} points below the originals)")
    return (f"over {len(chosen)} task settings ({len(df['regime'].unique())} regimes: each setting with its generator "
            f"variants, the one best on seen-task validation counted) RPG's best of {_rpg_samples(df)} beats the best "
            f"baseline in {len(wins)}{named}"
            + f", ties in {int((gap.abs() <= TIE).sum())} and loses in {int((gap < -TIE).sum())}"
            + f" (by up to {num(-gap.min())} points)")


@view("csv")
def v_csv(ref: Reference, table: str, spec: str = ".2f") -> str:
    """A small CSV as it is (numbers with `spec`)."""
    df = ref.csv(table)
    rows = [[num(v, "d" if float(v).is_integer() and spec != "s" else spec)
             if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v) for v in r]
            for r in df.itertuples(index=False)]
    return md_table(list(df.columns), rows)


@view("bench")
def v_bench(ref: Reference, table: str, *columns: str) -> str:
    """Chosen columns of a CSV, `name:spec` each; `name=value` words keep only the matching rows:
    `bench generation/generation group=sampler configuration:s seconds_per_model:.2f`."""
    df = ref.csv(table)
    filters = [c for c in columns if "=" in c]
    columns = tuple(c for c in columns if "=" not in c)
    for f in filters:
        key, _, value = f.partition("=")
        df = df[df[key].astype(str) == value]
    names, specs = zip(*[(c.partition(":")[0], c.partition(":")[2] or ".2f") for c in columns])
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise DocsError(f"{table} has no column {missing}")
    rows = [[num(r[n], s) if isinstance(r[n], (int, float)) and not isinstance(r[n], bool) else str(r[n])
             for n, s in zip(names, specs)] for _, r in df.iterrows()]
    return md_table(list(names), rows)


ROOFLINE_TARGET = 0.4  # issue 34: every stage at >= 40 % of the measured matmul peak, or the reason it cannot be


def roofline_bound(row: pd.Series) -> str:
    """Why a stage runs below ROOFLINE_TARGET of its peak, from its measured columns (benchmarks/bench_roofline.py):
    memory-bound when its FLOPs per byte moved let the measured bandwidth carry less than the target (intensity
    below ROOFLINE_TARGET x the machine balance); else Python overhead when its op count at the measured cost of a
    tiny op takes a quarter of its time or more; else the kernels themselves, at a fraction of the roofline
    (min(peak, intensity x bandwidth)). Empty at or above the target."""
    if row["fraction_of_peak"] >= ROOFLINE_TARGET:
        return ""
    intensity, balance = row["intensity_flop_per_byte"], row["machine_balance"]
    if intensity < ROOFLINE_TARGET * balance:
        return f"memory-bound: {num(intensity, '.1f')} FLOP/B, balance {num(balance, '.0f')}"
    if row["overhead_fraction"] >= 0.25:
        return f"Python overhead: {num(row['ops'], ',d')} small ops"
    ceiling = min(row["peak_flop_s"], intensity * row["bandwidth_bytes_s"])
    return f"kernels at {num(row['achieved_flop_s'] / ceiling, '%')} of the roofline"


@view("roofline")
def v_roofline(ref: Reference, table: str = "roofline/roofline") -> str:
    """The measured peaks, then per stage: counted GFLOP, seconds, GFLOP/s, fraction of the peak of its dtype,
    FLOP per byte and, under ROOFLINE_TARGET, the bound (`roofline_bound`)."""
    df = ref.csv(table)
    peaks = df[df["stage"].str.startswith("matmul peak")]
    bandwidth = df.loc[df["stage"] == "memory bandwidth", "bandwidth_bytes_s"].iloc[0]
    tiny = df.loc[df["stage"] == "tiny op", "seconds_per_tiny_op"].iloc[0]
    head = ("Measured peaks: " + ", ".join(f"matmul {r.dtype} {num(r.peak_flop_s / 1e9, ',.0f')} GFLOP/s"
                                           for r in peaks.itertuples())
            + f"; memory bandwidth {num(bandwidth / 1e9, '.1f')} GB/s; one tiny op {num(tiny * 1e6, '.1f')} µs.")
    stages = df[df["flops"].notna()]
    rows = [[r["stage"], r["dtype"], num(r["flops"] / 1e9, ",.1f"), num(r["seconds"], ".2f"),
             num(r["achieved_flop_s"] / 1e9, ",.1f"), num(r["fraction_of_peak"], "%"),
             num(r["intensity_flop_per_byte"], ".1f"), num(r["overhead_fraction"], "%"), roofline_bound(r) or "—"]
            for _, r in stages.iterrows()]
    return head + "\n\n" + md_table(["stage", "dtype", "GFLOP", "seconds", "GFLOP/s", "of peak", "FLOP/B",
                                     "op overhead", "below 40 % because"], rows)
