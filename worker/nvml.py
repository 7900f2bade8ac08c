"""What the GPUs are and what they are doing, from NVML (`nvidia-ml-py`, imported as `pynvml`).

`GpuProbe` is the one place that calls NVML. Without a driver it reports no GPUs (CPU-only mode); an NVML
error in the middle of a run marks that GPU unavailable for that reading instead of crashing the agent.
Processes on a GPU that are not ours tell us the owner is using it (a game, a render).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU's identity and capacity (registration) plus its state now (heartbeats, policy)."""

    uuid: str
    index: int
    name: str
    memory_total_bytes: int
    compute_capability: str
    power_limit_w: float | None = None
    memory_free_bytes: int | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    energy_mj: int | None = None  # total energy since the driver loaded, millijoules (Volta and newer)
    process_pids: tuple[int, ...] = ()
    available: bool = True  # False: NVML failed for this GPU on this reading

    def inventory(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "index": self.index, "name": self.name, "memory_total_bytes": self.memory_total_bytes,
                "compute_capability": self.compute_capability, "power_limit_w": self.power_limit_w}


@dataclass(frozen=True, slots=True)
class Machine:
    driver_version: str | None
    cuda_version: str | None
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)
    error: str | None = None  # why there are no GPUs, for `gpu-info` and `doctor`


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuProbe:
    """Reads NVML. Thread-safe; `shutdown()` releases NVML."""

    def __init__(self, nvml: Any | None = None) -> None:
        self._lock = threading.Lock()
        self._nvml = nvml
        self._ready = False
        self._error: str | None = None

    def _init(self) -> Any | None:
        if self._ready:
            return self._nvml
        if self._error is not None:
            return None
        try:
            if self._nvml is None:
                import pynvml  # noqa: PLC0415 - optional at import time: CPU-only machines have no driver

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._ready = True
            return self._nvml
        except Exception as exc:  # noqa: BLE001 - any NVML failure means "no usable NVIDIA driver"
            self._error = f"NVML is not available ({exc.__class__.__name__}: {exc}); is an NVIDIA driver installed?"
            return None

    def machine(self) -> Machine:
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return Machine(driver_version=None, cuda_version=None, error=self._error)
            try:
                driver = _text(nvml.nvmlSystemGetDriverVersion())
                cuda = nvml.nvmlSystemGetCudaDriverVersion_v2()
                cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
                count = nvml.nvmlDeviceGetCount()
            except Exception as exc:  # noqa: BLE001
                return Machine(driver_version=None, cuda_version=None, error=f"NVML failed: {exc}")
            return Machine(driver_version=driver, cuda_version=cuda_version,
                           gpus=tuple(self._gpu(nvml, i) for i in range(count)))

    def _gpu(self, nvml: Any, index: int) -> GpuInfo:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid, name = _text(nvml.nvmlDeviceGetUUID(handle)), _text(nvml.nvmlDeviceGetName(handle))
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except Exception as exc:  # noqa: BLE001 - this GPU is unusable for now; the others still are
            log.warning("NVML failed on GPU %d: %s", index, exc)
            return GpuInfo(uuid=f"unavailable-{index}", index=index, name="unavailable", memory_total_bytes=0,
                           compute_capability="0.0", available=False)
        return GpuInfo(
            uuid=uuid, index=index, name=name, memory_total_bytes=int(memory.total),
            compute_capability=f"{major}.{minor}", memory_free_bytes=int(memory.free),
            power_limit_w=self._optional(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000),
            utilization_pct=self._optional(lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)),
            temperature_c=self._optional(lambda: float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))),
            power_w=self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000),
            energy_mj=self._optional(lambda: int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))),
            process_pids=tuple(self._processes(nvml, handle)),
        )

    @staticmethod
    def _optional(read: Any) -> Any:
        """A reading some GPUs do not support (energy on pre-Volta, power on laptops) is simply absent."""
        try:
            return read()
        except Exception:  # noqa: BLE001
            return None

    @staticmethod
    def _processes(nvml: Any, handle: Any) -> list[int]:
        pids: set[int] = set()
        for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                pids.update(int(p.pid) for p in getattr(nvml, query)(handle))
            except Exception:  # noqa: BLE001 - not supported on this GPU or driver
                continue
        return sorted(pids)

    def cap_power(self, index: int, watts: int | None) -> str | None:
        """Set the GPU's power limit to the owner's cap (clamped to what the card allows), or with None restore
        its default. Needs administrator rights; returns why NVML refused, or None when done."""
        with self._lock:
            nvml = self._init()
            if nvml is None:
                return self._error
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                if watts is None:
                    limit = nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
                else:
                    low, high = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
                    limit = min(max(watts * 1000, low), high)
                nvml.nvmlDeviceSetPowerManagementLimit(handle, limit)
            except Exception as exc:  # noqa: BLE001 - usually "insufficient permissions"; the job still runs
                return f"power limit not set ({exc.__class__.__name__}: {exc}); run the agent as administrator to cap power"
            return None

    def shutdown(self) -> None:
        with self._lock:
            if self._ready:
                try:
                    self._nvml.nvmlShutdown()
                except Exception:  # noqa: BLE001
                    pass
                self._ready = False
