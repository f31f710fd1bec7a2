"""The pages (README.md, docs/*.md) agree with the reference results they are rendered from, and their links resolve.

`rpg docs render` writes every measured number of a page from docs/reference/ (rpg/cli/docs.py); a number edited by
hand in a page, or a reference CSV edited without re-rendering, makes `rpg docs check` fail with a diff.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO_ROOT

from rpg.cli import docs
from rpg.cli.main import main

PAGES = docs.pages(REPO_ROOT)
READMES = [REPO_ROOT / p for p in ("config/README.md", "benchmarks/README.md", "probes/README.md",
                                   "docs/reference/README.md")]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _copy_checkout(tmp_path: Path) -> Path:
    """README.md, docs/ (pages and reference results) in a scratch root."""
    root = tmp_path / "repo"
    shutil.copytree(REPO_ROOT / "docs", root / "docs")
    shutil.copy2(REPO_ROOT / "README.md", root / "README.md")
    return root


def test_readme_and_docs_pages_exist_and_readme_is_short():
    names = {p.relative_to(REPO_ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/results.md", "docs/unseen_study.md", "docs/table1.md", "docs/paper_profile.md",
            "docs/benchmarks.md", "docs/what_happens_when.md"} <= names
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_page_agrees_with_its_reference_csvs(page):
    ref = docs.Reference(REPO_ROOT / docs.REFERENCE)
    text = page.read_text()
    rendered = docs.render_text(text, ref)
    assert rendered == text, (f"{page.name} disagrees with docs/reference (run `rpg docs render`):\n"
                              + "".join(docs.check(REPO_ROOT).get(page, "")))


def test_every_page_renders_something():
    """The README's headline and each docs page with measured numbers carry rendered blocks."""
    for name in ("README.md", "docs/results.md", "docs/unseen_study.md", "docs/table1.md", "docs/benchmarks.md"):
        assert docs.MARKER.search((REPO_ROOT / name).read_text()), name


def test_check_fails_when_a_reference_csv_is_edited(tmp_path, capsys):
    root = _copy_checkout(tmp_path)
    assert main(["docs", "--root", str(root), "check"]) == 0
    csv = root / "docs" / "reference" / "table16" / "table16.csv"
    lines = csv.read_text().splitlines(True)
    mean = next(i for i, line in enumerate(lines) if line.startswith("mean,"))
    cells = lines[mean].split(",")
    cells[4] = "99.99"  # rpg_best_acc of the mean row, shown in README's headline and docs/results.md
    lines[mean] = ",".join(cells)
    csv.write_text("".join(lines))
    capsys.readouterr()
    assert main(["docs", "--root", str(root), "check"]) == 1
    diff = capsys.readouterr().out
    assert "99.99" in diff and "README.md" in diff and "docs/results.md" in diff
    # `render` brings the pages back in line, and check passes again.
    assert main(["docs", "--root", str(root), "render"]) == 0
    assert main(["docs", "--root", str(root), "check"]) == 0


def test_check_fails_when_a_number_is_typed_into_a_page(tmp_path):
    root = _copy_checkout(tmp_path)
    readme = root / "README.md"
    text = readme.read_text()
    marker = "<!-- rendered: wins table16 -->"
    start = text.index(marker) + len(marker)
    readme.write_text(text[:start] + "1 win, 4 ties, 15 losses" + text[text.index("<!-- /rendered -->", start):])
    assert main(["docs", "--root", str(root), "check"]) == 1


def _table13_run(tmp_path: Path, root: Path, jobs: list[tuple[str, str]]) -> Path:
    """A results folder holding the reference table13.csv and one Snakemake benchmark file (12.5 s) per
    (group, job)."""
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy2(root / "docs/reference/table13/table13.csv", results / "table13.csv")
    for group, job in jobs:
        (results / "benchmarks/rules" / group).mkdir(parents=True, exist_ok=True)
        (results / "benchmarks/rules" / group / f"{job}.tsv").write_text(
            "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
            "12.5\t0:00:12\t100\t0\t0\t0\t0\t0\t50\t6.0\n")
    return results


def test_update_copies_a_run_and_renders(tmp_path):
    root = _copy_checkout(tmp_path)
    results = _table13_run(tmp_path, root, [("cifar10_binary", "table13")])
    (results / "table13.config.yaml").write_text("seed: 1\n")
    main(["docs", "--root", str(root), "update", "table13", str(results)])
    dest = root / "docs/reference/table13"
    assert (dest / "config.yaml").read_text() == "seed: 1\n"
    assert "table13" in (dest / "rule_times.csv").read_text()
    assert main(["docs", "--root", str(root), "check"]) == 0


def test_update_into_another_reference_folder(tmp_path):
    """--into: an experiment's run of a default table lands in its own folder; the default's stays as it was."""
    root = _copy_checkout(tmp_path)
    results = _table13_run(tmp_path, root, [("cifar10_binary", "table13")])
    (results / "table13.config.yaml").write_text("seed: 2\n")
    before = (root / "docs/reference/table13/config.yaml").read_text()
    main(["docs", "--root", str(root), "update", "table13", str(results), "--into", "table13_variant"])
    assert (root / "docs/reference/table13_variant/config.yaml").read_text() == "seed: 2\n"
    assert (root / "docs/reference/table13_variant/table13.csv").is_file()
    assert (root / "docs/reference/table13/config.yaml").read_text() == before


def test_update_keeps_only_the_named_rule_time_groups(tmp_path, capsys):
    root = _copy_checkout(tmp_path)
    results = _table13_run(tmp_path, root, [("cifar10_binary", "table13"), ("study/domains_few", "train_rpg")])
    before = (root / "docs/reference/table13/rule_times.csv").read_text()
    # A group the run lacks is refused before anything is copied, naming the groups it has.
    assert main(["docs", "--root", str(root), "update", "table13", str(results), "--groups", "nope"]) == 2
    assert "cifar10_binary" in capsys.readouterr().err
    assert (root / "docs/reference/table13/rule_times.csv").read_text() == before
    main(["docs", "--root", str(root), "update", "table13", str(results), "--groups", "cifar10_binary"])
    kept = pd.read_csv(root / "docs/reference/table13/rule_times.csv")
    assert list(kept["group"]) == ["cifar10_binary"] and list(kept["job"]) == ["table13"]


def test_unknown_view_is_a_user_error(tmp_path, capsys):
    root = _copy_checkout(tmp_path)
    (root / "docs" / "bad.md").write_text("<!-- rendered: no_such_view -->\n<!-- /rendered -->\n")
    assert main(["docs", "--root", str(root), "check"]) == 2
    assert "no_such_view" in capsys.readouterr().err


def test_relative_links_point_to_existing_files():
    broken = []
    for page in PAGES + READMES:
        for match in LINK.finditer(page.read_text()):
            target = (match.group(1) or match.group(2)).split("#")[0]
            if not target or re.match(r"[a-z]+:", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO_ROOT)} -> {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_rule_groups_view_sums_each_group(tmp_path):
    from rpg.cli.doc_views import VIEWS, Reference

    run = tmp_path / "run"
    run.mkdir()
    (run / "rule_times.csv").write_text(
        "group,job,wall_s,cpu_s,max_rss_mb,mean_load\n"
        "a,split,10,8,500,80\na,train_rpg,100,190,1200,190\nb,zoo,50,90,2000,180\n")
    table = VIEWS["rule_groups"](Reference(tmp_path), "run")
    rows = [line for line in table.splitlines() if line.startswith("| `") or line.startswith("| **")]
    assert rows == ["| `a` | 2 | 110 | 198 | 1,200 |", "| `b` | 1 | 50 | 90 | 2,000 |",
                    "| **all** | 3 | 160 | 288 | 2,000 |"]


def test_rule_times_vs_view_compares_the_shared_jobs(tmp_path):
    from rpg.cli.doc_views import VIEWS, DocsError, Reference

    header = "group,job,wall_s,cpu_s,max_rss_mb,mean_load\n"
    for name, body in (("a", "t,train_x,100,90,1,1\nt,train_y,50,45,1,1\nt,collect,9,9,1,1\n"),
                       ("b", "t,train_x,40,40,1,1\nt,train_y,25,25,1,1\nt,other,3,3,1,1\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rule_times.csv").write_text(header + body)
    table = VIEWS["rule_times_vs"](Reference(tmp_path), "a", "b", "t", "train_")
    rows = [line for line in table.splitlines() if line.startswith("| `") or line.startswith("| **")]
    assert rows == ["| `train_x` | 100 | 40 | 0.40 |", "| `train_y` | 50 | 25 | 0.50 |",
                    "| **these jobs** | 150 | 65 | 0.43 |"]
    with pytest.raises(DocsError, match="share no job"):
        VIEWS["rule_times_vs"](Reference(tmp_path), "a", "b", "t", "collect")
    (tmp_path / "c").mkdir()  # the same jobs under another group name (a run laid out differently): group "*"
    (tmp_path / "c" / "rule_times.csv").write_text(header + (tmp_path / "b" / "rule_times.csv").read_text()
                                                   .split("\n", 1)[1].replace("t,", "u,"))
    across = VIEWS["rule_times_vs"](Reference(tmp_path), "a", "c", "*", "train_")
    assert [line for line in across.splitlines() if line.startswith("| `") or line.startswith("| **")] == rows
    with pytest.raises(DocsError, match="share no job"):
        VIEWS["rule_times_vs"](Reference(tmp_path), "a", "c", "t", "train_")


def test_finetune_views_read_the_named_run(tmp_path):
    from rpg.cli.doc_views import VIEWS, DocsError, Reference

    other = tmp_path / "finetune_few" / "other"
    other.mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "docs/reference/finetune_few/finetune_few.csv", other / "finetune_few.csv")
    ref = Reference(tmp_path)
    table = VIEWS["finetune_few"](ref, "1", "finetune_few/other/finetune_few")
    prose = VIEWS["finetune_few_needs"](ref, "1", "finetune_few/other/finetune_few")
    assert table.startswith("| start | tasks | k = ") and "`rpg`" in table
    assert "RPG's sample (chosen on the k images)" in prose
    # The default run's file is not in this reference: the views read the named run's, not it.
    with pytest.raises(DocsError, match="no reference file"):
        VIEWS["finetune_few"](ref)


def test_finetune_views_split_the_fixed_and_early_stopped_recipes(tmp_path):
    from rpg.cli.doc_views import VIEWS, DocsError, Reference

    run = pd.read_csv(REPO_ROOT / "docs/reference/finetune_few/finetune_few.csv", dtype={"k": str})
    run = run[~run.arm.str.endswith(("_early", "_cv"))]  # the fixed recipe; its arms stand in for the others
    early = run[run.arm.isin(["rpg", "fresh"])].assign(arm=lambda d: d.arm + "_early")
    cv = run[run.arm == "rpg"].assign(arm="rpg_cv")
    (tmp_path / "ff").mkdir()
    pd.concat([run, early, cv]).to_csv(tmp_path / "ff/ff.csv", index=False)
    ref = Reference(tmp_path)
    both, fixed, only_early = (VIEWS["finetune_few"](ref, "1", "ff", recipe) for recipe in ("all", "fixed", "early"))
    assert "`rpg_early`" in both and "`rpg`" in both
    assert "`rpg_early`" not in fixed and "`rpg` |" in fixed
    assert [line.split(" |")[0] for line in only_early.splitlines()[2:]] == ["| `rpg_early`", "| `fresh_early`"]
    prose = VIEWS["finetune_few_needs"](ref, "1", "ff", "early")
    assert prose.startswith("RPG's sample (chosen on the k images), early-stopped:") and "fresh random head" in prose
    only_cv = VIEWS["finetune_few"](ref, "1", "ff", "cv")
    assert [line.split(" |")[0] for line in only_cv.splitlines()[2:]] == ["| `rpg_cv`"]
    assert "`rpg_cv`" in both and "`rpg_cv`" not in fixed and "`rpg_cv`" not in only_early
    assert VIEWS["finetune_few_needs"](ref, "1", "ff", "cv").startswith(
        "RPG's sample (chosen on the k images), stopped by cross-validation:")
    with pytest.raises(DocsError, match="recipe"):
        VIEWS["finetune_few"](ref, "1", "ff", "best")


def test_update_merge_replaces_only_the_named_groups(tmp_path, capsys):
    root = _copy_checkout(tmp_path)
    results = _table13_run(tmp_path, root, [("study/new", "train_rpg")])
    reference = root / "docs/reference/table13/rule_times.csv"
    before = pd.read_csv(reference)
    # --merge without --groups would drop the reference's rows: refused, nothing copied.
    assert main(["docs", "--root", str(root), "update", "table13", str(results), "--merge"]) == 2
    assert "--groups" in capsys.readouterr().err
    main(["docs", "--root", str(root), "update", "table13", str(results), "--groups", "study/new", "--merge"])
    after = pd.read_csv(reference)
    assert len(after) == len(before) + 1
    pd.testing.assert_frame_equal(after.iloc[:-1], before, check_dtype=False)
    assert after.iloc[-1][["group", "job", "wall_s"]].tolist() == ["study/new", "train_rpg", 12.5]
    # Run again: the group's rows are replaced, not appended twice.
    main(["docs", "--root", str(root), "update", "table13", str(results), "--groups", "study/new", "--merge"])
    assert len(pd.read_csv(reference)) == len(before) + 1


def test_target_times_view_adds_up_and_refuses_a_failed_run(tmp_path):
    from rpg.cli.doc_views import VIEWS, DocsError, Reference

    (tmp_path / "run").mkdir()
    header = "target,command,commit,started,finished,wall_s,rc\n"
    (tmp_path / "run/run.csv").write_text(header + "a,snakemake a,abc,t0,t1,600,0\nb,snakemake b,abc,t1,t2,90,0\n")
    ref = Reference(tmp_path)
    table = VIEWS["target_times"](ref, "run/run")
    assert "| `a` | 10.0 | 10.0 |" in table and "| `b` | 1.5 | 11.5 |" in table
    assert "| **the whole run** | 11.5 |" in table
    assert VIEWS["run_minutes"](ref, "run/run") == "12" and VIEWS["run_minutes"](ref, "run/run", "target=b") == "2"
    with pytest.raises(DocsError, match="no row"):
        VIEWS["run_minutes"](ref, "run/run", "target=c")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/run.csv").write_text(header + "a,snakemake a,abc,t0,t1,600,0\nb,snakemake b,abc,t1,t2,9,1\n")
    with pytest.raises(DocsError, match="failed"):
        VIEWS["target_times"](Reference(tmp_path), "bad/run")
