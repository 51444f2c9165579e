from __future__ import annotations

import pytest

from ragzip.engine import LocalEngine
from ragzip.errors import ConfigError
from ragzip.kv_engine import KVReuseEngine
from ragzip.types import Document


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return LocalEngine()


def test_prompt_holds_documents_then_question_and_the_clients_turns(engine: LocalEngine) -> None:
    docs = [Document("1", "Paris text", "Paris"), Document("2", "Rome text")]
    text = engine.tokenizer.decode(engine.prompt_ids("Where?", docs))
    assert text.index("Paris\nParis text") < text.index("Rome text") < text.index("Question: Where?")
    own = engine.tokenizer.decode(engine.prompt_ids("Where?", docs, system="Be terse.",
                                                    history=[{"role": "user", "content": "Hi there"}]))
    assert "Be terse." in own and own.index("Hi there") < own.index("Paris text")


def test_both_engines_build_the_same_prompt(engine: LocalEngine) -> None:
    kv = KVReuseEngine(engine.model, engine.tokenizer, run_self_check=False)
    docs = [Document("1", "Paris is in France.", "Paris"), Document("2", "Rome is in Italy.")]
    for system, history in ((None, []), ("Be terse.", [{"role": "user", "content": "Hi"},
                                                       {"role": "assistant", "content": "Hello"}])):
        assert kv.pieces("Where is Paris?", docs, system=system, history=history).token_ids == engine.prompt_ids(
            "Where is Paris?", docs, system=system, history=history)


def test_generates_a_real_answer_on_the_embedded_model(engine: LocalEngine) -> None:
    doc = Document("d", "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.", "Eiffel Tower")
    answer = engine.answer("In which city is the Eiffel Tower?", [doc], max_new_tokens=16)
    assert "Paris" in answer
    assert engine.last_stats.prompt_tokens > 10 and 0 < engine.last_stats.new_tokens <= 16


def test_stream_matches_answer(engine: LocalEngine) -> None:
    doc = Document("d", "Oxygen has the atomic number 8.", "Oxygen")
    streamed = "".join(engine.stream("What is the atomic number of oxygen?", [doc], max_new_tokens=16))
    assert streamed.strip() == engine.answer("What is the atomic number of oxygen?", [doc], max_new_tokens=16)
    assert "8" in streamed


def test_bad_settings(engine: LocalEngine) -> None:
    with pytest.raises(ConfigError):
        list(engine.generate_ids([1, 2, 3], max_new_tokens=-1))
    with pytest.raises(ConfigError):
        LocalEngine(dtype="float7")
