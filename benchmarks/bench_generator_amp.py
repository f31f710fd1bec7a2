"""The generator in float32 vs bfloat16 autocast (`train.amp`) on Table 1's rows, side by side in one run.

For each row of `architectures.table1`: a generator of the row's settings (model, diffusion, batch sizes) over random
state dicts of the row's architecture (speed does not depend on the values), timed for its training step (median of
`--steps` after 3 warm-up steps, same minibatches in both precisions) and for sampling `--samples` models at the
row's first DDIM count (median of `--repeats`), each under the row's thread count (`architectures.*.threads`).
`ratio` is float32 seconds over bfloat16 seconds; `token_rel_diff` the relative L2 distance between the tokens
sampled in the two precisions from the same noise (what bf16 costs in the generator's output, before training).
On a CPU without AMX / AVX512-BF16 bf16 is emulated: the ratio then says why `auto` stays float32 there.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/bench_generator_amp.py     # ~3 min on the 2-core machines
Writes results/benchmarks/generator_amp.csv (+ .json).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import ROOT, set_threads, timed, write_results  # noqa: E402
from bench_scoring import random_state_dicts  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, nargs="+", default=[ROOT / "config" / "config.yaml"])
    p.add_argument("--rows", nargs="+", help="Table 1 rows (default: architectures.table1)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per precision (after 3 warm-up)")
    p.add_argument("--samples", type=int, default=1, help="models sampled per timed sampling call")
    p.add_argument("--repeats", type=int, default=2, help="timed sampling calls per precision (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "benchmarks" / "generator_amp.csv")
    return p.parse_args(argv)


def training_step(model, diffusion, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int, diffusion_batch: int,
                  grad_clip: float | None, seed: int, bf16: bool = False) -> Callable[[], float]:
    """One RPG optimisation step as rpg.train takes it (the step's checkpoints, `diffusion_batch` of their tokens,
    timesteps and noise from a seeded generator; the loss under bf16 autocast when asked): a callable returning the
    loss. Two steppers built with the same seed draw the same minibatches."""
    from rpg.train import DiffusionObjective

    objective = DiffusionObjective(model, diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    k, n, length = tokens.shape

    def step() -> float:
        idx = torch.randint(0, k, (batch_size,), generator=gen)
        picked = torch.randperm(batch_size * n, generator=gen)[:diffusion_batch]
        t, noise = diffusion.draw(len(picked), length, torch.device("cpu"), tokens.dtype, gen)
        perm = idx if model.permutation is not None else None
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = objective(tokens, idx, mask, picked, perm, None, t=t, noise=noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
        opt.step()
        return loss.item()

    return step


def row_results(cfg, name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The training step and sampling of one Table 1 row, float32 then bfloat16."""
    from rpg.diffusion import create_diffusion
    from rpg.experiments.arch_study.study import arch_spec, main_variant, variant_model_config
    from rpg.generate import generate_tokens
    from rpg.model import RPG
    from rpg.tokenize import Tokenizer
    from rpg.vision.architectures import build_model, count_parameters

    spec = arch_spec(cfg, name)
    set_threads(spec.threads)
    template = build_model(spec.arch, spec.model_kwargs).eval()
    variant = main_variant(cfg, name, count_parameters(template))
    model_cfg = variant_model_config(spec, variant, count_parameters(template))
    n_ckpt = spec.recipe.n_checkpoints * variant.runs
    sds = random_state_dicts(template, n_ckpt, args.seed)
    tokenizer = Tokenizer.fit(sds, model_cfg.token_size)
    tokens = torch.stack([tokenizer.tokenize(sd) for sd in sds])
    diffusion = create_diffusion(spec.diffusion)
    steps = spec.sample_steps[0] if isinstance(spec.sample_steps, (tuple, list)) else spec.diffusion.sample_steps
    tc = spec.train
    rows, seconds = [], {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(args.seed)  # the same initial generator in both precisions
        model = RPG(model_cfg, tokenizer.layer_index, tokenizer.token_index,
                    n_permutation_states=n_ckpt if model_cfg.permutation_state else 0).train()
        step = training_step(model, diffusion, tokens, tokenizer.mask, tc.batch_size, tc.diffusion_batch,
                             tc.grad_clip, args.seed, bf16=precision == "bf16")
        for _ in range(3):
            step()
        runs = [timed(step, torch.device("cpu")) for _ in range(args.steps)]
        seconds[("train", precision)] = statistics.median(r[0] for r in runs)
        loss = statistics.mean(r[2] for r in runs)
        model.eval()

        def sample(amp: str, model=model) -> torch.Tensor:
            return generate_tokens(model, diffusion, args.samples, sampler=spec.diffusion.sampler, steps=steps,
                                   clip_x0=spec.diffusion.clip_x0, mode=cfg.generate.mode,
                                   tokens_per_call=cfg.generate.tokens_per_call, amp=amp,
                                   generator=torch.Generator().manual_seed(args.seed))

        amp = "bf16" if precision == "bf16" else "none"
        seconds[("sample", precision)] = statistics.median(
            timed(lambda: sample(amp), torch.device("cpu"))[0] for _ in range(args.repeats))
        if precision == "fp32":  # one generator sampled in both precisions from the same noise
            reference, in_bf16 = sample("none"), sample("bf16")
        rows += [{"architecture": name, "part": part, "precision": precision, "threads": spec.threads,
                  "seconds": seconds[(part, precision)], "per_job": count,
                  "mean_loss": loss if part == "train" else None}
                 for part, count in (("train", tc.steps), ("sample", spec.samples))]
    rel = float((in_bf16 - reference).norm() / reference.norm())
    for row in rows:
        row["ratio"] = seconds[(row["part"], "fp32")] / seconds[(row["part"], row["precision"])]
        row["token_rel_diff"] = rel if row["part"] == "sample" else None
    for part in ("train", "sample"):
        print(f"{name:10s} {part:6s} fp32 {seconds[(part, 'fp32')]:.3f} s  bf16 {seconds[(part, 'bf16')]:.3f} s  "
              f"ratio {seconds[(part, 'fp32')] / seconds[(part, 'bf16')]:.2f}  ({spec.threads} thread(s))"
              + (f"  token rel. diff {rel:.4f}" if part == "sample" else ""), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from rpg.config import load_config

    cfg = load_config(args.config)
    rows = [r for name in (args.rows or cfg.architectures.table1) for r in row_results(cfg, name, args)]
    write_results(args.out, rows, {**vars(args), "config": [str(p) for p in args.config]}, torch.device("cpu"))
    return rows


if __name__ == "__main__":
    main()
