"""Running the analysis notebooks (notebooks/*.ipynb) headless with papermill, and their shared first-cell check.

The notebooks hold no logic beyond loading CSVs written by workflow rules, plotting, and saving each figure with
the numbers behind it. Papermill injects the input paths after the cell tagged `parameters`; a failing cell raises
`papermill.PapermillExecutionError`, so the rule that runs the notebook fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from rpg.config import AnalysisConfig, Config

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


def require_inputs(notebook: str, **paths: str | Path) -> None:
    """Fail loudly, naming every missing input and how to make it (the first cell of each notebook)."""
    missing = {name: str(path) for name, path in paths.items() if not Path(path).is_file()}
    if missing:
        lines = "\n".join(f"  {name} = {path}" for name, path in missing.items())
        raise FileNotFoundError(
            f"{notebook}: missing input file(s):\n{lines}\n"
            f"Produce them with the workflow, e.g. `snakemake --cores all all`, or pass other paths as papermill "
            f"parameters (paths are relative to the notebook's working directory, {Path.cwd()})."
        )


def execute_notebook(notebook: str | Path, output: str | Path, parameters: Mapping[str, Any],
                     kernel: str = AnalysisConfig.kernel) -> Path:
    """Execute `notebook` with `parameters` under papermill (kernel `kernel`), writing the executed copy to `output`.

    Path parameters should be absolute: the kernel runs in the notebook's own folder, as in JupyterLab.
    """
    import papermill

    notebook = Path(notebook)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(str(notebook), str(output), parameters=dict(parameters), kernel_name=kernel,
                               cwd=str(notebook.resolve().parent), progress_bar=False)
    return output


def execute_notebook_rule(cfg: Config, inputs: Mapping[str, str], outputs: Mapping[str, str]) -> Path:
    """A notebook rule: `inputs["notebook"]` runs with the other inputs as (absolute) path parameters and
    `out_dir` = the folder of `outputs["figure"]`; the executed copy goes to `outputs["notebook"]`."""
    params = {name: str(Path(path).resolve()) for name, path in inputs.items() if name != "notebook"}
    params["out_dir"] = str(Path(outputs["figure"]).resolve().parent)
    return execute_notebook(inputs["notebook"], outputs["notebook"], params, kernel=cfg.analysis.kernel)
