"""The CLI's errors that come from the machine, not the input (issue 33, bug 4 and its weak cases): an unwritable or
too-long --out, features of another dimension, a model_kwargs typo are one line checked before the work starts;
`rpg generate` owns its folder as `rpg train` does; metadata says what ran; `rpg train` never mixes two runs."""

from __future__ import annotations

import errno
import importlib
import json
import os
import tempfile

import pytest
import torch
from torch import nn

from conftest import mlp_state, one_line_error, save_tiny_head_generator, tiny_model_config
from rpg.checkpoint import save_rpg
from rpg.cli.main import main
from rpg.config import DiffusionConfig
from rpg.model import RPG
from rpg.tokenize import Tokenizer
from rpg.train import DiffusionObjective, RunConflictError, run_lock
from rpg.utils import load_safetensors, read_safetensors_metadata, save_safetensors_atomic
from rpg.vision.architectures import architecture_metadata, build_model


CLI = importlib.import_module("rpg.cli.main")  # the module (rpg.cli re-exports its `main` under the same name)
TOO_LONG = "x" * 300  # one path component longer than any common file system allows (255 bytes)


def _features(path, dim: int) -> str:
    g = torch.Generator().manual_seed(0)
    feats = {f"{s}_x": torch.randn(40, dim, generator=g) for s in ("train", "val", "test")}
    feats.update({f"{s}_y": torch.arange(40) % 10 for s in ("train", "val", "test")})
    save_safetensors_atomic(feats, path, {})
    return str(path)


@pytest.fixture(scope="module")
def gens(tmp_path_factory):
    """Two task-conditioned generators of 8-wide heads (2 DDIM steps of a 10-step diffusion), an unconditional one
    (MLPs), features of the heads' dimension (8) and of another one (5)."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    for name in ("task", "other"):
        model, tok = save_tiny_head_generator(tmp / f"{name}.safetensors", sample_steps=2)
        save_rpg(tmp / f"{name}.safetensors", model, tok, DiffusionConfig(timesteps=10, sample_steps=2), step=0)
    mlps = [mlp_state(s) for s in range(3)]
    utok = Tokenizer.fit(mlps, 16)
    uncond = RPG(tiny_model_config(condition="none"), utok.layer_index, utok.token_index)
    save_rpg(tmp / "uncond.safetensors", uncond, utok, DiffusionConfig(timesteps=10, sample_steps=2), step=0)
    _features(tmp / "features8.safetensors", 8)
    _features(tmp / "features5.safetensors", 5)
    return tmp


def _count_calls(monkeypatch, module, name: str) -> dict[str, int]:
    """Count the calls of module.name (e.g. the sampler), to show a refusal came before the work."""
    real, calls = getattr(module, name), {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _command(kind: str, gens, collection, out) -> list[str]:
    if kind == "generate":
        return ["generate", "--checkpoint", str(gens / "task.safetensors"), "--classes", "ship", "--out", str(out)]
    return ["train", "--checkpoints", str(collection), "--out", str(out), "--steps", "2", "--device", "cpu"]


def _work(kind: str, monkeypatch) -> dict[str, int]:
    """The expensive part of each command: sampling (generate) or training (train)."""
    if kind == "generate":
        return _count_calls(monkeypatch, CLI, "sample_models")
    return _count_calls(monkeypatch, importlib.import_module("rpg.unconditional"), "train_rpg")


# ---------------------------------------------------------------------------------------------------------------
# Bug 4: OS errors are one line naming the path, found before the work
# ---------------------------------------------------------------------------------------------------------------


def _unwritable_folder(tmp_path, monkeypatch):
    """A folder no file can be created in: mode 0o500. Root ignores mode bits, so under root the kernel's refusal
    is simulated where every file of the project is created (tempfile.mkstemp, in rpg.utils' atomic writes and its
    write check)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:
        real = tempfile.mkstemp

        def refused(*args, dir=None, **kwargs):
            if dir is not None and os.path.samefile(dir, folder):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, "x"))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", refused)
    return folder


@pytest.mark.parametrize("kind", ["generate", "train"])
def test_unwritable_out_is_one_line_before_the_work(gens, collection, capsys, tmp_path, monkeypatch, kind):
    out = _unwritable_folder(tmp_path, monkeypatch)
    work = _work(kind, monkeypatch)
    try:
        rc = main(_command(kind, gens, collection, out))
    finally:
        out.chmod(0o700)
    one_line_error(capsys, rc, str(out), "Permission denied")
    assert work["n"] == 0, "the refusal came after the work"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("kind", ["generate", "train"])
def test_too_long_out_name_is_one_line_before_the_work(gens, collection, capsys, tmp_path, monkeypatch, kind):
    work = _work(kind, monkeypatch)
    rc = main(_command(kind, gens, collection, tmp_path / TOO_LONG / "out"))
    one_line_error(capsys, rc, TOO_LONG, "name too long")
    assert work["n"] == 0


def test_too_long_model_path_in_evaluate_is_one_line(capsys, tmp_path):
    rc = main(["evaluate", str(tmp_path / TOO_LONG / "m.safetensors")])
    one_line_error(capsys, rc, TOO_LONG, "name too long")


def test_any_os_error_is_one_line_naming_the_path(gens, capsys, tmp_path, monkeypatch):
    """One place in the CLI turns every OSError (here: a read-only file system at the first write) into one line."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "o"))

    monkeypatch.setattr(CLI, "sample_models", read_only)
    rc = main(_command("generate", gens, None, tmp_path / "o"))
    one_line_error(capsys, rc, str(tmp_path / "o"), "Read-only file system")


def test_evaluate_features_of_another_dimension_is_one_line(gens, capsys, tmp_path):
    assert main(_command("generate", gens, None, tmp_path / "o")) == 0
    capsys.readouterr()
    rc = main(["evaluate", str(next((tmp_path / "o").glob("*.safetensors"))), "--features",
               str(gens / "features5.safetensors")])
    one_line_error(capsys, rc, "features5.safetensors", "5-dimensional", "8-dimensional")


def test_generate_evaluate_features_of_another_dimension_writes_nothing(gens, capsys, tmp_path):
    out = tmp_path / "o"
    rc = main([*_command("generate", gens, None, out), "--evaluate", "--features", str(gens / "features5.safetensors")])
    one_line_error(capsys, rc, "features5.safetensors", "5-dimensional", "8-dimensional")
    assert not list(out.glob("*.safetensors")), "a head was written before the features were found not to fit"


def test_model_kwargs_typo_is_one_line(capsys, tmp_path):
    path = tmp_path / "cnn.safetensors"
    save_safetensors_atomic(build_model("rpg_cnn_s").state_dict(), path,
                            architecture_metadata("rpg_cnn_s", {"widht": 2}, 32))
    rc = main(["evaluate", str(path), "--data", str(tmp_path), "--device", "cpu"])
    one_line_error(capsys, rc, str(path), "widht")


# ---------------------------------------------------------------------------------------------------------------
# rpg generate owns its folder: a lock, and no mixing of generators
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generator", ["task", "uncond"])
def test_generate_into_a_folder_in_use_is_refused(gens, capsys, tmp_path, monkeypatch, generator):
    """A second rpg generate (or rpg train) into a folder another one holds is refused before any sampling or
    write: the models the first one reported stay."""
    out = tmp_path / "o"
    task = ["--classes", "ship"] if generator == "task" else []
    args = ["generate", "--checkpoint", str(gens / f"{generator}.safetensors"), *task, "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    capsys.readouterr()
    work = _work("generate", monkeypatch)
    with run_lock(out):
        rc = main([*args, "--seed", "1"])
    one_line_error(capsys, rc, f"{out} is in use")
    assert work["n"] == 0 and {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == before


def test_generate_refuses_to_mix_generators_without_force(gens, capsys, tmp_path):
    out = tmp_path / "o"
    assert main(_command("generate", gens, None, out)) == 0
    assert main(["generate", "--checkpoint", str(gens / "task.safetensors"), "--classes", "cat", "--out",
                 str(out)]) == 0  # another task of the same generator: added
    capsys.readouterr()
    other = ["generate", "--checkpoint", str(gens / "other.safetensors"), "--classes", "ship", "--out", str(out)]
    one_line_error(capsys, main(other), "task.safetensors", "--force")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["0002_s0.safetensors", "0064_s0.safetensors"]
    assert main([*other, "--force"]) == 0
    heads = sorted(out.glob("*.safetensors"))
    assert [p.name for p in heads] == ["0002_s0.safetensors"]
    assert read_safetensors_metadata(heads[0])["generator"] == str(gens / "other.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Metadata says what ran
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generator", ["task", "uncond"])
def test_generate_metadata_records_the_steps_that_ran(gens, capsys, tmp_path, generator):
    """The generators' diffusion has 10 steps and samples with 2 DDIM steps: the metadata says so; --steps beyond
    10, or --steps with ddpm (which always runs all 10), is refused."""
    task = ["--classes", "ship"] if generator == "task" else []
    args = ["generate", "--checkpoint", str(gens / f"{generator}.safetensors"), *task]
    runs = [([], "ddim", 2), (["--steps", "10"], "ddim", 10), (["--sampler", "ddpm"], "ddpm", 10)]
    for extra, sampler, steps in runs:
        out = tmp_path / f"o{len(extra)}{sampler}"
        assert main([*args, "--out", str(out), *extra]) == 0
        meta = read_safetensors_metadata(next(out.glob("*.safetensors")))
        assert (meta["sampler"], meta["steps"]) == (sampler, steps), extra
    capsys.readouterr()
    one_line_error(capsys, main([*args, "--out", str(tmp_path / "a"), "--steps", "50"]), "at most 10")
    one_line_error(capsys, main([*args, "--out", str(tmp_path / "b"), "--steps", "5", "--sampler", "ddpm"]),
                    "ddpm", "all 10")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------------------------
# rpg train: other settings into a used folder
# ---------------------------------------------------------------------------------------------------------------


def test_train_other_settings_into_a_used_folder_is_refused_without_force(collection, capsys, tmp_path, monkeypatch):
    """A run on other settings (here another seed) into a folder holding a run is refused and touches nothing; with
    --force it starts clean: the old run's checkpoints are gone, so a divergence at its first step names none."""
    out = tmp_path / "run"
    args = ["train", "--checkpoints", str(collection), "--out", str(out), "--steps", "4", "--device", "cpu"]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    one_line_error(capsys, main([*args, "--seed", "1"]), str(out), "other data or settings", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    real = DiffusionObjective.forward

    def nan_loss(self, *a, **k):
        return real(self, *a, **k) * float("nan")

    monkeypatch.setattr(DiffusionObjective, "forward", nan_loss)
    rc = main([*args, "--seed", "1", "--force"])
    captured = capsys.readouterr()
    assert rc == 2 and "diverged at step 1" in captured.err, captured.err
    assert "last good checkpoint" not in captured.err and "no checkpoint was written" in captured.err
    assert "removed" in captured.out, captured.out
    assert not any((out / name).exists() for name in ("best.safetensors", "last.safetensors", "last.opt.pt"))
    assert json.loads((out / "collection.json").read_text())["files"] == ["c0.safetensors", "c1.safetensors",
                                                                          "c2.safetensors"]


def test_run_lock_removes_its_file_and_takes_over_a_killed_holders(tmp_path):
    """The lock file of a killed holder (no lock: the kernel dropped it) is taken over; a holder removes the file
    when it ends, so rpg generate's folder keeps only its models; a held lock names its holder."""
    (tmp_path / ".rpg.lock").write_text("pid 1 on elsewhere\ntraining run\n")
    with run_lock(tmp_path, user="rpg generate"):
        with pytest.raises(RunConflictError, match=f"in use by another rpg generate \\(pid {os.getpid()} on "):
            with run_lock(tmp_path):
                pass
    assert list(tmp_path.iterdir()) == []
