"""Checkpoints as tensors and JSON (the format is `shared.checkpoint`): written atomically, read back only after
every check, and never unpickled. A checkpoint in `resume/` may come from a stranger's machine."""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared import checkpoint as fmt
from shared.checkpoint import CheckpointRejected, CheckpointRules
from shared.jobspec import JobSpec
from worker.trainer.errors import BadCheckpoint

ADAPTER_NAME = "default"


def trainable_names(model) -> list[str]:  # type: ignore[no-untyped-def]
    """The LoRA weights in the optimizer's order, by the names PEFT saves them under."""
    marker = f".{ADAPTER_NAME}."
    return [name.replace(marker, ".") for name, p in model.named_parameters() if p.requires_grad]


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def save(folder: Path, *, model, optimizer, scheduler, spec: JobSpec, step: int, trained_tokens: int,  # type: ignore[no-untyped-def]
         rows: int, early_stopping: dict[str, Any] | None = None,
         best_adapter: dict[str, torch.Tensor] | None = None) -> None:
    """Write the checkpoint's four files into `folder` (which must not exist), and early stopping's best weights
    when its best step is an earlier one."""
    folder.mkdir(parents=True)
    names = trainable_names(model)
    adapter = {k: _cpu(v) for k, v in get_peft_model_state_dict(model).items()}
    if set(adapter) != set(names):
        raise RuntimeError("the optimizer's parameters are not the adapter's weights")
    save_file(adapter, str(folder / fmt.ADAPTER), metadata={"format": "pt"})
    optimizer_state = optimizer.state_dict()
    moments: dict[str, torch.Tensor] = {}
    for index, name in enumerate(names):
        state = optimizer_state["state"][index]
        for moment in fmt.MOMENTS:
            moments[f"{moment}/{name}"] = _cpu(state[moment])
        moments[f"step/{name}"] = _cpu(torch.as_tensor(state["step"], dtype=torch.float32).reshape(()))
    save_file(moments, str(folder / fmt.OPTIMIZER))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(folder / fmt.RNG))
    group, schedule = optimizer_state["param_groups"][0], scheduler.state_dict()
    version, words, gauss = random.getstate()
    state: dict[str, Any] = {
        "format": fmt.FORMAT, "step": step, "trained_tokens": trained_tokens,
        "optimizer": {"lr": float(group["lr"]), "initial_lr": float(group["initial_lr"])},
        "scheduler": {"last_epoch": int(schedule["last_epoch"]), "step_count": int(schedule["_step_count"]),
                      "base_lrs": [float(x) for x in schedule["base_lrs"]],
                      "last_lr": [float(x) for x in schedule["_last_lr"]]},
        "python_rng": {"version": version, "state": list(words), "gauss": gauss},
        "data_order": {"seed": spec.seed, "rows": rows},
    }
    if early_stopping is not None:
        state["early_stopping"] = early_stopping
        if early_stopping["best_step"] < step:
            assert best_adapter is not None and set(best_adapter) == set(names)
            save_file({k: _cpu(v) for k, v in best_adapter.items()}, str(folder / fmt.BEST), metadata={"format": "pt"})
    (folder / fmt.STATE).write_bytes(fmt.state_json(state))


def write_atomically(final: Path, **fields: Any) -> None:
    """`save` into a temporary sibling, fsync'd, then renamed into place: a crash leaves no half checkpoint."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(tmp, **fields)
    for path in tmp.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


@dataclass(frozen=True, slots=True)
class Restored:
    step: int
    trained_tokens: int
    early_stopping: fmt.EarlyStoppingState | None
    best_adapter: dict[str, torch.Tensor] | None  # early stopping's best weights when they are an earlier step's


def load(folder: Path, *, model, optimizer, scheduler, spec: JobSpec, total_steps: int) -> Restored:  # type: ignore[no-untyped-def]
    """Restore the model, optimizer, scheduler and RNGs from `folder`. Everything is
    checked before anything is loaded, and anything that fails while loading is the checkpoint's fault too
    (`BadCheckpoint`, never a worker error). The data order is the trainer's own (seeded by the job, over the
    rows it packed), so a checkpoint's record of it is informational."""
    rules = CheckpointRules.for_spec(spec, max_step=total_steps)
    try:
        state = fmt.check_folder(folder, rules)
    except CheckpointRejected as exc:
        raise BadCheckpoint(f"the checkpoint to resume from is refused: {exc}") from None
    try:
        return _restore(folder, state, model=model, optimizer=optimizer, scheduler=scheduler)
    except BadCheckpoint:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a stranger's bytes make torch raise is their checkpoint's fault
        raise BadCheckpoint(f"the checkpoint to resume from cannot be loaded: {exc.__class__.__name__}: "
                            f"{str(exc)[:300]}") from None


def _restore(folder: Path, state: fmt.CheckpointState, *, model, optimizer, scheduler) -> Restored:  # type: ignore[no-untyped-def]
    adapter = load_file(str(folder / fmt.ADAPTER))
    moments = load_file(str(folder / fmt.OPTIMIZER))
    rng = load_file(str(folder / fmt.RNG))
    best = load_file(str(folder / fmt.BEST)) if state.holds_best else None
    names = trainable_names(model)
    if set(names) != set(adapter) or (best is not None and set(best) != set(names)):
        raise BadCheckpoint("the checkpoint's adapter does not match this model's LoRA weights")
    for tensors in (adapter, moments, best or {}):  # values the coordinator does not read: a NaN or a negative step poisons
        for key, tensor in tensors.items():
            if not bool(torch.isfinite(tensor).all()):
                raise BadCheckpoint(f"{key} holds values that are not finite")
    if any(float(moments[f"step/{name}"]) != float(state.step) for name in names):
        raise BadCheckpoint(f"the optimizer's step counts are not the checkpoint's step {state.step}")
    for name, param in zip(names, (p for p in model.parameters() if p.requires_grad), strict=True):
        for tensors in (adapter, *((best,) if best is not None else ())):
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise BadCheckpoint(f"{name} has shape {list(tensors[name].shape)}, the model's is "
                                    f"{list(param.shape)}")
    set_peft_model_state_dict(model, adapter, adapter_name=ADAPTER_NAME)
    current = optimizer.state_dict()["param_groups"][0]
    optimizer.load_state_dict({
        "state": {i: {"step": moments[f"step/{name}"], **{m: moments[f"{m}/{name}"] for m in fmt.MOMENTS}}
                  for i, name in enumerate(names)},
        "param_groups": [{**current, "lr": state.optimizer.lr, "initial_lr": state.optimizer.initial_lr}],
    })
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": state.scheduler.last_epoch,
                               "_step_count": state.scheduler.step_count, "base_lrs": list(state.scheduler.base_lrs),
                               "_last_lr": list(state.scheduler.last_lr)})
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate((state.python_rng.version, tuple(state.python_rng.state), state.python_rng.gauss))
    return Restored(step=state.step, trained_tokens=state.trained_tokens, early_stopping=state.early_stopping,
                    best_adapter=best)


class BadAdapter(Exception):
    """An adapter (under verification, or the one a continued job starts from) cannot be loaded into the job's
    LoRA layers; each caller says whose fault that is."""


def load_adapter_weights(model, path: Path) -> None:  # type: ignore[no-untyped-def]
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadAdapter(f"the adapter is unreadable: {exc}") from None
    names = trainable_names(model)
    if set(weights) != set(names):
        raise BadAdapter("the adapter's tensors are not this job's LoRA weights")
    for name, param in zip(names, (p for p in model.parameters() if p.requires_grad), strict=True):
        tensor = weights[name]
        if tuple(tensor.shape) != tuple(param.shape) or not bool(torch.isfinite(tensor).all()):
            raise BadAdapter(f"{name} has the wrong shape or values that are not finite")
    set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
