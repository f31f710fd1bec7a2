"""Analysis notebooks and their inputs: rpg.experiments.task_zoo.analysis (PCA of heads, similarity vs. accuracy), rpg.experiments.notebooks, and
each notebook executed under papermill on tiny synthetic results (and failing loudly on a missing input)."""

from __future__ import annotations


import pandas as pd
import pytest
import torch

from conftest import REPO_ROOT
from rpg.experiments.task_zoo.analysis import (add_noise, fit_pca, generated_files, head_keys, iou_at_accuracy, own_vs_other_distance,
                          pca_heads, similarity_analysis)
from rpg.experiments.notebooks import execute_notebook, require_inputs
from rpg.experiments.task_zoo.tasks import TaskSplit
from rpg.utils import save_safetensors_atomic
from rpg.experiments.task_zoo.heads import HEAD_KEYS, HeadEvaluator, checkpoint_path, initial_head

D = 6
TASKS = [3, 5, 12, 33, 100, 512]
UNSEEN = [33, 512]


def _head(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g) for k, v in initial_head(D, 0).items()}


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory) -> dict:
    """A zoo of 6 tasks x 3 checkpoints (each task's heads clustered around its own centre), generated heads near
    the unseen tasks' originals, and test features."""
    tmp = tmp_path_factory.mktemp("tiny_results")
    zoo, models = tmp / "zoo", tmp / "models"
    for t in TASKS:
        centre = _head(t)
        for k in range(3):
            noise = _head(1000 * t + k, 0.05)
            save_safetensors_atomic({n: centre[n] + noise[n] for n in HEAD_KEYS}, checkpoint_path(zoo, t, k),
                                    {"task_id": t})
        if t in UNSEEN or t == 3:
            for s in range(2):
                noise = _head(5000 * t + s, 0.1)
                save_safetensors_atomic({n: centre[n] + noise[n] for n in HEAD_KEYS},
                                        models / f"{t:04d}_s{s}.safetensors", {"task_id": t})
    g = torch.Generator().manual_seed(1)
    evaluator = HeadEvaluator(torch.randn(300, D, generator=g), torch.randint(0, 10, (300,), generator=g))
    split = TaskSplit(train=(3, 5, 12), val=(100,), unseen=tuple(UNSEEN))
    return {"tmp": tmp, "zoo": zoo, "models": models, "evaluator": evaluator, "split": split}


# ---------------------------------------------------------------------------------------------------------------
# rpg.experiments.task_zoo.analysis
# ---------------------------------------------------------------------------------------------------------------


def test_head_keys_plain_and_prefixed():
    assert head_keys(["0.weight", "0.bias", "2.weight"]) == list(HEAD_KEYS)
    assert head_keys(["blocks.0.w", *[f"head.{k}" for k in HEAD_KEYS]]) == [f"head.{k}" for k in HEAD_KEYS]
    with pytest.raises(ValueError, match="no classifier head"):
        head_keys(["fc.weight"])


def test_fit_pca_matches_full_svd_and_projects_dominant_direction():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 2, generator=g))  # two orthonormal directions
    x = torch.randn(200, 2, generator=g) * torch.tensor([10.0, 4.0]) @ q.T + 0.1 * torch.randn(200, 50, generator=g)
    pca = fit_pca(x, 2)
    assert abs(float(pca["components"][0] @ q[:, 0])) > 0.99 and abs(float(pca["components"][1] @ q[:, 1])) > 0.99
    s = torch.linalg.svdvals(x - x.mean(0))
    assert torch.allclose(pca["explained_ratio"], (s[:2] ** 2 / (s**2).sum()), rtol=1e-3)
    assert torch.allclose(fit_pca(x, 2)["components"], pca["components"])  # seeded: the same every time


def test_own_vs_other_distance():
    ref = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 3.0]])
    points = torch.tensor([[1.0, 0.0], [9.0, 0.0], [0.0, 2.0]])
    d = own_vs_other_distance(points, [1, 2, 1], ref, [1, 2, 3])
    assert d.own_dist.tolist() == pytest.approx([1.0, 1.0, 2.0])
    assert d.other_dist.tolist() == pytest.approx([10**0.5, 9.0, 1.0])
    assert d.closer.tolist() == [True, True, False]
    assert d.nearest_other_task.tolist() == [3, 1, 3]
    with pytest.raises(ValueError, match="no reference"):
        own_vs_other_distance(points, [7, 1, 1], ref, [1, 2, 3])


def test_add_noise_scales_with_tensor_std_and_skips_running_stats():
    sd = {"w": torch.randn(1000) * 3, "bn.running_var": torch.ones(10), "n": torch.tensor(5)}
    g = torch.Generator().manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(add_noise(sd, 0.0, g).values(), sd.values()))
    noisy = add_noise(sd, 0.5, g)
    assert float((noisy["w"] - sd["w"]).std()) == pytest.approx(0.5 * float(sd["w"].std()), rel=0.1)
    assert torch.equal(noisy["bn.running_var"], sd["bn.running_var"]) and torch.equal(noisy["n"], sd["n"])


def test_iou_at_accuracy_interpolates_and_clips():
    curve = pd.DataFrame({"accuracy": [0.9, 0.8, 0.6], "max_iou_original": [1.0, 0.8, 0.4]})
    assert iou_at_accuracy(curve, 0.7) == pytest.approx(0.6)
    assert iou_at_accuracy(curve, 0.95) == pytest.approx(1.0)


def test_pca_heads_generated_near_own_originals(tiny_results):
    r = tiny_results
    frames = pca_heads(r["zoo"], r["split"], r["models"], 3)
    points = frames["points"]
    assert len(points) == 3 * len(TASKS) + 2 * 3
    assert set(points[points.kind == "rpg"].group) == {"seen", "unseen"}
    full = frames["summary"].set_index(["space", "group"]).loc[("full", "unseen")]
    assert full.fraction_tasks == 1.0 and full.fraction_samples == 1.0 and full.n_tasks == 2


def test_similarity_analysis_noise_zero_is_the_original(tiny_results):
    r = tiny_results
    frames = similarity_analysis(r["evaluator"], r["zoo"], UNSEEN, r["models"], 3, [0.0, 1.0, 3.0], 2, seed=0)
    models = frames["models"]
    zero = models[(models.kind == "noise") & (models.magnitude == 0)]
    orig = models[models.kind == "original"]
    assert (zero.max_iou_original == 1.0).all()
    assert zero.groupby("task_id").accuracy.mean().to_dict() == pytest.approx(
        orig.groupby("task_id").accuracy.mean().to_dict())
    assert (orig.max_iou_original <= 1.0).all() and len(models[models.kind == "rpg"]) == 4
    assert list(frames["curve"].magnitude) == [0.0, 1.0, 3.0]
    summary = frames["summary"]
    assert summary.task_id.tolist() == [*UNSEEN, "mean"]
    assert {"rpg_max_iou_original", "noise_max_iou_at_rpg_acc", "within_1pt", "rpg_less_similar"} <= set(summary)


def test_generated_files_parses_names_and_rejects_empty(tmp_path, tiny_results):
    files = generated_files(tiny_results["models"])
    assert sorted(set(files.task_id)) == [3, *UNSEEN] and set(files["sample"]) == {0, 1}
    with pytest.raises(FileNotFoundError, match="no generated models"):
        generated_files(tmp_path)


def test_require_inputs_names_missing_files(tmp_path):
    present = tmp_path / "a.csv"
    present.write_text("x\n")
    require_inputs("nb", a=present)
    with pytest.raises(FileNotFoundError, match=r"b_csv = .*missing\.csv"):
        require_inputs("nb", a=present, b_csv=tmp_path / "missing.csv")


# ---------------------------------------------------------------------------------------------------------------
# The notebooks under papermill
# ---------------------------------------------------------------------------------------------------------------


def _kernel_available() -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    return "rpg" in KernelSpecManager().find_kernel_specs()


needs_kernel = pytest.mark.skipif(not _kernel_available(), reason="Jupyter kernel 'rpg' not installed (make install)")


@pytest.fixture(scope="module")
def notebook_inputs(tiny_results) -> dict[str, dict[str, str]]:
    """The CSVs each notebook loads, written by the rpg.experiments.task_zoo.analysis functions on the tiny results (Table 13 by hand)."""
    r, out = tiny_results, tiny_results["tmp"] / "analysis"
    out.mkdir(exist_ok=True)
    paths: dict[str, dict[str, str]] = {"pca_heads": {}, "similarity_iou": {}, "finetune_curves": {}}
    for name, frame in pca_heads(r["zoo"], r["split"], r["models"], 3).items():
        frame.to_csv(out / f"pca_{name}.csv", index=False)
    paths["pca_heads"] = {"points_csv": str(out / "pca_points.csv"), "summary_csv": str(out / "pca_summary.csv")}
    sim = similarity_analysis(r["evaluator"], r["zoo"], UNSEEN, r["models"], 3, [0.0, 1.0, 3.0], 1, seed=0)
    for name, frame in sim.items():
        frame.to_csv(out / f"similarity_{name}.csv", index=False)
    paths["similarity_iou"] = {f"{n}_csv": str(out / f"similarity_{n}.csv") for n in ("models", "curve", "summary")}
    rows = [{"embedding": e, "task_id": i, "arm": arm, "epoch": ep, "accuracy": 50 + 10 * ep + 5 * a,
             "balanced_accuracy": 50.0, "train_seconds": 0.0, "images_per_epoch": 100, "n_test_images": 50}
            for e, i in (("0000100001", 33), ("1000000000", 512), ("mean", ""))
            for a, arm in enumerate(("scratch", "finetune", "rpg")) for ep in (0, 1, 2)]
    pd.DataFrame(rows).to_csv(out / "table13.csv", index=False)
    paths["finetune_curves"] = {"table13_csv": str(out / "table13.csv")}
    return paths


FIGURES = {"pca_heads": ("pca_heads.png", "pca_heads.csv"),
           "similarity_iou": ("similarity_iou.png", "similarity_iou.csv"),
           "finetune_curves": ("finetune_curves.png", "finetune_curves.csv")}


@needs_kernel
@pytest.mark.parametrize("name", list(FIGURES))
def test_notebook_executes_and_writes_figure_and_numbers(name, notebook_inputs, tmp_path):
    figures = tmp_path / "figures"
    executed = execute_notebook(REPO_ROOT / "notebooks" / f"{name}.ipynb", tmp_path / f"{name}.ipynb",
                                {**notebook_inputs[name], "out_dir": str(figures)})
    assert executed.is_file()
    png, csv = (figures / f for f in FIGURES[name])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert len(pd.read_csv(csv)) > 0


@needs_kernel
def test_notebook_fails_loudly_on_missing_input(notebook_inputs, tmp_path):
    import papermill

    params = {**notebook_inputs["finetune_curves"], "table13_csv": str(tmp_path / "nope" / "table13.csv"),
              "out_dir": str(tmp_path / "figures")}
    with pytest.raises(papermill.PapermillExecutionError, match=r"table13_csv = .*nope/table13\.csv"):
        execute_notebook(REPO_ROOT / "notebooks" / "finetune_curves.ipynb", tmp_path / "out.ipynb", params)
    assert not (tmp_path / "figures").exists()


def test_notebooks_are_committed_without_outputs():
    import nbformat

    for name in FIGURES:
        nb = nbformat.read(REPO_ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), name
        assert "require_inputs" in code[1].source, name
        assert all(not c.outputs and c.execution_count is None for c in code), name
        assert nb.metadata.kernelspec.name == "rpg"
