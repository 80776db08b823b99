// Stand-alone launcher for the prefill GEMM mc::gemm_wgmma (no TVM), so scripts/gpu/gemm_check.py
// can test and time it from torch on the GPU machine. Built here by nvcc:
//   nvcc -shared -Xcompiler -fPIC -O3 -gencode arch=compute_90a,code=sm_90a \
//        -I mistral_compile/compiler/csrc scripts/gpu/gemm_harness.cu -o gemm_harness.so
#include "mc_kernels.cuh"

template <int K>
__global__ void __launch_bounds__(32) gemm_maps(const half* x, const half* w, int m, int w_rows,
                                                void* maps) {
  mc::gemm_wgmma_maps<K>(x, w, m, w_rows, maps);
}

template <int K, int EPI>
__global__ void __launch_bounds__(mc::WG_THREADS) gemm(const void* maps, half* y, int m, int n,
                                                       const half* aux) {
  extern __shared__ __align__(16) half smem[];
  mc::gemm_wgmma<half, K, EPI>(maps, y, m, n, smem, aux);
}

// n: output columns (silu: w has 2 n rows); maps: 256 bytes of device scratch
template <int K, int EPI>
static int launch(int m, int n, const void* x, const void* w, void* y, const void* aux,
                  void* maps) {
  const int cols = EPI == mc::GEMM_SILU ? mc::WG_BN / 2 : mc::WG_BN;
  const dim3 grid((m + mc::WG_BM - 1) / mc::WG_BM, (n + cols - 1) / cols);
  gemm_maps<K><<<1, 32>>>((const half*)x, (const half*)w, m, EPI == mc::GEMM_SILU ? 2 * n : n,
                          maps);
  cudaFuncSetAttribute(gemm<K, EPI>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       mc::WG_SMEM_BYTES);
  gemm<K, EPI><<<grid, mc::WG_THREADS, mc::WG_SMEM_BYTES>>>(maps, (half*)y, m, n,
                                                             (const half*)aux);
  return (int)cudaGetLastError();
}

template <int K>
__global__ void __launch_bounds__(mc::WG_THREADS) gemm_partial(const void* maps, float* ws, int m,
                                                               int n) {
  extern __shared__ __align__(16) half smem[];
  mc::gemm_wgmma<float, K, mc::GEMM_PARTIAL>(maps, ws, m, n, smem);
}

template <int K>
__global__ void __launch_bounds__(32 * mc::SK_WARPS) skinny(const half* x, int m, const half* w,
                                                            int n, float* ws) {
  mc::skinny_partial<K, 0>(x, m, w, nullptr, nullptr, n, ws);
}

template <int EPI>
__global__ void __launch_bounds__(256) finish(const float* ws, int splits, int m, int n, half* y,
                                              const half* aux) {
  mc::skinny_epilogue<half, EPI>(ws, splits, m, n, y, aux);
}

// A decode step's GEMM with K split over `splits` CTAs: the wgmma tiles (GEMM_PARTIAL) or
// mc::skinny_partial (kind 1) into ws [splits, m, w_rows] float32, then skinny_epilogue.
template <int K, int EPI>
static int launch_split(int kind, int m, int n, int splits, const void* x, const void* w, void* y,
                        const void* aux, void* maps, float* ws) {
  const int w_rows = EPI == mc::GEMM_SILU ? 2 * n : n;
  if (kind == 0) {
    gemm_maps<K><<<1, 32>>>((const half*)x, (const half*)w, m, w_rows, maps);
    cudaFuncSetAttribute(gemm_partial<K>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         mc::WG_SMEM_BYTES);
    const dim3 grid((m + mc::WG_BM - 1) / mc::WG_BM, (w_rows + mc::WG_BN - 1) / mc::WG_BN, splits);
    gemm_partial<K><<<grid, mc::WG_THREADS, mc::WG_SMEM_BYTES>>>(maps, ws, m, w_rows);
  } else {
    const dim3 grid((w_rows + 16 * mc::SK_WARPS - 1) / (16 * mc::SK_WARPS), splits,
                    (m + mc::SK_SLAB - 1) / mc::SK_SLAB);
    skinny<K><<<grid, 32 * mc::SK_WARPS>>>((const half*)x, m, (const half*)w, w_rows, ws);
  }
  const int blocks = (m * n + 255) / 256;
  finish<EPI><<<blocks < 2048 ? blocks : 2048, 256>>>(ws, splits, m, w_rows, (half*)y,
                                                      (const half*)aux);
  return (int)cudaGetLastError();
}

extern "C" int launch_split_gemm(int kind, int k, int epi, int m, int n, int splits,
                                 const void* x, const void* w, void* y, const void* aux,
                                 void* maps, float* ws) {
#define MC_SPLIT(K_, E_) \
  if (k == K_ && epi == E_) return launch_split<K_, E_>(kind, m, n, splits, x, w, y, aux, maps, ws);
  MC_SPLIT(4096, 0)
  MC_SPLIT(4096, 1)
  MC_SPLIT(4096, 2)
  MC_SPLIT(14336, 1)
  MC_SPLIT(5120, 0)
  MC_SPLIT(5120, 1)
  MC_SPLIT(5120, 2)
  MC_SPLIT(32768, 1)
  return -1;
}

extern "C" int launch_gemm(int k, int epi, int m, int n, const void* x, const void* w, void* y,
                           const void* aux, void* maps) {
#define MC_CASE(K_, E_) \
  if (k == K_ && epi == E_) return launch<K_, E_>(m, n, x, w, y, aux, maps);
  MC_CASE(4096, 0)
  MC_CASE(4096, 1)
  MC_CASE(4096, 2)
  MC_CASE(14336, 1)
  MC_CASE(128, 0)
  MC_CASE(128, 2)
  MC_CASE(5120, 0)
  MC_CASE(5120, 1)
  MC_CASE(5120, 2)
  MC_CASE(32768, 1)
  return -1;
}
