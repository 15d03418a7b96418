"""KServe's v2 health paths answer as keel's own: open without a key, ready only after the warm-up, 503 draining."""

from __future__ import annotations

import pytest

KEY = "health-key-0123456789"


@pytest.fixture
def client():
    from starlette.testclient import TestClient

    from keel.recipe import ServeConfig
    from keel.serve.app import build_app
    from keel.serve.engines import Engine
    from keel.serve.guard import digest

    class Fixed(Engine):
        def embed(self, texts):
            return [{"embedding": [0.5, 0.25], "tokens": 1} for _ in texts]

    guard = build_app(Fixed("fake", "encoder", tokenizer=None, max_length=8), ServeConfig(), [digest(KEY)])
    with TestClient(guard) as c:
        yield c, guard.state


@pytest.mark.parametrize("probe", ["live", "ready"])
def test_kserve_paths_answer_like_keels_own_without_a_key(client, probe):
    c, _ = client
    ours, theirs = c.get(f"/health/{probe}"), c.get(f"/v2/health/{probe}")
    assert theirs.status_code == ours.status_code == 200
    assert theirs.json() == ours.json()
    assert c.get("/v1/models").status_code == 401  # the API itself still needs the key


def test_kserve_ready_turns_503_while_draining_and_before_warm_up(client):
    c, state = client
    state.draining = True
    r = c.get("/v2/health/ready")
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    assert c.get("/v2/health/live").status_code == 200  # draining is not dead: no restart
    state.draining, state.ready = False, False
    r = c.get("/v2/health/ready")
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
