"""What runs at a site: the global weights in, local training on the site's own rows, the new weights out.

Only arrays travel (Flower serializes numpy arrays as raw bytes); the rows never leave the site. With
DP on, the site clips its own update (and, for local DP, adds its own noise) before anything is sent.
"""

from __future__ import annotations

import numpy as np
import torch

from keel.train.strategies import epoch_order


def get_weights(model) -> list[np.ndarray]:
    """The trainable tensors, in a fixed order, as float32 arrays (what a site sends)."""
    return [p.detach().cpu().numpy().copy() for _, p in model.named_parameters()]


def weight_specs(model) -> list[tuple[str, tuple, str]]:
    return [(name, tuple(p.shape), "float32") for name, p in model.named_parameters()]


@torch.no_grad()
def set_weights(model, arrays: list[np.ndarray]) -> None:
    params = list(model.named_parameters())
    if len(arrays) != len(params):
        raise ValueError(f"got {len(arrays)} arrays for a model with {len(params)} parameter tensors")
    for (name, p), a in zip(params, arrays):
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"{name}: shape {tuple(a.shape)} does not fit {tuple(p.shape)}")
        p.copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))


def local_train(
    model,
    dataset,
    tokenizer,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adamw",
    max_grad_norm: float | None = None,
    seed: int = 0,
    max_steps: int | None = None,
    proximal_mu: float = 0.0,
) -> dict:
    """Train ``model`` in place on ``dataset`` (a tokenized split); returns the mean loss and the step count.

    FedProx adds (mu / 2) * ||w - w_global||^2 to the loss, with w_global the weights the round started from.
    """
    from keel.tasks.classification import collate

    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    steps, total = 0, 0.0
    with torch.random.fork_rng(devices=[]):  # dropout seeded per (site, round): a resumed run trains the same
        torch.manual_seed(seed)
        for epoch in range(epochs):
            order = epoch_order(len(dataset), seed, epoch)
            for start in range(0, len(order), batch_size):
                if max_steps is not None and steps >= max_steps:
                    break
                batch = collate(dataset[order[start : start + batch_size]], tokenizer)
                loss = model(**batch).loss  # mean over the batch
                if anchor is not None:
                    loss = loss + proximal_mu / 2 * sum(
                        ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor)
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                steps, total = steps + 1, total + float(loss.detach())
    return {"loss": total / max(steps, 1), "steps": steps}


def privatize(
    new: list[np.ndarray], start: list[np.ndarray], config: dict, local: dict | None = None
) -> list[np.ndarray]:
    """Client-side DP: clip the update to the clipping norm; local DP also adds Gaussian noise.

    ``config``: the server's round config (central DP sends ``clipping_norm``). ``local``: this site's own local-DP
    settings (privacy.local_noise of its recipe), which the server cannot weaken.
    """
    clip = local["clipping_norm"] if local else config.get("clipping_norm")
    if clip is None:
        return new
    # Flower's compute_clip_model_update divides by the norm (a site that did not move fails): clip here, in float64
    update = [a.astype(np.float64) - b.astype(np.float64) for a, b in zip(new, start)]
    norm = float(np.sqrt(sum(float(np.sum(u * u)) for u in update)))
    scale = min(1.0, float(clip) / norm) if norm > 0 else 1.0
    new = [(b.astype(np.float64) + scale * u).astype(a.dtype) for a, b, u in zip(new, start, update)]
    if local:
        import secrets

        rng = np.random.default_rng(secrets.randbits(128))  # OS entropy, never the recipe seed
        new = [(a + rng.normal(0.0, local["noise_std"], size=a.shape)).astype(a.dtype) for a in new]
    return new


def make_client(site: str, load, settings: dict):
    """A Flower NumPyClient for one site.

    ``load(labels) -> (model, tokenizer, dataset)`` runs once, at the first round: the server sends the label
    set in the round's config, so every site maps labels to the same head rows even if it lacks some of them.
    ``settings``: batch_size, lr, optimizer, max_grad_norm, seed, local_epochs.
    """
    import json

    from flwr.client import NumPyClient

    state: dict = {}

    def ensure(config) -> tuple:
        if "model" not in state:
            labels = json.loads(config["labels"]) if "labels" in config else None
            state["model"], state["tokenizer"], state["dataset"] = load(labels)
        return state["model"], state["tokenizer"], state["dataset"]

    class KeelSite(NumPyClient):
        ended = ""  # why the server ended the run early, if it did (`keel federate join` exits 2 with it)

        def get_properties(self, config):
            from keel.federated.transport import END_KEY

            if END_KEY in config:
                self.ended = str(config[END_KEY])
            return {}

        def get_parameters(self, config):
            return get_weights(ensure(config)[0])

        def fit(self, parameters, config):
            local = settings.get("local_dp")
            if local and state.get("releases", 0) >= local["releases"]:
                from keel.errors import KeelError

                raise KeelError(
                    f"site {site}: local DP budget spent ({local['releases']} noised updates sent, "
                    f"federated.rounds); it sends no more"
                )
            model, tokenizer, dataset = ensure(config)
            set_weights(model, parameters)
            rnd = int(config.get("round", 0))
            stats = local_train(
                model,
                dataset,
                tokenizer,
                epochs=int(config.get("local_epochs", settings["local_epochs"])),
                batch_size=settings["batch_size"],
                lr=settings["lr"],
                optimizer=settings["optimizer"],
                max_grad_norm=settings["max_grad_norm"],
                seed=settings["seed"] * 1_000_003 + rnd,
                max_steps=int(config["local_steps"]) if config.get("local_steps") else None,
                proximal_mu=float(config.get("proximal_mu", 0.0)),
            )
            new = privatize(get_weights(model), parameters, config, local)
            # Under DP every site weighs the same (the noise is calibrated to a sum of clipped updates), and a site
            # under local DP sends nothing un-noised about its data: no row count, loss or step count.
            if local:
                state["releases"] = state.get("releases", 0) + 1
                return new, 1, {"site": site, "dp_noise_std": local["noise_std"]}
            n = 1 if config.get("uniform_weights") else len(dataset)
            return new, n, {"site": site, "loss": stats["loss"], "steps": stats["steps"]}

        def evaluate(self, parameters, config):
            from keel.tasks.classification import evaluate

            model, tokenizer, dataset = ensure(config)
            set_weights(model, parameters)
            r = evaluate(model, dataset, tokenizer, 64, torch.device("cpu"))
            return r["loss"], len(dataset), {"site": site, "accuracy": r["accuracy"]}

    return KeelSite()
