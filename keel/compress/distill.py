"""Knowledge distillation: a student cut from the teacher (or any registry model), trained on a mix of the
labels and the teacher's softened outputs (Hinton et al. 2015), optionally matching hidden states
(TinyBERT-style, through a learned projection when the widths differ).

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + hidden_weight * mean_l MSE(student_hidden[l], teacher_hidden[map(l)])

Works for classifiers and for causal LMs (the KL is then taken per token over the vocabulary).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from keel.errors import KeelError


def layer_list(model) -> torch.nn.ModuleList:
    """The stack of transformer blocks of a Hugging Face model (BERT-like encoders, Llama-like decoders)."""
    base = getattr(model, model.base_model_prefix, model)
    for path in ("encoder.layer", "layers", "h", "transformer.layer"):
        node = base
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return node
    raise KeelError(
        f"cannot find the transformer layers of {type(model).__name__}; distill into a registry model "
        "instead (compress.distill.student)"
    )


def _set_layer_list(model, layers: torch.nn.ModuleList) -> None:
    base = getattr(model, model.base_model_prefix, model)
    for path in ("encoder.layer", "layers", "h", "transformer.layer"):
        *parents, leaf = path.split(".")
        holder = base
        for part in parents:
            holder = getattr(holder, part, None)
        if holder is not None and isinstance(getattr(holder, leaf, None), torch.nn.ModuleList):
            setattr(holder, leaf, layers)
            return


def pick_layers(n_teacher: int, spec: int | list[int] | None) -> list[int]:
    """Which teacher layers the student keeps. ``None``: every other one (DistilBERT); an int n: n layers
    spread evenly, always keeping the last; a list: exactly those."""
    if spec is None:
        spec = max(1, n_teacher // 2)
    if isinstance(spec, int):
        if not 1 <= spec <= n_teacher:
            raise KeelError(
                f"compress.distill.layers = {spec}, but the teacher has {n_teacher} layers; "
                f"pick 1..{n_teacher - 1} so the student is smaller"
            )
        if spec == n_teacher:
            raise KeelError(
                f"compress.distill.layers = {spec} keeps every teacher layer: the student would not be "
                f"smaller; pick fewer than {n_teacher}"
            )
        step = n_teacher / spec
        return sorted({n_teacher - 1 - int(i * step) for i in range(spec)})
    chosen = sorted(set(spec))
    if not chosen or chosen[0] < 0 or chosen[-1] >= n_teacher:
        raise KeelError(f"compress.distill.layers {spec} must be indices in 0..{n_teacher - 1}")
    if len(chosen) >= n_teacher:
        raise KeelError("compress.distill.layers keeps every teacher layer: the student would not be smaller")
    return chosen


def student_from_teacher(teacher, layers: list[int]):
    """A copy of the teacher with only ``layers`` kept (embeddings and head copied as they are)."""
    student = copy.deepcopy(teacher)
    kept = torch.nn.ModuleList([copy.deepcopy(layer_list(teacher)[i]) for i in layers])
    for new_idx, layer in enumerate(kept):  # attention modules of decoders carry their own index (KV cache)
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    _set_layer_list(student, kept)
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    return student


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def check_smaller(student, teacher) -> None:
    s, t = param_count(student), param_count(teacher)
    if s >= t:
        raise KeelError(
            f"the student has {s:,} parameters, not fewer than the teacher's {t:,}; "
            "pick a smaller student (compress.distill.student or compress.distill.layers)"
        )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    alpha: float,
    temperature: float,
    ignore_index: int = -100,
) -> torch.Tensor:
    """alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher || student); logits (..., C), labels (...)."""
    C = student_logits.shape[-1]
    s, t = student_logits.reshape(-1, C).float(), teacher_logits.reshape(-1, C).float()  # (N, C)
    keep = None
    if labels is not None:
        flat = labels.reshape(-1)
        keep = flat != ignore_index
        s, t, flat = s[keep], t[keep], flat[keep]
    kl = (
        F.kl_div(
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    if labels is None or alpha == 0:
        return kl
    return alpha * F.cross_entropy(s, flat) + (1 - alpha) * kl


class Distiller(torch.nn.Module):
    """The loss of a distillation step: ``distiller(student, batch) -> loss``. The teacher stays frozen in eval mode.

    A trainable projection (student width -> teacher width) is only created for hidden-state matching between
    models of different widths; it is saved nowhere (it only shapes the student's training).

    A classifier teacher's logits are kept per text (its unpadded inputs), so with several epochs the frozen teacher
    scores each training text once: its forward pass was about half of a 2-layer student's step. Causal LMs
    (logits per token over the vocabulary) and hidden-state matching run the teacher every step.
    """

    def __init__(
        self,
        teacher,
        alpha: float,
        temperature: float,
        hidden_weight: float = 0.0,
        layer_map: list[int] | None = None,
        causal: bool = False,
    ):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise KeelError(f"compress.distill.alpha must be in [0, 1]; got {alpha}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature, self.hidden_weight = alpha, temperature, hidden_weight
        self.layer_map, self.causal = layer_map, causal
        self.cached: dict[bytes, torch.Tensor] = {}  # a text's unpadded inputs -> the teacher's logits (C,)

    def forward(self, student, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want_hidden = self.hidden_weight > 0
        t_out = None
        if want_hidden or self.causal:
            with torch.no_grad():
                t_out = self.teacher(**inputs, output_hidden_states=want_hidden)
            t_logits = t_out.logits
        else:
            t_logits = self._teacher_logits(inputs)
        s_out = student(**inputs, output_hidden_states=want_hidden)
        labels = batch.get("labels")
        s_logits = s_out.logits
        if self.causal:  # position t predicts token t + 1
            s_logits, t_logits = s_logits[:, :-1], t_logits[:, :-1]
            labels = labels[:, 1:] if labels is not None else None
        loss = kd_loss(s_logits, t_logits, labels, self.alpha, self.temperature)
        if want_hidden:
            loss = loss + self.hidden_weight * self._hidden_loss(
                s_out.hidden_states, t_out.hidden_states, inputs.get("attention_mask")
            )
        return loss

    def _teacher_logits(self, inputs: dict) -> torch.Tensor:
        """(B, C): from the cache for texts the teacher has scored, one teacher pass over the batch otherwise."""
        mask = inputs.get("attention_mask")
        keys = [
            b"".join(
                (v[i][mask[i].bool()] if mask is not None and v.shape == mask.shape else v[i]).cpu().numpy().tobytes()
                for _, v in sorted(inputs.items())
            )
            for i in range(len(next(iter(inputs.values()))))
        ]
        if not all(k in self.cached for k in keys):
            with torch.no_grad():
                logits = self.teacher(**inputs).logits.detach()  # (B, C)
            self.cached.update(zip(keys, logits))
        return torch.stack([self.cached[k] for k in keys])

    def _hidden_loss(self, s_hidden, t_hidden, mask) -> torch.Tensor:
        # hidden_states[0] is the embedding output; student layer i matches teacher layer layer_map[i]
        mapping = self.layer_map or list(range(len(s_hidden) - 1))
        pairs = [(s_hidden[0], t_hidden[0])] + [(s_hidden[i + 1], t_hidden[j + 1]) for i, j in enumerate(mapping)]
        w = mask.unsqueeze(-1).float() if mask is not None else None  # (B, T, 1)
        total = 0.0
        for s, t in pairs:  # (B, T, H)
            if s.shape[-1] != t.shape[-1]:
                raise KeelError(
                    "hidden-state matching needs the student and teacher to have the same width; "
                    "set compress.distill.hidden_weight: 0 for this student"
                )
            err = (s.float() - t.float()) ** 2
            total = total + ((err * w).sum() / (w.sum() * s.shape[-1]) if w is not None else err.mean())
        return total / len(pairs)
