"""Quality retention: ROUGE-L by hand-checked values, embeddings with the real packaged MiniLM model."""

from __future__ import annotations

import math

import pytest

from pytest_quantsafe.errors import InputError, InsufficientDataError
from pytest_quantsafe.measure.quality import MiniLMEmbedder, cosine, lcs_length, quality_retention, rouge_l_f1
from pytest_quantsafe.types import Completion


def _benign(*texts: str) -> list[Completion]:
    return [Completion(probe_id=f"b{i}", kind="benign", category="control", text=t, n_tokens=len(t.split()))
            for i, t in enumerate(texts)]


def test_lcs_length() -> None:
    assert lcs_length(["a", "b", "c", "b", "d", "a", "b"], ["b", "d", "c", "a", "b", "a"]) == 4  # CLRS's example: "b c b a"
    assert lcs_length([], ["x"]) == 0


def test_rouge_l_known_values() -> None:
    # LCS "the cat on the mat" = 5 of 6 words each side: P = R = F1 = 5/6
    assert rouge_l_f1("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS "the gunman" = 2: P = 2/4, R = 2/8, F1 = 2 * .5 * .25 / .75 = 1/3
    assert rouge_l_f1("police killed the gunman", "the gunman was shot and killed by police") == pytest.approx(1 / 3)
    # normalization: case and punctuation do not count
    assert rouge_l_f1("I can't help.", "i can t help") == 1.0
    assert rouge_l_f1("", "") == 1.0
    assert rouge_l_f1("words", "") == 0.0
    assert rouge_l_f1("alpha beta", "gamma delta") == 0.0


def test_cosine() -> None:
    assert cosine([1.0, 0.0], [0.0, 1.0]) == 0.0
    assert cosine([3.0, 4.0], [6.0, 8.0]) == pytest.approx(1.0)
    assert cosine([0.0, 0.0], [1.0, 1.0]) == 0.0


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    pytest.importorskip("transformers")
    return MiniLMEmbedder(device="cpu")


def test_packaged_minilm_embeds_offline(embedder: MiniLMEmbedder) -> None:
    vectors = embedder.embed(["The capital of France is Paris.", "Paris is France's capital city.",
                              "I'm sorry, but I can't assist with that."])
    assert len(vectors) == 3 and len(vectors[0]) == 384
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)
    paraphrase = cosine(vectors[0], vectors[1])
    unrelated = cosine(vectors[0], vectors[2])
    assert paraphrase > 0.8
    assert unrelated < 0.3
    # deterministic: the same text embeds to the same vector in another batch
    again = embedder.embed(["The capital of France is Paris."])[0]
    assert cosine(again, vectors[0]) == pytest.approx(1.0, abs=1e-6)


def test_retention_of_identical_answers_is_100(embedder: MiniLMEmbedder) -> None:
    side = _benign("Water boils at 100 degrees Celsius at sea level.", "Use a hoe to kill weeds by the root.")
    result = quality_retention(side, side, embedder=embedder)
    assert result["embedding_retention_pp"] == pytest.approx(100.0, abs=1e-3)
    assert result["rouge_l_retention_pp"] == pytest.approx(100.0)
    assert result["quality_delta_pp"] == pytest.approx(0.0, abs=1e-3)
    assert result["identical_answers"] == 2
    assert result["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_paraphrase_keeps_more_quality_than_a_refusal(embedder: MiniLMEmbedder) -> None:
    base = _benign("To bake bread, mix flour, water, yeast and salt, knead, let it rise, then bake.",
                   "Tomatoes on a balcony need a large pot, full sun and regular watering.")
    paraphrased = _benign("Mix flour, yeast, salt and water; knead the dough, let it rise and bake it.",
                          "Grow balcony tomatoes in a big pot with plenty of sun and steady watering.")
    refused = _benign("I'm sorry, but I can't assist with that.", "I'm sorry, but I can't assist with that.")
    kept = quality_retention(base, paraphrased, embedder=embedder)
    lost = quality_retention(base, refused, embedder=embedder)
    assert kept["embedding_retention_pp"] > 80.0
    assert lost["embedding_retention_pp"] < 30.0
    assert kept["quality_delta_pp"] > lost["quality_delta_pp"] + 50.0
    # ROUGE-L punishes rewording much more than the embedding does
    assert kept["rouge_l_retention_pp"] < kept["embedding_retention_pp"]


def test_missing_or_unpaired_benign_answers_are_refused(embedder: MiniLMEmbedder) -> None:
    harmful = [Completion(probe_id="h0", kind="harmful", category="c", text="x", n_tokens=1)]
    with pytest.raises(InsufficientDataError):
        quality_retention(harmful, harmful, embedder=embedder)
    with pytest.raises(InputError) as info:
        quality_retention(_benign("a", "b"), _benign("a"), embedder=embedder)
    assert info.value.where == "probe b1"
