"""`python -m studies.frontier frontier=<name> [shard=i/n] [report_only=true] [publish=true] [restore=true]`: compose conf/frontier.yaml,
check it, run this process's share of the design, write the report (studies/frontier/run.py).
`export_point=<point id>` instead trains that point's run again and exports it at its alpha as a model."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from loki import schema

schema.register()  # the typed group schemas (paths/_schema ...), in Hydra's ConfigStore before the config is composed


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[2] / "conf"), config_name="frontier")
def main(cfg: DictConfig) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from loki import checks
    from loki.errors import LokiError
    from studies.frontier.run import FrontierConfig, main as run_frontier

    try:
        # Everything read now, while Hydra's run config resolves; then Hydra is cleared, because every run
        # composes train.yaml itself, which Hydra refuses inside a running app.
        with checks.located("frontier"):
            frontier = FrontierConfig(**OmegaConf.to_container(cfg.frontier, resolve=True))
        out = Path(str(cfg.out)).expanduser()
        shard, report_only = str(cfg.shard), checks.boolean("report_only", cfg.report_only)
        publish = checks.boolean("publish", cfg.publish)
        restore = checks.boolean("restore", cfg.restore)
        logger = None
        checks.one_of("logger", cfg.logger, ("none", "wandb"))
        if cfg.logger == "wandb":
            import wandb

            logger = wandb.init(project=str(cfg.wandb_project), name=f"frontier-{frontier.name}", config=OmegaConf.to_container(cfg.frontier, resolve=True))
        GlobalHydra.instance().clear()
        if cfg.get("export_point"):  # one point of the design trained again and exported as a model
            from studies.frontier.run import export_point

            metrics = export_point(frontier, out, str(cfg.export_point))
            print(f"frontier: point {cfg.export_point} exported to {metrics.get('export_dir')}")
            return
        run_frontier(frontier, out, shard, report_only, logger, publish, restore)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
