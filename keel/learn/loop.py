"""`keel learn RUN_DIR`: one round of learning from feedback, with a safe promotion; and `--rollback`.

A round reads the label feedback that arrived since the last promotion, fine-tunes a challenger from the serving
model (the champion) with keel's engine on that feedback plus a replay sample of the run's frozen training split,
and scores both models on two fixed sets: the run's frozen validation split (the old data) and the feedback's
held-out part (the new data). The challenger is promoted only when it beats the champion on the new data by
``learn.margin`` and loses at most ``learn.max_old_drop`` on the old. Every round writes its decision (why, figures)
to RUN/learn/decisions/NNNN.json before learn/state.json changes; a server polling that file swaps models.

A causal-LM run (pretrained, SFT or aligned) learns from thumbs (KTO) and preferences (DPO) on its generations
instead: keel/learn/lm.py.

Limits: promoted classifier versions serve with PyTorch (`keel export` / `keel compress` are not re-run on them); a differentially private
run is refused (feedback training would spend privacy outside its accountant).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from keel import rundir
from keel.errors import KeelError
from keel.io import atomic_dir, atomic_write_json, atomic_write_text, writes_run
from keel.learn.record import conclude, next_round, now, write_decision
from keel.recipe import Recipe, load_recipe

logger = logging.getLogger(__name__)


def _run_recipe(run_dir: Path, overrides: list[str] | None) -> Recipe:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise KeelError(f"{run_dir} is not a keel run directory (no recipe.yaml); pass the folder `keel run` printed")
    return load_recipe(path, overrides)


def _learn_config(recipe: Recipe):
    from keel.recipe.learn import LearnConfig

    return recipe.learn or LearnConfig()


def _check_run(run_dir: Path, recipe: Recipe) -> None:
    if recipe.task not in ("classification", "causal-lm"):
        raise KeelError(
            f"keel learn learns classifiers (label feedback) and causal LMs (thumbs, preferences); {run_dir} is a "
            f"{recipe.task} run"
        )
    if recipe.train.privacy is not None:
        raise KeelError(
            f"{run_dir} was trained with DP-SGD; learning from feedback would spend privacy outside its "
            "accountant, so keel learn refuses it"
        )
    if not (run_dir / "model" / "keel.json").is_file():
        raise KeelError(f"{run_dir} has no final model yet (model/ is missing); finish training first")
    from keel.secure.seal import refuse_plain_outputs

    refuse_plain_outputs(run_dir, "learn")  # a challenger's weights would be plaintext beside a sealed run


def score(model_dir: Path, frame, batch_size: int = 64) -> dict:
    """Accuracy (and count) of a version's PyTorch model on ``frame`` (text, label)."""
    import torch

    from keel.runtime.load import load_trained

    if len(frame) == 0:
        return {"accuracy": None, "n": 0}
    t = load_trained(model_dir, "torch")
    label2id = {str(k): int(v) for k, v in t.model.config.label2id.items()}
    texts, gold = list(frame["text"]), [label2id[str(x)] for x in frame["label"]]
    right = 0
    for i in range(0, len(texts), batch_size):
        enc = t.tokenizer(
            texts[i : i + batch_size],
            truncation=True,
            max_length=t.recipe.model.max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            pred = t.model(**enc).logits.argmax(-1).tolist()  # (b,)
        right += sum(int(p == g) for p, g in zip(pred, gold[i : i + batch_size]))
    return {"accuracy": right / len(texts), "n": len(texts)}


def challenger_recipe(recipe: Recipe, champion_model: Path, data_file: Path, cfg) -> Recipe:
    """The run's recipe, starting from the champion's weights, trained on ``data_file`` for ``learn.epochs``."""
    train = recipe.train.model_copy(
        update={
            "epochs": cfg.epochs,
            "lr": cfg.lr or recipe.train.lr,
            "max_steps": cfg.max_steps,
            "early_stopping": None,  # no validation split: the decision sets stay unseen until judging
            "checkpoint_every": 0,
            "seed": cfg.seed,
        }
    )
    from keel.recipe import DataConfig

    data = DataConfig(path=str(data_file), labels=recipe.data.labels, dedup=False)
    return recipe.model_copy(
        update={
            "model": recipe.model.model_copy(update={"name": str(champion_model), "init": "pretrained"}),
            "data": data,
            "train": train,
            "audit": None,
            "compress": None,
            "output": recipe.output.model_copy(update={"dir": None}),
        }
    )


def decide(figures: dict, margin: float, max_old_drop: float) -> tuple[bool, str]:
    """Promote only when the challenger gains at least ``margin`` accuracy on the new data and loses at most
    ``max_old_drop`` on the old (a run without a validation split is judged on the new data alone). Adds the
    gain and the drop to ``figures``; returns (promote, why)."""
    new, old = figures["new"], figures["old"]
    gain = new["challenger"] - new["champion"]
    drop = old["champion"] - old["challenger"] if old["n"] else 0.0
    new["gain"], old["drop"] = round(gain, 6), round(drop, 6)
    if gain < margin - 1e-9:  # float noise does not refuse a gain equal to the margin
        return False, f"gain {gain:+.4f} on the feedback's held-out part is below learn.margin={margin}"
    if drop > max_old_drop + 1e-9:
        return False, (f"accuracy on the old validation split drops {drop:.4f}, over learn.max_old_drop={max_old_drop}")
    return True, (
        f"{gain:+.4f} accuracy on the feedback's held-out part (learn.margin={margin}), "
        f"{-drop:+.4f} on the old validation split (learn.max_old_drop={max_old_drop})"
    )


def _train_challenger(run_dir: Path, version: str, recipe: Recipe, frame, labels: list[str], cfg, champion: str):
    """Train into learn/<version>/ (a small run dir: recipe.yaml, splits/, model/, train.json), atomically."""
    from keel.data.load import RawSplits, source_digest
    from keel.data.splits import freeze
    from keel.train.engine import train

    data_file = rundir.learn_dir(run_dir) / "data" / f"{version}.parquet"  # the exact rows it trained on
    data_file.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(data_file, index=False)
    champion_model = rundir.version_dir(run_dir, champion) / "model"
    ch_recipe = challenger_recipe(recipe, champion_model.resolve(), data_file.resolve(), cfg)
    digest, source = source_digest(ch_recipe.data)
    final = rundir.version_dir(run_dir, version)
    with atomic_dir(final) as work:
        atomic_write_text(work / "recipe.yaml", ch_recipe.to_yaml())
        empty = frame[:0]
        freeze(work, RawSplits(frame, empty, empty, labels, source, digest, [f"learn: from {champion}"]))
        summary = train(ch_recipe, work, model_info={"learned_from": champion, "version": version})
        shutil.rmtree(work / "checkpoints", ignore_errors=True)  # complete: model/ is what counts
    return final, summary


@writes_run
def learn(run_dir: str | Path, overrides: list[str] | None = None) -> dict:
    """One round: challenger, judgement, decision (written to the run); returns the decision."""
    from keel.data.splits import load_frozen
    from keel.learn.data import label_feedback, mixed, replay_sample
    from keel.serve.feedback import read_rows

    run_dir = Path(run_dir)
    recipe = _run_recipe(run_dir, overrides)
    _check_run(run_dir, recipe)
    cfg = _learn_config(recipe)
    state = rundir.learn_state(run_dir)
    if recipe.task == "causal-lm":
        from keel.learn.lm import lm_round

        return lm_round(run_dir, recipe, cfg, state, next_round(run_dir))
    champion = state["current"]
    info = json.loads((rundir.version_dir(run_dir, champion) / "model" / "keel.json").read_text())
    labels = list(info["labels"])
    rows = read_rows(rundir.feedback_db(run_dir), after=state["learned_through"], kind="label")
    fb = label_feedback(rows, labels, cfg.holdout)
    n = next_round(run_dir)
    decision = {
        "round": n,
        "time": now(),
        "champion": champion,
        "rule": {"margin": cfg.margin, "max_old_drop": cfg.max_old_drop, "metric": "accuracy"},
        "data": {
            "feedback_rows": fb.rows,
            "feedback_after_id": state["learned_through"],
            "feedback_through_id": fb.last_id,
            "feedback_train": len(fb.train),
            "feedback_heldout": len(fb.heldout),
            "left_out": fb.unusable,
        },
    }
    usable = len(fb.train) + len(fb.heldout)
    if usable < cfg.min_feedback or len(fb.train) == 0 or len(fb.heldout) == 0:
        decision.update(
            action="skipped",
            why=f"{usable} usable label feedback text(s) since the last promotion ({len(fb.train)} to train on, "
            f"{len(fb.heldout)} held out); a round needs at least learn.min_feedback={cfg.min_feedback} and some of "
            "each",
        )
        decision["file"] = str(write_decision(run_dir, decision))
        return decision
    raw = load_frozen(run_dir)
    replay = replay_sample(raw.train, round(cfg.replay * len(fb.train)), cfg.seed + n)
    frame = mixed(fb.train, replay, cfg.seed + n)
    decision["data"]["replay"] = len(replay)
    version = rundir.version_name(n)
    logger.info(
        f"learn round {n}: challenger {version} from {champion} on {len(fb.train)} feedback + {len(replay)} replay rows"
    )
    final, summary = _train_challenger(run_dir, version, recipe, frame, labels, cfg, champion)
    champ_dir = rundir.version_dir(run_dir, champion)
    figures = {
        "old": {"set": "the run's frozen validation split"},
        "new": {"set": "the feedback's held-out part"},
    }
    for key, data in (("old", raw.validation), ("new", fb.heldout)):
        a, b = score(champ_dir, data), score(final, data)
        figures[key].update(champion=a["accuracy"], challenger=b["accuracy"], n=a["n"])
    promote, why = decide(figures, cfg.margin, cfg.max_old_drop)
    decision.update(
        action="promoted" if promote else "refused",
        why=why,
        challenger=version,
        figures=figures,
        train={k: summary.get(k) for k in ("steps", "train_seconds_this_session")},
    )
    return conclude(run_dir, decision, promote, state, final, fb.last_id, cfg.keep)


@writes_run
def rollback(run_dir: str | Path) -> dict:
    """Serve the version promoted before the current one again (a server polling the run swaps back)."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise KeelError(f"{run_dir} is not a keel run directory (no recipe.yaml); pass the folder `keel run` printed")
    state = rundir.learn_state(run_dir)
    if len(state["history"]) < 2:
        raise KeelError(
            f"{run_dir} serves its {state['current']} model and has no earlier version to roll back to "
            "(see its learn/decisions/)"
        )
    current, previous = state["history"][-1], state["history"][-2]
    if not (rundir.version_dir(run_dir, previous) / "model" / "manifest.json").is_file():
        raise KeelError(f"version {previous} of {run_dir} is no longer on disk; nothing to roll back to")
    n = next_round(run_dir)
    decision = {
        "round": n,
        "time": now(),
        "action": "rollback",
        "why": f"by command: {current} -> {previous}",
        "champion": current,
        "now_serving": previous,
    }
    decision["file"] = str(write_decision(run_dir, decision))
    state.update(current=previous, history=state["history"][:-1], round=n)
    atomic_write_json(rundir.learn_state_file(run_dir), state)
    return decision
