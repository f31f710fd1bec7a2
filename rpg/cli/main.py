"""The `rpg` command: generate a classifier for a task in seconds, or train RPG on your own checkpoints.

    rpg generate --checkpoint results/rpg/cifar10_binary/best.safetensors --classes ship,truck --samples 3
    rpg evaluate results/generated/cli/0003_s0.safetensors --features results/features/cifar10_binary/features.safetensors
    rpg inspect my_checkpoints/ --token-size 256
    rpg train --checkpoints my_checkpoints/ --out my_rpg/ --config config/byo_checkpoints.yaml --eval my_eval.py:score
    rpg generate --checkpoint my_rpg/best.safetensors --samples 10 --out my_generated/
    rpg docs check                      # README / docs tables agree with docs/reference (`render` rewrites them)

User mistakes (bad embedding, unknown class, unreadable or inconsistent checkpoints, bad --eval, ...) and any error
of the file system (permission denied, read-only file system, a name too long, ...) print one line and exit with
status 2; a full disk prints one line and exits with status 1. `rpg <command> --help` documents each command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from rpg import __version__
from rpg.checkpoint import load_rpg
from rpg.collection import format_report, inspect_collection, load_collection
from rpg.config import Config, ConfigError, DataConfig, GenerateConfig, ModelConfig, load_config
from rpg.data import CorruptDataError
from rpg.diffusion import create_diffusion
from rpg.generate import GENERATION_MODES, sample_models
from rpg.experiments.task_zoo.tasks import (TaskError, classes_to_embedding, domain_task_id, embedding_bits,
                                             embedding_to_id, id_to_embedding, parse_embedding, positive_classes,
                                             task_condition)
from rpg.cli import docs as docs_cli
from rpg.cli.user_eval import load_score_function
from rpg.train import RunConflictError, TrainingDivergedError, run_lock
from rpg.utils import (CheckpointError, check_finite, check_writable_folder, load_safetensors,
                       read_safetensors_metadata, resolve_device, save_safetensors_atomic, state_dict_mismatch)
from rpg.experiments.task_zoo.heads import HEAD_KEYS, evaluate_heads, stack_state_dicts

# CorruptDataError: a truncated or malformed CIFAR-10 archive. Every OSError (a missing file, --out naming a file,
# permission denied, ...) is one line too: see main().
USER_ERRORS = (TaskError, CheckpointError, ConfigError, ValueError, CorruptDataError, RunConflictError,
               TrainingDivergedError)
# What to do about an OSError of the file system, by errno (the line names the path and the system's message first).
OS_ERROR_ADVICE = {
    errno.EACCES: "choose a path you may write to (or read), or change its permissions",
    errno.EPERM: "choose a path you may write to (or read), or change its permissions",
    errno.EROFS: "the file system is mounted read-only: choose a folder on another one",
    errno.ENAMETOOLONG: "a name in the path is longer than the file system allows (255 bytes on most): shorten it",
}
# `rpg train`'s preset, under its --config: unconditional, one permutation state per checkpoint (documented there).
BYO_PRESET = Path(__file__).resolve().parents[1] / "byo_preset.yaml"
COLLECTION_INFO = "collection.json"  # beside the generator: where its checkpoints came from, how to build them


def _task_from_args(args: argparse.Namespace) -> str:
    if (args.embedding is None) == (args.classes is None):
        raise TaskError("give exactly one of --embedding (10 bits) or --classes (comma-separated names)")
    if args.embedding is not None:
        return parse_embedding(args.embedding)
    names = [c for c in args.classes.split(",") if c.strip()]
    if not names:
        raise TaskError(f"--classes {args.classes!r} names no class: give comma-separated CIFAR-10 classes, "
                        "e.g. --classes ship,truck")
    return classes_to_embedding(names)


def _task_condition(args: argparse.Namespace, embedding: str, condition_dim: int, meta: dict
                    ) -> tuple[int, int | None, torch.Tensor]:
    """(task id, domain index or None, condition (1, condition_dim)) of the requested task.

    A generator of the study's domain regimes is conditioned on (class set, image domain): its condition has one
    entry per domain after the 10 class bits (or the domain codes its file keeps, metadata "extra.domain_codes"),
    and its file names the domains (metadata "extra.domains").
    """
    from rpg.experiments.task_zoo.domains import stored_domain_codes

    class_set = embedding_to_id(embedding)
    names = list(meta.get("extra", {}).get("domains") or [])
    codes = stored_domain_codes(meta)
    n_domains = len(names) if codes is not None else condition_dim - 10
    if n_domains <= 0:
        if args.domain is not None:
            raise TaskError(f"--domain {args.domain!r}: this generator is conditioned on the class set only")
        return class_set, None, embedding_bits([class_set])
    known = ", ".join(names) if names else f"0..{n_domains - 1}"
    if args.domain is None:
        raise TaskError(f"this generator is conditioned on (class set, image domain): pass --domain, one of {known}")
    if args.domain in names:
        domain = names.index(args.domain)
    elif args.domain.isdigit() and int(args.domain) < n_domains:
        domain = int(args.domain)
    else:
        raise TaskError(f"--domain {args.domain!r} is not a domain of this generator (one of {known})")
    task_id = domain_task_id(class_set, domain)
    return task_id, domain, task_condition([task_id], n_domains, codes)


def _check_generate_args(args: argparse.Namespace) -> None:
    """Numbers the sampler cannot work with, refused before anything is loaded or written."""
    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps} (0 steps would write the initial noise)")
    if args.tokens_per_call < 1:
        raise ValueError(f"--tokens-per-call must be at least 1, got {args.tokens_per_call}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder")


def _sampler_config(args: argparse.Namespace, dcfg):
    """The generator's own sampler settings with --sampler / --steps applied.

    A --steps the sampler cannot run is refused rather than capped or ignored (the user asked for that count):
    ddpm always runs all the diffusion's timesteps, ddim at most that many.
    """
    sampler, total = args.sampler or dcfg.sampler, dcfg.timesteps
    if args.steps is not None and sampler == "ddpm" and args.steps != total:
        raise ValueError(f"--steps {args.steps} does not apply to the ddpm sampler, which runs all {total} steps of "
                         f"{args.checkpoint}'s diffusion: drop --steps, or pass --sampler ddim")
    if args.steps is not None and args.steps > total:
        raise ValueError(f"--steps {args.steps}: {args.checkpoint}'s diffusion has {total} steps, so --steps must be "
                         f"at most {total}")
    return dataclasses.replace(dcfg, sampler=sampler,
                               sample_steps=args.steps if args.steps is not None else dcfg.sample_steps)


def _sampler_metadata(dcfg) -> dict[str, Any]:
    """What the sampler ran, for the generated files: its name and its count of denoising steps (all timesteps for
    ddpm; a generator's own sample_steps above its timesteps are capped)."""
    steps = len(create_diffusion(dcfg).sampling_sequence(dcfg.sampler, dcfg.sample_steps))
    return {"sampler": dcfg.sampler, "steps": steps}


@contextlib.contextmanager
def _owned_output_folder(out: str | Path) -> Iterator[Path]:
    """Hold --out as `rpg train` holds its folder (the run lock: a concurrent rpg generate or rpg train into it is
    refused), and check that files can be created in it, before any sampling or write."""
    out = Path(out)
    with run_lock(out, user="rpg generate"):
        check_writable_folder(out)
        yield out


def _check_generated(states: list[dict[str, torch.Tensor]], checkpoint: str) -> None:
    """Refuse to write models with NaN/Inf weights (a diverged or corrupted generator)."""
    for s, state in enumerate(states):
        check_finite(state, f"generated model {s} of {checkpoint} (nothing was written)")


def cmd_generate(args: argparse.Namespace) -> int:
    _check_generate_args(args)
    device = resolve_device(args.device)
    model, tokenizer, dcfg, meta = load_rpg(args.checkpoint, device)
    dcfg = _sampler_config(args, dcfg)
    if model.task_encoder is None:
        return _generate_unconditional(args, model, tokenizer, dcfg, meta)
    embedding = _task_from_args(args)
    task_id, domain, cond = _task_condition(args, embedding, model.cfg.condition_dim, meta)
    feature_dim = {layer.name: layer.shape for layer in tokenizer.layers}.get("0.weight", (None, None))[1]
    test_set = None
    if args.evaluate:  # read (and checked against the heads) before anything is sampled or written
        if not Path(args.features).is_file():
            raise FileNotFoundError(f"--evaluate needs the features file {args.features} (not found); pass --features")
        test_set = _test_features(args.features, feature_dim, domain)
    with _owned_output_folder(args.out) as out_dir:
        _refuse_heads_of_other_generators(out_dir, args.checkpoint, meta["step"], feature_dim, args.force)
        states = sample_models(model, tokenizer, dcfg, args.samples, seed=args.seed, mode=args.mode,
                               cond=cond.repeat(args.samples, 1),
                               tokens_per_call=args.tokens_per_call)
        generated: dict[Path, dict[str, torch.Tensor]] = {}
        _check_generated(states, args.checkpoint)
        for s, sd in enumerate(states):
            path = out_dir / f"{task_id:04d}_s{s}.safetensors"
            save_safetensors_atomic(sd, path, {
                "arch": "binary_head", "feature_dim": feature_dim, "task_id": task_id, "embedding": embedding,
                "positive_classes": positive_classes(embedding), **({} if domain is None else {"domain": domain}),
                "sample": s, "seed": args.seed, **_sampler_metadata(dcfg),
                "generator": str(args.checkpoint), "generator_step": meta["step"],
                "build": "rpg.experiments.task_zoo.heads.make_head(feature_dim).load_state_dict(safetensors.torch.load_file(path))",
            })
            generated[path] = sd
            print(path)
    if test_set is not None:
        _print_eval(generated, *test_set, embedding_to_id(embedding))
    return 0


def _refuse_heads_of_other_generators(out: Path, checkpoint: str, step: int, feature_dim: int | None,
                                      force: bool) -> None:
    """The rule for heads: a folder holds the heads of one generator (any tasks, seeds and samples of it).

    Earlier heads that rpg generate wrote from another generator file, another step of it or another feature
    dimension are refused, or with --force removed; files rpg generate did not write are never touched.
    """
    this = (Path(checkpoint).resolve(), step, feature_dim)
    others = []
    for path in sorted(out.glob("[0-9][0-9][0-9][0-9]_s*.safetensors")):
        meta = _metadata_or_empty(path)
        if "generator" in meta and (Path(str(meta["generator"])).resolve(), meta.get("generator_step"),
                                    meta.get("feature_dim")) != this:
            others.append((path, meta))
    if others and not force:
        path, meta = others[0]
        raise RunConflictError(
            f"--out {out} holds heads of another generator ({path.name}: {meta['generator']}, step "
            f"{meta.get('generator_step')}, feature_dim {meta.get('feature_dim')}); heads of {checkpoint} (step "
            f"{step}, feature_dim {feature_dim}) would be mixed with them: pass --force to replace them, or choose "
            "another --out")
    for path, _ in others:
        path.unlink()


def _generate_unconditional(args: argparse.Namespace, model, tokenizer, dcfg, meta: dict) -> int:
    """Whole models from a generator trained by `rpg train --checkpoints` (no task: --embedding/--classes refused)."""
    if args.embedding is not None or args.classes is not None:
        raise TaskError(f"{args.checkpoint} is an unconditional generator (trained on a checkpoint collection); "
                        "it takes no --embedding or --classes")
    score_fn = load_score_function(args.eval) if args.eval else None
    if args.evaluate and score_fn is None:
        raise ValueError("--evaluate of whole models needs --eval module:function (a score of a state dict)")
    info_path = Path(args.checkpoint).parent / COLLECTION_INFO
    architecture = json.loads(info_path.read_text()).get("architecture", {}) if info_path.is_file() else {}
    with _owned_output_folder(args.out) as out:
        states = sample_models(model, tokenizer, dcfg, args.samples, seed=args.seed, mode=args.mode,
                               tokens_per_call=args.tokens_per_call)
        _check_generated(states, args.checkpoint)
        _clear_earlier_models(out)
        for s, state in enumerate(states):
            path = out / f"model_{s:03d}.safetensors"
            save_safetensors_atomic(state, path, {
                **architecture, "sample": s, "seed": args.seed, **_sampler_metadata(dcfg),
                "generator": str(args.checkpoint), "generator_step": meta["step"],
            })
            line = str(path)
            if args.evaluate:
                line += f": score {score_fn(state):.4f}"
            print(line)
    return 0


def _clear_earlier_models(out: Path) -> None:
    """The rule for whole models: `rpg generate` owns the names model_NNN.safetensors in --out.

    Earlier ones written by `rpg generate` (their metadata names a 'generator') are removed, so the folder holds
    exactly this call's models; a model_NNN.safetensors written by anything else is never touched: refused.
    """
    if not out.is_dir():
        return
    earlier = sorted(out.glob("model_[0-9][0-9][0-9].safetensors"))
    foreign = [p for p in earlier if "generator" not in _metadata_or_empty(p)]
    if foreign:
        raise FileExistsError(f"{foreign[0]} was not written by rpg generate; it would be overwritten or mixed with "
                              "the new models: choose another --out or move it")
    for p in earlier:
        p.unlink()


def _metadata_or_empty(path: Path) -> dict:
    try:
        return read_safetensors_metadata(path)
    except CheckpointError:
        return {}


def _test_features(features: str, feature_dim: int | None, domain: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Test features (N, d) and class labels (N,) of `features`, on the images of `domain` when given (a domain
    regime's features file, (D, N, d) arrays); refuses a file whose features do not fit heads of `feature_dim`
    inputs (e.g. another backbone's), so that nothing is generated or written for it."""
    from rpg.experiments.task_zoo.features import load_features

    feats = load_features(features)
    test_x = feats["test_x"]
    if (domain is not None) != (test_x.ndim == 3):
        raise ValueError(f"--features {features} holds {'per-domain' if test_x.ndim == 3 else 'plain'} features "
                         f"but the task {'has' if domain is not None else 'has no'} domain: pass a "
                         f"{'domain regime' if domain is not None else 'plain'} features file")
    if domain is not None:
        test_x = test_x[domain]
    if feature_dim is not None and test_x.shape[-1] != feature_dim:
        raise ValueError(f"--features {features} holds {test_x.shape[-1]}-dimensional features but the heads take "
                         f"{feature_dim}-dimensional ones: pass the features of the backbone their generator was "
                         "trained on")
    return test_x, feats["test_y"]


def _print_eval(heads: dict[Path, dict[str, torch.Tensor]], test_x: torch.Tensor, test_y: torch.Tensor,
                task_id: int) -> None:
    """Test accuracy of each head on one class set (`task_id` < 1024), on test features and labels from
    `_test_features`."""
    m = evaluate_heads(stack_state_dicts(list(heads.values())), [task_id] * len(heads), test_x, test_y)
    for i, path in enumerate(heads):
        print(f"{path}: task {id_to_embedding(task_id)} accuracy {100 * m['accuracy'][i]:.2f} % "
              f"balanced accuracy {100 * m['balanced_accuracy'][i]:.2f} %")


def cmd_evaluate(args: argparse.Namespace) -> int:
    tensors, meta = load_safetensors(args.model)
    check_finite(tensors, args.model)
    if args.eval:
        print(f"{args.model}: score {load_score_function(args.eval)(tensors):.4f}")
        return 0
    is_head = set(tensors) == set(HEAD_KEYS)
    if not is_head and "arch" in meta:
        print(f"{args.model}: {meta['arch']} CIFAR-10 test accuracy "
              f"{100 * _cifar10_accuracy(args.model, tensors, meta, args.data, args.device):.2f} %")
        return 0
    if not is_head:
        raise CheckpointError(f"{args.model} is neither a binary head (keys {list(HEAD_KEYS)}) nor a model whose "
                              "metadata names its architecture ('arch'); score it with --eval module:function")
    if args.embedding:
        task_id = embedding_to_id(args.embedding)
    elif "task_id" in meta:
        task_id = int(meta["task_id"])
    else:
        raise TaskError(f"{args.model} has no task in its metadata: pass --embedding")
    _print_eval({Path(args.model): tensors}, *_test_features(args.features, tensors["0.weight"].shape[1]), task_id)
    return 0


def _cifar10_accuracy(path: str, tensors: dict[str, torch.Tensor], meta: dict, data: str, device: str) -> float:
    """10-class test accuracy of a full model saved with its architecture (rpg.vision.architectures metadata)."""
    from rpg.data import load_cifar10
    from rpg.vision.architectures import model_from_metadata
    from rpg.vision.evaluate import ImageEvaluator
    import timm

    if not timm.is_model(str(meta["arch"])):
        raise CheckpointError(f"architecture '{meta['arch']}' is not a timm model, so rpg evaluate cannot build it; "
                              "pass --eval module:function to score the state dict")
    try:
        model = model_from_metadata(meta, tensors)
    except TypeError as err:  # a model_kwargs entry the architecture does not take (a typo, another timm version)
        raise CheckpointError(f"{path}: its metadata's model_kwargs {meta.get('model_kwargs')} do not fit architecture "
                              f"{meta['arch']} ({err}); correct them in the file's metadata") from err
    except RuntimeError as err:  # load_state_dict: keys or shapes do not fit the named architecture
        expected = model_from_metadata(meta).state_dict()
        raise CheckpointError(f"the weights do not fit architecture {meta['arch']}: "
                              f"{state_dict_mismatch(expected, tensors) or str(err).splitlines()[0]}") from err
    cifar = load_cifar10(data)
    dev = resolve_device(device)
    evaluator = ImageEvaluator(cifar.test_images, cifar.test_labels, img_size=int(meta.get("img_size", 32)), device=dev)
    return evaluator.accuracy(model.to(dev))


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_collection(args.directory, args.token_size, skip_bad=args.skip_bad, pattern=args.pattern)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["usable"] else 1


def _train_config(args: argparse.Namespace):
    overrides: dict[str, Any] = {"train": {"steps": args.steps}} if args.steps is not None else {}
    return load_config([BYO_PRESET, *([args.config] if args.config else [])], overrides=overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from rpg.unconditional import train_on_collection

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise NotADirectoryError(f"--out {args.out} is a file; give a folder")
    cfg = _train_config(args)
    if cfg.model.condition != "none":
        raise ConfigError(f"{args.config}: rpg train makes an unconditional generator; set rpg.condition: none "
                          "(see config/byo_checkpoints.yaml)")
    score_fn = load_score_function(args.eval) if args.eval else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        collection = load_collection(args.checkpoints, skip_bad=args.skip_bad, pattern=args.pattern)
    for warning in caught:
        print(f"rpg train: warning: {warning.message}", file=sys.stderr)
    print(f"{len(collection)} checkpoints from {args.checkpoints}"
          + (f" ({len(collection.skipped)} skipped)" if collection.skipped else ""))
    if score_fn is not None:  # fail now, not at the first validation, if the function does not work
        print(f"score of {collection.paths[0].name} (an original): {score_fn(collection.state_dicts[0]):.4f}")
    out = Path(args.out)
    seed = cfg.seed if args.seed is None else args.seed
    try:
        with run_lock(out, callees_share=True):  # a refused second run writes nothing into the first one's folder
            check_writable_folder(out)  # before the training, not at its first checkpoint
            summary = train_on_collection(
                collection.state_dicts, out, model_cfg=cfg.model, diffusion_cfg=cfg.diffusion, train_cfg=cfg.train,
                seed=seed, device=resolve_device(args.device or cfg.device), score_fn=score_fn,
                names=[p.name for p in collection.paths],
                progress=cfg.logging.progress, stop_after=args.stop_after, force=args.force,
                files={COLLECTION_INFO: {  # written once the folder accepts this run (a refused run writes nothing)
                    "checkpoints": str(args.checkpoints), "files": [p.name for p in collection.paths],
                    "skipped": [{"file": str(p), "problem": msg} for p, msg in collection.skipped],
                    "architecture": collection.architecture(), "eval": args.eval,
                }})
    except KeyboardInterrupt:
        print(f"rpg train: interrupted; run the same command again to resume from {out / 'last.opt.pt'}",
              file=sys.stderr)
        return 130
    if not summary["finished"]:
        print(f"stopped at step {summary['steps']} of {cfg.train.steps}; run the same command again to resume")
        return 0
    score = f", validation score {summary['best_score']:.4f}" if score_fn is not None else ""
    print(f"generator: {out / 'best.safetensors'} (step {summary['best_step']}{score})")
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default shown after its help."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpg", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"rpg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", formatter_class=_HelpFormatter,
                       help="generate models: heads for a task, or whole models of a collection",
                       description="Generate weights with a trained RPG. A task-conditioned generator needs "
                                   "--embedding or --classes and writes binary heads; an unconditional one (from "
                                   "`rpg train --checkpoints`) writes whole state dicts model_NNN.safetensors whose "
                                   "metadata carries the architecture of the collection when it was known.")
    g.add_argument("--checkpoint", required=True, help="trained RPG generator (best.safetensors)")
    g.add_argument("--embedding", help="10-bit task embedding, e.g. 0100010111 (bit i = CIFAR-10 class i)")
    g.add_argument("--classes", help="comma-separated positive classes, e.g. ship,truck (case-insensitive)")
    g.add_argument("--domain", help="image domain (name or index) for a generator of the study's domain regimes, "
                   "conditioned on (class set, domain), e.g. --domain blur")
    g.add_argument("--samples", type=int, default=1, help="models to generate")
    g.add_argument("--seed", type=int, default=0, help="seed of all sampling noise (same seed, same models)")
    g.add_argument("--steps", type=int, default=None, help="sampler steps, at least 1 (None: the generator's config)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="None: the generator's config")
    g.add_argument("--mode", choices=GENERATION_MODES, default=GenerateConfig.mode,
                   help="tokens per denoiser call: sequential 1, partial --tokens-per-call, full all (memory vs speed)")
    g.add_argument("--tokens-per-call", type=int, default=GenerateConfig.tokens_per_call,
                   help="tokens per denoiser call in --mode partial")
    g.add_argument("--device", default=Config.device, choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    g.add_argument("--out", default="results/generated/cli",
                   help="output folder; whole models replace the model_NNN files an earlier rpg generate wrote there")
    g.add_argument("--evaluate", action="store_true",
                   help="print test accuracy (heads: needs --features; whole models: needs --eval)")
    g.add_argument("--features", default="results/features/cifar10_binary/features.safetensors",
                   help="features of the CIFAR-10 test images, for --evaluate of heads")
    g.add_argument("--eval", metavar="MODULE:FUNCTION", help="score function of a state dict, for --evaluate of "
                   "whole models (e.g. examples/mlp_eval.py:test_accuracy)")
    g.add_argument("--force", action="store_true", help="heads: replace the heads of another generator (or feature "
                   "dimension) that an earlier rpg generate wrote to --out (without it they are refused, never mixed)")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("evaluate", formatter_class=_HelpFormatter,
                       help="accuracy of a binary head, a full CIFAR-10 model, or any model by --eval",
                       description="Binary heads: accuracy and balanced accuracy on their task (--features). Full "
                                   "models whose metadata names a timm/rpg architecture ('arch', 'model_kwargs'): "
                                   "CIFAR-10 test accuracy (--data). Anything else: the score of --eval.")
    e.add_argument("model", help="a generated or zoo checkpoint (.safetensors)")
    e.add_argument("--features", default="results/features/cifar10_binary/features.safetensors",
                   help="features of the CIFAR-10 test images, for binary heads")
    e.add_argument("--embedding", help="task to score against (None: from the file's metadata)")
    e.add_argument("--data", default=DataConfig.root, help="folder with cifar-10-python.tar.gz, for full models")
    e.add_argument("--eval", metavar="MODULE:FUNCTION", help="score the state dict with this function instead "
                   "(module:function or path/to/file.py:function)")
    e.add_argument("--device", default=Config.device, choices=["auto", "cpu", "cuda"], help="auto: cuda if available")
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("inspect", formatter_class=_HelpFormatter,
                       help="report a folder of checkpoints: count, layers, tokens, problems",
                       description="What RPG would train on: checkpoints found, parameters generated vs. copied, "
                                   "each layer's shape and tokens, bad files and why, a metadata summary. "
                                   "Exit status 0 if `rpg train` would accept the folder (with the same --skip-bad), "
                                   "1 if not.")
    i.add_argument("directory", help="folder of *.safetensors / *.pt / *.pth / *.bin state dicts of one architecture")
    i.add_argument("--token-size", type=int, default=ModelConfig.token_size, help="token length to count tokens for")
    i.add_argument("--skip-bad", action="store_true", help="judge usability as `rpg train --skip-bad` would")
    i.add_argument("--pattern", help="only files whose name matches this glob, e.g. 'epoch_*.pt'")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=cmd_inspect)

    t = sub.add_parser("train", formatter_class=_HelpFormatter,
                       help="train an unconditional RPG on your own folder of checkpoints",
                       description="Train RPG (with one permutation state per checkpoint) on a folder of state dicts "
                                   "of one architecture. Killed or interrupted? Run the same command again: it "
                                   "resumes from OUT/last.safetensors and ends with the same weights.")
    t.add_argument("--checkpoints", required=True, metavar="DIR", help="folder of checkpoints (see `rpg inspect`)")
    t.add_argument("--out", required=True, metavar="OUT_DIR", help="receives best.safetensors, last.*, train_log.csv")
    t.add_argument("--config", help="YAML with rpg / diffusion / train sections (e.g. config/byo_checkpoints.yaml); "
                   "applied over rpg/byo_preset.yaml (unconditional, with permutation states)")
    t.add_argument("--eval", metavar="MODULE:FUNCTION", help="validation score of a state dict, higher is better "
                   "(module:function or path/to/file.py:function); keeps the best generator. Without it the final "
                   "weights are kept")
    t.add_argument("--skip-bad", action="store_true", help="skip unusable checkpoints with a warning instead of failing")
    t.add_argument("--pattern", help="only files whose name matches this glob, e.g. 'epoch_*.pt'")
    t.add_argument("--seed", type=int, default=None, help="None: the config's seed")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="None: the config's device")
    t.add_argument("--steps", type=int, default=None, help="training steps (None: the config's train.steps)")
    t.add_argument("--force", action="store_true", help="train from scratch into an OUT_DIR that holds another run "
                   "(another step count, other checkpoints or settings), removing its files first (without it such a "
                   "run is refused, never overwritten)")
    t.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop as if killed
    t.set_defaults(func=cmd_train)

    docs_cli.add_parser(sub, _HelpFormatter)
    return parser


def _os_error_line(err: OSError) -> str:
    """One line for an OSError: the project's own (no file name: its message says it all) as written; the file
    system's naming the path, with the system's message and what to do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full ({err}); files are written atomically, so nothing half-written was kept: free space and "
                "run the command again")
    if err.filename is None:
        return str(err)
    path = f"{err.filename}" + ("" if err.filename2 is None else f" -> {err.filename2}")
    advice = OS_ERROR_ADVICE.get(err.errno)
    return f"{path}: {err.strerror}" + (f"; {advice}" if advice else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(f"rpg {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the one place for every OS error; a full disk is the machine's, not the input's: 1
        line = " ".join(_os_error_line(err).splitlines())
        print(f"rpg {args.command}: error: {line}", file=sys.stderr)
        return 1 if err.errno in (errno.ENOSPC, errno.EDQUOT) else 2


if __name__ == "__main__":
    sys.exit(main())
