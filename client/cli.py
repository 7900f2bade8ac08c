"""`tunegrid`: upload data, create and watch fine-tuning jobs, download adapters, see quotes and your balance.

Configured by TUNEGRID_API_URL (default http://127.0.0.1:8000) and TUNEGRID_API_KEY. `--json` prints the
API's objects for scripts; otherwise output is sized for a terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from client.api import ApiError, Client

TERMINAL = {"succeeded", "failed", "cancelled"}
POLL_S = 1.5
console = Console()


def _client(args: argparse.Namespace) -> Client:
    return Client(args.api_url, args.api_key)


def _print(args: argparse.Namespace, obj: Any, table: Table | str | None = None) -> None:
    if args.json or table is None:
        print(json.dumps(obj, indent=2))
    else:
        console.print(table)


def _jobs_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=None)
    table.add_column("job", no_wrap=True, min_width=30)  # ids are what you copy: never cut
    for name in ("model", "status", "cost", "created"):
        table.add_column(name)
    for job in jobs:
        table.add_row(job["id"], job["model"], job["status"], f"${float(job.get('cost', 0)):.4f}",
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"])))
    return table


# --- commands -------------------------------------------------------------------------------------

def cmd_files_upload(args: argparse.Namespace) -> int:
    with _client(args) as api:
        file = api.upload(Path(args.path))
    _print(args, file, f"[bold]{file['id']}[/]  {file['filename']}: {file.get('examples')} examples, "
                       f"about {file.get('estimated_tokens')} tokens")
    return 0


def cmd_jobs_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "training_file": args.file}
    if args.validation_file:
        body["validation_file"] = args.validation_file
    if args.epochs:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": args.epochs}}}
    if args.lora_r:
        body["lora"] = {"r": args.lora_r}
    for field in ("max_price_per_gpu_hour", "max_cost", "suffix", "min_vram_gb", "verification"):
        value = getattr(args, field)
        if value is not None:
            body[field] = value
    with _client(args) as api:
        job = api.post("/v1/fine_tuning/jobs", body)
        if not args.json:
            console.print(f"[bold]{job['id']}[/] {job['status']}; ${job['cost_held']} held on your balance")
        if args.watch:
            return watch(api, job["id"], quiet=args.json)
    _print(args, job, None if args.json else "")
    return 0


def watch(api: Client, job_id: str, *, quiet: bool = False) -> int:
    """Follow a job to its end with a progress bar: step, loss, tokens/s, ETA and cost so far."""
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn()]
    first_seen: tuple[float, int] | None = None
    with Progress(*columns, console=console, transient=False, disable=quiet) as progress:
        task = progress.add_task("queued", total=None, detail="")
        while True:
            job = api.job(job_id)
            events = api.events(job_id, limit=100)  # newest first
            metrics = next((e["data"] for e in events if e["type"] == "metrics" and e["data"].get("train_loss") is not None
                            and e["data"].get("step") is not None), None)
            total = next((e["data"]["total_steps"] for e in events if e["data"].get("total_steps")), None)
            detail = f"cost ${float(job['cost']):.4f}"
            if metrics:
                step = metrics["step"]
                now = time.monotonic()
                first_seen = first_seen or (now, step)
                eta = ""
                if total and step > first_seen[1]:
                    rate = (step - first_seen[1]) / max(now - first_seen[0], 1e-6)
                    eta = f" · ETA {max(total - step, 0) / rate:.0f} s"
                speed = f" · {metrics['tokens_per_s']:.0f} tok/s" if metrics.get("tokens_per_s") else ""
                detail = f"step {step}{f'/{total}' if total else ''} · loss {metrics['train_loss']:.3f}{speed}{eta} · {detail}"
                progress.update(task, total=total, completed=step)
            progress.update(task, description=job["status"], detail=detail)
            if job["status"] in TERMINAL:
                break
            time.sleep(POLL_S)
    if quiet:
        print(json.dumps(job, indent=2))
    elif job["status"] == "succeeded":
        console.print(f"[green]succeeded[/]: adapter {job['result_files'][0]} (cost ${job['cost']}); "
                      f"`tunegrid jobs download {job_id}`", soft_wrap=True)
    else:
        console.print(f"[red]{job['status']}[/]: {(job.get('error') or {}).get('message', '')}", soft_wrap=True)
    return 0 if job["status"] == "succeeded" else 1


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as api:
        page = api.get("/v1/fine_tuning/jobs", limit=args.limit)
    _print(args, page, _jobs_table(page["data"]))
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as api:
        job = api.job(args.job_id)
    table = Table(box=None, show_header=False)
    for key in ("id", "status", "model", "training_file", "cost", "cost_held", "max_cost", "trained_tokens",
                "fine_tuned_model", "result_files", "error"):
        table.add_row(key, str(job.get(key)))
    _print(args, job, table)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as api:
        job = api.post(f"/v1/fine_tuning/jobs/{args.job_id}/cancel")
    _print(args, job, f"{job['id']} {job['status']} (charged ${job['cost']})")
    return 0


def cmd_jobs_events(args: argparse.Namespace) -> int:
    with _client(args) as api:
        events = api.events(args.job_id, limit=args.limit)
    table = Table("time", "level", "message", box=None)
    for event in reversed(events):
        table.add_row(time.strftime("%H:%M:%S", time.localtime(event["created_at"])), event["level"], event["message"])
    _print(args, events, table)
    return 0


def cmd_jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as api:
        return watch(api, args.job_id, quiet=args.json)


def cmd_jobs_download(args: argparse.Namespace) -> int:
    with _client(args) as api:
        job = api.job(args.job_id)
        if job["status"] != "succeeded" or not job["result_files"]:
            raise ApiError(409, f"Job {args.job_id} is {job['status']}; it has no adapter to download.", "no_adapter")
        target = Path(args.out or f"{args.job_id}-adapter.tar.gz")
        size = api.download(job["result_files"][0], target)
    _print(args, {"job_id": args.job_id, "path": str(target), "bytes": size},
           f"adapter saved to {target} ({size} bytes): a PEFT LoRA adapter (tar.gz)")
    return 0


def cmd_quote(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model, "training_file": args.file}
    if args.epochs:
        body["hyperparameters"] = {"n_epochs": args.epochs}
    if args.verification:
        body["verification"] = args.verification
    with _client(args) as api:
        quote = api.post("/v1/fine_tuning/quotes", body)
    table = Table("GPU class", "fits", "tokens/s", "GPU-hours", "workers", "from", box=None)
    for row in quote["gpu_classes"]:
        if row["workers_available"] or row["tier"] == "consumer":
            table.add_row(row["label"], "yes" if row["fits"] else "no", f"{row['estimated_tokens_per_s']:.0f}",
                          f"{row['estimated_gpu_hours']:.4f}", str(row["workers_available"]),
                          f"${row['estimated_cost_min']}" if row["estimated_cost_min"] else "-")
    if not args.json:
        cheapest = quote.get("cheapest")
        console.print(f"{quote['estimated_tokens']} tokens"
                      + (f", trained {quote['trainings']} times" if quote.get("trainings", 1) > 1 else "")
                      + f"; {quote['workers_available']} workers could run it now"
                      + (f"; cheapest ${cheapest['estimated_cost']} in about {cheapest['estimated_seconds']} s"
                         if cheapest else ""))
    _print(args, quote, table)
    return 0


def cmd_balance(args: argparse.Namespace) -> int:
    with _client(args) as api:
        balance = api.get("/v1/billing/balance")
    _print(args, balance, f"available ${balance['available']}, held ${balance['held']}")
    return 0


VERIFICATION = ("auto", "always", "redundant")
VERIFICATION_HELP = "always: another provider verifies the adapter; redundant: trained twice and compared (paid twice)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunegrid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api-url", default=os.environ.get("TUNEGRID_API_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("TUNEGRID_API_KEY", ""))
    parser.add_argument("--json", action="store_true", help="print the API's JSON objects")
    sub = parser.add_subparsers(dest="command", required=True)

    files = sub.add_parser("files", help="training data").add_subparsers(dest="files_command", required=True)
    upload = files.add_parser("upload", help="upload a JSONL dataset (chat or prompt/completion)")
    upload.add_argument("path")
    upload.set_defaults(func=cmd_files_upload)

    jobs = sub.add_parser("jobs", help="fine-tuning jobs").add_subparsers(dest="jobs_command", required=True)
    create = jobs.add_parser("create", help="create a job (and --watch it)")
    create.add_argument("--model", required=True)
    create.add_argument("--file", required=True, help="training file id")
    create.add_argument("--validation-file")
    create.add_argument("--epochs", type=int)
    create.add_argument("--lora-r", type=int)
    create.add_argument("--max-price", dest="max_price_per_gpu_hour", help="USD per GPU-hour")
    create.add_argument("--max-cost", dest="max_cost", help="USD for the whole job")
    create.add_argument("--min-vram-gb", dest="min_vram_gb", type=int)
    create.add_argument("--suffix")
    create.add_argument("--verification", choices=VERIFICATION, help=VERIFICATION_HELP)
    create.add_argument("--watch", action="store_true", help="follow it to the end with a progress bar")
    create.set_defaults(func=cmd_jobs_create)
    listing = jobs.add_parser("list", help="your jobs, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(func=cmd_jobs_list)
    for name, func, text in (("show", cmd_jobs_show, "one job"), ("cancel", cmd_jobs_cancel, "cancel a job"),
                             ("watch", cmd_jobs_watch, "follow a job to its end")):
        command = jobs.add_parser(name, help=text)
        command.add_argument("job_id")
        command.set_defaults(func=func)
    events = jobs.add_parser("events", help="a job's events")
    events.add_argument("job_id")
    events.add_argument("--limit", type=int, default=50)
    events.set_defaults(func=cmd_jobs_events)
    download = jobs.add_parser("download", help="download a succeeded job's adapter")
    download.add_argument("job_id")
    download.add_argument("--out", help="file to write (default: <job>-adapter.tar.gz)")
    download.set_defaults(func=cmd_jobs_download)

    quote = sub.add_parser("quote", help="what a job would cost, per GPU class")
    quote.add_argument("--model", required=True)
    quote.add_argument("--file", required=True, help="training file id")
    quote.add_argument("--epochs", type=int)
    quote.add_argument("--verification", choices=VERIFICATION, help=VERIFICATION_HELP)
    quote.set_defaults(func=cmd_quote)

    balance = sub.add_parser("balance", help="your prepaid balance")
    balance.set_defaults(func=cmd_balance)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ApiError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True) if not args.json else print(
            json.dumps({"error": {"message": exc.message, "code": exc.code, "status": exc.status}}), file=sys.stderr)
        return 1
    except OSError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
