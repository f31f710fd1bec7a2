"""Which non-generative baselines survive in the `domains` regime, and when do the head baselines fail? (issue 13)

The DAG's baselines of a domain task are built from its own domain's training tasks (`baselines.baseline_heads`).
This diagnostic scores, on the regime's unseen (class set, shifted domain) pairs and the same test images:
- the DAG's `affine` / `nearest` (per domain), and variants a user could also try:
  `affine_additive` (one least-squares map from [1, +-bits, one-hot domain] over all domains' training tasks: class
  and domain effects add, no interaction), `same_set_other_domains` (the mean head of the same class set in the
  domains where it was trained), `compose` (the clean 10-class head) and `compose_refit` (a 10-class softmax head
  refitted on the shifted domain's training features: the labels of that domain's training tasks determine every
  training image's class, so this is a domain-aware compose);
- the same head baselines when each shifted domain keeps only k of its training class sets (seeded draw), the
  few-shot-domain case (k = 4 ... 64) in which a per-domain fit has little to go on.
No RPG setting is chosen from this. Writes one row per (method, k) with the mean accuracy / balanced accuracy (%).

    PYTHONPATH=. python probes/domain_baselines.py --features results/study/domain_features/<key>/features.safetensors \
        --zoo results/study/zoos/<domains zoo> --split results/study/domains/split.json \
        --backbone results/backbone/cifar10_binary/backbone.safetensors --out results/probes/domain_baselines.csv
"""
from __future__ import annotations

import argparse
import random
import time

import pandas as pd
import torch
import torch.nn.functional as F

from rpg.experiments.task_zoo.baselines import (affine_heads, compose_predictions, load_backbone_classifier,
                                                load_training_zoo, nearest_heads, unflatten_heads)
from rpg.experiments.task_zoo.domains import DomainHeadEvaluator
from rpg.experiments.task_zoo.features import load_features
from rpg.experiments.task_zoo.heads import binary_metrics, load_task_checkpoints
from rpg.experiments.task_zoo.pipeline import read_split
from rpg.experiments.task_zoo.tasks import binary_labels, domain_task_id, split_task_id, task_domains
from rpg.utils import write_csv_atomic


def _metrics(preds: torch.Tensor, classes: torch.Tensor, task_ids: list[int]) -> dict[str, float]:
    m = binary_metrics(preds, binary_labels(classes, task_ids))
    return {"accuracy": 100 * float(m["accuracy"].mean()), "balanced_accuracy": 100 * float(m["balanced_accuracy"].mean())}


def _affine_additive(zoo, targets: list[int], n_domains: int) -> torch.Tensor:
    def design(ids):
        bits = 2 * torch.tensor([[float(b) for b in format(split_task_id(t)[0], "010b")] for t in ids]).double() - 1
        return torch.cat([torch.ones(len(ids), 1, dtype=torch.float64), bits,
                          F.one_hot(task_domains(ids), n_domains).double()], dim=1)

    coef = torch.linalg.lstsq(design(zoo.task_ids), zoo.mean_heads.double(), driver="gelsd").solution
    return (design(targets) @ coef).float()


def _refit_classifier(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> dict[str, torch.Tensor]:
    """A 10-class softmax head on one domain's training features (full-batch Adam, a few seconds)."""
    torch.manual_seed(0)
    w = torch.zeros(10, x.shape[1], requires_grad=True)
    b = torch.zeros(10, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(x @ w.T + b, y) + 1e-4 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"weight": w.detach(), "bias": b.detach()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--features", required=True)
    p.add_argument("--zoo", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--n-checkpoints", type=int, default=3)
    p.add_argument("--k", type=int, nargs="+", default=[4, 8, 16, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/probes/domain_baselines.csv")
    args = p.parse_args()
    torch.set_num_threads(2)
    start = time.time()
    feats = load_features(args.features)
    n_domains = feats["test_x"].shape[0]
    ev = DomainHeadEvaluator(feats["test_x"], feats["test_y"])
    split = read_split(args.split)
    zoo = load_training_zoo(args.zoo, split, args.n_checkpoints)  # the training split only
    targets = list(split.unseen)
    zoo_dom = task_domains(zoo.task_ids)
    rows = []

    def score(method: str, k: str, heads: torch.Tensor | None = None, preds: torch.Tensor | None = None) -> None:
        if preds is None:
            preds = ev.predict(unflatten_heads(heads, zoo.shapes), targets)
        rows.append({"method": method, "k": k, "n_tasks": len(targets), **_metrics(preds, ev.classes, targets)})

    def per_domain(fn, sub) -> torch.Tensor:
        out = torch.empty(len(targets), zoo.checkpoints.shape[1])
        dom, sub_dom = task_domains(targets), task_domains(sub.task_ids)
        for d in dom.unique().tolist():
            rows_d = (dom == d).nonzero().flatten()
            keep = (sub_dom == d).nonzero().flatten().tolist()
            out[rows_d] = fn(sub.restrict(keep), [targets[i] for i in rows_d.tolist()])
        return out

    score("affine (per domain, as the DAG)", "all", per_domain(affine_heads, zoo))
    score("nearest (per domain, as the DAG)", "all", per_domain(nearest_heads, zoo))
    score("affine_additive", "all", _affine_additive(zoo, targets, n_domains))
    row = {t: i for i, t in enumerate(zoo.task_ids)}
    same = []
    for t in targets:
        c, d = split_task_id(t)
        others = [row[domain_task_id(c, e)] for e in range(n_domains) if e != d and domain_task_id(c, e) in row]
        same.append(zoo.mean_heads[others].mean(0))
    score("same_set_other_domains", "all", torch.stack(same))
    classifier = load_backbone_classifier(args.backbone)
    score("compose (clean head)", "all", preds=compose_predictions(classifier, ev.features, targets))
    refit = {d: _refit_classifier(feats["train_x"][d], feats["train_y"]) for d in range(n_domains)}
    preds = torch.stack([compose_predictions(refit[split_task_id(t)[1]], ev.features[split_task_id(t)[1]], [t])[0]
                         for t in targets])
    score("compose_refit (10-class head per domain)", "all", preds=preds)
    orig, _ = load_task_checkpoints(args.zoo, targets, args.n_checkpoints)  # evaluation only
    per = ev.predict(orig, [t for t in targets for _ in range(args.n_checkpoints)])
    m = binary_metrics(per, binary_labels(ev.classes, [t for t in targets for _ in range(args.n_checkpoints)]))
    rows.append({"method": "originals", "k": "all", "n_tasks": len(targets),
                 "accuracy": 100 * float(m["accuracy"].mean()),
                 "balanced_accuracy": 100 * float(m["balanced_accuracy"].mean())})
    for k in args.k:  # each shifted domain keeps k seeded training class sets; the identity domain keeps all
        rng = random.Random(args.seed + k)
        keep = [i for i in range(len(zoo.task_ids)) if zoo_dom[i] == 0]
        for d in range(1, n_domains):
            idx = [i for i in range(len(zoo.task_ids)) if zoo_dom[i] == d]
            keep += rng.sample(idx, min(k, len(idx)))
        sub = zoo.restrict(sorted(keep))
        score("affine (per domain)", str(k), per_domain(affine_heads, sub))
        score("nearest (per domain)", str(k), per_domain(nearest_heads, sub))
        score("affine_additive", str(k), _affine_additive(sub, targets, n_domains))
    frame = pd.DataFrame(rows).round(3)
    write_csv_atomic(args.out, frame)
    print(frame.to_string(index=False))
    print(f"{time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
