"""rpg.experiments.target_times: a run timed target by target, one row per target, nothing lost on a failure."""

from __future__ import annotations

import stat

import pandas as pd
import pytest

from rpg.experiments.target_times import COLUMNS, main, run_targets


@pytest.fixture
def fake_snakemake(tmp_path):
    """A stand-in for snakemake that logs its arguments and fails for the target `broken`."""
    script = tmp_path / "snakemake"
    script.write_text('#!/bin/sh\n'
                      'echo "$@" >> "$(dirname "$0")/calls.log"\n'
                      'case " $* " in *" broken "*) exit 3;; esac\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_one_row_per_target_in_order(tmp_path, fake_snakemake):
    out = tmp_path / "run.csv"
    table = run_targets(["results/a.csv", "b"], out, cores="2", snakemake_args=["--keep-going"],
                        snakemake=str(fake_snakemake))
    assert list(table.columns) == COLUMNS
    assert pd.read_csv(out)["target"].tolist() == ["results/a.csv", "b"]
    assert (tmp_path / "calls.log").read_text().splitlines() == ["--cores 2 results/a.csv --keep-going",
                                                                 "--cores 2 b --keep-going"]
    assert (table["rc"] == 0).all() and (table["wall_s"] >= 0).all()


def test_stops_at_a_failed_target_and_keeps_the_rows_before_it(tmp_path, fake_snakemake):
    out = tmp_path / "run.csv"
    assert main(["--out", str(out), "--snakemake", str(fake_snakemake), "a", "broken", "never"]) == 3
    written = pd.read_csv(out)
    assert written["target"].tolist() == ["a", "broken"] and written["rc"].tolist() == [0, 3]
    # A resumed run appends to the rows already there.
    assert main(["--out", str(out), "--snakemake", str(fake_snakemake), "never"]) == 0
    assert pd.read_csv(out)["target"].tolist() == ["a", "broken", "never"]


def test_refuses_a_file_that_is_not_a_target_times_table(tmp_path, fake_snakemake):
    out = tmp_path / "run.csv"
    out.write_text("group,job,wall_s\nx,y,1\n")
    with pytest.raises(ValueError, match="not a target-times table"):
        run_targets(["a"], out, snakemake=str(fake_snakemake))
    assert not (tmp_path / "calls.log").exists()
