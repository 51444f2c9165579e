"""Vectorised subword -> word machinery for the LLMLingua-2-style compressor.

Everything that the reference `llmlingua` package does per token in Python (word-start rules, merging subword
probabilities into words, force tokens, digits, chunking into encoder windows) is done here with numpy over whole
token arrays, with per-vocabulary lookup tables built once per tokenizer.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ragzip.errors import UnsupportedModelError

_DIGIT = re.compile(r"\d")
_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef\U00020000-\U0002fa1f]")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")  # Chinese characters
_SENT_END = frozenset(".!?;:。！？；\n")


class WordRule(str, Enum):
    """How a tokenizer marks word starts: WordPiece (`##` continues a word) or SentencePiece (`▁` starts one)."""

    WORDPIECE = "wordpiece"
    SENTENCEPIECE = "sentencepiece"


def detect_rule(tokenizer: object) -> WordRule:
    """The word rule of a Hugging Face fast tokenizer, read from its model (never from the model's name).

    Raises:
        UnsupportedModelError: the tokenizer is neither WordPiece nor SentencePiece-style.
    """
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    n_meta = sum(1 for t in vocab if t.startswith("\u2581"))
    n_hash = sum(1 for t in vocab if t.startswith("##"))
    if n_meta > len(vocab) // 10:
        return WordRule.SENTENCEPIECE
    if n_hash > len(vocab) // 20:
        return WordRule.WORDPIECE
    raise UnsupportedModelError(
        f"{type(tokenizer).__name__}: cannot tell word starts (neither '##' WordPiece nor '\u2581' SentencePiece "
        "pieces); LLMLingua-2 classifiers use XLM-RoBERTa or BERT tokenizers"
    )


def pure_token(token: str, rule: WordRule) -> str:
    """A token without its word marker, exactly as the reference strips it."""
    return token.lstrip("##") if rule is WordRule.WORDPIECE else token.lstrip("\u2581")


@dataclass(frozen=True, slots=True)
class VocabTables:
    """Per-vocabulary-id lookups: every per-token decision becomes one fancy-indexing call."""

    rule: WordRule
    tokens: np.ndarray  # [V] object: token strings
    pure: np.ndarray  # [V] object: tokens without word markers
    is_special: np.ndarray  # [V] bool: dropped before words are formed (cls, sep, pad, unk, mask)
    starts_word: np.ndarray  # [V] bool: begins a new word (reference rule, force tokens included)
    is_force: np.ndarray  # [V] bool: pure token is a force token
    has_digit: np.ndarray  # [V] bool
    is_chunk_end: np.ndarray  # [V] bool: "." or "\n" (the reference's chunk_end_tokens)


def build_tables(tokenizer: object, rule: WordRule, force_tokens: Sequence[str] = ()) -> VocabTables:
    """Lookup tables for `tokenizer` (reference `is_begin_of_new_word` / `get_pure_token` semantics)."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    size = max(vocab.values()) + 1
    tokens = np.empty(size, dtype=object)
    tokens[:] = ""
    for tok, idx in vocab.items():
        tokens[idx] = tok
    force = set(force_tokens)
    pure = np.array([pure_token(t, rule) for t in tokens], dtype=object)
    special_map = tokenizer.special_tokens_map  # type: ignore[attr-defined]
    special_strings = {v for k, v in special_map.items() if k != "additional_special_tokens" and isinstance(v, str)}
    is_special = np.array([t in special_strings for t in tokens])
    if rule is WordRule.WORDPIECE:
        starts = np.array([(p in force) or not t.startswith("##") for t, p in zip(tokens, pure)])
    else:
        starts = np.array([(t in string.punctuation) or (t in force) or t.startswith("\u2581") for t in tokens])
    return VocabTables(
        rule=rule,
        tokens=tokens,
        pure=pure,
        is_special=is_special,
        starts_word=starts,
        is_force=np.array([p in force for p in pure]),
        has_digit=np.array([bool(_DIGIT.search(t)) for t in tokens]),
        is_chunk_end=np.array([t in (".", "\n") for t in tokens]),
    )


def reference_chunks(ids: np.ndarray, is_chunk_end: np.ndarray, max_len: int = 510) -> list[tuple[int, int]]:
    """Token ranges [start, end) of the reference's `__chunk_context` (cut at the last "." within the window)."""
    n = len(ids)
    ends = np.flatnonzero(is_chunk_end[ids])
    out: list[tuple[int, int]] = []
    st = 0
    while st < n:
        if st + max_len > n - 1:
            out.append((st, n))
            break
        ed = st + max_len
        k = int(np.searchsorted(ends, ed, side="right")) - 1
        if k >= 0 and ends[k] > st:
            ed = int(ends[k])
        out.append((st, ed + 1))
        st = ed + 1
    return out


def sentence_windows(text: str, offsets: np.ndarray, max_len: int = 510) -> list[tuple[int, int]]:
    """Token ranges [start, end) of at most `max_len` tokens, each ending at a sentence or line break if any.

    A token ends a sentence when its last character is sentence-final punctuation or a line break follows it.
    """
    n = len(offsets)
    if n == 0:
        return []
    nxt = np.append(offsets[1:, 0], len(text))
    is_end = np.zeros(n, dtype=bool)
    for i in range(n):  # one cheap character test per token; the text is scanned once
        e = offsets[i, 1]
        if e > 0 and text[e - 1] in _SENT_END:
            is_end[i] = True
        elif "\n" in text[e:nxt[i]]:
            is_end[i] = True
    ends = np.flatnonzero(is_end)
    out: list[tuple[int, int]] = []
    st = 0
    while st < n:
        if n - st <= max_len:
            out.append((st, n))
            break
        hi = st + max_len - 1
        k = int(np.searchsorted(ends, hi, side="right")) - 1
        ed = int(ends[k]) if k >= 0 and ends[k] >= st + max_len // 4 else hi
        out.append((st, ed + 1))
        st = ed + 1
    return out


@dataclass(frozen=True, slots=True)
class Words:
    """Words of one token sequence: word `w` is tokens[first[w]:first[w+1]] of the non-special tokens."""

    token_pos: np.ndarray  # [T'] positions (into the input token array) of the non-special tokens
    first: np.ndarray  # [W] index into token_pos of each word's first token
    prob: np.ndarray  # [W] float32 word probability (force and digit overrides applied)
    prob_no_force: np.ndarray  # [W] float32 model-only word probability, reference quirk included (see merge_words)


def merge_words(ids: np.ndarray, probs: np.ndarray, tables: VocabTables, *, mode: str = "mean",
                keep_digits: bool = False) -> Words:
    """Merge subword probabilities into word probabilities, as the reference's `__merge_token_to_word`.

    Args:
        ids: [T] token ids of one window (special tokens included; they are skipped).
        probs: [T] keep probabilities (class 1).
        tables: lookups for the tokenizer.
        mode: "mean" or "first" subword probability.
        keep_digits: tokens containing a digit get probability 1.
    """
    keep = ~tables.is_special[ids]
    pos = np.flatnonzero(keep)
    tid, p = ids[pos], probs[pos].astype(np.float32)
    if len(tid) == 0:
        empty = np.zeros(0, dtype=np.float32)
        return Words(pos, np.zeros(0, dtype=np.int64), empty, empty)
    starts = tables.starts_word[tid].copy()
    starts[0] = True  # the reference would fail on a leading continuation piece; treat it as a word
    first = np.flatnonzero(starts)
    forced = p.copy()
    forced[first[tables.is_force[tid[first]]]] = 1.0
    if keep_digits:
        forced[tables.has_digit[tid]] = 1.0
    # the reference appends the word's *first* probability for every continuation piece to its no-force list
    first_prob = p[first][np.cumsum(starts) - 1]
    return Words(pos, first, _reduce(forced, first, mode), _reduce(first_prob, first, mode))


def _reduce(p: np.ndarray, first: np.ndarray, mode: str) -> np.ndarray:
    if mode == "first":
        return p[first]
    counts = np.diff(np.append(first, len(p))).astype(np.float32)
    # float32 sums, left to right within each word, like the reference's Python `sum` over float32 scalars
    return (np.add.reduceat(p, first) / counts).astype(np.float32)


def word_strings(ids: np.ndarray, words: Words, tables: VocabTables) -> list[str]:
    """The reference's word strings: the first token verbatim, continuation pieces without their marker."""
    tid = ids[words.token_pos]
    toks = tables.tokens[tid]
    pieces = np.where(tables.starts_word[tid], toks, tables.pure[tid])
    pieces[words.first] = toks[words.first]
    bounds = np.append(words.first, len(tid))
    return ["".join(pieces[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def is_cjk(ch: str) -> bool:
    """Whether a character belongs to a script written without spaces (CJK ideographs, kana, hangul)."""
    return bool(_CJK.match(ch))


def _han(ch: str) -> bool:
    return bool(_HAN.match(ch))


def chinese_word_starts(text: str) -> set[int] | None:
    """Where Chinese words start inside runs of Han characters (jieba's segmentation), or None without jieba (the
    `cjk` extra). A BERT-style tokenizer splits Han text into single characters, which would let a pruner keep
    "江" of "长江"."""
    try:
        import jieba  # heavy: a dictionary loads on first use
    except ImportError:
        return None
    jieba.setLogLevel(60)
    return {start for _, start, _ in jieba.tokenize(text)}


def text_units(text: str, token_starts: np.ndarray) -> np.ndarray:
    """Word units of `text` as an [U, 2] array of char ranges: whitespace-separated words, with runs of CJK
    characters further split into words: Chinese by jieba's segmentation when installed, other scripts (and Chinese
    without jieba) where a token starts (CJK has no spaces, so the tokenizer's pieces stand in for words).
    """
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    if not spans:
        return np.zeros((0, 2), dtype=np.int64)
    if not _CJK.search(text):
        return np.array(spans, dtype=np.int64)
    words = chinese_word_starts(text) if _HAN.search(text) else None

    def cut(s: int) -> bool:
        if words is not None and _han(text[s]) and _han(text[s - 1]):
            return s in words  # inside a Han run: only at a word start
        return is_cjk(text[s]) or is_cjk(text[s - 1])

    cuts = np.array(sorted({int(s) for s in token_starts if 0 < s < len(text) and cut(int(s))}
                           | ({w for w in words if 0 < w < len(text) and _han(text[w]) and _han(text[w - 1])}
                              if words is not None else set())), dtype=np.int64)
    out: list[tuple[int, int]] = []
    for s, e in spans:
        inner = cuts[np.searchsorted(cuts, s, side="right"):np.searchsorted(cuts, e, side="left")].tolist()
        bounds = [s, *inner, e]
        out.extend(zip(bounds[:-1], bounds[1:]))
    return np.array(out, dtype=np.int64)
