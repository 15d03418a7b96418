"""Few-shot figures: N-way K-shot accuracy on classes the encoder never trained on, with 95% confidence intervals.

CrowS-Pairs sentences (``sent_more``) labelled by bias type: five types are the "training" classes (what a
deployed classifier knew, and what meta-learning trains on), the four smallest are held out. Every method sees the
same episodes (N held-out classes, K support and Q query sentences each, disjoint; keel.fewshot.episodes):

- centroid-untrained: nearest class mean of the untrained encoder's mean-pooled embeddings (its own pooling);
- finetune: a fresh classification head fine-tuned with the encoder on the N x K support rows (cross-entropy);
- setfit: keel's SetFit procedure (contrastive pairs of the support rows, then a logistic-regression head);
- meta-prototype: the encoder trained once by prototypical-network episodes over the training classes, then a
  class-mean head on the support rows (what `keel fewshot` does with fewshot.meta set).

    .venv/bin/python benchmarks/fewshot.py                   # minilm-l6, K = 1, 8, 32, 5 episodes: minutes on 2 cores
    .venv/bin/python benchmarks/fewshot.py --episodes 10 --meta-episodes 300
    .venv/bin/python benchmarks/fewshot.py --episodes 3 --queries 8 --meta-episodes 30 --finetune-steps 15 \
        --max-pairs 96                                      # the README's figures: a busy machine, ~20 minutes
Writes benchmarks/results/fewshot-<model>-cpu.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).parent / "results"
HELD_OUT = ("age", "disability", "physical-appearance", "sexual-orientation")
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 19: 2.09, 29: 2.05}


def ci95(values: list[float]) -> dict:
    """Mean and the half-width of its 95% confidence interval (Student's t over episodes)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": round(mean, 4), "ci95": None, "episodes": n}
    t = T95.get(n - 1) or next((v for k, v in sorted(T95.items()) if k >= n - 1), 1.96)
    return {"mean": round(mean, 4), "ci95": round(t * statistics.stdev(values) / math.sqrt(n), 4), "episodes": n}


def load_crows() -> tuple[list[str], list[str]]:
    from keel.data.builtin import DATASETS

    spec = DATASETS["crows-pairs"]
    frame = spec.read(spec.paths()).drop_duplicates(subset="sent_more")
    return frame["sent_more"].astype(str).tolist(), frame["bias_type"].astype(str).tolist()


def mean_pooled(encoder, tokenizer, texts: list[str], max_length: int):
    import torch

    out = []
    with torch.no_grad():
        for k in range(0, len(texts), 64):
            enc = tokenizer(
                texts[k : k + 64], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
            )
            states = encoder(**enc).last_hidden_state  # (B, T, E)
            mask = enc["attention_mask"][..., None].float()  # (B, T, 1)
            out.append((states * mask).sum(1) / mask.sum(1))  # (B, E)
    return torch.cat(out)


def nearest_centroid(feats, episode) -> float:
    import torch

    from keel.fewshot.heads import prototypes, squared_distances

    s_rows, q_rows = episode.support_rows(), episode.query_rows()
    centroids = prototypes(feats[[r for r, _ in s_rows]], torch.tensor([j for _, j in s_rows]), len(episode.classes))
    picked = squared_distances(feats[[r for r, _ in q_rows]], centroids).argmin(-1)
    return float((picked == torch.tensor([j for _, j in q_rows])).float().mean())


def head_accuracy(model, tokenizer, texts, episode, max_length) -> float:
    import torch

    from keel.fewshot.heads import embed, head_linear

    q_rows = episode.query_rows()
    with torch.no_grad():
        logits = head_linear(model)[2](embed(model, tokenizer, [texts[r] for r, _ in q_rows], max_length))
    return float((logits.argmax(-1) == torch.tensor([j for _, j in q_rows])).float().mean())


def finetune(base, tokenizer, texts, episode, max_length, steps: int, lr: float, seed: int) -> float:
    """Plain fine-tuning: a fresh head of N outputs and the encoder, cross-entropy on the support rows."""
    import random

    import torch

    from keel.fewshot.heads import set_head

    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    n, hidden = len(episode.classes), base.config.hidden_size
    set_head(model, torch.randn(n, hidden) * 0.02, torch.zeros(n), [str(c) for c in range(n)])
    rows = episode.support_rows()
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = rng.sample(rows, min(16, len(rows)))
        enc = tokenizer(
            [texts[r] for r, _ in batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, torch.tensor([j for _, j in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return head_accuracy(model, tokenizer, texts, episode, max_length)


def setfit(base, tokenizer, texts, episode, max_length, max_pairs: int, seed: int) -> float:
    from keel.fewshot.adapt import fit_head
    from keel.fewshot.train import contrastive_finetune

    model = copy.deepcopy(base)
    rows = episode.support_rows()
    s_texts, s_y = [texts[r] for r, _ in rows], [j for _, j in rows]
    contrastive_finetune(model, tokenizer, s_texts, s_y, max_length, iterations=5, max_pairs=max_pairs, seed=seed)
    fit_head(model, tokenizer, s_texts, s_y, [str(c) for c in range(len(episode.classes))], "setfit", max_length, seed)
    return head_accuracy(model, tokenizer, texts, episode, max_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--episodes", type=int, default=5, help="episodes per K (the same ones for every method)")
    parser.add_argument("--queries", type=int, default=10, help="query sentences per class and episode")
    parser.add_argument("--meta-episodes", type=int, default=100)
    parser.add_argument("--finetune-steps", type=int, default=25)
    parser.add_argument("--max-pairs", type=int, default=240, help="setfit: contrastive pairs per episode")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from keel.fewshot.episodes import EpisodeSampler
    from keel.fewshot.train import episodic_train
    from keel.models.registry import model_dir
    from keel.tasks.classification import build_model

    torch.set_num_threads(args.threads)
    texts, types = load_crows()
    train_types = sorted(set(types) - set(HELD_OUT))
    held = [i for i, t in enumerate(types) if t in HELD_OUT]
    h_texts, h_y = [texts[i] for i in held], [HELD_OUT.index(types[i]) for i in held]
    m_rows = [i for i, t in enumerate(types) if t in train_types]
    m_texts, m_y = [texts[i] for i in m_rows], [train_types.index(types[i]) for i in m_rows]
    folder = model_dir(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    base = build_model(folder, train_types).eval()  # the deployed classifier's encoder (its head is replaced)
    t0 = time.perf_counter()
    untrained = mean_pooled(base.base_model, tokenizer, h_texts, args.max_length)  # (N_held, E)
    meta = copy.deepcopy(base)
    losses = episodic_train(
        meta,
        tokenizer,
        m_texts,
        m_y,
        args.max_length,
        args.meta_episodes,
        n_way=len(train_types),
        k_shot=4,
        n_query=4,
        lr=2e-5,
        seed=0,
    )
    meta_seconds = time.perf_counter() - t0
    print(
        f"meta-training: {len(losses)} episodes over {len(train_types)} classes, loss {losses[0]:.3f} -> "
        f"{statistics.fmean(losses[-10:]):.3f} (last 10), {meta_seconds:.0f}s",
        flush=True,
    )

    from keel.fewshot.heads import embed

    meta_feats = embed(meta, tokenizer, h_texts, args.max_length)
    table = {}
    for k in args.ks:
        sampler = EpisodeSampler(h_y, n_way=len(HELD_OUT), k_shot=k, n_query=args.queries, seed=k)
        scores: dict[str, list[float]] = {m: [] for m in ("centroid-untrained", "finetune", "setfit", "meta-prototype")}
        seconds = dict.fromkeys(scores, 0.0)
        for e, episode in enumerate(sampler.episodes(args.episodes)):
            runs = {
                "centroid-untrained": partial(nearest_centroid, untrained, episode),
                "meta-prototype": partial(nearest_centroid, meta_feats, episode),
                "finetune": partial(
                    finetune, base, tokenizer, h_texts, episode, args.max_length, args.finetune_steps, 5e-5, e
                ),
                "setfit": partial(setfit, base, tokenizer, h_texts, episode, args.max_length, args.max_pairs, e),
            }
            for method, run in runs.items():
                t = time.perf_counter()
                scores[method].append(run())
                seconds[method] += time.perf_counter() - t
        table[k] = {m: {**ci95(v), "seconds": round(seconds[m], 1)} for m, v in scores.items()}
        print(
            f"K={k:>2}  " + "  ".join(f"{m} {r['mean']:.3f}±{r['ci95'] or 0:.3f}" for m, r in table[k].items()),
            flush=True,
        )
        path = write(args, losses, meta_seconds, train_types, table)
    print(f"wrote {path}")


def write(args, losses: list[float], meta_seconds: float, train_types: list[str], table: dict) -> Path:
    result = {
        "benchmark": "fewshot",
        "data": "crows-pairs sent_more, classes = bias_type",
        "held_out_classes": list(HELD_OUT),
        "training_classes": train_types,
        "n_way": len(HELD_OUT),
        "queries_per_class": args.queries,
        "model": args.model,
        "args": vars(args),
        "meta_training": {
            "episodes": len(losses),
            "first_loss": losses[0],
            "last10_loss": statistics.fmean(losses[-10:]),
            "seconds": round(meta_seconds, 1),
        },
        "accuracy": {str(k): v for k, v in table.items()},
        "chance": 1 / len(HELD_OUT),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "load_avg_1min_at_end": round(os.getloadavg()[0], 1),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fewshot-{args.model}-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


if __name__ == "__main__":
    main()
