"""BFCL on a local slice in bfcl-eval's format, scored by the package's own decoder and AST checker."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("bfcl_eval", reason="bfcl-eval not installed (see loki.eval.bfcl.INSTALL_HINT)")

from loki.eval import run_task_eval  # noqa: E402
from loki.eval.bfcl import check_response, entry_messages, load_category  # noqa: E402

SLICE = "tests/fixtures/bfcl"

# What the stub model answers to each question of the slice (matched on the user's text).
ANSWERS = {
    "What is the area of a circle with radius 3?": "[geometry.circle_area(radius=3.0)]",  # correct
    "Give me the tide times for Brixham on 2024-06-01.": '[get_tide_table(harbour="Dartmouth", date="2024-06-01")]',  # wrong value
    "Compute 6 factorial.": "[math_tools.factorial(n=6)]",  # correct
    "Areas of circles with radius 1 and radius 2, please.": "[geometry.circle_area(radius=2.0), geometry.circle_area(radius=1.0, units='cm')]",  # correct, any order
    "Compute 4 factorial and the area of a circle with radius 5.": "[math_tools.factorial(n=4), geometry.circle_area(radius=5.0)]",  # correct
    "Who painted the Mona Lisa?": "None of the given functions can answer that.",  # correct: no call
    "Translate 'good morning' into French.": "[math_tools.factorial(n=1)]",  # wrong: a call where none fits
}
EXPECTED = {"simple": 1 / 2, "multiple": 1.0, "parallel": 1.0, "parallel_multiple": 1.0, "irrelevance": 1 / 2}


class StubGenerator(torch.nn.Module):
    """`generate` appends the tokens of the canned answer for the question found in each prompt."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompts: list[str] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        rows = []
        for row in range(input_ids.shape[0]):
            prompt = self.tokenizer.decode(input_ids[row][attention_mask[row].bool()])
            self.prompts.append(prompt)
            answer = next(a for q, a in ANSWERS.items() if f"<|im_start|>user\n{q}<|im_end|>" in prompt)
            new = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(input_ids[row].tolist() + new)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def test_bfcl_slice_scores_correct_calls_and_rejects_wrong_ones(chat_tokenizer):
    cfg = OmegaConf.load("conf/task/toolace.yaml").eval
    cfg.data_dir = SLICE
    stub = StubGenerator(chat_tokenizer)
    got = run_task_eval(stub, chat_tokenizer, cfg)
    for category, acc in EXPECTED.items():
        assert got[f"bfcl/{category}/acc"] == pytest.approx(acc), category
    assert got["bfcl/overall/acc"] == pytest.approx(sum(EXPECTED.values()) / 5)
    assert got["bfcl/overall/acc_micro"] == pytest.approx(5 / 7)
    # The prompt is BFCL's own: its function-calling system prompt listing the functions, with its Python hint.
    assert len(stub.prompts) == 7
    assert all("[func_name1(params_name1=params_value1" in p and "Python 3 syntax" in p for p in stub.prompts)


def test_checker_verdicts_on_single_responses():
    entries, answers = load_category("simple", SLICE)
    entry, truth = entries[0], answers[0]
    assert check_response(entry, "[geometry.circle_area(radius=3.0, units='cm')]", truth, "simple")["valid"]
    assert not check_response(entry, "[geometry.circle_area(radius=4.0)]", truth, "simple")["valid"]
    assert not check_response(entry, "[geometry.circle_area(radius='3')]", truth, "simple")["valid"]  # wrong type
    assert not check_response(entry, "the area is 28.3", truth, "simple")["valid"]  # no call at all
    messages = entry_messages(entry)
    assert messages[0]["role"] == "system" and messages[-1]["content"].startswith("What is the area")


def test_unknown_category_names_the_setting():
    from loki.errors import LokiError

    with pytest.raises(LokiError, match="task.eval.categories"):
        load_category("no_such_category", SLICE)
