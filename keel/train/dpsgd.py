"""DP-SGD as a strategy of the engine's one training loop; the accountant, the recipe checks and the per-example
machinery it uses are keel/trust/privacy.py."""

from __future__ import annotations

import logging
import math

from keel.errors import CheckpointError, RecipeError
from keel.train.strategies import Run, StepResult, Strategy
from keel.trust.privacy import (
    check_model,
    check_privacy_recipe,
    clipped_backward,
    dp_optimizer_args,
    make_accountant,
    per_example_inputs,
    person_rows,
    poisson_batch,
    steps_within_budget,
)

logger = logging.getLogger(__name__)


class DPSGD(Strategy):
    """DP-SGD as a strategy of the engine's loop (keel/train/engine.py): Poisson batches of persons, per-example
    clipping in chunks of ``max_physical_batch_size``, Gaussian noise once per step, the accountant and its budget.

    The engine does everything else (evaluation, best model, early stopping, checkpoints, the final model); this
    adds the accountant to every checkpoint and ``privacy`` to the summary.
    """

    label = "DP training"

    def setup(self, run: Run) -> None:
        import torch

        recipe, p = run.recipe, run.recipe.train.privacy
        # person -> their rows (a text + its swapped copy); N counts persons, not augmented rows
        self.rows_of = person_rows(run.data.splits["train"], run.train_ds, recipe)
        self.n, self.per_person = len(self.rows_of), max(len(r) for r in self.rows_of)
        check_privacy_recipe(recipe, self.n)
        check_model(run.model)
        if p.freeze_embeddings:
            frozen = [m for m in run.model.modules() if isinstance(m, torch.nn.Embedding)]
            for m in frozen:
                m.weight.requires_grad_(False)
            logger.info(f"DP-SGD: {len(frozen)} embedding tables frozen (train.privacy.freeze_embeddings)")
        self.q = run.cfg.batch_size / self.n
        self.sigma, self.history = p.noise_multiplier, []

    def steps_per_epoch(self, run: Run) -> int:
        self.spe = math.ceil(self.n / run.cfg.batch_size)
        return self.spe

    def resumed(self, run: Run, loaded) -> None:
        if loaded is None:
            raise CheckpointError(
                f"nothing to resume: {run.run_dir / 'checkpoints'} has no complete checkpoint; run without --resume"
            )
        saved = loaded.state.extra.get("privacy")
        if not saved:
            raise CheckpointError(
                f"{loaded.path} has no privacy accountant state: it was not trained with train.privacy"
            )
        self.sigma, self.history = saved["noise_multiplier"], saved["history"]  # the budget was planned with this sigma
        logger.info(
            f"resuming DP training from {loaded.path.name} (step {loaded.state.step}, epsilon so far {saved['epsilon']:.3f})"
        )

    def start(self, run: Run, planned: int) -> int:
        p = run.recipe.train.privacy
        if self.sigma is None:
            from opacus.accountants.utils import get_noise_multiplier

            self.sigma = float(
                get_noise_multiplier(
                    target_epsilon=p.target_epsilon,
                    target_delta=p.delta,
                    sample_rate=self.q,
                    steps=planned,
                    accountant=p.accountant,
                )
            )
        self.planned = planned
        self.allowed = steps_within_budget(p.accountant, self.sigma, self.q, p.delta, p.target_epsilon, planned)
        if self.allowed == 0:
            raise RecipeError(
                f"train.privacy: one step at sigma {self.sigma:g} and q {self.q:.4g} already spends more "
                f"than epsilon {p.target_epsilon}; raise train.privacy.noise_multiplier or target_epsilon"
            )
        if self.allowed < planned:
            logger.warning(
                f"privacy budget: epsilon {p.target_epsilon} allows {self.allowed} of the {planned} planned steps "
                f"at sigma {self.sigma:.4f}; training stops at step {self.allowed}"
            )
        self.accountant = make_accountant(p.accountant, self.history)
        return min(planned, self.allowed)  # the engine decides whether a resumed run has finished by this stop

    def prepare(self, run: Run) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        p = run.recipe.train.privacy
        run.model.to(run.accelerator.device)
        run.model.train()
        self.gs_model = GradSampleModule(run.model)  # hooks on run.model's layers; evaluation calls run.model itself
        # Each row is clipped at C/k, so a person's k rows move the sum by at most C; the noise std stays sigma * C.
        self.dp_opt = DPOptimizer(
            run.optimizer,
            **dp_optimizer_args(self.sigma, p.max_grad_norm, self.per_person),
            expected_batch_size=max(1, round(self.q * len(run.train_ds))),
        )

    def epoch_items(self, run: Run, epoch: int) -> list:
        # a step's batch depends on (seed, step) alone: the position in the epoch is the step count
        return list(range(max(run.state.step, epoch * self.spe), (epoch + 1) * self.spe))

    def step(self, run: Run, step: int) -> StepResult:
        import torch

        device, task, train_ds, tokenizer = run.accelerator.device, run.task, run.train_ds, run.tokenizer
        idx = [
            r for i in poisson_batch(self.n, self.q, run.cfg.seed, step) for r in self.rows_of[i]
        ]  # persons, all rows
        if idx:
            # A logical (Poisson) batch in physical chunks: each chunk's per-example gradients are clipped and
            # summed, then dropped (Opacus' skipped steps); noise is added once, after the last chunk.
            def chunk_loss(chunk):
                batch = {k: v.to(device) for k, v in task.collate(train_ds[chunk], tokenizer).items()}
                return self.gs_model(**per_example_inputs(batch, run.model)).loss  # mean over this chunk

            loss = clipped_backward(self.dp_opt, idx, run.recipe.train.privacy.max_physical_batch_size, chunk_loss)
        else:  # an empty Poisson batch still takes a (noise-only) step: the accountant counts it
            for prm in self.dp_opt.params:
                prm.grad_sample = torch.zeros((0, *prm.shape), device=prm.device)
            loss = float("nan")
        self.dp_opt.step()
        self.dp_opt.zero_grad(set_to_none=True)
        self.accountant.step(noise_multiplier=self.sigma, sample_rate=self.q)
        return StepResult(loss, len(idx), 1, {"batch": len(idx)})

    def epoch_after(self, run: Run, epoch: int) -> int:
        return run.state.step // self.spe  # a run stopped by the budget mid-epoch has not finished that epoch

    def privacy_state(self, run: Run) -> dict:
        p, acc, step = run.recipe.train.privacy, self.accountant, run.state.step
        eps = float(acc.get_epsilon(delta=p.delta)) if acc.history else 0.0
        return {
            "epsilon": eps,
            "delta": p.delta,
            "target_epsilon": p.target_epsilon,
            "noise_multiplier": self.sigma,
            "sample_rate": self.q,
            "steps": step,
            "planned_steps": self.planned,
            "steps_within_budget": self.allowed,
            "budget_exhausted": self.allowed < self.planned and step >= self.allowed,
            "accountant": p.accountant,
            "max_grad_norm": p.max_grad_norm,
            "poisson_sampling": p.poisson_sampling,
            # a causal LM trains on blocks of max_length tokens cut from joined documents: the guarantee is per block
            "unit": "person" if self.per_person > 1 else ("block" if run.recipe.task == "causal-lm" else "example"),
            "persons": self.n,
            "rows": len(run.train_ds),
            "rows_per_person": self.per_person,
            "row_clip": p.max_grad_norm / self.per_person,
            "history": [list(h) for h in acc.history],
        }

    def checkpoint_extra(self, run: Run) -> dict:
        return {"privacy": self.privacy_state(run)}

    def finish(self, run: Run, summary: dict) -> None:
        p, priv = run.recipe.train.privacy, self.privacy_state(run)
        if priv["budget_exhausted"]:
            logger.warning(
                f"privacy budget reached: stopped at step {run.state.step} of {self.planned}, epsilon "
                f"{priv['epsilon']:.3f} <= {p.target_epsilon}"
            )
        logger.info(
            f"privacy: (epsilon {priv['epsilon']:.3f}, delta {p.delta:g}) with sigma {self.sigma:.4f}, q {self.q:.5f}, "
            f"{run.state.step} steps ({p.accountant} accountant)"
        )
        if self.per_person > 1:
            logger.info(
                f"privacy is per person: {self.n} persons, {len(run.train_ds)} rows with their counterfactual copies, "
                f"each row clipped at {p.max_grad_norm / self.per_person:g} so a person's {self.per_person} rows "
                f"together stay within {p.max_grad_norm:g}"
            )
        priv.pop("history")
        summary["privacy"] = priv
        self.gs_model.remove_hooks()  # the final model is saved without Opacus' hooks and per-example gradients
        for prm in run.model.parameters():
            prm.grad_sample = None
