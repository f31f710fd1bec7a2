"""Canonical hidden-unit order of the zoo's heads (issue 13, item 4: RPG under per-task initialisation).

A head `Linear(d, d) -> SiLU -> Linear(d, 2, bias=False)` is the same function under any permutation P of its hidden
units: (w1, b1, w2) -> (P w1, P b1, w2 P^T). With one shared initial head every task's unit i descends from the same
initial unit, so heads of similar tasks are close as they stand; with per-task initialisation they are not, and a
generator that sees raw weights sees unrelated unit orders. Two gauges, applied where the zoo is tokenised (and to the
baselines and novelty of the generate stage, so every head lives in the gauge RPG learned):
- `sort`: units by their readout difference w2[1] - w2[0] (descending): needs no reference;
- `match`: Hungarian matching of each task's units to a reference head built from the training split (start at the
  first training task, then 3 rounds of: align every task to the reference, reference = mean of the aligned heads),
  scoring unit pairs by the inner product of [w1 row, b1, w2 column].
The checkpoints of one task share one permutation (from the task's mean head). Generated heads need no undoing: a
permuted head is the same classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rpg.experiments.task_zoo.heads import HEAD_KEYS

CANONICALISE = ("none", "sort", "match")
MATCH_ROUNDS = 3


def permute_hidden(sd: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same head with hidden unit perm[i] moved to position i. Shapes: perm (d,) long."""
    return {"0.weight": sd["0.weight"][perm], "0.bias": sd["0.bias"][perm], "2.weight": sd["2.weight"][:, perm]}


def unit_features(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """One row per hidden unit: [incoming weights, bias, outgoing weights]. Shapes: -> (d, d + 3) float64."""
    return torch.cat([sd["0.weight"], sd["0.bias"][:, None], sd["2.weight"].T], dim=1).double()


def sort_permutation(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """Units by readout difference w2[1] - w2[0], descending (stable). Shapes: -> (d,) long."""
    key = sd["2.weight"][1].double() - sd["2.weight"][0].double()
    return torch.sort(key, descending=True, stable=True).indices


def match_permutation(sd: dict[str, torch.Tensor], reference: torch.Tensor) -> torch.Tensor:
    """The permutation of `sd`'s units that maximises their summed inner product with the reference's units.

    Shapes: reference (d, d + 3) unit features -> (d,) long, perm[i] = the unit of `sd` put at position i.
    """
    from scipy.optimize import (
        linear_sum_assignment,  # scikit-learn's dependency; only this gauge needs it
    )

    score = (reference @ unit_features(sd).T).numpy()  # (d ref units, d units)
    rows, cols = linear_sum_assignment(score, maximize=True)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def _mean_head(sds: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([sd[k].float() for sd in sds]).mean(0) for k in HEAD_KEYS}


class Gauge:
    """A canonical hidden-unit order, fitted on the training split (`match` only needs fitting)."""

    def __init__(self, method: str, reference: torch.Tensor | None = None):
        if method not in CANONICALISE:
            raise ValueError(f"unknown canonicalisation '{method}' (expected one of {', '.join(CANONICALISE)})")
        if method == "match" and reference is None:
            raise ValueError("the match gauge needs a reference head: use Gauge.fit")
        self.method, self.reference = method, reference

    @classmethod
    def fit(cls, method: str, state_dicts: Sequence[dict[str, torch.Tensor]], group_size: int = 1) -> Gauge:
        """The gauge of the training split's checkpoints (task-major groups of `group_size`)."""
        if method != "match":
            return cls(method)
        means = [_mean_head(state_dicts[i : i + group_size]) for i in range(0, len(state_dicts), group_size)]
        reference = unit_features(means[0])
        for _ in range(MATCH_ROUNDS):
            aligned = [unit_features(permute_hidden(m, match_permutation(m, reference))) for m in means]
            reference = torch.stack(aligned).mean(0)
        return cls(method, reference)

    def permutation(self, sd: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.method == "sort":
            return sort_permutation(sd)
        if self.method == "match":
            return match_permutation(sd, self.reference)
        return None

    def __call__(self, state_dicts: Sequence[dict[str, torch.Tensor]], group_size: int = 1
                 ) -> list[dict[str, torch.Tensor]]:
        """Every head in this gauge; consecutive groups of `group_size` (a task's checkpoints) share one order."""
        if self.method == "none":
            return list(state_dicts)
        out = []
        for i in range(0, len(state_dicts), group_size):
            group = state_dicts[i : i + group_size]
            perm = self.permutation(_mean_head(group))
            out += [{**sd, **permute_hidden(sd, perm)} for sd in group]
        return out
