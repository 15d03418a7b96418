"""Recipe sections for trust: audit.* (explanations, fairness gates)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from keel.recipe.base import Strict


class ExplainConfig(Strict):
    """Token attributions (Captum integrated gradients), attention rollout, global importance, faithfulness."""

    n_steps: int = Field(32, ge=2, le=1024, description="integrated-gradients steps (Riemann trapezoid)")
    internal_batch_size: int = Field(64, ge=1, description="interpolated inputs per forward pass")
    max_examples: int = Field(64, ge=1, description="test texts explained for global importance and faithfulness")
    top_k: int = Field(3, ge=1, description="tokens removed/kept for ERASER comprehensiveness and sufficiency")
    top_tokens: int = Field(10, ge=1, description="tokens listed per class in the global importance")
    heatmaps: int = Field(8, ge=0, description="explained texts shown as heatmaps in the report")
    attention_rollout: bool = Field(True, description="also show attention rollout under each heatmap")
    seed: int = Field(0, description="seed of the random-token faithfulness baseline")


class FairnessGates(Strict):
    """Thresholds that fail the run (exit code 3) when crossed."""

    max_demographic_parity_difference: float | None = Field(
        None, ge=0.0, le=1.0, description="largest gap in selection rate between ranked groups"
    )
    max_equalized_odds_difference: float | None = Field(
        None, ge=0.0, le=1.0, description="largest gap in TPR or FPR between ranked groups"
    )
    min_group_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="lowest accuracy any ranked group may have"
    )
    min_subgroup_auc: float | None = Field(None, ge=0.0, le=1.0, description="lowest subgroup AUC (Borkan et al.)")
    max_counterfactual_flip_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="largest share of predictions an identity-term swap may flip"
    )
    on_unmeasurable: Literal["fail", "warn"] = Field(
        "fail",
        description="a gate with nothing to measure (every group below min_group_size, no swappable text) "
        "fails the run; warn: it is reported as not evaluated and the run goes on",
    )

    def thresholds(self) -> dict:
        """The gates that are set: name -> threshold."""
        return {k: v for k, v in self.model_dump().items() if k != "on_unmeasurable" and v is not None}


class FairnessConfig(Strict):
    """Per-group metrics (Fairlearn), Borkan AUCs, counterfactual swaps, mitigation."""

    groups: Literal["lexicon", "column"] = Field(
        "lexicon", description="identity terms found in the text (keel's lexicon), or the data.columns.group column"
    )
    categories: list[str] | None = Field(None, description="lexicon categories to audit; default: all")
    positive_label: str | None = Field(
        None, description="the outcome whose rates are compared; default: 'positive' if a label, else the last label"
    )
    min_group_size: int = Field(30, ge=1, description="smaller groups are flagged, not ranked")
    max_examples: int | None = Field(2000, ge=1, description="cap on the audited split")
    split: Literal["test", "validation"] = Field("test", description="the split audited")
    counterfactual: bool = Field(True, description="swap identity terms and count flipped predictions")
    mitigation: Literal["none", "threshold-optimizer", "counterfactual-augmentation"] = Field(
        "none", description="per-group thresholds (Fairlearn), or training on identity-swapped copies"
    )
    constraint: Literal["demographic_parity", "equalized_odds", "true_positive_rate_parity"] = Field(
        "equalized_odds", description="what the threshold optimizer equalizes"
    )
    baseline_run: str | None = Field(None, description="a run without mitigation, shown side by side")


class AuditConfig(Strict):
    """What `keel audit` (and `keel run`) check after training."""

    explain: ExplainConfig | None = Field(None, description="token attributions; null = skip")
    fairness: FairnessConfig | None = Field(None, description="per-group metrics; null = skip")
    gates: FairnessGates = FairnessGates()

    @model_validator(mode="after")
    def _gates_need_fairness(self) -> AuditConfig:
        if self.gates.thresholds() and self.fairness is None:
            raise ValueError(
                f"audit.gates ({', '.join(self.gates.thresholds())}) measure the fairness audit, which "
                "this recipe leaves out; add audit.fairness (e.g. audit.fairness.groups=lexicon) or "
                "remove the gates"
            )
        return self
