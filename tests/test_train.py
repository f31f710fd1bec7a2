"""RPG training (rpg.train): a tiny generator learns a handful of small real checkpoints; resuming; lr schedule.

The data: 4 checkpoints of an MLP classifier Linear(2,8)-ReLU-Linear(8,2) (42 parameters), each trained from its own
seed (300 full-batch Adam steps) on two Gaussian blobs, reaching ~99.7 % test accuracy.
The generator: unconditional, permutation states, Mamba2 d_model 32 (2 heads of 16, d_state 16), token size 16
(4 tokens per checkpoint), denoiser 1-8-16-8-1; 400 steps at lr 1e-2, batch 16 checkpoints (with replacement),
diffusion batch 64 (~17 s on one thread of an AMD EPYC core), with an exponential moving average of its weights.
Margins at 400 steps, for the weights as trained and their average alike: first-50-step mean loss > 2x last-50-step
mean loss (measured 6.8x; 11.3x at 1000 steps); every generated MLP within 5 accuracy points of the mean original
(measured: within 0.3 point); a sample generated with state i is nearest (L2) to checkpoint i for at least 7 of 8
samples (measured 8/8; two samples of different states 4.7 apart).
(With batch 4 / diffusion batch 16 the same run generated poor weights: the denoiser's BatchNorm needs a
reasonable diffusion batch; see the report.)
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_model_config
from rpg.checkpoint import load_rpg
from rpg.config import DiffusionConfig, TrainConfig
from rpg.diffusion import create_diffusion
from rpg.generate import generate_state_dicts
from rpg.tokenize import Tokenizer
from rpg.train import RunConflictError, lr_at, plateaued, train_rpg, update_ema
from rpg.utils import load_safetensors

N_CKPT = 4
STEPS = 400  # of the generator fixture (margins in the module docstring)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 2, generator=gen) * 0.7 + (2 * y[:, None] - 1) * torch.tensor([1.5, 1.0])
    return x, y


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture(scope="module")
def blob_task():
    return {"train": _blobs(512, 0), "test": _blobs(1000, 1)}


def _accuracy(sd: dict[str, torch.Tensor], data) -> float:
    model = _mlp()
    model.load_state_dict(sd)
    x, y = data
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def mlp_checkpoints(blob_task):
    x, y = blob_task["train"]
    sds = []
    for s in range(N_CKPT):
        torch.manual_seed(100 + s)
        model = _mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(300):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sds.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    accs = [_accuracy(sd, blob_task["test"]) for sd in sds]
    assert min(accs) > 0.95, accs  # the originals solve the task
    return sds


def _flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([sd[k].flatten().double() for k in sorted(sd)])


@pytest.fixture(scope="module")
def trained_rpg(mlp_checkpoints, tmp_path_factory):
    """One training run with an exponential moving average of the generator's weights (decay 0.99): last.safetensors
    holds the weights as trained, best.safetensors their average (what a run with `ema` keeps as best). The average
    is a copy beside the training, so the weights as trained are those of a run without it."""
    out = tmp_path_factory.mktemp("rpg_mlp")
    mcfg = tiny_model_config(permutation_state=True, condition="none", recurrent="mamba", token_size=16)
    tok = Tokenizer.fit(mlp_checkpoints, mcfg.token_size)
    tokens = torch.stack([tok.tokenize(sd) for sd in mlp_checkpoints])  # (4, 4, 16)
    tcfg = TrainConfig(steps=STEPS, batch_size=16, diffusion_batch=64, lr=1e-2, warmup_steps=20, weight_decay=0.0,
                       grad_clip=1.0, amp="none", save_every=STEPS // 2, eval_every=STEPS, ema=0.99)
    dcfg = DiffusionConfig(sampler="ddim", sample_steps=50, eta=0.0, clip_x0=4.0)
    summary = train_rpg(mcfg, dcfg, tcfg, tok, tokens, out, seed=0, progress=False)
    return {"out": out, "summary": summary, "tokenizer": tok}


def test_training_loss_falls(trained_rpg):
    """Mean loss of the first 50 steps > 2 x mean loss of the last 50 (train_log.csv); all losses finite."""
    with (trained_rpg["out"] / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    losses = [float(r["loss"]) for r in rows]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert first > 2 * last, (first, last)
    assert {"lr", "grad_norm"} <= set(rows[0])
    summary = trained_rpg["summary"]
    assert summary["steps"] == STEPS and summary["best_step"] == STEPS and summary["n_checkpoints"] == N_CKPT
    for name in ("best.safetensors", "last.safetensors", "last.opt.pt"):
        assert (trained_rpg["out"] / name).is_file(), name


@pytest.fixture(scope="module", params=["last.safetensors", "best.safetensors"], ids=["weights", "ema"])
def generated(trained_rpg, request):
    model, tok, dcfg, meta = load_rpg(trained_rpg["out"] / request.param)
    assert meta["step"] == STEPS
    perm = torch.arange(N_CKPT).repeat(2)  # each permutation state twice
    sds = generate_state_dicts(model, tok, create_diffusion(dcfg), len(perm), perm=perm, sampler="ddim", steps=50,
                               eta=0.0, clip_x0=4.0, mode="full", generator=torch.Generator().manual_seed(0))
    return perm, sds


def test_generated_weights_work(generated, mlp_checkpoints, blob_task):
    """Every generated MLP scores within 5 accuracy points of the originals' mean on the test blobs."""
    _, sds = generated
    original = sum(_accuracy(sd, blob_task["test"]) for sd in mlp_checkpoints) / N_CKPT
    accs = [_accuracy(sd, blob_task["test"]) for sd in sds]
    assert min(accs) >= original - 0.05, (original, accs)
    for sd in sds:
        assert set(sd) == set(mlp_checkpoints[0])
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_permutation_state_selects_its_checkpoint(generated, mlp_checkpoints):
    """A sample generated with permutation state i is nearest (L2 in parameter space) to checkpoint i, for >= 7/8."""
    perm, sds = generated
    originals = torch.stack([_flat(sd) for sd in mlp_checkpoints])
    hits = 0
    for i, sd in zip(perm.tolist(), sds):
        dist = (originals - _flat(sd)).norm(dim=1)
        hits += int(dist.argmin().item() == i)
    assert hits >= len(sds) - 1, hits
    # and the samples are not all the same point: different states give different weights
    assert (_flat(sds[0]) - _flat(sds[1])).norm() > 1.0


def test_update_ema_warms_up_and_copies_buffers():
    """Step 0 moves the average 90 % of the way (rate min(decay, 1/10)), late steps by 1 - decay; the BatchNorm running
    statistics are the model's own, not averaged (an EMA copy with its initial statistics generates at chance)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema.load_state_dict(model.state_dict())
    start = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model(torch.randn(8, 3) * 5 + 2)  # train mode: moves the running statistics
    update_ema(ema, model, 0.999, step=0)
    for pe, p0, pm in zip(ema.parameters(), start, model.parameters()):
        assert torch.allclose(pe, 0.1 * p0 + 0.9 * pm)
    for be, bm in zip(ema.buffers(), model.buffers()):
        assert torch.equal(be, bm)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.999, step=100_000)
    for pe, pb, pm in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(pe, 0.999 * pb + 0.001 * pm)


# ---------------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------------


def _resume_setup(mlp_checkpoints, ema):
    mcfg = tiny_model_config(permutation_state=True, condition="none", token_size=16)
    tok = Tokenizer.fit(mlp_checkpoints, 16)
    tokens = torch.stack([tok.tokenize(sd) for sd in mlp_checkpoints])
    tcfg = TrainConfig(steps=40, batch_size=8, diffusion_batch=24, lr=3e-3, warmup_steps=5, amp="none",
                       save_every=20, eval_every=20, ema=ema)
    return mcfg, DiffusionConfig(), tcfg, tok, tokens


@pytest.mark.parametrize("ema", [None, 0.9])
def test_resume_matches_uninterrupted_run(mlp_checkpoints, tmp_path, ema):
    """40 steps in one go == 20 steps (stop_after) + resume for 20: last/best weights equal (torch.equal),
    logged losses equal, and the optimizer / generator state is restored."""
    mcfg, dcfg, tcfg, tok, tokens = _resume_setup(mlp_checkpoints, ema)
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    train_rpg(mcfg, dcfg, tcfg, tok, tokens, full_dir, seed=3, progress=False)
    first = train_rpg(mcfg, dcfg, tcfg, tok, tokens, split_dir, seed=3, progress=False, stop_after=20)
    assert first["steps"] == 20
    assert (split_dir / "last.safetensors").is_file() and not (split_dir / "best.safetensors").exists()
    _, meta = load_safetensors(split_dir / "last.safetensors")
    assert meta["step"] == 20
    second = train_rpg(mcfg, dcfg, tcfg, tok, tokens, split_dir, seed=3, progress=False)
    assert second["steps"] == 40
    for name in ("last.safetensors", "best.safetensors"):
        a, meta_a = load_safetensors(full_dir / name)
        b, meta_b = load_safetensors(split_dir / name)
        assert meta_a["step"] == meta_b["step"] == 40
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resuming"
    with (full_dir / "train_log.csv").open() as f:
        full_log = [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]
    with (split_dir / "train_log.csv").open() as f:
        split_log = [(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)]
    assert full_log == split_log
    # a finished run resumed again does nothing and keeps its weights
    before = {name: load_safetensors(split_dir / name)[0] for name in ("last.safetensors", "best.safetensors")}
    again = train_rpg(mcfg, dcfg, tcfg, tok, tokens, split_dir, seed=3, progress=False)
    assert again["steps"] == 40
    for name, tensors in before.items():
        after, _ = load_safetensors(split_dir / name)
        assert all(torch.equal(after[k], tensors[k]) for k in tensors), name


def _tensors_equal(dir_a, dir_b, name):
    a, _ = load_safetensors(dir_a / name)
    b, _ = load_safetensors(dir_b / name)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_no_resume_from_a_run_on_other_data(mlp_checkpoints, tmp_path):
    """Leftover last.* of a run on other checkpoints are refused (RunConflictError); with force (the workflow's
    choice: Snakemake re-runs a rule after its inputs changed) they are not resumed: the run starts from scratch and
    equals a run in a clean folder; the stale log is replaced."""
    mcfg, dcfg, tcfg, tok, tokens = _resume_setup(mlp_checkpoints, None)
    stale_dir, clean_dir = tmp_path / "reused", tmp_path / "clean"
    train_rpg(mcfg, dcfg, tcfg, tok, tokens.flip(0), stale_dir, seed=3, progress=False)  # other data
    with pytest.raises(RunConflictError, match="other data or settings"):
        train_rpg(mcfg, dcfg, tcfg, tok, tokens, stale_dir, seed=3, progress=False)
    summary = train_rpg(mcfg, dcfg, tcfg, tok, tokens, stale_dir, seed=3, progress=False, force=True)
    assert summary["steps"] == 40
    train_rpg(mcfg, dcfg, tcfg, tok, tokens, clean_dir, seed=3, progress=False)
    assert _tensors_equal(stale_dir, clean_dir, "last.safetensors")
    assert (stale_dir / "train_log.csv").read_text() == (clean_dir / "train_log.csv").read_text()
    # other settings (here: the learning rate) are "other data" too
    other = TrainConfig(**{**tcfg.__dict__, "lr": 1e-3})
    train_rpg(mcfg, dcfg, other, tok, tokens, stale_dir, seed=3, progress=False, force=True)
    assert not _tensors_equal(stale_dir, clean_dir, "last.safetensors")


def test_finished_run_with_deleted_best_is_retrained(mlp_checkpoints, tmp_path):
    """Snakemake deletes a rule's declared outputs (best.safetensors) before re-running it; a finished run whose
    best checkpoint (chosen by validation) is gone retrains instead of ending without one."""
    mcfg, dcfg, tcfg, tok, tokens = _resume_setup(mlp_checkpoints, None)

    def validate(model):
        return {"score": float(-sum(p.detach().abs().sum() for p in model.denoiser.parameters()))}

    train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=3, progress=False, validate=validate)
    reference = load_safetensors(tmp_path / "best.safetensors")[0]
    (tmp_path / "best.safetensors").unlink()
    summary = train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=3, progress=False, validate=validate)
    assert summary["steps"] == 40 and (tmp_path / "best.safetensors").is_file()
    again = load_safetensors(tmp_path / "best.safetensors")[0]
    assert all(torch.equal(again[k], reference[k]) for k in reference)


def test_unfinished_run_with_deleted_best_restores_it_and_resumes(mlp_checkpoints, tmp_path, capsys):
    """Snakemake deletes a killed job's best.safetensors before its rerun: an unfinished run restores it from the copy
    in last.opt.pt and resumes (one validation left, not two), ending with the weights of an uninterrupted run."""
    mcfg, dcfg, tcfg, tok, tokens = _resume_setup(mlp_checkpoints, 0.9)
    calls = []

    def validate(model):
        calls.append(1)
        return {"score": float(-sum(p.detach().abs().sum() for p in model.denoiser.parameters()))}

    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    train_rpg(mcfg, dcfg, tcfg, tok, tokens, full_dir, seed=3, progress=False, validate=validate)
    train_rpg(mcfg, dcfg, tcfg, tok, tokens, split_dir, seed=3, progress=False, validate=validate, stop_after=20)
    at_20 = (split_dir / "best.safetensors").read_bytes()
    (split_dir / "best.safetensors").unlink()
    calls.clear()
    capsys.readouterr()
    summary = train_rpg(mcfg, dcfg, tcfg, tok, tokens, split_dir, seed=3, progress=False, validate=validate,
                        stop_after=0)
    assert "restored" in capsys.readouterr().out and summary["steps"] == 20 and not calls
    assert (split_dir / "best.safetensors").read_bytes() == at_20
    (split_dir / "best.safetensors").unlink()
    train_rpg(mcfg, dcfg, tcfg, tok, tokens, split_dir, seed=3, progress=False, validate=validate)
    out = capsys.readouterr().out
    assert f"resumed from {split_dir / 'last.opt.pt'} at step 20" in out and len(calls) == 1, out
    for name in ("best.safetensors", "last.safetensors"):
        assert _tensors_equal(full_dir, split_dir, name), name
    assert (full_dir / "train_log.csv").read_text() == (split_dir / "train_log.csv").read_text()


def test_validate_hook_keeps_best(mlp_checkpoints, tmp_path):
    """validate() is called every eval_every steps; best.safetensors holds the best-scoring step."""
    mcfg, dcfg, tcfg, tok, tokens = _resume_setup(mlp_checkpoints, None)
    tcfg = TrainConfig(**{**tcfg.__dict__, "eval_every": 10, "steps": 40})
    scores = iter([0.1, 0.9, 0.5, 0.2])
    calls = []

    def validate(model):
        calls.append(model.training)
        return {"score": next(scores)}

    summary = train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=0, progress=False, validate=validate)
    assert len(calls) == 4
    assert summary["best_step"] == 20 and summary["best_score"] == pytest.approx(0.9)
    _, meta = load_safetensors(tmp_path / "best.safetensors")
    assert meta["step"] == 20 and meta["extra"]["val"]["score"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------------------------------------------
# Early stopping on the validation score (patience, with `steps` as the maximum budget)
# ---------------------------------------------------------------------------------------------------------------


def _scripted(scores):
    """A validate() returning the given scores in turn, counting its calls."""
    it = iter(scores)
    calls = []

    def validate(model):
        calls.append(1)
        return {"score": next(it)}

    return validate, calls


def _log_rows(out):
    with (out / "train_log.csv").open() as f:
        return list(csv.DictReader(f))


def test_early_stop_after_patience_validations_without_improvement(mlp_checkpoints, tmp_path):
    """Best at the 2nd validation (step 20), then 2 worse ones: with patience 2 the run stops at step 40 of 100,
    says so, keeps the step-20 generator, logs the validation curve; running it again trains no further."""
    mcfg, dcfg, tcfg, tok, tokens = _resume_setup(mlp_checkpoints, None)
    tcfg = TrainConfig(**{**tcfg.__dict__, "steps": 100, "eval_every": 10, "save_every": 50, "patience": 2})
    validate, calls = _scripted([0.3, 0.8, 0.7, 0.79] + [0.0] * 6)
    summary = train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=0, progress=False, validate=validate)
    assert len(calls) == 4
    assert summary["steps"] == 40 and summary["max_steps"] == 100 and summary["best_step"] == 20
    assert summary["stopped_early"] and not summary["hit_max_steps"] and summary["finished"]
    _, meta = load_safetensors(tmp_path / "best.safetensors")
    assert meta["step"] == 20
    rows = _log_rows(tmp_path)
    assert len(rows) == 40
    curve = [(int(r["step"]), float(r["val/score"])) for r in rows if r["val/score"]]
    assert curve == [(10, 0.3), (20, 0.8), (30, 0.7), (40, 0.79)]
    again_validate, again_calls = _scripted([1.0] * 10)
    again = train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=0, progress=False, validate=again_validate)
    assert again_calls == [] and again["steps"] == 40 and again["stopped_early"] and again["best_step"] == 20
    assert len(_log_rows(tmp_path)) == 40
    # patience off: the same run resumes from step 40 and uses the rest of its budget
    more_validate, more_calls = _scripted([0.1] * 5 + [0.9])
    more = train_rpg(mcfg, dcfg, TrainConfig(**{**tcfg.__dict__, "patience": None}), tok, tokens, tmp_path, seed=0,
                     progress=False, validate=more_validate)
    assert len(more_calls) == 6 and more["steps"] == 100 and more["hit_max_steps"] and more["best_step"] == 100
    assert [int(r["step"]) for r in _log_rows(tmp_path)] == list(range(1, 101))


@pytest.mark.parametrize("patience, scores", [(2, [0.1 * i for i in range(1, 7)]),  # keeps improving
                                              (None, [0.9, 0.1, 0.1, 0.1, 0.1, 0.1])])  # early stop off
def test_no_early_stop_while_improving_or_without_patience(mlp_checkpoints, tmp_path, patience, scores):
    """A score that keeps improving (or patience None) runs the whole budget: hit_max_steps, not stopped_early."""
    mcfg, dcfg, tcfg, tok, tokens = _resume_setup(mlp_checkpoints, None)
    tcfg = TrainConfig(**{**tcfg.__dict__, "steps": 60, "eval_every": 10, "save_every": 30, "patience": patience})
    validate, calls = _scripted(scores)
    summary = train_rpg(mcfg, dcfg, tcfg, tok, tokens, tmp_path, seed=0, progress=False, validate=validate)
    assert len(calls) == 6 and summary["steps"] == 60
    assert summary["hit_max_steps"] and not summary["stopped_early"] and summary["finished"]
    assert summary["best_step"] == (60 if patience else 10)


def test_plateau_counts_validations_since_the_best():
    cfg = TrainConfig(eval_every=10, patience=3)
    assert not plateaued(40, 20, cfg) and plateaued(50, 20, cfg)
    assert not plateaued(50, -1, cfg)  # no validation yet
    assert not plateaued(10_000, 20, TrainConfig(eval_every=10))  # patience None: never


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------


def test_lr_schedule_endpoints():
    """Linear warm-up to lr at step warmup-1, cosine from lr (step warmup) to min_lr_ratio*lr (last step)."""
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 100)
    assert lr_at(49, cfg) == pytest.approx(1e-3 * 50 / 100)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-3)
    assert lr_at(550, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # half-way through the cosine
    assert lr_at(1000, cfg) == pytest.approx(1e-4)
    assert lr_at(5000, cfg) == pytest.approx(1e-4)  # stays at the floor
    values = [lr_at(s, cfg) for s in range(1000)]
    assert all(a <= b + 1e-15 for a, b in zip(values[:100], values[1:101]))  # warm-up increases
    assert all(a >= b - 1e-15 for a, b in zip(values[100:], values[101:]))  # cosine decreases
    assert min(values[100:]) > 1e-4 - 1e-12


def test_lr_schedule_without_warmup():
    cfg = TrainConfig(steps=10, lr=2e-3, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == pytest.approx(2e-3)
    assert lr_at(10, cfg) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(5, cfg) == pytest.approx(1e-3)


def test_position_lr_scale_gives_the_position_table_its_own_rate(mlp_checkpoints, tmp_path):
    """A learnable position table gets `position_lr_scale` times the schedule's rate; the other weights the rate
    itself. Checked through the update size: Adam moves a weight by its group's rate times a factor that is the same
    for weights with the same gradient history."""
    from rpg.train import _param_groups

    tok = Tokenizer.fit(mlp_checkpoints, 16)
    from rpg.model import RPG

    model = RPG(tiny_model_config(position="learnable"), tok.layer_index, tok.token_index)
    groups = _param_groups(model, 0.01, position_lr_scale=30.0)
    scaled = [g for g in groups if g.get("lr_scale") == 30.0]
    assert len(scaled) == 1 and scaled[0]["params"] == [model.position.table]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)
    assert all("lr_scale" not in g for g in _param_groups(model, 0.01))  # default: one rate for all
    # Two steps: the denoiser's output layer starts at zero, so only the second step has a gradient everywhere (and
    # Adam's first update of a weight is its rate times the sign of its gradient).
    cfg = TrainConfig(steps=2, batch_size=2, diffusion_batch=64, lr=1e-3, min_lr_ratio=1.0, warmup_steps=0,
                      eval_every=2, save_every=2, amp="none", grad_clip=None, position_lr_scale=30.0)
    from rpg.utils import seed_everything

    seed_everything(0)  # the initial weights train_rpg draws with seed 0
    model = RPG(tiny_model_config(position="learnable"), tok.layer_index, tok.token_index)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_rpg(tiny_model_config(position="learnable"), DiffusionConfig(), cfg, tok,
              torch.stack([tok.tokenize(sd) for sd in mlp_checkpoints]), tmp_path, seed=0, progress=False)
    after = load_rpg(tmp_path / "last.safetensors")[0]
    moved = {n: (dict(after.named_parameters())[n].detach() - before[n]).abs().max().item() for n in before}
    # Both had a zero gradient at step 1, so Adam scales their second update alike (0.74 x the rate): the ratio is 30.
    assert moved["position.table"] / moved["denoiser.cond_proj.weight"] == pytest.approx(30.0, rel=0.05)


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_condition_dropout_trains_the_null_code(mlp_checkpoints, tmp_path, dropout):
    """rpg.condition_dropout: with probability 1 every task code is the null code, so two runs on other task bits
    train the same weights; with 0 the task bits shape the weights."""
    mcfg = tiny_model_config(condition="task", token_size=16, condition_dropout=dropout)
    tok = Tokenizer.fit(mlp_checkpoints, mcfg.token_size)
    tokens = torch.stack([tok.tokenize(sd) for sd in mlp_checkpoints])
    tcfg = TrainConfig(steps=6, batch_size=4, diffusion_batch=16, lr=1e-2, warmup_steps=1, weight_decay=0.0,
                       save_every=6, eval_every=6)
    weights = []
    for i, bits in enumerate((torch.eye(10)[: len(tokens)], 1 - torch.eye(10)[: len(tokens)])):
        train_rpg(mcfg, DiffusionConfig(), tcfg, tok, tokens, tmp_path / str(i), cond=bits, seed=0, progress=False)
        weights.append(load_safetensors(tmp_path / str(i) / "last.safetensors")[0])
    same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert same == (dropout == 1.0)


def _record_conv_dtypes(monkeypatch) -> list[torch.dtype]:
    """The output dtype of every Conv1d call in the denoisers of the RPGs built from now on (a forward hook each)."""
    from rpg.model import RPG

    seen: list[torch.dtype] = []
    init = RPG.__init__

    def hooked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for m in self.denoiser.modules():
            if isinstance(m, nn.Conv1d):
                m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))

    monkeypatch.setattr(RPG, "__init__", hooked_init)
    return seen


@pytest.mark.parametrize("amp, expected", [("none", torch.float32), ("cuda", torch.float32),
                                           ("bf16", torch.bfloat16)])
def test_amp_mode_decides_the_training_steps_precision_on_cpu(mlp_checkpoints, tmp_path, monkeypatch, amp, expected):
    """train.amp: on a CPU the denoiser's convolutions run in bfloat16 under `bf16` (and `auto` on a CPU with
    AMX / AVX512-BF16), in float32 under `none` and `cuda`; the loss stays finite either way."""
    seen = _record_conv_dtypes(monkeypatch)
    tok = Tokenizer.fit(mlp_checkpoints, 16)
    cfg = TrainConfig(steps=2, batch_size=2, diffusion_batch=16, lr=1e-3, warmup_steps=0, eval_every=2,
                      save_every=2, amp=amp)
    summary = train_rpg(tiny_model_config(condition="none"), DiffusionConfig(), cfg, tok,
                        torch.stack([tok.tokenize(sd) for sd in mlp_checkpoints]), tmp_path, seed=0, progress=False)
    assert math.isfinite(summary["final_loss_ema"])
    assert seen and set(seen) == {expected}


def test_resolve_amp_modes(monkeypatch):
    """`auto` follows the CPU's bf16 units; `cuda` is bf16 on CUDA only; unknown modes are refused."""
    from rpg.vision import preprocess

    for has_bf16 in (True, False):
        monkeypatch.setattr(preprocess, "_cpu_has_bf16", lambda: has_bf16)
        assert preprocess.resolve_amp("auto", "cpu") is has_bf16
        assert not preprocess.resolve_amp("cuda", "cpu") and not preprocess.resolve_amp("none", "cpu")
        assert preprocess.resolve_amp("bf16", "cpu")
    assert preprocess.resolve_amp("cuda", "cuda") and preprocess.resolve_amp("auto", "cuda")
    with pytest.raises(ValueError, match="amp must be one of"):
        preprocess.resolve_amp("fp16", "cpu")
