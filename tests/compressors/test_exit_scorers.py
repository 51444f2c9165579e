from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from ragzip.compressors.exit_scorers import (
    QUESTION,
    CausalLMScorer,
    label_token_ids,
    prompt_ids,
    render_prompt,
    user_message,
)
from ragzip.errors import ConfigError, InputError, UnsupportedModelError

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
    import peft  # setup installs it (the exit extra): missing is a failure, not a skip
    import torch
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
    from ragzip.budget import Budget
    from ragzip.compressors.registry import get_compressor
    from ragzip.tokens import get_token_counter
    from ragzip.types import Document

    base_dir, adapter_dir = tiny_gemma
    comp = get_compressor("exit", counter=get_token_counter("whitespace"), scorer="causal-lm", model=str(base_dir),
                          adapter=str(adapter_dir), dtype="float32", batch_size="3", max_length="400")
    result = comp.compress("Who wrote the first program?", [Document("d", TEXT, title="Ada")], Budget.ratio(0.5))
    assert result.stages[0].info["scorer"] == "causal-lm"
    assert 0 < result.tokens_after <= Budget.ratio(0.5).token_limit(result.tokens_before)  # type: ignore[operator]


def test_fuse_scores_lifts_sentences_of_confident_documents_and_neighbours() -> None:
    from ragzip.compressors.exit_scorers import fuse_scores

    scores = [[0.9, 0.1, 0.0], [0.2, 0.2], []]
    assert fuse_scores(scores) == [[0.9, 0.1, 0.0], [0.2, 0.2], []]
    fused = fuse_scores(scores, doc_weight=0.5)
    assert fused[0] == pytest.approx([0.9, 0.5, 0.45]) and fused[1] == pytest.approx([0.2, 0.2])
    smooth = fuse_scores(scores, neighbor_weight=0.5)
    assert smooth[0] == pytest.approx([0.9, 0.45, 0.05]) and smooth[1] == pytest.approx([0.2, 0.2])
    with pytest.raises(ConfigError):
        fuse_scores(scores, doc_weight=1.5)


def test_length_batches_bound_padding_and_batch_size() -> None:
    from ragzip.compressors.exit_encoder import length_batches

    lengths = [60, 62, 64, 120, 125, 200, 201, 202, 203]
    batches = length_batches(lengths, 3, 0.1)
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert max(lengths[i] for i in b) * len(b) <= 1.1 * sum(lengths[i] for i in b)
    assert batches[0] == [0, 1, 2] and [3, 4] in batches
    assert length_batches([], 4, 0.1) == []


def test_shipped_encoder_bf16_and_batching_match_fp32_one_by_one() -> None:
    from ragzip.compressors.exit_encoder import load_scorer, score_documents

    docs = [("Paris", "Paris is the capital of France. It has many museums. The Louvre is in Paris.",
             [(0, 31), (32, 52), (53, 76)]),
            ("Rome", "The capital of Italy is Rome. Rome has the Colosseum.", [(0, 29), (30, 53)])]
    query = "What is the capital of France?"
    model, tok = load_scorer(dtype="float32")
    reference = [score_documents(model, tok, query, [d], batch_size=1).sentences[0] for d in docs]
    together = score_documents(model, tok, query, docs, batch_size=16, max_padding=1.0).sentences
    for ref, got in zip(reference, together):
        assert got == pytest.approx(ref, abs=1e-4)
    fast, _ = load_scorer(dtype="bfloat16")
    assert next(fast.parameters()).dtype == torch.bfloat16
    for ref, got in zip(reference, score_documents(fast, tok, query, docs).sentences):
        assert got == pytest.approx(ref, abs=0.05)
