"""A collection of checkpoints as points in weight space: flattening, nearest-neighbour and mean distances, and the
simple non-generative predictors a generator must beat (Zeng et al. 2025, "Generative modeling of weights:
generalization or memorization?"): a checkpoint plus isotropic Gaussian noise of a given L2 norm, the average of a
few checkpoints, and a per-parameter Gaussian fitted to the collection.

Only what a generator generates is a coordinate: floating-point entries with more than one element (the rule of
`rpg.tokenize`); the rest (e.g. BatchNorm `num_batches_tracked`) is copied from a template checkpoint. A sampled
BatchNorm `running_var` is clipped at the generator's own floor (`rpg.tokenize.VAR_FLOOR`), as `Tokenizer.detokenize`
clips generated ones, so a baseline is never broken by a negative variance the generator could not produce either.
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch

from rpg.tokenize import VAR_FLOOR

StateDict = Mapping[str, torch.Tensor]
SHORTLIST = 8  # candidates of the matrix-product distance that `nearest_neighbours` measures exactly


def coordinate_keys(state_dict: StateDict) -> list[str]:
    """The entries that are points' coordinates (what a generator generates), in the state dict's order."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and v.numel() > 1]


def flatten(state_dicts: Sequence[StateDict], keys: Sequence[str] | None = None) -> torch.Tensor:
    """Shape: (len(state_dicts), P) float32, the entries `keys` (default: the coordinates, in the state dict's
    order) concatenated in order."""
    keys = coordinate_keys(state_dicts[0]) if keys is None else keys
    return torch.stack([torch.cat([sd[k].detach().float().flatten() for k in keys]) for sd in state_dicts])


def unflatten(vector: torch.Tensor, template: StateDict) -> dict[str, torch.Tensor]:
    """A state dict like `template` with its coordinate entries taken from `vector` (P,); the others copied."""
    out, offset = {}, 0
    coords = set(coordinate_keys(template))
    expected = sum(template[k].numel() for k in coords)
    if vector.numel() != expected:
        raise ValueError(f"vector has {vector.numel()} entries, the template's coordinates {expected}")
    for key, ref in template.items():
        if key not in coords:
            out[key] = ref.clone()
            continue
        values = vector[offset: offset + ref.numel()].view(ref.shape)
        if key.endswith("running_var"):
            values = values.clamp_min(VAR_FLOOR)
        out[key] = values.to(ref.dtype).clone()
        offset += ref.numel()
    return out


def _distances_to(points: torch.Tensor, reference: torch.Tensor) -> Iterator[torch.Tensor]:
    """Each point's L2 distances to every reference point (B,).

    Row by row into one reused (B, P) buffer: exact (an exact copy is at 0, unlike the |a|^2 + |b|^2 - 2ab of
    `torch.cdist`), no (A, B, P) temporary, and ~3x faster than allocating the difference per row (1.2M parameters).
    """
    diff = torch.empty_like(reference)
    for row in points:
        yield torch.linalg.vector_norm(torch.sub(reference, row, out=diff), dim=1)


def nearest_neighbours(points: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False,
                       self_tolerance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 distance of each point to its nearest reference point, and that reference point's index (inf and -1
    where no reference point is left).

    Exact: the distance is computed by subtraction, in the inputs' dtype (an exact copy is at 0). The matrix-product
    distances of `torch.cdist` (|a|^2 + |b|^2 - 2ab: fast, inexact) only shortlist the SHORTLIST closest candidates
    (a row-by-row subtraction against every reference point costs ~0.28 s a point for 2,900 heads of 16,768
    parameters). Shapes: points (A, P), reference (B, P) -> distances (A,), indices (A,).

    exclude_self: points is reference, and each point's own row is skipped (its nearest *other* checkpoint).
    self_tolerance: reference points within `self_tolerance * |point|` of a point (by the shortlist's distance: in
        float64 its rounding is far below 1e-6 * |point|, in float32 it may not be) are the point itself, wherever it
        sits in reference, and are skipped.
    """
    distances = torch.full((len(points),), float("inf"), dtype=points.dtype)
    indices = torch.full((len(points),), -1, dtype=torch.long)
    if not len(points) or not len(reference):
        return distances, indices
    approx = torch.cdist(points, reference)  # (A, B)
    if exclude_self:
        approx.fill_diagonal_(float("inf"))
    if self_tolerance:
        approx.masked_fill_(approx <= self_tolerance * points.norm(dim=1, keepdim=True), float("inf"))
    shortlist = approx.topk(min(SHORTLIST, len(reference)), dim=1, largest=False).indices  # (A, k)
    for i, row in enumerate(points):
        candidates = shortlist[i][approx[i, shortlist[i]].isfinite()]
        if len(candidates):
            exact = torch.linalg.vector_norm(reference[candidates] - row, dim=1)
            j = int(exact.argmin())
            distances[i], indices[i] = exact[j], candidates[j]
    return distances, indices


def nearest_distance(points: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False,
                     self_tolerance: float = 0.0) -> torch.Tensor:
    """L2 distance of each point to its nearest reference point (`nearest_neighbours` without the indices)."""
    return nearest_neighbours(points, reference, exclude_self, self_tolerance)[0]


def mean_distance(points: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Mean L2 distance of each point to the reference points (the others, with exclude_self: points is reference;
    NaN when there are none). With points = reference it measures how spread a set of models is.
    Shapes: (A, P), (B, P) -> (A,)."""
    return nearest_and_mean_distance(points, reference, exclude_self)[1]


def nearest_and_mean_distance(points: torch.Tensor, reference: torch.Tensor,
                              exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_distance` and `mean_distance` from one pass over the pairs (a collection's novelty and spread
    both come from its K x K distances: 1.6 s a pass for 50 checkpoints of 1.2M parameters). The nearest of no
    others is inf, as `nearest_neighbours` gives; their mean NaN. Shapes: (A, P), (B, P) -> (A,), (A,)."""
    nearest, means = torch.empty(len(points)), torch.empty(len(points))
    for i, dist in enumerate(_distances_to(points, reference)):
        others = torch.cat([dist[:i], dist[i + 1:]]) if exclude_self else dist
        nearest[i] = others.min() if len(others) else float("inf")
        means[i] = others.mean()
    return nearest, means


def noise_at_distance(source: torch.Tensor, distance: float, generator: torch.Generator) -> torch.Tensor:
    """Each source point plus isotropic Gaussian noise of L2 norm exactly `distance` (the noise baselines' draw).

    In high dimension the noise is orthogonal to the collection's spread, so each sample's nearest checkpoint is its
    source at `distance`: the novelty of the samples it is matched to. Shapes: source (n, P) -> (n, P).
    """
    noise = torch.randn(source.shape, generator=generator)
    return source + distance * noise / noise.norm(dim=1, keepdim=True)


def random_averages(points: torch.Tensor, n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """`n` averages of `k` checkpoints drawn without replacement (all of them when there are fewer than `k`).

    Shapes: points (K, P) -> (n, P).
    """
    k = min(k, len(points))
    return torch.stack([points[torch.randperm(len(points), generator=generator)[:k]].mean(0) for _ in range(n)])


def gaussian_samples(points: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` draws of an independent Gaussian per coordinate with the collection's mean and std (unbiased; 0 for a
    single checkpoint). Shapes: points (K, P) -> (n, P)."""
    mean = points.mean(0)
    std = points.std(0) if len(points) > 1 else torch.zeros_like(mean)
    return mean + std * torch.randn((n, points.shape[1]), generator=generator)
