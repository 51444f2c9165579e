"""EXIT-style extractive compression: keep the sentences of each document that help answer the query.

Each document is split into sentences (the title is context, never a candidate); a scorer gives every sentence a
probability of being useful *in the context of its own document* (and, with a document head, every document a
probability of being needed). Multi-hop (``hops=2``): a second pass scores the other documents again for the
question expanded with the best evidence of the first pass (the top document's best sentence), so a bridge
document that shares no words with the question but names the evidence's entity becomes relevant; each score is
the better of its two passes. Sentence scores can be blended with their document's score (``doc_weight``), a kept
sentence that opens with a pronoun or a connective can bring its predecessor (``keep_antecedents``), and sentences
pass a threshold (threshold mode) or the best ones fill a token budget (budget mode), in original order. Documents
with nothing kept are dropped; kept sentences are joined by a space inside a document, and documents by a blank
line (`CompressionResult.text`).

Example:
    >>> from ragzip.budget import Budget
    >>> from ragzip.compressors.exit import ExitCompressor
    >>> exit_ = ExitCompressor()                       # the trained one-pass encoder scorer
    >>> result = exit_.compress("Who founded X?", documents, Budget.ratio(1 / 3))
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from ragzip.budget import Budget
from ragzip.compressors.base import (
    BaseCompressor,
    CompressionRequest,
    PrefetchMemo,
    joined_tokens,
    parsed_requests,
    separator_tokens,
)
from ragzip.compressors.calibration import auto_select
from ragzip.compressors.exit_scorers import CausalLMScorer, EncoderScorer, SentenceScorer, fuse_scores
from ragzip.errors import ConfigError
from ragzip.options import bounds
from ragzip.spans import assemble
from ragzip.text import split_sentences
from ragzip.tokens import TokenCounter, get_token_counter
from ragzip.types import CompressedDocument, Document

# Chosen on the tuning questions (10 HotpotQA + 10 MuSiQue, never trained on; see the README's EXIT section): the
# document blend, the second pass and the antecedent rule did not win there, so all are off by default.
DEFAULT_DOC_WEIGHT = 0.0
DEFAULT_NEIGHBOR_WEIGHT = 0.0
DEFAULT_HOPS = 1
DEFAULT_THRESHOLD = 0.5  # threshold mode's cut-off on the raw sentence probability

# A sentence that opens like this leans on the one before it ("He was born...", "However, ...").
_ANAPHORIC = re.compile(r"^[\"'(\[]*(he|she|it|its|they|them|their|his|her|hers|this|these|that|those|such|there|"
                        r"however|but|and|also|moreover|furthermore|therefore|thus|then|in addition|as a result|"
                        r"the (former|latter|same))\b", re.IGNORECASE)


def leans_on_predecessor(sentence: str) -> bool:
    """True when `sentence` opens with a pronoun or a connective, so it reads wrong without the sentence before."""
    return bool(_ANAPHORIC.match(sentence))


def expand_query(query: str, title: str, evidence: str) -> str:
    """The second pass's query: the question followed by the first pass's best evidence (and its document title).

    Shared with the training script, which builds the second-hop training inputs the same way.
    """
    head = f"{title}: " if title else ""
    return f"{query} {head}{evidence}"


class ScorerKind(str, Enum):
    """Which sentence scorer backs the compressor."""

    ENCODER = "encoder"
    CAUSAL_LM = "causal-lm"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One candidate sentence: document index, sentence index, char span in the document text, score."""

    doc: int
    index: int
    start: int
    end: int
    score: float


# A line that is structure, not prose: a table row, a list item, JSON / code (brackets, quoted keys, indentation,
# a trailing comma, colon or semicolon).
_STRUCTURED_LINE = re.compile(r"^\s*(\||[-*+\u2022]\s|\d+[.)]\s|[{}\[\]\"]|#)|^\s{2,}\S|[,:;{(\[]\s*$")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}")


def candidate_spans(doc: Document) -> list[tuple[int, int]]:
    """Char spans of the candidate units of `doc.text` (never the title), whitespace trimmed, in order: its
    sentences, except that a multi-line "sentence" made of structure (a table, a list, a JSON or code block) is
    split into its lines, so a table's answer row or a JSON block's key can be kept without the whole block."""
    if not doc.text.strip():
        return []
    out: list[tuple[int, int]] = []
    for a, b in split_sentences(doc.text):
        lines = [(a + m.start(), a + m.end()) for m in re.finditer(r"[^\n]*\S[^\n]*", doc.text[a:b])]
        structured = sum(1 for x, y in lines if _STRUCTURED_LINE.search(doc.text[x:y]))
        if len(lines) >= 2 and structured >= 0.6 * len(lines):
            out.extend((x + len(doc.text[x:y]) - len(doc.text[x:y].lstrip()), y) for x, y in lines)
        else:
            out.append((a, b))
    return out


def table_header(text: str, spans: Sequence[tuple[int, int]], index: int) -> list[int]:
    """For a table row (a line starting with '|'), the indices of its table's header line and rule line (the
    lines a row cannot be read without), else []."""
    def is_row(i: int) -> bool:
        return text[spans[i][0]:spans[i][1]].lstrip().startswith("|")

    def adjacent(i: int) -> bool:  # candidate i - 1 ends on the line just before candidate i starts
        return text.count("\n", spans[i - 1][1], spans[i][0]) == 1

    if not is_row(index):
        return []
    first = index
    while first > 0 and is_row(first - 1) and adjacent(first):
        first -= 1
    header = [first]
    if first + 1 < len(spans) and _TABLE_RULE.match(text[spans[first + 1][0]:spans[first + 1][1]]):
        header.append(first + 1)
    return [i for i in header if i != index and i < index]


# One scorer input document under a query: (query, title, text, candidate spans).
_DocKey = tuple[str, str, str, tuple[tuple[int, int], ...]]
# The scores `prefetched` computed for the requests of a batch: per (query, document) its sentence probabilities and
# document probability. A document's scores depend only on the query and the document itself (its own encoder
# windows), so a memo hit is what a fresh forward gives.
_PREFETCHED = PrefetchMemo("exit_prefetched")


def _doc_key(query: str, title: str, text: str, spans: Sequence[tuple[int, int]]) -> _DocKey:
    return query, title, text, tuple((int(a), int(b)) for a, b in spans)


def _adapter(value: Any, name: str) -> str | None:
    return None if value in (None, "", "none") else str(value)


@dataclass(frozen=True, slots=True)
class ExitOptions:
    """Settings of an `ExitCompressor` (see its docstring); strings from the CLI are parsed."""

    scorer: ScorerKind = ScorerKind.ENCODER
    model: str | None = None
    adapter: str | None = field(default=None, metadata={"parse": _adapter})
    weights: str | None = None
    threshold: float | None = None
    doc_weight: float = field(default=DEFAULT_DOC_WEIGHT, metadata=bounds(low=0.0, high=1.0))
    neighbor_weight: float = field(default=DEFAULT_NEIGHBOR_WEIGHT, metadata=bounds(low=0.0, high=1.0))
    hops: int = field(default=DEFAULT_HOPS, metadata=bounds(low=1, high=2))
    keep_antecedents: bool = False
    min_keep: int = field(default=1, metadata=bounds(low=0))
    batch_size: int | None = field(default=None, metadata=bounds(low=1))
    max_length: int | None = field(default=None, metadata=bounds(low=16))
    dtype: str = "auto"
    device: str = "auto"


class ExitCompressor(BaseCompressor):
    """Context-aware extractive sentence selection with a trained encoder or a causal-LM Yes/No scorer.

    All options accept strings (as the CLI passes them).

    Args:
        counter: token counter for budgets and statistics (default: the local LLM's tokenizer).
        scorer: "encoder" (default; one forward per query-document pair), "causal-lm" (EXIT's judge), or a
            ready `SentenceScorer` object.
        model: causal LM for the "causal-lm" scorer: alias, path or hub name (default: the embedded SmolLM2,
            zero-shot); "exit-gemma-2b" loads the published EXIT release (gemma-2b-it + LoRA) where available.
        adapter: a PEFT adapter applied on top of `model`.
        weights: encoder-scorer weights folder (default: the weights shipped in the package).
        threshold: a default budget of threshold mode: keep sentences scoring at least this when a call gives no
            budget (default None: the calibrated `auto` budget; `Budget.threshold` overrides it; a threshold budget
            without a value uses DEFAULT_THRESHOLD).
        min_keep: keep at least this many of the best sentences per query, even over a budget (default 1).
        doc_weight: blend of each sentence's score with its document's score (the document head's, else its best
            sentence score; see `fuse_scores`; default DEFAULT_DOC_WEIGHT = off).
        neighbor_weight: share of an adjacent sentence's score a sentence inherits (default
            DEFAULT_NEIGHBOR_WEIGHT).
        hops: 1 (default) scores once; 2 also re-scores the other documents for the question expanded with the
            first pass's best evidence (a second forward).
        keep_antecedents: a kept sentence that opens with a pronoun or a connective also keeps its predecessor
            (within the budget; default off: it lost recall on the tuning questions).
        batch_size: encoder windows or judge prompts per forward.
        max_length: the causal-LM prompt window in tokens.
        dtype: model dtype ("auto": bf16 on a GPU or a CPU with native bf16, else fp32; "bfloat16", "float32").
        device: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N".

    Raises:
        ConfigError: an unknown scorer or an invalid number.
    """

    name = "exit"
    Options = ExitOptions
    options: ExitOptions
    budget_kinds = frozenset({"rate", "target_tokens", "threshold", "auto"})

    @property
    def default_budget(self) -> Budget:
        """auto, unless the options name a threshold (threshold mode, as before auto existed)."""
        return Budget.auto() if self.options.threshold is None else Budget.score(self.options.threshold)
    counts_separators = True  # `_fill_budget` prices the separator a new document adds

    def __init__(self, counter: TokenCounter | None = None, options: ExitOptions | Mapping[str, Any] | None = None,
                 *, scorer: str | SentenceScorer | None = None, **values: Any) -> None:
        ready = scorer if scorer is not None and not isinstance(scorer, str) else None  # a custom scorer object
        if isinstance(scorer, str):
            values["scorer"] = scorer
        super().__init__(counter or get_token_counter(None), options, **values)
        o: ExitOptions = self.options
        if ready is not None:
            self.scorer: SentenceScorer = ready
            return
        if o.scorer is ScorerKind.ENCODER:
            if o.model or o.adapter:
                raise ConfigError("model/adapter apply to scorer='causal-lm'; the encoder scorer takes 'weights'")
            self.scorer = EncoderScorer(o.weights, batch_size=o.batch_size, dtype=o.dtype, device=o.device)
        else:
            if o.weights:
                raise ConfigError("'weights' applies to scorer='encoder'")
            self.scorer = CausalLMScorer(o.model, adapter=o.adapter, batch_size=o.batch_size or 8,
                                         max_length=o.max_length, dtype=o.dtype, device=o.device)

    def score(self, query: str, documents: Sequence[Document]) -> list[list[Candidate]]:
        """Every candidate sentence of every document with its final score (passes, document blend, neighbours)."""
        spans = [candidate_spans(d) for d in documents]
        sentences, doc_scores = self.score_passes(query, documents, spans)
        o = self.options
        if o.doc_weight or o.neighbor_weight:
            sentences = fuse_scores(sentences, doc_weight=o.doc_weight, neighbor_weight=o.neighbor_weight,
                                    doc_scores=doc_scores)
        return [[Candidate(d, i, a, b, sc) for i, ((a, b), sc) in enumerate(zip(doc_spans, doc_sc))]
                for d, (doc_spans, doc_sc) in enumerate(zip(spans, sentences))]

    def score_passes(self, query: str, documents: Sequence[Document],
                     spans: Sequence[Sequence[tuple[int, int]]]) -> tuple[list[list[float]], list[float] | None]:
        """Raw sentence and document probabilities, the better of the first and (with ``hops=2``) second pass.

        The second pass expands the question with the best sentence of the document the first pass ranks highest
        (by document score, else by best sentence) and re-scores every other document.
        """
        inputs = [(d.title, d.text, s) for d, s in zip(documents, spans)]
        sentences, doc_scores = self._score_once(query, inputs)
        ranked = [d for d in range(len(documents)) if spans[d]]
        if self.options.hops < 2 or len(ranked) < 2:
            return sentences, doc_scores
        prior = doc_scores if doc_scores is not None else [max(s, default=0.0) for s in sentences]
        top = max(ranked, key=lambda d: (prior[d], -d))
        best = max(range(len(spans[top])), key=lambda i: (sentences[top][i], -i))
        a, b = spans[top][best]
        expanded = expand_query(query, documents[top].title, documents[top].text[a:b])
        rest = [d for d in ranked if d != top]
        second, second_docs = self._score_once(expanded, [inputs[d] for d in rest])
        for j, d in enumerate(rest):
            sentences[d] = [max(x, y) for x, y in zip(sentences[d], second[j])]
            if doc_scores is not None and second_docs is not None:
                doc_scores[d] = max(doc_scores[d], second_docs[j])
        return sentences, doc_scores

    @contextmanager
    def prefetched(self, requests: Sequence[CompressionRequest]) -> Iterator[None]:
        """The first pass of every request scored in one batched set of encoder forwards (`score_many`); the
        `compress` calls inside the context read their scores from it. A request that cannot be parsed is left to
        fail in its own `compress` call."""
        score_many = getattr(self.scorer, "score_many", None)
        if score_many is None or not requests:
            yield
            return
        jobs = [(query, [(d.title, d.text, candidate_spans(d)) for d in docs])
                for query, docs in parsed_requests(requests)]
        memo: dict[_DocKey, tuple[list[float], float | None]] = {}
        for (query, inputs), result in zip(jobs, score_many(jobs)):
            for d, (title, text, spans) in enumerate(inputs):
                doc = result.documents[d] if result.documents is not None else None
                memo[_doc_key(query, title, text, spans)] = (list(result.sentences[d]), doc)
        with _PREFETCHED.holding(self, memo):
            yield

    @property
    def shares_relevance(self) -> bool:
        """Whether a pipeline may give this stage its sentence scores from lingua2's relevance forward
        (`compressors/handoff.py`): the shipped encoder scorer, loaded as that forward's (same weights, dtype,
        device and forward shape, so the scores are the ones its own forward gives), one pass, no document blend."""
        from ragzip.compressors.lingua2 import relevance_scorer

        o, scorer = self.options, self.scorer
        if not isinstance(scorer, EncoderScorer) or o.hops != 1 or o.doc_weight or o.weights is not None:
            return False
        shared = relevance_scorer()
        return bool(scorer.model is shared.model and (scorer.batch_size, scorer.max_padding) == (
            shared.batch_size, shared.max_padding))

    def using_scores(self, query: str, documents: Sequence[Document], relevance: Sequence[Any]
                     ) -> AbstractContextManager[None]:
        """A context in which `compress(query, documents)` takes its first-pass sentence scores from `relevance`
        (`handoff.DocRelevance` per document, over this compressor's candidate spans) instead of a forward."""
        memo = {_doc_key(query, d.title, d.text, r.spans): (list(r.sentences), None)
                for d, r in zip(documents, relevance)}
        return _PREFETCHED.holding(self, memo)

    def _score_once(self, query: str, inputs: Sequence[tuple[str, str, Sequence[tuple[int, int]]]]
                    ) -> tuple[list[list[float]], list[float] | None]:
        memo = _PREFETCHED.get(self)
        if memo is not None:
            hits = [memo.get(_doc_key(query, *doc)) for doc in inputs]
            if all(h is not None for h in hits):
                found = [h for h in hits if h is not None]
                docs = [h[1] for h in found]
                return [list(h[0]) for h in found], (None if any(x is None for x in docs) else
                                                     [float(x) for x in docs if x is not None])
        with_docs = getattr(self.scorer, "score_documents", None)
        if with_docs is None:
            return [list(s) for s in self.scorer.score(query, inputs)], None
        result = with_docs(query, inputs)
        docs = list(result.documents) if result.documents is not None else None
        return [list(s) for s in result.sentences], docs

    def _compress(self, query: str, documents: Sequence[Document], budget: Budget,
                  tokens: Sequence[int]) -> tuple[list[CompressedDocument], dict[str, object]]:
        per_doc = self.score(query, documents)
        flat = [c for cands in per_doc for c in cands]
        limit = budget.token_limit(sum(tokens))
        auto: dict[str, object] | None = None
        if budget.is_auto:
            chosen, auto = self._auto(documents, per_doc, flat, budget, limit)
            threshold, mode = None, "auto"
        elif limit is None:
            threshold = (float(budget.threshold) if budget.threshold is not None else
                         self.options.threshold if self.options.threshold is not None else DEFAULT_THRESHOLD)
            chosen = {(c.doc, c.index) for c in flat if c.score >= threshold}
            chosen |= {key for c in flat if (c.doc, c.index) in chosen
                       for key in self._required(documents, per_doc, c, chosen)}
            mode = "threshold"
        else:
            chosen = self._fill_budget(documents, per_doc, flat, limit)
            threshold, mode = None, "budget"
        best = sorted(flat, key=lambda c: (-c.score, c.doc, c.index))
        for c in best:  # the min-keep rule: the context never ends up empty
            if len(chosen) >= self.options.min_keep:
                break
            chosen.add((c.doc, c.index))
        kept = _build(documents, per_doc, chosen)
        info: dict[str, object] = {
            "scorer": getattr(self.scorer, "name", "custom"), "mode": mode, "threshold": threshold,
            "hops": self.options.hops,
            "token_limit": limit, "num_sentences": len(flat), "num_kept": len(chosen),
            "sentence_scores": {documents[i].id: [round(c.score, 4) for c in cands]
                                for i, cands in enumerate(per_doc)},
        }
        if auto is not None:
            info["auto"] = auto
        return kept, info

    def _auto(self, documents: Sequence[Document], per_doc: list[list[Candidate]], flat: list[Candidate],
              budget: Budget, limit: int | None) -> tuple[set[tuple[int, int]], dict[str, object]]:
        """The auto budget: sentences in score order until the calibrated expected coverage of the needed
        sentences reaches the target (the guard may keep more), then cut to `limit` (max_tokens) if one is set."""
        calibration = getattr(self.scorer, "calibration", None)
        raw = np.array([c.score for c in flat], dtype=np.float64)
        probs = calibration(raw) if calibration is not None else np.clip(raw, 0.0, 1.0)
        costs = self.counter.count_batch([documents[c.doc].text[c.start:c.end] for c in flat]) if flat else []
        order = sorted(range(len(flat)), key=lambda i: (-flat[i].score, flat[i].doc, flat[i].index))
        choice = auto_select(probs, costs, budget, order=order)
        keys = {(flat[i].doc, flat[i].index) for i in choice.keep}
        keys |= {key for i in choice.keep for key in self._required(documents, per_doc, flat[i], keys)}
        if limit is not None and keys and self._count(documents, flat, keys) > limit:
            keys = self._fill_budget(documents, per_doc, flat, limit, allowed=keys)
        total = float(probs.sum())
        reached = float(sum(p for c, p in zip(flat, probs) if (c.doc, c.index) in keys) / total) if total else 1.0
        return keys, {"coverage": budget.coverage, "expected_coverage": round(reached, 4), "guard": choice.guard,
                      "calibrated": calibration is not None}

    def _required(self, documents: Sequence[Document], per_doc: list[list[Candidate]], c: Candidate,
                  chosen: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """What `c` cannot be read without, not yet chosen: its table's header lines, and (keep_antecedents) the
        sentences before it that it leans on."""
        spans = [(x.start, x.end) for x in per_doc[c.doc]]
        out = [(c.doc, i) for i in table_header(documents[c.doc].text, spans, c.index) if (c.doc, i) not in chosen]
        if self.options.keep_antecedents:
            out += [k for k in self._antecedents(documents, per_doc, c, chosen) if k not in out]
        return out

    def _antecedents(self, documents: Sequence[Document], per_doc: list[list[Candidate]], c: Candidate,
                     chosen: set[tuple[int, int]]) -> list[tuple[int, int]]:
        """The sentences before `c` it leans on (a chain of pronoun/connective openers), not yet chosen."""
        out: list[tuple[int, int]] = []
        i = c.index
        while i > 0 and len(out) < 2 and leans_on_predecessor(documents[c.doc].text[per_doc[c.doc][i].start:]):
            i -= 1
            if (c.doc, i) not in chosen:
                out.append((c.doc, i))
        return out

    def _fill_budget(self, documents: Sequence[Document], per_doc: list[list[Candidate]], flat: list[Candidate],
                     limit: int, allowed: set[tuple[int, int]] | None = None) -> set[tuple[int, int]]:
        """Highest-scoring sentences (each with what it requires: a table row's header, the predecessors it leans
        on) until the cap, checked on the assembled text (never over the cap); only `allowed` ones when given."""
        costs = dict(zip(((c.doc, c.index) for c in flat),
                         self.counter.count_batch([documents[c.doc].text[c.start:c.end] for c in flat])))
        keys: set[tuple[int, int]] = set()
        sep = separator_tokens(self.counter)
        docs_used: set[int] = set()
        total = -sep  # the first document needs no separator before it
        priced = total  # separator tokens `total` holds as estimates (not yet counted exactly)
        for c in sorted(flat, key=lambda x: (-x.score, x.doc, x.index)):
            if (c.doc, c.index) in keys or (allowed is not None and (c.doc, c.index) not in allowed):
                continue
            group = [(c.doc, c.index), *self._required(documents, per_doc, c, keys)]
            joins = 0 if c.doc in docs_used else sep  # a new document adds a separator (at most)
            for option in (group, group[:1]):  # with its antecedents, else the sentence alone
                cost = sum(costs[k] for k in option)
                if total + cost + joins <= limit:
                    priced += joins
                elif total - priced + cost <= limit:  # only the separators are in doubt: count them
                    exact = self._count(documents, flat, keys | set(option))
                    if exact > limit:
                        continue
                    total, priced, cost, joins = exact, 0, 0, 0
                else:
                    continue
                keys.update(option)
                total += cost + joins
                docs_used.add(c.doc)
                break
        chosen = [c for c in flat if (c.doc, c.index) in keys]
        # Joined sentences can tokenize differently from the sum of their parts: drop the weakest until it fits.
        while keys and self._count(documents, flat, keys) > limit:
            weakest = min((c for c in chosen if (c.doc, c.index) in keys), key=lambda c: (c.score, -c.doc, -c.index))
            keys.discard((weakest.doc, weakest.index))
        return keys

    def _count(self, documents: Sequence[Document], flat: list[Candidate], keys: set[tuple[int, int]]) -> int:
        """Tokens of the kept sentences as they will be assembled (`_build`: within a document a space, or the
        source's line breaks; the context separator between documents)."""
        pieces: dict[int, list[tuple[int, int]]] = {}
        for c in flat:
            if (c.doc, c.index) in keys:
                pieces.setdefault(c.doc, []).append((c.start, c.end))
        return joined_tokens(self.counter, [assemble(documents[d], sorted(p), sep=" ", keep_line_breaks=True).text
                                            for d, p in sorted(pieces.items())])


def _build(documents: Sequence[Document], per_doc: list[list[Candidate]],
           chosen: set[tuple[int, int]]) -> list[CompressedDocument]:
    out = []
    for d, cands in enumerate(per_doc):
        kept = [c for c in cands if (c.doc, c.index) in chosen]
        if kept:
            out.append(assemble(documents[d], [(c.start, c.end) for c in kept], sep=" ",
                                scores=[c.score for c in kept], keep_line_breaks=True))
    return out
