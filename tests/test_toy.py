"""The toy world and toy model: deterministic generation, valid schemas, bit-for-bit builds, the threshold."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from loki.toy.build import ToySettings, build_dir, cache_dir_of, ensure_built, ensure_world, load_toy_model, weights_sha256
from loki.toy.world import RELATIONS, generate_world, write_world

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


def test_build_is_bit_for_bit_from_the_seed(tmp_path):
    same_a = ensure_built({**MICRO, "cache_dir": tmp_path / "a"})[1]
    same_b = ensure_built({**MICRO, "cache_dir": tmp_path / "b"})[1]
    other = ensure_built({**MICRO, "seed": 1, "cache_dir": tmp_path / "a"})[1]
    assert same_a["weights_sha256"] == same_b["weights_sha256"]
    assert same_a["build_hash"] == same_b["build_hash"] != other["build_hash"]
    assert other["weights_sha256"] != same_a["weights_sha256"]
    # The cache is reused, and what loads is what was built.
    model, tokenizer = load_toy_model({**MICRO, "cache_dir": tmp_path / "a"})
    assert weights_sha256(model) == same_a["weights_sha256"]
    assert model.config.model_type == "qwen2" and model.config.hidden_size == MICRO["hidden_size"]
    assert tokenizer.chat_template and all(len(tokenizer(str(d))["input_ids"]) == 1 for d in range(1, 8))


def test_cache_layout_and_the_path_resolver(tmp_path):
    import loki.toy  # noqa: F401  (registers the ${toy:...} resolver)

    cfg = OmegaConf.create(
        {
            "paths": {"cache_dir": str(tmp_path)},
            "model": {"source": "toy", "cache_dir": "${paths.cache_dir}", **MICRO},
            "task": {"train": "${toy:rerank_train}", "beir": "${toy:beir}", "bench": "${toy:benchmark}"},
        }
    )
    root = build_dir(ToySettings.from_cfg(cfg.model), tmp_path)
    assert root.parent == tmp_path / "toy"
    assert Path(cfg.task.bench) == root / "world" / "benchmark.jsonl" and Path(cfg.task.bench).exists()
    assert (Path(cfg.task.beir) / "corpus.jsonl").exists() and Path(cfg.task.train).exists()
    assert not (root / "model").exists()  # paths alone never trigger the (slow) model build
    ensure_built(cfg.model)
    assert (root / "model" / "config.json").exists() and (root / "manifest.json").exists()
    assert ensure_world(ToySettings.from_cfg(cfg.model), tmp_path) == root / "world"


@pytest.mark.slow
def test_pretraining_teaches_a_small_toy_its_facts(tmp_path):
    """A 60-fact toy, 120 steps: well above chance. The full toy's >= 90 % is the next test."""
    settings = dict(MICRO, num_entities=10, vocab_size=400, hidden_size=64, intermediate_size=256,
                    num_attention_heads=4, num_key_value_heads=2, pretrain_steps=120, batch_size=32, lr=1e-2, warmup_steps=10)
    manifest = ensure_built({**settings, "cache_dir": tmp_path})[1]
    assert manifest["cloze_accuracy"] >= 0.6  # chance is 0.25; 0.75 when written
    assert manifest["graded_logprob"] > -1.1  # chance is log 1/4 = -1.39; about -0.92 with the product prose in the corpus


def test_the_default_toy_answers_90_percent_of_its_benchmark():
    """Reads the default build's manifest (built by `python -m loki.toy.build` or the first train.py run);
    building it here would take minutes, so a fresh cache skips."""
    manifest_path = build_dir(ToySettings(), cache_dir_of()) / "manifest.json"
    if not manifest_path.exists():
        pytest.skip(f"default toy not built yet ({manifest_path}); run `python -m loki.toy.build`")
    manifest = json.loads(manifest_path.read_text())
    assert manifest["cloze_accuracy"] >= 0.9


def test_the_model_config_matches_the_default_settings():
    # conf/model/toy.yaml and ToySettings' defaults must name the same toy (same build hash).
    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "toy.yaml")
    assert yaml.source == "toy"
    from_yaml = {f: yaml[f] for f in ToySettings.__dataclass_fields__}
    assert ToySettings(**from_yaml) == ToySettings()
