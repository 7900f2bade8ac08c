"""The job spec: what the coordinator asks a worker to train, written as `spec.json` in the job directory.

The coordinator builds it, the agent passes it through, the trainer reads it;
all three use this one model. It is strict: a spec the trainer does not fully
understand is a user error, never a silent default.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from shared.weights import FORMATS, ExportFormat

ModuleName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]{1,64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingHyperparameters(_Strict):
    n_epochs: int = Field(default=3, ge=1, le=50)
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    max_grad_norm: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.1, gt=0, le=10, description="DPO: how far the policy may move from the reference")


class LoraSpec(_Strict):
    r: int = Field(default=16, ge=1, le=256)
    alpha: int = Field(default=32, ge=1, le=1024)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | Annotated[list[ModuleName], Field(min_length=1, max_length=32)] = "all-linear"


class JobSpec(_Strict):
    job_id: str = Field(min_length=1, max_length=64)
    method: Literal["supervised", "dpo"] = Field(default="supervised", description="the training objective: "
                                                 "next-token loss on chat or prompt/completion data, or DPO on "
                                                 "preference pairs")
    kind: Literal["train", "verify", "export", "batch"] = Field(
        default="train", description="which program of the trainer's image runs: training, the verification of "
        "another worker's adapter, the export of an adapter merged into its base, or a batch's chat requests")
    base_model: str = Field(min_length=1, max_length=100, description="catalog id (shared.catalog)")
    model_dir: str = Field(min_length=1, description="directory holding the base model's weights and tokenizer")
    hyperparameters: TrainingHyperparameters = TrainingHyperparameters()
    lora: LoraSpec = LoraSpec()
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    max_seq_len: int = Field(default=2048, ge=16, le=131072)
    checkpoint_every_steps: int = Field(default=100, ge=1)
    eval_every_steps: int = Field(default=100, ge=1)
    quantization: Literal["nf4", "none"] = "nf4"
    train_on_inputs: bool = Field(default=False, description="also train on system/user tokens")
    packing: bool = Field(default=True, description="pack short examples into one sequence, without cross-attention")
    initial_adapter: bool = Field(default=False, description="start from the adapter in `initial/` (the fine-tune "
                                  "or checkpoint the job continues) instead of a fresh LoRA")
    early_stopping_patience: int | None = Field(default=None, ge=1, le=100, description="stop after this many "
                                                "evaluations without a better validation loss, keeping the best")
    export: list[ExportFormat] = Field(default_factory=list, max_length=len(FORMATS),
                                       description="an export lease's formats (shared.weights), in order")
    export_name: str = Field(default="", max_length=200, description="the fine-tune's name, written into GGUF files")
    validation_fraction: float = Field(default=0.1, ge=0, lt=1,
                                       description="held-out share of the training data when no validation file")
