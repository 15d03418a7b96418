"""TRL trainers behind keel's recipe: reward model, DPO, KTO, and RL (GRPO / RLOO) from the reward model.

Each function takes plain lists of preference dicts and returns the trained model plus its per-step
logs; keel's own code decides what is saved where. TRL's CPU-unfriendly defaults are switched off
here (bf16 on, gradient checkpointing on); progress goes through keel's progress bar.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from keel.errors import KeelError
from keel.io import atomic_write_text
from keel.progress import progress


def _progress_callback(label: str, total: int, records: list[dict]):
    """A keel progress bar for a transformers Trainer; every logged record is appended to ``records``."""
    from transformers import TrainerCallback

    class KeelProgress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kw):
            self._cm = progress("step")
            self.bar = self._cm.__enter__()
            self.task = self.bar.add_task(label, total=total, info="")

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "train_runtime" in logs:
                return
            records.append(
                {
                    "stage": label,
                    "step": state.global_step,
                    **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))},
                }
            )
            if self.bar is not None and "loss" in logs:
                self.bar.update(self.task, completed=state.global_step, info=f"loss {float(logs['loss']):.4f}")

        def on_step_end(self, args, state, control, **kw):
            self.bar.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kw):
            self._cm.__exit__(None, None, None)
            self.bar = None

    return KeelProgress()


def quiet() -> None:
    """No per-map progress bars or load reports from the libraries: keel prints its own progress."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated")


def load_base(recipe):
    """The base model's folder and its tokenizer (pad = eos where it has none), TRL's logs quieted."""
    from transformers import AutoTokenizer

    from keel.models import model_dir
    from keel.train.engine import set_threads

    quiet()
    set_threads(recipe)
    base = model_dir(recipe.model.name)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer


def write_logs(run_dir: Path, logs: list[dict]) -> None:
    atomic_write_text(run_dir / "train_logs.jsonl", "".join(json.dumps(r) + "\n" for r in logs))


def common_args(steps: int, lr: float, batch_size: int, seed: int, mixed_precision: str, workdir: str) -> dict:
    """Arguments every TRL config here shares: keel owns saving, logging and progress."""
    quiet()
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=workdir,
        max_steps=steps,
        learning_rate=lr,
        per_device_train_batch_size=batch_size,
        seed=seed,
        bf16=cuda and mixed_precision == "bf16",
        fp16=cuda and mixed_precision == "fp16",
        gradient_checkpointing=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not cuda,
        lr_scheduler_type="linear",
        warmup_steps=0,
        dataloader_num_workers=0,
    )


def run_trainer(trainer):
    """Train with keel's progress bar only (transformers would also print every log record)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer


def peft_config(lora, model=None, task_type: str = "CAUSAL_LM"):
    if lora is None:
        return None
    from peft import LoraConfig

    layers, targets = None, lora.target_modules
    if lora.layers is not None and model is not None:
        n = model.config.num_hidden_layers
        layers = list(range(max(0, n - lora.layers), n))
        if targets == "all-linear":  # peft takes a layer subset only with named modules: every Linear of a block
            block = model.base_model.layers[0]
            targets = sorted(
                {name.split(".")[-1] for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
            )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        task_type=task_type,
        target_modules=targets,
        layers_to_transform=layers,
    )


def freeze_below_top(model, top: int | None) -> None:
    """Train only the top ``top`` transformer blocks and what sits above them (norm, head)."""
    if top is None:
        return
    blocks = model.base_model.layers if hasattr(model.base_model, "layers") else None
    if blocks is None:
        raise KeelError("align.reward_layers works with Llama-style models (model.layers); set it to null")
    keep = {id(p) for block in list(blocks)[-top:] for p in block.parameters()}
    keep |= {id(p) for p in model.base_model.norm.parameters()} | {id(p) for p in model.score.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _dataset(rows: list[dict], keys=("prompt", "chosen", "rejected")):
    import datasets

    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in keys})


def train_reward_model(
    base: Path,
    tokenizer,
    pairs: list[dict],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_length: int,
    mixed_precision: str = "no",
    top_layers: int | None = None,
):
    """A scalar-head reward model (Bradley-Terry loss on chosen vs rejected), fully fine-tuned. -> (model, logs)."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=1, local_files_only=True, use_safetensors=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    freeze_below_top(model, top_layers)
    logs: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        args = RewardConfig(**common_args(steps, lr, batch_size, seed, mixed_precision, work), max_length=max_length)
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=_dataset(pairs),
            processing_class=tokenizer,
            callbacks=[_progress_callback("reward model", steps, logs)],
        )
        run_trainer(trainer)
    return trainer.model.eval(), logs


@torch.no_grad()
def reward_scores(model, tokenizer, texts: list[str], batch_size: int = 16) -> list[float]:
    model.eval()
    device = next(model.parameters()).device
    out = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            out += model(**{k: v.to(device) for k, v in enc.items()}).logits[:, 0].float().tolist()  # (B,)
    finally:
        tokenizer.padding_side = side
    return out


def pairwise_accuracy(model, tokenizer, pairs: list[dict]) -> float:
    """Share of pairs whose chosen text the reward model scores above the rejected one (eos appended, as in training)."""
    eos = tokenizer.eos_token or ""
    chosen = reward_scores(model, tokenizer, [p["prompt"] + p["chosen"] + eos for p in pairs])
    rejected = reward_scores(model, tokenizer, [p["prompt"] + p["rejected"] + eos for p in pairs])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


def load_policy(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, local_files_only=True, use_safetensors=True)


def train_dpo(
    base: Path,
    tokenizer,
    pairs: list[dict],
    cfg,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_length: int,
    mixed_precision: str = "no",
    ref_model=None,
):
    """DPO against a frozen reference: the base model itself (LoRA: adapter off) or ``ref_model``. -> (policy, logs)."""
    from trl import DPOConfig, DPOTrainer

    return _train_preference(
        DPOTrainer,
        DPOConfig,
        base,
        tokenizer,
        _dataset(pairs),
        cfg,
        steps,
        lr,
        batch_size,
        seed,
        max_length,
        mixed_precision,
        ref_model,
    )


def train_kto(
    base: Path,
    tokenizer,
    examples: list[dict],
    cfg,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    max_length: int,
    mixed_precision: str = "no",
):
    """KTO (TRL's KTOTrainer) on unpaired ``prompt``, ``completion``, ``label`` (True: desirable) examples, against
    the frozen base model. KTO estimates its KL term from mismatched completions within a batch, so a batch holds at
    least 2 examples, in the order given (TRL's sequential sampler). -> (policy, logs)."""
    from trl import KTOConfig, KTOTrainer

    dataset = _dataset(examples, ("prompt", "completion", "label"))
    return _train_preference(
        KTOTrainer,
        KTOConfig,
        base,
        tokenizer,
        dataset,
        cfg,
        steps,
        lr,
        max(2, batch_size),
        seed,
        max_length,
        mixed_precision,
    )


def _train_preference(
    trainer_cls,
    config_cls,
    base,
    tokenizer,
    dataset,
    cfg,
    steps,
    lr,
    batch_size,
    seed,
    max_length,
    mixed_precision,
    ref_model=None,
):
    """One TRL preference trainer (DPO, KTO) on ``dataset``, with a frozen reference model unless LoRA's adapter-off
    base serves as one. -> (policy, logs)."""
    torch.manual_seed(seed)
    model = load_policy(base)
    if cfg.lora is None and ref_model is None:
        ref_model = load_policy(base)
    logs: list[dict] = []
    with tempfile.TemporaryDirectory() as work:
        args = config_cls(
            **common_args(steps, lr, batch_size, seed, mixed_precision, work), beta=cfg.beta, max_length=max_length
        )
        trainer = trainer_cls(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config(cfg.lora, model),
            callbacks=[_progress_callback(trainer_cls.__name__.removesuffix("Trainer"), steps, logs)],
        )
        run_trainer(trainer)
    return trainer.model, logs


def train_rl(
    base: Path,
    tokenizer,
    prompts: list[str],
    reward_model,
    cfg,
    steps: int,
    lr: float,
    seed: int,
    mixed_precision: str = "no",
):
    """GRPO or RLOO on the reward model's scores, with a KL penalty (cfg.beta) to the frozen base. -> (policy, logs)."""
    import datasets

    if cfg.method == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    torch.manual_seed(seed)
    model = load_policy(base)
    logs: list[dict] = []
    batch = 2 * cfg.num_generations  # two prompts per step, each sampled num_generations times
    with tempfile.TemporaryDirectory() as work:
        args = Config(
            **common_args(steps, lr, batch, seed, mixed_precision, work),
            beta=cfg.beta,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_new_tokens,
            temperature=1.0,
            log_completions=False,
        )
        trainer = Trainer(
            model=model,
            reward_funcs=reward_model,
            reward_processing_classes=tokenizer,
            args=args,
            train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            peft_config=peft_config(cfg.lora, model),
            callbacks=[_progress_callback(cfg.method.upper(), steps, logs)],
        )
        run_trainer(trainer)
    return trainer.model, logs


def merged(model):
    """A plain transformers model: a PEFT model has its LoRA weights merged in; anything else is returned as is."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
