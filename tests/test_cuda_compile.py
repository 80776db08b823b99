"""CUDA libraries built here, where there is nvcc and no GPU: machine code for the asked arch."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mistral_compile.compiler.cuda import fatbin_archs  # noqa: E402
from mistral_compile.errors import MistralCompileError  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from conftest import tiny_checkpoint

    from mistral_compile.weights import convert_weight

    root = tmp_path_factory.mktemp("cuda")
    tiny_checkpoint(root / "hf")
    convert_weight(root / "hf", root / "q0f32", "q0f32", progress=False)
    return root


@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_fp16_library_holds_machine_code(run_cli, tmp_path, arch):
    # TVM 0.27's tensor-core matmul schedule segfaulted on these fp16 shapes (hidden 256, MLP
    # 512); our GEMM/GEMV kernels now carry every fp16 projection (and dlight.do_not_tensorize
    # stays as a guard): sm_90 builds as sm_90a with the TMA + wgmma GEMM, sm_80 with the WMMA
    # one.
    # The driver stand-in is built fresh into an empty cache.
    proc, code = _compile_tiny(run_cli, tmp_path, "q0f16", arch)
    assert "export library" in proc.stdout and "wrote" in proc.stdout
    # our kernels and fusions are what the library runs, not TVM's (GPU tests check the numbers):
    # decode GEMVs with RMSNorm (1), residual (2) and RMSNorm + silu pairing (3) fused in
    for mode in (1, 2, 3):
        assert f"mc::gemv<half, half, 256, {mode}>" in code
    assert "mc::prefill_attn_ragged<64, 2>" in code and "mc::decode_attn_partial<" in code
    # the KV cache's split + RoPE, and the prefill RMSNorm
    assert "mc::split_rope<half, 64, 4, 2>" in code and "mc::rms_norm_rows<half, 256>" in code
    assert "mc::argmax_rows" in code  # greedy decoding on the device
    # the model-owned KV cache: decode attention with the append fused in, prefill append and
    # tensor-core attention, and the step's argmax that also advances the cache's length
    assert "mc::owned_attn_partial<half, 64, 2, 2, true>" in code
    assert "mc::owned_append<half, 64, 4, 2>" in code and "mc::prefill_attn_owned<64, 2, 2>" in code
    assert "mc::argmax_advance" in code
    # the batched step's paged attention, built with and without the StreamingLLM sink branch
    # (the host picks by the width of the step's sinks array: no registers spent on sinks
    # unless an engine asks for them)
    assert all(f"mc::paged_attn_partial<half, 64, 2, 2, 16, {s}>" in code
               for s in ("false", "true"))
    # and a decode step is one CUDA graph: every layer's attention inside, no call to TVM's cache
    decode, capture = _vm_functions(tmp_path / "l.so", "decode", "decode_cuda_graph_capture")
    assert "run_or_capture" in decode and "attention_kv_cache" not in decode
    assert "owned_decode" in capture and "gemv_norm_silu" in capture
    if arch == "sm_90":  # prefill GEMMs plain (0), with the residual (1), with silu (2), fed by
        # TMA through descriptors that a launch before each GEMM writes
        assert all(f"mc::gemm_wgmma<half, 256, {e}>" in code for e in (0, 1, 2))
        assert code.count("mc::gemm_wgmma_maps<256>") >= 3
        # a batched step of <= 128 rows splits K over more CTAs (partials, then the epilogue),
        # and a step of one row runs the GEMVs (silu (4) without the norm: the step has its own)
        assert "mc::gemm_wgmma<float, 256, 3>" in code
        assert all(f"mc::skinny_epilogue<half, {e}>" in code for e in (0, 1, 2))
        assert "mc::gemv<half, half, 256, 4>" in code and "mc::skinny_partial<256, 0>" not in code
    else:
        assert "mc::gemm_nt<" in code and "gemm_wgmma<" not in code
    assert list((tmp_path / "cache").rglob("libcuda.so.1"))


def test_q4_library_decodes_with_our_q4_gemv(run_cli, tmp_path):
    # q4f16_1 decode reads the packed weights in mc::gemv_q4 (nvcc must take it: GPU tests
    # check its numbers); with each fusion mode, and lm_head's plain one into float32 logits.
    # Prefill and batched steps run gemm_q4: up to 128 rows the skinny GEMM dequantizes in its
    # loads (mc::skinny_partial<K, 1>), more rows unpack to float16 first (dequantize_q4_any);
    # a step of one row runs the GEMV (silu without the norm: 4).
    _, code = _compile_tiny(run_cli, tmp_path, "q4f16_1", "sm_90")
    for mode in (1, 2, 3, 4):
        assert f"mc::gemv_q4<half, 256, {mode}>" in code
    assert "mc::gemv_q4<float, 256, 0>" in code
    assert "mc::dequantize_q4_any<false>" in code and "mc::skinny_partial<256, 1>" in code
    decode, capture = _vm_functions(tmp_path / "l.so", "decode", "decode_cuda_graph_capture")
    assert "gemv_norm_silu" in capture and "owned_decode" in capture  # the layers, in the graph
    assert "gemv_q4" in decode  # lm_head, after it


def test_q4_with_minimums_library_decodes_with_our_q4_gemv(run_cli, tmp_path):
    # q4f16_2 (w = q * scale + min): the same GEMV with the minimum's term, every fusion mode,
    # and its prefill GEMM (gemm_q4 with minimums)
    _, code = _compile_tiny(run_cli, tmp_path, "q4f16_2", "sm_90")
    for mode in (1, 2, 3, 4):
        assert f"mc::gemv_q4<half, 256, {mode}, mc::Q4Dot, mc::SameRow, true>" in code
    assert "mc::gemv_q4<float, 256, 0, mc::Q4Dot, mc::SameRow, true>" in code
    assert "mc::dequantize_q4_any<true>" in code and "mc::skinny_partial<256, 2>" in code
    assert "mc::gemv_q4<half, 256, 1>" not in code


def _compile_tiny(run_cli, tmp_path, quantization, arch, *convert_args, **overrides):
    """A one-layer hidden-256 model compiled for CUDA here (driver stand-in in a fresh cache).

    Returns the compile's process and the generated CUDA C; asserts the library holds machine
    code for exactly ``arch``. ``convert_args`` go to convert-config.
    """
    from conftest import CONFIGS

    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((CONFIGS / "tiny-mistral.json").read_text())
    cfg.update({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
                **overrides})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert run_cli("convert-config", tmp_path / "config.json", "-o", tmp_path / "m",
                   *convert_args).returncode == 0
    proc = run_cli("compile", tmp_path / "m", "--device", "cuda", "--quantization", quantization,
                   "--arch", arch, "-o", tmp_path / "l.so",
                   env={"XDG_CACHE_HOME": str(tmp_path / "cache"),
                        "MISTRAL_COMPILE_DUMP_CUDA": str(tmp_path / "k.cu")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fatbin_archs((tmp_path / "l.so").read_bytes()) == [("elf", int(arch[3:]))]
    return proc, (tmp_path / "k.cu").read_text()


def _compile_shape(run_cli, tmp_path, name, quantization):
    """One layer of a configs/ model at its real shape, compiled for sm_90; the CUDA C."""
    from conftest import CONFIGS

    cfg = json.loads((CONFIGS / name).read_text())
    cfg["num_hidden_layers"] = 1
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert run_cli("convert-config", tmp_path / "config.json", "-o", tmp_path / "m").returncode == 0
    proc = run_cli("compile", tmp_path / "m", "--device", "cuda", "--quantization", quantization,
                   "--arch", "sm_90", "-o", tmp_path / "l.so",
                   env={"XDG_CACHE_HOME": str(tmp_path / "cache"),
                        "MISTRAL_COMPILE_DUMP_CUDA": str(tmp_path / "k.cu")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, (tmp_path / "k.cu").read_text()


# one file per distinct shape in configs/ (the 7B v0.2 and v0.3 share v0.3's; Mixtral 8x7B's
# attention is the 7B's, and its experts are checked at 8x22B's shape by the test after this
# one). Mistral-Small-24B's down projection reads 32768
# inputs, 64 KB of float16: past the 48 KB of static shared memory the GEMVs once staged x in, it
# fell back to TVM's own GEMV schedule (decode at 54% of the bandwidth); it now runs ours.
SHAPES = [("mistral-7b-v0.1.json", "q0f16"), ("mistral-7b-v0.3.json", "q0f16"),
          ("mistral-nemo-base-2407.json", "q0f16"), ("ministral-8b-instruct-2410.json", "q0f16"),
          ("codestral-22b-v0.1.json", "q0f16"), ("mistral-small-24b-base-2501.json", "q0f16"),
          ("mistral-small-24b-base-2501.json", "q4f16_1")]


@pytest.mark.parametrize(("name", "quant"), SHAPES)
def test_every_configs_shape_decodes_on_our_kernels(run_cli, tmp_path, name, quant):
    # every decode projection (qkv, o, gate_up, down, lm_head) of every real shape runs one of
    # our GEMVs, chosen from the shape: nothing is left to TVM's matmul schedules
    cfg, code = _compile_shape(run_cli, tmp_path, name, quant)
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads  # absent or null: hidden / heads
    gemv = "mc::gemv<half, half, {}," if quant == "q0f16" else "mc::gemv_q4<half, {},"
    for k in (hidden, heads * head_dim, cfg["intermediate_size"]):
        assert gemv.format(k) in code, (name, k)
    assert "matmul" not in code
    # and a prefill chunk's attention over the cache runs the Hopper kernel (TMA + wgmma) at
    # head_dim 128, after the launch that writes its TMA descriptor
    group, h_kv = heads // cfg["num_key_value_heads"], cfg["num_key_value_heads"]
    assert f"mc::prefill_attn_owned_wgmma<{group}, {h_kv}>" in code, name
    assert "mc::prefill_attn_owned_map" in code and "mc::prefill_attn_owned<" not in code


def test_mixtral_8x22b_shape_runs_its_experts_on_our_kernels(run_cli, tmp_path):
    # one layer at Mixtral-8x22B's shape: a decode step's experts on the expert GEMVs (only
    # the chosen rows read), a chunk's on the grouped GEMM; attention's projections on ours
    cfg, code = _compile_shape(run_cli, tmp_path, "mixtral-8x22b-v0.1.json", "q0f16")
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    for kernel in (f"mc::gemv_expert<half, half, {h}, 4>", f"mc::gemv_expert<half, float, {i}, 0>",
                   "mc::moe_align<8>", f"mc::moe_gather<{h}, 2>", f"mc::gemm_wgmma<half, {h}, 2>",
                   f"mc::gemm_wgmma<float, {i}, 0>", f"mc::moe_combine<half, {h}, 2>",
                   f"mc::gemv<half, half, {h},"):
        assert kernel in code, kernel
    assert not [line for line in code.splitlines() if "matmul" in line and "experts" in line]


def _vm_functions(lib, *names):
    """The VM bytecode of each named function of a CUDA library (loaded without a GPU)."""
    import tvm
    from tvm import relax

    from mistral_compile.compiler.cuda import load_cuda_runtime

    load_cuda_runtime()
    text = relax.VMExecutable(tvm.runtime.load_module(str(lib))).as_text()
    return [text[text.index(f"@{name}:"):].split("\n\n")[0] for name in names]


def test_a_tensor_parallel_library_for_cuda_sums_o_and_down_over_the_shards(run_cli, tmp_path):
    # one of 2 shards: half the heads (2 of 4, head_dim 64) and half the MLP (256 of 512). The
    # o and down GEMVs run without their fused residual, the all-reduce (a host call) sums them
    # over the shards and the residual is added after it; so the decode step is no CUDA graph
    from mistral_compile.abi import ALLREDUCE

    proc, code = _compile_tiny(run_cli, tmp_path, "q0f16", "sm_90",
                               "--tensor-parallel-shards", "2")
    assert "mc::gemv<half, half, 128, 0>" in code  # o over this shard's 128 attention columns
    assert "mc::gemv<half, half, 128, 2>" not in code and "mc::gemv<half, half, 256, 2>" not in code
    assert "mc::owned_attn_partial<half, 64, 2, 1, true>" in code  # 2 query heads on 1 KV head
    (decode,) = _vm_functions(tmp_path / "l.so", "decode")
    assert decode.count(ALLREDUCE) == 2 and "run_or_capture" not in decode
    # asking for the graph anyway is one line, and nothing is written
    refused = run_cli("compile", tmp_path / "m", "--device", "cuda", "--quantization", "q0f16",
                      "--cuda-graph", "-o", tmp_path / "g.so")
    assert refused.returncode != 0 and not (tmp_path / "g.so").exists()
    assert "a CUDA graph cannot capture" in refused.stderr.strip().splitlines()[-1]


def test_too_many_query_heads_per_kv_head_is_one_clear_line(run_cli, tmp_path):
    # the owned KV cache's split-KV kernel keeps per-warp partials of G query heads in shared
    # memory: 20 heads per KV head at head_dim 128 do not fit, and compile says so by name
    from conftest import CONFIGS

    cfg = json.loads((CONFIGS / "tiny-mistral.json").read_text())
    cfg.update(num_attention_heads=40, num_key_value_heads=2, head_dim=128, num_hidden_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert run_cli("convert-config", tmp_path / "config.json", "-o", tmp_path / "m").returncode == 0
    proc = run_cli("compile", tmp_path / "m", "--device", "cuda", "--quantization", "q0f16",
                   "-o", tmp_path / "l.so")
    assert proc.returncode != 0 and not (tmp_path / "l.so").exists()
    assert "num_attention_heads" in proc.stderr and "19 query heads per KV head" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


def test_arch_flag_selects_the_machine_code(run_cli, converted, tmp_path):
    proc = run_cli("compile", converted / "q0f32", "--device", "cuda", "--arch", "sm_80",
                   "-o", tmp_path / "l.so")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fatbin_archs((tmp_path / "l.so").read_bytes()) == [("elf", 80)]


def test_library_with_cuda_source_is_refused(tmp_path):
    from mistral_compile.compiler.pipeline import _check_machine_code

    lib = tmp_path / "src.so"
    lib.write_bytes(b"\x7fELF...extern \"C\" __global__ void k(float* a) {}")
    with pytest.raises(MistralCompileError, match="embedded CUDA source instead of a fatbin"):
        _check_machine_code(lib, "sm_90")
    ptx_only = np.frombuffer(b"\x50\xed\x55\xba\x01\x00\x10\x00", np.uint8).tobytes()
    entry = (1).to_bytes(2, "little") + b"\0\0" + (64).to_bytes(4, "little") + \
        (0).to_bytes(8, "little") + b"\0" * 12 + (90).to_bytes(4, "little") + b"\0" * 32
    lib.write_bytes(ptx_only + len(entry).to_bytes(8, "little") + entry)
    with pytest.raises(MistralCompileError, match=r"holds \[\('ptx', 90\)\]"):
        _check_machine_code(lib, "sm_90")


def test_missing_nvcc_is_one_clear_line(run_cli, converted, tmp_path):
    proc = run_cli("compile", converted / "q0f32", "--device", "cuda", "-o", tmp_path / "l.so",
                   env={"PATH": "/usr/bin:/bin", "CUDA_HOME": "", "CUDA_PATH": ""})
    assert proc.returncode == 1 and "needs nvcc" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "l.so").exists()


def test_engine_on_a_machine_without_gpu_says_so(converted, tmp_path):
    from mistral_compile.compiler.pipeline import compile_model
    from mistral_compile.runtime import Engine

    compile_model(converted / "q0f32", tmp_path / "l.so", "cuda")
    with pytest.raises(MistralCompileError, match="cuda"):
        Engine(converted / "q0f32", tmp_path / "l.so", device="cuda:0")
    with pytest.raises(MistralCompileError, match="compiled for cuda, not cpu"):
        Engine(converted / "q0f32", tmp_path / "l.so", device="cpu")


@pytest.mark.parametrize("stub", ["decode", "prefill"])
def test_attention_workspace_is_sized_from_the_inputs(stub):
    # the stubs touch their workspaces (decode: split-KV partials; prefill: rotated keys) only
    # through a pointer; TVM once shrank such a buffer to one element (CompactBufferAllocation),
    # and the kernels wrote past it
    import re

    import tvm

    from mistral_compile.compiler import cuda
    from mistral_compile.compiler.pipeline import make_target
    from mistral_compile.model.kernels import decode_attention, prefill_ragged_attention

    cuda.load_cuda_runtime()
    cuda.register_nvcc_callback("sm_90")
    target = make_target("cuda")
    func = decode_attention(2, 4, 16, "float32", True) if stub == "decode" else \
        prefill_ragged_attention(2, 4, 16, "float16")
    with target:
        lib = tvm.compile(tvm.IRModule({"f": func}), target=target)
    host = lib.mod.inspect_source("ll")
    sizes = re.findall(r"call ptr %\d+\(i32 2, i32 %dev_id, i64 (\S+),", host)
    assert sizes and all(s.startswith("%") for s in sizes), sizes
