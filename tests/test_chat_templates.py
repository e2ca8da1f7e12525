"""ToolACE tool results under Llama-3.1's chat template: inserted as raw text, as LLaMA-Factory's llama3
template (which the LoKI authors trained with) inserts an observation, not JSON-encoded a second time.

The template below is an excerpt of Llama-3.1-8B-Instruct's `chat_template`, verbatim except for the
tool-definition and `tool_calls` branches, which ToolACE's plain-text turns never reach. Its tool branch
tests `is mapping or is iterable`, which a string passes, so the model's own template turns a tool result
`[{"name": ...}]` into `"[{\\"name\\": ...}]"`.
"""

from __future__ import annotations

import json

import pytest

from loki.data.chat import (
    IGNORE_INDEX,
    ChatSFTDataModule,
    renders_tool_results_raw,
    tokenizer_fingerprint,
    training_chat_template,
)

LLAMA31_EXCERPT = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

SYSTEM = "You are an expert in composing functions. Here is a list of functions: [{\"name\": \"Get Tides\"}]"
CALL = '[Get Tides(harbour="Brixham", date="2024-06-01")]'
RESULT = '[{"name": "Get Tides", "results": {"high": ["05:12", "17:40"], "note": "spring tide"}}]'
ANSWER = "High tide in Brixham is at 05:12 and 17:40."


@pytest.fixture
def llama_tokenizer():
    """The byte-level test tokenizer with Llama-3's header and end-of-turn tokens and the template excerpt."""
    from loki.tokenizer import build_chat_tokenizer

    tokenizer = build_chat_tokenizer()
    tokenizer.add_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    tokenizer.chat_template = LLAMA31_EXCERPT
    return tokenizer


def toolace_row(tool_speaker: str = "tool") -> dict:
    return {
        "system": SYSTEM,
        "conversations": [
            {"from": "user", "value": "When are the tides in Brixham on 2024-06-01?"},
            {"from": "assistant", "value": CALL},
            {"from": tool_speaker, "value": RESULT},
            {"from": "assistant", "value": ANSWER},
        ],
    }


def expected_text(result_text: str) -> str:
    """The conversation written out by hand in Llama-3's layout, the tool turn as LLaMA-Factory's llama3
    observation slot writes it: `<|start_header_id|>ipython<|end_header_id|>\\n\\n{{content}}<|eot_id|>`."""
    return (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" + SYSTEM + "<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhen are the tides in Brixham on 2024-06-01?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + CALL + "<|eot_id|>"
        "<|start_header_id|>ipython<|end_header_id|>\n\n" + result_text + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER + "<|eot_id|>"
    )


def test_the_excerpt_json_encodes_a_string_tool_result(llama_tokenizer):
    # The defect itself, on the model's own template: the result arrives as a JSON string literal.
    from loki.data.chat import to_messages

    row = toolace_row()
    messages = to_messages(row["conversations"], row["system"])
    assert llama_tokenizer.apply_chat_template(messages, tokenize=False) == expected_text(json.dumps(RESULT))
    assert not renders_tool_results_raw(llama_tokenizer)


@pytest.mark.parametrize("tool_speaker", ["tool", "observation"])  # ToolACE's name and LLaMA-Factory's
def test_toolace_tool_results_are_trained_on_as_raw_text(llama_tokenizer, tmp_path, tool_speaker):
    file = tmp_path / "toolace.json"
    file.write_text(json.dumps([toolace_row(tool_speaker)]))
    role_map = {"user": "user", "assistant": "assistant", tool_speaker: "tool"}
    dm = ChatSFTDataModule(
        llama_tokenizer, path=str(file), system_column="system", role_map=role_map, max_length=4096, cache_dir=str(tmp_path)
    )
    dm.setup()
    example = dm.train_examples[0]
    text = llama_tokenizer.decode(example["input_ids"])
    assert text == expected_text(RESULT)
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n" + RESULT + "<|eot_id|>" in text
    assert json.dumps(RESULT) not in text and '\\"name\\"' not in text  # no JSON-escaped copy anywhere
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert llama_tokenizer.decode(trained) == CALL + "<|eot_id|>" + ANSWER + "<|eot_id|>"  # the tool turn is not trained


def test_only_strings_change_and_only_in_a_llama_style_template(llama_tokenizer, chat_tokenizer):
    fixed = training_chat_template(llama_tokenizer)
    assert fixed is not None and fixed != LLAMA31_EXCERPT and renders_tool_results_raw(llama_tokenizer, fixed)
    # a list or dict tool result is still JSON-encoded, as the model's own template does it
    structured = [{"role": "system", "content": "s"}, {"role": "tool", "content": [{"name": "f", "results": 1}]}]
    assert (
        llama_tokenizer.apply_chat_template(structured, chat_template=fixed, tokenize=False)
        == llama_tokenizer.apply_chat_template(structured, tokenize=False)
    )
    assert '[{"name": "f", "results": 1}]' in llama_tokenizer.apply_chat_template(structured, chat_template=fixed, tokenize=False)
    # the tokens differ, so the cache key does; a template that already inserts raw text is used unchanged
    assert tokenizer_fingerprint(llama_tokenizer, fixed) != tokenizer_fingerprint(llama_tokenizer)
    assert training_chat_template(chat_tokenizer) is None and renders_tool_results_raw(chat_tokenizer)
