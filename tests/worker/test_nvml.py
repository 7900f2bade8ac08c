"""`GpuProbe` over a fake NVML module (no NVIDIA driver here), and over the real one, which is absent here."""

from __future__ import annotations

from tests.worker.fake_nvml import FakeNvml
from worker.nvml import GpuProbe


def test_readings_with_nvml_units_converted() -> None:
    fake = FakeNvml(processes=[4242], temperature=71)
    machine = GpuProbe(fake).machine()
    assert (machine.driver_version, machine.cuda_version) == ("560.35", "12.6")
    [gpu] = machine.gpus
    assert gpu.uuid == "GPU-fake-0" and gpu.compute_capability == "8.9" and gpu.memory_total_bytes == 24 * 1024**3
    assert gpu.power_limit_w == 450 and gpu.power_w == 30 and gpu.temperature_c == 71 and gpu.energy_mj == 1_000_000
    assert gpu.process_pids == (4242,)  # graphics processes unsupported here: the compute list still counts
    assert gpu.inventory()["name"] == "NVIDIA GeForce RTX 4090"


def test_an_nvml_failure_mid_run_marks_the_gpu_unavailable_instead_of_crashing() -> None:
    fake = FakeNvml()
    probe = GpuProbe(fake)
    assert probe.machine().gpus[0].available
    fake.broken = True
    assert probe.machine().gpus[0].available is False
    fake.broken = False
    assert probe.machine().gpus[0].available and fake.inits == 1


def test_without_a_driver_there_are_no_gpus_and_a_reason() -> None:
    machine = GpuProbe().machine()  # the real pynvml
    if machine.gpus:  # a machine with a driver (a provider's PC) reads its GPUs instead
        assert machine.error is None and all(g.uuid for g in machine.gpus)
    else:
        assert "NVIDIA driver" in (machine.error or "")


def test_the_owners_power_cap_is_set_clamped_and_restored() -> None:
    fake = FakeNvml()
    probe = GpuProbe(fake)
    assert probe.cap_power(0, 300) is None and fake.power_limit_mw == 300_000
    assert probe.cap_power(0, 50) is None and fake.power_limit_mw == 150_000  # the card's floor
    assert probe.cap_power(0, None) is None and fake.power_limit_mw == 450_000  # its default again
    fake.may_set_power = False
    assert "administrator" in (probe.cap_power(0, 300) or "") and fake.power_limit_mw == 450_000
