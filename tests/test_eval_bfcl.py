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
    # Java and JavaScript: decoded and checked in their own syntax.
    "Create the GIS presentation with controller mapController in the composite mapArea.": "[GeometryPresentation.createPresentation(controller=mapController, parent=mapArea)]",  # correct
    "Validate the form field userInputField now that typing is finished.": "[validateUserInput(inputField='userInputField', isComplete=true)]",  # correct
    # Live categories.
    "Details for user 7890, special request black.": "[get_user_info(user_id=7890, special='black')]",  # correct
    "Details for user 42, please.": "[get_user_info(user_id='42')]",  # wrong type
    "What is 5 factorial?": "[math_tools.factorial(n=5)]",  # correct
    "Circle areas for radius 3 and radius 4.": "[geometry.circle_area(radius=3.0)]",  # wrong: one call of two
    "3 factorial and the area of a circle of radius 6.": "[math_tools.factorial(n=3), geometry.circle_area(radius=6.0)]",  # correct
    "What is the capital of Peru?": "I cannot answer that with these tools.",  # correct: no call
    "I need the area of some circle, any will do.": "[geometry.circle_area(radius=1.0)]",  # correct: a call (relevance)
    "Tell me about circles and their areas.": "Circles are round.",  # wrong: relevance wants a call
}
EXPECTED = {
    "simple_python": 1 / 2, "simple_java": 1.0, "simple_javascript": 1.0, "multiple": 1.0, "parallel": 1.0,
    "parallel_multiple": 1.0, "irrelevance": 1 / 2, "live_simple": 1 / 2, "live_multiple": 1.0, "live_parallel": 0.0,
    "live_parallel_multiple": 1.0, "live_irrelevance": 1.0, "live_relevance": 1 / 2,
}
# The leaderboard's columns (bfcl-eval's generate_leaderboard_csv), by hand:
#   non-live = mean(simple = mean(1/2, 1, 1) = 5/6, multiple 1, parallel 1, parallel_multiple 1) = 23/24
#   live = count-weighted: (2 * 1/2 + 1 * 1 + 1 * 0 + 1 * 1) / 5 = 3/5
#   irrelevance = mean(1/2, 1) = 3/4; relevance = 1/2; overall = mean(non-live, live, irrelevance)
AGGREGATES = {
    "bfcl/non_live/acc": 23 / 24,
    "bfcl/live/acc": 3 / 5,
    "bfcl/hallucination/irrelevance_acc": 3 / 4,
    "bfcl/hallucination/relevance_acc": 1 / 2,
    "bfcl/overall/acc": (23 / 24 + 3 / 5 + 3 / 4) / 3,
    "bfcl/core5/acc": (1 / 2 + 1 + 1 + 1 + 1 / 2) / 5,  # simple, multiple, parallel, parallel_multiple, irrelevance
    "bfcl/overall/acc_micro": 12 / 17,  # 17 entries, 12 right
}


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
    for key, value in AGGREGATES.items():
        assert got[key] == pytest.approx(value), key
    # The prompt is BFCL's own: its function-calling system prompt listing the functions, with its language hint.
    assert len(stub.prompts) == 17
    assert all("[func_name1(params_name1=params_value1" in p for p in stub.prompts)
    assert sum("Python 3 syntax" in p for p in stub.prompts) == 15  # all but the Java and JavaScript entries


def test_a_subset_of_categories_aggregates_what_ran(chat_tokenizer):
    cfg = OmegaConf.load("conf/task/toolace.yaml").eval
    cfg.data_dir, cfg.categories = SLICE, ["simple", "multiple", "parallel", "parallel_multiple", "irrelevance"]
    got = run_task_eval(StubGenerator(chat_tokenizer), chat_tokenizer, cfg)
    assert got["bfcl/simple/acc"] == pytest.approx(1 / 2)
    assert got["bfcl/core5/acc"] == pytest.approx(4 / 5)
    # non-live over what ran: mean(simple 1/2, 1, 1, 1) = 7/8; irrelevance 1/2; no live column.
    assert got["bfcl/non_live/acc"] == pytest.approx(7 / 8) and "bfcl/live/acc" not in got
    assert got["bfcl/overall/acc"] == pytest.approx((7 / 8 + 1 / 2) / 2)
    assert got["bfcl/overall/acc_micro"] == pytest.approx(5 / 7)


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
