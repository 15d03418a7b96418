"""Continuous batching for generation: sequences join and leave the running decode batch between steps.

Why our own scheduler and not transformers' ``ContinuousBatchingManager`` / ``generate_batch``: transformers
5.23 does offer add_request / cancel_request / streaming, but on CPU it was 24x slower than this scheduler
(25 vs 596 tokens/s, tiny-llama, 16 streams x 64 tokens, benchmarks/serve_cb_vs_transformers.py), it fails inside
``torch.inference_mode()``, and its sampling is not seeded per request. The scheduler below is small: one
batched KV cache (a transformers ``DynamicCache``, left-padded), one decode step for every running sequence
at a time, and between steps:

- join: new prompts are prefilled together (left-padded) and their cache rows are concatenated to the
  running batch (the shorter side is padded on the left, masked out);
- leave: finished, cancelled or timed-out rows are dropped with ``index_select``; columns that became pure
  padding are trimmed.

Each sequence keeps its own position ids, sampling settings and ``torch.Generator`` (so ``seed`` is
reproducible whatever else is in the batch). It runs on one thread; requests talk to it through
thread-safe queues and get their events on an asyncio queue.

One sequence never fails another: sampling, detokenization, stop strings and event delivery run row by row,
and a row that fails (NaN logits, say) ends alone with an error event and a logged traceback; newcomers whose
joint prefill fails are prefilled again one by one, so only the one that cannot be prefilled fails. A failed
decode step (out of memory, say) is the only failure that ends every running sequence, since its forward
pass is shared: that is logged with its traceback too. Logs name sequences by request id and index, never
by their text.

The cache's layers keep their keys and values in buffers with room to grow (``GrowingLayer``): a decode step
writes its token in place, where transformers' ``DynamicLayer`` copies the whole cache (``torch.cat``) at every
step and layer; a join or a leave still rebuilds the rows, once.

A decode step runs through keel's own ``LlamaDecodeStep`` (keel/serve/decode_step.py: the weights called directly,
fused QKV and gate-up matmuls) when the model is a Llama and ``decode`` allows it, else through transformers'
forward; the prefill is always transformers' forward.

Not done yet: a static-shape cache and CUDA graphs for the GPU (decode there is bound by launch overhead);
sliding-window models are refused.
"""

from __future__ import annotations

import logging
import queue as thread_queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

logger = logging.getLogger(__name__)

# Rows: B sequences in the running batch; L: cache length (with left padding); H: KV heads; D: head size.

# A temperature under this samples greedily. Far below it logits / T overflows float32 (T = 1e-45 is a subnormal,
# 1e-46 rounds to 0), which made softmax NaN and failed the batch; and at it the distribution is one-hot anyway.
GREEDY_BELOW = 1e-5


@dataclass
class Sequence:
    """One choice being generated."""

    prompt_ids: list[int]
    max_new: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    index: int = 0
    emit: object = None  # callable(index, kind, payload), thread-safe; set by the server
    cancelled: bool = False
    request_id: str = ""  # for the logs (never the text)
    # state, owned by the scheduler thread
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    prefix_offset: int = 0
    read_offset: int = 0
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    version: str | None = None  # the model version that generated it (set at prefill; see Scheduler.swap)
    model_sha256: str = ""


class Batch:
    """The running rows: their KV cache (layers of (B, H, L, D)), mask (B, L), next token and position (B,)."""

    def __init__(self, cache, mask, next_ids, positions, seqs):
        self.cache, self.mask, self.next_ids, self.positions, self.seqs = cache, mask, next_ids, positions, seqs

    def __len__(self):
        return len(self.seqs)


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values (B, H, L, D) are the first L columns of a buffer with spare room.

    ``update`` writes the new columns in place and returns views; when the buffer is full, or ``keys`` was
    replaced from outside (a join, a leave, the prefill's clean-up), the rows move to a new buffer with room
    for ``max(min_room, L // 2)`` more columns. Amortized, a decode step copies one column, not L.
    """

    min_room = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        end = n + key_states.shape[-2]
        buf = getattr(self, "_key_buf", None)
        fits = buf is not None and end <= buf.shape[-2]
        if not (fits and _is_head_of(self.keys, buf) and _is_head_of(self.values, self._value_buf)):
            room = end + max(self.min_room, end // 2)
            self._key_buf = _with_room(self.keys, key_states, room)
            self._value_buf = _with_room(self.values, value_states, room)
        self._key_buf[:, :, n:end] = key_states
        self._value_buf[:, :, n:end] = value_states
        self.keys, self.values = self._key_buf[:, :, :end], self._value_buf[:, :, :end]
        return self.keys, self.values


def _is_head_of(view: torch.Tensor, buf: torch.Tensor) -> bool:
    """``view`` is ``buf[:, :, :L]`` (the same storage, rows and strides)."""
    return (
        view.dim() == 4
        and view.data_ptr() == buf.data_ptr()
        and view.shape[:2] == buf.shape[:2]
        and view.shape[3] == buf.shape[3]
        and view.stride() == buf.stride()
    )


def _with_room(old: torch.Tensor, new: torch.Tensor, columns: int) -> torch.Tensor:
    """A (B, H, columns, D) buffer starting with ``old``'s columns (if any)."""
    B, H, _, D = new.shape
    buf = new.new_empty((B, H, columns, D))
    if old.dim() == 4 and old.shape[-2]:
        buf[:, :, : old.shape[-2]] = old
    return buf


def new_cache(config) -> DynamicCache:
    """transformers' ``DynamicCache`` with ``GrowingLayer``s."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def _layers(cache):
    return cache.layers


def _pad_left(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def merge(a: Batch | None, b: Batch) -> Batch:
    """Rows of ``a`` then rows of ``b``, left-padded to one cache length."""
    if a is None or len(a) == 0:
        return b
    la, lb = a.mask.shape[1], b.mask.shape[1]
    L = max(la, lb)
    for ya, yb in zip(_layers(a.cache), _layers(b.cache)):
        ya.keys = torch.cat([_pad_left(ya.keys, L - la, 2), _pad_left(yb.keys, L - lb, 2)])  # (Ba+Bb, H, L, D)
        ya.values = torch.cat([_pad_left(ya.values, L - la, 2), _pad_left(yb.values, L - lb, 2)])
    mask = torch.cat([_pad_left(a.mask, L - la, 1), _pad_left(b.mask, L - lb, 1)])  # (Ba+Bb, L)
    return Batch(
        a.cache, mask, torch.cat([a.next_ids, b.next_ids]), torch.cat([a.positions, b.positions]), a.seqs + b.seqs
    )


def keep_rows(batch: Batch, keep: list[int]) -> Batch:
    """Only rows ``keep``; leading columns that no remaining row uses are trimmed."""
    idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, idx)
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    for layer in _layers(batch.cache):
        layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
        layer.values = layer.values.index_select(0, idx)[:, :, start:]
    return Batch(
        batch.cache,
        mask[:, start:],
        batch.next_ids.index_select(0, idx),
        batch.positions.index_select(0, idx),
        [batch.seqs[i] for i in keep],
    )


def is_greedy(s: Sequence) -> bool:
    return s.temperature < GREEDY_BELOW


def sample_row(logits: torch.Tensor, s: Sequence) -> int:
    """One token from one row's float32 CPU logits (V,), with the sequence's temperature, top_p and generator.

    Raises when the row cannot be sampled (NaN or +inf logits); the caller fails that sequence alone.
    """
    if is_greedy(s):
        return int(logits.argmax())
    # Shifted so that the best logit is exactly 0 and every other one is <= 0: exp never overflows.
    probs = torch.softmax((logits - logits.max()) / s.temperature, -1)  # (V,)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cut = sorted_p.cumsum(0) - sorted_p > s.top_p  # keep the smallest set whose mass reaches top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=s.generator))


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One token per row from logits (B, V), with each sequence's temperature, top_p and generator."""
    greedy = logits.argmax(-1).tolist()
    if all(is_greedy(s) for s in seqs):
        return greedy
    logits = logits.float().cpu()  # per-sequence CPU generators: a seed gives the same text on any device
    return [greedy[row] if is_greedy(s) else sample_row(logits[row], s) for row, s in enumerate(seqs)]


class Scheduler:
    """A thread that runs prefill and decode steps for every submitted sequence."""

    # class-level, so a subclass with its own token loop (keel/serve/llama_engine.py) has them too
    version: str | None = None  # a label for ``model`` (keel's model versions), set by swap
    model_sha256 = ""  # and its weights' hash
    _swap: tuple | None = None  # (model, version, sha, decode step, done Event): applied once the batch is empty
    decode = "auto"  # serve.decode
    _decode = None  # keel's decode step for ``model`` (keel/serve/decode_step.py), or None: transformers' forward

    def __init__(
        self, model, tokenizer, max_running: int = 16, metrics=None, device: str = "cpu", decode: str = "auto"
    ):
        from keel.serve.decode_step import decode_step_for

        self.model, self.tok, self.max_running, self.metrics = model, tokenizer, max_running, metrics
        self.decode = decode  # serve.decode: auto | keel | transformers
        self._decode = decode_step_for(model, decode)
        self.device = torch.device(device)
        eos = getattr(model.generation_config, "eos_token_id", None) or model.config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos = {e for e in eos + [tokenizer.eos_token_id] if e is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=model.config).layers):
            from keel.errors import KeelError

            raise KeelError(
                f"{type(model).__name__} uses sliding-window attention, which keel serve's scheduler "
                "does not support yet; serve a full-attention model (Llama, GPT-2, SmolLM2)"
            )
        self.inbox: thread_queue.Queue = thread_queue.Queue()
        self.waiting = 0  # submitted, not yet running (the queue bound); changed under _lock only
        self._lock = threading.Lock()  # the server's thread adds to ``waiting``, the scheduler's subtracts
        self._pending: deque[Sequence] = deque()  # taken from the inbox, not yet running (scheduler thread only)
        self.running = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="keel-generate", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(None)
        self._thread.join(timeout=30)

    def swap(self, model, version: str, model_sha256: str = "", timeout: float | None = None) -> bool:
        """Generate with ``model`` from now on: no new sequence starts until the running ones finish on the model
        they started on (their caches belong to it), then the model changes and the waiting ones start on it.
        Blocks until swapped (True) or ``timeout`` passes (False; the swap still happens). Any thread but the
        scheduler's."""
        from keel.serve.decode_step import decode_step_for

        done = threading.Event()
        self._swap = (model, version, model_sha256, decode_step_for(model, self.decode), done)
        self.inbox.put(None)  # wake an idle loop
        return done.wait(timeout)

    def submit(self, seqs: list[Sequence]) -> None:
        with self._lock:
            self.waiting += len(seqs)
        for s in seqs:
            self.inbox.put(s)

    def try_submit(self, seqs: list[Sequence], max_waiting: int) -> bool:
        """Submit unless ``waiting`` would pass ``max_waiting`` (checked and counted in one step); False then."""
        with self._lock:
            if self.waiting + len(seqs) > max_waiting:
                return False
            self.waiting += len(seqs)
        for s in seqs:
            self.inbox.put(s)
        return True

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        batch: Batch | None = None
        while not self._stop.is_set():
            if self._swap is not None and (batch is None or len(batch) == 0):
                (self.model, self.version, self.model_sha256, self._decode, done), self._swap = self._swap, None
                done.set()
            new = self._admit(block=batch is None or len(batch) == 0)
            try:
                with torch.inference_mode():
                    if new:
                        joined = self._join(new)
                        if joined is not None:
                            batch = merge(batch, joined)
                    if batch is not None and len(batch):
                        batch = self._step(batch)
            except Exception as e:  # a failed step fails its sequences, not the server
                failed = list(
                    {id(s): s for s in (batch.seqs if batch else []) + new if s.finish_reason is None}.values()
                )
                logger.exception(
                    "a decode step failed (%s); its %d sequences end with an error", type(e).__name__, len(failed)
                )
                for s in failed:
                    self._fail(s, e)
                batch = None
            self.running = len(batch) if batch else 0
            if self.metrics:
                self.metrics.running.set(self.running)
                self.metrics.queue_depth.labels("generate").set(self.waiting)

    def _admit(self, block: bool) -> list[Sequence]:
        """The oldest waiting sequences, as many as the running batch has room for.

        Cancelled ones leave the queue (and its count) at every step, even while the batch is full: a client that
        went away or timed out does not hold places that others would get a 429 for.
        """
        if block and not self._pending:
            try:
                self._pending.append(self.inbox.get(timeout=0.1))
            except thread_queue.Empty:
                return []
        while True:
            try:
                self._pending.append(self.inbox.get_nowait())
            except thread_queue.Empty:
                break
        live = [s for s in self._pending if s is not None and not s.cancelled]  # None: stop()'s wake-up
        dropped = sum(s is not None for s in self._pending) - len(live)
        room = max(0, self.max_running - self.running) if self._swap is None else 0  # a swap waits for a drain
        new, self._pending = live[:room], deque(live[room:])
        if new or dropped:
            with self._lock:
                self.waiting -= len(new) + dropped
        return new

    def _join(self, seqs: list[Sequence]) -> Batch | None:
        """Prefill newcomers together; when that fails, one by one, so that only the one that fails ends."""
        try:
            batch, logits = self._prefill(seqs)
        except Exception as e:
            if len(seqs) == 1:
                logger.exception(
                    "the prefill of sequence %d of %s failed (%s); it ends with an error",
                    seqs[0].index,
                    seqs[0].request_id or "a request",
                    type(e).__name__,
                )
                self._fail(seqs[0], e)
                return None
            logger.warning(
                "a joint prefill of %d sequences failed (%s); prefilling them one by one", len(seqs), type(e).__name__
            )
        else:
            return self._advance(batch, logits)
        joined = None
        for s in seqs:
            if s.finish_reason is None:
                one = self._join([s])
                joined = one if joined is None else (merge(joined, one) if one is not None else joined)
        return joined

    def _prefill(self, seqs: list[Sequence]) -> tuple[Batch, torch.Tensor]:
        """The newcomers' forward pass: their batch and last logits (b, V); nothing is sent to anyone yet."""
        T = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)  # (b, T), left-padded
        mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (b, T)
        for row, s in enumerate(seqs):
            ids[row, T - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[row, T - len(s.prompt_ids) :] = 1
            if s.seed is not None:
                s.generator = torch.Generator().manual_seed(s.seed)
            s.version, s.model_sha256 = self.version, self.model_sha256
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, T)
        cache = new_cache(self.model.config)
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]  # (b, V)
        keep = mask.bool()[:, None, :, None]  # (b, 1, T, 1)
        for layer in _layers(cache):  # padded rows may hold NaN (nothing to attend to): make them zeros
            layer.keys = torch.where(keep, layer.keys, 0.0)
            layer.values = torch.where(keep, layer.values, 0.0)
        if self.metrics:
            self.metrics.prompt_tokens.inc(int(mask.sum()))
        batch = Batch(cache, mask, torch.zeros(len(seqs), dtype=torch.long, device=self.device), mask.sum(-1), seqs)
        return batch, logits

    def _step(self, batch: Batch) -> Batch:
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)  # (B, L+1)
        if self._decode is not None:
            logits = self._decode(batch.next_ids, batch.positions, mask, batch.cache)  # (B, V)
        else:
            logits = self.model(
                input_ids=batch.next_ids[:, None],
                attention_mask=mask,
                position_ids=batch.positions[:, None],
                past_key_values=batch.cache,
                use_cache=True,
            ).logits[:, -1]  # (B, V)
        batch.mask, batch.positions = mask, batch.positions + 1
        if self.metrics:
            self.metrics.batch_size.labels("generate").observe(len(batch))
        return self._advance(batch, logits)

    def _advance(self, batch: Batch, logits: torch.Tensor) -> Batch:
        """Sample the next token of every row, send text, and drop the rows that are done (or failed).

        Row by row: a row that cannot be sampled, detokenized or delivered fails alone.
        """
        # greedy tokens (also the fed-back token of a failed row) and NaN rows, in one device-to-host copy
        tokens, nan = torch.stack([logits.argmax(-1), torch.isnan(logits).any(-1).long()]).tolist()  # (2, B)
        sampled = None if all(is_greedy(s) for s in batch.seqs) else logits.float().cpu()
        keep = []
        for row, s in enumerate(batch.seqs):
            try:
                if s.cancelled:
                    continue
                if nan[row]:
                    raise FloatingPointError("the model's logits for this sequence are NaN")
                if sampled is not None and not is_greedy(s):
                    tokens[row] = sample_row(sampled[row], s)
                self._append(s, tokens[row])
            except Exception as e:
                logger.exception(
                    "sequence %d of %s failed (%s); the %d others in the batch go on",
                    s.index,
                    s.request_id or "a request",
                    type(e).__name__,
                    len(batch) - 1,
                )
                self._fail(s, e)
            if s.finish_reason is not None:
                continue
            keep.append(row)
        if self.metrics:
            self.metrics.add_tokens(len(tokens))
        batch.next_ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return batch if len(keep) == len(batch) else keep_rows(batch, keep)

    def _append(self, s: Sequence, tok: int) -> None:
        if tok in self.eos:
            s.finish_reason = "stop"
            return self._flush(s, final=True)
        s.out_ids.append(tok)
        # incremental detokenization (prefix/read offsets): a token may be half a character
        prefix = self.tok.decode(s.out_ids[s.prefix_offset : s.read_offset], skip_special_tokens=True)
        full = self.tok.decode(s.out_ids[s.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            s.text += full[len(prefix) :]
            s.prefix_offset, s.read_offset = s.read_offset, len(s.out_ids)
        for stop in s.stops:
            at = s.text.find(stop, max(0, s.sent - len(stop)))
            if at >= 0:
                s.text, s.finish_reason = s.text[:at], "stop"
                return self._flush(s, final=True)
        if len(s.out_ids) >= s.max_new:
            s.finish_reason = "length"
            return self._flush(s, final=True)
        self._flush(s, final=False)

    def _fail(self, s: Sequence, e: Exception) -> None:
        """End ``s`` with an error event (its type only: the details are in the log)."""
        s.finish_reason = "error"
        try:
            s.emit(s.index, "error", f"generation failed ({type(e).__name__})")
        except Exception:  # its client's event loop is gone: nobody is left to tell
            logger.exception("could not report the failure of sequence %d of %s", s.index, s.request_id or "a request")

    def _flush(self, s: Sequence, final: bool) -> None:
        # Hold back what could still turn out to be the start of a stop string.
        hold = 0 if final else max((len(x) - 1 for x in s.stops), default=0)
        upto = max(s.sent, len(s.text) - hold)
        if upto > s.sent:
            s.emit(s.index, "text", s.text[s.sent : upto])
            s.sent = upto
        if final:
            s.emit(s.index, "done", {"finish_reason": s.finish_reason, "completion_tokens": len(s.out_ids)})


def wait_idle(scheduler: Scheduler, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while (scheduler.running or scheduler.waiting) and time.monotonic() < end:
        time.sleep(0.01)
