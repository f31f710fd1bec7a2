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


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory):
    """An (untrained) generator conditioned on (class set, image domain) with 3 named domains, as the study's domain
    regimes save it, and per-domain features (D, N, d)."""
    from conftest import tiny_model_config
    from rpg.checkpoint import save_rpg
    from rpg.config import DiffusionConfig
    from rpg.experiments.task_zoo.heads import initial_head
    from rpg.model import RPG
    from rpg.tokenize import Tokenizer

    tmp = tmp_path_factory.mktemp("cli_domains")
    tok = Tokenizer.fit([initial_head(8, seed) for seed in range(3)], 16)
    model = RPG(tiny_model_config(condition="task", condition_dim=13), tok.layer_index, tok.token_index)
    save_rpg(tmp / "gen.safetensors", model, tok, DiffusionConfig(sample_steps=2), step=0,
             extra={"domains": ["identity", "blur", "rotate"]})
    g = torch.Generator().manual_seed(0)
    feats = {f"{s}_x": torch.randn(3, 40, 8, generator=g) for s in ("train", "val", "test")}
    feats.update({f"{s}_y": torch.arange(40) % 10 for s in ("train", "val", "test")})
    save_safetensors_atomic(feats, tmp / "features.safetensors", {})
    return tmp


def test_generate_for_a_domain_task(domain_files, capsys, monkeypatch):
    """--domain (name or index) picks the domain part of the condition (class bits, then one-hot domain): the task
    id is domain * 1024 + class set, and --evaluate scores on that domain's features."""
    import importlib

    from rpg.experiments.task_zoo.tasks import domain_task_id

    cli = importlib.import_module("rpg.cli.main")  # the module (the package exports its `main` function)
    conditions = []
    real = cli.sample_models
    monkeypatch.setattr(cli, "sample_models", lambda *a, **kw: conditions.append(kw["cond"]) or real(*a, **kw))
    gen = str(domain_files / "gen.safetensors")
    heads = {}
    for domain in ("blur", "2"):
        out = domain_files / f"out_{domain}"
        assert main(["generate", "--checkpoint", gen, "--classes", "ship,truck", "--domain", domain, "--seed", "1",
                     "--out", str(out), "--evaluate", "--features", str(domain_files / "features.safetensors")]) == 0
        index = 1 if domain == "blur" else 2
        heads[domain], meta = load_safetensors(out / f"{domain_task_id(3, index):04d}_s0.safetensors")
        assert meta["domain"] == index and meta["embedding"] == "0000000011"
    ship_truck = [0.0] * 8 + [1.0, 1.0]
    assert [c.tolist() for c in conditions] == [[ship_truck + [0, 1, 0]], [ship_truck + [0, 0, 1]]]
    assert capsys.readouterr().out.count("task 0000000011 accuracy") == 2


@pytest.mark.parametrize("args, message", [
    ([], "pass --domain, one of identity, blur, rotate"),
    (["--domain", "fog"], "not a domain of this generator"),
    (["--domain", "3"], "not a domain of this generator"),
])
def test_domain_generator_refuses_a_missing_or_unknown_domain(domain_files, capsys, args, message):
    rc = main(["generate", "--checkpoint", str(domain_files / "gen.safetensors"), "--classes", "ship",
               "--out", str(domain_files / "bad"), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_plain_generator_refuses_a_domain(files, capsys):
    rc = main(["generate", "--checkpoint", str(files / "gen.safetensors"), "--classes", "ship", "--domain", "blur",
               "--out", str(files / "bad_domain")])
    assert rc == 2 and "conditioned on the class set only" in capsys.readouterr().err
