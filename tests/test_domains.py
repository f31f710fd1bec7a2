"""Domain tasks (issue 13, the study's `domains` regime): (class set, image domain) task ids, the image transforms,
the per-domain zoo, split, baselines, compose and evaluator, end to end on small synthetic features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rpg.config import load_config, validate_config
from rpg.experiments.rules import NEUTRAL_DEFAULTS, config_setting
from rpg.experiments.task_zoo import study as S
from rpg.experiments.task_zoo.domains import DOMAINS, DomainHeadEvaluator, check_domains, class_sets, unseen_tasks
from rpg.experiments.task_zoo.heads import HEAD_KEYS, load_task_checkpoints
from rpg.experiments.task_zoo.pipeline import (build_zoo, configured_task_ids, generate_and_evaluate, read_split,
                                               train_conditional_rpg, write_split)
from rpg.experiments.task_zoo.tables import write_tables
from rpg.experiments.task_zoo.tasks import (DOMAIN_STRIDE, TaskError, binary_labels, domain_task_id, embedding_bits,
                                            embedding_to_id, id_to_embedding, neighbours, positive_classes,
                                            split_task_id, task_condition)
from rpg.utils import save_safetensors_atomic

D = 8  # feature width
NAMES = ["identity", "rot90", "invert"]


def test_domain_task_ids_round_trip_and_leave_plain_tasks_unchanged():
    t = domain_task_id(279, 2)
    assert t == 2 * DOMAIN_STRIDE + 279 and split_task_id(t) == (279, 2)
    assert id_to_embedding(t) == "0100010111@2" and embedding_to_id("0100010111@2") == t
    assert id_to_embedding(279) == "0100010111" and embedding_to_id("0100010111") == 279  # domain 0: as before
    assert positive_classes("0100010111@2") == positive_classes("0100010111")
    assert torch.equal(embedding_bits([t]), embedding_bits([279]))
    assert torch.equal(binary_labels(torch.arange(10), [t]), binary_labels(torch.arange(10), [279]))
    cond = task_condition([279, t], 3)
    assert cond.shape == (2, 13) and cond[:, 10:].tolist() == [[1, 0, 0], [0, 0, 1]]
    assert torch.equal(task_condition([279]), embedding_bits([279]))  # no domains: the 10 bits
    assert all(split_task_id(n)[1] == 2 for n in neighbours([t]))
    for bad in ("0100010111@0", "0100010111@x", "0000000000@1"):
        with pytest.raises(TaskError):
            embedding_to_id(bad)
    with pytest.raises(TaskError):
        id_to_embedding(DOMAIN_STRIDE)  # class set 0 of domain 1


def test_domain_transforms_are_deterministic_image_maps():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for name, fn in DOMAINS.items():
        y = fn(x)
        assert y.shape == x.shape and y.dtype == torch.uint8 and torch.equal(fn(x), y), name
    rot = DOMAINS["rot90"]
    assert torch.equal(rot(rot(rot(rot(x)))), x) and not torch.equal(rot(x), x)
    assert torch.equal(DOMAINS["invert"](DOMAINS["invert"](x)), x)
    flat = torch.full_like(x, 77)
    assert torch.equal(DOMAINS["blur"](flat), flat)  # a blur keeps a constant image
    assert DOMAINS["blur"](x).float().std() < x.float().std()
    with pytest.raises(ValueError):
        check_domains(["rot90", "identity"])  # domain 0 must be the cached features


def test_regime_config_zoo_key_and_settings_leave_other_regimes_alone(repo_root):
    base = validate_config(load_config(repo_root / "config" / "config.yaml").raw)
    assert base["domains"] == NEUTRAL_DEFAULTS["domains"]  # the schema default is the neutral one
    assert config_setting(base, "domains") == "{}"  # so existing rules' params do not change
    base["study"]["regimes"] = [*base["study"]["regimes"], "domains"]
    regime = S.regime_config(base, "domains")
    assert S.zoo_key(base, regime).startswith("domains_shared_") and S.domain_features_key(regime)
    assert S.domain_features_key(S.regime_config(base, "per_task_init")) is None
    assert S.zoo_key(base, S.regime_config(base, "per_task_init")) == "per_task_ae96899b"  # unchanged by `domains`


@pytest.fixture(scope="module")
def run(tmp_path_factory, repo_root):
    """Three synthetic domains: domain d's features are class means rotated by a fixed random orthogonal map Q_d
    (Q_0 = I), so the clean 10-class classifier (nearest clean class mean) is right on domain 0 only."""
    tmp = tmp_path_factory.mktemp("domains")
    gen = torch.Generator().manual_seed(0)
    means = 2.5 * torch.randn(10, D, generator=gen)
    rots = [torch.eye(D)] + [torch.linalg.qr(torch.randn(D, D, generator=gen))[0] for _ in NAMES[1:]]
    feats = {}
    for split, n in (("train", 600), ("val", 100), ("test", 300)):
        y = torch.arange(n) % 10
        base = means[y] + torch.randn(n, D, generator=gen)
        feats[f"{split}_x"] = torch.stack([base @ q.T for q in rots])  # (3, n, D)
        feats[f"{split}_y"] = y
    features = tmp / "features.safetensors"
    save_safetensors_atomic(feats, features, {"feature_dim": D})
    backbone = tmp / "backbone.safetensors"
    save_safetensors_atomic({"head.weight": means, "head.bias": -0.5 * (means**2).sum(1)}, backbone, {})
    cfg = load_config([repo_root / "config" / "config.yaml", repo_root / "config" / "test.yaml"], overrides={
        "results_dir": str(tmp / "results"),
        "domains": {"names": NAMES, "class_sets": 26},
        "tasks": {"table11": [], "n_val": 2, "n_seen_eval": 3, "unseen": [314, 482, 589, 197]},
        "zoo": {"steps": 40, "batch_size": 64, "lr": 1e-2, "save_every": 2},
        "train": {"steps": 4, "eval_every": 4, "save_every": 4, "batch_size": 4, "diffusion_batch": 16},
        "generate": {"samples": 2, "seen_samples": 1},
        "logging": {"wandb": False, "progress": False},
    })
    zoo = tmp / "zoo"
    build_zoo(cfg, features, zoo)
    split_path = tmp / "split.json"
    write_split(cfg, split_path)
    train_conditional_rpg(cfg, zoo, split_path, features, tmp / "rpg")
    out = tmp / "generated"
    generate_and_evaluate(cfg, tmp / "rpg" / "best.safetensors", split_path, features, zoo, out, backbone)
    tables = write_tables(cfg, out / "samples.csv", {}, names=["table16", "seen_summary"])
    return {"cfg": cfg, "feats": feats, "zoo": zoo, "split": read_split(split_path), "tables": tables, "tmp": tmp,
            "samples": pd.read_csv(out / "samples.csv", dtype={"embedding": str})}


def test_tasks_split_and_per_domain_zoo(run):
    cfg, split = run["cfg"], run["split"]
    sets = class_sets(cfg)
    assert len(sets) == 26 and {314, 482, 589, 197, 744, 279} <= set(sets)
    assert configured_task_ids(cfg) == [d * DOMAIN_STRIDE + c for d in range(3) for c in sets]
    assert list(split.unseen) == unseen_tasks([314, 482, 589, 197], 3) == sorted(
        [DOMAIN_STRIDE + 314, 2 * DOMAIN_STRIDE + 482, DOMAIN_STRIDE + 589, 2 * DOMAIN_STRIDE + 197])
    for t in split.unseen:  # the class set trains in the other domains; the domain trains with other class sets
        c, d = split_task_id(t)
        assert {domain_task_id(c, e) for e in range(3) if e != d} <= set(split.train)
        assert sum(split_task_id(s)[1] == d for s in split.train) >= 20
    # every head was trained on its own domain's features: scored there, it is far better than on domain 0's
    ev = DomainHeadEvaluator(run["feats"]["test_x"], run["feats"]["test_y"])
    ids = [t for t in split.train if split_task_id(t)[1] == 1][:8]
    sds, _ = load_task_checkpoints(run["zoo"], ids, 1)
    target = binary_labels(run["feats"]["test_y"], ids)
    own = (ev.predict(sds, ids) == target).float().mean()
    clean = (ev.predict(sds, [split_task_id(t)[0] for t in ids]) == target).float().mean()
    assert own > 0.85 and own > clean + 0.1
    with pytest.raises(ValueError):
        ev.predict(sds)  # no task ids: no way to tell the domain


def test_baselines_per_domain_and_compose_fails_off_domain(run):
    s, train = run["samples"], set(run["split"].train)
    unseen = s[s.group == "unseen"]
    # complement: the complement class set in the *same* domain (a training task here for 314, 482, 589, 197?)
    for t in unseen.task_id.unique():
        c, d = split_task_id(t)
        has = domain_task_id(1023 - c, d) in train
        assert has == (t in set(unseen[unseen.kind == "complement"].task_id)), t
    # nearest: the mean head of the Hamming-nearest training tasks *of the same domain*, recomputed by hand
    from rpg.experiments.task_zoo.baselines import load_training_zoo, nearest_heads, unflatten_heads

    zoo = load_training_zoo(run["zoo"], run["split"], 3, run["cfg"].train.canonicalise)  # the gauge RPG trains in
    ev = DomainHeadEvaluator(run["feats"]["test_x"], run["feats"]["test_y"])
    for t in unseen.task_id.unique():
        c, d = split_task_id(t)
        keep = [i for i, s_ in enumerate(zoo.task_ids) if split_task_id(s_)[1] == d]
        head = unflatten_heads(nearest_heads(zoo.restrict(keep), [t]), zoo.shapes)
        acc = float((ev.predict(head, [t]) == binary_labels(run["feats"]["test_y"], [t])).float().mean())
        assert abs(acc - float(unseen[(unseen.task_id == t) & (unseen.kind == "nearest")].accuracy.iloc[0])) < 1e-6
    # compose is the clean classifier: right on the plain domain, off on the rotated ones
    comp = s[s.kind == "compose"]
    on = comp[comp.task_id < DOMAIN_STRIDE].accuracy.mean()
    off = comp[comp.task_id >= DOMAIN_STRIDE].accuracy.mean()
    assert on > 0.9 and off < on - 0.1
    orig = s[(s.kind == "original") & (s.task_id >= DOMAIN_STRIDE)].accuracy.mean()
    assert orig > off + 0.1  # heads trained on the domain's features beat the clean classifier there


def test_tables_and_generated_heads(run):
    t16 = run["tables"]["table16"]
    assert set(run["tables"]) == {"table16", "seen_summary"}
    assert t16.embedding.iloc[:-1].str.contains("@").all()
    assert t16.positive_classes.iloc[0] == ", ".join(positive_classes(t16.embedding.iloc[0]))
    rpg = run["samples"][run["samples"].kind == "rpg"]
    assert np.isfinite(rpg.accuracy).all() and set(HEAD_KEYS) == {"0.weight", "0.bias", "2.weight"}
    assert run["cfg"].model.condition_dim == 13


def test_cli_generates_for_a_domain_task_from_the_regimes_generator(run, capsys):
    """The regime's generator file names its domains, so `rpg generate --domain` samples (class set, domain) tasks
    and scores them on that domain's features."""
    from rpg.cli.main import main

    tmp = run["tmp"]
    assert main(["generate", "--checkpoint", str(tmp / "rpg" / "best.safetensors"), "--embedding", "0100111010",
                 "--domain", NAMES[1], "--out", str(tmp / "cli"), "--evaluate",
                 "--features", str(tmp / "features.safetensors")]) == 0
    assert "task 0100111010 accuracy" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tmp / "rpg" / "best.safetensors"), "--embedding", "0100111010",
                 "--out", str(tmp / "cli")]) == 2
    assert ", ".join(NAMES) in capsys.readouterr().err


def test_domain_statistics_code_each_domain_by_its_unlabelled_features():
    """The stats code (rpg.condition_domain) is computed from features alone: zero for the plain images, the mean
    shift in units of their std and the log std ratio for a shifted domain."""
    from rpg.experiments.task_zoo.domains import domain_statistics, make_domain_codes

    x0 = torch.randn(500, D, generator=torch.Generator().manual_seed(0)) + torch.arange(D)
    feats = torch.stack([x0, x0 + 2 * x0.std(0), 3 * x0])  # (3, N, D): shifted by 2 stds, scaled by 3
    stats = domain_statistics(feats)
    assert stats.shape == (3, 2 * D) and torch.equal(stats[0], torch.zeros(2 * D))
    assert torch.allclose(stats[1, :D], torch.full((D,), 2.0), atol=1e-4)
    assert torch.allclose(stats[1, D:], torch.zeros(D), atol=1e-4)
    assert torch.allclose(stats[2, :D], 2 * x0.mean(0) / x0.std(0), atol=1e-4)
    assert torch.allclose(stats[2, D:], torch.full((D,), float(np.log(3))), atol=1e-4)
    assert torch.equal(make_domain_codes("onehot", feats), torch.eye(3))
    assert torch.equal(make_domain_codes("onehot_stats", feats), torch.cat([torch.eye(3), stats], 1))
    with pytest.raises(ValueError):
        make_domain_codes("labels", feats)
    # a task's condition carries its domain's row of the codes
    t = [domain_task_id(279, 2), 279]
    cond = task_condition(t, 3, stats)
    assert torch.equal(cond[:, :10], embedding_bits(t)) and torch.equal(cond[:, 10:], stats[[2, 0]])
    with pytest.raises(TaskError):
        task_condition(t, 3, stats[:2])


def test_condition_width_follows_the_domain_code(repo_root):
    paths = [repo_root / "config" / "config.yaml", repo_root / "config" / "test.yaml"]
    widths = {code: load_config(paths, overrides={"domains": {"names": NAMES},
                                                  "rpg": {"condition_domain": code}}).model.condition_dim
              for code in ("onehot", "stats", "onehot_stats")}
    d = load_config(paths).backbone.feature_dim
    assert widths == {"onehot": 10 + len(NAMES), "stats": 10 + 2 * d, "onehot_stats": 10 + len(NAMES) + 2 * d}


def test_a_label_free_domain_is_reached_through_its_statistics(run, capsys):
    """tasks.label_free_domains: no training or validation task of that domain; a generator with the stats code
    keeps its codes in its file and generates for the label-free domain's unseen pairs (and through the CLI)."""
    from rpg.checkpoint import load_rpg
    from rpg.cli.main import main
    from rpg.experiments.task_zoo.domains import domain_statistics, stored_domain_codes

    tmp = run["tmp"]
    cfg = load_config([], overrides={**run["cfg"].raw, "tasks": {**run["cfg"].raw["tasks"],
                                                                 "label_free_domains": [NAMES[2]]},
                                     "rpg": {**run["cfg"].raw["rpg"], "condition_domain": "stats"},
                                     "backbone": {**run["cfg"].raw["backbone"], "feature_dim": D}})
    split_path = tmp / "split_free.json"
    split = write_split(cfg, split_path)
    assert not any(split_task_id(t)[1] == 2 for t in split.train + split.val)
    assert any(split_task_id(t)[1] == 2 for t in split.unseen) and split.unseen == run["split"].unseen
    assert set(split.val) == {t for t in run["split"].val if split_task_id(t)[1] != 2}
    train_conditional_rpg(cfg, run["zoo"], split_path, tmp / "features.safetensors", tmp / "rpg_free")
    _, _, _, meta = load_rpg(tmp / "rpg_free" / "best.safetensors")
    assert torch.allclose(stored_domain_codes(meta), domain_statistics(run["feats"]["train_x"]))
    out = tmp / "generated_free"
    frame = generate_and_evaluate(cfg, tmp / "rpg_free" / "best.safetensors", split_path, tmp / "features.safetensors",
                                  run["zoo"], out)
    free = frame[(frame.kind == "rpg") & (frame.task_id >= 2 * DOMAIN_STRIDE)]
    assert len(free) and np.isfinite(free.accuracy).all()
    assert not ((frame.kind == "nearest") & (frame.task_id >= 2 * DOMAIN_STRIDE)).any()  # no per-domain baseline
    assert main(["generate", "--checkpoint", str(tmp / "rpg_free" / "best.safetensors"), "--embedding",
                 "0100111010", "--domain", NAMES[2], "--out", str(tmp / "cli_free")]) == 0


def test_guidance_scale_is_scored_on_the_validation_tasks(run):
    from rpg.experiments.task_zoo.pipeline import guidance_validation

    tmp = run["tmp"]
    frame = guidance_validation(run["cfg"], tmp / "rpg" / "best.safetensors", run["zoo"], tmp / "split.json",
                                tmp / "features.safetensors", [1.0, 2.0], 2)
    assert frame.scale.tolist() == [1.0, 2.0] and set(frame.n_val_tasks) == {len(run["split"].val)}
    assert frame.score.between(0, 1).all() and (frame.val_original > 0.5).all()
