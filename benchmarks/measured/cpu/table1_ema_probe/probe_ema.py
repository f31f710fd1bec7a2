"""Probe: a Table 1 row's generator with an EMA of its weights (validation only; same training trajectory as the row)."""
import sys, json, torch
from rpg.config import load_config
from rpg.experiments.arch_study.study import train_variant
torch.set_num_threads(1)
arch, ema = sys.argv[1], float(sys.argv[2])
out = f"/work/probe_ema/{arch}_ema{ema}"
cfg = load_config(["config/config.yaml"], {"results_dir": out, "logging": {"wandb": False, "progress": False},
                  "architectures": {"models": {arch: {"train": {"ema": ema}}}}})
s = train_variant(cfg, arch, "mamba-2d-perm-runs1-tok256", [f"results/table1/collections/{arch}/run0"], out + "/rpg")
print(json.dumps({k: s[k] for k in ("best_step", "best_score", "steps", "seconds")}))
