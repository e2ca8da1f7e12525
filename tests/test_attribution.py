"""The attribution stage: predict loop + writer + store vs direct `attribute`, DDP, resume, bad input, one CLI run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import loki.lightning.attribution as kva_stage
from loki import attribution as analysis_stage, plots
from loki.lightning.attribution import run_attribution
from loki.store import ScoreStore, shard_ids, stored_ids, write_shard
from loki.data.mmlu import answer_token_id, load_mmlu, mc_prompt_ids
from loki.errors import LokiError
from loki.kva import attribute
from loki.models import load_model_and_tokenizer
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "fixtures" / "mmlu" / "test.jsonl"
KVA = {"recipe": "paper", "steps": 2, "scope": "target", "objective": "prob", "times_activation": False, "target": "gold"}
DATA = {
    "source": "cais/mmlu",
    "path": str(FIXTURE),
    "split": "test",
    "subjects": None,
    "offset": 0,
    "per_subject": 50,
    "max_samples": None,
    "seed": 0,
    "prompt": "letter",
    "system_prompt": None,
}
CPU = {"accelerator": "cpu", "devices": 1}


@pytest.fixture(scope="module")
def tiny():
    """The `model=tiny` model (seeded random Qwen2 + local tokenizer), as attribute.py builds it."""
    model, tokenizer = load_model_and_tokenizer(compose_config("train", "model=tiny").model)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def rows():
    return load_mmlu(path=FIXTURE)


def _run(tiny, rows, out_dir, kva=KVA, **kwargs):
    model, tokenizer = tiny
    kwargs = {"batch_size": 4, "trainer_kwargs": CPU, "heatmap_q": None, "progress": False, **kwargs}
    return run_attribution(model, tokenizer, rows, out_dir=out_dir, model_name="tiny", kva=kva, data=DATA, **kwargs)


def _oracle(tiny, rows, kva=KVA):
    """One unpadded prompt at a time through `attribute` directly: no Lightning, no padding, no store."""
    model, tokenizer = tiny
    out = {}
    for row in rows:
        ids = torch.tensor([mc_prompt_ids(tokenizer, row)])
        targets = torch.tensor([answer_token_id(tokenizer, row)]) if kva["target"] == "gold" else None
        settings = {k: kva[k] for k in ("recipe", "steps", "scope", "objective", "times_activation")}
        out[row["id"]] = attribute(model, ids, targets=targets, **settings)[0]
    return out


@pytest.fixture(scope="module")
def full_run(tiny, rows, tmp_path_factory):
    """One uninterrupted single-process run over the fixture, shared by several tests."""
    out_dir = tmp_path_factory.mktemp("full")
    return _run(tiny, rows, out_dir)


def _assert_store_matches(store, expected: dict[str, torch.Tensor]):
    ids, scores = store.load()
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    for sample_id, score in zip(ids, scores):
        torch.testing.assert_close(score, expected[sample_id], rtol=1e-5, atol=1e-7)


def test_predict_loop_with_writer_equals_attribute(tiny, rows, full_run):
    store = full_run
    assert ScoreStore.exists(store.dir) and store.shape == (4, 64) and store.num_samples == len(rows)
    _assert_store_matches(store, _oracle(tiny, rows))
    assert store.ids() == [
        f"{s}/{i}" for s in ("astronomy", "elementary_mathematics", "high_school_chemistry") for i in range(4)
    ]
    meta = json.loads((store.dir / "meta.json").read_text())
    assert meta["kva"] == KVA and meta["data"]["path"] == str(FIXTURE) and meta["model"]["name"] == "tiny"
    assert len(meta["model"]["weights_fingerprint"]) == 64 and meta["shape"] == [4, 64]
    # Chunks cover every sample once, in ids() order, whatever the chunk size.
    chunks = list(store.iter_chunks(chunk_size=5))
    assert [c.shape[0] for c in chunks] == [5, 5, 2] and all(c.dtype == torch.float32 for c in chunks)
    torch.testing.assert_close(torch.cat(chunks), store.load()[1], rtol=0, atol=0)


def test_predicted_target_sequence_scope_and_activation(tiny, rows, tmp_path):
    kva = {"recipe": "paper", "steps": 2, "scope": "sequence", "objective": "logit", "times_activation": True, "target": "predicted"}
    store = _run(tiny, rows[:2], tmp_path, kva=kva, batch_size=2)
    _assert_store_matches(store, _oracle(tiny, rows[:2], kva))


def test_store_deduplicates_and_orders_naturally(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"shape": [2, 3], "model": {"name": "m"}}))
    value = {f"s/{i}": torch.full((2, 3), float(i)) for i in range(12)}
    write_shard(
        tmp_path,
        "rank0000-a-0-000000",
        ["s/10", "s/2", "s/0"],
        torch.stack([value["s/10"], value["s/2"], value["s/0"]]),
    )
    # A second rank repeating samples (DDP sampler padding) and a rerun rewriting one.
    write_shard(
        tmp_path,
        "rank0001-a-0-000000",
        ["s/1", "s/0", "s/11"],
        torch.stack([value["s/1"], value["s/0"], value["s/11"]]),
    )
    write_shard(tmp_path, "rank0001-b-0-000000", ["s/2"], value["s/2"][None])
    (tmp_path / "shards" / ".tmp-rank0000-c-0-000000.safetensors").write_bytes(b"partial write of a killed run")
    store = ScoreStore(tmp_path)
    assert store.ids() == ["s/0", "s/1", "s/2", "s/10", "s/11"] and store.num_samples == 5 and store.shape == (2, 3)
    ids, scores = store.load()
    assert scores[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0]
    assert not ScoreStore.exists(tmp_path)  # no complete.json: an interrupted store is not used for training


def test_resume_skips_finished_samples(tiny, rows, tmp_path, monkeypatch, full_run):
    class KillAfterFirstBatch(kva_stage.pl.Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        _run(tiny, rows, tmp_path, callbacks=[KillAfterFirstBatch()])
    finished = set(stored_ids(tmp_path))
    assert len(finished) == 4 and not ScoreStore.exists(tmp_path)

    scored: list[int] = []

    def counting_attribute(model, input_ids, *args, **kwargs):
        scored.append(input_ids.shape[0])
        return attribute(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(kva_stage, "attribute", counting_attribute)
    store = _run(tiny, rows, tmp_path)
    assert sum(scored) == len(rows) - 4  # finished samples are not recomputed
    assert ScoreStore.exists(tmp_path) and store.ids() == full_run.ids()
    _assert_store_matches(store, dict(zip(*full_run.load())))
    scored.clear()
    _run(tiny, rows, tmp_path)  # a finished store: nothing to do
    assert scored == []


def test_sigterm_stops_after_the_batch_in_flight_and_the_run_resumes(tiny, rows, tmp_path, full_run):
    """Lightning's predict loop only records a SIGTERM; the writer stops the run after saving that batch."""
    import signal

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class TermDuringFirstBatch(kva_stage.pl.Callback):
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 0:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only sets trainer.received_sigterm

    with pytest.raises(SIGTERMException):
        _run(tiny, rows, tmp_path, callbacks=[TermDuringFirstBatch()])
    assert len(set(stored_ids(tmp_path))) == 4 and not ScoreStore.exists(tmp_path)  # the batch in flight is kept
    store = _run(tiny, rows, tmp_path)
    _assert_store_matches(store, dict(zip(*full_run.load())))


def test_refuses_store_made_with_other_settings_or_model(tiny, rows, full_run):
    with pytest.raises(LokiError, match=r"other settings \(kva\.steps is 2 there but 5 now\)"):
        _run(tiny, rows, full_run.dir, kva={**KVA, "steps": 5})
    # The recipe is part of the store's identity: a `paper` store is never read as a `captum` one.
    captum = {**KVA, "recipe": "captum", "scope": None, "times_activation": None}
    with pytest.raises(LokiError, match=r"other settings \(kva\.(recipe is 'paper' there but 'captum'|scope is 'target' there but 'sequence')"):
        _run(tiny, rows, full_run.dir, kva=captum)
    other_model, tokenizer = load_model_and_tokenizer(
        OmegaConf.merge(compose_config("train", "model=tiny").model, {"seed": 1})
    )
    with pytest.raises(LokiError, match=r"another model \(model\.weights_fingerprint"):
        _run((other_model, tokenizer), rows, full_run.dir)


def test_prompt_too_long_and_empty_dataset_stop_before_model_work(tiny, rows, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("attribute() ran on bad input")

    monkeypatch.setattr(kva_stage, "attribute", must_not_run)
    model, tokenizer = tiny
    longest = max(rows, key=lambda r: len(mc_prompt_ids(tokenizer, r)))
    monkeypatch.setattr(model.config, "max_position_embeddings", len(mc_prompt_ids(tokenizer, longest)) - 1)
    with pytest.raises(LokiError, match=f"sample '{longest['id']}' has"):
        _run(tiny, rows, tmp_path / "long")
    with pytest.raises(LokiError, match="dataset is empty"):
        _run(tiny, [], tmp_path / "empty")
    assert not (tmp_path / "long").exists() and not (tmp_path / "empty").exists()


def test_non_finite_attribution_names_the_sample(tiny, rows, tmp_path, monkeypatch):
    def nan_for_second_row(model, input_ids, *args, **kwargs):
        scores = attribute(model, input_ids, *args, **kwargs)
        scores[1, 2, 3] = float("nan")
        return scores

    monkeypatch.setattr(kva_stage, "attribute", nan_for_second_row)
    _, tokenizer = tiny
    pair = rows[4:6]
    # run_attribution orders longest prompt first (ties by id): the NaN lands on the shorter one.
    second = min(pair, key=lambda r: (len(mc_prompt_ids(tokenizer, r)), [-ord(c) for c in r["id"]]))
    with pytest.raises(LokiError, match=f"sample '{second['id']}' is NaN or infinite"):
        _run(tiny, pair, tmp_path, batch_size=2)


def _cli(*overrides: str, cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "LOKI_CACHE": str(cache),
        "LOKI_LOG_DIR": str(cache / "logs"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, str(REPO / "attribute.py"), *overrides],
        cwd=cache,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_two_process_ddp_equals_one_process(tiny, rows, tmp_path, full_run):
    """The attribute.py smoke run, on 2 CPU processes: store, meta, heatmap; merged == the 1-process run."""
    result = _cli(
        f"data.path={FIXTURE}",
        "data.per_subject=50",
        "kva.recipe=paper",
        "kva.steps=2",
        "kva.target=gold",
        "kva.batch_size=4",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.accelerator=cpu",
        cache=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (out_dir,) = (tmp_path / "attribution" / "tiny").iterdir()  # the one store of these settings
    store = ScoreStore(out_dir)
    assert ScoreStore.exists(out_dir) and (out_dir / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out_dir / "meta.json").read_text())["kva"] == KVA
    assert "samples/s" in result.stdout + result.stderr
    shards = sorted((out_dir / "shards").glob("*.safetensors"))
    assert {s.name[:8] for s in shards} == {"rank0000", "rank0001"}  # both processes wrote their share
    written = [i for s in shards for i in shard_ids(s)]
    assert sorted(set(written)) == sorted(r["id"] for r in rows)  # every sample present
    assert store.ids() == full_run.ids()  # ... and counted exactly once
    _assert_store_matches(store, dict(zip(*full_run.load())))


def _compose(config: str, *overrides: str):
    from hydra import compose, initialize_config_dir

    import loki.recipe  # noqa: F401  registers the ${method:} resolver train.yaml uses

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config, overrides=list(overrides))


def test_model_that_cannot_load_stops_with_one_sentence(tmp_path):
    import attribute  # the entry point's run(), in-process

    cfg = _compose("attribute", "model=qwen0.5b", f"data.path={FIXTURE}", f"paths.cache_dir={tmp_path}")
    with pytest.raises(LokiError, match="Qwen/Qwen2.5-0.5B-Instruct") as err:
        attribute.run(cfg)
    assert "\n" not in str(err.value)


def test_train_and_attribute_compose_the_same_settings_and_store(tiny, tmp_path):
    """train.py's on-demand analysis and attribute.py compose the same kva/data groups: one store."""
    overrides = ["model=tiny", f"paths.cache_dir={tmp_path}", "data.max_samples=3", "kva.steps=1", "kva.heatmap_q=null"]
    train_cfg = _compose("train", *overrides, "task=tiny_rerank")
    attribute_cfg = _compose("attribute", *overrides)
    assert analysis_stage.default_store(train_cfg) == analysis_stage.default_store(attribute_cfg)
    store = analysis_stage.run(train_cfg, *tiny, trainer_kwargs=CPU, progress=False)
    assert store.dir == analysis_stage.default_store(attribute_cfg) and ScoreStore.exists(store.dir) and store.num_samples == 3
    meta = json.loads((store.dir / "meta.json").read_text())
    assert meta["kva"]["steps"] == 1 and meta["kva"]["recipe"] == "published"  # the configs' default
    # Precedence: conf/data/mmlu.yaml < the model config's attribution.data < the command line.
    assert meta["data"]["per_subject"] == 2 and meta["data"]["split"] == "test" and meta["data"]["max_samples"] == 3
    # Other settings, another store: never a silent reuse.
    other = _compose("train", *overrides, "task=tiny_rerank", "kva.recipe=paper")
    assert analysis_stage.default_store(other) != store.dir and analysis_stage.default_store(other).parent == store.dir.parent


def test_attribute_yaml_takes_data_defaults_from_the_model_config():
    tiny_cfg = _compose("attribute", "model=tiny")
    cli_cfg = _compose("attribute", "model=tiny", "data.per_subject=2")
    qwen_cfg = _compose("attribute", "model=qwen0.5b", "model.name=Qwen/Qwen2.5-0.5B-Instruct")
    assert tiny_cfg.data.path == "tests/fixtures/mmlu/test.jsonl" and tiny_cfg.data.per_subject == 2
    assert cli_cfg.data.per_subject == 2 and cli_cfg.data.path == "tests/fixtures/mmlu/test.jsonl"
    assert qwen_cfg.data.path is None and qwen_cfg.data.per_subject == 50 and qwen_cfg.data.source == "cais/mmlu"
    # A "/" in the name is one directory level, the same for both entry points.
    store = analysis_stage.default_store(qwen_cfg)
    assert store.parent.name == "Qwen--Qwen2.5-0.5B-Instruct" and store.name.startswith("published-target-")
    assert qwen_cfg.out_dir == "auto" and qwen_cfg.trainer.devices == 1


def _naive_layer_balanced(scores: torch.Tensor, q: float, highest: bool) -> list[list[int]]:
    """Oracle: per sample the k lowest (highest) rows; most frequent per layer; ties by mean, then index."""
    n, layers, rows = scores.shape
    k = int(q * rows)
    out = []
    for layer in range(layers):
        counts = [0] * rows
        for sample in range(n):
            values = scores[sample, layer].tolist()
            for j in sorted(range(rows), key=lambda j: (-values[j] if highest else values[j], j))[:k]:
                counts[j] += 1
        mean = scores[:, layer].mean(0).tolist()
        ranked = sorted(range(rows), key=lambda j: (-counts[j], -mean[j] if highest else mean[j], j))
        out.append(sorted(ranked[:k]))
    return out


def test_heatmap_shows_layer_balanced_selection_and_is_logged(full_run, tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    _, scores = full_run.load()
    for highest in (False, True):
        assert plots.selected_positions(full_run, 0.05, highest) == _naive_layer_balanced(scores, 0.05, highest)

    class RecordingWandb(WandbLogger):  # records instead of talking to W&B
        def __init__(self):
            self.images = []

        def log_image(self, key, images, **kwargs):
            self.images.append((key, images))

    fig = plots.selection_heatmap(full_run, 0.05, tmp_path / "heatmap.png")
    assert len(fig.axes) == 4 and (tmp_path / "heatmap.png").stat().st_size > 0  # 2 panels + 2 colorbars
    lowest = fig.axes[0].images[0].get_array()
    assert lowest.shape == (4, 64) and (lowest.sum(axis=1) == 3).all()  # k = floor(0.05 * 64) rows per layer
    logger = RecordingWandb()
    assert plots.log_figure(logger, fig, tmp_path / "heatmap.png")
    assert logger.images == [("attribution/heatmap", [str(tmp_path / "heatmap.png")])]


def test_run_leaves_the_callers_model_as_it_was(tiny, rows, tmp_path):
    model, _ = tiny
    model.train()
    try:
        _run(tiny, rows[:1], tmp_path, kva={**KVA, "steps": 1})
        assert model.training and all(p.requires_grad for p in model.parameters())
    finally:
        model.eval()
