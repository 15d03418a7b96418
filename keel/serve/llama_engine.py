"""`keel serve RUN --engine llama.cpp`: a run's GGUF export generating through llama-cpp-python, behind keel's API.

Everything in front stays keel's: routes, auth, limits, queue bound and 429s, deadlines, metrics, streaming,
stop strings, seeds. Only the token loop changes: ``LlamaScheduler`` has the ``Scheduler``'s interface (submit,
try_submit, start, stop, running, waiting) and its row logic (incremental detokenization with the run's own
tokenizer, stop strings, events), and gets each next token from ``llama_cpp.Llama.generate``.

Which export: the target is a run directory, whose export ``serve.backend`` names (gguf-q8_0, ...; ``auto``: the
first present of gguf-q4_k_m, gguf-q8_0, gguf-f16, the fastest first), or an export folder itself. The folder is
checked against its manifest before anything in it is read.

Honest limit: one llama.cpp context, so sequences run one after another (first come, first served); the others
wait in keel's queue (``serve.max_queue``), and a cancelled or timed-out one leaves it at once. Concurrent
streams want keel's own engine (continuous batching), or llama.cpp's multi-sequence batches (not done yet).
"""

from __future__ import annotations

import logging
import queue as thread_queue
import random
import threading
from collections import deque
from pathlib import Path

from keel.errors import KeelError
from keel.serve.scheduler import Scheduler, Sequence, is_greedy

logger = logging.getLogger(__name__)

PREFERENCE = ("gguf-q4_k_m", "gguf-q8_0", "gguf-f16")


def pick_variant(run_dir: Path, backend: str) -> str:
    from keel.export.gguf import gguf_variants

    have = gguf_variants(run_dir)
    if backend not in ("auto", "torch"):
        if backend not in have:
            raise KeelError(
                f"serve.backend={backend}: {run_dir} has no such GGUF export (it has: {', '.join(have) or 'none'}); "
                f"run `keel export {run_dir} --target gguf --quant {backend.removeprefix('gguf-')}`"
            )
        return backend
    for name in PREFERENCE:
        if name in have:
            return name
    raise KeelError(
        f"--engine llama.cpp serves a GGUF export and {run_dir} has none; run `keel export {run_dir} --target gguf`"
    )


def load_gguf(target: Path, backend: str = "auto", threads: int | None = None) -> dict:
    """A causal-LM run directory (its GGUF export ``backend``) or a GGUF export folder itself -> what the ``Engine``
    is made of (keel/serve/engines.py): model_id, tokenizer, context, variant, the ``Llama`` and its scheduler."""
    import json

    from transformers import AutoTokenizer

    from keel.export import gguf
    from keel.io import verify_manifest
    from keel.rundir import export_dir

    target = Path(target)
    if (target / "model.gguf").is_file():  # runs/<name>/export/gguf-q8_0/, or one a benchmark wrote
        folder, model_id = target, target.parent.parent.name if target.parent.name == "export" else target.name
    elif (target / "model" / "keel.json").is_file():
        from keel.runtime.load import verified_model

        info = verified_model(target)
        if info.get("task") != "causal-lm":
            raise KeelError(f"--engine llama.cpp serves causal-lm runs; {target} is a {info.get('task')} run")
        folder, model_id = export_dir(target, pick_variant(target, backend)), target.name
    else:
        raise KeelError(
            f"--engine llama.cpp serves a causal-lm run directory with a GGUF export, or the export folder itself; "
            f"{target} is neither (export one with `keel export RUN_DIR --target gguf`)"
        )
    verify_manifest(folder)
    meta = json.loads((folder / "keel.json").read_text())
    n_ctx = int(meta.get("n_ctx", 2048))
    tok = AutoTokenizer.from_pretrained(folder)
    llm = gguf.open_gguf(folder / "model.gguf", n_ctx, threads=threads)
    return {
        "model_id": model_id,
        "tokenizer": tok,
        "max_length": n_ctx,
        "backend": meta.get("variant", "gguf"),
        "lm": llm,
        "scheduler_factory": lambda tokenizer, max_running, metrics: LlamaScheduler(llm, tokenizer, metrics),
    }


class LlamaScheduler(Scheduler):
    """The scheduler's thread and queues, with llama.cpp producing the tokens, one sequence at a time."""

    def __init__(self, llm, tokenizer, metrics=None):  # noqa: D107  (no torch model: Scheduler.__init__ is not run)
        self.llm, self.tok, self.max_running, self.metrics = llm, tokenizer, 1, metrics
        self.eos = {e for e in (llm.token_eos(), tokenizer.eos_token_id) if e is not None and e >= 0}
        self.inbox: thread_queue.Queue = thread_queue.Queue()
        self.waiting = 0
        self._lock = threading.Lock()
        self._pending: deque[Sequence] = deque()
        self.running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="keel-generate-llama.cpp", daemon=True)

    def stop(self) -> None:
        super().stop()
        close = getattr(self.llm, "close", None)
        if close is not None and not self._thread.is_alive():  # freed here, not by the interpreter's shutdown
            close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for s in self._admit(block=True):
                self.running = 1
                if self.metrics:
                    self.metrics.running.set(1)
                self._generate(s)
                self.running = 0
            if self.metrics:
                self.metrics.running.set(self.running)
                self.metrics.queue_depth.labels("generate").set(self.waiting)

    def _generate(self, s: Sequence) -> None:
        try:
            self.llm.set_seed(s.seed if s.seed is not None else random.getrandbits(31))
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(s.prompt_ids))
            tokens = self.llm.generate(
                s.prompt_ids,
                temp=0.0 if is_greedy(s) else s.temperature,
                top_p=s.top_p,
                top_k=0,
                min_p=0.0,
                repeat_penalty=1.0,
                reset=True,
            )
            for tok in tokens:
                if s.cancelled:
                    break
                self._append(s, int(tok))
                if self.metrics:
                    self.metrics.add_tokens(1)
                if s.finish_reason is not None:
                    break
        except Exception as e:
            logger.exception(
                "sequence %d of %s failed in llama.cpp (%s)", s.index, s.request_id or "a request", type(e).__name__
            )
            self._fail(s, e)
