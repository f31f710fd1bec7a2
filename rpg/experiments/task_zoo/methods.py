"""Task-conditioned weight generators: the interface every method of the unseen-task study implements (issue 31).

A method is fitted on the *training split* of a zoo — the training tasks' head checkpoints (`TrainingZoo`, read by
`load_training_zoo`, which opens no validation or unseen task's file) and their task codes — and is then asked for
n heads for the code of any task. The workflow scores what it returns with the same evaluator, the same originals and
the same novelty measures as RPG's samples (`rpg.evaluation.SampleRows`), for the regime's unseen and seen tasks.

Methods are registered in the `rpg.evaluation` registry under family `FAMILY` as factories
`factory(ctx: MethodContext) -> TaskGenerator | None` (None: the method cannot run here, e.g. `compose` without the
backbone's 10-class classifier). Built in: `rpg` (the regime's trained generator), then every baseline of
`rpg.experiments.task_zoo.baselines` (`affine`, `nearest`, `complement`, `mean`, `noise`, `compose`). A user's own
method is named in the config, `study.methods: ["mypkg.mod:make_method"]`: the factory is registered under its
`name` attribute (else its `__name__`) by `rpg.evaluation.register_spec` and runs through rule `study_method`.

    class NearestHead(TaskGenerator):           # the mean head of the training task with the closest code
        name = "nearest_head"
        def __init__(self, ctx): ...
        def fit(self, zoo, codes): self.heads, self.codes = zoo.mean_heads, codes
        def generate(self, query):
            rows = torch.cdist(query.codes, self.codes).argmin(1)
            return self.heads[rows][:, None]      # (T, 1, P): one head per task (a deterministic method)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from rpg.config import Config
from rpg.evaluation import create_baseline, list_baselines, register_baseline
from rpg.generate import sample_models
from rpg.model import RPG
from rpg.tokenize import Tokenizer
from rpg.experiments.task_zoo.baselines import (BASELINES, HEAD_BASELINES, TrainingZoo, baseline_heads,
                                                compose_predictions, flatten_heads, load_backbone_classifier)
from rpg.experiments.task_zoo.tasks import task_condition

FAMILY = "task_method"  # the study's methods in the `rpg.evaluation` registry


@dataclass(frozen=True)
class TaskQuery:
    """What a method is asked: heads for `task_ids` (codes (T, C): RPG's condition, the class-set bits and, for
    domain tasks, the one-hot domain), at most `n` per task, its random draws seeded by `seed`.

    reference_l2: the mean L2 novelty of RPG's samples for these tasks (what `noise` matches); NaN where unknown.
    """

    task_ids: tuple[int, ...]
    codes: torch.Tensor
    n: int
    seed: int
    reference_l2: float = float("nan")


@dataclass(frozen=True)
class MethodContext:
    """What a factory may use besides the training split: the regime's config, its trained generator (rpg_path)
    and the backbone (backbone_path, for its 10-class classifier); None where the job has none."""

    cfg: Config
    rpg_path: str | Path | None = None
    backbone_path: str | Path | None = None


class TaskGenerator:
    """A task-conditioned weight generator. Subclasses implement `generate` (heads) or, for a method without
    per-task weights (`function_space = True`), `predict`."""

    name: str = ""
    function_space: bool = False

    def fit(self, zoo: TrainingZoo, codes: torch.Tensor) -> None:
        """Learn from the training split: `zoo.checkpoints` (T*K, P) task-major (`zoo.mean_heads` (T, P)), in the
        order of `zoo.task_ids`, and their codes (T, C). The default keeps nothing."""

    def generate(self, query: TaskQuery) -> torch.Tensor:
        """Flat heads (`baselines.flatten_heads` order) for every task of the query: (T, m, P) with 1 <= m <= n
        (a deterministic method may return one per task); a NaN head is no head (the task is left out)."""
        raise NotImplementedError(f"{type(self).__name__} generates no heads")

    def predict(self, query: TaskQuery, features: torch.Tensor) -> torch.Tensor:
        """Function-space methods: predicted classes (T, m, N) on the test features ((N, d), or (D, N, d) per
        domain)."""
        raise NotImplementedError(f"{type(self).__name__} predicts nothing")


def fitted_methods(names: Sequence[str], ctx: MethodContext, zoo: TrainingZoo, codes: torch.Tensor
                   ) -> dict[str, TaskGenerator]:
    """The methods `names` of the registry, made for `ctx` and fitted on the training split; those whose factory
    returns None are left out."""
    out = {}
    for name in names:
        method = create_baseline(name, FAMILY, ctx)
        if method is not None:
            method.fit(zoo, codes)
            out[name] = method
    return out


# ----------------------------------------------------------------------------------------------------------------
# Built-in methods
# ----------------------------------------------------------------------------------------------------------------


def condition(cfg: Config, task_ids: Sequence[int], domain_codes: torch.Tensor | None = None) -> torch.Tensor:
    """RPG's condition for these tasks: the class-set bits (+ the domain code: row d of `domain_codes`, one-hot when
    None). Shapes: -> (T, condition_dim)."""
    return task_condition(task_ids, len(cfg.domains.names), domain_codes)


def generate_models(model: RPG, tokenizer: Tokenizer, cfg: Config, task_ids: Sequence[int], n_samples: int,
                    seed: int, domain_codes: torch.Tensor | None = None, guidance: float | None = None
                    ) -> list[dict[str, torch.Tensor]]:
    """`n_samples` generated state dicts per task, task-major (`domain_codes`: as `condition`; `guidance`: the
    classifier-free guidance scale, None = the generator's own `rpg.guidance_scale`)."""
    bits = condition(cfg, task_ids, domain_codes).repeat_interleave(n_samples, dim=0)  # (T*S, condition_dim)
    return sample_models(model, tokenizer, cfg.diffusion, len(bits), seed=seed, cond=bits, mode=cfg.generate.mode,
                         tokens_per_call=cfg.generate.tokens_per_call, amp=cfg.train.amp, guidance=guidance)


class RPGMethod(TaskGenerator):
    """The regime's trained generator (rule train_rpg fitted it on the same training split): n samples per task."""

    name = "rpg"

    def __init__(self, ctx: MethodContext):
        from rpg.checkpoint import load_rpg
        from rpg.utils import resolve_device

        self.cfg = ctx.cfg
        self.path = str(ctx.rpg_path)
        self.model, self.tokenizer, _, self.meta = load_rpg(ctx.rpg_path, resolve_device(ctx.cfg.device))

    def state_dicts(self, query: TaskQuery) -> list[dict[str, torch.Tensor]]:
        """`query.n` sampled state dicts per task, task-major."""
        from rpg.experiments.task_zoo.domains import stored_domain_codes

        return generate_models(self.model, self.tokenizer, self.cfg, query.task_ids, query.n, seed=query.seed,
                               domain_codes=stored_domain_codes(self.meta))

    def generate(self, query: TaskQuery) -> torch.Tensor:
        return flatten_heads(self.state_dicts(query)).view(len(query.task_ids), query.n, -1)


register_baseline(FAMILY, "rpg")(lambda ctx: RPGMethod(ctx) if ctx.rpg_path else None)


class HeadBaseline(TaskGenerator):
    """A head baseline of `rpg.experiments.task_zoo.baselines` (per domain for domain tasks): one head per task."""

    def __init__(self, name: str):
        self.name = name

    def fit(self, zoo: TrainingZoo, codes: torch.Tensor) -> None:
        self.zoo = zoo

    def generate(self, query: TaskQuery) -> torch.Tensor:
        heads = baseline_heads(self.zoo, query.task_ids, query.reference_l2, query.seed, names=[self.name])
        return heads[self.name][:, None]


for _name in HEAD_BASELINES:
    register_baseline(FAMILY, _name)(lambda ctx, name=_name: HeadBaseline(name))


class Compose(TaskGenerator):
    """`compose`: the backbone's 10-class classifier, no per-task weights (`baselines.compose_predictions`)."""

    name = "compose"
    function_space = True

    def __init__(self, classifier: dict[str, torch.Tensor]):
        self.classifier = classifier

    def predict(self, query: TaskQuery, features: torch.Tensor) -> torch.Tensor:
        return compose_predictions(self.classifier, features, query.task_ids)[:, None]


def _compose(ctx: MethodContext) -> Compose | None:
    classifier = load_backbone_classifier(ctx.backbone_path) if ctx.backbone_path else None
    return None if classifier is None else Compose(classifier)


register_baseline(FAMILY, "compose")(_compose)

BUILTIN = tuple(list_baselines(FAMILY))  # rpg, then the baselines in their tables' order
if BUILTIN[1:] != BASELINES:
    raise RuntimeError(f"the study's built-in methods {BUILTIN} do not follow the baselines {BASELINES}")
