from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_reader(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local path to a tiny random Llama with the packaged SmolLM2 tokenizer (real BPE and chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ragzip.registry import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    path = Path(tmp_path_factory.mktemp("tiny-reader"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOC_PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the README and the docs pages


@pytest.fixture(scope="session")
def readme_example() -> object:
    """`readme_example(name)`: the python block that follows `<!-- example: name -->` in the README or a docs page,
    as written (each name once)."""
    import re

    text = "\n".join(p.read_text(encoding="utf-8") for p in DOC_PAGES)

    def get(name: str) -> str:
        found = re.findall(rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)\n```", text, re.S)
        assert len(found) == 1, f"{len(found)} examples named {name!r} in the README and docs pages"
        return found[0]

    return get


WORDS = (
    "the a of in and to was is who what where when which river city born wrote novel author college educated "
    "capital country music album band played film directed by first largest island lake mountain king queen "
    "war year team won river's question answer documents using only reply with short few words no explanation"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)


def word_tokenizer() -> Any:
    """A word-level tokenizer over WORDS with a minimal chat template."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "system", "user", "assistant", ":", ".", ",", "?"])}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def word_llm() -> tuple[Any, Any]:
    """A tiny random 3-layer Llama and a word-level tokenizer with a chat template: (model, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), tokenizer
