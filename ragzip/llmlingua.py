"""A drop-in for `llmlingua.PromptCompressor`: the same constructor and `compress_prompt` call, the same result
keys, ragzip's compressors underneath.

Migrating is an import change::

    # from llmlingua import PromptCompressor
    from ragzip.llmlingua import PromptCompressor

    compressor = PromptCompressor()                      # or PromptCompressor(use_llmlingua2=True)
    res = compressor.compress_prompt(contexts, instruction="Answer briefly.", question="Where does the Rhine end?",
                                     rate=0.33)
    res["compressed_prompt"], res["origin_tokens"], res["compressed_tokens"], res["ratio"], res["rate"]
    res["ragzip"]                                        # provenance: kept spans per context, method, counts

What maps to what:

* `use_llmlingua2=True` is ragzip's `lingua2` (token pruning; `model_name` names its checkpoint, e.g.
  `microsoft/llmlingua-2-xlm-roberta-large-meetingbank`); like llmlingua it compresses the contexts only and ignores
  `instruction` and `question`.
* The default (LLMLingua / LongLLMLingua) is ragzip's best measured method for the question: `exit` (extractive
  sentence selection) when a question is given, `lingua2` when not. `method=` picks any ragzip method or pipeline.
  The prompt is `instruction`, the compressed contexts and `question`, joined by blank lines, as llmlingua joins it.
* Budgets are counted in tiktoken's `cl100k_base` (llmlingua counts in the same encoding; `tokenizer=` changes it).
  `rate` is the fraction of the whole prompt's tokens to keep and `target_token` the whole prompt's token cap;
  instruction and question are kept whole and paid from it first (llmlingua's arithmetic). Unlike llmlingua, the
  cap holds exactly: `compressed_tokens <= target_token` whenever the instruction and question fit in it.
* LLMLingua-1 tuning arguments (`iterative_size`, `condition_in_question`, `context_budget`, ...) belong to its
  perplexity algorithm; they are accepted and have no effect (a warning says which). Names llmlingua does not have
  raise TypeError, as they would there.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from ragzip.api import RagZip
from ragzip.budget import Budget
from ragzip.contract import DocumentLike, to_documents
from ragzip.errors import BudgetError
from ragzip.types import CONTEXT_SEPARATOR, Document

DEFAULT_TOKENIZER = "cl100k_base"
QUESTION_METHOD = "exit"  # the best measured method with a question (README: fidelity tables)
NO_QUESTION_METHOD = "lingua2"

# llmlingua 0.2.2 arguments of compress_prompt / compress_prompt_llmlingua2 that ragzip's methods have no use for.
_NO_EFFECT = frozenset({
    "iterative_size", "force_context_number", "use_sentence_level_filter", "use_token_level_filter", "keep_split",
    "keep_first_sentence", "keep_last_sentence", "keep_sentence_number", "high_priority_bonus", "context_budget",
    "token_budget_ratio", "condition_in_question", "reorder_context", "dynamic_context_compression_ratio",
    "condition_compare", "add_instruction", "rank_method", "concate_question", "context_segs",
    "context_segs_rate", "context_segs_compress", "target_context", "context_level_rate",
    "context_level_target_token", "return_word_label", "word_sep", "label_sep", "chunk_end_tokens",
    "strict_preserve_uncompressed",
})
# llmlingua-2 arguments with a ragzip lingua2 option of the same meaning.
_LINGUA2_OPTIONS = {"force_tokens": "force_tokens", "force_reserve_digit": "keep_digits",
                    "drop_consecutive": "drop_consecutive", "token_to_word": "word_prob"}


def _ratio_fields(origin: int, compressed: int) -> dict[str, Any]:
    """llmlingua's own summary strings, computed the same way (GPT-4 input at $0.06 / 1k tokens)."""
    ratio = 1 if compressed == 0 else origin / compressed
    return {"ratio": f"{ratio:.1f}x", "rate": f"{100 / ratio:.1f}%",
            "saving": f", Saving ${(origin - compressed) * 0.06 / 1000:.1f} in GPT-4."}


class PromptCompressor:
    """`llmlingua.PromptCompressor`'s interface over ragzip.

    Args:
        model_name: with `use_llmlingua2`, the token classifier (default: ragzip's packaged one); otherwise
            llmlingua's perplexity LLM, which ragzip does not use (a warning says so).
        device_map: "auto" (default: cuda when available, else cpu), "cpu", "cuda", "cuda:1", ...
        model_config, open_api_config, llmlingua2_config: accepted for compatibility; unused.
        use_llmlingua2: compress with `lingua2` (token pruning).
        method: any ragzip method or pipeline instead (overrides `use_llmlingua2`).
        tokenizer: what budgets and the reported token counts are counted in (default: cl100k_base).
        **options: options of the ragzip method.
    """

    def __init__(self, model_name: str | None = None, device_map: str = "auto", model_config: dict | None = None,
                 open_api_config: dict | None = None, use_llmlingua2: bool = False,
                 llmlingua2_config: dict | None = None, *, method: str | None = None,
                 tokenizer: str = DEFAULT_TOKENIZER, **options: Any) -> None:
        self.use_llmlingua2 = use_llmlingua2
        self.tokenizer = tokenizer
        self.device = device_map
        self._options = dict(options)
        if model_name is not None and method is None and not use_llmlingua2:
            warnings.warn(f"model_name={model_name!r} is llmlingua's perplexity LLM; ragzip's default methods use "
                          "their own scorers and ignore it (use_llmlingua2=True takes it as the lingua2 checkpoint)",
                          UserWarning, stacklevel=2)
        elif model_name is not None and (method or "lingua2") == "lingua2":
            self._options.setdefault("model", model_name)
        self._fixed_method = method or (NO_QUESTION_METHOD if use_llmlingua2 else None)
        self._compressors: dict[str, RagZip] = {}

    def _ragzip(self, method: str, extra: dict[str, Any]) -> RagZip:
        options = {**self._options, **extra}
        key = f"{method}|{sorted(options.items())!r}"
        if key not in self._compressors:
            self._compressors[key] = RagZip(method, tokenizer=self.tokenizer, device=self.device, **options)
        return self._compressors[key]

    def compress_prompt(self, context: str | Sequence[DocumentLike], instruction: str = "", question: str = "",
                        rate: float | None = None, target_token: float = -1,
                        force_context_ids: Sequence[int] | None = None, use_context_level_filter: bool | None = None,
                        **kwargs: Any) -> dict[str, Any]:
        """Compress `context` (a string or a list of strings / documents) for `question`.

        Returns:
            llmlingua's keys: `compressed_prompt`, `origin_tokens`, `compressed_tokens`, `ratio` ("3.0x"),
            `rate` ("33.3%"), `saving`, `compressed_prompt_list` (the kept text of each context that kept any),
            and `ragzip`: the CLI contract's `compressed` object (method, per-context spans, token counts).

        Raises:
            TypeError: an argument llmlingua's compress_prompt does not have.
            BudgetError: a rate outside (0, 1] with no target_token.
            InputError: a malformed context.
        """
        unknown = sorted(set(kwargs) - _NO_EFFECT - set(_LINGUA2_OPTIONS))
        if unknown:
            raise TypeError(f"compress_prompt() got unexpected keyword argument(s) {unknown}")
        ignored = sorted(set(kwargs) & _NO_EFFECT)
        if force_context_ids:
            ignored.append("force_context_ids")
        docs = to_documents([context] if isinstance(context, str) else context, where="context")
        lingua2_mode = self.use_llmlingua2 and self._fixed_method == NO_QUESTION_METHOD
        if lingua2_mode:  # compress_prompt_llmlingua2: the contexts only
            instruction, question = "", ""
        method = self._fixed_method or (QUESTION_METHOD if question.strip() else NO_QUESTION_METHOD)
        extra: dict[str, Any] = {}
        if method == "lingua2":
            extra = {_LINGUA2_OPTIONS[k]: v for k, v in kwargs.items() if k in _LINGUA2_OPTIONS}
            # llmlingua's compress_prompt filters whole contexts first by default; ragzip's reference mode does the
            # same, its exact mode selects across contexts by itself.
            reference = str(self._options.get("mode", "exact")) == "reference"
            if reference and use_context_level_filter is not False:
                extra["context_filter"] = True
            elif use_context_level_filter and not reference:
                ignored.append("use_context_level_filter")
        if ignored:
            warnings.warn(f"llmlingua argument(s) {ignored} have no effect in ragzip", UserWarning, stacklevel=2)
        rz = self._ragzip(method, extra)
        count = rz.counter.count
        head = [p for p in (instruction,) if p.strip()]
        tail = [p for p in (question,) if p.strip()]
        budget = self._context_budget(rz, docs, head + tail, rate, target_token)
        result = rz.compress(question or None, docs, budget)
        prompt = CONTEXT_SEPARATOR.join(head + ([result.text] if result.text.strip() else []) + tail)
        # Reported counts follow llmlingua's arithmetic: compress_prompt counts the whole prompt joined by blank
        # lines, stripped; compress_prompt_llmlingua2 sums the contexts' counts.
        kept = [d.text for d in result.documents if d.text]
        if lingua2_mode:  # compress_prompt_llmlingua2 sums the contexts' counts, before and after
            origin, compressed = sum(rz.counter.count_batch([d.text for d in docs])), sum(rz.counter.count_batch(kept))
        else:
            origin = count(CONTEXT_SEPARATOR.join([instruction, *(d.text for d in docs), question]).strip())
            compressed = count(prompt)
        return {"compressed_prompt": prompt, "compressed_prompt_list": kept,
                "origin_tokens": origin, "compressed_tokens": compressed, **_ratio_fields(origin, compressed),
                "ragzip": {**result.to_contract(), "tokenizer": rz.counter.name}}

    @staticmethod
    def _context_budget(rz: RagZip, docs: Sequence[Document], fixed: list[str], rate: float | None,
                        target_token: float) -> Budget:
        """The contexts' token cap: the whole prompt's (`target_token`, else `rate` of the whole prompt), less the
        instruction and question, which are kept whole (at least 1 token is left to the contexts). With neither,
        the method's default: `auto` for the calibrated methods, else llmlingua's rate 0.5."""
        fixed_text = sum(rz.counter.count_batch(fixed))
        fixed_tokens = fixed_text + len(fixed) * rz.counter.count(CONTEXT_SEPARATOR)
        if target_token is not None and target_token > 0:
            return Budget.tokens(max(1, int(target_token) - fixed_tokens))
        if rate is None:
            default = rz.compressor.default_budget()
            if default.is_auto:
                return default
            rate = 0.5
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 < rate <= 1:
            raise BudgetError(f"rate must be in (0, 1], got {rate!r} (llmlingua's rate is the fraction kept)")
        if not fixed:
            return Budget.ratio(float(rate))
        total = fixed_text + sum(rz.counter.count_batch([d.text for d in docs]))
        return Budget.tokens(max(1, int(total * rate) - fixed_tokens))


__all__ = ["PromptCompressor"]
