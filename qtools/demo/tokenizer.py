"""A small byte-level BPE tokenizer with a Qwen3-style ChatML chat template.

Byte-level so decode(encode(text)) == text for any text, JSON included. The
template renders tool calls as `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`
and names `tool_call.name`, so mlx-lm infers its `json_tools` parser; we also
set `tool_parser_type` explicitly.
"""

import json
import os
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .data import corpus_texts
from .tasks import get_task

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]  # not "special": decode keeps them
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:"
    "{% for tool in tools %} {{ tool.function.name if tool.function is defined else tool.name }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% if message.tool_calls %}{% for tool_call in message.tool_calls %}"
    "{% if tool_call.function is defined %}{% set tool_call = tool_call.function %}{% endif %}"
    "<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": "
    "{{ tool_call.arguments | tojson if tool_call.arguments is mapping else tool_call.arguments }}}\n</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size=None, texts=None, task="demo"):
    """Train the BPE on a task's corpus (vocab_size: the task's); deterministic for a given corpus."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    vocab_size = get_task(task).vocab_size if vocab_size is None else vocab_size
    texts = corpus_texts(task) if texts is None else texts
    tok = Tokenizer(models.BPE())
    # GPT-2 style word split (newlines are their own pieces, so no token spans
    # the end of a prompt): a word is the same token whatever precedes it,
    # which the fine-tune needs to generalise from objects.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return tok


def save_tokenizer(tok, path):
    """Write tokenizer.json + tokenizer_config.json; return the special ids."""
    path = Path(path)
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "tool_parser_type": "json_tools",
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=2)
    return {
        "eos_token_id": tok.token_to_id(EOS_TOKEN),
        "pad_token_id": tok.token_to_id(PAD_TOKEN),
        "vocab_size": tok.get_vocab_size(),
    }
