"""Alignment from human preferences: a reward model, DPO or RL (TRL), and LM bias metrics (lm_bias)."""


class ScriptTrainer:
    """A linear training script, ``script(recipe, run_dir) -> summary``, that seals RUN/model as its last step, as
    keel's Trainer (keel/pipeline.py); not resumable. The recipe's chat or preference file is read whole first, so
    bad data fails before a run directory is made."""

    resumable = False
    script = None  # set by each trainer: sft_run, align_run

    def __init__(self, recipe, resume: bool = False):
        from keel.align.prefs import check_source

        check_source(recipe)
        self.recipe = recipe

    def setup(self, run_dir) -> None:
        self.run_dir = run_dir

    def train(self) -> None:
        self.summary = self.script(self.recipe, self.run_dir)

    def save(self) -> dict:
        return self.summary

    def cleanup(self) -> None:
        pass
