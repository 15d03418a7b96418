"""What `keel serve` can load, and the model calls behind each route.

- a classification run directory: /v1/classify (ONNX Runtime when `keel export` ran, else PyTorch) and
  /v1/embeddings (mean-pooled encoder states, PyTorch);
- an encoder by registry name or folder (minilm-l6, tiny-bert): /v1/embeddings;
- a causal-LM run directory, registry name (smollm2-135m, tiny-llama) or folder: completions and chat.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from keel.errors import KeelError

ROUTES_BY_KIND = {
    "classifier": ("classify", "embeddings"),
    "encoder": ("embeddings",),
    "causal-lm": ("completions", "chat"),
}


@dataclass
class Engine:
    """The loaded model and what it serves."""

    model_id: str
    kind: str  # classifier | encoder | causal-lm
    tokenizer: object
    max_length: int
    backend: str = "torch"
    classifier: object = None  # model(**enc).logits
    encoder: object = None  # model(**enc).last_hidden_state
    lm: object = None
    labels: list[str] = field(default_factory=list)
    device: str = "cpu"
    forward_batch_size: int | None = None  # classify/embeddings: texts per forward pass (None: all at once)
    run_dir: Path | None = None  # a classification run: where explanations load their PyTorch model from
    mitigator: object = None  # the audit's per-group thresholds (keel/trust/mitigation.py), when the run has them
    version: str = "base"  # the run's model version (`keel learn` promotes others: keel/rundir.py)
    model_sha256: str = ""  # one hash over the served folder's manifest: which weights answered
    # generation: makes the scheduler (tokenizer, max_running, metrics); None: keel's own (keel/serve/scheduler.py)
    scheduler_factory: Callable | None = None
    _explainer: object = None
    _explain_checkpoint: Callable[[], None] | None = None  # set while an explanation runs (explain thread)

    @property
    def routes(self) -> tuple[str, ...]:
        return ROUTES_BY_KIND[self.kind]

    # -- classify / embeddings: texts -> rows (run in the batcher's worker thread) -------------------

    def _groups(self, texts: list[str]):
        """(indices, padded encoding) per forward pass: texts sorted by token count, ``forward_batch_size`` at a time.

        A batch padded to its longest text wastes work on padding, and on a CPU a very wide batch is slower per
        text than a few narrower ones (MiniLM, 32 texts of 12 to 23 words, 2 cores: 7.8 ms per text as one padded
        batch, 5.3 ms as four length-sorted groups of 8).
        """
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)  # unpadded
        order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
        size = self.forward_batch_size or len(texts)
        for k in range(0, len(order), size):
            idx = order[k : k + size]
            yield idx, self.tokenizer.pad({key: [enc[key][i] for i in idx] for key in enc}, return_tensors="pt")

    def classify(self, texts: list[str]) -> list[dict]:
        import torch

        rows: list = [None] * len(texts)
        for idx, enc in self._groups(texts):
            with torch.inference_mode():
                probs = self.classifier(**enc).logits.float().softmax(-1)  # (b, C)
            for i, p, n in zip(idx, probs.tolist(), enc["attention_mask"].sum(-1).tolist()):
                best = max(range(len(p)), key=p.__getitem__)
                rows[i] = {
                    "label": self.labels[best],
                    "score": p[best],
                    "scores": dict(zip(self.labels, p)),
                    "tokens": n,
                }
        if self.mitigator is not None:  # applied on the served scores, reported per text
            picked, info = self.mitigator.apply(texts, [list(r["scores"].values()) for r in rows], self.labels)
            for r, k, m in zip(rows, picked, info):
                r.update(label=self.labels[k], score=r["scores"][self.labels[k]], mitigation=m)
        return rows

    def embed(self, texts: list[str]) -> list[dict]:
        import torch

        rows: list = [None] * len(texts)
        for idx, enc in self._groups(texts):
            with torch.inference_mode():
                states = self.encoder(**enc).last_hidden_state.float()  # (b, T, E)
                mask = enc["attention_mask"][..., None].float()  # (b, T, 1)
                pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (b, E)
            for i, e, n in zip(idx, pooled.tolist(), enc["attention_mask"].sum(-1).tolist()):
                rows[i] = {"embedding": e, "tokens": n}
        return rows

    def explain(
        self, texts: list[str], labels: list[str], n_steps: int, checkpoint: Callable[[], None] | None = None
    ) -> list[dict]:
        """Integrated gradients toward each text's served label, computed on the PyTorch model of the served
        variant (an ONNX variant's own torch weights: the same stage, before export).

        ``checkpoint()`` runs before every forward pass: it may wait (to give way to other traffic) or raise
        (to stop work nobody waits for any more); its exception propagates.
        """
        from keel.trust.explain import integrated_gradients

        model, tokenizer, name = self._explainer_model()
        ids = [int(model.config.label2id[label]) for label in labels]
        self._explain_checkpoint = checkpoint
        try:
            exps = integrated_gradients(model, tokenizer, texts, ids, n_steps, max_length=self.max_length)
        finally:
            self._explain_checkpoint = None
        return [{"tokens": e.tokens, "attributions": e.attributions, "delta": e.delta, "model": name} for e in exps]

    def _explainer_model(self):
        if self._explainer is None:
            from keel.rundir import torch_twin
            from keel.runtime.load import load_trained

            torch_variant = torch_twin(self.backend)
            # Its own copy even for a torch variant: attribution hooks the embedding layer, which must not
            # touch the classify traffic that runs on the served model in another thread at the same time; and
            # its own tokenizer (a fast tokenizer's padding/truncation state is not safe to share across threads).
            twin = load_trained(self.run_dir, torch_variant)
            twin.model.register_forward_pre_hook(self._at_checkpoint)
            self._explainer = (twin.model, twin.tokenizer, torch_variant)
        return self._explainer

    def _at_checkpoint(self, module, args):
        if self._explain_checkpoint is not None:
            self._explain_checkpoint()

    @property
    def embedding_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    # -- generation --------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text, templated = chat_text(self.tokenizer, messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if templated else self.prompt_ids(text)


def chat_text(tokenizer, messages: list[dict]) -> tuple[str, bool]:
    """The prompt text of a chat (the chat template with the generation prompt, else ``role: content`` lines) and
    whether a template made it (its text holds the special tokens; the plain lines get them when tokenized)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", False


def check_target(target: str) -> None:
    """Fail fast (before binding a port or loading anything) on a target that cannot be served."""
    path = Path(target)
    if path.is_dir() and ((path / "model" / "keel.json").is_file() or (path / "recipe.yaml").is_file()):
        return
    if path.is_dir() and (path / "model.gguf").is_file():  # a GGUF export folder (--engine llama.cpp)
        return
    from keel.models.registry import resolve_model

    resolve_model(target, field="keel serve", what="run directory or model")


def load_engine(
    target: str, backend: str = "auto", device: str = "cpu", engine: str = "torch", threads: int | None = None
) -> Engine:
    """A run directory, a registry model name or a local model folder -> a ready Engine.

    ``engine``: ``torch`` (keel's own) or ``llama.cpp`` (a causal-LM run's GGUF export, keel/serve/llama_engine.py).
    """
    path = Path(target)
    if engine == "llama.cpp":
        from keel.serve.llama_engine import load_gguf

        return Engine(kind="causal-lm", **load_gguf(path, backend, threads))
    if path.is_dir() and (path / "model" / "keel.json").is_file():
        return _load_run(path, backend, device)
    if path.is_dir() and (path / "recipe.yaml").is_file():
        raise KeelError(
            f"{target} has no final model yet (model/ is missing); finish training with keel train --resume"
        )
    from keel.models.registry import model_dir, resolve_model

    name, spec = resolve_model(target)
    folder = model_dir(target)
    _verify_folder(folder)
    model_type = json.loads((folder / "config.json").read_text()).get("architectures") or []
    keel_json = folder / "keel.json"  # a run's model folder says what it is
    task = json.loads(keel_json.read_text()).get("task") if keel_json.is_file() else None
    is_lm = (
        (spec.kind == "causal-lm")
        if spec
        else (task == "causal-lm" or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in model_type))
    )
    model_id = spec.name if spec else (folder.name if path.expanduser().is_dir() else target)  # a hub name
    return _load_lm(folder, model_id, device, backend) if is_lm else _load_encoder(folder, model_id)


def _verify_folder(folder: Path) -> None:
    """A folder keel sealed (a run's model/, a converted model in the cache) is checked against its manifest before
    anything in it is read; a keel model folder without one (keel.json but no manifest) is refused. A plain Hugging
    Face folder of the user's, or a package's, has no manifest to check and is loaded as it is."""
    from keel.io import MANIFEST, verify_manifest

    if (folder / MANIFEST).is_file() or (folder / "keel.json").is_file():
        verify_manifest(folder)


def folder_digest(folder: Path) -> str:
    """One SHA-256 over a sealed folder's manifest (the hashes of its files): names the weights that served."""
    import hashlib

    from keel.io import MANIFEST

    path = Path(folder) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def _load_run(run_dir: Path, backend: str, device: str) -> Engine:
    from keel.rundir import BASE_VERSION, current_version, serve_variant, version_dir
    from keel.runtime.load import load_trained, sealed_recipe, verified_model

    info = verified_model(run_dir)  # every file the server loads is checked first, the recipe included
    model_id = run_dir.name
    version = current_version(run_dir)
    if info["task"] == "causal-lm":  # `keel learn` may have promoted a version: learn/<version>/model
        folder = version_dir(run_dir, version)
        sealed_recipe(folder, info if version == BASE_VERSION else verified_model(folder))
        engine = _load_lm(folder / "model", model_id, device, backend)
        engine.version, engine.model_sha256 = version, folder_digest(folder / "model")
        return engine
    if version != BASE_VERSION:  # `keel learn` promoted a version: it serves, with PyTorch
        return load_version(run_dir, version)
    chosen = serve_variant(run_dir, backend)
    t = load_trained(run_dir, chosen)  # checks every file against its manifest
    # /v1/embeddings: the teacher's encoder, loaded (and checked) like the classifier when another variant serves
    encoder = (t.model if chosen in ("torch", "teacher-torch") else load_trained(run_dir, "torch").model).base_model
    encoder.eval()
    from keel.trust.mitigation import Mitigator

    return Engine(
        model_id,
        "classifier",
        t.tokenizer,
        t.recipe.model.max_length,
        chosen,
        classifier=t.model,
        encoder=encoder,
        labels=list(info["labels"]),
        run_dir=run_dir,
        mitigator=Mitigator.for_run(run_dir, chosen),
        model_sha256=folder_digest(_variant_folder(run_dir, chosen)),
    )


def _variant_folder(run_dir: Path, variant: str) -> Path:
    from keel.rundir import export_dir, variant_location

    folder, backend = variant_location(run_dir, variant)
    return folder / "model" if backend == "torch" or backend.startswith("torchao-") else export_dir(folder, backend)


def load_version(run_dir: Path, version: str) -> Engine:
    """A classifier run's model version (keel/rundir.py's learn/<version>/), served with PyTorch.

    The audit's per-group thresholds were fit to the run's own model, so a learned version serves without them."""
    from keel.rundir import version_dir
    from keel.runtime.load import load_trained, verified_model

    folder = version_dir(run_dir, version)
    info = verified_model(folder)
    t = load_trained(folder, "torch")
    encoder = t.model.base_model
    return Engine(
        Path(run_dir).name,
        "classifier",
        t.tokenizer,
        t.recipe.model.max_length,
        "torch",
        classifier=t.model,
        encoder=encoder,
        labels=list(info["labels"]),
        run_dir=folder,
        version=version,
        model_sha256=folder_digest(folder / "model"),
    )


def _load_encoder(folder: Path, model_id: str) -> Engine:
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return Engine(
        model_id,
        "encoder",
        tok,
        min(512, int(getattr(encoder.config, "max_position_embeddings", 512))),
        encoder=encoder,
    )


LM_BACKENDS = ("auto", "torch", "int8-weight-only", "int4-weight-only", "torchao-weight-only", "int8-dynamic")


def _load_lm(folder: Path, model_id: str, device: str, backend: str = "auto") -> Engine:
    """``backend``: torch (fp32 on a CPU), int8-weight-only (int8 weights read by PyTorch's CPU kernel: the fastest
    within 2% perplexity), int4-weight-only (int4 decoder weights, int8 head: fewer bytes still, perplexity within
    1% on SmolLM2), torchao-weight-only (torchao's int8 weight-only) or int8-dynamic (PyTorch's fbgemm int8
    kernels, activations quantized per step: fastest, but lossy on SmolLM2; keel/serve/lm_int8.py)."""
    import torch

    if backend not in LM_BACKENDS:
        raise KeelError(
            f"serve.backend={backend} is not one a causal LM is served with; use one of {', '.join(LM_BACKENDS)} "
            "(or --engine llama.cpp for a GGUF export)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from keel.secure.seal import is_sealed

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if is_sealed(folder):  # decrypted in memory with $KEEL_SEAL_KEY
        from keel.secure import memory
        from keel.secure.seal import open_folder

        files = open_folder(folder)
        lm, tok = memory.hf_model(files).to(dtype), memory.tokenizer(files)
    else:
        lm = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(folder)
    lm = lm.to(device).eval()
    if backend in LM_BACKENDS[2:]:
        from keel.serve.lm_int8 import quantize_lm

        lm = quantize_lm(lm, backend, device)
    context = int(getattr(lm.config, "max_position_embeddings", 2048))
    return Engine(model_id, "causal-lm", tok, context, "torch" if backend == "auto" else backend, lm=lm, device=device)
