"""Why a classifier said what it said: token attributions and how far to trust them.

- Integrated gradients (Sundararajan et al. 2017, through Captum's LayerIntegratedGradients) on the word
  embeddings, from a baseline where every content token is [PAD] (special tokens kept), attributing the
  probability of the explained class. Completeness: attributions sum to p(x) - p(baseline) up to the
  reported ``delta``.
- Attention rollout (Abnar & Zuidema 2020) for encoders: head-averaged attention plus identity,
  row-normalized and multiplied through the layers; the [CLS] row is the relevance of each token.
- Faithfulness (ERASER, DeYoung et al. 2020) measured, not assumed: comprehensiveness (probability drop
  when the top-k tokens are deleted) and sufficiency (drop when only they are kept), against k random tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch


@dataclass
class Explanation:
    text: str
    tokens: list[str]
    attributions: list[float]  # one per token, toward ``label``
    label: str
    score: float  # p(label | text)
    delta: float  # completeness gap (Captum's sign): sum(attributions) - (p(x) - p(baseline))
    rollout: list[float] | None = None
    content: list[bool] = field(default_factory=list)  # False for special tokens ([CLS], [SEP])

    def to_json(self) -> dict:
        return asdict(self)


def _forward_prob(model):
    def f(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float().softmax(-1)  # (B, C)

    return f


def _encode(tokenizer, texts: list[str], max_length: int | None):
    return tokenizer(texts, truncation=True, max_length=max_length or 512, padding=True, return_tensors="pt")


def _special_mask(tokenizer, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) True where the token is special (CLS, SEP, PAD)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    return torch.isin(input_ids, special)


@torch.no_grad()
def probabilities(
    model, tokenizer, texts: list[str], max_length: int | None = None, batch_size: int = 64
) -> np.ndarray:
    """Class probabilities (N, C) in the order of ``texts``, scored in batches of similar length."""
    model.eval()
    from keel.tasks.classification import length_batches

    probs = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for idx in length_batches([len(t) for t in texts], batch_size):
        enc = _encode(tokenizer, [texts[j] for j in idx], max_length)
        probs[idx] = (
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().softmax(-1).numpy()
        )
    return probs


def integrated_gradients(
    model,
    tokenizer,
    texts: list[str],
    targets: list[int] | None = None,
    n_steps: int = 32,
    internal_batch_size: int = 64,
    max_length: int | None = None,
) -> list[Explanation]:
    """Attributions of p(target | text) to each token (default target: the predicted class)."""
    from captum.attr import LayerIntegratedGradients

    model.eval()
    enc = _encode(tokenizer, texts, max_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
    special = _special_mask(tokenizer, ids)
    baseline = torch.where(special, ids, torch.full_like(ids, tokenizer.pad_token_id))  # (B, T)
    with torch.no_grad():
        probs = _forward_prob(model)(ids, mask)  # (B, C)
    if targets is None:
        targets = probs.argmax(-1).tolist()
    lig = LayerIntegratedGradients(_forward_prob(model), model.get_input_embeddings())
    attr, delta = lig.attribute(
        inputs=ids,
        baselines=baseline,
        target=list(targets),
        additional_forward_args=(mask,),
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )
    attr = attr.sum(-1).detach()  # (B, T): summed over the embedding dimension
    labels = model.config.id2label
    out = []
    for b in range(len(texts)):
        n = int(mask[b].sum())
        tokens = tokenizer.convert_ids_to_tokens(ids[b, :n].tolist())
        out.append(
            Explanation(
                texts[b],
                tokens,
                [float(x) for x in attr[b, :n]],
                labels[int(targets[b])],
                float(probs[b, targets[b]]),
                float(delta[b]),
                content=[not s for s in special[b, :n].tolist()],
            )
        )
    return out


def attention_rollout(model, tokenizer, texts: list[str], max_length: int | None = None) -> list[list[float]] | None:
    """Relevance of each token to [CLS] through all layers; None when the model cannot return attentions."""
    enc = _encode(tokenizer, texts, max_length)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        try:
            att = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        except (ValueError, TypeError):
            att = None
    if not att or att[0] is None:
        return None
    B, T = ids.shape
    eye = torch.eye(T).expand(B, T, T)
    rollout = eye.clone()
    for layer in att:  # each (B, H, T, T)
        a = layer.float().mean(1) + eye  # (B, T, T): residual connection as identity
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return [[float(x) for x in rollout[b, 0, : int(mask[b].sum())]] for b in range(B)]


def _eager_attention(model) -> None:
    """Rollout needs the attention weights, which fused (SDPA) kernels do not return."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter("eager")
        except Exception:  # models without an eager path: rollout is skipped
            pass


def explain_texts(
    model,
    tokenizer,
    texts: list[str],
    targets: list[int] | None = None,
    n_steps: int = 32,
    internal_batch_size: int = 64,
    max_length: int | None = None,
    batch_size: int = 16,
):
    """[(tokens, attributions)] per text: the entry point for callers outside keel.trust (e.g. the server)."""
    out = []
    for i in range(0, len(texts), batch_size):
        chunk_targets = None if targets is None else targets[i : i + batch_size]
        for e in integrated_gradients(
            model, tokenizer, texts[i : i + batch_size], chunk_targets, n_steps, internal_batch_size, max_length
        ):
            out.append((e.tokens, e.attributions))
    return out


def explain_trained(trained, texts: list[str], n_steps: int = 32, batch_size: int = 16) -> Iterator[Explanation]:
    """Integrated gradients for a run's classifier (``keel.runtime.load.load_trained``): `keel explain` and
    ``Run.explain``. The checks run at the call; the explanations are computed ``batch_size`` texts at a time, as
    they are consumed."""
    from keel.errors import KeelError

    if n_steps < 2:
        raise KeelError(f"steps must be at least 2; got {n_steps}")
    if trained.info["task"] != "classification":
        raise KeelError(f"keel explain works on classification runs; {trained.run_dir} is a {trained.info['task']} run")

    def batches() -> Iterator[Explanation]:
        for i in range(0, len(texts), batch_size):
            yield from integrated_gradients(
                trained.model,
                trained.tokenizer,
                texts[i : i + batch_size],
                n_steps=n_steps,
                max_length=trained.recipe.model.max_length,
            )

    return batches()


def explain(
    model, tokenizer, texts: list[str], cfg, max_length: int | None = None, rollout: bool = True, on_batch=None
) -> list[Explanation]:
    """Integrated gradients (and rollout) for many texts, in batches."""
    if rollout:
        _eager_attention(model)
    out: list[Explanation] = []
    for i in range(0, len(texts), 16):
        chunk = texts[i : i + 16]
        exps = integrated_gradients(model, tokenizer, chunk, None, cfg.n_steps, cfg.internal_batch_size, max_length)
        rolls = attention_rollout(model, tokenizer, chunk, max_length) if rollout else None
        for k, e in enumerate(exps):
            e.rollout = rolls[k] if rolls else None
        out.extend(exps)
        if on_batch:
            on_batch(len(out))
    return out


def global_importance(exps: list[Explanation], top: int, min_count: int = 2) -> dict[str, list[dict]]:
    """Per predicted class: tokens with the largest total attribution toward it (seen at least ``min_count`` times)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for e in exps:
        for tok, a, c in zip(e.tokens, e.attributions, e.content):
            if c:
                acc.setdefault(e.label, {}).setdefault(tok, []).append(a)
    out = {}
    for label, toks in sorted(acc.items()):
        rows = [
            {"token": t, "total": float(np.sum(v)), "mean": float(np.mean(v)), "count": len(v)}
            for t, v in toks.items()
            if len(v) >= min_count
        ]
        out[label] = sorted(rows, key=lambda r: -r["total"])[:top]
    return out


def faithfulness(
    model, tokenizer, exps: list[Explanation], k: int, seed: int = 0, max_length: int | None = None
) -> dict:
    """ERASER comprehensiveness and sufficiency of the top-k attributed tokens vs k random tokens."""
    rng = random.Random(seed)
    ids_full, drop_top, keep_top, drop_rand, keep_rand, label_ids, base = [], [], [], [], [], [], []
    label2id = {v: int(k_) for k_, v in model.config.id2label.items()}
    for e in exps:
        ids = tokenizer.convert_tokens_to_ids(e.tokens)
        content = [i for i, c in enumerate(e.content) if c]
        if not content:
            continue
        kk = min(k, len(content))
        top = set(sorted(content, key=lambda i: -e.attributions[i])[:kk])
        rand = set(rng.sample(content, kk))
        for chosen, drop, keep in ((top, drop_top, keep_top), (rand, drop_rand, keep_rand)):
            drop.append([t for i, t in enumerate(ids) if i not in chosen])
            keep.append([t for i, t in enumerate(ids) if i in chosen or not e.content[i]])
        ids_full.append(ids)
        label_ids.append(label2id[e.label])
        base.append(e.score)
    if not ids_full:
        return {"n": 0}
    target = np.asarray(label_ids)

    def p(batch_ids: list[list[int]]) -> np.ndarray:
        out = []
        for i in range(0, len(batch_ids), 64):
            enc = tokenizer.pad({"input_ids": batch_ids[i : i + 64]}, return_tensors="pt")
            with torch.no_grad():
                out.append(
                    model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float().softmax(-1)
                )
        probs = torch.cat(out).numpy()
        return probs[np.arange(len(probs)), target[: len(probs)]]

    p0 = p(ids_full)
    res = {
        "n": len(ids_full),
        "k": k,
        "comprehensiveness": float(np.mean(p0 - p(drop_top))),
        "comprehensiveness_random": float(np.mean(p0 - p(drop_rand))),
        "sufficiency": float(np.mean(p0 - p(keep_top))),
        "sufficiency_random": float(np.mean(p0 - p(keep_rand))),
    }
    # higher comprehensiveness and lower sufficiency than random: the attributions point at what the model uses
    res["faithful"] = (
        res["comprehensiveness"] > res["comprehensiveness_random"] and res["sufficiency"] < res["sufficiency_random"]
    )
    return res


def render_terminal(e: Explanation):
    """A rich Text with each token's background coloured by its attribution (green for, red against)."""
    from rich.text import Text

    scale = max((abs(a) for a, c in zip(e.attributions, e.content) if c), default=0.0) or 1.0
    text = Text()
    for tok, a, c in zip(e.tokens, e.attributions, e.content):
        if not c:
            continue
        w = min(1.0, abs(a) / scale)
        r, g, b = (
            (int(255 - 155 * w), 255, int(255 - 155 * w)) if a > 0 else (255, int(255 - 155 * w), int(255 - 155 * w))
        )
        piece = tok[2:] if tok.startswith("##") else (" " + tok if len(text) else tok)
        text.append(piece, style=f"black on rgb({r},{g},{b})")
    return text


def render_html(e: Explanation, values: list[float] | None = None) -> str:
    """The same heatmap as HTML spans (for the report); ``values`` defaults to the attributions."""
    import html

    values = e.attributions if values is None else values
    scale = max((abs(a) for a, c in zip(values, e.content) if c), default=0.0) or 1.0
    parts = []
    for tok, a, c in zip(e.tokens, values, e.content):
        if not c:
            continue
        w = min(1.0, abs(a) / scale)
        color = f"rgba(30,150,60,{w:.2f})" if a > 0 else f"rgba(200,40,40,{w:.2f})"
        space = "" if tok.startswith("##") or not parts else " "
        shown = tok[2:] if tok.startswith("##") else tok
        parts.append(
            f"{space}<span class='tok' style='background:{color}' title='{a:+.4f}'>{html.escape(shown)}</span>"
        )
    return "".join(parts)
