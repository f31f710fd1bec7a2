"""The `rpg` command: generate a head for an embedding or class list, evaluate it; user mistakes give one line
and exit status 2."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny_head_generator
from rpg.cli.main import main
from rpg.experiments.task_zoo.tasks import CIFAR10_CLASSES
from rpg.utils import load_safetensors, save_safetensors_atomic


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An (untrained) task-conditioned generator for 8-wide heads, and tiny features."""
    tmp = tmp_path_factory.mktemp("cli")
    save_tiny_head_generator(tmp / "gen.safetensors", sample_steps=3)
    g = torch.Generator().manual_seed(0)
    feats = {f"{s}_x": torch.randn(40, 8, generator=g) for s in ("train", "val", "test")}
    feats.update({f"{s}_y": torch.arange(40) % 10 for s in ("train", "val", "test")})
    save_safetensors_atomic(feats, tmp / "features.safetensors", {})
    return tmp


def test_generate_by_classes_writes_loadable_heads(files, capsys):
    out = files / "out"
    rc = main(["generate", "--checkpoint", str(files / "gen.safetensors"), "--classes", "Ship, truck",
               "--samples", "2", "--out", str(out), "--evaluate", "--features", str(files / "features.safetensors")])
    assert rc == 0
    tensors, meta = load_safetensors(out / "0003_s1.safetensors")
    assert meta["embedding"] == "0000000011" and meta["task_id"] == 3
    assert set(tensors) == {"0.weight", "0.bias", "2.weight"} and tensors["0.weight"].shape == (8, 8)
    printed = capsys.readouterr().out
    assert "balanced accuracy" in printed and printed.count("0003_s") == 4  # 2 paths + 2 evaluations


def test_same_seed_same_model(files):
    for name in ("a", "b"):
        assert main(["generate", "--checkpoint", str(files / "gen.safetensors"), "--embedding", "0100010111",
                     "--seed", "7", "--out", str(files / name)]) == 0
    a, _ = load_safetensors(files / "a" / "0279_s0.safetensors")
    b, _ = load_safetensors(files / "b" / "0279_s0.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_reads_task_from_metadata(files, capsys):
    main(["generate", "--checkpoint", str(files / "gen.safetensors"), "--embedding", "1000000000",
          "--out", str(files / "e")])
    capsys.readouterr()
    assert main(["evaluate", str(files / "e" / "0512_s0.safetensors"),
                 "--features", str(files / "features.safetensors")]) == 0
    assert "task 1000000000 accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--embedding", "01"], "exactly 10 bits"),
    (["--embedding", "0000000000"], "all-0"),
    (["--embedding", "11111111x1"], "only the characters 0 and 1"),
    (["--embedding", "01000101110"], "exactly 10 bits"),
    (["--embedding", "1111111111"], "all-1"),
    (["--embedding", "0100010112"], "only the characters 0 and 1"),
    (["--classes", "ship,plane"], "unknown class 'plane'"),
    (["--classes", ",".join(CIFAR10_CLASSES).upper()], "all-1"),
    (["--embedding", "0100010111", "--classes", "ship"], "exactly one of --embedding"),
    (["--embedding", "0100010111", "--samples", "0"], "--samples must be at least 1"),
    ([], "exactly one of --embedding"),
])
def test_user_mistakes_are_one_line_and_status_2(files, capsys, args, message):
    rc = main(["generate", "--checkpoint", str(files / "gen.safetensors"), "--out", str(files / "x"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unreadable_checkpoint_is_named(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    assert main(["evaluate", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
