"""Protocol-level fakes for tests and benchmarks: a worker agent that speaks the real HTTP protocol but
trains nothing, and a PEFT-shaped adapter archive built without torch (zeros of the right shapes)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import struct
import tarfile
from dataclasses import dataclass, field
from typing import Any

from shared import lora as shared_lora
from shared.catalog import BaseModelSpec, get_base_model
from shared.protocol import FENCING_TOKEN_HEADER, PROTOCOL_HEADER, PROTOCOL_VERSION, SHA256_HEADER

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GIB = 1024**3


def lora_shapes(base: BaseModelSpec, r: int, targets: tuple[str, ...] = ALL_LINEAR) -> dict[str, list[int]]:
    return {name: list(shape) for name, shape in shared_lora.lora_shapes(base, r=r, target_modules=targets).items()}


def safetensors_bytes(shapes: dict[str, list[int]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + bytes(offset)


def adapter_archive(
    model: str = "tunegrid/tiny-llama", *, r: int = 16, alpha: int = 32, targets: tuple[str, ...] = ALL_LINEAR,
    extra_members: dict[str, bytes] | None = None, shapes: dict[str, list[int]] | None = None,
) -> bytes:
    base = get_base_model(model)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
              "base_model_name_or_path": base.id, "task_type": "CAUSAL_LM"}
    members = {"adapter/adapter_config.json": json.dumps(config).encode(),
               "adapter/adapter_model.safetensors": safetensors_bytes(shapes or lora_shapes(base, r, targets)),
               **(extra_members or {})}
    buffer = io.BytesIO()
    # gzip's header holds a timestamp: fixed, so the same adapter is the same bytes in any second.
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def replace_members(archive: bytes, replacements: dict[str, bytes]) -> bytes:
    """The same .tar.gz with some members' bytes replaced (or added)."""
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in {**members, **replacements}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gpu(name: str = "NVIDIA GeForce RTX 4090", memory_gb: int = 24, cc: str = "8.9", uuid: str = "GPU-0") -> dict[str, Any]:
    return {"uuid": uuid, "index": 0, "name": name, "memory_total_bytes": memory_gb * GIB, "compute_capability": cc}


def registration(machine_id: str, *, price: str = "0.30", gpus: list[dict[str, Any]] | None = None,
                 cpu: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"machine_id": machine_id, "agent_version": "test", "ask_price_per_gpu_hour": price,
            "gpus": [gpu()] if gpus is None and cpu is None else (gpus or []), "cpu": cpu, **extra}


@dataclass
class FakeAgent:
    """Drives the worker protocol through any httpx-compatible client (TestClient or httpx.Client)."""

    client: Any
    worker_id: str = ""
    token: str = ""
    leases: dict[str, int] = field(default_factory=dict)  # lease id -> fencing token
    assignments: dict[str, dict[str, Any]] = field(default_factory=dict)  # lease id -> its assignment

    @classmethod
    def register(cls, client: Any, provider_key: str, machine_id: str = "pc-1", **fields: Any) -> FakeAgent:
        response = client.post("/v1/workers/register", json=registration(machine_id, **fields),
                               headers={"Authorization": f"Bearer {provider_key}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)})
        assert response.status_code == 200, response.text
        body = response.json()
        return cls(client=client, worker_id=body["worker_id"], token=body["worker_token"])

    def headers(self, lease_id: str | None = None, token: int | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
        if lease_id is not None:
            headers[FENCING_TOKEN_HEADER] = str(token if token is not None else self.leases[lease_id])
        return headers

    def heartbeat(self, activity: str = "idle", **fields: Any) -> Any:
        return self.client.post("/v1/workers/heartbeat", json={"activity": activity, **fields}, headers=self.headers())

    def claim(self, wait_s: float = 0, **fields: Any) -> dict[str, Any] | None:
        response = self.client.post("/v1/workers/claim", json={"wait_s": wait_s, **fields}, headers=self.headers())
        assert response.status_code == 200, response.text
        assignment = response.json()["assignment"]
        if assignment is not None:
            self.leases[assignment["lease_id"]] = assignment["fencing_token"]
            self.assignments[assignment["lease_id"]] = assignment
        return assignment

    def events(self, lease_id: str, *events: dict[str, Any], token: int | None = None) -> Any:
        return self.client.post(f"/v1/workers/leases/{lease_id}/events", json={"events": list(events)},
                                headers=self.headers(lease_id, token))

    def progress(self, lease_id: str, step: int = 1, loss: float = 2.0, *, token: int | None = None, **fields: Any) -> Any:
        return self.events(lease_id, {"type": "progress", "step": step, "total_steps": 10, "train_loss": loss,
                                      "tokens_per_s": 200.0, **fields}, token=token)

    def upload(self, lease_id: str, kind: str, data: bytes, *, step: int | None = None, digest: str | None = None,
               token: int | None = None) -> Any:
        path = f"/v1/workers/leases/{lease_id}/" + ("adapter" if kind == "adapter" else f"checkpoints?step={step}")
        return self.client.put(path, content=data,
                               headers={**self.headers(lease_id, token), SHA256_HEADER: digest or sha256(data)})

    def checkpoint_for(self, lease_id: str, step: int, *, extra: list[tarfile.TarInfo | tuple[str, bytes]] | None = None,
                       **replace: Any) -> bytes:
        """A well-formed checkpoint archive of this lease's job at `step` (zeros for weights), with members
        replaced (`replace`, by name) or entries added (`extra`)."""
        spec = self.assignments[lease_id]["spec"]
        targets = spec["lora"]["target_modules"]
        return checkpoint_archive(spec["base_model"], r=spec["lora"]["r"], step=step, replace=replace or None,
                                  extra=extra, targets=ALL_LINEAR if targets == "all-linear" else tuple(targets),
                                  lr=spec["hyperparameters"]["learning_rate"], seed=spec["seed"])

    def checkpoint_members_for(self, lease_id: str, step: int) -> dict[str, bytes]:
        spec = self.assignments[lease_id]["spec"]
        targets = spec["lora"]["target_modules"]
        return checkpoint_members(spec["base_model"], r=spec["lora"]["r"], step=step,
                                  targets=ALL_LINEAR if targets == "all-linear" else tuple(targets),
                                  lr=spec["hyperparameters"]["learning_rate"], seed=spec["seed"])

    def save_checkpoint(self, lease_id: str, step: int, *, token: int | None = None) -> Any:
        """The honest way: progress up to `step` first, then that step's checkpoint."""
        assert self.progress(lease_id, step=step, token=token).status_code == 200
        return self.upload(lease_id, "checkpoint", self.checkpoint_for(lease_id, step), step=step, token=token)

    def complete(self, lease_id: str, adapter: bytes, *, loss: float = 2.0, token: int | None = None,
                 usage: dict[str, Any] | None = None) -> Any:
        return self.client.post(f"/v1/workers/leases/{lease_id}/complete", headers=self.headers(lease_id, token), json={
            "adapter_sha256": sha256(adapter),
            "result": {"steps": 10, "trained_tokens": 1000, "final_train_loss": loss},
            "usage": usage or {"wall_seconds": 10.0, "gpu_seconds": 9.5, "energy_joules": 2500.0},
        })

    def finish(self, lease_id: str, model: str = "tunegrid/tiny-llama", r: int = 16, alpha: int = 32) -> Any:
        """The honest path after a claim: progress, adapter upload, complete."""
        adapter = adapter_archive(model, r=r, alpha=alpha)
        assert self.progress(lease_id).status_code == 200
        assert self.upload(lease_id, "adapter", adapter).status_code == 200
        return self.complete(lease_id, adapter)

    def fail(self, lease_id: str, kind: str = "worker_error", message: str = "CUDA error", token: int | None = None,
             usage: dict[str, Any] | None = None) -> Any:
        return self.client.post(f"/v1/workers/leases/{lease_id}/fail", headers=self.headers(lease_id, token), json={
            "kind": kind, "message": message, "usage": usage or {"wall_seconds": 5.0, "gpu_seconds": 4.0}})

    def preempted(self, lease_id: str, reason: str = "a game started", usage: dict[str, Any] | None = None) -> Any:
        return self.client.post(f"/v1/workers/leases/{lease_id}/preempted", headers=self.headers(lease_id), json={
            "reason": reason, "usage": usage or {"wall_seconds": 5.0, "gpu_seconds": 4.0}})


# --- checkpoints (shared/checkpoint.py's format), built without torch ------------------------------

def safetensors_of(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    """A safetensors file of zeros: name -> (dtype, shape)."""
    widths = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = widths[dtype]
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + bytes(offset)


def checkpoint_state(step: int, *, lr: float = 2e-4, seed: int = 0, rows: int = 10, tokens: int = 100) -> dict[str, Any]:
    return {"format": "tunegrid.checkpoint/1", "step": step, "trained_tokens": tokens,
            "optimizer": {"lr": lr / 2, "initial_lr": lr},
            "scheduler": {"last_epoch": step, "step_count": step + 1, "base_lrs": [lr], "last_lr": [lr / 2]},
            "python_rng": {"version": 3, "state": [7] * 624 + [624], "gauss": None},
            "data_order": {"seed": seed, "rows": rows}}


def checkpoint_members(model: str = "tunegrid/tiny-llama", *, r: int = 16, step: int = 1,
                       targets: tuple[str, ...] = ALL_LINEAR, lr: float = 2e-4, seed: int = 0) -> dict[str, bytes]:
    shapes = lora_shapes(get_base_model(model), r, targets)
    optimizer: dict[str, tuple[str, list[int]]] = {}
    for name, shape in shapes.items():
        optimizer[f"exp_avg/{name}"] = ("F32", shape)
        optimizer[f"exp_avg_sq/{name}"] = ("F32", shape)
        optimizer[f"step/{name}"] = ("F32", [])
    return {
        "adapter_model.safetensors": safetensors_of({n: ("F32", s) for n, s in shapes.items()}),
        "optimizer.safetensors": safetensors_of(optimizer),
        "rng.safetensors": safetensors_of({"torch": ("U8", [5056])}),
        "state.json": json.dumps(checkpoint_state(step, lr=lr, seed=seed)).encode(),
    }


def tar_gz(entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    """A .tar.gz of (name, bytes) files and prepared TarInfo entries (links, devices, ...), in order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in entries:
            if isinstance(entry, tarfile.TarInfo):
                tar.addfile(entry)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
    return buffer.getvalue()


def checkpoint_archive(model: str = "tunegrid/tiny-llama", *, r: int = 16, step: int = 1,
                       replace: dict[str, bytes] | None = None, extra: list[tarfile.TarInfo | tuple[str, bytes]] | None = None,
                       **fields: Any) -> bytes:
    """A well-formed checkpoint archive (`resume/<member>`), with members replaced or entries added."""
    members = {**checkpoint_members(model, r=r, step=step, **fields), **(replace or {})}
    folder = tarfile.TarInfo("resume")
    folder.type = tarfile.DIRTYPE
    return tar_gz([folder, *[(f"resume/{n}", b) for n, b in members.items()], *(extra or [])])


# --- the same worker, calling the services (no HTTP) -------------------------------------------------

@dataclass
class ServiceAgent:
    """A worker that drives `services/workers.py`, `leases.py` and `checkpoints.py` directly on a session, as the
    API's handlers do: for testing service behaviour on a real database without the HTTP layer. Its methods
    return what the services return and raise what they raise (`LeaseLost`, `Conflict`, ...)."""

    session: Any
    settings: Any
    store: Any
    worker_id: str = ""
    leases: dict[str, int] = field(default_factory=dict)
    assignments: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def register(cls, session: Any, settings: Any, store: Any, provider: Any, machine_id: str = "pc-1",
                 **fields: Any) -> ServiceAgent:
        from coordinator.services import workers  # noqa: PLC0415 - fakes.py is imported by benches without a coordinator
        from shared.protocol import WorkerRegister  # noqa: PLC0415

        worker, _ = workers.register(session=session, account=provider,
                                     request=WorkerRegister.model_validate(registration(machine_id, **fields)),
                                     protocol_version=PROTOCOL_VERSION, max_workers=settings.max_workers_per_provider)
        return cls(session=session, settings=settings, store=store, worker_id=worker.id)

    @property
    def worker(self) -> Any:
        from coordinator.db.tables import WorkerModel  # noqa: PLC0415

        return self.session.get(WorkerModel, self.worker_id, populate_existing=True)

    def claim(self, **fields: Any) -> Any:
        from coordinator.services import leases  # noqa: PLC0415
        from shared.protocol import ClaimRequest  # noqa: PLC0415

        assignment = leases.claim(session=self.session, settings=self.settings, worker=self.worker,
                                  request=ClaimRequest.model_validate({"wait_s": 0, **fields}))
        if assignment is not None:
            self.leases[assignment.lease_id] = assignment.fencing_token
            self.assignments[assignment.lease_id] = assignment
        return assignment

    def _token(self, lease_id: str, token: int | None) -> int:
        return token if token is not None else self.leases[lease_id]

    def events(self, lease_id: str, *events: dict[str, Any], token: int | None = None) -> Any:
        from coordinator.services import leases  # noqa: PLC0415
        from shared.protocol import LeaseEvent  # noqa: PLC0415

        return leases.record_events(session=self.session, worker=self.worker, lease_id=lease_id,
                                    fencing_token=self._token(lease_id, token),
                                    events=[LeaseEvent.model_validate(e) for e in events])

    def progress(self, lease_id: str, step: int = 1, loss: float = 2.0, *, token: int | None = None, **fields: Any) -> Any:
        return self.events(lease_id, {"type": "progress", "step": step, "total_steps": 10, "train_loss": loss,
                                      "tokens_per_s": 200.0, **fields}, token=token)

    def upload_adapter(self, lease_id: str, data: bytes, *, token: int | None = None) -> Any:
        from coordinator.services import leases  # noqa: PLC0415

        blob = self.store.put(leases.adapter_upload_key(lease_id), io.BytesIO(data))
        return leases.record_adapter(session=self.session, store=self.store, worker=self.worker, lease_id=lease_id,
                                     fencing_token=self._token(lease_id, token), blob=blob)

    def upload_checkpoint(self, lease_id: str, step: int, data: bytes, *, token: int | None = None) -> Any:
        """As the API does it: rules from the lease, the check outside any session, refused or recorded."""
        from coordinator.db.ids import new_id  # noqa: PLC0415
        from coordinator.services import checkpoints  # noqa: PLC0415

        fencing = self._token(lease_id, token)
        rules = checkpoints.upload_rules(session=self.session, settings=self.settings, worker=self.worker,
                                         lease_id=lease_id, fencing_token=fencing)
        checkpoint_id = new_id("ftckpt-")
        blob = self.store.put(checkpoints.checkpoint_key(checkpoint_id), io.BytesIO(data))
        refused = checkpoints.check_upload(self.store, blob, rules, step)
        if refused is not None:
            self.store.delete(blob.key)
            raise checkpoints.refuse(session=self.session, settings=self.settings, worker=self.worker,
                                     lease_id=lease_id, step=step, reason=refused)
        return checkpoints.record(session=self.session, store=self.store, settings=self.settings, worker=self.worker,
                                  lease_id=lease_id, fencing_token=fencing, step=step, checkpoint_id=checkpoint_id,
                                  blob=blob)

    def checkpoint_for(self, lease_id: str, step: int) -> bytes:
        spec = self.assignments[lease_id].spec
        targets = spec.lora.target_modules
        return checkpoint_archive(spec.base_model, r=spec.lora.r, step=step, lr=spec.hyperparameters.learning_rate,
                                  seed=spec.seed, targets=ALL_LINEAR if targets == "all-linear" else tuple(targets))

    def complete(self, lease_id: str, adapter: bytes, *, loss: float = 2.0, token: int | None = None,
                 usage: dict[str, Any] | None = None, eval_loss: float | None = None) -> Any:
        from coordinator.services import leases  # noqa: PLC0415
        from shared.protocol import LeaseComplete  # noqa: PLC0415

        report = LeaseComplete.model_validate({
            "adapter_sha256": sha256(adapter), "result": {"steps": 10, "trained_tokens": 1000, "final_train_loss": loss,
                                                          "final_eval_loss": eval_loss},
            "usage": usage or {"wall_seconds": 10.0, "gpu_seconds": 9.5, "energy_joules": 2500.0}})
        return leases.complete(session=self.session, store=self.store, settings=self.settings, worker=self.worker,
                               lease_id=lease_id, fencing_token=self._token(lease_id, token), report=report)

    def finish(self, lease_id: str, model: str = "tunegrid/tiny-llama", r: int = 16, alpha: int = 32,
               eval_loss: float | None = None) -> Any:
        """The honest path after a claim: progress, adapter upload, complete."""
        adapter = adapter_archive(model, r=r, alpha=alpha)
        self.progress(lease_id)
        self.upload_adapter(lease_id, adapter)
        return self.complete(lease_id, adapter, eval_loss=eval_loss)

    def verify(self, lease_id: str, *, token: int | None = None, wall_seconds: float = 3.0, **figures: Any) -> Any:
        """A verification lease's report: `figures` as `shared.protocol.VerificationResult` names them."""
        from coordinator.services import leases  # noqa: PLC0415
        from shared.protocol import LeaseComplete  # noqa: PLC0415

        self.events(lease_id, {"type": "started", "total_steps": 0}, token=token)
        report = LeaseComplete.model_validate({"verification": figures,
                                               "usage": {"wall_seconds": wall_seconds, "gpu_seconds": wall_seconds}})
        return leases.complete(session=self.session, store=self.store, settings=self.settings, worker=self.worker,
                               lease_id=lease_id, fencing_token=self._token(lease_id, token), report=report)

    def fail(self, lease_id: str, kind: str = "worker_error", message: str = "CUDA error", *, token: int | None = None) -> Any:
        from coordinator.services import checkpoints, leases  # noqa: PLC0415
        from shared.protocol import LeaseFail  # noqa: PLC0415

        report = LeaseFail.model_validate({"kind": kind, "message": message,
                                           "usage": {"wall_seconds": 5.0, "gpu_seconds": 4.0}})
        if kind == "bad_checkpoint":
            return checkpoints.report_bad(session=self.session, store=self.store, settings=self.settings,
                                          worker=self.worker, lease_id=lease_id,
                                          fencing_token=self._token(lease_id, token), report=report)
        return leases.fail(session=self.session, settings=self.settings, worker=self.worker, lease_id=lease_id,
                           fencing_token=self._token(lease_id, token), report=report)

    def upload_export(self, lease_id: str, fmt: str, data: bytes, *, token: int | None = None) -> Any:
        """As the API does it: the limit first, the bytes streamed to storage, then recorded on the lease."""
        from coordinator.services import export_leases  # noqa: PLC0415

        fencing = self._token(lease_id, token)
        limit = export_leases.upload_limit(session=self.session, worker=self.worker, lease_id=lease_id,
                                           fencing_token=fencing, fmt=fmt)
        blob = self.store.put(export_leases.upload_key(lease_id), io.BytesIO(data), max_bytes=limit)
        return export_leases.record_upload(session=self.session, store=self.store, worker=self.worker,
                                           lease_id=lease_id, fencing_token=fencing, fmt=fmt, blob=blob)

    def complete_export(self, lease_id: str, *, token: int | None = None, wall_seconds: float = 20.0) -> Any:
        from coordinator.services import leases  # noqa: PLC0415
        from shared.protocol import LeaseComplete  # noqa: PLC0415

        report = LeaseComplete.model_validate({"export": {}, "usage": {"wall_seconds": wall_seconds,
                                                                       "gpu_seconds": wall_seconds}})
        return leases.complete(session=self.session, store=self.store, settings=self.settings, worker=self.worker,
                               lease_id=lease_id, fencing_token=self._token(lease_id, token), report=report)

    def upload_batch_part(self, lease_id: str, answers: list[dict[str, Any]], *, token: int | None = None) -> Any:
        """As the API does it: the part streamed to storage, then checked and recorded."""
        from coordinator.services import batch_leases  # noqa: PLC0415

        fencing = self._token(lease_id, token)
        batch_leases.part_limit(session=self.session, worker=self.worker, lease_id=lease_id, fencing_token=fencing)
        data = "".join(json.dumps(a) + "\n" for a in answers).encode()
        blob = self.store.put(batch_leases.part_key(lease_id), io.BytesIO(data))
        return batch_leases.record_part(session=self.session, store=self.store, settings=self.settings,
                                        worker=self.worker, lease_id=lease_id, fencing_token=fencing, blob=blob)

    def complete_batch(self, lease_id: str, *, token: int | None = None, wall_seconds: float = 20.0) -> Any:
        from coordinator.services import leases  # noqa: PLC0415
        from shared.protocol import LeaseComplete  # noqa: PLC0415

        report = LeaseComplete.model_validate({"usage": {"wall_seconds": wall_seconds, "gpu_seconds": wall_seconds}})
        return leases.complete(session=self.session, store=self.store, settings=self.settings, worker=self.worker,
                               lease_id=lease_id, fencing_token=self._token(lease_id, token), report=report)

    def preempted(self, lease_id: str, reason: str = "a game started") -> Any:
        from coordinator.services import leases  # noqa: PLC0415
        from shared.protocol import LeasePreempted  # noqa: PLC0415

        report = LeasePreempted.model_validate({"reason": reason, "usage": {"wall_seconds": 5.0, "gpu_seconds": 4.0}})
        return leases.preempted(session=self.session, settings=self.settings, worker=self.worker, lease_id=lease_id,
                                fencing_token=self._token(lease_id, token=None), report=report)


# --- exports: files of the right shape, made without torch (zeros), for the coordinator's checks --------------

def merged_archive(model: str = "tunegrid/tiny-llama", *, shapes: dict[str, tuple[int, ...]] | None = None,
                   dtype: str = "BF16", config: dict[str, Any] | None = None,
                   extra_members: dict[str, bytes] | None = None, drop: tuple[str, ...] = ()) -> bytes:
    """A merged model's .tar as the agent packs it: bfloat16 zeros of the model's tensors, its config, a tokenizer."""
    from shared.weights import weight_shapes  # noqa: PLC0415

    base = get_base_model(model)
    tensors = shapes if shapes is not None else weight_shapes(base)
    width = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        size = width * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    weights = struct.pack("<Q", len(encoded)) + encoded + bytes(offset)
    members = {
        "config.json": json.dumps(config if config is not None else {
            "model_type": base.architecture, "hidden_size": base.hidden_size, "num_hidden_layers": base.layers,
            "num_attention_heads": base.attention_heads, "num_key_value_heads": base.kv_heads,
            "intermediate_size": base.intermediate_size, "vocab_size": base.vocab_size, "dtype": "bfloat16"}).encode(),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
        "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}',
        "model.safetensors": weights, **(extra_members or {}),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            if name in drop:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def gguf_file(path: Any, model: str = "tunegrid/tiny-llama", fmt: str = "gguf:q8_0", *, arch: str | None = None,
              vocab: int | None = None, drop: tuple[str, ...] = (), nan_in: str | None = None) -> Any:
    """A GGUF file of the model's tensors (zeros; Q8_0 blocks by llama.cpp's Python quantizer, Q4_K zero blocks)
    written with llama.cpp's `gguf` writer, as the export program writes one."""
    import gguf  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from shared.weights import weight_shapes  # noqa: PLC0415

    base = get_base_model(model)
    kinds = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
    writer = gguf.GGUFWriter(str(path), arch or base.architecture)
    writer.add_name("fake")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(vocab if vocab is not None else base.vocab_size)])
    names = gguf.get_tensor_name_map(kinds[base.architecture], base.layers)
    for hf_name, shape in weight_shapes(base).items():
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target in drop:
            continue
        if len(shape) == 1:
            data = np.zeros(shape, dtype=np.float32)
            if target == nan_in:
                data[0] = np.nan
            writer.add_tensor(target, data)
        elif fmt == "gguf:f16" or (fmt == "gguf:q4_k_m" and shape[1] % 256):
            data = np.zeros(shape, dtype=np.float16)
            if target == nan_in:
                data[0, 0] = np.inf
            writer.add_tensor(target, data)
        elif fmt == "gguf:q8_0":
            kind = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(np.zeros(shape, dtype=np.float32), kind), raw_dtype=kind)
        else:  # Q4_K: 144 bytes per block of 256 weights; zero bytes are a valid (all-zero) block
            kind = gguf.GGMLQuantizationType.Q4_K
            writer.add_tensor(target, np.zeros((shape[0], shape[1] // 256 * 144), dtype=np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def batch_lines(n: int, model: str = "tunegrid/tiny-llama", **body: Any) -> bytes:
    """A batch file of `n` chat requests (custom ids req-0, req-1, ...)."""
    return b"".join(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": model, "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "max_tokens": 16,
        **body}}).encode() + b"\n" for i in range(n))


def batch_answer(custom_id: str, content: str = "42", *, prompt_tokens: int = 20, completion_tokens: int = 2,
                 finish_reason: str = "stop") -> dict[str, Any]:
    return {"custom_id": custom_id, "content": content, "finish_reason": finish_reason,
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
