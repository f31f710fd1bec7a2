"""Faults a careful user hits (issue 15): bad numbers, corrupt data, NaN weights, kills, two runs in one folder,
shared file systems. The CLI's contract: bad input gives exit status 2 and one line, never a traceback; nothing
non-finite is written; a run owns its folder."""

from __future__ import annotations

import csv
import errno
import importlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from conftest import mlp_state, one_line_error, save_tiny_head_generator, tiny_model_config
from rpg import __version__
from rpg.checkpoint import load_rpg, save_rpg
from rpg.cli.main import build_parser, main
from rpg.config import DiffusionConfig, TrainConfig
from rpg.data import write_synthetic_cifar10
from rpg.experiments.task_zoo.heads import initial_head
from rpg.model import RPG
from rpg.tokenize import Tokenizer
from rpg.train import DiffusionObjective, RunConflictError, TrainingDivergedError, run_lock, train_rpg
from rpg.utils import (CheckpointError, atomic_path, load_safetensors, save_safetensors_atomic,
                       write_text_atomic)
from rpg.vision.architectures import architecture_metadata, build_model


CLI = importlib.import_module("rpg.cli.main")  # the module (rpg.cli re-exports its `main` under the same name)


@pytest.fixture(scope="module")
def gens(tmp_path_factory):
    """A task-conditioned generator (heads), an unconditional one (MLPs), each also with a NaN weight."""
    tmp = tmp_path_factory.mktemp("faults")
    task, tok = save_tiny_head_generator(tmp / "task.safetensors", sample_steps=2)
    mlps = [mlp_state(s) for s in range(3)]
    utok = Tokenizer.fit(mlps, 16)
    uncond = RPG(tiny_model_config(condition="none"), utok.layer_index, utok.token_index)
    save_rpg(tmp / "uncond.safetensors", uncond, utok, DiffusionConfig(sample_steps=2), step=0)
    with torch.no_grad():
        next(task.parameters()).view(-1)[0] = float("nan")
    save_rpg(tmp / "task_nan.safetensors", task, tok, DiffusionConfig(sample_steps=2), step=0)
    return tmp


# ---------------------------------------------------------------------------------------------------------------
# rpg generate: numbers, classes, NaN
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--steps", "-5"], "--steps must be at least 1, got -5"),
    (["--tokens-per-call", "0"], "--tokens-per-call must be at least 1"),
])
@pytest.mark.parametrize("generator", ["task", "uncond"])
def test_generate_refuses_bad_numbers(gens, capsys, tmp_path, args, message, generator):
    task = ["--classes", "ship"] if generator == "task" else []
    rc = main(["generate", "--checkpoint", str(gens / f"{generator}.safetensors"), "--out", str(tmp_path / "o"),
               *task, *args])
    one_line_error(capsys, rc, message)
    assert not (tmp_path / "o").exists()


def test_generate_empty_classes_says_so(gens, capsys, tmp_path):
    rc = main(["generate", "--checkpoint", str(gens / "task.safetensors"), "--classes", "", "--out", str(tmp_path)])
    one_line_error(capsys, rc, "--classes '' names no class")


def test_generate_refuses_a_generator_with_nan_weights(gens, capsys, tmp_path):
    rc = main(["generate", "--checkpoint", str(gens / "task_nan.safetensors"), "--classes", "ship",
               "--out", str(tmp_path / "o")])
    one_line_error(capsys, rc, "non-finite", "task_nan.safetensors")
    assert not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError, match="non-finite"):
        load_rpg(gens / "task_nan.safetensors")


@pytest.mark.parametrize("generator", ["task", "uncond"])
def test_generate_never_writes_a_non_finite_model(gens, capsys, tmp_path, monkeypatch, generator):
    """Even from a finite generator: models with NaN/Inf weights are refused before anything is written."""
    import rpg.generate

    real = rpg.generate.generate_tokens

    def inf_tokens(*args, **kwargs):
        return real(*args, **kwargs) * float("inf")

    monkeypatch.setattr(rpg.generate, "generate_tokens", inf_tokens)
    task = ["--classes", "ship"] if generator == "task" else []
    rc = main(["generate", "--checkpoint", str(gens / f"{generator}.safetensors"), "--out", str(tmp_path / "o"),
               "--samples", "2", *task])
    one_line_error(capsys, rc, "non-finite", "nothing was written")
    assert not list(tmp_path.glob("o/*"))


def test_generate_evaluate_checks_features_before_writing(gens, capsys, tmp_path):
    rc = main(["generate", "--checkpoint", str(gens / "task.safetensors"), "--classes", "ship", "--evaluate",
               "--features", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")])
    one_line_error(capsys, rc, "--evaluate needs the features file")
    assert not (tmp_path / "o").exists()


def test_generate_clears_only_its_own_earlier_models(gens, capsys, tmp_path):
    """Whole models: earlier model_NNN files of rpg generate are replaced; a foreign model_NNN file is refused."""
    out = tmp_path / "o"
    assert main(["generate", "--checkpoint", str(gens / "uncond.safetensors"), "--samples", "3", "--out", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    assert main(["generate", "--checkpoint", str(gens / "uncond.safetensors"), "--samples", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model_000.safetensors", "notes.txt"]
    capsys.readouterr()
    save_safetensors_atomic(mlp_state(9), out / "model_007.safetensors", {"arch": "mlp"})  # not from rpg generate
    rc = main(["generate", "--checkpoint", str(gens / "uncond.safetensors"), "--samples", "1", "--out", str(out)])
    one_line_error(capsys, rc, "model_007.safetensors was not written by rpg generate")
    assert (out / "model_000.safetensors").is_file() and (out / "model_007.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# rpg evaluate / rpg train: data, NaN, mismatches, files in the way
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_refuses_nan_and_inf_checkpoints(capsys, tmp_path):
    for value in ("nan", "inf"):
        head = initial_head(8, 0)
        head["0.weight"][0, 0] = float(value)
        path = tmp_path / f"head_{value}.safetensors"
        save_safetensors_atomic(head, path, {"task_id": 3})
        rc = main(["evaluate", str(path), "--features", str(tmp_path / "unused.safetensors")])
        one_line_error(capsys, rc, str(path), "non-finite values (NaN or Inf) in '0.weight'")


def _cnn_checkpoint(path, mutate=None):
    model = build_model("rpg_cnn_s")
    sd = model.state_dict()
    if mutate:
        sd = mutate(dict(sd))
    save_safetensors_atomic(sd, path, architecture_metadata("rpg_cnn_s", {}, 32))
    return path


def test_evaluate_truncated_cifar_is_one_line(capsys, tmp_path):
    archive = write_synthetic_cifar10(tmp_path / "good", n_train=20, n_test=10)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / archive.name).write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    model = _cnn_checkpoint(tmp_path / "cnn.safetensors")
    rc = main(["evaluate", str(model), "--data", str(tmp_path / "bad"), "--device", "cpu"])
    one_line_error(capsys, rc, "truncated")


def test_evaluate_mismatch_names_the_key(capsys, tmp_path):
    def drop_and_rename(sd):
        key = next(iter(sd))
        sd["surprise.weight"] = sd.pop(key)
        return sd

    model = _cnn_checkpoint(tmp_path / "cnn.safetensors", drop_and_rename)
    first_key = next(iter(build_model("rpg_cnn_s").state_dict()))
    rc = main(["evaluate", str(model), "--data", str(tmp_path), "--device", "cpu"])
    one_line_error(capsys, rc, f"missing '{first_key}'", "unexpected 'surprise.weight'")


def test_load_rpg_mismatch_names_the_key(gens, tmp_path):
    tensors, meta = load_safetensors(gens / "uncond.safetensors")
    key = sorted(tensors)[0]
    del tensors[key]
    save_safetensors_atomic(tensors, tmp_path / "g.safetensors", meta)
    with pytest.raises(CheckpointError) as info:
        load_rpg(tmp_path / "g.safetensors")
    assert f"missing '{key}'" in str(info.value) and len(str(info.value).splitlines()) == 1


def test_evaluate_non_timm_model_says_pass_eval(capsys, tmp_path):
    path = tmp_path / "mlp.safetensors"
    save_safetensors_atomic(mlp_state(0), path, {"arch": "my_mlp"})
    rc = main(["evaluate", str(path)])
    one_line_error(capsys, rc, "'my_mlp' is not a timm model", "pass --eval")


def test_train_out_is_a_file(collection, capsys, tmp_path):
    out = tmp_path / "taken"
    out.write_text("a file")
    rc = main(["train", "--checkpoints", str(collection), "--out", str(out), "--steps", "2", "--device", "cpu"])
    one_line_error(capsys, rc, "is a file")
    assert out.read_text() == "a file"


def test_generate_out_is_a_file(gens, capsys, tmp_path):
    out = tmp_path / "taken"
    out.write_text("a file")
    rc = main(["generate", "--checkpoint", str(gens / "uncond.safetensors"), "--out", str(out)])
    one_line_error(capsys, rc, "is a file")


def test_file_exists_error_is_one_line(gens, capsys, tmp_path, monkeypatch):
    """Any FileExistsError (e.g. a folder below --out is a file) is reported as one line, not a traceback."""
    monkeypatch.setattr(CLI, "load_rpg", lambda *a, **k: (_ for _ in ()).throw(FileExistsError("x exists")))
    rc = main(["generate", "--checkpoint", str(gens / "uncond.safetensors"), "--out", str(tmp_path)])
    one_line_error(capsys, rc, "x exists")


# ---------------------------------------------------------------------------------------------------------------
# --version, help
# ---------------------------------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"rpg {__version__}"


def test_every_option_has_help_and_shows_its_default(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        missing = [a.option_strings or a.dest for a in command._actions if a.help is None]
        assert not missing, f"rpg {name}: options without help: {missing}"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 256)" in text and "(default: partial)" in text


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes: permissions, stale temporary files
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "table.csv", "a,b\n")
        save_safetensors_atomic(mlp_state(0), tmp_path / "m.safetensors", {})
    finally:
        os.umask(old)
    assert (tmp_path / "table.csv").stat().st_mode & 0o777 == mode
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == mode


def test_stale_temp_files_are_removed_on_the_next_write(tmp_path):
    stale = tmp_path / ".best.safetensors.k3j_x9q2.tmp"  # a write killed an hour ago
    fresh = tmp_path / ".last.safetensors.ab12cd34.tmp"  # a write in progress (another process)
    other = tmp_path / ".notes.tmp"  # not ours
    for f in (stale, fresh, other):
        f.write_bytes(b"x" * 100)
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    write_text_atomic(tmp_path / "summary.json", "{}")
    assert not stale.exists() and fresh.exists() and other.exists()
    with atomic_path(tmp_path / "x.bin") as tmp:
        tmp.write_bytes(b"1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, other.name, "summary.json", "x.bin"])


def test_disk_full_keeps_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "best.safetensors"
    target.write_bytes(b"the old checkpoint")
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half a checkp")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"the old checkpoint" and [p.name for p in tmp_path.iterdir()] == [target.name]


def test_disk_full_in_the_cli_is_one_line(gens, capsys, tmp_path, monkeypatch):
    def full_disk(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("rpg.utils.save_file", full_disk)
    out = tmp_path / "o"
    rc = main(["generate", "--checkpoint", str(gens / "uncond.safetensors"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "disk full" in err, err
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# Training: divergence guard, lock, step-count changes, log that survives kills
# ---------------------------------------------------------------------------------------------------------------


def _setup(steps: int = 40, **train):
    sds = [mlp_state(s) for s in range(3)]
    tok = Tokenizer.fit(sds, 16)
    tokens = torch.stack([tok.tokenize(sd) for sd in sds])
    tcfg = TrainConfig(steps=steps, batch_size=4, diffusion_batch=8, lr=3e-3, warmup_steps=2, amp="none",
                       save_every=10, eval_every=10, **train)
    return tiny_model_config(permutation_state=True), DiffusionConfig(), tcfg, tok, tokens


def _log_steps(out) -> list[int]:
    with (out / "train_log.csv").open() as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def _fail_at(monkeypatch, call: int, what: str):
    """Make the `call`-th training forward return a NaN loss, poison a weight, or raise KeyboardInterrupt (a kill)."""
    real = DiffusionObjective.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        if calls["n"] == call:
            if what == "kill":
                raise KeyboardInterrupt
            if what == "loss":
                return loss * float("nan")
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(DiffusionObjective, "forward", forward)


@pytest.mark.parametrize("what, step, said", [("loss", 15, "diverged at step 15"),
                                             ("weight", 20, "diverged by step 20: weight")])
def test_divergence_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, what, step, said):
    """A NaN loss (checked every step, before the update) or a weight turned Inf after a finite loss (checked
    before every checkpoint and validation) stops training; last.safetensors stays the finite step-10 one."""
    mcfg, dcfg, tcfg, tok, tokens = _setup()
    _fail_at(monkeypatch, step, what)
    with pytest.raises(TrainingDivergedError) as info:
        train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=0, progress=False)
    message = str(info.value)
    assert said in message and "last.safetensors (step 10)" in message, message
    tensors, meta = load_safetensors(tmp_path / "last.safetensors")
    assert meta["step"] == 10 and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert not (tmp_path / "best.safetensors").exists()
    assert _log_steps(tmp_path) == list(range(1, step if what == "loss" else step + 1))


def test_divergence_is_one_line_in_the_cli(collection, capsys, tmp_path, monkeypatch):
    _fail_at(monkeypatch, 3, "loss")
    rc = main(["train", "--checkpoints", str(collection), "--out", str(tmp_path / "run"), "--steps", "5",
               "--device", "cpu"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("rpg train: error:")]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1 and "diverged at step 3" in errors[0], err


def test_second_run_into_a_locked_folder_is_refused(tmp_path):
    mcfg, dcfg, tcfg, tok, tokens = _setup(steps=10)
    with run_lock(tmp_path):
        with pytest.raises(RunConflictError, match=f"in use by another training run \\(pid {os.getpid()}"):
            train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=0, progress=False)
    assert not (tmp_path / "train_log.csv").exists()
    assert train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=0, progress=False)["steps"] == 10  # released


HOLD_LOCK = """import sys
from pathlib import Path
from rpg.train import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_refused_cli_train_writes_nothing_into_the_held_folder(collection, capsys, tmp_path):
    """A second `rpg train` into a folder another process trains in is refused before it writes anything: the
    first run's record of its collection (collection.json) and its layout stay as they were."""
    out = tmp_path / "run"
    out.mkdir()
    record = {"checkpoints": "the first run's", "architecture": {"arch": "first"}}
    (out / "collection.json").write_text(json.dumps(record))
    (out / "layout.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["train", "--checkpoints", str(collection), "--out", str(out), "--steps", "2", "--device", "cpu"])
    finally:
        holder.communicate("")
    err = capsys.readouterr().err
    assert rc == 2 and "in use by another training run" in err, err
    assert json.loads((out / "collection.json").read_text()) == record
    assert (out / "layout.json").read_text() == "{}"
    assert main(["train", "--checkpoints", str(collection), "--out", str(out), "--steps", "2", "--device", "cpu"]) == 0
    assert json.loads((out / "collection.json").read_text())["architecture"] != record["architecture"]  # released


def test_other_step_count_is_refused_without_force(tmp_path):
    mcfg, dcfg, tcfg, tok, tokens = _setup(steps=20)
    train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=0, progress=False)
    best = load_safetensors(tmp_path / "best.safetensors")[0]
    more = TrainConfig(**{**tcfg.__dict__, "steps": 30})
    with pytest.raises(RunConflictError, match="holds this run with 20 steps .at step 20.; asking for 30"):
        train_rpg(mcfg, dcfg, more, tok, tokens, tmp_path, seed=0, progress=False)
    again = load_safetensors(tmp_path / "best.safetensors")[0]
    assert all(torch.equal(best[k], again[k]) for k in best)
    assert train_rpg(mcfg, dcfg, more, tok, tokens, tmp_path, seed=0, progress=False, force=True)["steps"] == 30
    assert _log_steps(tmp_path) == list(range(1, 31))


def test_cli_train_with_more_steps_is_refused_without_force(collection, capsys, tmp_path):
    args = ["train", "--checkpoints", str(collection), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main([*args, "--steps", "4"]) == 0
    capsys.readouterr()
    one_line_error(capsys, main([*args, "--steps", "6"]), "Pass --force")
    assert main([*args, "--steps", "6", "--force"]) == 0


def test_log_survives_a_kill_and_resume_has_no_duplicates(tmp_path, monkeypatch):
    """Killed at step 25 (checkpoint at 20): the log holds steps 1-24; the resumed run redoes 21-24 and its log
    equals an uninterrupted run's, validation columns included."""
    mcfg, dcfg, tcfg, tok, tokens = _setup()

    def validate(model):
        return {"score": 1.0}

    full, split = tmp_path / "full", tmp_path / "split"
    train_rpg(mcfg, dcfg, tcfg, tok, tokens, full, seed=0, progress=False, validate=validate)
    with monkeypatch.context() as m:
        _fail_at(m, 25, "kill")
        with pytest.raises(KeyboardInterrupt):
            train_rpg(mcfg, dcfg, tcfg, tok, tokens, split, seed=0, progress=False, validate=validate)
    assert _log_steps(split) == list(range(1, 25))
    train_rpg(mcfg, dcfg, tcfg, tok, tokens, split, seed=0, progress=False, validate=validate)
    assert (split / "train_log.csv").read_text() == (full / "train_log.csv").read_text()
    with (full / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[9]["val/score"] == "1.0" and rows[8]["val/score"] == ""
