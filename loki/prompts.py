"""Every prompt format the project uses, defined once: MMLU (lettered and cloze) and the LB reranker.

Each function returns chat messages or text; tokenising is the caller's business. The format names are
recorded in attribution metadata, so a store is never reused across a prompt change: bump the name when
the text changes.
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------- MMLU

LETTERS = "ABCD"
INSTRUCTION = "Answer with the letter of the correct option."
LETTER_PROMPT_FORMAT = "mmlu-zero-shot-lettered-v1"
CLOZE_PROMPT_FORMAT = "mmlu-zero-shot-cloze-chat-v1"


def mc_messages(example: dict, with_system: str | None = None) -> list[dict]:
    """The zero-shot lettered multiple-choice prompt as chat messages (optionally after a system message)."""
    subject = str(example.get("subject", "")).replace("_", " ").strip()
    header = f"The following is a multiple choice question about {subject}.\n\n" if subject else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, example["choices"]))
    messages = [{"role": "system", "content": with_system}] if with_system else []
    messages.append({"role": "user", "content": f"{header}{example['question']}\n{options}\n{INSTRUCTION}"})
    return messages


def cloze_context(tokenizer, example: dict, chat_template: bool = True) -> tuple[str, str]:
    """(context text, separator before each choice): the question in a user turn with the generation
    prompt, or lm-eval's plain "Question: ...\\nAnswer:" with a space before the choice."""
    if chat_template:
        messages = [{"role": "user", "content": str(example["question"])}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), ""
    return f"Question: {example['question']}\nAnswer:", " "


# ------------------------------------------------------------------------------------- LB reranker

# The system prompt of the LB reranker data (lightblue/reranker_continuous_filt_max7_train).
RERANKER_SYSTEM_PROMPT = (
    "Given a query and a piece of text, output a score of 1-7 based on how related the query is to the text. "
    "1 means least related and 7 is most related."
)
DIGITS = "1234567"  # the answers the reranker may give; its score is the expectation over them


def reranker_user_turn(query: str, text: str) -> str:
    return f"<<<Query>>>\n{query}\n\n<<<Context>>>\n{text}"


def reranker_messages(query: str, text: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": RERANKER_SYSTEM_PROMPT},
        {"role": "user", "content": reranker_user_turn(query, text)},
    ]
