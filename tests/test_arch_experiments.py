"""The Table 1 family's building blocks: architecture registry, checkpoint collections, variants and ablations."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rpg.experiments.arch_study import study as ax
from rpg.vision.architectures import architecture_metadata, build_model, count_parameters, model_from_metadata
from rpg.config import CollectConfig
from rpg.experiments.arch_study.collect import collection_files, pick_checkpoints, train_collection
from rpg.vision.evaluate import ImageEvaluator
from rpg.config import ConfigError, config_from_dict, paper_size
from rpg.utils import load_safetensors, read_safetensors_metadata


def test_registry_builds_rpg_cnns_and_timm_models_with_cifar_adaptations():
    assert count_parameters(build_model("rpg_cnn_s")) == 3014
    assert count_parameters(build_model("rpg_cnn_m")) == 11202
    vit = build_model("vit_tiny_patch16_224", dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3))
    assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown architecture 'resnet_does_not_exist'"):
        build_model("resnet_does_not_exist")


def test_metadata_rebuilds_the_same_model():
    kwargs = dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    model = build_model("vit_tiny_patch16_224", kwargs)
    meta = architecture_metadata("vit_tiny_patch16_224", kwargs, 32)
    rebuilt = model_from_metadata(meta, model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))
    with pytest.raises(ValueError, match="does not name its architecture"):
        model_from_metadata({})


def test_pick_checkpoints_spreads_over_the_run_and_ends_with_the_last():
    assert pick_checkpoints(50, 50) == list(range(50))
    assert pick_checkpoints(5, 50) == [9, 19, 29, 39, 49]
    assert len(pick_checkpoints(16, 50)) == 16 and pick_checkpoints(16, 50)[-1] == 49
    with pytest.raises(ValueError):
        pick_checkpoints(0, 50)
    files = collection_files(["a", "b", "c"], 50, 50)
    assert len(files) == 48 and {f.parent.name for f in files} == {"a", "b", "c"}


def test_train_collection_saves_scored_checkpoints_deterministically(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (96,), generator=gen)
    evaluator = ImageEvaluator(images[:32], labels[:32])
    recipe = CollectConfig(epochs=1, batch_size=32, n_checkpoints=3, save_every=1)
    kw = dict(arch="rpg_cnn_s", model_kwargs={}, recipe=recipe, seed=3, evaluators={"test": evaluator},
              progress=False)
    table = train_collection(images, labels, out_dir=tmp_path / "a", **kw)
    train_collection(images, labels, out_dir=tmp_path / "b", **kw)
    assert table["file"].tolist() == ["00.safetensors", "01.safetensors", "02.safetensors"]
    assert table["step"].tolist() == [4, 5, 6]  # 3 main steps, then one checkpoint per step
    for name in table["file"]:
        a, b = load_safetensors(tmp_path / "a" / name)[0], load_safetensors(tmp_path / "b" / name)[0]
        assert all(torch.equal(a[k], b[k]) for k in a)
    meta = read_safetensors_metadata(tmp_path / "a" / "02.safetensors")
    model = model_from_metadata(meta, load_safetensors(tmp_path / "a" / "02.safetensors")[0])
    assert evaluator.accuracy(model) == pytest.approx(meta["test_accuracy"])
    assert (tmp_path / "a" / "collection.csv").is_file()


def test_train_collection_from_given_weights_at_a_constant_rate_scores_every_kth(tmp_path):
    """init_state with epochs 0 (collect.init_from: backbone): no main phase, training continues from the given
    weights; with score_every 2 only the last checkpoint and every 2nd before it carry a test accuracy."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (64,), generator=gen)
    torch.manual_seed(11)
    start = build_model("rpg_cnn_s").state_dict()
    recipe = CollectConfig(epochs=0, batch_size=32, n_checkpoints=5, save_every=1, lr=1e-9, collect_lr_ratio=1.0,
                           score_every=2, init_from="backbone")
    table = train_collection(images, labels, out_dir=tmp_path, arch="rpg_cnn_s", model_kwargs={}, recipe=recipe,
                             seed=3, evaluators={"test": ImageEvaluator(images[:16], labels[:16])},
                             progress=False, init_state=start)
    assert table["step"].tolist() == [1, 2, 3, 4, 5] and table["scored"].tolist() == [True, False, True, False, True]
    assert table["test_accuracy"].isna().tolist() == [False, True, False, True, False]
    assert ("test_accuracy" in read_safetensors_metadata(tmp_path / "03.safetensors")) is False
    assert sorted(p.name for p in tmp_path.glob("*.predictions.safetensors")) == [
        "00.predictions.safetensors", "02.predictions.safetensors", "04.predictions.safetensors"]
    last = model_from_metadata(read_safetensors_metadata(tmp_path / "04.safetensors"),
                               load_safetensors(tmp_path / "04.safetensors")[0])
    saved = load_safetensors(tmp_path / "04.predictions.safetensors")[0]["test"]
    assert torch.equal(saved.long(), ImageEvaluator(images[:16], labels[:16]).predict(last))
    first = load_safetensors(tmp_path / "00.safetensors")[0]
    assert torch.allclose(first["features.0.weight"], start["features.0.weight"], atol=1e-6)  # lr ~0: barely moved


def test_collect_run_refuses_a_backbone_of_another_shape(tmp_path):
    from rpg.utils import save_safetensors_atomic

    save_safetensors_atomic(build_model("rpg_cnn_m").state_dict(), tmp_path / "bb.safetensors", {})
    cfg = config_from_dict({"architectures": {"models": {"v": {"arch": "rpg_cnn_s",
                                                               "collect": {"init_from": "backbone", "epochs": 0}}}}})
    with pytest.raises(ValueError, match="does not fit architecture 'v'"):
        ax.collect_run(cfg, "v", 0, tmp_path / "out", init_file=tmp_path / "bb.safetensors")
    with pytest.raises(ValueError, match="pass the backbone"):
        ax.collect_run(cfg, "v", 0, tmp_path / "out")


def test_variant_names_round_trip_and_reject_garbage():
    v = ax.Variant("lstm", "learnable", False, 10, 64)
    assert v.id == "lstm-learnable-noperm-runs10-tok64" and ax.Variant.parse(v.id) == v
    replicate = ax.Variant("mamba", "2d", True, 3, 256, seed=2)
    assert replicate.id == "mamba-2d-perm-runs3-tok256-seed2" and ax.Variant.parse(replicate.id) == replicate
    assert replicate.seed_of(5) == 5 + 2 * ax.SEED_STRIDE and v.seed_of(5) == 5
    for garbage in ("mamba-3d-perm-runs1-tok64", "mamba-2d-perm-runs1-tok64-seed0", "mamba-2d-perm-runs1-tok64-s1"):
        with pytest.raises(ValueError, match="not a variant name"):
            ax.Variant.parse(garbage)


def test_ablations_change_one_thing_and_share_the_table1_setting():
    cfg = config_from_dict({})
    n = 3014
    base = ax.main_variant(cfg, "cnn_s", n)
    assert base == ax.Variant("mamba", "2d", True, 1, 256)
    families = ax.ablation_variants(cfg, n)
    assert set(families) == set(ax.ABLATION_FAMILIES)
    for family, variants in families.items():
        assert base in [v for _, v in variants], family  # the Table 1 generator is trained once, reused
    perm = families["permutation"]
    assert [(v.permutation_state, v.runs) for _, v in perm] == [(True, 1), (False, 1), (True, 3), (False, 3),
                                                                 (True, 10), (False, 10)]
    assert ax.variant_model_config(ax.arch_spec(cfg, "cnn_s"), perm[5][1], n).condition == "none"


def test_ablation_seeds_replicate_every_setting_under_its_label():
    """architectures.ablations.seeds = 3: each setting three times (replicates 0, 1, 2, in order, same label);
    replicate 0 is the one-seed variant, so the settings shared between families are still trained once."""
    n = 3014
    one = ax.ablation_variants(config_from_dict({}), n)
    three = ax.ablation_variants(config_from_dict({"architectures": {"ablations": {"seeds": 3}}}), n)
    for family, rows in one.items():
        assert [(label, v.seed) for label, v in three[family]] == [(label, k) for label, _ in rows for k in range(3)]
        assert [v for _, v in three[family] if v.seed == 0] == [v for _, v in rows]
    ids = [v.id for rows in three.values() for _, v in rows]
    assert len(set(ids)) == len({v.id for rows in one.values() for _, v in rows}) * 3


def test_ablation_reuses_the_table1_generator_only_when_it_is_the_same_one():
    """The seeded profile trains its ablations at Table 1's budget: replicate 0 of the Table 1 setting is then the
    Table 1 generator (same seed, same settings) and comes from study "main"; at the default's shorter ablation
    budget, on another replicate, another setting or an architecture outside Table 1 it is the ablation's own."""
    n = 11202
    same = {"architectures": {"table1": ["cnn_m"], "ablations": {"arch": "cnn_m",
                                                                 "train": {"steps": 800, "diffusion_batch": 256}}}}
    cfg = config_from_dict(same)
    base = ax.main_variant(cfg, "cnn_m", n)
    assert ax.arch_spec(cfg, "cnn_m", "ablation") == ax.arch_spec(cfg, "cnn_m", "main")
    assert ax.ablation_study(cfg, "cnn_m", base, n) == "main"
    for other in (dataclasses.replace(base, seed=1), dataclasses.replace(base, recurrent="lstm")):
        assert ax.ablation_study(cfg, "cnn_m", other, n) == "ablation"
    default = config_from_dict({"architectures": {"ablations": {"arch": "cnn_m"}}})  # 400 steps: not the same
    assert ax.ablation_study(default, "cnn_m", ax.main_variant(default, "cnn_m", n), n) == "ablation"
    outside = config_from_dict({**same, "architectures": {**same["architectures"], "table1": ["cnn_s"]}})
    assert ax.ablation_study(outside, "cnn_m", base, n) == "ablation"


def test_model_entry_overrides_the_family_keys_and_diffusion():
    """A Table 1 row may sample, score, thread and denoise differently from the family (the million-parameter
    row: x0-prediction, 2 threads, BatchNorm statistics recomputed); the other rows keep the family's."""
    cfg = config_from_dict({"architectures": {
        "sample_steps": [10, 20, 50], "threads": 1, "val_images": 2000, "samples": 10,
        "models": {"big": {"arch": "rpg_cnn_s", "diffusion": {"prediction": "x0"}, "sample_steps": [10, 20],
                           "threads": 2, "val_images": 1000, "bn_recompute_images": 500, "baseline_samples": 3,
                           "samples": 4},
                   "small": {"arch": "rpg_cnn_s"}}}})
    big, small = ax.arch_spec(cfg, "big"), ax.arch_spec(cfg, "small")
    assert (big.diffusion.prediction, big.sample_steps, big.threads, big.val_images, big.bn_recompute_images,
            big.baseline_samples, big.samples) == ("x0", (10, 20), 2, 1000, 500, 3, 4)
    assert big.diffusion.timesteps == cfg.diffusion.timesteps  # only the keys it names
    assert (small.diffusion, small.sample_steps, small.threads, small.val_images, small.bn_recompute_images,
            small.baseline_samples, small.samples) == (cfg.diffusion, (10, 20, 50), 1, 2000, 0, None, 10)
    with pytest.raises(ConfigError, match="architectures.models.big.diffusion"):
        config_from_dict({"architectures": {"models": {"big": {"arch": "rpg_cnn_s", "diffusion": {"predict": "x0"}}}}})
    with pytest.raises(ConfigError, match="architectures.models.big.threads"):
        config_from_dict({"architectures": {"models": {"big": {"arch": "rpg_cnn_s", "threads": 0}}}})


def test_auto_size_follows_table15():
    assert [paper_size(n) for n in (3_000, 60_000, 20_000_000, 90_000_000)] == ["tiny", "small", "base", "large"]


def test_arch_spec_merges_overrides_and_names_bad_keys():
    cfg = config_from_dict({"architectures": {"models": {"v": {"arch": "rpg_cnn_s", "collect": {"lr": 0.5},
                                                               "train": {"steps": 7}}}}})
    spec = ax.arch_spec(cfg, "v")
    assert spec.recipe.lr == 0.5 and spec.recipe.n_checkpoints == 50 and spec.train.steps == 7
    with pytest.raises(ValueError, match="unknown architecture 'w'"):
        ax.arch_spec(cfg, "w")
    sorted_heads = config_from_dict({"train": {"canonicalise": "sort", "lr": 0.002},
                                     "architectures": {"models": {"v": {"arch": "rpg_cnn_s"}}}})
    spec_sorted = ax.arch_spec(sorted_heads, "v")  # the heads' unit order is not a whole model's setting
    assert spec_sorted.train.canonicalise == "none" and spec_sorted.train.lr == 0.002
    with pytest.raises(ValueError, match="architectures.models.v.collect"):  # at load time, naming the path
        config_from_dict({"architectures": {"models": {"v": {"arch": "rpg_cnn_s", "collect": {"lrr": 0.5}}}}})


def test_cnn_10m_row_has_ten_million_parameters_that_all_see_the_image(repo_root):
    """config/experiments/table1_cnn_10m.yaml: its one row has >= 10M parameters (counted on the meta device), its
    generator can hold that many numbers, and its widest conv runs at 3x3, so every tap of its kernels multiplies
    image features, not only zero padding."""
    from rpg.config import load_config

    cfg = load_config([repo_root / "config" / "config.yaml", repo_root / "config" / "experiments" / "table1_cnn_10m.yaml"])
    assert list(cfg.architectures.table1) == ["cnn_10m"]
    spec = ax.arch_spec(cfg, "cnn_10m")
    n_params = ax.parameter_count(spec)
    assert n_params >= 10_000_000
    # a token is decoded from its d_model-wide prototype: tokens x d_model must reach the parameter count (the row's
    # first run, token 4096 with d_model 256, sampled chance-level networks; docs/table1.md)
    generator = ax.base_model_config(spec, n_params)
    assert generator.d_model >= generator.token_size
    model = build_model(spec.arch, spec.model_kwargs)
    widest = max((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), key=lambda m: m.weight.numel())
    seen = {}
    widest.register_forward_hook(lambda module, args, out: seen.update(size=args[0].shape[-2:]))
    model.eval()(torch.zeros(1, 3, spec.img_size, spec.img_size))
    assert min(seen["size"]) >= widest.kernel_size[0]
