"""`rpg docs`: the measured numbers of README.md and docs/*.md, rendered from committed reference results.

No measured number in a page is typed by hand. A page marks each generated part with a pair of comments,

    <!-- rendered: table1 -->            (a block view: a whole table, on the lines in between)
    ...
    <!-- /rendered -->

or inline, inside a sentence: `<!-- rendered: value table16 embedding=mean rpg_best_acc -->91.11<!-- /rendered -->`.
Everything between the two comments is rewritten from the files under `docs/reference/<table>/` (the CSV, the
resolved config `config.yaml`, `lscpu.txt`, `rule_times.csv`):

    rpg docs render                      # rewrite every page in place
    rpg docs check                       # exit 1 and print a diff when a page disagrees with its CSVs
    rpg docs update table16 results/     # copy a new run's table16.csv, config, lscpu and rule times, then render
    rpg docs update table13 results/ --groups cifar10_binary   # only those rule-time groups of a shared folder
    rpg docs update unseen_study results/ --groups study/new_regime --merge   # add / replace those groups only
    rpg docs update table1 results/table1_fp32 --into table1_fp32  # an experiment's table beside the default's

The views (what each marker renders) are `rpg.cli.doc_views`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

from rpg.cli.doc_views import VIEWS, DocsError, Reference

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = Path("docs") / "reference"
PAGES = ("README.md", "docs/*.md")
# A marker in backticks is prose about markers, not one.
MARKER = re.compile(r"(?<!`)<!-- rendered: (?P<spec>.+?) -->(?P<body>.*?)(?<!`)<!-- /rendered -->", re.S)


# ----------------------------------------------------------------------------------------------------- rendering
def render_text(text: str, ref: Reference) -> str:
    """The page with every marked part rewritten from the reference results."""
    def replace(match: re.Match) -> str:
        words = match.group("spec").split()
        name, args = words[0], words[1:]
        if name not in VIEWS:
            raise DocsError(f"unknown view {name!r} in <!-- rendered: {match.group('spec')} -->")
        out = VIEWS[name](ref, *args)
        body = f"\n{out}\n" if "\n" in match.group("body") or "\n" in out else out
        return f"<!-- rendered: {match.group('spec')} -->{body}<!-- /rendered -->"
    return MARKER.sub(replace, text)


def pages(root: Path = ROOT) -> list[Path]:
    found: list[Path] = []
    for pattern in PAGES:
        found += sorted(root.glob(pattern))
    return found


def stale(root: Path = ROOT, reference: Path | None = None) -> dict[Path, tuple[str, str]]:
    """{page: (text, rendered text)} for every page whose rendered parts disagree with the reference results."""
    ref = Reference(reference or root / REFERENCE)
    found = {}
    for page in pages(root):
        text = page.read_text()
        new = render_text(text, ref)
        if new != text:
            found[page] = (text, new)
    return found


def check(root: Path = ROOT, reference: Path | None = None) -> dict[Path, str]:
    """{page: unified diff} for every page whose rendered parts disagree with the reference results."""
    return {page: "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                               f"{page.relative_to(root)} (page)",
                                               f"{page.relative_to(root)} (rendered)"))
            for page, (text, new) in stale(root, reference).items()}


def render(root: Path = ROOT) -> list[Path]:
    """Rewrite every page whose rendered parts are stale; returns the pages changed."""
    changed = stale(root)
    for page, (_, new) in changed.items():
        page.write_text(new)
    return list(changed)


# ---------------------------------------------------------------------------------------------------- updating
def update(table: str, results: Path, root: Path = ROOT, groups: Sequence[str] | None = None,
           merge: bool = False, into: str | None = None) -> Path:
    """Copy a run's `<table>.csv` (or the folder `<table>/` of CSVs, e.g. ablations) with its resolved config,
    this machine's lscpu and the run's rule times into docs/reference/<into or table>/, then render every page.

    `into` names another reference folder: an experiment's run of a default table (e.g. Table 1 under
    config/experiments/table1_fp32.yaml into `table1_fp32`) beside the default's reference.

    `groups` keeps only those rule-time groups (experiment folders, e.g. `cifar10_binary`): a results folder shared
    by several targets (the study and Table 13) holds every target's jobs, and a table's reference should time its
    own. With `merge`, the reference's rule times of every other group are kept and the named groups' rows
    replaced or added: a study grown by a few regimes run later in the same folder. Raises ValueError (before
    anything is copied) when a named group has no job in the run, or `merge` comes without `groups`."""
    results = Path(results)
    if merge and not groups:
        raise ValueError("--merge needs --groups: the rule-time groups to replace or add")
    times = _rule_times(results / "benchmarks" / "rules", groups)
    dest = root / REFERENCE / (into or table)
    if merge and (dest / "rule_times.csv").exists():
        kept = pd.read_csv(dest / "rule_times.csv")
        times = pd.concat([kept[~kept["group"].isin(groups)], times], ignore_index=True)
    dest.mkdir(parents=True, exist_ok=True)
    csv, folder = results / f"{table}.csv", results / table
    if csv.exists():
        shutil.copy2(csv, dest / csv.name)
        config = csv.with_suffix(".config.yaml")
    elif folder.is_dir() and list(folder.glob("*.csv")):
        for f in folder.glob("*.csv"):
            shutil.copy2(f, dest / f.name)
        config = next(iter(sorted(folder.glob("*.config.yaml"))), folder / "none")
    else:
        raise FileNotFoundError(f"neither {csv} nor a folder {folder} of CSVs")
    if config.exists():
        shutil.copy2(config, dest / "config.yaml")
    else:  # a benchmark CSV carries its config as JSON in every row
        df = pd.read_csv(csv)
        if "config" in df.columns:
            import yaml
            (dest / "config.yaml").write_text(yaml.safe_dump(json.loads(df["config"].iloc[0]), sort_keys=True))
    for stale in ("lscpu.txt", "machine.txt"):  # the old run's machine must not describe the new run
        (dest / stale).unlink(missing_ok=True)
    try:
        (dest / "lscpu.txt").write_text(subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout)
    except (OSError, subprocess.CalledProcessError):
        (dest / "machine.txt").write_text("machine not recorded: lscpu was not available where the run was copied\n")
    if times is not None:
        times.to_csv(dest / "rule_times.csv", index=False)
    render(root)
    return dest


def _rule_times(rules: Path, groups: Sequence[str] | None) -> pd.DataFrame | None:
    """The run's rule times (None when it kept none), restricted to `groups` when given."""
    if not rules.is_dir():
        if groups:
            raise ValueError(f"--groups {' '.join(groups)}: the run has no rule times ({rules} is missing)")
        return None
    from rpg.experiments.rule_times import rule_times
    times = rule_times(rules)
    if groups:
        missing = sorted(set(groups) - set(times["group"]))
        if missing:
            raise ValueError(f"no rule times of group(s) {', '.join(missing)} under {rules}; "
                             f"its groups: {', '.join(sorted(times['group'].unique()))}")
        times = times[times["group"].isin(groups)]
    return times


# -------------------------------------------------------------------------------------------------------- CLI
def add_parser(sub: argparse._SubParsersAction, formatter) -> None:
    d = sub.add_parser("docs", formatter_class=formatter, help="render README / docs tables from reference results",
                       description=__doc__)
    actions = d.add_subparsers(dest="docs_command", required=True, metavar="ACTION",
                               help="render, check or update the pages")
    actions.add_parser("render", help="rewrite the rendered parts of README.md and docs/*.md in place")
    actions.add_parser("check", help="exit 1 with a diff when a page disagrees with its reference CSVs")
    u = actions.add_parser("update", help="copy a new run's table into docs/reference/<table>/, then render")
    u.add_argument("table", help="table11, table16, table12, seen_summary, table13, table1, ablations, ...")
    u.add_argument("results", type=Path, help="the run's results folder (holds <table>.csv)")
    u.add_argument("--groups", nargs="+", metavar="GROUP",
                   help="keep only these rule-time groups (folders under results/benchmarks/rules)")
    u.add_argument("--merge", action="store_true",
                   help="with --groups: keep the reference's other groups, replace or add only these")
    u.add_argument("--into", metavar="NAME", help="the reference folder docs/reference/NAME (default: the table's)")
    d.add_argument("--root", type=Path, default=ROOT, help="the checkout whose pages to render")
    d.set_defaults(func=cmd_docs)


def cmd_docs(args: argparse.Namespace) -> int:
    if args.docs_command == "render":
        for page in render(args.root):
            print(f"rendered {page.relative_to(args.root)}")
        return 0
    if args.docs_command == "check":
        diffs = check(args.root)
        for diff in diffs.values():
            sys.stdout.write(diff)
        if diffs:
            print(f"{len(diffs)} page(s) disagree with docs/reference: run `rpg docs render`", file=sys.stderr)
        return 1 if diffs else 0
    try:
        dest = update(args.table, args.results, args.root, args.groups, args.merge, args.into)
    except ValueError as err:
        print(f"rpg docs update: {err}", file=sys.stderr)
        return 2
    print(f"updated {dest.relative_to(args.root)} and rendered the pages")
    return 0
