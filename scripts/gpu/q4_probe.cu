// Where the q4 decode GEMV's time goes: the library kernel (mc::gemv_q4) against two probes,
// the same kernel with its group dot or its row addressing swapped, so the launch shape, row
// walk and per-lane loads stay the library's. scripts/gpu/q4_probe.py times them.
//   loads:   the dot replaced by an XOR of the loaded words (what the access pattern alone
//            can move);
//   compute: every row read from rows r % 8, which stay in L1/L2 (what the arithmetic alone
//            costs).
// Build: nvcc -shared -Xcompiler -fPIC -O3 -gencode arch=compute_90a,code=sm_90a \
//          -I mistral_compile/compiler/csrc scripts/gpu/q4_probe.cu -o q4_probe.so
#include "mc_kernels.cuh"

struct XorDot {
  __device__ float operator()(const uint4& w, half s, const half*, int) const {
    return __int_as_float((w.x ^ w.y ^ w.z ^ w.w) & 0x3f800000u) * __half2float(s);
  }
};
struct FirstRows {
  __device__ int operator()(int r) const { return r & 7; }
};

template <int K, int MODE, int PROBE>  // 0: library, 1: loads, 2: compute
__global__ void __launch_bounds__(mc::GEMV_WARPS * 32)
    probe(const half* x, const void* aux, const uint32_t* qw, const half* qs, half* y, int n,
          float eps) {
  if constexpr (PROBE == 0)
    mc::gemv_q4<half, K, MODE>(x, aux, qw, qs, y, n, eps);
  else if constexpr (PROBE == 1)
    mc::gemv_q4<half, K, MODE, XorDot>(x, aux, qw, qs, y, n, eps);
  else
    mc::gemv_q4<half, K, MODE, mc::Q4Dot, FirstRows>(x, aux, qw, qs, y, n, eps);
}

// k, mode: a 7B projection's (see q4_probe.py); n: outputs; returns the launch error
extern "C" int launch_probe(int which, int k, int mode, int ctas, int n, const void* x,
                            const void* aux, const void* w, const void* scales, void* y,
                            float eps) {
#define MC_PROBE(K_, M_, P_)                                                              \
  if (k == K_ && mode == M_ && which == P_) {                                            \
    probe<K_, M_, P_><<<ctas, mc::GEMV_WARPS * 32>>>(                                    \
        (const half*)x, aux, (const uint32_t*)w, (const half*)scales, (half*)y, n, eps); \
    return (int)cudaGetLastError();                                                      \
  }
#define MC_PROBES(K_, M_) MC_PROBE(K_, M_, 0) MC_PROBE(K_, M_, 1) MC_PROBE(K_, M_, 2)
  MC_PROBES(4096, 1)
  MC_PROBES(4096, 2)
  MC_PROBES(4096, 3)
  MC_PROBES(14336, 2)
#undef MC_PROBES
#undef MC_PROBE
  return -1;
}
