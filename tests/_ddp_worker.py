"""Worker of tests/test_ddp.py, launched by `torchrun --nproc_per_node 2` (gloo, CPU); also imported by the test
for the one-process reference run, so both sides train the very same problem.

The problem: 6 synthetic checkpoints (a 2-layer MLP shape whose last layer pads its token), a tiny task-conditioned
RPG with permutation states (Mamba2 d_model 32, denoiser 1-8-16-8-1, token 16), 12 steps, global batch 4
checkpoints, diffusion batch 24 tokens, a validation (generation in eval mode, rank 0 only) every 4 steps.

Under torchrun the worker runs, in one launch: a whole run into RUNS/full; a run stopped after 6 steps into
RUNS/resumed, then its resumption to the end; a run with one token per step into RUNS/sparse. Processes other than rank 0 record, with an audit hook, every file
they open for writing, create, rename or delete under RUNS, and write the list to AUDIT/rank<r>.json.

`_ddp_worker.py pipeline --runs DIR --audit AUDIT -- ARGS` instead runs the pipeline's own entry point,
`python -m rpg.experiments.task_zoo.pipeline ARGS` (its `main`), with the same audit of what ranks other than 0 write
under DIR (tests/test_workflow.py: train_rpg of the test DAG under torchrun).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from rpg.config import DiffusionConfig, ModelConfig, TrainConfig
from rpg.diffusion import create_diffusion
from rpg.generate import generate_tokens
from rpg.tokenize import Tokenizer
from rpg.train import train_rpg

STEPS, STOP_AFTER = 12, 6
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def problem(sparse: bool = False) -> dict:
    """Tokens, task bits, tokenizer and configs of the shared training problem. `sparse`: 2 checkpoints and 1
    token per step, so one process has no token of the diffusion batch (an empty shard) at every step."""
    gen = torch.Generator().manual_seed(0)
    sds = [{"0.weight": torch.randn(8, 6, generator=gen), "0.bias": torch.randn(8, generator=gen),
            "2.weight": torch.randn(3, 8, generator=gen)} for _ in range(6)]  # 48 + 8 + 24: padded tokens
    tokenizer = Tokenizer.fit(sds, 16)
    tokens = torch.stack([tokenizer.tokenize(sd) for sd in sds])  # (6, N, 16)
    cond = torch.tensor([[(i >> b) & 1 for b in range(10)] for i in range(1, 7)], dtype=torch.float32)  # (6, 10)
    model_cfg = ModelConfig(token_size=16, recurrent="mamba", d_model=32, n_layers=2, d_state=16, d_conv=4, expand=2,
                            headdim=16, denoiser_channels=(1, 8, 16, 8, 1), kernel_size=7, position="2d",
                            permutation_state=True, condition="task", condition_dim=10)
    train_cfg = TrainConfig(steps=STEPS, batch_size=2 if sparse else 4, diffusion_batch=1 if sparse else 24, lr=3e-3,
                            warmup_steps=2, amp="none", save_every=4, eval_every=4, grad_clip=1.0)
    return {"tokens": tokens, "cond": cond, "tokenizer": tokenizer, "model_cfg": model_cfg, "train_cfg": train_cfg,
            "diffusion_cfg": DiffusionConfig(sample_steps=2)}


def validate(model) -> dict[str, float]:
    """Generate (eval mode, as the real validators do) and score by the step count, so every validation is best."""
    validate.calls = getattr(validate, "calls", 0) + 1
    cond = torch.zeros(1, 10)
    tokens = generate_tokens(model, create_diffusion(DiffusionConfig()), 1, cond=cond, steps=2,
                             generator=torch.Generator().manual_seed(0))
    return {"score": float(validate.calls), "norm": float(tokens.norm())}


def train(p: dict, out_dir: Path, stop_after: int | None = None) -> dict:
    return train_rpg(p["model_cfg"], p["diffusion_cfg"], p["train_cfg"], p["tokenizer"], p["tokens"], out_dir,
                     cond=p["cond"], seed=3, validate=validate, progress=False, stop_after=stop_after)


def _audit_writes(root: Path, log: list) -> None:
    root = str(root.resolve())

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(root)
        except TypeError:  # a file descriptor
            return False

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and under(path):
                log.append([event, os.fsdecode(path)])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.rename", "shutil.rmtree",
                       "shutil.move") and args and under(args[0]):
            log.append([event, os.fsdecode(args[0])])

    sys.addaudithook(hook)


def pipeline_main(argv: list[str]) -> None:
    """The pipeline's entry point under the audit of what ranks other than 0 write under --runs."""
    from rpg.experiments.task_zoo import pipeline

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True, type=Path)
    parser.add_argument("--audit", required=True, type=Path)
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    rank = int(os.environ.get("RANK", "0"))
    writes: list = []
    if rank != 0:
        _audit_writes(args.runs, writes)
    pipeline.main(argv[split + 1:])
    if rank != 0:
        args.audit.mkdir(parents=True, exist_ok=True)
        (args.audit / f"rank{rank}.json").write_text(json.dumps(writes))


def main() -> None:
    if sys.argv[1:2] == ["pipeline"]:
        return pipeline_main(sys.argv[2:])
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True, type=Path)
    parser.add_argument("--audit", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    writes: list = []
    if rank != 0:
        _audit_writes(args.runs, writes)
    p = problem()
    train(p, args.runs / "full")
    train(p, args.runs / "resumed", stop_after=STOP_AFTER)
    train(p, args.runs / "resumed")
    train(problem(sparse=True), args.runs / "sparse")
    if rank != 0:
        args.audit.mkdir(parents=True, exist_ok=True)
        (args.audit / f"rank{rank}.json").write_text(json.dumps(writes))


if __name__ == "__main__":
    main()
