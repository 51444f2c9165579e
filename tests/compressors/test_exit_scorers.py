from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from ragzip.compressors.exit_scorers import (
    QUESTION,
    CausalLMScorer,
    label_token_ids,
    prompt_ids,
    render_prompt,
    user_message,
)

from ragzip.errors import InputError, UnsupportedModelError

TEXT = ("Ada Lovelace wrote the first program. She worked with Charles Babbage. "
        "The Analytical Engine was never built. Babbage designed it in London.")
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


def tiny_tokenizer(extra_words: list[str] | None = None) -> Any:
    """A word-level fast tokenizer whose vocabulary covers the test texts (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = re.findall(r"\w+|[^\w\s]", TEXT + " " + user_message("Who wrote the first program?", "", "") + " Yes No")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in [*words, "...", *(extra_words or [])]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A randomly initialised Gemma-family model and a random LoRA adapter for it, saved locally."""
    import torch

    peft = pytest.importorskip("peft")
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("exit")
    tokenizer = tiny_tokenizer()
    config = GemmaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    GemmaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    base = GemmaForCausalLM.from_pretrained(root / "base")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(base, lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def test_prompt_follows_exit_format_without_a_chat_template() -> None:
    tok = tiny_tokenizer()
    prompt = render_prompt(tok, user_message("Q?", "Title\nDoc.", "Doc."))
    assert prompt == ("<bos><start_of_turn>user\nQuery:\nQ?\nFull context:\nTitle\nDoc.\nSentence:\nDoc.\n"
                      f"{QUESTION}<end_of_turn>\n<start_of_turn>model\n")
    assert QUESTION == 'Is this sentence useful in answering the query? Answer only "Yes" or "No".'


def test_label_tokens_must_be_single_tokens() -> None:
    tok = tiny_tokenizer()
    yes, no = label_token_ids(tok)
    assert tok.convert_ids_to_tokens([yes, no]) == ["Yes", "No"]

    class Splitting:
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [1, 2] if text == "Yes" else [3]

    with pytest.raises(UnsupportedModelError, match="'Yes' is 2 tokens"):
        label_token_ids(Splitting())


def test_long_context_keeps_head_and_tail_never_the_query_or_sentence() -> None:
    tok = tiny_tokenizer()
    query, sentence = "Who wrote the first program?", "She worked with Charles Babbage."
    context = " ".join([TEXT] * 20)
    full = prompt_ids(tok, query, context, sentence, 10_000)
    ids = prompt_ids(tok, query, context, sentence, 120)
    assert len(full) > 120 >= len(ids)
    text = tok.decode(ids)
    assert "Query : Who wrote the first program ?" in text
    assert "Sentence : She worked with Charles Babbage ." in text
    kept = text.split("Full context :")[1].split("Sentence :")[0].strip()
    assert kept.startswith("Ada Lovelace wrote the first program") and kept.endswith("Babbage designed it in London .")
    assert "..." in kept
    with pytest.raises(InputError, match="never truncated"):
        prompt_ids(tok, query, context, " ".join([sentence] * 30), 120)


def test_peft_adapter_loads_and_changes_scores(tiny_gemma: tuple[Path, Path]) -> None:
    base_dir, adapter_dir = tiny_gemma
    docs = [("Ada", TEXT, [(0, 36), (37, 69)]), ("", "Babbage designed it in London.", [(0, 30)])]
    base = CausalLMScorer(str(base_dir), dtype="float32", batch_size=2)
    adapted = CausalLMScorer(str(base_dir), adapter=str(adapter_dir), dtype="float32", batch_size=2)
    query = "Who wrote the first program?"
    s_base, s_adapted = base.score(query, docs), adapted.score(query, docs)
    assert [len(s) for s in s_adapted] == [2, 1]
    assert all(0.0 < p < 1.0 for row in s_adapted for p in row)
    assert any(abs(a - b) > 1e-4 for ra, rb in zip(s_adapted, s_base) for a, b in zip(ra, rb))
    # Left padding with exact positions: a batch scores like one prompt at a time.
    one_by_one = CausalLMScorer(str(base_dir), adapter=str(adapter_dir), dtype="float32", batch_size=1)
    single = one_by_one.score(query, docs)
    assert all(abs(a - b) < 1e-4 for ra, rb in zip(s_adapted, single) for a, b in zip(ra, rb))


def test_causal_lm_scorer_through_the_compressor(tiny_gemma: tuple[Path, Path]) -> None:
    from ragzip.compressors.registry import get_compressor

    from ragzip.budget import Budget
    from ragzip.tokens import get_token_counter
    from ragzip.types import Document

    base_dir, adapter_dir = tiny_gemma
    comp = get_compressor("exit", counter=get_token_counter("whitespace"), scorer="causal-lm", model=str(base_dir),
                          adapter=str(adapter_dir), dtype="float32", batch_size="3", max_length="400")
    result = comp.compress("Who wrote the first program?", [Document("d", TEXT, title="Ada")], Budget.ratio(0.5))
    assert result.stages[0].info["scorer"] == "causal-lm"
    assert 0 < result.tokens_after <= Budget.ratio(0.5).token_limit(result.tokens_before)  # type: ignore[operator]
