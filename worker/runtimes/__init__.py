"""Where a job's trainer runs: `ProcessRuntime` (a subprocess of the agent's environment) or `DockerRuntime`
(a container without network), behind one interface (`worker/runtimes/base.py`)."""
