"""`python -m studies [study=<name>] [overrides...]`: compose conf/study.yaml, check it, run the study."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from loki import schema

schema.register()  # the typed group schemas (paths/_schema ...), in Hydra's ConfigStore before the config is composed


# an absolute path: `python -m studies` and `python -m loki.study` both call this from another module
@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parents[1] / "conf"), config_name="study")
def main(cfg: DictConfig) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from loki.errors import LokiError
    from studies.config import from_hydra

    try:
        # Everything read now, while Hydra's run config resolves; then Hydra is cleared, because every arm
        # composes train.yaml itself (studies.arms.compose_train), which Hydra refuses inside a running app.
        study = from_hydra(cfg)
        GlobalHydra.instance().clear()
        if study.kind == "toy":
            from studies import toy

            toy.run(study)
        else:
            from studies import real

            real.run(study)
    except LokiError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
