"""The chat template the data path renders with: the tokenizer's own, with one known fix.

Llama-3.1's template (and 3.2's and 3.3's, which share it) renders a tool turn with
`{%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}`.
A string is iterable in Jinja, so a ToolACE tool result, stored as the text `[{"name": ...}]`, is
JSON-encoded a second time and the model reads `"[{\"name\": ...}]"`. LLaMA-Factory's llama3 template,
which the LoKI authors trained with, inserts the observation text as it is. So for training data the
test is narrowed to non-string iterables: a string tool result goes in raw, a list or dict is still
JSON-encoded as the model's own template does. Any other template is used unchanged.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)

# The tool branch's test in Llama-3.1's template, verbatim, and the same test with strings left raw.
JSON_ENCODING_TOOL_TEST = "message.content is mapping or message.content is iterable"
RAW_STRING_TOOL_TEST = "message.content is mapping or (message.content is iterable and message.content is not string)"

# A ToolACE-shaped tool result: a JSON-encoding template shows it with escaped quotes.
PROBE_RESULT = '[{"name": "probe_tool", "results": {"ok": true}}]'
_PROBE = [
    {"role": "system", "content": "s"},
    {"role": "user", "content": "q"},
    {"role": "assistant", "content": "a"},
    {"role": "tool", "content": PROBE_RESULT},
]


def training_chat_template(tokenizer) -> str | None:
    """The template to render training conversations with, or None for the tokenizer's own unchanged.

    Not None only for a template with Llama-3.1's JSON-encoding tool branch: that template with string
    tool results inserted as raw text (checked by rendering a probe; if the check fails, the template is
    left as it is and a warning says so)."""
    try:
        template = tokenizer.get_chat_template()
    except (ValueError, TypeError):  # no template: apply_chat_template reports it where it is used
        return None
    if not isinstance(template, str) or JSON_ENCODING_TOOL_TEST not in template:
        return None
    fixed = template.replace(JSON_ENCODING_TOOL_TEST, RAW_STRING_TOOL_TEST)
    if renders_tool_results_raw(tokenizer, fixed):
        return fixed
    log.warning(
        "the chat template JSON-encodes string tool results and rewriting its tool branch did not stop it; "
        "tool turns are trained as the template renders them."
    )
    return None


def renders_tool_results_raw(tokenizer, template: str | None = None) -> bool:
    """Whether `template` (None: the tokenizer's own) puts a string tool result into the text unchanged."""
    try:
        text = tokenizer.apply_chat_template(_PROBE, chat_template=template, tokenize=False)
    except Exception:  # a template that refuses this conversation shape has no tool branch to judge
        return False
    return PROBE_RESULT in text and json.dumps(PROBE_RESULT) not in text
