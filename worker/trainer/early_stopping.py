"""Early stopping: training ends once the validation loss has not improved for `patience` evaluations, and the
adapter it returns is the best evaluation's, not the last step's.

The best weights are kept in memory (LoRA-sized) and travel in every checkpoint whose step is past the best
(`best_adapter.safetensors`, `shared.checkpoint`), so a job resumed on another worker still returns the best;
that worker measures their validation loss again rather than taking the checkpoint's word for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from worker.trainer.checkpoints import ADAPTER_NAME, Restored


def _snapshot(model) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


@dataclass
class EarlyStopping:
    patience: int
    best_step: int | None = None
    best_valid_loss: float | None = None
    evals_since_best: int = 0
    best_adapter: dict[str, torch.Tensor] | None = None

    def resumed(self, model, restored: Restored, measure: Callable[[], float]) -> None:  # type: ignore[no-untyped-def]
        """Take up the state a checkpoint recorded: its best weights (or the loaded ones if it was the best), and
        their validation loss as `measure` finds it now: the number in a stranger's checkpoint is not trusted,
        or a claimed loss of 0 would keep its weights whatever came after."""
        state = restored.early_stopping
        if state is None:
            return
        current = _snapshot(model)
        self.best_adapter = restored.best_adapter if restored.best_adapter is not None else current
        set_peft_model_state_dict(model, self.best_adapter, adapter_name=ADAPTER_NAME)
        self.best_valid_loss = measure()
        set_peft_model_state_dict(model, current, adapter_name=ADAPTER_NAME)
        self.best_step, self.evals_since_best = state.best_step, state.evals_since_best

    def evaluated(self, model, step: int, valid_loss: float) -> bool:  # type: ignore[no-untyped-def]
        """Record an evaluation; True when training should stop."""
        if self.best_valid_loss is None or valid_loss < self.best_valid_loss:
            self.best_step, self.best_valid_loss, self.evals_since_best = step, valid_loss, 0
            self.best_adapter = _snapshot(model)
            return False
        self.evals_since_best += 1
        return self.evals_since_best >= self.patience

    def state(self) -> dict[str, Any] | None:
        if self.best_step is None:
            return None
        return {"best_step": self.best_step, "best_valid_loss": self.best_valid_loss,
                "evals_since_best": self.evals_since_best}

    def keep_best(self, model, step: int) -> None:  # type: ignore[no-untyped-def]
        """Put the best evaluation's weights back into the model (nothing to do when it is this step)."""
        if self.best_adapter is not None and self.best_step != step:
            set_peft_model_state_dict(model, self.best_adapter, adapter_name=ADAPTER_NAME)
