from __future__ import annotations

import pytest

from ragzip.engine import LocalEngine, answer_messages
from ragzip.errors import ConfigError
from ragzip.types import Document


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine()


def test_prompt_holds_documents_and_question() -> None:
    msgs = answer_messages("Where?", [Document("1", "Paris text", "Paris")])
    assert "Paris text" in msgs[-1]["content"] and msgs[-1]["content"].rstrip().endswith("Give a short answer.")
    assert msgs[-1]["content"].count("Where?") == 2


def test_generates_a_real_answer_on_the_embedded_model(engine: LocalEngine) -> None:
    doc = Document("d", "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.", "Eiffel Tower")
    answer = engine.answer("In which city is the Eiffel Tower?", [doc], max_new_tokens=16)
    assert "Paris" in answer
    assert engine.last_stats.prompt_tokens > 10 and 0 < engine.last_stats.new_tokens <= 16


def test_stream_matches_answer(engine: LocalEngine) -> None:
    doc = Document("d", "Oxygen has the atomic number 8.", "Oxygen")
    streamed = "".join(engine.stream("What is the atomic number of oxygen?", [doc], max_new_tokens=12))
    assert streamed.strip() == engine.chat(answer_messages("What is the atomic number of oxygen?", [doc]),
                                           max_new_tokens=12)
    assert "8" in streamed


def test_bad_settings(engine: LocalEngine) -> None:
    with pytest.raises(ConfigError):
        list(engine.generate_ids([1, 2, 3], max_new_tokens=-1))
    with pytest.raises(ConfigError):
        LocalEngine(dtype="float7")
