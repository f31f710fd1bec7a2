"""The `rpg` command: generate a classifier for a task in seconds, evaluate any head checkpoint.

    rpg generate --checkpoint results/rpg/cifar10_binary/best.safetensors --classes ship,truck --samples 3
    rpg evaluate results/generated/cli/0003_s0.safetensors --features results/features/cifar10_binary/features.safetensors

User mistakes (bad embedding, unknown class, unreadable file, ...) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rpg.checkpoint import load_rpg
from rpg.config import ConfigError, DiffusionConfig
from rpg.diffusion import create_diffusion
from rpg.generate import GENERATION_MODES, generate_tokens
from rpg.tasks import (TaskError, classes_to_embedding, embedding_bits, embedding_to_id, id_to_embedding,
                       parse_embedding, positive_classes)
from rpg.utils import CheckpointError, load_safetensors, resolve_device, save_safetensors_atomic
from rpg.zoo import HEAD_KEYS, evaluate_heads, stack_state_dicts

USER_ERRORS = (TaskError, CheckpointError, ConfigError, FileNotFoundError, ValueError)


def _task_from_args(args: argparse.Namespace) -> str:
    if bool(args.embedding) == bool(args.classes):
        raise TaskError("give exactly one of --embedding (10 bits) or --classes (comma-separated names)")
    if args.embedding:
        return parse_embedding(args.embedding)
    return classes_to_embedding([c for c in args.classes.split(",") if c.strip()])


def cmd_generate(args: argparse.Namespace) -> int:
    embedding = _task_from_args(args)
    task_id = embedding_to_id(embedding)
    device = resolve_device(args.device)
    model, tokenizer, dcfg, meta = load_rpg(args.checkpoint, device)
    if model.task_encoder is None:
        raise ConfigError(f"{args.checkpoint} is not task-conditioned; it cannot generate for an embedding")
    steps = args.steps if args.steps is not None else dcfg.sample_steps
    sampler = args.sampler or dcfg.sampler
    tokens = generate_tokens(model, create_diffusion(dcfg), args.samples,
                             cond=embedding_bits([task_id]).repeat(args.samples, 1), sampler=sampler, steps=steps,
                             eta=dcfg.eta, clip_x0=dcfg.clip_x0, mode=args.mode,
                             tokens_per_call=args.tokens_per_call, generator=torch.Generator().manual_seed(args.seed))
    out_dir = Path(args.out)
    generated: dict[Path, dict[str, torch.Tensor]] = {}
    for s, t in enumerate(tokens):
        sd = tokenizer.detokenize(t)
        path = out_dir / f"{task_id:04d}_s{s}.safetensors"
        d = sd["0.weight"].shape[1] if "0.weight" in sd else None
        save_safetensors_atomic(sd, path, {
            "arch": "binary_head", "feature_dim": d, "task_id": task_id, "embedding": embedding,
            "positive_classes": positive_classes(embedding), "sample": s, "seed": args.seed, "sampler": sampler,
            "steps": steps, "generator": str(args.checkpoint), "generator_step": meta["step"],
            "build": "rpg.zoo.make_head(feature_dim).load_state_dict(safetensors.torch.load_file(path))",
        })
        generated[path] = sd
        print(path)
    if args.evaluate:
        _print_eval(generated, args.features, task_id)
    return 0


def _print_eval(heads: dict[Path, dict[str, torch.Tensor]], features: str, task_id: int) -> None:
    """Test accuracy of each head on one task; the features file is read once for all of them."""
    from rpg.features import load_features

    feats = load_features(features)
    m = evaluate_heads(stack_state_dicts(list(heads.values())), [task_id] * len(heads), feats["test_x"],
                       feats["test_y"])
    for i, path in enumerate(heads):
        print(f"{path}: task {id_to_embedding(task_id)} accuracy {100 * m['accuracy'][i]:.2f} % "
              f"balanced accuracy {100 * m['balanced_accuracy'][i]:.2f} %")


def cmd_evaluate(args: argparse.Namespace) -> int:
    tensors, meta = load_safetensors(args.model)
    missing = [k for k in HEAD_KEYS if k not in tensors]
    if missing:
        raise CheckpointError(f"{args.model} is not a binary head (missing {missing})")
    if args.embedding:
        task_id = embedding_to_id(args.embedding)
    elif "task_id" in meta:
        task_id = int(meta["task_id"])
    else:
        raise TaskError(f"{args.model} has no task in its metadata: pass --embedding")
    _print_eval({Path(args.model): tensors}, args.features, task_id)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate classifier heads for a task embedding or class list")
    g.add_argument("--checkpoint", required=True, help="trained RPG generator (best.safetensors)")
    g.add_argument("--embedding", help="10-bit task embedding, e.g. 0100010111 (bit i = CIFAR-10 class i)")
    g.add_argument("--classes", help="comma-separated positive classes, e.g. ship,truck (case-insensitive)")
    g.add_argument("--samples", type=int, default=1, help="models to generate (default 1)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=None, help="sampler steps (default: the generator's config)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default=None)
    g.add_argument("--mode", choices=GENERATION_MODES, default="partial")
    g.add_argument("--tokens-per-call", type=int, default=256)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--out", default="results/generated/cli", help="output folder (default results/generated/cli)")
    g.add_argument("--evaluate", action="store_true", help="print test accuracy (needs --features)")
    g.add_argument("--features", default="results/features/cifar10_binary/features.safetensors")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", help="accuracy and balanced accuracy of a binary head checkpoint")
    e.add_argument("model", help="a generated or zoo head (.safetensors)")
    e.add_argument("--features", default="results/features/cifar10_binary/features.safetensors")
    e.add_argument("--embedding", help="task to score against (default: from the file's metadata)")
    e.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"rpg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
