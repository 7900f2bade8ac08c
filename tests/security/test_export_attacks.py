"""A hostile provider's export uploads against the coordinator's checks (`coordinator/services/export_checks.py`),
read as the completion of an export lease reads them: a merged model's `.tar` and GGUF files crafted to exhaust
the coordinator's memory or time, to show the coordinator one archive and the customer's `tar -xf` (README) another,
or to carry bytes no check ever reads.

Each test asserts the safe behaviour: the upload is refused, promptly and in bounded memory."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from coordinator.services.export_checks import ExportRejected, check_gguf, check_merged
from shared.catalog import get_base_model
from tests.fakes import gguf_file, merged_archive

MODEL = "tunegrid/tiny-llama"
ROOT = Path(__file__).resolve().parents[2]


# --- tar building blocks, written by hand (tarfile would never write these) -----------------------------------

def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _member(name: str, data: bytes, *, declared: int | None = None) -> bytes:
    return _header(name, len(data) if declared is None else declared) + _pad(data)


def _pax(records: dict[str, bytes], kind: bytes = tarfile.XHDTYPE) -> bytes:
    """An extended header ('x' pax, or another type tarfile reads as one) with these records."""
    out = b""
    for key, value in records.items():
        record = b" " + key.encode() + b"=" + value + b"\n"
        length = len(record) + 1
        while len(str(length)) + len(record) != length:
            length = len(str(length)) + len(record)
        out += str(length).encode() + record
    return _header("PaxHeaders/0", len(out), kind) + _pad(out)


def _long_name(name: str) -> bytes:
    data = name.encode() + b"\0"
    return _header("././@LongLink", len(data), tarfile.GNUTYPE_LONGNAME) + _pad(data)


def _members() -> list[tuple[str, bytes]]:
    """The honest merged model's members (what the agent packs), in order."""
    with tarfile.open(fileobj=io.BytesIO(merged_archive(MODEL))) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def _honest_members() -> bytes:
    return b"".join(_member(name, data) for name, data in _members())


END = bytes(1024)
HUGE = 24 * 1024 * 1024  # an extended header this large is what the 64 KiB bound is there to refuse


def _checked_in_bounded_memory(path: Path) -> tuple[str | None, int]:
    """(why the upload was refused, or None when accepted; the peak bytes Python allocated checking it)."""
    tracemalloc.start()
    try:
        check_merged(path, get_base_model(MODEL))
        refused = None
    except ExportRejected as exc:
        refused = str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return refused, peak


# --- merged: extended headers read whole into memory -----------------------------------------------------------

def test_a_solaris_extended_header_is_bounded_like_a_pax_one(tmp_path: Path) -> None:
    """tarfile reads typeflag 'X' (Solaris) as a pax header, whole into memory, but the guard
    (`shared/checkpoint.py` EXTENDED_TYPES = b"xgLK") watches only x, g, L and K: a worker's 'X' header of any size
    up to the upload's limit (2 x parameters + 512 MiB for a merged model) goes into the coordinator's memory."""
    path = tmp_path / "solaris.tar"
    path.write_bytes(_pax({"comment": b"x" * HUGE}, kind=b"X") + merged_archive(MODEL))
    control = tmp_path / "pax.tar"
    control.write_bytes(_pax({"comment": b"x" * HUGE}) + merged_archive(MODEL))
    assert _checked_in_bounded_memory(control)[0] is not None  # the same header as 'x': refused before it is read

    refused, peak = _checked_in_bounded_memory(path)
    assert refused is not None and peak < HUGE // 2, (refused, peak)


def test_a_pax_size_record_cannot_slip_a_later_oversized_header_past_the_guard(tmp_path: Path) -> None:
    """A pax `size` record replaces the next member's size for tarfile, while the guard steps by the size in the
    ustar header: a member declared 0 bytes whose real data starts with a zero block makes the guard believe the
    archive ended, and a later 24 MiB pax header is read whole."""
    smuggled = bytes(512) + b"spm" * 100  # tokenizer.model: any bytes; the guard takes its first block for the end
    archive = _pax({"size": str(len(smuggled)).encode()}) + _member("tokenizer.model", smuggled, declared=0)
    archive += _pax({"comment": b"x" * HUGE}) + _honest_members() + END
    path = tmp_path / "desync.tar"
    path.write_bytes(archive)
    refused, peak = _checked_in_bounded_memory(path)
    assert refused is not None and peak < HUGE // 2, (refused, peak)


# --- merged: one archive for the coordinator, another for the customer's tar -----------------------------------

def _auto_map_config() -> bytes:
    config = json.loads(dict(_members())["config.json"])
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    return json.dumps(config).encode()


EVIL_CODE = b"import os\nos.system('touch /tmp/tunegrid-export-pwned')\n"


def _names_by_gnu_tar(path: Path, into: Path) -> list[str] | None:
    if shutil.which("tar") is None:
        return None
    into.mkdir()
    subprocess.run(["tar", "-xf", str(path), "-C", str(into)], capture_output=True, check=False, timeout=30)
    return sorted(p.name for p in into.iterdir())


def test_a_member_named_one_way_for_tarfile_and_another_for_gnu_tar_is_refused(tmp_path: Path) -> None:
    """A GNU long-name header and a pax `path` record on one member: Python's tarfile takes the long name
    (tokenizer.model, chat_template.jinja: allow-listed, any bytes or text), GNU tar - the README's
    `tar -xf ... -C merged` - takes the pax path. The coordinator checks an honest model; the customer's folder
    gets a config.json with `auto_map` and the worker's modeling_evil.py, which `from_pretrained(...,
    trust_remote_code=True)` imports: both things the checks promise never to deliver."""
    archive = _honest_members()
    archive += _long_name("tokenizer.model") + _pax({"path": b"config.json"}) + _member("x", _auto_map_config())
    archive += _long_name("chat_template.jinja") + _pax({"path": b"modeling_evil.py"}) + _member("y", EVIL_CODE)
    path = tmp_path / "two-faced.tar"
    path.write_bytes(archive + END)
    gnu = _names_by_gnu_tar(path, tmp_path / "extracted")
    if gnu is not None:  # what the customer gets (shown, not the point: the point is the refusal below)
        assert "modeling_evil.py" in gnu
    with pytest.raises(ExportRejected):
        check_merged(path, get_base_model(MODEL))


def test_a_pax_size_that_gnu_tar_rejects_but_tarfile_reads_is_refused(tmp_path: Path) -> None:
    """tarfile parses a pax size with int(), which takes "5_12" as 512; GNU tar calls it malformed and uses the
    ustar header's size. The coordinator reads a 512-byte tokenizer.model followed by an honest model and its
    end-of-archive; GNU tar reads all of that as tokenizer.model and extracts what follows: a config.json with
    `auto_map` and the worker's code."""
    evil = _member("config.json", _auto_map_config()) + _member("modeling_evil.py", EVIL_CODE)
    inner = bytes(512) + _honest_members() + END
    archive = _pax({"size": b"5_12"}) + _header("tokenizer.model", len(inner)) + inner + evil + END
    path = tmp_path / "malformed-size.tar"
    path.write_bytes(archive)
    gnu = _names_by_gnu_tar(path, tmp_path / "extracted")
    if gnu is not None:
        assert "modeling_evil.py" in gnu
    with pytest.raises(ExportRejected):
        check_merged(path, get_base_model(MODEL))


# --- GGUF: llama.cpp's reader on a stranger's file -------------------------------------------------------------

def _gguf_array_bomb(path: Path) -> Path:
    """A 49-byte GGUF whose one metadata key is an array of uint8 claiming 2^62 elements: gguf.GGUFReader walks
    it element by element, each read past the end of the file an empty view that does not advance the offset."""
    key = b"a"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3) + struct.pack("<QQ", 0, 1) + struct.pack("<Q", len(key)) + key
                     + struct.pack("<I", 9) + struct.pack("<IQ", 0, 2**62))  # ARRAY of UINT8, count 2^62
    return path


def test_a_gguf_array_claiming_2_to_the_62_elements_is_refused_promptly(tmp_path: Path) -> None:
    """check_gguf hands the upload to gguf.GGUFReader, which loops over the claimed count, appending to a list
    each time: the completion request never returns and its thread's memory grows without bound. Run in a child
    with a 2 GiB address-space limit and a deadline, so the bug cannot take the test machine with it."""
    bomb = _gguf_array_bomb(tmp_path / "bomb.gguf")
    program = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 * 1024**3, 2 * 1024**3))
        from coordinator.services.export_checks import ExportRejected, check_gguf
        from shared.catalog import get_base_model
        try:
            check_gguf(__import__("pathlib").Path({str(bomb)!r}), get_base_model({MODEL!r}), "gguf:q8_0")
        except ExportRejected as exc:
            print("refused:", exc)
            sys.exit(0)
        print("accepted")
        sys.exit(1)
    """)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=env, capture_output=True, text=True, check=False,
                              timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("check_gguf was still parsing a 49-byte file after 5 s (gguf.GGUFReader loops over the "
                    "array count the file claims)")
    assert done.returncode == 0 and done.stdout.startswith("refused:"), (done.returncode, done.stdout,
                                                                        done.stderr[-2000:])


def _tensor_offsets(path: Path) -> list[tuple[int, int, tuple[str, tuple[int, ...]]]]:
    """(where the tensor's offset field sits in the file, its value, (type, shape)) per tensor."""
    import gguf

    reader = gguf.GGUFReader(path)
    found = []
    for t in reader.tensors:
        at = t.field.offset + 8 + len(t.name.encode()) + 4 + 8 * len(t.shape) + 4
        found.append((at, t.data_offset - reader.data_offset, (t.tensor_type.name, tuple(int(d) for d in t.shape))))
    return found


def test_gguf_tensors_that_overlap_and_leave_most_of_the_data_unread_are_refused(tmp_path: Path) -> None:
    """check_gguf asks only that each tensor ends within the file: tensors of one type and shape may all point at
    the same bytes, leaving the rest of the data section for anything at all (llama.cpp's own loader refuses
    such a file: each tensor must start where the previous one ended). The docstring's promise: a file "cannot
    hide more than it shows"; the merged model's safetensors are held to exactly that (they must tile)."""
    path = gguf_file(tmp_path / "q8.gguf", MODEL, "gguf:q8_0")
    raw = bytearray(path.read_bytes())
    first: dict[tuple[str, tuple[int, ...]], int] = {}
    moved = 0
    for at, offset, key in _tensor_offsets(path):
        if key in first:
            struct.pack_into("<Q", raw, at, first[key])
            moved += 1
        else:
            first[key] = offset
    assert moved > 0
    overlapping = tmp_path / "overlapping.gguf"
    overlapping.write_bytes(bytes(raw))
    assert len({offset for _, offset, _ in _tensor_offsets(overlapping)}) < len(_tensor_offsets(overlapping))
    with pytest.raises(ExportRejected):
        check_gguf(overlapping, get_base_model(MODEL), "gguf:q8_0")


PAYLOAD = b"anything a worker wants delivered under tunegrid's name " * 20_000  # ~1 MiB


def test_bytes_after_an_exports_last_tensor_or_end_of_archive_are_refused(tmp_path: Path) -> None:
    """Neither check reads to the end of the upload: tarfile stops at the end-of-archive blocks and check_gguf
    only bounds each tensor's end, so up to the upload limit's 512 MiB of slack (for any model) rides along to
    the customer unread."""
    base = get_base_model(MODEL)
    merged = tmp_path / "merged.tar"
    merged.write_bytes(merged_archive(MODEL) + PAYLOAD)
    gguf = gguf_file(tmp_path / "q8.gguf", MODEL, "gguf:q8_0")
    gguf.write_bytes(gguf.read_bytes() + PAYLOAD)
    refused = []
    for name, check in (("merged", lambda: check_merged(merged, base)),
                        ("gguf", lambda: check_gguf(gguf, base, "gguf:q8_0"))):
        try:
            check()
        except ExportRejected:
            refused.append(name)
    assert refused == ["merged", "gguf"]


# --- the agent: the export program's figures are the job folder's, and the job folder is hostile ----------------

@pytest.fixture
def worker_settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tests.worker.test_agent import MARKER as CACHED
    from worker.settings import WorkerSettings

    settings = WorkerSettings(config_dir=tmp_path / "config", data_dir=tmp_path / "worker", runtime="process",
                              claim_wait_s=0, progress_poll_s=0.01, events_flush_s=0.01, backoff_max_s=0.01)
    cached = settings.model_cache / "tunegrid" / "tiny-llama"
    cached.mkdir(parents=True)
    (cached / CACHED).write_text("tunegrid/tiny-llama")
    return settings


@pytest.mark.parametrize("figures", [["merged"], "fast", 7])
def test_export_figures_that_are_not_an_object_do_not_throw_away_the_uploaded_export(
        worker_settings, tmp_path: Path, figures: object) -> None:  # type: ignore[no-untyped-def]
    """worker/agent.py `_export` guards reading out/export.json (a link, bad JSON, a non-object) but then calls
    `figures.items()` outside the guard: `{"formats": [...]}` (or a string, a number) raises AttributeError after
    every format was uploaded, so the lease is reported failed (worker_error, against the provider) instead of
    complete, and the uploads are never used. Found again after an agent restart (`_finish_leftover`), nothing
    catches it. The figures are display only: they should be dropped, as a NaN is."""
    from tests.fakes import tar_gz
    from tests.worker.test_agent import (
        ExportingRuntime,
        channel_for,
        export_assignment,
        make_agent,
        run,
    )

    class OddFigures(ExportingRuntime):
        def start(self, mount):  # type: ignore[no-untyped-def]
            running = super().start(mount)
            (mount.job_dir / "out" / "export.json").write_text(json.dumps({"formats": figures}))
            return running

    secret = tmp_path / "owner-secret.txt"
    secret.write_text("the owner's private file")
    archive = tar_gz([("adapter/adapter_model.safetensors", b"weights")])
    channel = channel_for(export_assignment(archive, ["merged"]), initial=archive)
    run(make_agent(worker_settings, channel, OddFigures(secret=secret)))
    assert [k for k in channel.kinds() if k != "events"] == ["export", "complete"], channel.calls[-1]
