"""A stand-in for the `pynvml` module (this machine has no NVIDIA driver): one GPU whose readings and
processes a test sets. It answers the calls `worker.nvml.GpuProbe` makes, with NVML's units."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace


class NVMLError(Exception):
    pass


@dataclass
class FakeNvml:
    name: str = "NVIDIA GeForce RTX 4090"
    uuid: str = "GPU-fake-0"
    memory_total: int = 24 * 1024**3
    memory_used: int = 1024**3
    temperature: int = 55
    utilization: int = 3
    power_mw: int = 30_000
    energy_mj: int = 1_000_000
    processes: list[int] = field(default_factory=list)
    power_limit_mw: int = 450_000
    may_set_power: bool = True  # False: as for an agent without administrator rights
    broken: bool = False  # every device call fails, as NVML does when a driver goes away mid-run
    NVML_TEMPERATURE_GPU: int = 0
    inits: int = 0

    def _check(self) -> None:
        if self.broken:
            raise NVMLError("GPU is lost")

    def nvmlInit(self) -> None:  # noqa: N802 - NVML's names
        self.inits += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        pass

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return "560.35"

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:  # noqa: N802
        return 12060

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        self._check()
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:  # noqa: N802
        return self.uuid.encode()

    def nvmlDeviceGetName(self, handle: int) -> str:  # noqa: N802
        return self.name

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:  # noqa: N802
        return (8, 9)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        self._check()
        return SimpleNamespace(total=self.memory_total, free=self.memory_total - self.memory_used, used=self.memory_used)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:  # noqa: N802
        return self.power_limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: int) -> int:  # noqa: N802
        return 450_000

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: int) -> tuple[int, int]:  # noqa: N802
        return (150_000, 600_000)

    def nvmlDeviceSetPowerManagementLimit(self, handle: int, milliwatts: int) -> None:  # noqa: N802
        if not self.may_set_power:
            raise NVMLError("Insufficient Permissions")
        self.power_limit_mw = milliwatts

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(gpu=self.utilization, memory=1)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:  # noqa: N802
        return self.temperature

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:  # noqa: N802
        return self.power_mw

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:  # noqa: N802
        return self.energy_mj

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:  # noqa: N802
        return [SimpleNamespace(pid=pid, usedGpuMemory=None) for pid in self.processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[SimpleNamespace]:  # noqa: N802
        raise NVMLError("not supported")
