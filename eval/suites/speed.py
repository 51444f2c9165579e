"""Eval suite "speed": compression on the request path, timed side by side in one process on the same inputs.

* EXIT per question, single calls, interleaved question by question (so a noisy neighbour slows every path alike):
  the default path (bf16 where the CPU has native bf16, forward shape by dtype, `exit_encoder.forward_shape`), the
  previous default (bf16 at 16 windows / 10% padding per forward: the reference for speed-ups), fp32 (the model's
  exact numerics: the parity reference), and, as the evidence for the backend choice, torch's dynamic int8.
* EXIT throughput with `compress_many` at batch sizes 1/4/16 (ms per question).
* `embed-topk` and `exit+lingua2` per question; lingua2 with the question on a 10k-token text and on a 20-passage
  RAG prompt next to `llmlingua` 0.2.2 on the same checkpoint (when llmlingua is installed).
* Parity: the share of questions whose kept units (document ids and char spans) equal the fp32 reference's; the
  same for int8 and for batched vs single calls; support recall / answer survival of each path (issue 21's figures).

Stable keys: `exit_ms_per_question`, `exit_ms_per_question_reference`, `exit_batch16_speedup`,
`lingua2_query_10k_s`, `llmlingua_10k_s`, `lingua2_query_speedup_vs_llmlingua_10k`,
`lingua2_query_speedup_vs_llmlingua_rag`, `parity_units`, `backend`.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ragzip.errors import InputError
from ragzip.eval.datasets import Example, load_examples
from ragzip.eval.metrics import paired_bootstrap_ci, ratio_bootstrap_ci
from ragzip.options import refuse_unknown
from ragzip.types import CompressionResult

_KEYS = ("batch_sizes", "int8", "lingua2", "repeats", "others", "exclude_trained")


def _units(result: CompressionResult) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    return [(d.id, tuple((s.start, s.end) for s in d.spans)) for d in result.documents]


def _median_ms(times: Sequence[float]) -> float:
    return round(1000 * statistics.median(times), 2) if times else float("nan")


def _interleaved(paths: dict[str, Callable[[Example], CompressionResult]], examples: Sequence[Example]
                 ) -> tuple[dict[str, list[float]], dict[str, list[CompressionResult]]]:
    """Each path on each question, question by question (paths alternate), after one warm-up call each."""
    for run in paths.values():
        run(examples[0])
    times: dict[str, list[float]] = {name: [] for name in paths}
    results: dict[str, list[CompressionResult]] = {name: [] for name in paths}
    for ex in examples:
        for name, run in paths.items():
            start = time.perf_counter()
            results[name].append(run(ex))
            times[name].append(time.perf_counter() - start)
    return times, results


def _int8_compressor(fp32: Any) -> Any:
    """EXIT over a copy of the fp32 encoder with torch's dynamic int8 linear layers (fbgemm), same calibration."""
    import torch

    from ragzip.compressors.exit import ExitCompressor
    from ragzip.compressors.exit_scorers import EncoderScorer

    model = copy.deepcopy(fp32.scorer.model)
    model.encoder = torch.ao.quantization.quantize_dynamic(model.encoder, {torch.nn.Linear}, dtype=torch.qint8)
    scorer = EncoderScorer.from_model(model, fp32.scorer.tokenizer)
    scorer.calibration = fp32.scorer.calibration
    return ExitCompressor(counter=fp32.counter, scorer=scorer)


def run(data: Path, *, limit: int | None, seed: int, options: dict[str, str]) -> dict[str, Any]:
    """Options: `batch_sizes` (default "1,4,16"), `int8` (1: time torch's dynamic int8 too, default 1), `lingua2`
    (1: lingua2 vs llmlingua on 10k tokens and a 20-passage prompt, default 1 when llmlingua is installed),
    `repeats` (lingua2 timing repeats, default 2), `others` (1: embed-topk and exit+lingua2, default 1),
    `exclude_trained` (default 1: skip the questions the EXIT encoder trained on)."""
    import torch

    from ragzip.compressors.exit import ExitCompressor
    from ragzip.eval.suites.extractive import _aggregate, _per_question, trained_ids
    from ragzip.pipeline import build_compressor
    from ragzip.tokens import get_token_counter

    refuse_unknown(options, _KEYS, "eval suite 'speed'")
    skip = trained_ids() if options.get("exclude_trained", "1") not in ("0", "false") else set()
    examples = [ex for ex in load_examples(data) if ex.id not in skip and ex.contexts][: limit or 48]
    if not examples:
        raise InputError(f"{data}: no examples with contexts (after excluding trained ids)")
    counter = get_token_counter(None)
    default = ExitCompressor(counter=counter)
    previous = ExitCompressor(counter=counter, batch_size=16)
    previous.scorer.max_padding = 0.1  # the forward shape before this suite's issue (bf16: 16 windows, 10% padding)
    fp32 = ExitCompressor(counter=counter, dtype="float32")
    paths: dict[str, Any] = {"default": default, "previous": previous, "fp32": fp32}
    if options.get("int8", "1") not in ("0", "false"):
        paths["int8"] = _int8_compressor(fp32)
    dtype = next(default.scorer.model.parameters()).dtype
    out: dict[str, Any] = {"data": str(data), "n": len(examples), "num_excluded_trained": len(skip),
                           "backend": f"torch-{str(dtype).removeprefix('torch.')}", "threads": torch.get_num_threads(),
                           "tokens_per_question_mean": statistics.fmean(
                               sum(counter.count_batch([d.text for d in ex.documents()])) for ex in examples)}
    times, results = _interleaved({name: (lambda ex, c=c: c.compress(ex.question, ex.documents()))
                                   for name, c in paths.items()}, examples)
    for name in paths:
        key = "exit_ms_per_question" if name == "default" else f"exit_ms_per_question_{name}"
        out[key] = _median_ms(times[name])
        rows = [(ex, ex.documents(), r) for ex, r in zip(examples, results[name])]
        out.update({f"quality.{name}.{k}": round(v, 4) for k, v in _aggregate(rows).items()})
        same = [float(_units(a) == _units(b)) for a, b in zip(results[name], results["fp32"])]
        out[f"parity_units_{name}_vs_fp32"] = round(statistics.fmean(same), 4)
        out[f"parity_units_{name}_vs_fp32_ci"] = [round(x, 4) for x in paired_bootstrap_ci(same, seed=seed)]
    fp32_rows = [(ex, ex.documents(), r) for ex, r in zip(examples, results["fp32"])]
    for name in paths:
        if name != "fp32":  # support recall of each path minus the fp32 reference's, paired over questions
            mine = _per_question([(ex, ex.documents(), r) for ex, r in zip(examples, results[name])])
            out[f"quality.{name}.support_recall_delta_vs_fp32_ci"] = [round(x, 4) for x in ratio_bootstrap_ci(
                *mine, baseline=_per_question(fp32_rows), seed=seed)]
    out["exit_ms_per_question_reference"] = out.pop("exit_ms_per_question_previous")
    out["exit_speedup_vs_reference"] = round(out["exit_ms_per_question_reference"] / out["exit_ms_per_question"], 2)
    out["parity_units"] = out["parity_units_default_vs_fp32"]
    out["parity_units_default_vs_reference"] = round(statistics.fmean(
        float(_units(a) == _units(b)) for a, b in zip(results["default"], results["previous"])), 4)

    sizes = [int(b) for b in options.get("batch_sizes", "1,4,16").split(",") if b.strip()]
    for size in sizes:
        default.compress_many([(ex.question, ex.documents()) for ex in examples[:size]])  # warm-up
        start = time.perf_counter()
        batched: list[CompressionResult] = []
        for i in range(0, len(examples), size):
            batched += default.compress_many([(ex.question, ex.documents()) for ex in examples[i:i + size]])
        out[f"exit_batch{size}_ms_per_question"] = round(1000 * (time.perf_counter() - start) / len(examples), 2)
        out[f"batch{size}_parity_units_vs_single"] = round(statistics.fmean(
            float(_units(a) == _units(b)) for a, b in zip(batched, results["default"])), 4)
    if 16 in sizes:
        out["exit_batch16_speedup"] = round(out["exit_ms_per_question_reference"] / out["exit_batch16_ms_per_question"],
                                            2)

    if options.get("others", "1") not in ("0", "false"):
        others = {"embed-topk": build_compressor("embed-topk", counter=counter),
                  "exit+lingua2": build_compressor("exit+lingua2", counter=counter)}
        budgets = {"embed-topk": 0.5, "exit+lingua2": None}
        other_times, _ = _interleaved({name: (lambda ex, c=c, b=budgets[name]: c.compress(ex.question,
                                                                                          ex.documents(), b))
                                       for name, c in others.items()}, examples)
        for name in others:
            out[f"{name}_ms_per_question"] = _median_ms(other_times[name])
    if options.get("lingua2", "1") not in ("0", "false"):
        out.update(_lingua2_vs_llmlingua(examples, int(options.get("repeats", "2"))))
    if torch.cuda.is_available():
        out.update(_gpu_throughput(examples))
    return out


def _lingua2_vs_llmlingua(examples: Sequence[Example], repeats: int) -> dict[str, Any]:
    """lingua2 (query-aware default and without the question) vs llmlingua on the same checkpoint (see the lingua2
    suite's `_speed`): a 10k-token text and a 20-passage prompt built from the questions' passages."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("llmlingua") is None:
        return {"llmlingua": "not installed (pip install '.[dev]')"}
    from ragzip.compressors.lingua2_model import save_full_model
    from ragzip.eval.suites.lingua2 import _speed, cl100k_counter

    passages = [d.text for ex in examples for d in ex.documents()]
    words = " ".join(passages).split()
    inputs = {"10k": [" ".join((words * (1 + 7500 // max(1, len(words))))[:7500])], "rag": passages[:20]}
    counter = cl100k_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # llmlingua picks its word-merging rule by the folder name: the name the lingua2 suite uses
        model_dir = save_full_model(Path(tmp) / "ragzip-lingua2-bert-base-multilingual-cased")
        speed = _speed(model_dir, inputs, counter, repeats, examples[0].question)
    return {"lingua2_query_10k_s": speed["seconds_ragzip_query_10k"],
            "lingua2_10k_s": speed["seconds_ragzip_exact_10k"],
            "llmlingua_10k_s": speed["seconds_llmlingua_10k"],
            "lingua2_query_rag_s": speed["seconds_ragzip_query_rag"],
            "llmlingua_rag_s": speed["seconds_llmlingua_rag"],
            "lingua2_query_speedup_vs_llmlingua_10k": speed["speedup_query_10k"],
            "lingua2_query_speedup_vs_llmlingua_rag": speed["speedup_query_rag"],
            "lingua2_speedup_vs_llmlingua_10k": speed["speedup_exact_10k"],
            "speed_tokens": {k: sum(counter.count_batch(v)) for k, v in inputs.items()}}


def _gpu_throughput(examples: Sequence[Example]) -> dict[str, Any]:
    """EXIT questions per second on the GPU at batch 64 (bf16 by `dtype=auto`)."""
    from ragzip.compressors.exit import ExitCompressor

    gpu = ExitCompressor(device="cuda")
    batch = [(ex.question, ex.documents()) for ex in (list(examples) * (1 + 64 // len(examples)))[:64]]
    gpu.compress_many(batch)
    start = time.perf_counter()
    gpu.compress_many(batch)
    return {"gpu_exit_questions_per_s_batch64": round(64 / (time.perf_counter() - start), 1)}
