"""Fine-tune a causal LM with LoKI: select rows (analysing first if needed), implant, evaluate, export.

    python train.py                                           # the offline toy default
    python train.py model=qwen0.5b task=reranker loki.q=0.05  # the paper's reranker setting
    python train.py loki=off                                  # full fine-tuning baseline
    python train.py loki=off lora=r16                         # peft LoRA baseline
    python train.py -m loki.q=0.05,0.1 trainer=ddp_cpu        # a sweep: one run dir per job, DDP or not
    python train.py -m experiment=paper_qwen0.5b_reranker     # the authors' q sweep (hydra.sweeper.params)

Under `-m` each job runs exactly once: DDP children Lightning starts run only their parent's current job
(loki.sweep), a failed job leaves error.txt and the sweep goes on, and the job's return value is the task's
primary metric (for the Optuna/Ax sweepers).
"""

from __future__ import annotations

import sys
import warnings

import hydra
from omegaconf import DictConfig

from loki import recipe, sweep
from loki.errors import LokiError


# conf/hydra/launcher/submitit_slurm.yaml deliberately shares the plugin's config name (so that
# `hydra/launcher=submitit_slurm` gets the DDP settings); it lists every field, so Hydra's schema matching is moot.
warnings.filterwarnings("ignore", message="'hydra/launcher/submitit_slurm' is validated against ConfigStore schema")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return sweep.run_job(cfg, recipe.run)
    except LokiError as err:  # a single run (a sweep records the failure and goes on)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    argv = sweep.child_argv(sys.argv)  # a DDP child of a sweep job: run that one job, not the sweep
    if argv is not None:
        sys.argv = argv
    main()
