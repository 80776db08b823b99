// Stand-alone launchers for mc::prefill_attn_ragged and mc::prefill_attn_owned (no TVM), so
// scripts/gpu/attn_check.py can test and time the kernels from torch on the GPU machine. Built here by nvcc:
//   nvcc -shared -Xcompiler -fPIC -O3 -gencode arch=compute_90a,code=sm_90a \
//        -I mistral_compile/compiler/csrc scripts/gpu/attn_harness.cu -o attn_harness.so
#include "mc_kernels.cuh"

template <int D>
__global__ void __launch_bounds__(256) rope_keys(const half* k, const int* indptr,
                                                 const int* offset, int batch, int rows,
                                                 int heads, half* k_rot, int rotary_mode,
                                                 float scale, float theta) {
  mc::rope_ragged_keys<D>(k, indptr, offset, batch, rows, heads, k_rot, rotary_mode, scale,
                          theta);
}

template <int D, int G, int BR>
__global__ void __launch_bounds__(BR * 2) ragged(
    const half* q, const int* q_indptr, const half* k, const half* k_rot, const half* v,
    const int* kv_indptr, const int* q_rope_pos, half* out, float* lse, int batch, int causal,
    int rotary_mode, float rope_scale, float rope_theta, float sm_scale) {
  mc::prefill_attn_ragged<D, G, BR>(q, q_indptr, k, k_rot, v, kv_indptr, q_rope_pos, out, lse,
                                    batch, causal, rotary_mode, rope_scale, rope_theta,
                                    sm_scale);
}

// k_rot: scratch of k's size (written only when rotary_mode == 1)
extern "C" int launch_ragged(int d, int group, int h_qo, int total_q, int total_kv,
                             void* k_rot, const void* q,
                             const int* q_indptr, const void* k, const void* v,
                             const int* kv_indptr, const int* q_rope_pos,
                             const int* k_rope_offset, void* out, float* lse, int batch,
                             int causal, int rotary_mode, float rope_scale, float rope_theta,
                             float sm_scale) {
  dim3 grid((total_q + mc::FA_BR - 1) / mc::FA_BR + batch, h_qo);
#define MC_LAUNCH(D_, G_)                                                                     \
  if (d == D_ && group == G_) {                                                             \
    int h_kv = h_qo / G_;                                                                   \
    if (rotary_mode == 1)                                                                   \
      rope_keys<D_><<<((long)total_kv * h_kv * (D_ / 16) + 255) / 256, 256>>>(              \
          (const half*)k, kv_indptr, k_rope_offset, batch, total_kv, h_kv, (half*)k_rot,    \
          rotary_mode, rope_scale, rope_theta);                                             \
    ragged<D_, G_, mc::FA_BR><<<grid, mc::FA_THREADS>>>(                                    \
        (const half*)q, q_indptr, (const half*)k, (const half*)k_rot, (const half*)v,        \
        kv_indptr, q_rope_pos, (half*)out, lse, batch, causal, rotary_mode, rope_scale,      \
        rope_theta, sm_scale);                                                              \
    return (int)cudaGetLastError();                                                         \
  }
  MC_LAUNCH(128, 4)
  MC_LAUNCH(16, 2)
  MC_LAUNCH(64, 1)
  return -1;
}

template <int D, int G, int HKV>
__global__ void __launch_bounds__(128) owned(const half* q, const int* len, int n,
                                             const half* state, int cap, int window, half* out,
                                             float sm_scale) {
  mc::prefill_attn_owned<D, G, HKV>(q, len, n, state, 0, cap, window, out, sm_scale);
}

// The owned cache's prefill attention: q [n, h_qo, d] rotated, rows at positions len[0] + i;
// state [1 layer, 2, h_kv, cap, d] (keys rotated, position p in slot p % cap); window 0: none.
extern "C" int launch_owned(int d, int group, int h_qo, int n, const void* q, const int* len,
                            const void* state, int cap, int window, void* out, float sm_scale) {
  dim3 grid((n + 63) / 64, h_qo);
  if (d == 128 && group == 4 && h_qo == 32) {
    owned<128, 4, 8><<<grid, 128>>>((const half*)q, len, n, (const half*)state, cap, window,
                                   (half*)out, sm_scale);
    return (int)cudaGetLastError();
  }
  return -1;
}

__global__ void __launch_bounds__(32) owned_map(const half* state, int rows, void* maps) {
  mc::prefill_attn_owned_map(state, rows, maps);
}

template <int G, int HKV>
__global__ void __launch_bounds__(mc::FW_THREADS, 1) owned_wgmma(
    const void* maps, const half* q, const int* len, int n, int layer, int cap, int window,
    half* out, float sm_scale) {
  extern __shared__ __align__(1024) half smem_dyn[];
  mc::prefill_attn_owned_wgmma<G, HKV>(maps, q, len, n, layer, cap, window, out, sm_scale,
                                       smem_dyn);
}

// The Hopper kernel on the same contract, over layer `layer` of a [layers, 2, h_kv, cap, 128]
// state; maps: 128 bytes of device scratch (64-byte aligned) for the TMA descriptor.
extern "C" int launch_owned_wgmma(int group, int h_qo, int n, const void* q, const int* len,
                                  const void* state, int layers, int layer, int cap, int window,
                                  void* out, float sm_scale, void* maps) {
  const int h_kv = h_qo / group;
  owned_map<<<1, 32>>>((const half*)state, layers * 2 * h_kv * cap, maps);
  dim3 grid((n + mc::FW_BM - 1) / mc::FW_BM, h_qo);
#define MC_WGMMA(G_, HKV_)                                                                   \
  if (group == G_ && h_kv == HKV_) {                                                         \
    cudaFuncSetAttribute(owned_wgmma<G_, HKV_>, cudaFuncAttributeMaxDynamicSharedMemorySize, \
                         mc::FW_SMEM_BYTES);                                                 \
    owned_wgmma<G_, HKV_><<<grid, mc::FW_THREADS, mc::FW_SMEM_BYTES>>>(                      \
        maps, (const half*)q, len, n, layer, cap, window, (half*)out, sm_scale);            \
    return (int)cudaGetLastError();                                                          \
  }
  MC_WGMMA(4, 8)
  MC_WGMMA(6, 8)
  return -1;
}
