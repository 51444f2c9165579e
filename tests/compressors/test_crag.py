from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from ragzip.budget import Budget
from ragzip.compressors.crag import CragCompressor, kmeans_labels
from ragzip.compressors.registry import get_compressor
from ragzip.errors import ConfigError
from ragzip.tokens import get_token_counter
from ragzip.types import CompressionResult, Document

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "crag"
WS = get_token_counter("whitespace")


def _groups() -> dict[str, list[str]]:
    return json.loads((FIXTURES / "items.json").read_text())["groups"]


@pytest.fixture(scope="module")
def items() -> list[Document]:
    """Three topics x three paraphrases, interleaved so that clusters are not contiguous runs."""
    groups = _groups()
    docs = []
    for i in range(3):
        for topic, texts in groups.items():
            docs.append(Document(f"{topic}-{i}", texts[i], metadata={"topic": topic}))
    return docs


class MemoEncoder:
    """The packaged embedder, remembering each text's vector: the tests embed the same few texts many times."""

    def __init__(self) -> None:
        self.memo: dict[str, object] = {}

    def encode(self, texts: Sequence[str], **kw: object) -> object:
        import numpy as np

        from ragzip.registry import load_embedder

        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            self.memo.update(zip(missing, load_embedder().encode(missing, **kw)))
        return np.stack([self.memo[t] for t in texts])


ENCODER = MemoEncoder()


def crag(**options: object) -> CragCompressor:
    options.setdefault("embedder", ENCODER)
    return CragCompressor(counter=WS, **options)


def assert_provenance(result: CompressionResult, documents: Sequence[Document], *, complete: bool = True) -> None:
    by_id = {d.id: d for d in documents}
    seen: list[str] = []
    for piece in result.documents:
        assert piece.text, "a kept piece is never empty"
        assert piece.members, f"{piece.id} does not say which items it stands for"
        seen.extend(piece.members)
        for span, (start, end) in zip(piece.spans, piece.offsets):
            assert piece.text[start:end] == by_id[span.doc_id].text[span.start:span.end]
        if piece.spans:  # extractive: a kept item stands (at least) for itself
            assert piece.id in piece.members
    if complete:
        assert sorted(seen) == sorted(by_id), "members cover every input item exactly once"


def test_near_duplicates_land_together_on_the_packaged_embedder(items: list[Document]) -> None:
    result = crag(k=3, embedder=None).compress("", items)  # embedder=None: the registry's default embedder
    topics = {tuple(sorted({d.metadata["topic"] for d in items if d.id in set(p.members)})) for p in result.documents}
    assert topics == {("battery",), ("screen",), ("shipping",)}
    assert len(result.documents) == 3
    clusters = result.stages[0].info["clusters"]
    assert sorted(len(c) for c in clusters) == [3, 3, 3]
    assert_provenance(result, items)


def test_same_input_and_seed_give_the_same_output(items: list[Document]) -> None:
    a = crag(k="silhouette", seed=7).compress("screen broke", items)
    b = crag(k="silhouette", seed=7).compress("screen broke", items)
    assert a.documents == b.documents
    assert a.stages[0].info == b.stages[0].info


def test_kmeans_labels_are_canonical_and_repeatable() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    first = kmeans_labels(x, 4, seed=3)
    assert first.tolist() == kmeans_labels(x, 4, seed=3).tolist()
    assert first[0] == 0 and set(first.tolist()) <= set(range(4))
    seen = []  # labels are numbered by first appearance
    for label in first.tolist():
        if label not in seen:
            seen.append(label)
    assert seen == sorted(seen)


def test_fixed_k_is_clamped_to_the_number_of_items(items: list[Document]) -> None:
    result = crag(k=50).compress("", items[:4])
    assert result.stages[0].info["k"] == 4
    assert [d.id for d in result.documents] == [d.id for d in items[:4]]


def test_k_from_the_budget(items: list[Document]) -> None:
    costs = WS.count_batch([d.text for d in items])
    limit = 40
    result = crag().compress("", items, Budget.tokens(limit))  # k="auto" with a token limit means "budget"
    info = result.stages[0].info
    assert info["k_source"] == "budget"
    assert info["k"] == min(len(items), int(limit // (sum(costs) / len(costs))))
    assert result.tokens_after <= limit
    assert_provenance(result, items)


def test_k_budget_needs_a_token_limit(items: list[Document]) -> None:
    with pytest.raises(ConfigError, match="budget"):
        crag(k="budget").compress("", items)


def test_silhouette_finds_the_three_topics(items: list[Document]) -> None:
    result = crag().compress("", items)  # k="auto" without a token limit means "silhouette"
    info = result.stages[0].info
    assert info["k_source"] == "silhouette"
    assert info["k"] == 3
    assert info["silhouette"] > 0.2


def test_tokens_grow_with_k_not_with_the_number_of_items(items: list[Document]) -> None:
    # The same three topics said 3 and 9 times: three times the input, the same kept size.
    many = [Document(f"{d.id}-{j}", d.text + " " * j) for j in range(3) for d in items]
    small, large = crag(k=3).compress("", items), crag(k=3).compress("", many)
    assert large.tokens_before == 3 * small.tokens_before
    assert large.tokens_after == small.tokens_after
    assert crag(k=6).compress("", many).tokens_after > large.tokens_after


def test_never_empty_under_a_tiny_cap(items: list[Document]) -> None:
    result = crag(k=3).compress("", items, Budget.tokens(1))
    assert len(result.documents) == 1
    piece = result.documents[0]
    assert piece.text and result.tokens_after == 1
    assert_provenance(result, items)


def test_dropped_clusters_are_represented_by_a_kept_piece(items: list[Document]) -> None:
    costs = WS.count_batch([d.text for d in items])
    result = crag(k=3).compress("", items, Budget.tokens(max(costs) + 1))
    assert len(result.documents) == 1
    assert len(result.documents[0].members) == len(items)
    assert result.tokens_after <= max(costs) + 1
    assert_provenance(result, items)


def test_query_relevance_picks_the_item_that_matches(items: list[Document]) -> None:
    battery = [d for d in items if d.metadata["topic"] == "battery"]
    target = battery[2]
    result = crag(k=1, alpha=0.0).compress("how many days do I get out of one charge", battery)
    assert [d.id for d in result.documents] == [target.id]


def test_per_cluster_keeps_more_and_splits_members(items: list[Document]) -> None:
    result = crag(k=3, per_cluster=2).compress("", items)
    assert len(result.documents) == 6
    assert_provenance(result, items)


def test_identical_items_kept_twice_each_stand_for_themselves() -> None:
    docs = [Document(f"d{i}", "Exactly the same review text.") for i in range(3)]
    result = crag(k=1, per_cluster=2).compress("", docs)
    assert [d.members for d in result.documents] == [("d0", "d2"), ("d1",)]
    assert_provenance(result, docs)


def test_empty_input_gives_empty_output() -> None:
    result = crag().compress("q", [])
    assert result.documents == () and result.tokens_before == 0


def test_an_item_over_the_budget_is_cut_at_a_word_end() -> None:
    doc = Document("only", "Just one review here.")
    result = crag().compress("", [doc], Budget.ratio(0.5))  # 4 words -> at most 2
    assert [d.text for d in result.documents] == ["Just one"]
    assert [(s.start, s.end) for s in result.documents[0].spans] == [(0, 8)]
    assert_provenance(result, [doc])
    assert crag().compress("", [doc]).documents[0].text == doc.text


def test_string_options_from_the_cli_and_the_registry(items: list[Document]) -> None:
    comp = get_compressor("crag", counter=WS, k="3", mode="extractive", per_cluster="1", alpha="0.7", seed="2",
                          max_k="5", cache="false")
    assert isinstance(comp, CragCompressor)
    assert comp.options.k == 3 and comp.options.alpha == 0.7 and comp.options.seed == 2
    assert len(comp.compress("", items).documents) == 3


@pytest.mark.parametrize("options", [{"k": "0"}, {"k": "many"}, {"mode": "magic"}, {"alpha": "1.5"},
                                     {"per_cluster": "x"}, {"seed": "-1"}, {"cache": "maybe"}])
def test_bad_options_raise_config_errors(options: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        crag(**options)


def test_pipeline_contract_carries_spans_and_members(items: list[Document]) -> None:
    from ragzip.pipeline import build_compressor

    single = build_compressor("crag", counter=WS, options={"k": "3", "embedder": ENCODER}).compress("", items)
    for ctx in single.to_contract()["contexts"]:
        assert ctx["spans"] and ctx["members"]
    assert_provenance(single, items)

    staged = build_compressor("crag+truncate", counter=WS, options={"crag": {"k": "3", "embedder": ENCODER}})
    result = staged.compress("", items, Budget.tokens(20))
    assert 0 < result.tokens_after <= 20 and [s.name for s in result.stages] == ["crag", "truncate"]
    assert_provenance(result, items, complete=False)  # a later stage may drop a whole piece
    assert all(d.spans and d.members for d in result.documents)


class FakeSummarizer:
    name = "fake"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def summarize(self, texts: Sequence[str], query: str = "", *, max_new_tokens: int = 96) -> str:
        self.calls.append(list(texts))
        return f"summary of {len(texts)} items"


def test_abstractive_summaries_carry_members_and_are_cached(items: list[Document], tmp_path: Path) -> None:
    fake = FakeSummarizer()
    comp = crag(k=3, mode="abstractive", summarizer=fake, cache_dir=tmp_path)
    result = comp.compress("", items)
    assert [d.text for d in result.documents] == ["summary of 3 items"] * 3
    for piece in result.documents:
        assert piece.spans == () and len(piece.members) == 3
    assert_provenance(result, items)
    assert len(fake.calls) == 3 and all(len(c) == 3 for c in fake.calls)
    assert result.stages[0].info["summaries_cached"] == 0
    contract = result.to_contract()
    assert all(ctx["members"] and ctx["spans"] == [] for ctx in contract["contexts"])

    again = crag(k=3, mode="abstractive", summarizer=fake, cache_dir=tmp_path).compress("", items)
    assert again.documents == result.documents
    assert len(fake.calls) == 3, "the second run is served from the cache"
    assert again.stages[0].info["summaries_cached"] == 3


def test_abstractive_singletons_stay_verbatim(items: list[Document]) -> None:
    fake = FakeSummarizer()
    result = crag(k=9, mode="abstractive", summarizer=fake, cache=False).compress("", items)
    assert fake.calls == []
    assert [d.text for d in result.documents] == [d.text for d in items]
    assert_provenance(result, items)
