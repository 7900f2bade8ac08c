"""The export program on the tiny Llama: the merged model computes what base + adapter compute, the GGUF files load
and generate in llama.cpp itself (llama-cpp-python) with logits near the merged model's, and hostile inputs
(an adapter that is not the job's, a base folder with strange tensors or files) stop it before anything is written.

Tolerances, on logits whose largest magnitude is about 1 here (a random model, a random adapter):
- merged in float32 against PEFT's unmerged base + adapter: 1e-5 (the same sums in another order);
- merged in bfloat16 (what customers get): 5e-2 (bfloat16 keeps 8 bits of mantissa);
- F16 GGUF in llama.cpp against the float32 merge: 5e-3; Q8_0: 5e-2; Q4_K_M: 0.25 (on the tiny model most
  Q4_K_M tensors fall back to Q5_0, since their 128 columns are not a multiple of 256; ffn_down is Q4_K/Q6_K).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.catalog import get_base_model
from shared.jobspec import JobSpec
from shared.lora import lora_shapes
from tests.conftest import IN_CI
from tests.trainer.conftest import progress_lines
from worker.trainer.__main__ import run
from worker.trainer.errors import EXIT_DONE, EXIT_WORKER_ERROR

TINY = get_base_model("tunegrid/tiny-llama")
PROMPT = "What is 3 plus 4? The answer is 7."


def _llama_cpp():  # type: ignore[no-untyped-def]
    try:
        import llama_cpp  # noqa: PLC0415
    except ImportError:
        if IN_CI:
            pytest.fail("llama-cpp-python is not installed (CI=true requires it: `make install` builds it)")
        pytest.skip("llama-cpp-python is not installed (`make install` builds it)")
    return llama_cpp


def random_adapter(path: Path, *, r: int = 16, seed: int = 1, scale: float = 0.05) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=g) * scale for n, s in lora_shapes(TINY, r=r).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path))
    return weights


def export_job(job_dir: Path, model_dir: Path, formats: list[str], **fields) -> Path:  # type: ignore[no-untyped-def]
    (job_dir / "initial").mkdir(parents=True, exist_ok=True)
    spec = JobSpec(job_id="ftjob-export", kind="export", base_model=TINY.id, model_dir=str(model_dir),
                   export=formats, export_name="ft:tiny:test", **fields)
    (job_dir / "spec.json").write_text(spec.model_dump_json())
    return job_dir


def peft_logits(model_dir: Path, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    set_peft_model_state_dict(model, weights)
    with torch.no_grad():
        return model.eval()(ids).logits[0]


def hf_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits[0]


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One export of every format of one random adapter, shared by the module."""
    _llama_cpp()
    job = export_job(tmp_path_factory.mktemp("export"), tiny_model_dir, ["merged", "gguf:f16", "gguf:q8_0", "gguf:q4_k_m"])
    weights = random_adapter(job / "initial" / "adapter_model.safetensors")
    assert run(job) == EXIT_DONE, progress_lines(job)[-1]
    return job, weights


def test_merged_model_computes_base_plus_adapter(exported, tiny_model_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from worker.trainer.merge import merge  # noqa: PLC0415

    job, weights = exported
    merged = job / "out" / "exports" / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template  # the customer's copy renders conversations as training did
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    reference = peft_logits(tiny_model_dir, weights, ids)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (hf_logits(merged, ids) - reference).abs().max() < 5e-2
    exact = merge(model_dir=tiny_model_dir, adapter=job / "initial" / "adapter_model.safetensors", base=TINY,
                  spec=JobSpec.model_validate_json((job / "spec.json").read_text()), out=tmp_path / "f32",
                  dtype=torch.float32)
    assert (hf_logits(exact, ids) - reference).abs().max() < 1e-5
    assert (hf_logits(tiny_model_dir, ids) - reference).abs().max() > 1e-2  # the adapter does change the model


def test_merged_model_is_sharded_with_an_index_when_large(tiny_model_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.trainer import merge  # noqa: PLC0415

    monkeypatch.setattr(merge, "SHARD_BYTES", 200_000)
    job = export_job(tmp_path / "job", tiny_model_dir, ["merged"])
    weights = random_adapter(job / "initial" / "adapter_model.safetensors")
    assert run(job) == EXIT_DONE
    out = job / "out" / "exports" / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    assert (hf_logits(out, ids) - peft_logits(tiny_model_dir, weights, ids)).abs().max() < 5e-2


@pytest.mark.parametrize(("fmt", "tolerance"), [("f16", 5e-3), ("q8_0", 5e-2), ("q4_k_m", 0.25)])
def test_gguf_loads_in_llama_cpp_with_logits_near_the_merged_model(exported, tiny_model_dir: Path, tmp_path: Path,
                                                                  fmt: str, tolerance: float) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer  # noqa: PLC0415

    llama_cpp = _llama_cpp()
    job, weights = exported
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(PROMPT).input_ids
    reference = peft_logits(tiny_model_dir, weights, torch.tensor([ids])).numpy()
    llm = llama_cpp.Llama(str(job / "out" / "exports" / f"model-{fmt}.gguf"), n_ctx=256, logits_all=True,
                          verbose=False, seed=0)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids  # the same vocabulary and merges
    llm.eval(ids)
    logits = np.array(llm.scores[:len(ids)])
    assert np.abs(logits - reference).max() < tolerance
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.8
    answer = llm.create_completion("What is 3 plus 4?", max_tokens=8, temperature=0)
    assert answer["usage"]["completion_tokens"] > 0


def test_gguf_files_hold_the_types_asked_for(exported) -> None:  # type: ignore[no-untyped-def]
    import gguf  # noqa: PLC0415

    job, _ = exported
    types = {}
    for fmt in ("f16", "q8_0", "q4_k_m"):
        reader = gguf.GGUFReader(job / "out" / "exports" / f"model-{fmt}.gguf")
        types[fmt] = {t.name: t.tensor_type.name for t in reader.tensors}
        assert reader.fields["general.name"].contents() == "ft:tiny:test"
    assert set(types["f16"].values()) == {"F16", "F32"}
    assert "Q8_0" in set(types["q8_0"].values())
    assert {"Q4_K", "Q6_K"} <= set(types["q4_k_m"].values())  # ffn_down: its 256 columns take k-quants
    lines = [line for line in progress_lines(job) if line["type"] == "exported"]
    assert [line["format"] for line in lines] == ["merged", "gguf:f16", "gguf:q8_0", "gguf:q4_k_m"]
    assert all(line["bytes"] > 0 for line in lines)
    assert json.loads((job / "out" / "export.json").read_text())["formats"].keys() == {
        "merged", "gguf:f16", "gguf:q8_0", "gguf:q4_k_m"}
    assert not (job / "out" / "exports" / "work-f16.gguf").exists()


def test_a_quantized_type_alone_leaves_no_f16_behind(tiny_model_dir: Path, tmp_path: Path) -> None:
    _llama_cpp()
    job = export_job(tmp_path / "job", tiny_model_dir, ["gguf:q8_0"])
    random_adapter(job / "initial" / "adapter_model.safetensors")
    assert run(job) == EXIT_DONE
    assert sorted(p.name for p in (job / "out" / "exports").iterdir()) == ["model-q8_0.gguf"]


# --- hostile inputs: the adapter and the base folder are checked before anything is written -------------------

def test_an_adapter_that_is_not_the_jobs_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    job = export_job(tmp_path / "job", tiny_model_dir, ["merged"])
    weights = random_adapter(job / "initial" / "adapter_model.safetensors", r=8)  # the job says r=16
    assert run(job) == EXIT_WORKER_ERROR
    assert "wrong shape" in progress_lines(job)[-1]["message"]
    weights = random_adapter(job / "initial" / "adapter_model.safetensors")
    name = next(iter(weights))
    weights[name][0, 0] = float("nan")
    save_file(weights, str(job / "initial" / "adapter_model.safetensors"))
    assert run(job) == EXIT_WORKER_ERROR
    assert "not finite" in progress_lines(job)[-1]["message"]
    assert not (job / "out" / "exports" / "merged").exists()


def _hostile_base(tiny_model_dir: Path, tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    return base


def test_a_base_with_a_tensor_the_model_does_not_have_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = _hostile_base(tiny_model_dir, tmp_path)
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.0.self_attn.extra.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(base / "model.safetensors"))
    job = export_job(tmp_path / "job", base, ["merged"])
    random_adapter(job / "initial" / "adapter_model.safetensors")
    assert run(job) == EXIT_WORKER_ERROR
    assert "does not have" in progress_lines(job)[-1]["message"]


def test_a_base_index_naming_files_outside_its_folder_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = _hostile_base(tiny_model_dir, tmp_path)
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../../secret.safetensors"}}))
    job = export_job(tmp_path / "job", base, ["merged"])
    random_adapter(job / "initial" / "adapter_model.safetensors")
    assert run(job) == EXIT_WORKER_ERROR
    assert "outside its folder" in progress_lines(job)[-1]["message"]


def test_tokenizer_files_that_are_links_are_not_copied(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = _hostile_base(tiny_model_dir, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("the owner's private file")
    (base / "chat_template.jinja").unlink(missing_ok=True)
    (base / "chat_template.jinja").symlink_to(secret)
    job = export_job(tmp_path / "job", base, ["merged"])
    random_adapter(job / "initial" / "adapter_model.safetensors")
    assert run(job) == EXIT_DONE
    assert not (job / "out" / "exports" / "merged" / "chat_template.jinja").exists()
