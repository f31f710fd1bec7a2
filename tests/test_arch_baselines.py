"""Baselines and novelty beside every generated Table 1 row (spec §2d): each checked against an independent
computation on small synthetic collections (seconds on one CPU thread)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from torch import nn

from rpg.experiments.arch_study import study as ax
from rpg.config import config_from_dict
from rpg.experiments.arch_study.baselines import BASELINES, compare_with_collection, summary_columns
from rpg.tokenize import VAR_FLOOR
from rpg.utils import save_safetensors_atomic
from rpg.vision.evaluate import ImageEvaluator
from rpg.weightspace import (flatten, gaussian_samples, nearest_and_mean_distance, nearest_distance,
                             nearest_neighbours, noise_at_distance, random_averages, unflatten)


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def _collection(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """k state dicts of one architecture (with BatchNorm buffers and an integer num_batches_tracked)."""
    torch.manual_seed(seed)
    sds = []
    for i in range(k):
        net = _bn_net()
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].num_batches_tracked.fill_(7)
        sds.append({key: v.detach().clone() for key, v in net.state_dict().items()})
    return sds


def test_flatten_round_trip_keeps_non_coordinates_and_clips_running_var():
    sds = _collection(2)
    points = flatten(sds)
    assert points.shape == (2, 24 + 6 + 4 * 6 + 18 + 3)  # Linear, BN weight/bias/mean/var, Linear
    back = unflatten(points[1], sds[0])
    assert all(torch.equal(back[k], sds[1][k]) for k in sds[1] if k != "1.num_batches_tracked")
    assert back["1.num_batches_tracked"].dtype == torch.long and int(back["1.num_batches_tracked"]) == 7
    negative = unflatten(points[0] - 100.0, sds[0])
    assert float(negative["1.running_var"].min()) == pytest.approx(VAR_FLOOR)
    with pytest.raises(ValueError, match="entries"):
        unflatten(points[0][:-1], sds[0])


def test_nearest_distance_matches_cdist_and_an_exact_copy_is_zero():
    gen = torch.Generator().manual_seed(0)
    ref, pts = torch.randn(7, 50, generator=gen), torch.randn(4, 50, generator=gen)
    assert torch.allclose(nearest_distance(pts, ref), torch.cdist(pts.double(), ref.double()).min(1).values.float(),
                          atol=1e-5)
    assert torch.equal(nearest_distance(ref[[2, 5]], ref), torch.zeros(2))  # copies: exactly 0
    own = torch.cdist(ref.double(), ref.double()) + torch.diag(torch.full((7,), float("inf")))
    assert torch.allclose(nearest_distance(ref, ref, exclude_self=True), own.min(1).values.float(), atol=1e-5)


def test_nearest_and_mean_distance_in_one_pass_match_cdist():
    """The fused pass gives nearest_distance's values exactly and the mean distance of cdist, to the others with
    exclude_self (one point alone: nearest inf, mean NaN)."""
    gen = torch.Generator().manual_seed(1)
    ref, pts = torch.randn(7, 50, generator=gen), torch.randn(4, 50, generator=gen)
    nearest, mean = nearest_and_mean_distance(pts, ref)
    assert torch.equal(nearest, nearest_distance(pts, ref))
    assert torch.allclose(mean, torch.cdist(pts.double(), ref.double()).mean(1).float(), atol=1e-5)
    nearest, mean = nearest_and_mean_distance(ref, ref, exclude_self=True)
    assert torch.equal(nearest, nearest_distance(ref, ref, exclude_self=True))
    assert torch.allclose(mean, (torch.cdist(ref.double(), ref.double()).sum(1) / 6).float(), atol=1e-5)
    alone = nearest_and_mean_distance(ref[:1], ref[:1], exclude_self=True)
    assert alone[0].item() == float("inf") and alone[1].isnan().all()


def test_nearest_neighbours_indices_match_cdist_argmin_and_skip_self():
    gen = torch.Generator().manual_seed(1)
    ref, pts = torch.randn(9, 30, generator=gen), torch.randn(5, 30, generator=gen)
    _, index = nearest_neighbours(pts, ref)
    assert torch.equal(index, torch.cdist(pts.double(), ref.double()).argmin(1))
    assert torch.equal(nearest_neighbours(ref[[3, 7]], ref)[1], torch.tensor([3, 7]))  # a copy finds itself
    own = torch.cdist(ref.double(), ref.double()) + torch.diag(torch.full((9,), float("inf")))
    _, index = nearest_neighbours(ref, ref, exclude_self=True)
    assert torch.equal(index, own.argmin(1)) and not torch.any(index == torch.arange(9))


def test_average_of_16_is_the_mean_of_16_random_checkpoints():
    """Same seed, drawn independently: torch.randperm picks 16 of 20, their torch.stack mean is the baseline;
    with 5 checkpoints every sample is the mean of all 5."""
    sds = _collection(20)
    points = flatten(sds)
    got = random_averages(points, 3, 16, torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(4)
    for row in got:
        picked = torch.randperm(20, generator=gen)[:16].tolist()
        direct = torch.stack([sds[i]["0.weight"] for i in picked]).mean(0)
        assert torch.allclose(unflatten(row, sds[0])["0.weight"], direct, atol=1e-6)
    few = random_averages(points[:5], 2, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(few, points[:5].mean(0).expand(2, -1), atol=1e-6)


def test_gaussian_matches_the_collections_mean_and_std_per_parameter():
    """20,000 draws: sample mean within 5 standard errors, sample std within 3 % of the collection's."""
    points = flatten(_collection(6))
    draws = gaussian_samples(points, 20_000, torch.Generator().manual_seed(1))
    mean, std = points.mean(0), points.std(0)
    assert ((draws.mean(0) - mean).abs() <= 5 * std / 20_000 ** 0.5 + 1e-7).all()
    assert torch.allclose(draws.std(0), std, rtol=0.03)
    assert torch.equal(gaussian_samples(points[:1], 3, torch.Generator()), points[:1].expand(3, -1))  # std 0


def test_noise_sits_at_the_requested_distance_from_its_source():
    points = flatten(_collection(10)) * 10  # checkpoints far apart relative to the noise
    gen = torch.Generator().manual_seed(2)
    noisy = noise_at_distance(points[torch.randint(0, len(points), (8,), generator=gen)], 0.25, gen)
    assert torch.allclose(nearest_distance(noisy, points), torch.full((8,), 0.25), atol=1e-4)


class _Predictor:
    """A fixed-input 'evaluator': the argmax of the network on 200 fixed points."""

    def __init__(self) -> None:
        self.x = torch.randn(200, 4, generator=torch.Generator().manual_seed(9))
        self.net = _bn_net().eval()

    def __call__(self, sd) -> torch.Tensor:
        self.net.load_state_dict(sd)
        with torch.no_grad():
            return self.net(self.x).argmax(1)


def test_compare_with_collection_rows_and_novelty():
    """Exact copies of checkpoints have novelty 0 (L2) and max IoU 1; noise gets the generated models' mean
    novelty; every baseline is sampled as often as the generator; originals are compared with the others."""
    sds = _collection(12)
    predict = _Predictor()
    labels = predict(sds[0])  # checkpoint 0 is "perfect": its wrong set is empty
    generated = [sds[3], sds[7], sds[3]]
    table, settings = compare_with_collection(sds, generated, predict, labels, seed=0)
    assert table.kind.value_counts().to_dict() == {"original": 12, "rpg": 3, **{k: 3 for k in BASELINES}}
    gen = table[table.kind == "rpg"]
    assert (gen.l2_novelty == 0).all() and (gen.max_iou_original == 1).all()
    assert settings == {"noise_l2": 0.0, "average_of": 12}
    assert torch.allclose(torch.tensor(table[table.kind == "noise"].l2_novelty.to_numpy()), torch.zeros(3))
    orig = table[table.kind == "original"]
    points = flatten(sds).double()
    own = (torch.cdist(points, points) + torch.diag(torch.full((12,), float("inf")))).min(1).values
    assert torch.allclose(torch.tensor(orig.l2_novelty.to_numpy()).double(), own, rtol=1e-4)
    accuracy = [float((predict(sd) == labels).float().mean()) for sd in sds]
    assert orig.accuracy.tolist() == pytest.approx(accuracy) and orig.accuracy.iloc[0] == 1.0
    # perturbed copies: the noise baseline is matched to their mean novelty
    moved = [{k: v + 0.01 * torch.randn(v.shape) if v.is_floating_point() else v for k, v in sd.items()}
             for sd in generated]
    table, settings = compare_with_collection(sds, moved, predict, labels, seed=0)
    novelty = table[table.kind == "rpg"].l2_novelty.mean()
    assert novelty > 0 and settings["noise_l2"] == pytest.approx(novelty)
    assert table[table.kind == "noise"].l2_novelty.to_numpy() == pytest.approx([novelty] * 3, rel=1e-3)


def test_state_dict_predictor_equals_predict_on_the_loaded_model():
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(6) % 2
    ev = ImageEvaluator(images, labels, img_size=8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    other = nn.Sequential(nn.Flatten(), nn.Linear(192, 2))
    assert torch.equal(ev.state_dict_predictor(other)(model.state_dict()), ev.predict(model))


def test_samples_csv_and_table_row_carry_baselines_novelty_and_the_training_budget(tmp_path):
    """_with_sources fills run / file / the collected accuracy; summarise_variant turns a samples.csv into a row
    with every baseline's accuracy, novelty columns, best_step, train_steps and whether the maximum was hit."""
    sds = _collection(4)
    files = []
    for i, sd in enumerate(sds):
        files.append(tmp_path / f"{i:02d}.safetensors")
        save_safetensors_atomic(sd, files[-1], {"run": i // 2, "test_accuracy": 0.5 + i / 100})
    predict = _Predictor()
    labels = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(3))  # nobody is perfect
    table, settings = compare_with_collection(sds, sds[:2], predict, labels, seed=1)
    table = ax._with_sources(table, files, tmp_path / "models")
    orig, gen = table[table.kind == "original"], table[table.kind == "rpg"]
    assert orig.run.tolist() == [0, 0, 1, 1] and orig.accuracy.tolist() == pytest.approx([0.5, 0.51, 0.52, 0.53])
    assert gen.file.tolist() == [str(tmp_path / "models" / f"{i:02d}.safetensors") for i in range(2)]
    assert (table[table.kind.isin(BASELINES)].run == -1).all()
    table["architecture"], table["variant"] = "mlp", "mamba-2d-perm-runs2-tok16"
    table.to_csv(tmp_path / "samples.csv", index=False)
    training = {"n_params_generated": 93, "n_tokens": 8, "token_size": 16, "steps": 300, "max_steps": 1000,
                "best_step": 200, "hit_max_steps": False, "stopped_early": True, "seconds": 1.0,
                "peak_rss_mb": 1.0, "generator_params": 10}
    (tmp_path / "summary.json").write_text(json.dumps({
        "training": training, "seconds_per_model": 0.1, "sampler": "ddim", "sample_steps": 50,
        "baselines": settings}))
    row = ax.summarise_variant(tmp_path / "samples.csv")
    assert (row["best_step"], row["train_steps"], row["max_steps"]) == (200, 300, 1000)
    assert row["hit_max_steps"] is False and row["stopped_early"] is True
    for kind in BASELINES:
        acc = table[table.kind == kind].accuracy * 100
        assert row[f"{kind}_mean_acc"] == pytest.approx(acc.mean()) and row[f"{kind}_best_acc"] == pytest.approx(acc.max())
    assert row["rpg_l2_novelty"] == 0 and row["rpg_max_iou_original"] == 1
    assert row["original_l2_novelty"] == pytest.approx(orig.l2_novelty.mean()) and row["rpg_novelty_ratio"] == 0
    best_baseline = max(row[f"{k}_mean_acc"] for k in BASELINES)
    assert row["best_baseline_acc"] == best_baseline
    assert row[f"{row['best_baseline']}_mean_acc"] == best_baseline
    assert row["rpg_mean_minus_baseline_acc"] == pytest.approx(row["rpg_mean_acc"] - best_baseline)
    assert summary_columns(table)["original_max_iou_original"] == pytest.approx(orig.max_iou_original.mean())


def test_compare_with_a_scored_subset_fewer_baselines_and_a_variant_kind():
    """Only the scored checkpoints are original rows (their l2_novelty against all the others, their max IoU
    against the other scored ones); baselines drawn n_baseline times; a variant kind is scored like the samples."""
    sds = _collection(10)
    predict = _Predictor()
    labels = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(5))
    scored = [4, 9]
    variant = [{k: v + 0.05 if k.endswith("running_mean") else v for k, v in sd.items()} for sd in sds[:3]]
    table, _ = compare_with_collection(sds, sds[:3], predict, labels, seed=0, scored=scored, n_baseline=2,
                                       variants={"rpg_bn_recomputed": variant})
    counts = table.kind.value_counts().to_dict()
    assert counts == {"original": 2, "rpg": 3, "rpg_bn_recomputed": 3, **{k: 2 for k in BASELINES}}
    orig = table[table.kind == "original"]
    assert orig["index"].tolist() == scored
    points = flatten(sds).double()
    own = (torch.cdist(points, points) + torch.diag(torch.full((10,), float("inf")))).min(1).values[scored]
    assert torch.allclose(torch.tensor(orig.l2_novelty.to_numpy()).double(), own, rtol=1e-4)
    gen = table[table.kind == "rpg"]
    assert (gen.l2_novelty == 0).all()  # exact copies of collection members, scored or not
    moved = table[table.kind == "rpg_bn_recomputed"]
    assert (moved.l2_novelty > 0).all()
    known = torch.stack([predict(sds[i]) for i in scored]).to(torch.int16)  # as saved at collection
    again, _ = compare_with_collection(sds, sds[:3], predict, labels, seed=0, scored=scored, n_baseline=2,
                                       variants={"rpg_bn_recomputed": variant}, scored_preds=known)
    assert again.equals(table)
    row = summary_columns(table)
    assert "rpg_bn_recomputed_mean_acc" in row and "rpg_bn_recomputed_l2_novelty" in row


def test_recomputed_batchnorm_statistics_are_the_data_average():
    """recompute_batchnorm_statistics: running mean / var become the (unbiased) statistics of the images' features
    before the BN layer, whatever the generated values were; weights untouched; the mode is given back."""
    from rpg.vision.evaluate import recompute_batchnorm_statistics

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5)).eval()
    net[2].running_mean.fill_(3.0)
    net[2].running_var.fill_(9.0)
    weights = net[1].weight.clone()
    images = torch.randint(0, 256, (64, 3, 2, 2), dtype=torch.uint8)
    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255

    recompute_batchnorm_statistics(net, images, prepare, batch_size=64)
    feats = net[1](net[0](prepare(images))).detach()
    assert torch.allclose(net[2].running_mean, feats.mean(0), atol=1e-5)
    assert torch.allclose(net[2].running_var, feats.var(0, unbiased=True), atol=1e-4)
    assert torch.equal(net[1].weight, weights) and not net.training and net[2].momentum == 0.1


def _replicate(directory, variant: str, generated: list[float], best_step: int):
    """A variant's samples.csv and summary.json as generate_variant writes them (no novelty columns)."""
    directory.mkdir(parents=True)
    rows = [("original", 0.6), ("original", 0.62)] + [("rpg", a) for a in generated]
    table = pd.DataFrame(rows, columns=["kind", "accuracy"])
    table["architecture"], table["variant"] = "cnn_m", variant
    table.to_csv(directory / "samples.csv", index=False)
    training = {"n_params_generated": 93, "n_tokens": 8, "token_size": 16, "steps": best_step, "max_steps": 800,
                "best_step": best_step, "hit_max_steps": best_step == 800, "stopped_early": False, "seconds": 10.0,
                "peak_rss_mb": 1.0, "generator_params": 10}
    (directory / "summary.json").write_text(json.dumps({"training": training, "seconds_per_model": 0.1,
                                                        "sampler": "ddim", "sample_steps": 10}))
    return directory / "samples.csv"


def test_ablation_rows_are_means_over_replicates_with_their_spread(tmp_path):
    """write_ablation: one row per setting in the configured order, mean and sample std over its replicates (the
    seeds), n_seeds, hit_max_steps if any replicate hit it; every replicate's own row in the replicates file."""
    csvs = [_replicate(tmp_path / "a0", "mamba-2d-perm-runs3-tok16", [0.50, 0.54], 400),
            _replicate(tmp_path / "a1", "mamba-2d-perm-runs3-tok16-seed1", [0.40, 0.44], 800),
            _replicate(tmp_path / "b0", "mamba-2d-noperm-runs3-tok16", [0.10, 0.12], 200),
            _replicate(tmp_path / "b1", "mamba-2d-noperm-runs3-tok16-seed1", [0.14, 0.16], 600)]
    labels = ["with", "with", "without", "without"]
    out, replicates = tmp_path / "permutation.csv", tmp_path / "permutation.replicates.csv"
    table = ax.write_ablation(config_from_dict({}), "permutation", labels, csvs, out, replicates)
    assert table.setting.tolist() == ["with", "without"] and (table.n_seeds == 2).all()
    with_state = table.iloc[0]
    assert with_state.rpg_mean_acc == pytest.approx((52 + 42) / 2)
    assert with_state.rpg_mean_acc_std == pytest.approx(pd.Series([52.0, 42.0]).std(), abs=1e-4)  # rounded
    assert with_state.best_step == 600
    assert with_state.best_step_std == pytest.approx(pd.Series([400, 800]).std(), abs=1e-4)
    assert bool(with_state.hit_max_steps) and not bool(table.iloc[1].hit_max_steps)
    assert with_state.variant == "mamba-2d-perm-runs3-tok16 mamba-2d-perm-runs3-tok16-seed1"
    per_seed = pd.read_csv(replicates)
    assert len(per_seed) == 4 and per_seed.rpg_mean_acc.tolist() == pytest.approx([52, 42, 11, 15])
    assert pd.read_csv(out).rpg_mean_acc_std.tolist() == table.rpg_mean_acc_std.tolist()


def test_spread_measures_how_far_models_of_one_kind_are_from_one_another():
    """l2_spread: the mean L2 to the other models of the same kind (originals: the other checkpoints, also when only
    some are scored); identical samples have spread 0, and the summary relates the generated spread to the
    collection's (`rpg_spread_ratio`)."""
    sds = _collection(6)
    predict = _Predictor()
    labels = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(5))
    points = flatten(sds).double()
    pairwise = torch.cdist(points, points)
    others = pairwise.sum(1) / (len(sds) - 1)
    for scored in (None, [1, 4]):
        table, _ = compare_with_collection(sds, [sds[2], sds[2], sds[2]], predict, labels, seed=0, scored=scored)
        orig, gen = table[table.kind == "original"], table[table.kind == "rpg"]
        expected = others if scored is None else others[scored]
        assert torch.allclose(torch.tensor(orig.l2_spread.to_numpy()).double(), expected, rtol=1e-4)
        assert (gen.l2_spread == 0).all()
        row = summary_columns(table)
        assert row["rpg_spread_ratio"] == 0 and row["original_l2_spread"] == pytest.approx(orig.l2_spread.mean())
    table, _ = compare_with_collection(sds, [sds[0], sds[3]], predict, labels, seed=0)
    gen = table[table.kind == "rpg"]
    assert gen.l2_spread.to_numpy() == pytest.approx([float(pairwise[0, 3])] * 2, rel=1e-4)
    assert summary_columns(table)["rpg_spread_ratio"] == pytest.approx(float(pairwise[0, 3] / others.mean()),
                                                                            rel=1e-4)
