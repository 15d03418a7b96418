"""The serving engine's forward groups: texts sorted by length, a few per forward pass, answered in request order."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_forward_groups_spanning_several_passes_keep_request_order():
    from keel.serve.engines import load_engine

    engine = load_engine("tiny-bert")
    texts = [
        "a much longer text about a car that drove itself home through the rain",
        "short",
        "a text of middling length here",
        "x",
        "another fairly long one about traffic lights and bridges",
        "mid one",
    ]
    engine.forward_batch_size = None  # one padded pass over every text
    whole = engine.embed(texts)
    engine.forward_batch_size = 2  # three passes, none in request order
    groups = engine.embed(texts)
    assert [r["tokens"] for r in groups] == [r["tokens"] for r in whole]
    assert len({r["tokens"] for r in groups}) > 2  # the lengths differ, so sorting reorders them
    for g, w in zip(groups, whole):
        assert torch.allclose(torch.tensor(g["embedding"]), torch.tensor(w["embedding"]), atol=1e-5)
    alone = [engine.embed([t])[0]["embedding"] for t in texts]  # each text on its own: no padding at all
    for g, a in zip(groups, alone):
        assert torch.allclose(torch.tensor(g["embedding"]), torch.tensor(a), atol=1e-5)
