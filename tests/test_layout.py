"""The layout contract: the maths imports no Lightning/Hydra/OmegaConf, the public names stay importable,
every command answers --help, and the one rank helper reads every launcher's environment."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_the_maths_imports_no_lightning_hydra_or_omegaconf():
    # A fresh interpreter: this test process has Lightning loaded already.
    result = _python(
        "import sys\n"
        "import loki, loki.kva, loki.select, loki.implant, loki.positions, loki.store, loki.device, loki.prompts\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf')))\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_public_names_load_lazily_from_the_package():
    result = _python(
        "import sys\n"
        "from loki import attribute, select_positions, load_positions\n"
        "assert 'lightning' not in sys.modules\n"
        "from loki import LokiCallback, KVAModule\n"
        "import lightning.pytorch as pl\n"
        "assert issubclass(LokiCallback, pl.Callback) and issubclass(KVAModule, pl.LightningModule)\n"
        "import loki.kva, loki.select, loki.positions\n"
        "assert attribute is loki.kva.attribute and select_positions is loki.select.select_positions\n"
        "assert load_positions is loki.positions.load_positions\n"
        "print('ok')\n"
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    import loki

    with pytest.raises(AttributeError):
        loki.no_such_name  # noqa: B018


def test_public_signatures_are_kept():
    import loki.eval.reranker
    import loki.implant
    import loki.kva
    import loki.positions
    import loki.select

    def params(fn):
        return list(inspect.signature(fn).parameters)

    assert params(loki.kva.attribute)[:3] == ["model", "input_ids", "attention_mask"]
    assert {"targets", "steps", "scope", "objective", "times_activation", "recipe"} <= set(params(loki.kva.attribute))
    assert params(loki.select.select_positions)[:2] == ["scores", "q"]
    assert params(loki.positions.load_positions) == ["source"]
    assert params(loki.positions.validate_positions)[:3] == ["positions", "num_layers", "hidden_size"]
    assert params(loki.positions.rows_per_layer) == ["q", "hidden_size"]
    assert params(loki.implant.install)[:3] == ["model", "positions", "impl"]
    assert params(loki.implant.LokiDownProj)[:2] == ["linear", "row_index"]
    assert params(loki.eval.reranker.retrieval_metrics)[:3] == ["scores", "qrels", "ks"]  # then the optional per_query


COMMANDS = [
    [str(REPO / "train.py"), "--help"],
    [str(REPO / "attribute.py"), "--help"],
    ["-m", "loki.evaluate", "--help"],
    ["-m", "loki.study", "--help"],
    ["-m", "studies", "--help"],
    ["-m", "studies.frontier", "--help"],
    ["-m", "loki.select", "--help"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[-2] for c in COMMANDS])
def test_every_command_answers_help(command, tmp_path):
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower() or "== Config ==" in result.stdout or "Powered by Hydra" in result.stdout


@pytest.mark.parametrize(
    "env, rank",
    [
        ({}, 0),
        ({"RANK": "5", "LOCAL_RANK": "1"}, 5),  # torchrun: RANK is global
        ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, 1),  # Lightning's launcher on node 0
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, 4),  # node 1's first process is not rank 0
        ({"LOCAL_RANK": "2", "NODE_RANK": "1", "WORLD_SIZE": "8", "SLURM_NNODES": "2"}, 6),
        ({"SLURM_PROCID": "3"}, 3),
    ],
)
def test_global_rank_reads_every_launcher(env, rank, monkeypatch):
    from loki.device import global_rank, is_rank_zero

    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "SLURM_NNODES", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert global_rank() == rank and is_rank_zero() == (rank == 0)


def test_pad_batch_both_sides_with_labels():
    import torch

    from loki.device import pad_batch

    ids, mask, labels = pad_batch([[1, 2, 3], [4]], pad_id=0, side="left", fill=[[7, 8, 9], [6]])
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert labels.tolist() == [[7, 8, 9], [-100, -100, 6]]
    ids, mask = pad_batch([[1], [2, 3]], pad_id=9)
    assert ids.tolist() == [[1, 9], [2, 3]] and mask.dtype == torch.long and mask.tolist() == [[1, 0], [1, 1]]
