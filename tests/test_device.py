"""The device option: auto resolves to what this machine has, a device it lacks is a clear error before any
model loads, and every model-backed method takes it."""

from __future__ import annotations

import pytest
import torch  # noqa: E402

from ragzip import RagZip
from ragzip.errors import ConfigError
from ragzip.registry import resolve_device

DOCS = ["The Rhine rises in the Swiss Alps. It ends in the North Sea near Rotterdam. Paris is in France.",
        "Oxygen is a chemical element. Its symbol is O. The Rhine is long."]


@pytest.mark.parametrize("has_cuda", [True, False])
def test_auto_is_cuda_when_there_is_one_else_cpu(has_cuda: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)  # both answers, whatever this host has
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(has_cuda))
    assert resolve_device("auto") == ("cuda" if has_cuda else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("device, message", [("bogus", "unknown device"), ("xla", "unsupported device"),
                                             ("cuda:99", "CUDA device")])
def test_bad_devices_are_refused_with_the_reason(device: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_cpu_machine_says_so() -> None:
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        RagZip("exit", tokenizer="whitespace", device="cuda")


@pytest.mark.parametrize("method", ["exit", "lingua2", "embed-topk", "crag"])
def test_every_model_backed_method_takes_a_device(method: str) -> None:
    default = RagZip(method, tokenizer="whitespace").compress("Where does the Rhine end?", DOCS, 0.5)
    on_cpu = RagZip(method, tokenizer="whitespace", device="cpu").compress("Where does the Rhine end?", DOCS, 0.5)
    assert [d.text for d in on_cpu.documents] == [d.text for d in default.documents]
    with pytest.raises(ConfigError, match="unknown device"):
        RagZip(method, tokenizer="whitespace", device="bogus").compress("Where?", DOCS, 0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to tell the devices apart")
def test_a_stage_option_wins_over_the_pipeline_device() -> None:
    # The pipeline asks for a device this machine lacks; only the stages' own "cpu" makes it build and run.
    rz = RagZip("exit+lingua2", tokenizer="whitespace", device="cuda", exit={"device": "cpu"},
                lingua2={"device": "cpu"})
    assert [s.options.device for s in rz.compressor.stages] == ["cpu", "cpu"]
    assert rz.compress("Where does the Rhine end?", DOCS, 0.5).text
    with pytest.raises(ConfigError, match="sees no CUDA device"):  # the stage without its own device gets cuda
        RagZip("exit+lingua2", tokenizer="whitespace", device="cuda", lingua2={"device": "cpu"}).compress(
            "Where does the Rhine end?", DOCS, 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exit", "lingua2", "embed-topk"])
def test_cuda_keeps_what_cpu_keeps(method: str) -> None:
    """fp32 on both: the same kept text on the GPU as on the CPU."""
    opts = {} if method == "embed-topk" else {"dtype": "float32"}
    cpu = RagZip(method, tokenizer="whitespace", device="cpu", **opts).compress("Where does the Rhine end?", DOCS, 0.5)
    gpu = RagZip(method, tokenizer="whitespace", device="cuda", **opts).compress("Where does the Rhine end?", DOCS,
                                                                                 0.5)
    assert [d.text for d in gpu.documents] == [d.text for d in cpu.documents]
