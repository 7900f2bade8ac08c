"""`services/export_checks.py`: what a hostile worker could upload as an export, refused before it becomes a
customer's file. Files are built without torch (`tests.fakes.merged_archive`, `gguf_file`, zeros of the right
shapes); the real export program's files pass the same checks in tests/e2e/test_exports.py."""

from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import pytest

from coordinator.services.export_checks import ExportRejected, check_gguf, check_merged
from shared.catalog import get_base_model
from shared.weights import weight_shapes
from tests.fakes import gguf_file, merged_archive

TINY = get_base_model("tunegrid/tiny-llama")


def _merged(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "merged.tar"
    path.write_bytes(data)
    return path


def _refused(tmp_path: Path, data: bytes, match: str) -> None:
    with pytest.raises(ExportRejected, match=match):
        check_merged(_merged(tmp_path, data), TINY)


def test_an_honest_merged_model_passes(tmp_path: Path) -> None:
    facts = check_merged(_merged(tmp_path, merged_archive()), TINY)
    assert facts["tensors"] == len(weight_shapes(TINY)) and "model.safetensors" in facts["files"]


def test_members_the_merged_model_does_not_hold_are_refused(tmp_path: Path) -> None:
    _refused(tmp_path, merged_archive(extra_members={"run.py": b"import os"}), "not a file a merged model holds")
    _refused(tmp_path, merged_archive(extra_members={"sub/config.json": b"{}"}), "one level")
    buffer = io.BytesIO(merged_archive())
    with tarfile.open(fileobj=buffer, mode="a") as tar:
        link = tarfile.TarInfo("chat_template.jinja")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    _refused(tmp_path, buffer.getvalue(), "not plain ustar of regular files")
    _refused(tmp_path, b"not a tar at all" * 100, "not plain ustar|malformed tar header|not a readable")


def test_a_config_that_names_code_or_another_model_is_refused(tmp_path: Path) -> None:
    config = json.loads(tarfile.open(fileobj=io.BytesIO(merged_archive())).extractfile("config.json").read())  # type: ignore[union-attr]
    _refused(tmp_path, merged_archive(config={**config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}),
             "names code")
    _refused(tmp_path, merged_archive(config={**config, "hidden_size": 256}), "hidden_size")
    _refused(tmp_path, merged_archive(extra_members={"tokenizer_config.json": b'{"auto_map": {"x": "y"}}'}),
             "names code")
    _refused(tmp_path, merged_archive(drop=("config.json",)), "lacks config.json")
    _refused(tmp_path, merged_archive(drop=("tokenizer.json",)), "lacks the tokenizer")


def test_weights_that_are_not_the_models_are_refused(tmp_path: Path) -> None:
    shapes = weight_shapes(TINY)
    _refused(tmp_path, merged_archive(shapes={**shapes, "model.layers.0.mlp.backdoor.weight": (4, 4)}), "unknown")
    missing = dict(shapes)
    missing.pop("lm_head.weight")
    _refused(tmp_path, merged_archive(shapes=missing), "missing")
    _refused(tmp_path, merged_archive(shapes={**shapes, "model.norm.weight": (64,)}), "model.norm.weight")
    _refused(tmp_path, merged_archive(dtype="F32"), "BF16")


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    data = bytearray(merged_archive())
    header_at = data.index(b'{"__metadata__"')
    (length,) = struct.unpack("<Q", data[header_at - 8:header_at])
    data[header_at + length:header_at + length + 2] = b"\x80\x7f"  # bfloat16 +inf, little-endian
    _refused(tmp_path, bytes(data), "not finite")


def test_shards_must_be_a_complete_series_with_a_true_index(tmp_path: Path) -> None:
    shapes = weight_shapes(TINY)
    names = list(shapes)
    first, second = dict(list(shapes.items())[:10]), dict(list(shapes.items())[10:])

    def sharded(index: dict | None, second_name: str = "model-00002-of-00002.safetensors") -> bytes:  # type: ignore[type-arg]
        one = tarfile.open(fileobj=io.BytesIO(merged_archive(shapes=first))).extractfile("model.safetensors").read()  # type: ignore[union-attr]
        two = tarfile.open(fileobj=io.BytesIO(merged_archive(shapes=second))).extractfile("model.safetensors").read()  # type: ignore[union-attr]
        members = {"model-00001-of-00002.safetensors": one, second_name: two}
        if index is not None:
            members["model.safetensors.index.json"] = json.dumps(index).encode()
        return merged_archive(shapes={}, drop=("model.safetensors",), extra_members=members)

    where = {n: "model-00001-of-00002.safetensors" if i < 10 else "model-00002-of-00002.safetensors"
             for i, n in enumerate(names)}
    assert check_merged(_merged(tmp_path, sharded({"weight_map": where})), TINY)["tensors"] == len(names)
    _refused(tmp_path, sharded(None), "does not say where")
    wrong = {**where, names[0]: "model-00002-of-00002.safetensors"}
    _refused(tmp_path, sharded({"weight_map": wrong}), "does not say where")
    _refused(tmp_path, sharded({"weight_map": where}, "model-00003-of-00003.safetensors"), "complete numbered series")


# --- GGUF ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["gguf:f16", "gguf:q8_0", "gguf:q4_k_m"])
def test_an_honest_gguf_file_passes(tmp_path: Path, fmt: str) -> None:
    assert check_gguf(gguf_file(tmp_path / "m.gguf", fmt=fmt), TINY, fmt)["tensors"] == len(weight_shapes(TINY))


def test_a_gguf_of_another_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportRejected, match="not a Q4_K_M file"):
        check_gguf(gguf_file(tmp_path / "a.gguf", fmt="gguf:q8_0"), TINY, "gguf:q4_k_m")
    with pytest.raises(ExportRejected, match="which a F16 file does not hold"):
        check_gguf(gguf_file(tmp_path / "b.gguf", fmt="gguf:q8_0"), TINY, "gguf:f16")
    with pytest.raises(ExportRejected, match="architecture"):
        check_gguf(gguf_file(tmp_path / "c.gguf", arch="qwen2"), TINY, "gguf:q8_0")
    with pytest.raises(ExportRejected, match="vocabulary"):
        check_gguf(gguf_file(tmp_path / "d.gguf", vocab=100), TINY, "gguf:q8_0")
    with pytest.raises(ExportRejected, match="tensors are not the model's"):
        check_gguf(gguf_file(tmp_path / "e.gguf", drop=("output.weight",)), TINY, "gguf:q8_0")


def test_a_broken_or_poisoned_gguf_is_refused(tmp_path: Path) -> None:
    whole = gguf_file(tmp_path / "whole.gguf", fmt="gguf:f16").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(whole[: len(whole) - 4096])
    with pytest.raises(ExportRejected):
        check_gguf(truncated, TINY, "gguf:f16")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    with pytest.raises(ExportRejected, match="not a readable GGUF"):
        check_gguf(garbage, TINY, "gguf:f16")
    for target in ("output_norm.weight", "blk.0.attn_q.weight"):
        with pytest.raises(ExportRejected, match="not finite"):
            check_gguf(gguf_file(tmp_path / f"{target}.gguf", fmt="gguf:f16", nan_in=target), TINY, "gguf:f16")
