"""A real Hugging Face fast tokenizer made locally (no hub): byte-level BPE with a ChatML chat template.

Used by the `tiny` test model and the toy world. Digits are split one per token so that the reranker's
answer digits 1-7 are single tokens, as they are in Qwen's and Llama's vocabularies.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the format Qwen2.5 uses: <|im_start|>role\ncontent<|im_end|>\n per message.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_chat_tokenizer(texts: Iterable[str] = (), vocab_size: int = 0) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts` up to `vocab_size` (0: bytes only, no merges); deterministic."""
    pre = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size and vocab_size > len(alphabet) + len(SPECIAL_TOKENS):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
        )
        tok.train_from_iterator(list(texts), trainer=trainer)
    else:
        vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre
        tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHATML_TEMPLATE,
    )
    fast.padding_side = "left"  # generation-friendly default; loaders set what they need explicitly
    return fast


def single_token_ids(tokenizer, prompt: str, answers, what: str) -> list[int]:
    """Ids of each answer string as the model emits it right after `prompt`; each must be one token.

    Encoding `prompt + answer` (not the answer alone) is what matters: BPE merges across the boundary
    would otherwise make the scored id differ from the one the model produces."""
    from loki.errors import LokiError

    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = []
    for answer in answers:
        full = list(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
        if full[: len(prompt_ids)] != prompt_ids or len(full) != len(prompt_ids) + 1:
            raise LokiError(f"{what} '{answer}' is not a single token after this tokenizer's generation prompt.")
        ids.append(full[-1])
    return ids
