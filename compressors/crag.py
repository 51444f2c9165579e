"""CRAG clustering: collapse many similar items (reviews, tickets, near-duplicate passages) to one piece per cluster.

Each item is embedded with the retrieval embedder and the items are clustered with spherical k-means (faiss, fixed
seed, several restarts). Per cluster the compressor either keeps the item(s) that are most central and most relevant
to the query (extractive, the default) or has an LLM summarise the cluster (abstractive). Every kept piece names the
items it stands for in `members`, so the output token count grows with k, not with the number of items, and a
reader still knows what each piece represents.

Example:
    >>> from ragzip.compressors.crag import CragCompressor
    >>> from ragzip.tokens import get_token_counter
    >>> crag = CragCompressor(counter=get_token_counter("whitespace"), k="3")
    >>> result = crag.compress("is it comfortable?", reviews)          # doctest: +SKIP
    >>> [(d.id, d.members) for d in result.documents]                   # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from ragzip.budget import Budget
from ragzip.compressors.base import BaseCompressor, joined_tokens, select_within_limit, separator_tokens
from ragzip.compressors.summarize import Summarizer, SummaryCache, cached_summary, make_summarizer
from ragzip.errors import ConfigError
from ragzip.options import bounds, parse_int
from ragzip.tokens import TokenCounter
from ragzip.types import CompressedDocument, Document, Span

K_MODES = ("auto", "budget", "silhouette")
_WORD = re.compile(r"\S+")


class Mode(str, Enum):
    EXTRACTIVE = "extractive"
    ABSTRACTIVE = "abstractive"


_MAX_FILL_TRIES = 8  # items tried to fill the room a budget leaves after the cluster pieces


@dataclass(slots=True)
class _Piece:
    """One candidate output piece (internal)."""

    doc: CompressedDocument
    cost: int
    priority: float
    anchor: int  # index of the item that places the piece in the output order
    member_idx: list[int] = field(default_factory=list)


def _parse_k(value: Any, name: str) -> int | str:
    if isinstance(value, str) and value.strip().lower() in K_MODES:
        return value.strip().lower()
    try:
        return parse_int(value, name, low=1)
    except ConfigError:
        raise ConfigError(f"{name} must be a positive integer or one of {list(K_MODES)}, got {value!r}") from None


@dataclass(frozen=True, slots=True)
class CragOptions:
    """Settings of a CragCompressor (see the class docstring); strings from the CLI are parsed."""

    k: int | str = field(default="auto", metadata={"parse": _parse_k})
    mode: Mode = Mode.EXTRACTIVE
    per_cluster: int = field(default=1, metadata=bounds(low=1))
    alpha: float = field(default=0.5, metadata=bounds(low=0.0, high=1.0))
    seed: int = field(default=0, metadata=bounds(low=0))
    max_k: int = field(default=16, metadata=bounds(low=2))
    max_new_tokens: int = field(default=96, metadata=bounds(low=1))
    llm: str | None = None
    embedder: str | None = None
    device: str = "auto"  # where the embedder runs: auto (cuda when available) | cpu | cuda | cuda:N
    cache: bool = True
    cache_dir: str | None = None
    api_key: str | None = None


def kmeans_labels(embeddings: np.ndarray, k: int, *, seed: int = 0, niter: int = 25, nredo: int = 5) -> np.ndarray:
    """Spherical k-means labels (faiss), renumbered by first appearance so equal inputs give equal labels."""
    n = len(embeddings)
    if k <= 1 or n <= 1:
        return np.zeros(n, dtype=np.int64)
    if k >= n:
        raw = np.arange(n)
    else:
        import faiss

        # min_points_per_centroid=1: few items per cluster is the normal case here, not a misuse to warn about;
        # a high max_points_per_centroid stops faiss from subsampling the items.
        km = faiss.Kmeans(embeddings.shape[1], k, niter=niter, nredo=nredo, seed=seed, spherical=True,
                          verbose=False, min_points_per_centroid=1, max_points_per_centroid=1 << 20)
        km.train(np.ascontiguousarray(embeddings, dtype=np.float32))
        raw = km.index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)[1].ravel()
    order: dict[int, int] = {}
    return np.array([order.setdefault(int(c), len(order)) for c in raw], dtype=np.int64)


def silhouette_k(embeddings: np.ndarray, max_k: int, **kmeans_kw: Any) -> tuple[int, float | None]:
    """The k in [2, min(max_k, n-1)] with the highest cosine silhouette, and that score (None if not computable)."""
    from sklearn.metrics import silhouette_score

    n = len(embeddings)
    best_k, best_score = min(n, 2), None
    for k in range(2, min(max_k, n - 1) + 1):
        labels = kmeans_labels(embeddings, k, **kmeans_kw)
        if len(set(labels.tolist())) < 2:
            continue
        score = float(silhouette_score(embeddings, labels, metric="cosine"))
        if best_score is None or score > best_score + 1e-9:
            best_k, best_score = k, score
    return best_k, best_score


class CragCompressor(BaseCompressor):
    """Clusters the items and keeps one representative piece per cluster.

    Args:
        counter: token counter for budgets.
        k: clusters: a positive integer, "budget" (token limit / tokens per kept piece), "silhouette" (best cosine
            silhouette for k in 2..max_k), or "auto" (default: "budget" when the budget has a token limit, else
            "silhouette").
        mode: "extractive" (keep whole items) or "abstractive" (an LLM summary per cluster of 2+ items;
            singletons are kept verbatim).
        per_cluster: items kept per cluster in extractive mode.
        alpha: weight of centrality against query relevance when ranking a cluster's items (1 = centrality only;
            with an empty query only centrality counts).
        llm: abstractive summariser: a local model alias/path (default: the embedded LLM) or an OpenAI-compatible
            base URL `http(s)://host/v1`, optionally `#model-name`.
        embedder: embedder name or path (default: the retrieval embedder), or an object with a
            sentence-transformers `encode`.
        seed: k-means seed (results repeat for the same seed and input).
        max_k: largest k tried by "silhouette".
        max_new_tokens: longest summary in tokens.
        cache: cache summaries in `cache_dir/crag_summaries.sqlite` (default cache dir: the settings' one).
        summarizer: an object with `summarize(texts, query, max_new_tokens=...)` (overrides `llm`).

    Raises:
        ConfigError: an invalid option (strings from the CLI are parsed).
    """

    name = "crag"
    Options = CragOptions
    options: CragOptions
    budget_kinds = frozenset({"rate", "target_tokens"})
    counts_separators = True  # `_fit` prices the separator between kept pieces

    def __init__(self, counter: TokenCounter, options: CragOptions | Mapping[str, Any] | None = None, *,
                 embedder: Any = None, summarizer: Summarizer | None = None, **values: Any) -> None:
        encoder = embedder if hasattr(embedder, "encode") else None  # a ready embedding model object
        if embedder is not None and encoder is None:
            values["embedder"] = embedder
        super().__init__(counter, options, **values)
        self._encoder: Any = encoder
        self._summarizer = summarizer
        self._cache: SummaryCache | None = None

    # -- models, loaded on first use -------------------------------------------------------------------------
    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._encoder is None:
            from ragzip.registry import load_embedder

            self._encoder = load_embedder(self.options.embedder, self.options.device)
        vecs = self._encoder.encode(list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)

    @property
    def summarizer(self) -> Summarizer:
        if self._summarizer is None:
            self._summarizer = make_summarizer(self.options.llm, api_key=self.options.api_key)
        return self._summarizer

    @property
    def cache(self) -> SummaryCache | None:
        if self.options.cache and self._cache is None:
            from ragzip.registry import default_cache_dir

            folder = Path(self.options.cache_dir).expanduser() if self.options.cache_dir else default_cache_dir()
            self._cache = SummaryCache(folder / "crag_summaries.sqlite")
        return self._cache

    # -- k selection -------------------------------------------------------------------------------------------
    def choose_k(self, embeddings: np.ndarray, costs: Sequence[int],
                 limit: int | None) -> tuple[int, str, float | None]:
        """(k, how it was chosen, silhouette score or None) for these items under a token limit."""
        opts, n = self.options, len(embeddings)
        distinct = len(np.unique(np.round(embeddings, 5), axis=0))
        mode = opts.k if isinstance(opts.k, str) else "fixed"
        if mode == "auto":
            mode = "budget" if limit is not None else "silhouette"
        score = None
        if mode == "fixed":
            k = int(opts.k)
        elif mode == "budget":
            if limit is None:
                raise ConfigError("crag k='budget' needs a rate or target_tokens budget")
            mean_cost = max(1.0, float(np.mean(costs)))
            if opts.mode is Mode.EXTRACTIVE:
                piece = mean_cost * opts.per_cluster
            else:
                piece = min(mean_cost, opts.max_new_tokens)
            k = max(1, math.floor(limit / piece))
        else:
            k, score = silhouette_k(embeddings, opts.max_k, seed=opts.seed)
        return max(1, min(k, n, distinct)), mode, score

    # -- compression -------------------------------------------------------------------------------------------
    def _compress(self, query: str, documents: Sequence[Document], budget: Budget, tokens: Sequence[int]
                  ) -> tuple[list[CompressedDocument], dict[str, object]]:
        if not documents:
            return [], {"k": 0, "clusters": []}
        opts = self.options
        texts = [d.text for d in documents]
        costs = list(tokens)
        limit = budget.token_limit(sum(costs))
        emb = self._embed(texts)
        k, k_source, sil = self.choose_k(emb, costs, limit)
        labels = kmeans_labels(emb, k, seed=opts.seed)
        clusters = [np.flatnonzero(labels == c) for c in range(int(labels.max()) + 1)]
        scores = self._item_scores(query, emb, labels, clusters)
        if opts.mode is Mode.EXTRACTIVE:
            pieces, cached = self._extractive(documents, emb, clusters, scores, costs), 0
        else:
            pieces, cached = self._abstractive(query, documents, clusters, scores, k, limit)
        kept = self._fit(documents, emb, pieces, limit, scores, costs)
        info: dict[str, object] = {
            "k": len(clusters), "k_source": k_source, "mode": opts.mode.value, "kept": len(kept),
            "clusters": [[documents[i].id for i in c] for c in clusters],
        }
        if sil is not None:
            info["silhouette"] = round(sil, 6)
        if opts.mode is Mode.ABSTRACTIVE:
            info["summaries_cached"] = cached
        return kept, info

    def _item_scores(self, query: str, emb: np.ndarray, labels: np.ndarray, clusters: list[np.ndarray]) -> np.ndarray:
        """alpha * cosine(item, cluster centroid) + (1 - alpha) * cosine(item, query)."""
        centroids = np.stack([emb[c].mean(axis=0) for c in clusters])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        centrality = np.einsum("nd,nd->n", emb, centroids[labels])
        if not query.strip() or self.options.alpha == 1.0:
            return centrality
        relevance = emb @ self._embed([query])[0]
        return self.options.alpha * centrality + (1.0 - self.options.alpha) * relevance

    def _extractive(self, documents: Sequence[Document], emb: np.ndarray, clusters: list[np.ndarray],
                    scores: np.ndarray, costs: Sequence[int]) -> list[_Piece]:
        pieces = []
        for members in clusters:
            ranked = sorted(members.tolist(), key=lambda i: (-scores[i], i))
            reps = ranked[: self.options.per_cluster]
            # Each member is represented by the kept item it is most similar to.
            owner = {i: reps[int(np.argmax(emb[reps] @ emb[i]))] for i in members.tolist()}
            owner.update({rep: rep for rep in reps})  # even when two kept items are identical
            for rep in reps:
                member_idx = sorted(i for i, o in owner.items() if o == rep)
                pieces.append(_Piece(self._whole(documents[rep], member_idx, documents, float(scores[rep])),
                                     costs[rep], len(member_idx) + 0.5 * float(scores[rep]), rep, member_idx))
        return pieces

    @staticmethod
    def _whole(doc: Document, member_idx: Sequence[int], documents: Sequence[Document], score: float,
               end: int | None = None) -> CompressedDocument:
        end = len(doc.text) if end is None else end
        return CompressedDocument(doc.id, doc.text[:end], doc.title, (Span(doc.id, 0, end),), ((0, end),),
                                  tuple(documents[i].id for i in member_idx), (round(score, 6),))

    def _abstractive(self, query: str, documents: Sequence[Document], clusters: list[np.ndarray], scores: np.ndarray,
                     k: int, limit: int | None) -> tuple[list[_Piece], int]:
        max_new = self.options.max_new_tokens if limit is None else max(8, min(self.options.max_new_tokens, limit // k))
        pieces, cached = [], 0
        for c, members in enumerate(clusters):
            ranked = sorted(members.tolist(), key=lambda i: (-scores[i], i))
            member_idx = sorted(ranked)
            mean_score = float(np.mean(scores[members]))
            summary = ""
            if len(ranked) > 1:
                summary, was_cached = cached_summary(self.summarizer, [documents[i].text for i in ranked], query,
                                                     max_new_tokens=max_new, cache=self.cache)
                cached += was_cached
            if summary.strip():
                doc = CompressedDocument(f"crag-cluster-{c}", summary.strip(), "", (), (),
                                         tuple(documents[i].id for i in member_idx), (round(mean_score, 6),))
            else:  # a singleton, or an empty summary: the most central item stands for the cluster
                doc = self._whole(documents[ranked[0]], member_idx, documents, float(scores[ranked[0]]))
            pieces.append(_Piece(doc, self.counter.count(doc.text), len(member_idx) + 0.5 * mean_score, ranked[0],
                                 member_idx))
        return pieces, cached

    def _fit(self, documents: Sequence[Document], emb: np.ndarray, pieces: list[_Piece], limit: int | None,
             scores: np.ndarray, costs: Sequence[int]) -> list[CompressedDocument]:
        """Pieces within the token limit (biggest clusters first), in input order, never empty; the room left is
        filled with the leading sentences of the best item not kept yet (a dropped piece's, or a second item of a
        kept cluster), so a budget is used.

        Items of a dropped piece join the kept piece whose anchor item is most similar, so `members` of the output
        still cover every input item exactly once.
        """
        sep = separator_tokens(self.counter)
        chosen = select_within_limit([p.priority for p in pieces], [p.cost for p in pieces], limit,
                                     docs=list(range(len(pieces))), separator=sep,
                                     exact=lambda idx: joined_tokens(self.counter, [pieces[j].doc.text for j in idx]))
        if not chosen:
            best = max(range(len(pieces)), key=lambda j: (pieces[j].priority, -j))
            return [self._truncated(documents, pieces[best], list(range(len(documents))), limit or 1)]
        kept = [pieces[j] for j in chosen]
        shown = [p.doc for p in kept]
        fillers: set[int] = set()
        if limit is not None:
            room = limit - sum(p.cost for p in kept) - sep * len(kept)
            # A kept summary stands for its members; a kept item only for itself.
            covered = {i for p in kept for i in (p.member_idx if not p.doc.spans else [p.anchor])}
            rest = sorted((i for i in range(len(documents)) if i not in covered and documents[i].text.strip()),
                          key=lambda i: (-scores[i], i))
            for i in rest[:_MAX_FILL_TRIES]:
                if room <= 0:
                    break
                item = _Piece(self._whole(documents[i], [i], documents, float(scores[i])), costs[i], 0.0, i, [i])
                head = self._truncated(documents, item, [i], room, sentences_only=True)
                if head.text.strip():
                    kept.append(item)
                    shown.append(head)
                    fillers.add(i)
                    room -= self.counter.count(head.text) + sep
        extra: dict[int, list[int]] = {j: [] for j in range(len(kept))}
        anchors = emb[[p.anchor for p in kept]]
        for j in sorted(set(range(len(pieces))) - set(chosen)):
            for i in pieces[j].member_idx:
                if i not in fillers:
                    extra[int(np.argmax(anchors @ emb[i]))].append(i)
        out = []
        for j, p in sorted(enumerate(kept), key=lambda jp: jp[1].anchor):
            own = [i for i in p.member_idx + extra[j] if i not in fillers or p.anchor == i]
            d = shown[j]
            out.append(CompressedDocument(d.id, d.text, d.title, d.spans, d.offsets,
                                          tuple(documents[i].id for i in sorted(own)), d.scores))
        return out

    def _truncated(self, documents: Sequence[Document], piece: _Piece, member_idx: list[int],
                   limit: int, *, sentences_only: bool = False) -> CompressedDocument:
        """The longest leading part of `piece` within `limit` tokens, cut at a sentence end if one fits, else at a
        word end (at least one word): the minimum keep, so the output is never empty. With `sentences_only`, whole
        sentences or nothing (an empty text)."""
        from ragzip.text import split_sentences

        text = piece.doc.text
        cut = self._longest_prefix(text, [e for _, e in split_sentences(text)], limit)
        if cut == 0 and sentences_only:
            return CompressedDocument(piece.doc.id, "", piece.doc.title)
        if cut == 0:
            word_ends = [m.end() for m in _WORD.finditer(text)]
            cut = self._longest_prefix(text, word_ends, limit) or (word_ends[0] if word_ends else len(text))
        d = piece.doc
        if d.spans:
            return self._whole(documents[piece.anchor], member_idx, documents, d.scores[0] if d.scores else 0.0,
                               end=cut)
        return CompressedDocument(d.id, text[:cut], d.title, (), (), tuple(documents[i].id for i in member_idx),
                                  d.scores)

    def _longest_prefix(self, text: str, ends: Sequence[int], limit: int) -> int:
        """The largest end in `ends` (ascending) whose prefix fits `limit` tokens, or 0 (binary search)."""
        lo, hi, best = 0, len(ends) - 1, 0
        while lo <= hi:
            mid = (lo + hi) // 2
            if self.counter.count(text[: ends[mid]]) <= limit:
                best, lo = ends[mid], mid + 1
            else:
                hi = mid - 1
        return best
