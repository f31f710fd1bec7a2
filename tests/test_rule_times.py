"""rpg.experiments.rule_times: Snakemake benchmark files gathered into the per-target time table."""

from __future__ import annotations

import pytest

from rpg.experiments.rule_times import group_totals, main, rule_times

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def _bench(path, wall, cpu, rss):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{wall}\t0:00:00\t{rss}\t1\t1\t1\t0\t0\t150.0\t{cpu}\n")


def test_rule_times_groups_by_folder(tmp_path, capsys):
    _bench(tmp_path / "cifar10_binary" / "backbone.tsv", 100.0, 180.0, 900.0)
    _bench(tmp_path / "cifar10_binary" / "zoo.tsv", 50.0, 90.0, 1200.0)
    _bench(tmp_path / "table1" / "collect_cnn_s.tsv", 30.0, 29.0, 400.0)
    times = rule_times(tmp_path)
    assert set(times.job) == {"backbone", "zoo", "collect_cnn_s"}
    totals = group_totals(times).set_index("group")
    assert totals.loc["cifar10_binary", "wall_s"] == 150.0 and totals.loc["cifar10_binary", "cpu_s"] == 270.0
    assert totals.loc["cifar10_binary", "max_rss_mb"] == 1200.0 and totals.loc["table1", "jobs"] == 1
    main([str(tmp_path), "--out", str(tmp_path / "times.csv")])
    assert "collect_cnn_s" in capsys.readouterr().out and (tmp_path / "times.csv").exists()


def test_rule_times_refuses_empty_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Snakemake benchmark files"):
        rule_times(tmp_path)
    (tmp_path / "other.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not a Snakemake benchmark file"):
        rule_times(tmp_path)
