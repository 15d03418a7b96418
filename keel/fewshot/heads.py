"""Heads over a classifier's own features: the input of its last linear layer (for BERT, the pooled [CLS] state).

A prototype head scores a text by its squared distance to each class's mean feature vector. Since
``-||x - c||^2 = 2 c.x - ||c||^2 - ||x||^2`` and the last term is the same for every class, it is exactly a linear
layer (W = 2c, b = -||c||^2) under softmax: the model with its head swapped stays an ordinary Hugging Face
``*ForSequenceClassification`` that `keel predict`, `keel serve` and `keel export` load as they load any run.
"""

from __future__ import annotations

import contextlib

import torch


def head_linear(model) -> tuple[torch.nn.Module, str, torch.nn.Linear]:
    """(parent module, attribute name, layer): the last ``nn.Linear`` with ``num_labels`` outputs (BERT's
    ``classifier``, RoBERTa's ``classifier.out_proj``)."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module.out_features == model.config.num_labels:
            found = name
    if found is None:
        raise ValueError(f"{type(model).__name__} has no linear layer with {model.config.num_labels} outputs")
    parent_name, _, attr = found.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


@contextlib.contextmanager
def capture_features(model):
    """Within the block, ``box[0]`` holds the input of the head layer (B, H) of the latest forward pass."""
    box: list = [None]
    _, _, layer = head_linear(model)

    def hook(module, args):
        box[0] = args[0]

    handle = layer.register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def forward_features(model, enc: dict) -> torch.Tensor:
    """Features (B, H) of one padded batch, with gradients when the caller allows them."""
    with capture_features(model) as box:
        model(**enc)
    return box[0]


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32) -> torch.Tensor:
    """Features (N, H) of ``texts`` in order, in eval mode."""
    from keel.tasks.classification import length_batches

    was_training = model.training
    model.eval()
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    out: list = [None] * len(texts)
    for idx in length_batches(lengths, batch_size):
        enc = tokenizer(
            [texts[i] for i in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        for i, row in zip(idx, forward_features(model, dict(enc)).float()):
            out[i] = row
    model.train(was_training)
    return torch.stack(out)


def prototypes(feats: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class means (C, H) of features (N, H) with labels (N,) in 0..C-1; every class must have a row."""
    counts = torch.bincount(y, minlength=n_classes)  # (C,)
    if (counts == 0).any():
        raise ValueError(f"class {int((counts == 0).nonzero()[0])} has no rows")
    sums = torch.zeros(n_classes, feats.shape[1], dtype=feats.dtype).index_add_(0, y, feats)  # (C, H)
    return sums / counts[:, None]


def prototype_weights(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear layer whose logits rank classes as ``-||x - c||^2`` does: W (C, H) = 2c, b (C,) = -||c||^2."""
    return 2 * centroids, -(centroids**2).sum(-1)


def squared_distances(feats: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, C) squared Euclidean distances of features (N, H) to centroids (C, H)."""
    return ((feats[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)  # (N, C); cdist's gradient is NaN at 0


def logistic_weights(feats: torch.Tensor, y: torch.Tensor, n_classes: int, seed: int = 0):
    """A multinomial logistic regression (scikit-learn, classes weighted alike however many rows each has) on
    features (N, H): its W (C, H) and b (C,)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=1000, class_weight="balanced", random_state=seed).fit(feats.numpy(), y.numpy())
    coef = torch.as_tensor(clf.coef_, dtype=torch.float32)
    bias = torch.as_tensor(clf.intercept_, dtype=torch.float32)
    if n_classes == 2 and coef.shape[0] == 1:  # binary: p(1) = sigmoid(w.x + b) = softmax([0, w.x + b])[1]
        coef, bias = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(bias), bias])
    return coef, bias


def set_head(model, weight: torch.Tensor, bias: torch.Tensor, labels: list[str]):
    """Replace the head layer by one with ``len(labels)`` outputs, W (C, H) and b (C,); the config follows."""
    parent, attr, old = head_linear(model)
    layer = torch.nn.Linear(old.in_features, len(labels), dtype=old.weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    setattr(parent, attr, layer)
    model.config.num_labels = len(labels)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    if hasattr(model, "num_labels"):
        model.num_labels = len(labels)
    return model
