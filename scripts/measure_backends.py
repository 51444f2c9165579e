"""Which inference backend for the EXIT encoder: speed and parity of each candidate, side by side in one process.

Every candidate runs the same encoder (the shipped EXIT scorer's MiniLM trunk) inside the same `ExitCompressor`
(default auto budget) on held-out HotpotQA questions; parity is the share of questions whose kept units (document
ids and char spans) equal the torch fp32 path's (the model's exact numerics), and `rate` the mean share of tokens
kept (int8's score shifts show as a higher rate under the same calibration). Candidates: torch bf16 (the default
where the CPU has native bf16), torch's dynamic int8, ONNX Runtime fp32 and dynamic int8 (plain, per-channel, and
with the FFN down-projections left in fp32), and OpenVINO bf16/f32 when installed. Not a test: it needs
`pip install onnxruntime==1.32.0 onnx==1.23.2 openvino==2026.4.1` (none is a ragzip dependency; docs/speed.md
says why).

    .venv/bin/python scripts/measure_backends.py --data ../shared/data/hotpotqa_train_hipporag100/normalized.jsonl \\
        --json docs/results/backends.json
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ragzip.compressors.exit import ExitCompressor
from ragzip.compressors.exit_scorers import EncoderScorer
from ragzip.eval.datasets import load_examples
from ragzip.eval.suites.extractive import trained_ids

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Wrapped(torch.nn.Module):
    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                            token_type_ids=token_type_ids).last_hidden_state


class _Session(torch.nn.Module):
    """An exported encoder behind the interface `SentenceSpanScorer.states` calls."""

    def __init__(self, run: Any, config: Any) -> None:
        super().__init__()
        self.run, self.config = run, config

    def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "token_type_ids": token_type_ids.numpy()}
        return SimpleNamespace(last_hidden_state=torch.from_numpy(self.run(feeds)).float())


def _with_encoder(fp32: ExitCompressor, encoder: Any) -> ExitCompressor:
    model = copy.deepcopy(fp32.scorer.model)
    model.encoder = encoder
    scorer = EncoderScorer.from_model(model, fp32.scorer.tokenizer)
    scorer.calibration = fp32.scorer.calibration
    return ExitCompressor(counter=fp32.counter, scorer=scorer)


def candidates(fp32: ExitCompressor, workdir: Path) -> dict[str, ExitCompressor]:
    out = {"torch-fp32": fp32, "torch-bf16": ExitCompressor(counter=fp32.counter, dtype="bfloat16"),
           "torch-int8-dynamic": _with_encoder(fp32, torch.ao.quantization.quantize_dynamic(
               copy.deepcopy(fp32.scorer.model.encoder), {torch.nn.Linear}, dtype=torch.qint8))}
    if importlib.util.find_spec("onnxruntime") is None:
        return out
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    encoder = fp32.scorer.model.encoder
    sample = {k: torch.ones(2, 16, dtype=torch.long) for k in INPUTS}
    plain = workdir / "encoder.onnx"
    # a copy: tracing for export leaves marks on the module it traces, and the fp32 path must stay as users run it
    torch.onnx.export(_Wrapped(copy.deepcopy(encoder)), tuple(sample[k] for k in INPUTS), str(plain),
                      input_names=list(INPUTS), output_names=["states"], opset_version=17, dynamo=False,
                      dynamic_axes={k: {0: "batch", 1: "seq"} for k in (*INPUTS, "states")})
    names = [n.name for n in onnx.load(str(plain)).graph.node if n.op_type == "MatMul"]
    down = [n for n in names if "output/dense" in n and "attention" not in n]
    variants = {"ort-fp32": plain}
    for label, kwargs in {"ort-int8-dynamic": {}, "ort-int8-per-channel": {"per_channel": True},
                          "ort-int8-per-channel-fp32-ffn-down": {"per_channel": True, "nodes_to_exclude": down}
                          }.items():
        path = workdir / f"{label}.onnx"
        quantize_dynamic(str(plain), str(path), weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True}, **kwargs)
        variants[label] = path
    for label, path in variants.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out[label] = _with_encoder(fp32, _Session(lambda feeds, s=session: s.run(None, feeds)[0], encoder.config))
    if importlib.util.find_spec("openvino") is not None:
        import openvino as ov

        core = ov.Core()
        for hint in ("f32", "bf16"):
            compiled = core.compile_model(str(plain), "CPU", {"INFERENCE_PRECISION_HINT": hint,
                                                              "INFERENCE_NUM_THREADS": torch.get_num_threads()})
            request = compiled.create_infer_request()
            out[f"openvino-{hint}"] = _with_encoder(fp32, _Session(
                lambda feeds, r=request: r.infer(feeds)[0].copy(), encoder.config))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    skip = trained_ids()
    examples = [ex for ex in load_examples(args.data) if ex.id not in skip][: args.limit]
    fp32 = ExitCompressor(dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        paths = candidates(fp32, Path(tmp))
        for comp in paths.values():
            comp.compress(examples[0].question, examples[0].documents())
        times: dict[str, list[float]] = {k: [] for k in paths}
        kept: dict[str, list[Any]] = {k: [] for k in paths}
        rates: dict[str, list[float]] = {k: [] for k in paths}
        for ex in examples:  # interleaved: a slow moment of the machine slows every candidate alike
            for name, comp in paths.items():
                start = time.perf_counter()
                res = comp.compress(ex.question, ex.documents())
                times[name].append(time.perf_counter() - start)
                kept[name].append([(d.id, tuple(d.offsets)) for d in res.documents])
                rates[name].append(res.tokens_after / max(1, res.tokens_before))
    out: dict[str, Any] = {"n": len(examples), "threads": torch.get_num_threads(), "torch": torch.__version__}
    for name in paths:
        out[name] = {"ms_per_question_median": round(1000 * statistics.median(times[name]), 1),
                     "parity_units_vs_fp32": round(statistics.fmean(
                         float(a == b) for a, b in zip(kept[name], kept["torch-fp32"])), 4),
                     "rate": round(statistics.fmean(rates[name]), 4)}
        print(name, out[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
