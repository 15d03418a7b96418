"""New labels appended to a trained head, its old rows kept as they are.

Each new label gets one row: the mean of its support rows' features (the input of the head layer) as the direction
(from the origin, or from the old labels' mean validation feature), scaled to a multiple of the old rows' mean norm, so its logits are on the old rows' scale and softmax stays sane.
Its bias decides how far the new label reaches into the old ones. It is chosen on held-out data: the run's
validation rows of the old labels (never the test split) and leave-one-out of the support rows (each row scored
by the prototype of the others). Among the (origin, scale, bias) choices that keep the old labels' validation accuracy within
``floor``, the one with the best class-balanced accuracy (each old label's share, the new label's held-out recall
counted as one more label) wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALES = (1.0, 2.0, 4.0)  # x the old rows' mean norm; which one (and which origin) is picked on validation, per label
ORIGINS = ("zero", "old mean")


@dataclass(frozen=True)
class Row:
    """One appended head row and the figures it was chosen on."""

    weight: torch.Tensor  # (H,)
    bias: float
    scale: float
    origin: str  # the direction: from "zero" (the mean feature itself) or from the "old mean"
    val_accuracy: float  # old labels' validation accuracy with the row added
    recall: float  # the support rows' leave-one-out recall at this bias (the rows it was chosen on)
    free_val_accuracy: float  # without the floor: the balanced optimum's validation accuracy ...
    free_recall: float  # ... and its leave-one-out recall (what the floor cost)


def prototype_row(support: torch.Tensor, norm: float, scale: float, origin: torch.Tensor | None = None) -> torch.Tensor:
    """The direction of the support rows' mean feature (K, H) -> (H,), seen from ``origin`` (H,) when given (the old
    labels' mean feature: what tells the new label from them, not what every text shares), with norm ``scale * norm``."""
    c = support.mean(0) if origin is None else support.mean(0) - origin
    return scale * norm * c / c.norm().clamp_min(1e-12)


def _support_margins(support, weight: torch.Tensor, bias: torch.Tensor, norm: float, scale: float, origin=None):
    """(K,) per support row: its score on a row built from the other rows, minus its best score on the head; a row
    is predicted as the new label where margin + bias > 0. One row alone is scored by its own row (no hold-out)."""
    best = (support @ weight.T + bias).max(1).values  # (K,)
    if len(support) == 1:
        return support @ prototype_row(support, norm, scale, origin) - best
    rows = torch.stack(
        [prototype_row(torch.cat([support[:i], support[i + 1 :]]), norm, scale, origin) for i in range(len(support))]
    )
    return (support * rows).sum(1) - best


def calibrate(
    support: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    val: torch.Tensor,
    val_y: torch.Tensor,
    floor: float,
    norm: float,
    scales: tuple[float, ...] = SCALES,
) -> Row:
    """The row for one new label: support features (K, H); the head so far, W (C, H) and b (C,); validation features
    (V, H) of the old labels with their labels (V,); ``floor``: the lowest old-label validation accuracy allowed."""
    logits = val @ weight.T + bias  # (V, C)
    best_old = logits.max(1).values  # (V,)
    correct = logits.argmax(1) == val_y  # (V,)
    n = weight.shape[0]
    chosen, free = None, None
    for origin, scale in [(o, s) for o in ORIGINS for s in scales]:
        centre = val.mean(0) if origin == "old mean" else None
        w = prototype_row(support, norm, scale, centre)
        mv = val @ w - best_old  # (V,) the new row takes a validation row where mv + b > 0
        ms = _support_margins(support, weight, bias, norm, scale, centre)  # (K,)
        edges = torch.cat([-mv, -ms]).sort().values
        cands = torch.cat([edges[:1] - 1, (edges[1:] + edges[:-1]) / 2, edges[-1:] + 1])  # (M,) one per interval
        acc = (correct[None, :] & (mv[None, :] + cands[:, None] <= 0)).float().mean(1)  # (M,)
        rec = (ms[None, :] + cands[:, None] > 0).float().mean(1)  # (M,)
        score = (n * acc + rec) / (n + 1)  # class-balanced: the new label weighs as much as one old label
        i_free = int(score.argmax())
        if free is None or score[i_free] > free[0] + 1e-9:
            free = (float(score[i_free]), float(acc[i_free]), float(rec[i_free]))
        score = torch.where(acc >= floor - 1e-9, score, torch.full_like(score, -1.0))
        i = int(score.argmax())  # the first of equal ones: the lowest bias, the fewest rows taken from the old labels
        if chosen is None or score[i] > chosen[0] + 1e-9:
            chosen = (float(score[i]), w, float(cands[i]), scale, origin, float(acc[i]), float(rec[i]))
    _, w, b, scale, origin, acc, rec = chosen
    return Row(w, b, scale, origin, acc, rec, free[1], free[2])


def append_rows(
    weight: torch.Tensor,
    bias: torch.Tensor,
    support: list[torch.Tensor],
    val: torch.Tensor,
    val_y: torch.Tensor,
    floor: float,
    scales: tuple[float, ...] = SCALES,
) -> tuple[torch.Tensor, torch.Tensor, list[Row]]:
    """The head (C, H), (C,) with one row per new label (support features (K_j, H) each) appended in order, each
    calibrated against the rows before it; the old rows are returned as given."""
    norm = float(weight.norm(dim=1).mean())
    rows = []
    for feats in support:
        row = calibrate(feats, weight, bias, val, val_y, floor, norm, scales)
        weight = torch.cat([weight, row.weight[None].to(weight.dtype)])
        bias = torch.cat([bias, torch.tensor([row.bias], dtype=bias.dtype)])
        rows.append(row)
    return weight, bias, rows


def held_out_accuracy(
    weight: torch.Tensor,
    bias: torch.Tensor,
    n_old: int,
    support: list[torch.Tensor],
    val: torch.Tensor,
    val_y: torch.Tensor,
    floor: float,
    scales: tuple[float, ...] = SCALES,
) -> list[float | None]:
    """Per new label, leave-one-out accuracy of the whole procedure: each support row is left out, the label's row is
    built and calibrated again from the others (against the final head's other rows), and the left-out row is scored
    on the full head. None for a label with one row."""
    norm = float(weight[:n_old].norm(dim=1).mean())
    out = []
    for j, feats in enumerate(support):
        k = n_old + j
        if len(feats) < 2:
            out.append(None)
            continue
        others = [r for r in range(weight.shape[0]) if r != k]
        hits = 0
        for i in range(len(feats)):
            rest = torch.cat([feats[:i], feats[i + 1 :]])
            row = calibrate(rest, weight[others], bias[others], val, val_y, floor, norm, scales)
            w, b = weight.clone(), bias.clone()
            w[k], b[k] = row.weight, row.bias
            hits += int(int((feats[i] @ w.T + b).argmax()) == k)
        out.append(round(hits / len(feats), 4))
    return out
