"""Recipe sections for outputs and serving: output.*, serve.*."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from keel.recipe.base import Strict
from keel.recipe.deploy import RayServeConfig
from keel.recipe.learn import FeedbackConfig


class OutputConfig(Strict):
    """Where the run directory goes."""

    dir: str | None = Field(None, description="run directory; default runs/<name> (a free -N suffix is added)")


class ServeConfig(Strict):
    """`keel serve`: the OpenAI-compatible HTTP server. API keys never live here (KEEL_API_KEYS or --api-key-file)."""

    host: str = Field("127.0.0.1", description="bind address; a non-loopback one needs API keys (or --allow-no-auth)")
    port: int = Field(8000, ge=0, le=65535, description="0 picks a free port")
    engine: Literal["torch", "llama.cpp"] = Field(
        "torch",
        description="generation: torch (keel's own, continuous batching) or llama.cpp (a causal-LM run's GGUF "
        "export, `keel export RUN --target gguf`; needs `make llama`)",
    )
    backend: str = Field(
        "auto",
        description="classifiers: auto = the deployable variant picked by `keel compress`, else onnx-int8, "
        "then onnx when exported, else torch; or any variant name (e.g. pruned-onnx-int8, see `keel bench`); "
        "causal LMs: torch (fp32), int8-weight-only (int8 weights, about 2x faster on a CPU at one stream), "
        "int4-weight-only (int4 decoder weights in groups of 32, int8 head: faster still), int8-dynamic, "
        "torchao-weight-only",
    )
    decode: Literal["auto", "keel", "transformers"] = Field(
        "auto",
        description="generation with keel's own engine: the decode step. keel = keel's step for Llama-family models "
        "(the weights called directly, fused matmuls: about 1.35x faster with int8 weights on a CPU); "
        "transformers = the model's own forward; auto = keel's where the model allows it, on a CPU",
    )
    max_batch_size: int = Field(32, ge=1, le=1024, description="classify/embeddings: inputs gathered into one batch")
    forward_batch_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="classify/embeddings: a batch runs as length-sorted forward passes of this "
        "many inputs; default: 8 on a CPU, the whole batch on a GPU",
    )
    max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="classify/embeddings: wait for a fuller batch")
    max_running: int = Field(16, ge=1, le=512, description="generation: sequences in the running decode batch")
    max_queue: int = Field(256, ge=1, description="requests waiting beyond the running batch; more get 429")
    max_body_bytes: int = Field(2_000_000, ge=1024, description="request bodies over this get 413, unread")
    max_inputs: int = Field(256, ge=1, description="texts per classify/embeddings request")
    max_explain_inputs: int = Field(16, ge=1, description="texts per classify request with explain: true")
    max_tokens: int = Field(512, ge=1, description="upper bound on a request's max_tokens")
    default_max_tokens: int = Field(64, ge=1, description="max_tokens of a request that sets none")
    max_n: int = Field(8, ge=1, le=128, description="choices per completion request")
    max_stop: int = Field(4, ge=0, le=16, description="stop sequences per request")
    timeout_s: float = Field(60.0, gt=0.0, description="per-request deadline: 504, or an SSE error event")
    read_timeout_s: float = Field(
        10.0,
        gt=0.0,
        description="a request's headers, then its body, must arrive within "
        "this: else 408 (a slow client holds no connection and no drain)",
    )
    drain_timeout: float = Field(
        30.0,
        gt=0.0,
        description="SIGTERM: seconds the accepted requests get to finish "
        "before the process exits (what is still running then is cut)",
    )
    log_text: bool = Field(False, description="log prompts and completions (off: only sizes and timings)")
    public_docs: bool = Field(
        False,
        description="with API keys set, open /docs, /redoc and /openapi.json without "
        "a key (a browser cannot send one); the API routes still need a key",
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads; default: torch's choice (1 is faster on a busy machine)"
    )
    verify_key: str | None = Field(
        None,
        description="an EC public key (PEM file): serve only a run whose model "
        "folders match their `keel sign` signatures, checked before any weight is loaded",
    )
    feedback: FeedbackConfig = Field(FeedbackConfig(), description="POST /v1/feedback and model version swaps")
    ray: RayServeConfig = RayServeConfig()


# -- generative models (issue 6): pretraining from scratch, supervised fine-tuning, alignment ------------------
