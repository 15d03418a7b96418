"""A causal LM's version swap in the continuous-batching scheduler: sequences running at the swap finish on the
weights they started on, those waiting start on the new ones, each tagged with the version that generated it."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, ids: list[int], max_new: int) -> list[int]:
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(max_new):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def test_a_swap_waits_for_the_running_sequences_and_starts_the_waiting_ones_on_the_new_model(tiny_lm):
    from keel.serve.scheduler import Scheduler, Sequence

    old, tok = tiny_lm
    new = copy.deepcopy(old)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.2 * torch.randn_like(p))
    done = {}

    def emit(index, kind, payload):
        if kind in ("done", "error"):
            done[index] = payload

    sched = Scheduler(old, tok, max_running=4)
    sched.eos = set()  # random weights: every sequence runs to its full length
    sched.version = "base"
    first = Sequence(tok("The harbour at night")["input_ids"], 30, temperature=0.0, index=0, emit=emit)
    second = Sequence(tok("A ship in the fog")["input_ids"], 8, temperature=0.0, index=1, emit=emit)
    sched.start()
    try:
        sched.submit([first])
        while len(first.out_ids) < 3:  # running
            time.sleep(0.005)
        swapped = []
        swapper = threading.Thread(target=lambda: swapped.append(sched.swap(new, "v0001", "abc", timeout=60)))
        swapper.start()
        while sched._swap is None:
            time.sleep(0.001)
        sched.submit([second])  # arrives while the swap waits for ``first``
        swapper.join(timeout=60)
        deadline = time.time() + 60
        while len(done) < 2 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        sched.stop()
    assert swapped == [True] and len(done) == 2, done
    assert first.version == "base" and first.out_ids == _reference(old, first.prompt_ids, 30)
    assert second.version == "v0001" and second.model_sha256 == "abc"
    assert second.out_ids == _reference(new, second.prompt_ids, 8)
    assert second.out_ids != _reference(old, second.prompt_ids, 8)  # the two models do differ
