"""Adapter checks: a real PEFT-shaped archive passes; tampered, mismatched, empty or hostile ones fail."""

from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import pytest

from coordinator.services.adapters import AdapterRejected, verify_adapter
from shared.catalog import get_base_model
from tests.fakes import adapter_archive, lora_shapes, replace_members

TINY = get_base_model("tunegrid/tiny-llama")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def check(tmp_path: Path, data: bytes, *, lora: dict | None = None, final_loss: float | None = 2.0,  # type: ignore[type-arg]
          losses: list[float] | None = None, max_bytes: int = 10**8):  # type: ignore[no-untyped-def]
    path = tmp_path / "adapter.tar.gz"
    path.write_bytes(data)
    return verify_adapter(path, base=TINY, lora=lora or LORA, final_loss=final_loss,
                          reported_losses=[2.1] if losses is None else losses, max_bytes=max_bytes)


def tar_with(*members: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buffer.getvalue()


def test_a_well_formed_adapter_passes(tmp_path: Path) -> None:
    facts = check(tmp_path, adapter_archive())
    assert facts.parameters == 2 * 16 * (4 * (128 + 128) + 2 * (128 + 256) + (256 + 128))


def test_explicit_target_modules_must_match(tmp_path: Path) -> None:
    lora = {**LORA, "target_modules": ["q_proj", "v_proj"]}
    check(tmp_path, adapter_archive(targets=("q_proj", "v_proj")), lora=lora)
    with pytest.raises(AdapterRejected, match="target modules"):
        check(tmp_path, adapter_archive(targets=("q_proj", "k_proj")), lora=lora)


@pytest.mark.parametrize(("archive", "message"), [
    (lambda: adapter_archive(r=8), "r/alpha"),
    (lambda: adapter_archive(alpha=16), "r/alpha"),
    (lambda: adapter_archive(shapes={"base_model.model.lm_head.weight": [640, 128]}), "not a LoRA weight"),
    (lambda: adapter_archive(shapes=dict(list(lora_shapes(TINY, 16).items())[:4])), "LoRA parameters"),
    (lambda: b"not a tarball", "tar.gz"),
])
def test_tampered_or_foreign_adapters_fail(tmp_path: Path, archive, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AdapterRejected, match=message):
        check(tmp_path, archive())


def test_missing_members_fail(tmp_path: Path) -> None:
    info = tarfile.TarInfo("adapter/README.md")
    info.size = 2
    with pytest.raises(AdapterRejected, match="lacks adapter/adapter_config.json"):
        check(tmp_path, tar_with(info, data=b"hi"))


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "adapter/../../x"])
def test_path_traversal_is_refused(tmp_path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = 1
    with pytest.raises(AdapterRejected, match="unsafe path"):
        check(tmp_path, tar_with(info, data=b"x"))


def test_links_are_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("adapter/adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
    with pytest.raises(AdapterRejected, match="not a regular file"):
        check(tmp_path, tar_with(link))


def test_a_decompression_bomb_stops_at_the_limit(tmp_path: Path) -> None:
    big = tarfile.TarInfo("adapter/padding.bin")
    big.size = 5 * 1024 * 1024  # zeros compress to almost nothing
    with pytest.raises(AdapterRejected, match="unpacks to more than"):
        check(tmp_path, tar_with(big, data=bytes(big.size)), max_bytes=1024 * 1024)


def test_truncated_weights_fail(tmp_path: Path) -> None:
    good = adapter_archive()
    with tarfile.open(fileobj=io.BytesIO(good), mode="r:gz") as tar:
        weights = tar.extractfile("adapter/adapter_model.safetensors").read()[:-100]  # type: ignore[union-attr]
    with pytest.raises(AdapterRejected, match="bytes of weights"):
        check(tmp_path, replace_members(good, {"adapter/adapter_model.safetensors": weights}))


def test_the_final_loss_must_agree_with_reported_progress(tmp_path: Path) -> None:
    check(tmp_path, adapter_archive(), final_loss=1.8, losses=[3.0, 2.0])
    with pytest.raises(AdapterRejected, match="disagrees"):
        check(tmp_path, adapter_archive(), final_loss=0.01, losses=[3.0, 2.0])
    with pytest.raises(AdapterRejected, match="no training progress"):
        check(tmp_path, adapter_archive(), losses=[])


def raw_header_archive(header: object, data: bytes = b"") -> bytes:
    """An archive whose safetensors header is exactly `header` (JSON), followed by `data`."""
    encoded = json.dumps(header).encode()
    return replace_members(adapter_archive(), {
        "adapter/adapter_model.safetensors": struct.pack("<Q", len(encoded)) + encoded + data})


@pytest.mark.parametrize(("header", "message"), [
    # Negative dimensions that cancel out, over zero bytes of weights: the bypass a review found.
    ({"a.lora_A.weight": {"dtype": "F16", "shape": [2 * 100], "data_offsets": [0, 400]},
      "b.lora_B.weight": {"dtype": "F32", "shape": [-100], "data_offsets": [400, 0]}}, "invalid shape"),
    ({"a.lora_A.weight": {"dtype": "F32", "shape": ["abc"], "data_offsets": [0, 4]}}, "invalid shape"),
    ({"a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": "x"}}, "invalid data offsets"),
    ({"a.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "does not span"),
    ({"a.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "gaps or overlaps"),
    (["not", "an", "object"], "malformed header"),
])
def test_malformed_safetensors_headers_are_rejected_not_crashes(tmp_path: Path, header: object, message: str) -> None:
    with pytest.raises(AdapterRejected, match=message):
        check(tmp_path, raw_header_archive(header, data=bytes(8)))


def test_malformed_target_modules_are_rejected(tmp_path: Path) -> None:
    good = adapter_archive()
    with tarfile.open(fileobj=io.BytesIO(good), mode="r:gz") as tar:
        config = json.loads(tar.extractfile("adapter/adapter_config.json").read())  # type: ignore[union-attr]
    tampered = replace_members(good, {"adapter/adapter_config.json": json.dumps({**config, "target_modules": 5}).encode()})
    with pytest.raises(AdapterRejected, match="malformed target_modules"):
        check(tmp_path, tampered)
