"""The blending gate: is selective recompute safe on this model, and at which ratio?

CacheBlend's premises (the deviation of reused caches sits in few tokens, and an early layer's ranking finds them)
were shown on 7B–70B models; on 0.5B models they fail, and a blend then gives a fluent, different answer. So a
model (with its dtype, the store's codec and the blend configuration) is *qualified* once by calibration: a few
multi-document prompts are answered greedily by full prefill and by blending at each ratio of a ladder; the
smallest ratio whose answers are identical to full prefill's on at least ``threshold`` of the prompts is the
qualified ratio, or, when none is, the model is unqualified and `ReuseMode.AUTO` never blends on it.

The calibration prompts come from the bundled demo corpus (SQuAD paragraphs, CC BY-SA 4.0): each question with
its paragraph among five others, the gold paragraph at a rotating place. The verdict is cached as JSON under the
cache dir (``<cache_dir>/kv-qualify/``), keyed by everything it depends on; a bad or foreign file is ignored
and recomputed.

Example:
    >>> q = load_or_qualify(engine)          # cached after the first call
    >>> q.qualified, q.ratio, q.reason
    (False, None, 'no ratio up to 50% kept the answers: ...')
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragzip.demo import load_demo_corpus
from ragzip.errors import ConfigError
from ragzip.types import Document

if TYPE_CHECKING:
    from ragzip.kv_engine import KVReuseEngine

__all__ = ["DEFAULT_RATIOS", "LENGTH_SLACK", "Qualification", "cached_qualification", "calibration_prompts",
           "load_or_qualify", "qualify"]

log = logging.getLogger(__name__)

FORMAT = "ragzip-kv-qualification"
VERSION = 2  # 2: verdicts carry the longest calibration prompt (auto blends only up to it)
CALIBRATION_SET = "demo-squad-v1"  # bump when calibration_prompts changes: cached verdicts then recompute
DEFAULT_RATIOS = (0.15, 0.3, 0.5)  # above half the prompt recomputed, blending no longer pays for its risk
DEFAULT_THRESHOLD = 0.9
DEFAULT_PROMPTS = 10
DEFAULT_DOCS_PER_PROMPT = 6
DEFAULT_MAX_NEW_TOKENS = 24
# A verdict covers prompts up to this many times its longest calibration prompt: Qwen2.5-1.5B qualified at 15% on
# ~1k-token prompts kept only 1 of 4 answers on held-out 6k-token ones, so agreement does not carry to length.
LENGTH_SLACK = 1.25
MAX_FILE_BYTES = 64 << 10

Prompt = tuple[str, Sequence[Document]]


@dataclass(frozen=True, slots=True)
class Qualification:
    """A model's blending verdict.

    Attributes:
        qualified: some ratio of the ladder kept the answers on ``threshold`` of the calibration prompts.
        ratio: the smallest such ratio (None when unqualified).
        reason: one sentence a response can carry.
        agreement: per ratio tried, ``[identical answers, prompts asked]`` (asking stops once a ratio has failed).
        identity: what the verdict depends on (model fingerprint, codec, blend configuration, ladder, ...).
        seconds: how long the calibration took.
        max_prompt_tokens: the longest calibration prompt; `auto` blends only prompts up to `LENGTH_SLACK` times it
            (0: no limit, e.g. a verdict given in code).
    """

    qualified: bool
    ratio: float | None
    reason: str
    agreement: dict[str, list[int]] = field(default_factory=dict)
    identity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    max_prompt_tokens: int = 0

    def covers(self, prompt_tokens: int) -> bool:
        """Whether a prompt of this length is within what the calibration measured."""
        return self.max_prompt_tokens <= 0 or prompt_tokens <= LENGTH_SLACK * self.max_prompt_tokens

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}


def calibration_prompts(n: int = DEFAULT_PROMPTS, docs_per_prompt: int = DEFAULT_DOCS_PER_PROMPT) -> list[Prompt]:
    """``n`` multi-document prompts from the bundled demo corpus: each question, its paragraph and distractors.

    Deterministic: question ``i`` takes every (38 // n)-th question, distractors are the paragraphs that follow
    its own in the corpus, and the gold paragraph sits at place ``i % docs_per_prompt``.
    """
    docs, questions = load_demo_corpus()
    if not 1 <= n <= len(questions) or not 1 <= docs_per_prompt <= len(docs):
        raise ConfigError(f"calibration needs 1..{len(questions)} prompts of 1..{len(docs)} documents")
    by_id = {d.id: i for i, d in enumerate(docs)}
    step = len(questions) // n
    prompts: list[Prompt] = []
    for i in range(n):
        q = questions[i * step]
        gold = by_id[q["source"]]
        others = [docs[(gold + j) % len(docs)] for j in range(1, docs_per_prompt)]
        place = i % docs_per_prompt
        prompts.append((q["question"], others[:place] + [docs[gold]] + others[place:]))
    return prompts


def identity(engine: KVReuseEngine, *, ratios: Sequence[float], threshold: float, prompts: int,
             max_new_tokens: int, docs_per_prompt: int = DEFAULT_DOCS_PER_PROMPT) -> dict[str, Any]:
    """Everything a verdict depends on: the same identity gives the same verdict."""
    codec = getattr(engine.store, "codec", None)  # a custom ChunkStore may keep records as they are
    blend = {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(engine.blend).items()
             if k != "recompute_ratio"}
    codec_id = "none" if codec is None else f"{codec.name}@{codec.version}"
    return {"fingerprint": engine.fingerprint, "codec": codec_id, "blend": blend,
            "ratios": [float(r) for r in ratios], "threshold": float(threshold), "prompts": int(prompts),
            "docs_per_prompt": int(docs_per_prompt),
            "max_new_tokens": int(max_new_tokens), "calibration": CALIBRATION_SET, "context": len(engine.context)}


def qualify(engine: KVReuseEngine, *, ratios: Sequence[float] = DEFAULT_RATIOS, threshold: float = DEFAULT_THRESHOLD,
            prompts: Sequence[Prompt] | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Qualification:
    """Calibrate ``engine``'s model: the smallest ratio whose greedy answers equal full prefill's often enough.

    Runs on a scratch in-memory store with the engine's codec (the user's store is not touched). Each ratio stops
    being asked once it has failed more prompts than ``threshold`` allows.

    Args:
        engine: the engine whose model, codec and blend configuration are qualified.
        ratios: recompute ratios to try, ascending.
        threshold: share of prompts whose answers must be identical to full prefill's.
        prompts: ``(question, documents)`` pairs (default `calibration_prompts()`).
        max_new_tokens: answer length compared.
    """
    from ragzip.kv_engine import ReuseMode

    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios) or list(ratios) != sorted(ratios):
        raise ConfigError(f"qualification ratios must be ascending in [0, 1], got {list(ratios)}")
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"qualification threshold must be in (0, 1], got {threshold}")
    asked = list(prompts) if prompts is not None else calibration_prompts()
    if not asked:
        raise ConfigError("qualification needs at least one prompt")
    scratch = engine.scratch()
    longest = max(len(scratch.pieces(q, docs).token_ids) for q, docs in asked)
    start = time.perf_counter()
    full: dict[int, str] = {}  # full prefill's answers, computed as prompts are asked (failing ratios stop early)
    allowed = len(asked) - _needed(len(asked), threshold)
    agreement: dict[str, list[int]] = {}
    for ratio in ratios:
        cfg = replace(engine.blend, recompute_ratio=float(ratio))
        same = done = 0
        for i, (q, docs) in enumerate(asked):
            if i not in full:
                full[i] = scratch.answer(q, docs, max_new_tokens=max_new_tokens, mode=ReuseMode.FULL)
            same += scratch.answer(q, docs, max_new_tokens=max_new_tokens, mode=ReuseMode.BLEND, blend=cfg) == full[i]
            done += 1
            if done - same > allowed:
                break
        agreement[_key(ratio)] = [same, done]
        if done - same <= allowed:
            seconds = time.perf_counter() - start
            reason = (f"qualified for blending at {ratio:.0%}: answers identical to full prefill's on {same}/{done} "
                      f"calibration prompts of up to {longest} tokens")
            return Qualification(True, float(ratio), reason, agreement, {}, round(seconds, 2), longest)
    seconds = time.perf_counter() - start
    tried = ", ".join(f"{float(r):.0%}: {a}/{n}" for r, (a, n) in agreement.items())
    reason = (f"not qualified for blending: no ratio up to {max(ratios):.0%} kept full prefill's answers on "
              f"{threshold:.0%} of the calibration prompts ({tried})")
    return Qualification(False, None, reason, agreement, {}, round(seconds, 2), longest)


def _needed(n: int, threshold: float) -> int:
    """Prompts that must agree: ceil(threshold * n), robust to float error (0.9 * 10 is 9.000000000000002)."""
    return min(n, int(-(-round(threshold * n, 9) // 1)))


def _key(ratio: float) -> str:
    return f"{float(ratio):g}"


def _cache_file(cache_dir: Path, ident: dict[str, Any]) -> Path:
    digest = hashlib.blake2b(json.dumps(ident, sort_keys=True).encode("utf-8"), digest_size=10).hexdigest()
    return cache_dir / "kv-qualify" / f"{ident['fingerprint']}-{digest}.json"


def _default_dir() -> Path:
    from ragzip.registry import default_cache_dir

    return default_cache_dir()


# The identity field an engine accepts from another calibration (longer prompts); everything else, the threshold
# and the number of prompts included, must be the default, so a weaker calibration is never adopted.
_CALIBRATION_CHOICES = ("docs_per_prompt",)


def _read(path: Path, ident: dict[str, Any], *, any_calibration: bool = False) -> Qualification | None:
    """The cached verdict at ``path`` if it is well formed and for ``ident`` (``any_calibration``: for the same
    model, codec and blend configuration, whatever the calibration options); None otherwise (it is recomputed)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ValueError("too large")
        data = json.loads(raw.decode("utf-8"))
        found = data.get("identity")
        if any_calibration and isinstance(found, dict):
            ident = {**ident, **{k: found.get(k) for k in _CALIBRATION_CHOICES}}
        if data.get("format") != FORMAT or data.get("version") != VERSION or found != ident:
            raise ValueError("another format, version or identity")
        qualified, ratio = data["qualified"], data["ratio"]
        if not isinstance(qualified, bool) or not isinstance(data["reason"], str):
            raise ValueError("bad field types")
        if qualified != (ratio is not None) or (ratio is not None and float(ratio) not in ident["ratios"]):
            raise ValueError("a ratio that does not match the verdict")
        if int(data["max_prompt_tokens"]) <= 0:  # calibration always records its longest prompt
            raise ValueError("no calibration prompt length")
        agreement = {str(k): [int(a), int(n)] for k, (a, n) in dict(data["agreement"]).items()}
        return Qualification(qualified, None if ratio is None else float(ratio), data["reason"], agreement, ident,
                             float(data.get("seconds", 0.0)), int(data["max_prompt_tokens"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as exc:
        log.warning("ignoring the cached blending verdict %s (%s); it will be recomputed", path, exc)
        return None


def _write(path: Path, verdict: Qualification) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(verdict.as_dict(), fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)  # e.g. a full disk: no half-written temp file left behind
        raise  # atomic: a reader sees the old verdict or the new one, never half of one


def cached_qualification(engine: KVReuseEngine, cache_dir: Path | None = None) -> Qualification | None:
    """A cached verdict for ``engine`` (its model, codec and blend configuration), or None (nothing is computed).

    Of several calibrations (e.g. `ragzip kv qualify --docs-per-prompt 24` beside the default), the one on the
    longest prompts is taken: it covers the most.
    """
    ident = identity(engine, ratios=DEFAULT_RATIOS, threshold=DEFAULT_THRESHOLD, prompts=DEFAULT_PROMPTS,
                     max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    folder = _cache_file(cache_dir or _default_dir(), ident).parent
    found = [q for path in sorted(folder.glob(f"{engine.fingerprint}-*.json"))
             if (q := _read(path, ident, any_calibration=True)) is not None]
    return max(found, key=lambda q: (q.max_prompt_tokens, not q.qualified), default=None)  # a tie: the cautious one


def load_or_qualify(engine: KVReuseEngine, *, cache_dir: Path | None = None, force: bool = False,
                    ratios: Sequence[float] = DEFAULT_RATIOS, threshold: float = DEFAULT_THRESHOLD,
                    prompts: int = DEFAULT_PROMPTS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                    docs_per_prompt: int = DEFAULT_DOCS_PER_PROMPT) -> Qualification:
    """The cached verdict for ``engine``, or calibrate now and cache it (``force``: always calibrate).

    ``docs_per_prompt``: paragraphs a calibration prompt (6: ~1k tokens; up to 38: ~5k); a qualified verdict covers
    prompts up to `LENGTH_SLACK` times the longest calibration prompt, so qualify with the prompt sizes you serve.
    """
    ident = identity(engine, ratios=ratios, threshold=threshold, prompts=prompts, max_new_tokens=max_new_tokens,
                     docs_per_prompt=docs_per_prompt)
    path = _cache_file(cache_dir or _default_dir(), ident)
    if not force:
        found = _read(path, ident)
        if found is not None:
            return found
    log.info("qualifying %s for blending on %d calibration prompts (once; cached in %s)", engine.fingerprint,
             prompts, path)
    verdict = replace(qualify(engine, ratios=ratios, threshold=threshold,
                              prompts=calibration_prompts(prompts, docs_per_prompt), max_new_tokens=max_new_tokens),
                      identity=ident)
    try:
        _write(path, verdict)
    except OSError as exc:  # a read-only cache dir: the verdict still holds for this process
        log.warning("could not cache the blending verdict in %s: %s", path, exc)
    return verdict
