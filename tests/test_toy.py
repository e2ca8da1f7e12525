"""The toy world and toy model: deterministic generation, valid schemas, the shipped reference weights
(checked, loaded without building), one small build of the build path, the random-ranking baseline.

Only `test_the_build_path_builds_a_small_toy` builds a toy (a MICRO one, seconds); everything else reads
the shipped reference in loki/toy/reference/."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from loki.errors import LokiError
from loki.toy.build import (
    REFERENCE_DIR,
    REFERENCE_WEIGHTS,
    ToySettings,
    build_dir,
    check_reference,
    ensure_built,
    ensure_world,
    file_sha256,
    load_toy_model,
    reference_manifest,
    weights_sha256,
)
from loki.toy.world import RELATIONS, generate_world, write_world
from tests.conftest import compose_config

TOY_YAML = Path(__file__).resolve().parents[1] / "conf" / "model" / "toy.yaml"

# A toy small enough to build in a few seconds: checks determinism and plumbing, not quality.
MICRO = dict(
    seed=0, num_entities=6, num_rerank_train=40, num_eval_queries=4, vocab_size=300, hidden_size=32,
    intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    max_position_embeddings=256, pretrain_steps=6, batch_size=8, warmup_steps=2, threads=1,
)
SMALL_WORLD = dict(num_entities=10, num_rerank_train=60, num_eval_queries=5)


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_world_files_are_a_function_of_the_seed(tmp_path):
    first = _files(write_world(generate_world(seed=3, **SMALL_WORLD), tmp_path / "a"))
    again = _files(write_world(generate_world(seed=3, **SMALL_WORLD), tmp_path / "b"))
    other = _files(write_world(generate_world(seed=4, **SMALL_WORLD), tmp_path / "c"))
    assert first == again
    assert set(first) == set(other)
    assert all(first[name] != other[name] for name in first)


def test_benchmark_rows_follow_the_mmlu_schema(tmp_path):
    from loki.data.mmlu import load_mmlu

    world = generate_world(seed=0, **SMALL_WORLD)
    directory = write_world(world, tmp_path)
    facts = {(f["entity"], f["relation"]): f["value"] for f in world.facts}
    assert len(world.benchmark) == len(facts) == 6 * SMALL_WORLD["num_entities"]
    for fact, row in zip(world.facts, world.benchmark):
        assert row["subject"] in RELATIONS and row["subject"] == fact["relation"]
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
        assert row["choices"][row["answer"]] == fact["value"]
        assert fact["entity"] in row["question"]
    rows = load_mmlu(path=directory / "benchmark.jsonl", per_subject=None)  # the project's own loader
    assert len(rows) == len(world.benchmark) and {r["subject"] for r in rows} == set(RELATIONS)


def test_reranker_rows_follow_the_lb_chat_schema(tmp_path):
    from loki.data.chat import to_messages

    world = generate_world(seed=0, **SMALL_WORLD)
    rows = _jsonl(write_world(world, tmp_path) / "rerank_train.jsonl")
    assert len(rows) == SMALL_WORLD["num_rerank_train"]
    scores = set()
    for row in rows:
        system, user, reply = row["conversations"]
        assert (system["from"], user["from"], reply["from"]) == ("system", "human", "gpt")
        # The LB reranker data's own system prompt, written out here: the toy must train on the real one.
        assert system["value"] == (
            "Given a query and a piece of text, output a score of 1-7 based on how related the query is to the "
            "text. 1 means least related and 7 is most related."
        )
        assert re.fullmatch(r"<<<Query>>>\n[^\n]+\n\n<<<Context>>>\n[^\n]+", user["value"])
        assert re.fullmatch(r"[1-7]", reply["value"])
        scores.add(reply["value"])
        assert [m["role"] for m in to_messages(row["conversations"])] == ["system", "user", "assistant"]
    assert len(scores) >= 5  # the match patterns are drawn uniformly: most scores occur even in 60 rows


def test_beir_set_is_readable_and_its_grades_follow_the_rule(tmp_path):
    from loki.data.beir import load_beir

    world = generate_world(seed=0, **SMALL_WORLD)
    directory = write_world(world, tmp_path) / "beir"
    assert (directory / "qrels" / "test.tsv").read_text().splitlines()[0] == "query-id\tcorpus-id\tscore"
    beir = load_beir(path=directory, split="test", candidates="all")  # the project's own loader
    assert len(beir.queries) == SMALL_WORLD["num_eval_queries"]
    assert set(beir.corpus) == {d["_id"] for d in world.corpus}
    from loki.toy.world import CATEGORIES, CONDITIONS

    queries = {q["_id"]: q["text"] for q in world.queries}
    for query_id, grades in beir.qrels.items():
        assert set(grades) <= set(beir.corpus)
        query_category = next(c for c in CATEGORIES if c in queries[query_id].split())
        for doc in world.corpus:
            # Read back from the texts: grade = relatedness - 1 = 3 * (same category) + condition index.
            doc_category = doc["title"].split()[-1]
            condition = doc["text"].rsplit("Condition: ", 1)[1].rstrip(".")
            expected = 3 * (doc_category == query_category) + CONDITIONS.index(condition)
            assert grades.get(doc["_id"], 0) == expected, (query_id, doc)


def test_number_questions_make_digits_answers_without_the_task():
    world = generate_world(seed=0, **SMALL_WORLD)
    answers = [a for _, a in world.number_qa]
    assert len(answers) == 8 * SMALL_WORLD["num_entities"] and set(answers) == {str(d) for d in range(1, 8)}
    for question, _ in world.number_qa:  # nothing of the reranking task: no query, no condition, no score
        assert not any(word in question for word in ("Query", "Context", "Condition", "related", "score"))
    # They come from their own generator: the rest of the world is what it was without them.
    assert generate_world(seed=0, number_questions_per_entity=0, **SMALL_WORLD).rerank_train == world.rerank_train


def test_the_build_path_builds_a_small_toy(tmp_path):
    """The one test that builds: a MICRO toy, twice (same machine, same weights), and a seed-1 one."""
    import loki.toy  # noqa: F401  (registers the ${toy:...} resolver)

    built = {**MICRO, "build": True}
    cfg = OmegaConf.create(
        {
            "paths": {"cache_dir": str(tmp_path / "a")},
            "model": {"source": "toy", "cache_dir": "${paths.cache_dir}", **built},
            "task": {"train": "${toy:rerank_train}", "beir": "${toy:beir}", "bench": "${toy:benchmark}", "model": "${toy:model}"},
        }
    )
    root = build_dir(ToySettings.from_cfg(cfg.model), tmp_path / "a")
    assert root.parent == tmp_path / "a" / "toy"
    assert Path(cfg.task.bench) == root / "world" / "benchmark.jsonl" and Path(cfg.task.bench).exists()
    assert (Path(cfg.task.beir) / "corpus.jsonl").exists() and Path(cfg.task.train).exists()
    assert Path(cfg.task.model) == root / "model" and not (root / "model").exists()  # paths never build
    same_a = ensure_built(cfg.model)[1]
    assert (root / "model" / "config.json").exists() and (root / "manifest.json").exists()
    assert ensure_world(ToySettings.from_cfg(cfg.model), tmp_path / "a") == root / "world"
    same_b = ensure_built({**built, "cache_dir": tmp_path / "b"})[1]
    other = ensure_built({**built, "seed": 1, "cache_dir": tmp_path / "a"})[1]
    # Same settings on the same machine and libraries: the same weights. Across CPUs they may differ.
    assert same_a["weights_sha256"] == same_b["weights_sha256"] != other["weights_sha256"]
    assert same_a["build_hash"] == same_b["build_hash"] != other["build_hash"]
    assert same_a["cpu_capability"] == __import__("torch").backends.cpu.get_cpu_capability()
    assert {"torch", "transformers", "tokenizers"} <= set(same_a)
    # The cache is reused, and what loads is what was built.
    model, tokenizer = load_toy_model(cfg.model)
    assert weights_sha256(model) == same_a["weights_sha256"]
    assert model.config.model_type == "qwen2" and model.config.hidden_size == MICRO["hidden_size"]
    assert tokenizer.chat_template and all(len(tokenizer(str(d))["input_ids"]) == 1 for d in range(1, 8))


def test_the_default_config_loads_the_shipped_reference_without_building(tmp_path):
    import loki.toy  # noqa: F401

    yaml = compose_config("train", "model=toy").model  # conf/model/toy.yaml on its schema
    assert yaml.build is False
    model_cfg = OmegaConf.merge(yaml, {"cache_dir": str(tmp_path), "benchmark": None, "attribution": None})
    manifest = reference_manifest()
    assert file_sha256(REFERENCE_DIR / REFERENCE_WEIGHTS) == yaml.reference_sha256 == manifest["files"][REFERENCE_WEIGHTS]
    assert {"cpu_capability", "torch", "transformers", "tokenizers", "safetensors"} <= set(manifest)
    model, tokenizer = load_toy_model(model_cfg)
    assert weights_sha256(model) == manifest["weights_sha256"]
    assert model.num_parameters() == manifest["parameters"] and len(tokenizer) == manifest["vocab_size"]
    root = build_dir(ToySettings.from_cfg(model_cfg), tmp_path)
    assert (root / "world" / "benchmark.jsonl").exists()  # the world is generated locally
    assert not (root / "model").exists() and not (root / "manifest.json").exists()  # nothing was built
    from loki.toy.paths import toy_path

    assert Path(toy_path("model", model_cfg)) == REFERENCE_DIR


def test_other_settings_need_the_build_option():
    with pytest.raises(LokiError, match=r"asks for another \(model\.seed=1\); pass model\.build=true"):
        load_toy_model({"seed": 1})
    with pytest.raises(LokiError, match=r"model\.reference_sha256 is 0+ but"):
        check_reference({"reference_sha256": "0" * 64})


def test_a_damaged_reference_is_refused(tmp_path):
    import shutil

    damaged = tmp_path / "reference"
    shutil.copytree(REFERENCE_DIR, damaged)
    check_reference(None, damaged)
    data = bytearray((damaged / REFERENCE_WEIGHTS).read_bytes())
    data[-1] ^= 1
    (damaged / REFERENCE_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(LokiError, match=r"the shipped toy's model\.safetensors has sha256 [0-9a-f]{64}, not"):
        check_reference(None, damaged)


def test_a_build_of_the_reference_settings_with_other_weights_warns():
    from loki.toy.build import _warn_if_not_reference

    reference = reference_manifest()
    _warn_if_not_reference(dict(reference))  # the same weights: silent
    with pytest.warns(UserWarning, match="gave other weights than the shipped reference"):
        _warn_if_not_reference({**reference, "weights_sha256": "0" * 64, "cpu_capability": "OTHER"})


def test_the_reference_toy_knows_its_facts_and_its_digits(tmp_path):
    """The shipped toy answers >= 90 % of its benchmark and its answer digits 1-7 are told apart."""
    import torch

    from loki.eval.retention import score_cloze

    assert reference_manifest()["cloze_accuracy"] >= 0.9
    model, tokenizer = load_toy_model({"cache_dir": tmp_path})
    world = generate_world(seed=0)
    assert score_cloze(model, tokenizer, world.benchmark, batch_size=128)["acc"] >= 0.9
    # Digits occur as answers in pretraining (number questions), so their tied embeddings are not one
    # point: without them the seven embeddings had pairwise cosine 0.97 and LoKI could not learn the task.
    ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(1, 8)]
    emb = torch.nn.functional.normalize(model.get_input_embeddings().weight[ids].detach(), dim=-1)
    cosine = emb @ emb.T
    assert cosine[~torch.eye(7, dtype=torch.bool)].mean() < 0.8


def test_the_model_config_matches_the_default_settings():
    # model=toy (conf/model/toy.yaml on its schema), ToySettings' defaults and the shipped reference must name the same toy.
    yaml = compose_config("train", "model=toy").model  # conf/model/toy.yaml on its schema
    assert yaml.source == "toy"
    from_yaml = {f: yaml[f] for f in ToySettings.__dataclass_fields__}
    assert ToySettings(**from_yaml) == ToySettings()
    assert reference_manifest()["build_hash"] == ToySettings().build_hash()


def test_random_ranking_baseline_is_exact(tmp_path):
    from loki.toy.baseline import expected_random_ndcg, random_ranking_metrics

    # By hand: 2 candidates with gains 2 and 0, NDCG@1: half the time 1, half 0.
    assert expected_random_ndcg({"q": ["a", "b"]}, {"q": {"a": 2}}, 1) == pytest.approx(0.5)
    directory = write_world(generate_world(seed=0, **SMALL_WORLD), tmp_path) / "beir"
    metrics = random_ranking_metrics({"path": str(directory), "candidates": "all", "ks": [1, 10]}, shuffles=300)
    assert metrics["ndcg@10"] == pytest.approx(metrics["ndcg@10_shuffled"], abs=0.02)
    assert metrics["ndcg@1"] == pytest.approx(metrics["ndcg@1_shuffled"], abs=0.04)
    assert 0 < metrics["ndcg@10"] < 1
