// Stand-alone launcher for the decode GEMVs mc::gemv (fp16) and mc::gemv_q4 (q4f16_1), so
// scripts/gpu/gemv_check.py can test and time them from torch on the GPU machine with any grid
// size (the library launches min(rows / 8, 512) CTAs for q4, rows / 8 for fp16). Built by nvcc:
//   nvcc -shared -Xcompiler -fPIC -O3 -gencode arch=compute_90a,code=sm_90a \
//        -I mistral_compile/compiler/csrc scripts/gpu/gemv_harness.cu -o gemv_harness.so
#include "mc_kernels.cuh"

template <int K, int MODE>
__global__ void __launch_bounds__(mc::GEMV_WARPS * 32)
    gemv_f16(const half* x, const void* aux, const half* w, half* y, int n, float eps) {
  mc::gemv<half, half, K, MODE>(x, aux, w, y, n, eps);
}

template <int K, int MODE>
__global__ void __launch_bounds__(mc::GEMV_WARPS * 32)
    gemv_q4(const half* x, const void* aux, const uint32_t* qw, const half* qs, half* y, int n,
            float eps) {
  mc::gemv_q4<half, K, MODE>(x, aux, qw, qs, y, n, eps);
}

// n: outputs (norm_silu: the weight has 2 n rows); scales null: fp16 weights
extern "C" int launch_gemv(int k, int mode, int ctas, int n, const void* x, const void* aux,
                           const void* w, const void* scales, void* y, float eps) {
  const int threads = mc::GEMV_WARPS * 32;
#define MC_CASE(K_, M_)                                                                  \
  if (k == K_ && mode == M_) {                                                             \
    if (scales)                                                                            \
      gemv_q4<K_, M_><<<ctas, threads>>>((const half*)x, aux, (const uint32_t*)w,          \
                                         (const half*)scales, (half*)y, n, eps);           \
    else                                                                                   \
      gemv_f16<K_, M_><<<ctas, threads>>>((const half*)x, aux, (const half*)w, (half*)y,   \
                                          n, eps);                                         \
    return (int)cudaGetLastError();                                                        \
  }
  MC_CASE(4096, 1)
  MC_CASE(4096, 2)
  MC_CASE(4096, 3)
  MC_CASE(14336, 2)
#undef MC_CASE
  return -1;
}
