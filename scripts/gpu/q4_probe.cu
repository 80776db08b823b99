// Where the q4 decode GEMV's time goes: the library kernel (mc::gemv_q4) against two probes of
// the same launch shape, row walk and per-lane loads. scripts/gpu/q4_probe.py times them.
//   loads:   the same 16-byte weight and 2-byte scale loads, the dot replaced by an XOR
//            (what the access pattern alone can move);
//   compute: the same dot (mc::q4_group_dot) over rows r % 8 only, which stay in L1/L2
//            (what the arithmetic alone costs).
// Build: nvcc -shared -Xcompiler -fPIC -O3 -gencode arch=compute_90a,code=sm_90a \
//          -I mistral_compile/compiler/csrc scripts/gpu/q4_probe.cu -o q4_probe.so
#include "mc_kernels.cuh"

using namespace mc;

enum Probe { LIBRARY = 0, LOADS = 1, COMPUTE = 2 };

template <int K, int MODE, int PROBE>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    probe(const half* x, const void* aux, const uint32_t* qw, const half* qs, half* y, int n,
          float eps) {
  if constexpr (PROBE == LIBRARY) {
    gemv_q4<half, K, MODE>(x, aux, qw, qs, y, n, eps);
  } else {
    constexpr int GROUPS = K / 32;
    static_assert(GROUPS % 32 == 0, "the probes take whole 32-group steps");
    __shared__ __align__(16) half xs[K];
    gemv_stage_x<half, K, MODE, true>(xs, x, aux, eps);
    const int lane = threadIdx.x & 31;
    // R rows at once, both streams in flight (the library's gate/up pairing)
    auto rows_dot = [&](const int* r, float* acc, auto rows) {
      constexpr int R = decltype(rows)::value;
      const uint4* w[R];
      const half* s[R];
#pragma unroll
      for (int q = 0; q < R; ++q) {
        const int rr = PROBE == COMPUTE ? r[q] & 7 : r[q];
        w[q] = reinterpret_cast<const uint4*>(qw + static_cast<int64_t>(rr) * (K / 8));
        s[q] = qs + static_cast<int64_t>(rr) * GROUPS;
      }
#pragma unroll 4
      for (int it = 0; it < GROUPS / 32; ++it) {
        const int gi = it * 32 + lane;
        uint4 wv[R];
        half sv[R];
#pragma unroll
        for (int q = 0; q < R; ++q) {
          wv[q] = __ldg(w[q] + gi);
          sv[q] = __ldg(s[q] + gi);
        }
#pragma unroll
        for (int q = 0; q < R; ++q) {
          if (PROBE == LOADS)
            acc[q] += __int_as_float((wv[q].x ^ wv[q].y ^ wv[q].z ^ wv[q].w) & 0x3f800000u) *
                      __half2float(sv[q]);
          else
            acc[q] += q4_group_dot(wv[q], sv[q], xs, gi);
        }
      }
    };
    if constexpr (MODE == GEMV_NORM_SILU) {
      gemv_rows<half, MODE>(y, aux, n, [&](int g, int u, float* ga, float* ua) {
        const int rows[2] = {g, u};
        float acc[2] = {0.f, 0.f};
        rows_dot(rows, acc, std::integral_constant<int, 2>{});
        *ga = warp_sum(acc[0]);
        *ua = warp_sum(acc[1]);
      });
    } else {
      gemv_rows<half, MODE>(y, aux, n, [&](int r) {
        float acc[1] = {0.f};
        rows_dot(&r, acc, std::integral_constant<int, 1>{});
        return warp_sum(acc[0]);
      });
    }
  }
}

// k, mode: a 7B projection's (see q4_probe.py); n: outputs; returns the launch error
extern "C" int launch_probe(int which, int k, int mode, int ctas, int n, const void* x,
                            const void* aux, const void* w, const void* scales, void* y,
                            float eps) {
#define MC_PROBE(K_, M_, P_)                                                              \
  if (k == K_ && mode == M_ && which == P_) {                                            \
    probe<K_, M_, P_><<<ctas, GEMV_WARPS * 32>>>((const half*)x, aux, (const uint32_t*)w, \
                                                 (const half*)scales, (half*)y, n, eps); \
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
