"""Bring-your-own checkpoints: loading and checking a collection, `rpg inspect`, user evaluation functions, and
`rpg train` / `rpg generate` / `rpg evaluate` on an unconditional generator (resume, atomic outputs, one-line errors)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time

import pytest
import torch
import yaml
from torch import nn

import rpg.utils
from conftest import REPO_ROOT
from rpg.cli.main import main
from rpg.collection import CollectionError, inspect_collection, load_collection
from rpg.cli.user_eval import ScoreFunctionError, load_score_function
from rpg.utils import load_safetensors, save_safetensors_atomic

ARCH = {"arch": "tiny_mlp", "model_kwargs": {"hidden": 8}}


def _mlp(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # 67 parameters
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _folder(path, n: int = 4, **extra_meta):
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        save_safetensors_atomic(_mlp(i), path / f"ckpt_{i:02d}.safetensors", {**ARCH, "accuracy": 0.5 + i / 10,
                                                                               **extra_meta})
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ---------------------------------------------------------------------------------------------------------------
# load_collection
# ---------------------------------------------------------------------------------------------------------------


def test_good_collection_loads_in_name_order_with_torch_files(tmp_path):
    folder = _folder(tmp_path / "c", n=2)
    torch.save({"state_dict": _mlp(5), "epoch": 3}, folder / "ckpt_05.pt")
    torch.save({"model": _mlp(6), "optimizer": {}}, folder / "ckpt_06.pth")
    torch.save(_mlp(7), folder / "ckpt_07.bin")
    (folder / "notes.txt").write_text("ignored: not a checkpoint suffix")
    col = load_collection(folder)
    assert [p.name for p in col.paths] == ["ckpt_00.safetensors", "ckpt_01.safetensors", "ckpt_05.pt",
                                           "ckpt_06.pth", "ckpt_07.bin"]
    assert len(col) == 5 and col.skipped == []
    assert torch.equal(col.state_dicts[3]["0.weight"], _mlp(6)["0.weight"])
    assert col.metadata[0]["accuracy"] == 0.5 and col.metadata[2] == {}
    assert col.architecture() == ARCH  # files without metadata do not veto it
    assert len(load_collection(folder, pattern="*.safetensors")) == 2


def _corrupt(folder, kind: str):
    """Spoil the collection in one way; return the bad file and a fragment its error message must contain."""
    bad = folder / "ckpt_02.safetensors"
    if kind == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
        return bad, "truncated"
    if kind == "truncated_pt":
        bad = folder / "ckpt_09.pt"
        torch.save(_mlp(9), bad)
        bad.write_bytes(bad.read_bytes()[:200])
        return bad, "truncated"
    if kind == "not_a_checkpoint":
        bad = folder / "readme.pt"
        bad.write_text("these are my checkpoints")
        return bad, "not a torch checkpoint"
    if kind == "list":
        bad = folder / "list.pt"
        torch.save([torch.zeros(3)], bad)
        return bad, "not a state dict"
    if kind == "non_tensor":
        bad = folder / "with_epoch.pt"
        torch.save({**_mlp(9), "epoch": 3}, bad)
        return bad, "'epoch' is a int, not a tensor"
    state = _mlp(2)
    if kind == "missing_key":
        del state["2.bias"]
        message = "missing ['2.bias']"
    elif kind == "extra_key":
        state["3.weight"] = torch.zeros(2, 2)
        message = "unexpected ['3.weight']"
    elif kind == "shape":
        state["0.weight"] = torch.zeros(8, 5)
        message = "'0.weight' has shape (8, 5) but the rest of the collection has (8, 4)"
    elif kind == "dtype":
        state["0.weight"] = state["0.weight"].half()
        message = "'0.weight' has dtype torch.float16"
    elif kind == "complex":
        state["0.weight"] = state["0.weight"].to(torch.complex64)
        message = "complex64, which RPG cannot generate"
    elif kind == "nan":
        state["2.weight"][1, 3] = math.nan
        message = "'2.weight' holds NaN or Inf values (1 NaN, 0 Inf)"
    elif kind == "inf":
        state["0.bias"][0] = -math.inf
        message = "'0.bias' holds NaN or Inf values (0 NaN, 1 Inf)"
    save_safetensors_atomic(state, bad, {})
    return bad, message


KINDS = ["truncated", "truncated_pt", "not_a_checkpoint", "list", "non_tensor", "missing_key", "extra_key", "shape",
         "dtype", "complex", "nan", "inf"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_file_is_named_or_skipped_with_a_warning(tmp_path, kind):
    folder = _folder(tmp_path / "c")
    bad, message = _corrupt(folder, kind)
    with pytest.raises(CollectionError) as info:
        load_collection(folder)
    assert str(bad) in str(info.value) and message in str(info.value) and "--skip-bad" in str(info.value)
    with pytest.warns(UserWarning, match=re.escape(f"skipping {bad}")):
        col = load_collection(folder, skip_bad=True)
    assert bad not in col.paths and [p for p, _ in col.skipped] == [bad] and message in col.skipped[0][1]
    assert len(col) == (4 if bad.name != "ckpt_02.safetensors" else 3)


def test_majority_decides_which_file_disagrees(tmp_path):
    """The odd one out is blamed even when it sorts first."""
    folder = _folder(tmp_path / "c", n=3)
    odd = {**_mlp(9), "extra": torch.ones(2)}
    save_safetensors_atomic(odd, folder / "a_first.safetensors", {})
    with pytest.raises(CollectionError, match=re.escape(str(folder / "a_first.safetensors"))):
        load_collection(folder)


def test_several_bad_files_are_counted_and_all_skipped(tmp_path):
    folder = _folder(tmp_path / "c", n=5)
    for i in (1, 3):
        (folder / f"ckpt_{i:02d}.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CollectionError, match="and 1 more bad files"):
        load_collection(folder)
    with pytest.warns(UserWarning) as record:
        col = load_collection(folder, skip_bad=True)
    assert len(record) == 2 and len(col) == 3


def test_empty_missing_or_too_small_collections(tmp_path):
    with pytest.raises(CollectionError, match="not found"):
        load_collection(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollectionError, match=r"no checkpoint files \(\*.safetensors"):
        load_collection(tmp_path / "empty")
    one = _folder(tmp_path / "one", n=1)
    with pytest.raises(CollectionError, match="1 usable checkpoint"):
        load_collection(one)
    two = _folder(tmp_path / "two", n=2)
    (two / "ckpt_01.safetensors").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(CollectionError, match=r"1 usable checkpoint.*1 skipped"):
        load_collection(two, skip_bad=True)
    with pytest.raises(CollectionError, match="matching 'x\\*'"):
        load_collection(_folder(tmp_path / "c"), pattern="x*")


# ---------------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------------


def test_inspect_counts_parameters_tokens_and_problems(tmp_path):
    folder = _folder(tmp_path / "c")
    bad, _ = _corrupt(folder, "nan")
    report = inspect_collection(folder, token_size=16)
    assert report["count"] == 3 and report["files"] == 4 and not report["usable"]
    assert report["parameters"] == {"generated": 67, "copied": 0, "total": 67}
    tokens = {layer["name"]: layer["tokens"] for layer in report["layers"]}
    assert tokens == {"0.weight": 2, "0.bias": 1, "2.weight": 2, "2.bias": 1} and report["tokens"] == 6
    assert report["padding"] == 6 * 16 - 67 and report["suggested_preset"] == "tiny"
    assert report["problems"] == [{"file": str(bad), "problem": "'2.weight' holds NaN or Inf values (1 NaN, 0 Inf)"}]
    acc = report["metadata"]["accuracy"]
    assert acc["min"] == 0.5 and acc["max"] == pytest.approx(0.8) and acc["files"] == 3
    assert report["metadata"]["arch"] == "tiny_mlp" and report["architecture"] == ARCH
    assert inspect_collection(folder, token_size=16, skip_bad=True)["usable"]


def test_inspect_copies_scalars_and_integer_buffers(tmp_path):
    folder = tmp_path / "bn"
    folder.mkdir()
    for i in range(2):
        torch.manual_seed(i)
        torch.save(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).state_dict(), folder / f"{i}.pt")
    report = inspect_collection(folder, token_size=4)
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert not layers["1.num_batches_tracked"]["generated"] and layers["1.num_batches_tracked"]["tokens"] == 0
    assert report["parameters"]["copied"] == 1 and report["tokens"] == 3 + 1 + 4 * 1


def test_cli_inspect_text_json_and_exit_status(tmp_path, capsys):
    folder = _folder(tmp_path / "c")
    assert main(["inspect", str(folder), "--token-size", "16"]) == 0
    text = capsys.readouterr().out
    assert "4 usable checkpoint(s) of 4 file(s)" in text and "67 generated" in text and "0.weight" in text
    assert "usable for rpg train: yes" in text
    _corrupt(folder, "truncated")
    assert main(["inspect", str(folder), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["count"] == 3 and len(report["problems"]) == 1 and report["tokens"] == 4
    assert main(["inspect", str(folder), "--skip-bad"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "checkpoint folder not found" in _one_line_error(capsys)
    assert main(["inspect", str(folder), "--token-size", "0"]) == 2
    assert "token size" in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------------------
# User evaluation functions
# ---------------------------------------------------------------------------------------------------------------

EVAL_SOURCE = '''
import math
LIMIT = 3
def score(state_dict):
    return float(-sum(t.abs().mean() for t in state_dict.values()))
def raises(state_dict):
    raise KeyError("fc.weight")
def text(state_dict):
    return "good"
def nan(state_dict):
    return math.nan
'''


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "my_eval.py"
    path.write_text(EVAL_SOURCE)
    return path


def test_score_function_by_file_and_by_module(eval_file, monkeypatch):
    by_file = load_score_function(f"{eval_file}:score")
    assert by_file(_mlp(0)) < 0
    monkeypatch.chdir(eval_file.parent)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_eval", raising=False)
    assert load_score_function("my_eval:score")(_mlp(0)) == by_file(_mlp(0))


@pytest.mark.parametrize("spec, message", [
    ("my_eval.py", "must look like module:function"),
    ("my_eval.py:", "must look like module:function"),
    (":score", "must look like module:function"),
    ("missing.py:score", "evaluation file not found"),
    ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
    ("my_eval.py:absent", "has no function 'absent'"),
    ("my_eval.py:LIMIT", "is a int, not a function"),
])
def test_bad_eval_spec(eval_file, monkeypatch, spec, message):
    monkeypatch.chdir(eval_file.parent)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(ScoreFunctionError, match=re.escape(message)):
        load_score_function(spec)


@pytest.mark.parametrize("name, message", [("raises", "raised KeyError: 'fc.weight'"),
                                           ("text", "returned a str, not a number"),
                                           ("nan", "returned nan, not a finite number")])
def test_misbehaving_score_function(eval_file, name, message):
    fn = load_score_function(f"{eval_file}:{name}")
    with pytest.raises(ScoreFunctionError, match=re.escape(message)):
        fn(_mlp(0))


def test_broken_eval_module_import(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import no_such_package_xyz\n")
    with pytest.raises(ScoreFunctionError, match="importing .*broken.py failed: ModuleNotFoundError"):
        load_score_function(f"{path}:score")


# ---------------------------------------------------------------------------------------------------------------
# rpg train / generate / evaluate on a collection
# ---------------------------------------------------------------------------------------------------------------

TINY_CONFIG = {
    "seed": 3, "device": "cpu",
    "rpg": {"size": "custom", "token_size": 16, "recurrent": "mamba", "d_model": 32, "n_layers": 2, "d_state": 16,
            "d_conv": 4, "expand": 2, "headdim": 16, "denoiser_channels": [1, 8, 16, 8, 1], "kernel_size": 7,
            "condition": "none", "permutation_state": True},
    "diffusion": {"sample_steps": 3},
    "train": {"steps": 6, "batch_size": 4, "diffusion_batch": 16, "warmup_steps": 1, "save_every": 2,
              "eval_every": 3, "val_samples": 1},
    "logging": {"progress": False},
}


@pytest.fixture
def project(tmp_path, eval_file):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_CONFIG))
    return {"ckpts": _folder(tmp_path / "ckpts"), "config": config, "eval": f"{eval_file}:score", "tmp": tmp_path}


def _train(p, out, *extra):
    return main(["train", "--checkpoints", str(p["ckpts"]), "--out", str(out), "--config", str(p["config"]),
                 "--eval", p["eval"], *extra])


def _tensors(path):
    return load_safetensors(path)[0]


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_train_resumes_to_identical_weights(project, capsys):
    """Stopped after step 3 (last checkpoint at step 2, as if killed), then rerun: the same final weights."""
    whole, cut = project["tmp"] / "whole", project["tmp"] / "cut"
    assert _train(project, whole) == 0
    assert _train(project, cut, "--stop-after", "3") == 0
    assert "stopped at step 3 of 6" in capsys.readouterr().out
    assert _train(project, cut) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "best.safetensors (step" in out
    for name in ("last.safetensors", "best.safetensors"):
        assert _same(_tensors(whole / name), _tensors(cut / name)), name
    info = json.loads((cut / "collection.json").read_text())
    assert info["architecture"] == ARCH and len(info["files"]) == 4


@pytest.mark.slow
def test_killed_train_process_resumes_to_identical_weights(project):
    """A real SIGKILL of `rpg train` after its first checkpoint; the rerun ends where an uninterrupted run does."""
    config = dict(TINY_CONFIG, train={**TINY_CONFIG["train"], "steps": 24, "save_every": 4, "eval_every": 12})
    project["config"].write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-c", "import sys; from rpg.cli.main import main; sys.exit(main(sys.argv[1:]))", "train",
           "--checkpoints", str(project["ckpts"]), "--config", str(project["config"]), "--eval", project["eval"]]
    whole, cut = project["tmp"] / "whole", project["tmp"] / "cut"
    # the uninterrupted run beside the one to kill (two cores: each start-up costs ~8 s of imports)
    uninterrupted = subprocess.Popen([*cmd, "--out", str(whole)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    proc = subprocess.Popen([*cmd, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "last.opt.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (cut / "summary.json").exists(), "the run finished before it could be killed"
    output, _ = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, output[-3000:]
    subprocess.run([*cmd, "--out", str(cut)], check=True, capture_output=True)
    for name in ("last.safetensors", "best.safetensors"):
        assert _same(_tensors(whole / name), _tensors(cut / name)), name


def test_generate_and_evaluate_whole_models(project, capsys):
    gen_dir, out = project["tmp"] / "gen", project["tmp"] / "models"
    assert _train(project, gen_dir) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(gen_dir / "best.safetensors"), "--samples", "2", "--seed", "1",
                 "--out", str(out), "--evaluate", "--eval", project["eval"]]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all(": score -" in line for line in printed)
    tensors, meta = load_safetensors(out / "model_001.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: tuple(v.shape) for k, v in _mlp(0).items()}
    assert meta["arch"] == "tiny_mlp" and meta["model_kwargs"] == {"hidden": 8} and meta["seed"] == 1
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    net.load_state_dict(tensors)  # ready to load
    assert main(["evaluate", str(out / "model_001.safetensors"), "--eval", project["eval"]]) == 0
    assert re.search(r"model_001.safetensors: score -\d", capsys.readouterr().out)
    # an unconditional generator refuses a task; --evaluate needs a score function
    assert main(["generate", "--checkpoint", str(gen_dir / "best.safetensors"), "--embedding", "0100010111",
                 "--out", str(out)]) == 2
    assert "unconditional generator" in _one_line_error(capsys)
    assert main(["generate", "--checkpoint", str(gen_dir / "best.safetensors"), "--evaluate", "--out", str(out)]) == 2
    assert "needs --eval" in _one_line_error(capsys)
    assert main(["evaluate", str(out / "model_001.safetensors"), "--data", str(project["tmp"])]) == 2
    assert "tiny_mlp" in _one_line_error(capsys)  # not a timm architecture


def test_generated_models_appear_atomically(project, monkeypatch, capsys):
    """A writer that dies half-way leaves neither the model file nor a temporary file (and its OSError is one
    line)."""
    gen_dir, out = project["tmp"] / "gen", project["tmp"] / "models"
    assert _train(project, gen_dir) == 0

    def dying_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a model")
        raise OSError("No space left on device")

    monkeypatch.setattr(rpg.utils, "save_file", dying_save_file)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(gen_dir / "best.safetensors"), "--out", str(out)]) == 2
    assert "No space left" in _one_line_error(capsys)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("extra, message", [
    (["--eval", "nocolon"], "must look like module:function"),
    (["--eval", "missing_eval_file.py:score"], "evaluation file not found"),
    (["--eval", "no_such_module_xyz:score"], "cannot import module"),
    (["--steps", "0"], "train.steps"),
    (["--config", "TASK_CONFIG"], "set rpg.condition: none"),  # a task-conditioned generator is refused
])
def test_train_user_mistakes_are_one_line(project, capsys, extra, message):
    task_config = project["tmp"] / "task.yaml"
    task_config.write_text("rpg: {condition: task}\n")
    extra = [str(task_config) if e == "TASK_CONFIG" else e for e in extra]
    args = ["train", "--checkpoints", str(project["ckpts"]), "--out", str(project["tmp"] / "o"),
            "--config", str(project["config"]), *extra]
    assert main(args) == 2
    assert message in _one_line_error(capsys)
    assert not (project["tmp"] / "o").exists()


def test_train_rejects_bad_collection_and_eval_that_raises(project, eval_file, capsys):
    bad, _ = _corrupt(project["ckpts"], "inf")
    assert main(["train", "--checkpoints", str(project["ckpts"]), "--out", str(project["tmp"] / "o"),
                 "--config", str(project["config"])]) == 2
    assert str(bad) in _one_line_error(capsys)
    assert _train(project, project["tmp"] / "o", "--skip-bad", "--eval", f"{eval_file}:raises") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"rpg train: warning: skipping {bad}")
    assert len(err) == 2 and "raised KeyError" in err[1] and "Traceback" not in err[1]


def test_help_for_every_command(capsys):
    for command in ([], ["generate"], ["evaluate"], ["inspect"], ["train"]):
        with pytest.raises(SystemExit) as info:
            main([*command, "--help"])
        assert info.value.code == 0
        assert "usage: rpg" in capsys.readouterr().out


def test_documented_byo_config_is_valid_and_unconditional(repo_root):
    from rpg.cli.main import BYO_PRESET
    from rpg.config import load_config

    cfg = load_config([BYO_PRESET, repo_root / "config" / "byo_checkpoints.yaml"])
    assert cfg.model.condition == "none" and cfg.model.permutation_state and cfg.train.eval_every <= cfg.train.steps


def test_evaluate_full_cifar10_model_named_by_its_metadata(tmp_path, capsys):
    """A whole model saved with its timm/rpg architecture gets 10-class accuracy on (here synthetic) CIFAR-10."""
    import timm

    import rpg.vision.cifar_cnn  # noqa: F401  (registers rpg_cnn_s)
    from rpg.data import write_synthetic_cifar10

    write_synthetic_cifar10(tmp_path / "data", n_train=20, n_test=30)
    torch.manual_seed(0)
    state = timm.create_model("rpg_cnn_s", num_classes=10).state_dict()
    path = tmp_path / "cnn.safetensors"
    save_safetensors_atomic(state, path, {"arch": "rpg_cnn_s", "model_kwargs": {}})
    assert main(["evaluate", str(path), "--data", str(tmp_path / "data"), "--device", "cpu"]) == 0
    accuracy = float(re.search(r"rpg_cnn_s CIFAR-10 test accuracy ([\d.]+) %", capsys.readouterr().out).group(1))
    assert 0 <= accuracy <= 100 and round(accuracy * 30 / 100, 3).is_integer()  # k of 30 test images
    del state[next(iter(state))]
    save_safetensors_atomic(state, path, {"arch": "rpg_cnn_s", "model_kwargs": {}})
    assert main(["evaluate", str(path), "--data", str(tmp_path / "data")]) == 2
    assert "do not fit architecture rpg_cnn_s" in _one_line_error(capsys)
