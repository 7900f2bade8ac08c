"""`tunegrid-worker`: the provider's agent. `gpu-info`, `register`, `run` and `doctor`."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import threading
from decimal import Decimal, InvalidOperation
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from shared.protocol import CpuInventory, WorkerRegister
from worker.agent import Agent
from worker.channel import Channel, ChannelError
from worker.files import read_json, write_json_atomic
from worker.model_cache import ModelCache
from worker.nvml import GpuProbe, Machine
from worker.policy import PolicyGate, load_policy, save_policy
from worker.runtimes.base import Runtime
from worker.runtimes.docker import DockerRuntime
from worker.runtimes.process import ProcessRuntime
from worker.settings import WorkerSettings

CPU_ONLY = ("No NVIDIA GPU is usable here ({why}). CPU-only mode trains only the tiny test model "
            "(tunegrid/tiny-llama); real jobs need an NVIDIA GPU with a driver.")
MIN_FREE_DISK = 50 * 1024**3

def _usd(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a price in USD") from None
    if value < 0:
        raise argparse.ArgumentTypeError("a price cannot be negative")
    return value

def _machine_id() -> str:
    import platform  # noqa: PLC0415
    import uuid  # noqa: PLC0415

    return f"{platform.node() or 'pc'}-{uuid.getnode():012x}"

def gpu_info(settings: WorkerSettings, probe: GpuProbe) -> int:
    machine = probe.machine()
    if not machine.gpus:
        print(CPU_ONLY.format(why=machine.error or "no GPU found"))
        return 0
    print(f"driver {machine.driver_version}, CUDA {machine.cuda_version}")
    print(f"{'#':<3}{'name':<32}{'memory':>12}{'free':>10}{'cc':>6}{'temp':>7}{'util':>7}{'power':>9}  processes")
    for g in machine.gpus:
        if not g.available:
            print(f"{g.index:<3}GPU unavailable (NVML could not read it)")
            continue
        print(f"{g.index:<3}{g.name[:31]:<32}{g.memory_total_bytes / 1024**3:>10.1f}GB{(g.memory_free_bytes or 0) / 1024**3:>8.1f}GB"
              f"{g.compute_capability:>6}{(g.temperature_c or 0):>6.0f}C{(g.utilization_pct or 0):>6.0f}%"
              f"{(g.power_w or 0):>7.0f}W  {len(g.process_pids)}")
    return 0

def register(settings: WorkerSettings, probe: GpuProbe, args: argparse.Namespace) -> int:
    policy = load_policy(settings.policy_path)
    if args.price < policy.min_price_per_gpu_hour:
        print(f"--price {args.price} is below your policy's minimum {policy.min_price_per_gpu_hour}.", file=sys.stderr)
        return 2
    machine = probe.machine()
    import os  # noqa: PLC0415

    body = WorkerRegister(
        machine_id=args.machine_id or _machine_id(), name=args.name, agent_version=_version(),
        driver_version=machine.driver_version, cuda_version=machine.cuda_version,
        gpus=[g.inventory() for g in machine.gpus if g.available],
        cpu=CpuInventory(cores=os.cpu_count() or 1, memory_bytes=_memory_bytes()),
        ask_price_per_gpu_hour=args.price, policy=policy.public(), cached_models=ModelCache(settings.model_cache).cached(),
    )
    channel = Channel(args.coordinator, None, settings)
    try:
        reply = channel.register(args.provider_key, body)
    except ChannelError as exc:
        print(f"Registration failed: {exc}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    write_json_atomic(settings.credentials_path, {"coordinator": args.coordinator, "worker_id": reply.worker_id,
                                                  "worker_token": reply.worker_token,
                                                  "heartbeat_interval_s": reply.heartbeat_interval_s}, private=True)
    if not settings.policy_path.exists():
        save_policy(settings.policy_path, policy)
    print(f"Registered worker {reply.worker_id}; credentials in {settings.credentials_path} (owner-only).")
    return 0

def _memory_bytes() -> int:
    try:
        import os  # noqa: PLC0415

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 8 * 1024**3  # Windows: a conservative figure; the tiny model needs far less

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("tunegrid")
    except PackageNotFoundError:
        return "dev"

def choose_runtime(settings: WorkerSettings) -> Runtime:
    """Docker when asked, or by default when an engine holds the trainer image; else the trainer as a subprocess."""
    if settings.runtime == "docker" or (settings.runtime == "auto" and DockerRuntime.available(settings.image)):
        if not DockerRuntime.available(settings.image):
            raise SystemExit(f"No Docker engine with the image {settings.image}: build worker/trainer/Dockerfile "
                             "or run with --runtime process.")
        return DockerRuntime(image=settings.image)
    return ProcessRuntime()

def run(settings: WorkerSettings, probe: GpuProbe, args: argparse.Namespace) -> int:
    credentials = read_json(settings.credentials_path)
    if not credentials:
        print("Not registered: run `tunegrid-worker register --coordinator URL --provider-key KEY --price USD` first.",
              file=sys.stderr)
        return 2
    channel = Channel(credentials["coordinator"], credentials["worker_token"], settings)
    agent = Agent(settings=settings, channel=channel, probe=probe, gate=PolicyGate(load_policy(settings.policy_path)),
                  runtime=choose_runtime(settings), cache=ModelCache(settings.model_cache),
                  heartbeat_interval_s=args.heartbeat_interval or credentials.get("heartbeat_interval_s", 10))
    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), lambda *_: agent.stop())
    line = threading.Thread(target=_status_line, args=(agent,), daemon=True)
    line.start()
    try:
        agent.run()
    except ChannelError as exc:
        print(f"\nStopped: {exc}", file=sys.stderr)
        return 1
    finally:
        channel.close()
        probe.shutdown()
    return 0

def _status_line(agent: Agent) -> None:
    while not agent._stop.wait(1.0):  # noqa: SLF001 - the CLI owns the agent
        s = agent.status
        job = f" job {s.job_id} step {s.step or 0}/{s.total_steps or '?'} loss {s.loss or 0:.3f}" if s.job_id else ""
        gpu = f" {s.temperature_c:.0f}C {s.utilization_pct or 0:.0f}%" if s.temperature_c is not None else ""
        text = f"{s.state}{(' (' + s.reason + ')') if s.reason else ''}{gpu}{job} earned ${s.earned_micros / 1e6:.4f}"
        print("\r" + text[:150].ljust(150), end="", flush=True)

def doctor(settings: WorkerSettings, probe: GpuProbe) -> int:
    """Each check: OK, or the problem and its fix."""
    problems = 0

    def report(ok: bool, what: str, fix: str = "") -> None:
        nonlocal problems
        problems += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {what}" + ("" if ok else f"\n       fix: {fix}"))

    machine: Machine = probe.machine()
    report(bool(machine.gpus), f"NVML: {len(machine.gpus)} GPU(s), driver {machine.driver_version}" if machine.gpus
           else f"NVML: {machine.error}", "install the NVIDIA driver (and on Windows, WSL2 GPU support); CPU-only mode "
           "trains only the tiny model")
    docker_ok, docker_what = _docker()
    report(docker_ok, docker_what, "install Docker (Docker Desktop on Windows) and the NVIDIA Container Toolkit")
    image_ok = docker_ok and DockerRuntime.available(settings.image)
    report(image_ok, f"the trainer image {settings.image} is {'here' if image_ok else 'missing'}",
           f"build it from a checkout: docker build -t {settings.image} -f worker/trainer/Dockerfile . "
           "(its base is the CUDA image by default; --build-arg BASE=... for another)")
    sandboxed = settings.runtime == "docker" or (settings.runtime == "auto" and image_ok)
    report(sandboxed, "runtime: docker, a sandbox for strangers' jobs (no network, read-only root, non-root, limits)"
           if sandboxed else f"runtime: process ({settings.runtime}) is NOT safe for strangers' jobs: the trainer runs "
           "as your user, with your files and your network",
           "install Docker and the trainer image (above); keep the process runtime for your own jobs and the demo")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(settings.data_dir).free
    report(free >= MIN_FREE_DISK, f"disk: {free / 1024**3:.0f} GB free for the model cache in {settings.data_dir}",
           "free at least 50 GB, or point TUNEGRID_WORKER_DATA_DIR at a larger disk")
    credentials = read_json(settings.credentials_path)
    if not credentials:
        report(False, "not registered", "tunegrid-worker register --coordinator URL --provider-key KEY --price USD")
        return 1
    try:
        response = httpx.get(f"{credentials['coordinator'].rstrip('/')}/healthz", timeout=10)
        report(response.status_code == 200, f"coordinator {credentials['coordinator']} answers {response.status_code}",
               "check the URL and your network")
        skew = abs((datetime.now(UTC) - parsedate_to_datetime(response.headers["date"])).total_seconds())
        report(skew < 60, f"clock skew against the coordinator: {skew:.0f} s", "enable time synchronisation (NTP)")
    except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
        report(False, f"coordinator {credentials['coordinator']} unreachable ({exc.__class__.__name__})",
               "check the URL, your network and any firewall (the agent only calls out, over HTTPS)")
    return 1 if problems else 0

def _docker() -> tuple[bool, str]:
    try:
        import docker  # noqa: PLC0415

        client = docker.from_env(timeout=5)
        info = client.info()
        runtimes = info.get("Runtimes", {})
        return True, f"Docker {info.get('ServerVersion')}; GPU runtime: {'nvidia' if 'nvidia' in runtimes else 'none'}"
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable engine"
        return False, f"Docker engine not reachable ({exc.__class__.__name__})"

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunegrid-worker", description=__doc__)
    parser.add_argument("--log-level", default="warning")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("gpu-info", help="each GPU as NVML sees it")
    reg = commands.add_parser("register", help="register this PC with a coordinator")
    reg.add_argument("--coordinator", required=True, help="the coordinator's URL")
    reg.add_argument("--provider-key", required=True)
    reg.add_argument("--price", required=True, type=_usd, help="your ask in USD per GPU-hour")
    reg.add_argument("--name")
    reg.add_argument("--machine-id", help="default: derived from the host name and network card")
    run_cmd = commands.add_parser("run", help="work until stopped (Ctrl-C)")
    run_cmd.add_argument("--runtime", choices=["auto", "docker", "process"])
    run_cmd.add_argument("--heartbeat-interval", type=float)
    commands.add_parser("doctor", help="check this PC can work, with a fix for each problem")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = WorkerSettings()
    if getattr(args, "runtime", None):
        settings = settings.model_copy(update={"runtime": args.runtime})
    probe = GpuProbe()
    if args.command == "gpu-info":
        return gpu_info(settings, probe)
    if args.command == "register":
        return register(settings, probe, args)
    if args.command == "run":
        return run(settings, probe, args)
    return doctor(settings, probe)


if __name__ == "__main__":
    sys.exit(main())
