// mistral_compile's own CUDA device code, prepended to TVM's generated CUDA C before nvcc.
//
// TIR stubs (mistral_compile/model/kernels.py) fix each kernel's launch shape and buffers and
// call one of these __device__ functions with T.call_extern, so TVM still owns the launches,
// the arguments and the workspace while the inner loops are written by hand here.
#pragma once
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#include <type_traits>

namespace mc {

template <typename T> struct Vec;               // one 16-byte load of T, widened to float
template <> struct Vec<half> { static constexpr int N = 8; };
template <> struct Vec<float> { static constexpr int N = 4; };

__device__ __forceinline__ void widen(uint4 raw, const half*, float* f) {
  const half2* h = reinterpret_cast<const half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 x = __half22float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

__device__ __forceinline__ void widen(uint4 raw, const float*, float* f) {
  f[0] = __uint_as_float(raw.x); f[1] = __uint_as_float(raw.y);
  f[2] = __uint_as_float(raw.z); f[3] = __uint_as_float(raw.w);
}

// 16 bytes from global memory through the read-only cache, widened to float
template <typename T>
__device__ __forceinline__ void load16(const T* p, float* f) {
  widen(__ldg(reinterpret_cast<const uint4*>(p)), p, f);
}

// 16 bytes from shared memory, widened to float
template <typename T>
__device__ __forceinline__ void load16_shared(const T* p, float* f) {
  widen(*reinterpret_cast<const uint4*>(p), p, f);
}

__device__ __forceinline__ void store(half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(float* p, float x) { *p = x; }

// 1 / theta ** ((2d mod D) / D) for the VEC dimensions d0.. a lane holds (TVM's RoPE
// frequencies)
template <int VEC, int D>
__device__ __forceinline__ void rope_frequencies(float* inv, int d0, float theta) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    inv[e] = 1.f / powf(theta, static_cast<float>((2 * (d0 + e)) % D) / static_cast<float>(D));
  }
}

// sin and cos of a float32 angle: Cody-Waite reduction by 2 pi in two parts (exact for the
// angles of 32k positions), then the hardware approximation on [-pi, pi] (abs error ~4e-7).
__device__ __forceinline__ void sincos_reduced(float x, float* s, float* c) {
  const float k = rintf(x * 0.15915494309189535f);
  float r = fmaf(-k, 6.28318548202514648f, x);
  r = fmaf(-k, -1.7484555314695172e-7f, r);
  __sincosf(r, s, c);
}

// RoPE (rotate-half) of the VEC elements a lane holds; `partner` holds elements d +- D/2.
template <int VEC, int D>
__device__ __forceinline__ void rope(float* x, const float* partner, const float* inv, int d0,
                                     int pos, float scale) {
  const float s_pos = static_cast<float>(pos) * scale;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    float s, c;
    sincos_reduced(s_pos * inv[e], &s, &c);
    x[e] = d0 + e < D / 2 ? x[e] * c - partner[e] * s : x[e] * c + partner[e] * s;
  }
}

// The end of a split-KV decode CTA: merges the R partial (max, sum, output) sets held in shared
// memory for each of its G query heads, and writes them to the workspace: outputs at
// ws[slot * D], (max, sum) at ws[n_out + 2 slot], slot = slot0 + g * nsplit.
template <int G, int D, int R>
__device__ __forceinline__ void split_kv_write(const float (*sm_o)[G][D], const float (*sm_m)[G],
                                               const float (*sm_d)[G], float* __restrict__ ws,
                                               int64_t n_out, int64_t slot0, int nsplit) {
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    int g = i / D, d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < R; ++r) mx = fmaxf(mx, sm_m[r][g]);
    float acc = 0.f, den = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float w = exp2f(sm_m[r][g] - mx);
        acc += w * sm_o[r][g][d];
        den += w * sm_d[r][g];
      }
    }
    const int64_t slot = slot0 + static_cast<int64_t>(g) * nsplit;
    ws[slot * D + d] = acc;
    if (d == 0) {
      ws[n_out + slot * 2] = mx;
      ws[n_out + slot * 2 + 1] = den;
    }
  }
}

// Split-KV decode attention, pass 1. Grid (nsplit, H_kv, B), 128 threads. Each CTA reads one
// KV head's rows [split * chunk, (split + 1) * chunk) once for all G query heads of the group:
// L = D / VEC lanes hold one row (16-byte loads), so a warp works on 32 / L rows at a time.
// Writes the unnormalized output and (max, sum) of base-2 scores per (b, head, split).
// Page layout and length_info follow TVM's paged KV cache (see its _decode_kernels.py).
template <typename T, int D, int G, int PAGE, bool SW>
__device__ __forceinline__ void decode_attn_partial(
    const T* __restrict__ q, const T* __restrict__ pages, const int* __restrict__ page_indptr,
    const int* __restrict__ page_values, const int* __restrict__ length_info, int batch,
    const int* __restrict__ k_rope_pos, const int* __restrict__ q_rope_pos,
    float* __restrict__ ws, int nsplit, int rotary_mode, float rope_scale, float rope_theta,
    float sm_scale) {
  constexpr int VEC = Vec<T>::N;
  constexpr int L = D / VEC;
  constexpr int RPW = 32 / L;
  constexpr int WARPS = 4;
  constexpr int GROUPS = WARPS * RPW;
  constexpr int UNROLL = 4;
  static_assert(L >= 2 && L <= 32 && 32 % L == 0, "unsupported head_dim for this dtype");
  __shared__ float sm_o[GROUPS][G][D];
  __shared__ float sm_m[GROUPS][G];
  __shared__ float sm_d[GROUPS][G];

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int h_kv = gridDim.y, h_qo = h_kv * G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % L, rg = warp * RPW + lane / L;
  const int d0 = sub * VEC;

  const int page_begin = page_indptr[b], page_end = page_indptr[b + 1];
  int kv_len = 0, sink = 0, win_off = 0;
  if (page_end > page_begin) {
    kv_len = (page_end - page_begin - 1) * PAGE + length_info[b];
    if (SW) {
      win_off = length_info[batch + b];
      sink = length_info[2 * batch + b];
      kv_len = kv_len - win_off + sink;
    }
  }
  int chunk = max((kv_len + nsplit - 1) / nsplit, 16);
  const int row_begin = split * chunk, row_end = min(row_begin + chunk, kv_len);

  const float log2e = 1.4426950408889634f;
  float inv[VEC];
  rope_frequencies<VEC, D>(inv, d0, rope_theta);
  float qv[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const T* qp = q + (static_cast<int64_t>(b) * h_qo + kvh * G + g) * D + d0;
    load16(qp, qv[g]);
    if (rotary_mode == 1) {
      float partner[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) partner[e] = __shfl_xor_sync(0xffffffffu, qv[g][e], L / 2);
      rope<VEC, D>(qv[g], partner, inv, d0, q_rope_pos[b], rope_scale);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) qv[g][e] *= sm_scale * log2e;
  }

  float m[G], dsum[G], o[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    dsum[g] = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[g][e] = 0.f;
  }

  const int64_t head_stride = static_cast<int64_t>(PAGE) * D;
  for (int base = row_begin; base < row_end; base += GROUPS * UNROLL) {
    float kf[UNROLL][VEC], vf[UNROLL][VEC];
    bool valid[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      int r = base + u * GROUPS + rg;
      valid[u] = r < row_end;
      if (valid[u]) {
        int off = SW ? (r < sink ? r : r - sink + win_off) : r;
        int64_t page = page_values[page_begin + off / PAGE];
        const T* kp = pages + ((page * 2) * h_kv + kvh) * head_stride + (off % PAGE) * D + d0;
        load16(kp, kf[u]);
        load16(kp + h_kv * head_stride, vf[u]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) kf[u][e] = vf[u][e] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (rotary_mode == 1) {
        float partner[VEC];
#pragma unroll
        for (int e = 0; e < VEC; ++e) partner[e] = __shfl_xor_sync(0xffffffffu, kf[u][e], L / 2);
        rope<VEC, D>(kf[u], partner, inv, d0, k_rope_pos[b] + base + u * GROUPS + rg, rope_scale);
      }
      float s[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float acc = 0.f;
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc += qv[g][e] * kf[u][e];
        s[g] = acc;
      }
#pragma unroll
      for (int step = L / 2; step >= 1; step /= 2) {
#pragma unroll
        for (int g = 0; g < G; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], step);
      }
      if (valid[u]) {
#pragma unroll
        for (int g = 0; g < G; ++g) {
          float m_new = fmaxf(m[g], s[g]);
          float scale = exp2f(m[g] - m_new), p = exp2f(s[g] - m_new);
          dsum[g] = dsum[g] * scale + p;
#pragma unroll
          for (int e = 0; e < VEC; ++e) o[g][e] = o[g][e] * scale + p * vf[u][e];
          m[g] = m_new;
        }
      }
    }
  }

#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) sm_o[rg][g][d0 + e] = o[g][e];
    if (sub == 0) {
      sm_m[rg][g] = m[g];
      sm_d[rg][g] = dsum[g];
    }
  }
  __syncthreads();
  split_kv_write<G, D, GROUPS>(sm_o, sm_m, sm_d, ws,
                               static_cast<int64_t>(batch) * h_qo * nsplit * D,
                               (static_cast<int64_t>(b) * h_qo + kvh * G) * nsplit + split, nsplit);
}

// Split-KV decode attention, pass 2. Grid (H_qo, B), D threads: merges the splits, writes the
// normalized output and the base-2 log-sum-exp (TVM's lse convention).
template <typename T, int D>
__device__ __forceinline__ void decode_attn_merge(const float* __restrict__ ws, int batch,
                                                  int nsplit, T* __restrict__ out,
                                                  float* __restrict__ lse) {
  const int h = blockIdx.x, b = blockIdx.y, h_qo = gridDim.x, d = threadIdx.x;
  const int64_t n_out = static_cast<int64_t>(batch) * h_qo * nsplit * D;
  const int64_t slot0 = (static_cast<int64_t>(b) * h_qo + h) * nsplit;
  float mx = -INFINITY;
  for (int s = 0; s < nsplit; ++s) mx = fmaxf(mx, ws[n_out + (slot0 + s) * 2]);
  float acc = 0.f, den = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < nsplit; ++s) {
      float w = exp2f(ws[n_out + (slot0 + s) * 2] - mx);
      acc += w * ws[(slot0 + s) * D + d];
      den += w * ws[n_out + (slot0 + s) * 2 + 1];
    }
  }
  int64_t o = (static_cast<int64_t>(b) * h_qo + h) * D + d;
  store(out + o, den > 0.f ? acc / den : 0.f);
  if (d == 0 && lse != nullptr)
    lse[static_cast<int64_t>(b) * h_qo + h] = den > 0.f ? mx + log2f(den) : -5e4f;
}

// How a decode GEMV stages its input x and finishes its outputs (the fusions that save the
// small kernels between projections). `aux` is the norm weight [K] or the residual [n].
constexpr int GEMV_PLAIN = 0;      // y = W x
constexpr int GEMV_NORM = 1;       // y = W (RMSNorm(x) * aux), as one rms_norm kernel would
constexpr int GEMV_RESIDUAL = 2;   // y = aux + W x
constexpr int GEMV_NORM_SILU = 3;  // W = [gate; up] (2n rows): y = silu(gate x') * (up x'),
                                   // x' = RMSNorm(x) * aux
constexpr int GEMV_SILU = 4;       // W = [gate; up]: y = silu(gate x) * (up x) (a batched step's
                                   // one row, its norm already applied)
constexpr __host__ __device__ bool gemv_silu(int mode) {
  return mode == GEMV_NORM_SILU || mode == GEMV_SILU;
}
constexpr int GEMV_WARPS = 8;
// x is staged in static shared memory up to 48 KB; a wider input (Mistral-Small-24B's down
// projection reads 32768 elements) comes in dynamic shared memory the launch sizes (xs_dyn).
constexpr int GEMV_STATIC_X_BYTES = 48 * 1024;
template <typename T, int K>
constexpr __host__ __device__ bool gemv_x_dynamic() {
  return K * static_cast<int>(sizeof(T)) > GEMV_STATIC_X_BYTES;
}      // warps per CTA; each walks output rows with the grid stride

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// 16 bytes of output: 8 floats rounded to half, or 4 floats
__device__ __forceinline__ void store16(half* p, const float* f) {
  uint4 r;
  uint32_t* u = reinterpret_cast<uint32_t*>(&r);
#pragma unroll
  for (int e = 0; e < 4; ++e) u[e] = pack_half2(f[2 * e], f[2 * e + 1]);
  *reinterpret_cast<uint4*>(p) = r;
}
__device__ __forceinline__ void store16(float* p, const float* f) {
  *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
}
__device__ __forceinline__ float to_float(half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

// Where 16-byte piece p of x sits in shared memory. SWIZZLE (the q4 GEMV, whose lane reads the
// four pieces of one 32-element group): piece j of group g goes to slot j ^ ((g >> 1) & 3) of
// its group, so the eight lanes of a 128-bit shared load, reading piece j of eight consecutive
// groups, hit eight distinct 16-byte bank slots.
template <bool SWIZZLE>
__device__ __forceinline__ int x_piece(int p) {
  return SWIZZLE ? (p & ~3) | ((p ^ (p >> 3)) & 3) : p;
}

// Puts the GEMV input into shared memory xs[K] (all GEMV_WARPS * 32 threads take part).
template <typename T, int K, int MODE, bool SWIZZLE = false>
__device__ __forceinline__ void gemv_stage_x(T* xs, const T* __restrict__ x, const void* aux,
                                             float eps) {
  constexpr int VEC = Vec<T>::N, STRIDE = GEMV_WARPS * 32 * VEC;
  auto slot = [](int i) { return x_piece<SWIZZLE>(i / VEC) * VEC; };
  if (MODE == GEMV_NORM || MODE == GEMV_NORM_SILU) {
    __shared__ float partial[GEMV_WARPS];
    float ss = 0.f;
    for (int i = threadIdx.x * VEC; i < K; i += STRIDE) {
      uint4 raw = *reinterpret_cast<const uint4*>(x + i);
      float f[VEC];
      widen(raw, x, f);
#pragma unroll
      for (int e = 0; e < VEC; ++e) ss += f[e] * f[e];
      *reinterpret_cast<uint4*>(xs + slot(i)) = raw;
    }
#pragma unroll
    for (int step = 16; step >= 1; step /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, step);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < GEMV_WARPS; ++w) total += partial[w];
    const float scale = rsqrtf(total / static_cast<float>(K) + eps);
    const T* nw = static_cast<const T*>(aux);
    for (int i = threadIdx.x * VEC; i < K; i += STRIDE) {  // the elements this thread copied
      float f[VEC], wf[VEC];
      load16_shared(xs + slot(i), f);
      load16(nw + i, wf);
#pragma unroll
      for (int e = 0; e < VEC; ++e) f[e] = f[e] * scale * wf[e];
      store16(xs + slot(i), f);
    }
  } else {
    for (int i = threadIdx.x * VEC; i < K; i += STRIDE)
      *reinterpret_cast<uint4*>(xs + slot(i)) = *reinterpret_cast<const uint4*>(x + i);
  }
  __syncthreads();
}

// Runs dot(row) for this warp's rows (grid-strided, so CTAs can be fewer than rows / 8 and
// the staging above is paid once per CTA), then finishes each output (lane 0 writes).
template <typename OutT, int MODE, typename Dot>
__device__ __forceinline__ void gemv_rows(OutT* y, const void* aux, int n, Dot dot) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int row = blockIdx.x * GEMV_WARPS + warp; row < n; row += gridDim.x * GEMV_WARPS) {
    float acc, up = 0.f;
    if constexpr (gemv_silu(MODE)) {
      dot(row, row + n, &acc, &up);
    } else {
      acc = dot(row);
    }
    if (lane == 0) {
      if (MODE == GEMV_RESIDUAL) acc += to_float(static_cast<const OutT*>(aux)[row]);
      if (gemv_silu(MODE)) acc = acc / (1.f + __expf(-acc)) * up;
      store(y + row, acc);
    }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int step = 16; step >= 1; step /= 2) v += __shfl_xor_sync(0xffffffffu, v, step);
  return v;
}

// RMSNorm of rows of H elements, one CTA of 256 threads per row (blockIdx.x): the sum of
// squares in float32 (each thread holds its 16-byte slices in registers), then
// y = x * rsqrt(mean(x^2) + eps) * w rounded once, as the model's TE RMSNorm computes it.
template <typename T, int H>
__device__ __forceinline__ void rms_norm_rows(const T* __restrict__ x, const T* __restrict__ w,
                                              T* __restrict__ y, float eps) {
  constexpr int V = Vec<T>::N, SLICES = H / V, PER = (SLICES + 255) / 256;
  static_assert(H % V == 0, "rows must be whole 16-byte slices");
  __shared__ float partial[8];
  const int tid = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * H;
  float v[PER][V], sum = 0.f;
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = tid + i * 256;
    if (c < SLICES) {
      load16(x + row + c * V, v[i]);
#pragma unroll
      for (int e = 0; e < V; ++e) sum += v[i][e] * v[i][e];
    }
  }
  sum = warp_sum(sum);
  if ((tid & 31) == 0) partial[tid >> 5] = sum;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int i = 0; i < 8; ++i) total += partial[i];
  const float scale = rsqrtf(total / static_cast<float>(H) + eps);
#pragma unroll
  for (int i = 0; i < PER; ++i) {
    const int c = tid + i * 256;
    if (c < SLICES) {
      float g[V];
      load16(w + c * V, g);
#pragma unroll
      for (int e = 0; e < V; ++e) v[i][e] = v[i][e] * scale * g[e];
      store16(y + row + c * V, v[i]);
    }
  }
}

// Greedy sampling on the device: out[row] = the first index of the largest of x[row, 0:n]
// (float32 logits, one CTA of 1024 threads per row). Larger value wins, a tie goes to the
// smaller index, so the reduction order does not matter and the result is numpy's argmax.
__device__ __forceinline__ void argmax_better(float& v, int& i, float ov, int oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

// Folds f(acc, x[i], i) over the elements i = threadIdx.x + j * blockDim.x of a row, in order
// of j (so sums come out as a plain loop's), with ROW_UNROLL loads in flight per thread: one at
// a time, a CTA's pass over a 131072-token row waits on the L2's latency (on the H200 the
// sampled step cost 1.1 ms more than the greedy one on Ministral-8B: about 30 us for each of
// its ~37 passes; with 8 in flight, 0.41 ms).
constexpr int ROW_UNROLL = 8;
template <typename Acc, typename F>
__device__ __forceinline__ Acc row_fold(const float* x, int n, Acc acc, F f) {
  const int step = blockDim.x;
  int i = threadIdx.x;
  for (; i + (ROW_UNROLL - 1) * step < n; i += ROW_UNROLL * step) {
    float v[ROW_UNROLL];
#pragma unroll
    for (int u = 0; u < ROW_UNROLL; ++u) v[u] = x[i + u * step];
#pragma unroll
    for (int u = 0; u < ROW_UNROLL; ++u) f(acc, v[u], i + u * step);
  }
  for (; i < n; i += step) f(acc, x[i], i);
  return acc;
}

struct ArgBest {  // a running argmax: value and index (index n: no element yet)
  float v;
  int i;
};

__device__ __forceinline__ void argmax_rows(const float* __restrict__ x, int n,
                                            int32_t* __restrict__ out) {
  __shared__ float vals[32];
  __shared__ int idxs[32];
  const int tid = threadIdx.x;
  const float* row = x + static_cast<int64_t>(blockIdx.x) * n;
  // no element yet: index n loses every comparison against a real one
  const ArgBest best = row_fold(row, n, ArgBest{-INFINITY, n}, [](ArgBest& a, float v, int c) {
    argmax_better(a.v, a.i, v, c);
  });
  float v = best.v;
  int i = best.i;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    argmax_better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
  if ((tid & 31) == 0) {
    vals[tid >> 5] = v;
    idxs[tid >> 5] = i;
  }
  __syncthreads();
  if (tid < 32) {
    const int warps = blockDim.x >> 5;
    v = tid < warps ? vals[tid] : -INFINITY;
    i = tid < warps ? idxs[tid] : n;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      argmax_better(v, i, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, i, o));
    if (tid == 0) out[blockIdx.x] = i < n ? i : 0;  // all NaN: token 0
  }
}

// Batch-1 GEMV, y = W x: W is [n, K] row-major ([2n, K] for GEMV_NORM_SILU), x has K
// elements. 256 threads, one warp per output row at a time: x is staged in shared memory once
// per CTA (gemv_stage_x), each lane streams 16-byte slices of its row (the loop over the
// compile-time K unrolls so several loads are in flight), products accumulate in float32 and
// are reduced across the warp.
template <typename T, typename OutT, int K, int MODE = GEMV_PLAIN>
__device__ __forceinline__ void gemv(const T* __restrict__ x, const void* aux,
                                     const T* __restrict__ w, OutT* __restrict__ y, int n,
                                     float eps, void* xs_dyn = nullptr) {
  constexpr int VEC = Vec<T>::N;
  constexpr int STEP = 32 * VEC;
  static_assert(K % VEC == 0, "K must be a multiple of the 16-byte vector");
  __shared__ __align__(16) T xs_static[gemv_x_dynamic<T, K>() ? 8 : K];
  T* xs = gemv_x_dynamic<T, K>() ? static_cast<T*>(xs_dyn) : xs_static;
  gemv_stage_x<T, K, MODE>(xs, x, aux, eps);
  const int lane = threadIdx.x & 31;
  const T* xr = xs + lane * VEC;
  // this lane's share of R rows at once (R = 2: a gate row and its up row, both streams in
  // flight together)
  auto partial = [&](const T* const* wr, float* acc, auto rows) {
    constexpr int R = decltype(rows)::value;
#pragma unroll 8
    for (int it = 0; it < K / STEP; ++it) {
      float xf[VEC], wf[R][VEC];
#pragma unroll
      for (int q = 0; q < R; ++q) load16(wr[q] + it * STEP, wf[q]);
      load16_shared(xr + it * STEP, xf);
#pragma unroll
      for (int q = 0; q < R; ++q)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[q] += wf[q][e] * xf[e];
    }
    if (K % STEP != 0 && (K / STEP) * STEP + lane * VEC < K) {
      float xf[VEC], wf[VEC];
      load16_shared(xr + (K / STEP) * STEP, xf);
#pragma unroll
      for (int q = 0; q < R; ++q) {
        load16(wr[q] + (K / STEP) * STEP, wf);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[q] += wf[e] * xf[e];
      }
    }
  };
  auto row_ptr = [&](int r) { return w + static_cast<int64_t>(r) * K + lane * VEC; };
  if constexpr (gemv_silu(MODE)) {
    gemv_rows<OutT, MODE>(y, aux, n, [&](int g, int u, float* ga, float* ua) {
      const T* rows[2] = {row_ptr(g), row_ptr(u)};
      float acc[2] = {0.f, 0.f};
      partial(rows, acc, std::integral_constant<int, 2>{});
      *ga = warp_sum(acc[0]);
      *ua = warp_sum(acc[1]);
    });
  } else {
    gemv_rows<OutT, MODE>(y, aux, n, [&](int r) {
      const T* rows[1] = {row_ptr(r)};
      float acc[1] = {0.f};
      partial(rows, acc, std::integral_constant<int, 1>{});
      return warp_sum(acc[0]);
    });
  }
}

// (a & b) | c in one instruction (the compiler splits it in two when b and c are constants)
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The 8 weights of one q4f16_1 word (weights/quantize.py) as four half2 of q - 7, in element
// order. Element pairs (2i, 2i+1) sit at bits 4i and 16+4i. OR-ing a masked pair into the
// exponent of 1024.0 gives a half2: the pairs at bits 0/16 and 8/24 (after one shift) read
// 1024 + q, less 1031 is q - 7; the pairs at bits 4/20 and 12/28 read 1024 + 16q, times 1/16
// less 71 is q - 7, all exact.
__device__ __forceinline__ void q4_unpack(uint32_t word, half2* v) {
  const uint32_t lo_mask = 0x000F000Fu, hi_mask = 0x00F000F0u, magic = 0x64006400u;
  auto as_h2 = [](uint32_t u) { return *reinterpret_cast<half2*>(&u); };
  // float16 bits of -1031, -71 and 1/16 in both halves
  const half2 bias_lo = as_h2(0xE407E407u), bias_hi = as_h2(0xD470D470u);
  const half2 sixteenth = as_h2(0x2C002C00u);
  const uint32_t w8 = word >> 8;
  v[0] = __hadd2(as_h2(and_or(word, lo_mask, magic)), bias_lo);
  v[1] = __hfma2(as_h2(and_or(word, hi_mask, magic)), sixteenth, bias_hi);
  v[2] = __hadd2(as_h2(and_or(w8, lo_mask, magic)), bias_lo);
  v[3] = __hfma2(as_h2(and_or(w8, hi_mask, magic)), sixteenth, bias_hi);
}

// One q4f16_1 group: 32 weights in four words and their scale s, against x's group gi in
// shared memory (swizzled: x_piece). The 8 products of a word accumulate in half2, the group's
// sum in float32.
__device__ __forceinline__ float q4_group_dot(const uint4& wv, half s, const half* xs, int gi) {
  const uint32_t wq[4] = {wv.x, wv.y, wv.z, wv.w};
  const int swz = (gi >> 1) & 3;
  half2 sum = __float2half2_rn(0.f);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint4 xr = *reinterpret_cast<const uint4*>(xs + gi * 32 + (j ^ swz) * 8);
    const half2* xh = reinterpret_cast<const half2*>(&xr);
    half2 v[4];
    q4_unpack(wq[j], v);
#pragma unroll
    for (int i = 0; i < 4; ++i) sum = __hfma2(v[i], xh[i], sum);
  }
  float2 f = __half22float2(sum);
  return __half2float(s) * (f.x + f.y);
}

// Prefill's float16 weight from q4f16_1: w[g * 32 + e] = (q - 7) * scale[g] for each of the
// `groups` groups of 32 (one per thread; the product of an integer and a float16 is exact in
// float32, so one rounding, as the TE dequantize on other targets).
__device__ __forceinline__ void dequantize_q4(const uint32_t* __restrict__ qw,
                                              const half* __restrict__ qs, half* __restrict__ w,
                                              int groups) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const uint4 wv = __ldg(reinterpret_cast<const uint4*>(qw) + g);
  const half2 s = __half2half2(__ldg(qs + g));
  const uint32_t wq[4] = {wv.x, wv.y, wv.z, wv.w};
  uint4* dst = reinterpret_cast<uint4*>(w) + static_cast<int64_t>(g) * 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint4 out;
    half2* o = reinterpret_cast<half2*>(&out);
    q4_unpack(wq[j], o);
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = __hmul2(o[i], s);
    dst[j] = out;
  }
}

// q4f16_2's float16 weight: w = q * scale + min per group of 32 (q in 0..15), one rounding
// (q4_unpack's q - 7, plus 7, is q exactly; then one fused multiply-add in half2).
__device__ __forceinline__ void dequantize_q4_min(const uint32_t* __restrict__ qw,
                                                  const half* __restrict__ qs,
                                                  const half* __restrict__ qm,
                                                  half* __restrict__ w, int groups) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= groups) return;
  const uint4 wv = __ldg(reinterpret_cast<const uint4*>(qw) + g);
  const half2 s = __half2half2(__ldg(qs + g)), m = __half2half2(__ldg(qm + g));
  const half2 seven = __float2half2_rn(7.f);
  const uint32_t wq[4] = {wv.x, wv.y, wv.z, wv.w};
  uint4* dst = reinterpret_cast<uint4*>(w) + static_cast<int64_t>(g) * 4;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint4 out;
    half2* o = reinterpret_cast<half2*>(&out);
    q4_unpack(wq[j], o);
#pragma unroll
    for (int i = 0; i < 4; ++i) o[i] = __hfma2(__hadd2(o[i], seven), s, m);
    dst[j] = out;
  }
}

struct Q4Dot {  // gemv_q4's group dot
  __device__ float operator()(const uint4& w, half s, const half* xs, int gi) const {
    return q4_group_dot(w, s, xs, gi);
  }
};
struct SameRow {  // gemv_q4's row addressing
  __device__ int operator()(int r) const { return r; }
};

// Batch-1 GEMV over q4f16_1 weights: qw is [n, K/8] uint32, qs is [n, K/32] half; x and the
// modes as in gemv. With MIN (q4f16_2) qm [n, K/32] half holds each group's minimum, w =
// q * s + m = (q - 7) * s + (m + 7 s): the group dot as for q4f16_1 plus (m + 7 s) times the
// group's sum of x, which the CTA computes once in shared memory after staging x. Each lane reads 16 bytes of a row at a time (four words, 32 weights, one
// group: one scale) and takes its dot with x (q4_group_dot), for up to four groups per row in
// flight. Dot and RowOf are there for scripts/gpu/q4_probe.cu, which swaps them to time the
// loads alone or the arithmetic alone.
template <typename OutT, int K, int MODE = GEMV_PLAIN, typename Dot = Q4Dot,
          typename RowOf = SameRow, bool MIN = false>
__device__ __forceinline__ void gemv_q4(const half* __restrict__ x, const void* aux,
                                        const uint32_t* __restrict__ qw,
                                        const half* __restrict__ qs, OutT* __restrict__ y,
                                        int n, float eps, const half* __restrict__ qm = nullptr,
                                        void* xs_dyn = nullptr) {
  constexpr int GROUPS = K / 32;  // = 16-byte pieces per row
  static_assert(K % 32 == 0, "K must be a multiple of the group size 32");
  __shared__ __align__(16) half xs_static[gemv_x_dynamic<half, K>() ? 8 : K];
  half* xs = gemv_x_dynamic<half, K>() ? static_cast<half*>(xs_dyn) : xs_static;
  __shared__ float xsum[MIN ? GROUPS : 1];  // q4f16_2: each group's sum of x
  gemv_stage_x<half, K, MODE, true>(xs, x, aux, eps);
  if constexpr (MIN) {  // a group's 32 elements stay in its 64 bytes whatever the swizzle
    for (int g = threadIdx.x; g < GROUPS; g += blockDim.x) {
      float t = 0.f;
#pragma unroll 8
      for (int e = 0; e < 32; ++e) t += __half2float(xs[g * 32 + e]);
      xsum[g] = t;
    }
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  auto group = [&](const uint4& wv, half s, int gi) { return Dot{}(wv, s, xs, gi); };
  // this lane's share of R rows at once (R = 2: a gate row and its up row)
  auto partial = [&](const int* r, float* acc, auto rows) {
    constexpr int R = decltype(rows)::value;
    const uint4* wr[R];
    const half* sr[R];
    const half* mr[R];
#pragma unroll
    for (int q = 0; q < R; ++q) {
      const int64_t row = RowOf{}(r[q]);
      wr[q] = reinterpret_cast<const uint4*>(qw + row * (K / 8));
      sr[q] = qs + row * GROUPS;
      mr[q] = MIN ? qm + row * GROUPS : nullptr;
    }
    // q4f16_2's term of group gi: (m + 7 s) * sum(x of the group)
    auto offset = [&](int q, half s, int gi) {
      if constexpr (MIN) {
        return (__half2float(__ldg(mr[q] + gi)) + 7.f * __half2float(s)) * xsum[gi];
      } else {
        return 0.f;
      }
    };
#pragma unroll 4
    for (int it = 0; it < GROUPS / 32; ++it) {
      const int gi = it * 32 + lane;
      uint4 wv[R];
      half sv[R];
#pragma unroll
      for (int q = 0; q < R; ++q) {
        wv[q] = __ldg(wr[q] + gi);
        sv[q] = __ldg(sr[q] + gi);
      }
#pragma unroll
      for (int q = 0; q < R; ++q) acc[q] += group(wv[q], sv[q], gi) + offset(q, sv[q], gi);
    }
    if (GROUPS % 32 != 0 && (GROUPS / 32) * 32 + lane < GROUPS) {
      const int gi = (GROUPS / 32) * 32 + lane;
#pragma unroll
      for (int q = 0; q < R; ++q) {
        const half s = __ldg(sr[q] + gi);
        acc[q] += group(__ldg(wr[q] + gi), s, gi) + offset(q, s, gi);
      }
    }
  };
  if constexpr (gemv_silu(MODE)) {
    gemv_rows<OutT, MODE>(y, aux, n, [&](int g, int u, float* ga, float* ua) {
      const int rows[2] = {g, u};
      float acc[2] = {0.f, 0.f};
      partial(rows, acc, std::integral_constant<int, 2>{});
      *ga = warp_sum(acc[0]);
      *ua = warp_sum(acc[1]);
    });
  } else {
    gemv_rows<OutT, MODE>(y, aux, n, [&](int r) {
      const int rows[1] = {r};
      float acc[1] = {0.f};
      partial(rows, acc, std::integral_constant<int, 1>{});
      return warp_sum(acc[0]);
    });
  }
}

// The decode GEMVs of a mixture of experts (model/moe.py): expert slot s = blockIdx.y runs
// gemv / gemv_q4 on expert idx[s] of a stacked weight [E, R, K] (R = n, or 2 n with silu: the
// expert's gate rows, then its up rows), on x + s * x_stride (x_stride 0: every slot reads the
// same x), into y + s * n. Only the chosen experts' rows are read. Modes: plain or silu.
template <typename T, typename OutT, int K, int MODE>
__device__ __forceinline__ void gemv_expert(const T* __restrict__ x, int x_stride,
                                            const int32_t* __restrict__ idx,
                                            const T* __restrict__ w, OutT* __restrict__ y, int n,
                                            void* xs_dyn) {
  static_assert(MODE == GEMV_PLAIN || MODE == GEMV_SILU, "experts: plain or silu");
  const int s = blockIdx.y;
  const int64_t rows = gemv_silu(MODE) ? 2 * n : n;
  gemv<T, OutT, K, MODE>(x + static_cast<int64_t>(s) * x_stride, nullptr,
                         w + static_cast<int64_t>(idx[s]) * rows * K,
                         y + static_cast<int64_t>(s) * n, n, 0.f, xs_dyn);
}

template <typename OutT, int K, int MODE, bool MIN>
__device__ __forceinline__ void gemv_q4_expert(const half* __restrict__ x, int x_stride,
                                               const int32_t* __restrict__ idx,
                                               const uint32_t* __restrict__ qw,
                                               const half* __restrict__ qs,
                                               const half* __restrict__ qm,
                                               OutT* __restrict__ y, int n, void* xs_dyn) {
  static_assert(MODE == GEMV_PLAIN || MODE == GEMV_SILU, "experts: plain or silu");
  const int s = blockIdx.y;
  const int64_t rows = gemv_silu(MODE) ? 2 * n : n, e = idx[s];
  gemv_q4<OutT, K, MODE, Q4Dot, SameRow, MIN>(
      x + static_cast<int64_t>(s) * x_stride, nullptr, qw + e * rows * (K / 8),
      qs + e * rows * (K / 32), y + static_cast<int64_t>(s) * n, n, 0.f,
      MIN ? qm + e * rows * (K / 32) : nullptr, xs_dyn);
}

// Tensor-core GEMM for prefill: y[m, n] = x[m, K] . w[n, K]^T, float16 in, float32
// accumulation (WMMA 16x16x16), OutT out. CTA tile 128 x 128 x 32 with 8 warps (2 x 4, each
// 64 x 32 = 4 x 2 fragments); both operands are K-contiguous, staged through shared memory
// with cp.async in two buffers so the next tile loads while this one multiplies. Rows are
// padded by 8 halves against bank conflicts. Edges in m and n are guarded (rows read as 0).
constexpr int GEMM_BM = 128, GEMM_BN = 128, GEMM_BK = 32, GEMM_PAD = 8;
constexpr int GEMM_LD = GEMM_BK + GEMM_PAD;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  int bytes = valid ? 16 : 0;  // 0 source bytes: the destination is zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

template <typename OutT, int K>
__device__ __forceinline__ void gemm_nt(const half* __restrict__ x, const half* __restrict__ w,
                                        OutT* __restrict__ y, int m, int n) {
  using namespace nvcuda;
  static_assert(K % GEMM_BK == 0, "K must be a multiple of 32");
  __shared__ __align__(128) half smem[2][2][GEMM_BM * GEMM_LD];  // [buffer][x | w][tile]
  const int tid = threadIdx.x, warp = tid >> 5;
  const int wm = warp / 4, wn = warp % 4;  // warp tile origin: (wm * 64, wn * 32)
  const int row0 = blockIdx.y * GEMM_BM, col0 = blockIdx.x * GEMM_BN;

  auto load = [&](int buf, int k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {  // 128 rows x 4 16-byte pieces per operand, 256 threads
      int piece = tid + i * 256, r = piece >> 2, c = (piece & 3) * 8;
      int gr = row0 + r, gc = col0 + r;
      cp_async16(&smem[buf][0][r * GEMM_LD + c], x + static_cast<int64_t>(min(gr, m - 1)) * K + k0 + c,
                 gr < m);
      cp_async16(&smem[buf][1][r * GEMM_LD + c], w + static_cast<int64_t>(min(gc, n - 1)) * K + k0 + c,
                 gc < n);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  constexpr int TILES = K / GEMM_BK;
  load(0, 0);
  for (int t = 0; t < TILES; ++t) {
    const int buf = t & 1;
    if (t + 1 < TILES) {
      load(buf ^ 1, (t + 1) * GEMM_BK);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < GEMM_BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> a[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        wmma::load_matrix_sync(a[i], &smem[buf][0][(wm * 64 + i * 16) * GEMM_LD + kk], GEMM_LD);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(b[j], &smem[buf][1][(wn * 32 + j * 16) * GEMM_LD + kk], GEMM_LD);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }

  // epilogue: each warp stages its 16 x 16 fragments through shared memory (as float)
  float* stage = reinterpret_cast<float*>(&smem[0][0][0]) + warp * 16 * 16;
  const int lane = tid & 31;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        int r = row0 + wm * 64 + i * 16 + e / 16, c = col0 + wn * 32 + j * 16 + e % 16;
        if (r < m && c < n) store(y + static_cast<int64_t>(r) * n + c, stage[e]);
      }
      __syncwarp();
    }
  }
}

// ---- Hopper (sm_90a) warpgroup-MMA GEMM for prefill ----
// Shared-memory matrix descriptor of a K-major tile stored with the 128-byte swizzle: rows of
// 64 halves (128 bytes), 8-row atoms of 1024 bytes, atoms stacked along M/N.
__device__ __forceinline__ uint64_t wg_desc(const half* p) {
  const uint64_t addr = static_cast<uint64_t>(__cvta_generic_to_shared(p));
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{16 >> 4} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// d (64 x 256 per warpgroup, float) += A (64 x 16, from desc_a) * B (256 x 16, from desc_b)^T
__device__ __forceinline__ void wgmma_64x256x16(float* d, uint64_t desc_a, uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, 1, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(desc_a), "l"(desc_b));
#else
  asm volatile("trap;");  // built without sm_90a: this kernel must not be selected
#endif
}

// d (64 x 128 per warpgroup, float) = A (64 x 16, desc_a) * B (128 x 16, desc_b)^T (+ d when
// accumulate is nonzero), both K-major in shared memory (the attention's S = Q K^T)
__device__ __forceinline__ void wgmma_64x128x16(float* d, uint64_t desc_a, uint64_t desc_b,
                                                int accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred acc;\nsetp.ne.b32 acc, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, acc, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(accumulate));
#else
  asm volatile("trap;");
#endif
}

// d (64 x 128, float) += A (64 x 16, four f16x2 registers a per thread in the mma.sync m16n8k16
// A layout of the warp's 16 rows) * B (16 x 128, desc_b N-major: the attention's O += P V)
__device__ __forceinline__ void wgmma_64x128x16_rs(float* d, const uint32_t* a, uint64_t desc_b) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, 1, 1, 1, 1;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
#else
  asm volatile("trap;");
#endif
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

// ---- Hopper (sm_90a) GEMM for prefill: TMA loads, warp-specialized, warpgroup MMA ----
// y[m, n] = x[m, K] . w[n, K]^T, float16 in, float32 accumulation, OutT out. A CTA computes a
// 128 x 256 tile: warp 8 is the producer, whose lane 0 issues the TMA copies of each 64-deep
// step (x: 128 rows, w: two boxes of 128 rows) into one of WG_STAGES shared-memory stages,
// written with the 128-byte swizzle the wgmma descriptors name; warps 0-7 are two consumer
// warpgroups (64 rows each) issuing wgmma m64n256k16. Each stage has a "full" mbarrier (the
// copies' bytes) and an "empty" one, which each consumer warpgroup arrives on once, when the
// wgmma group that read the stage has completed. One wgmma group stays in flight.
// Measured alone on the H100 (scripts/gpu/gemm_check.py): 410-640 TFLOP/s on the Mistral-7B
// shapes; the cp.async kernel it replaced, with __syncthreads per step, ran at 300-410.
constexpr int WG_BM = 128, WG_BN = 256, WG_BK = 64, WG_STAGES = 4, WG_GROUP = 16;
constexpr int WG_STAGE_HALVES = (WG_BM + WG_BN) * WG_BK;
constexpr int WG_THREADS = 288;  // 2 consumer warpgroups + 1 producer warp
// the stages, 1024 bytes to align them for the swizzle, and the 2 x WG_STAGES mbarriers
constexpr int WG_SMEM_BYTES = WG_STAGES * WG_STAGE_HALVES * 2 + 1024 + 2 * WG_STAGES * 8;
constexpr int TMA_MAP_WORDS = 16;  // a TMA descriptor is 128 opaque bytes

template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
}
// TMA: the box of the descriptor `map` at element (c0 along a row, c1 rows) into `dst`, its
// bytes counted on `bar`
__device__ __forceinline__ void tma_load(void* dst, const void* map, int c0, int c1,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(smem_u32(dst)),
      "l"(map), "r"(c0), "r"(c1), "r"(smem_u32(bar))
      : "memory");
}
#endif

// Encodes, on the device, the TMA descriptor of a row-major float16 [rows, cols] matrix read in
// boxes of box_rows rows x 64 columns with the 128-byte swizzle, into 128 bytes at `out` (global,
// 64-byte aligned): zeroed in shared memory, each field set with tensormap.replace, then copied
// out with the proxy fence. TVM launches the kernels, so a host-made descriptor cannot be
// passed as a kernel parameter. Called by a whole warp.
__device__ __forceinline__ void tma_make_map(void* out, const half* base, int rows, int cols,
                                             int box_rows = WG_BM) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ alignas(128) uint64_t tm[TMA_MAP_WORDS];
  const int lane = threadIdx.x & 31;
  if (lane < TMA_MAP_WORDS) tm[lane] = 0;
  __syncwarp();
  if (lane == 0) {
    const uint32_t a = smem_u32(tm);
    const uint64_t stride = static_cast<uint64_t>(cols) * 2;
    asm volatile(  // dimension 0 is the contiguous one; rank is written as rank - 1
        "tensormap.replace.tile.global_address.shared::cta.b1024.b64 [%0], %1;\n"
        "tensormap.replace.tile.rank.shared::cta.b1024.b32 [%0], 1;\n"
        "tensormap.replace.tile.box_dim.shared::cta.b1024.b32 [%0], 0, %2;\n"
        "tensormap.replace.tile.box_dim.shared::cta.b1024.b32 [%0], 1, %3;\n"
        "tensormap.replace.tile.global_dim.shared::cta.b1024.b32 [%0], 0, %4;\n"
        "tensormap.replace.tile.global_dim.shared::cta.b1024.b32 [%0], 1, %5;\n"
        "tensormap.replace.tile.global_stride.shared::cta.b1024.b64 [%0], 0, %6;\n"
        "tensormap.replace.tile.element_stride.shared::cta.b1024.b32 [%0], 0, %7;\n"
        "tensormap.replace.tile.element_stride.shared::cta.b1024.b32 [%0], 1, %7;\n"
        "tensormap.replace.tile.elemtype.shared::cta.b1024.b32 [%0], 6;\n"       // float16
        "tensormap.replace.tile.swizzle_mode.shared::cta.b1024.b32 [%0], 3;\n"  // 128 bytes
        ::"r"(a), "l"(base), "r"(WG_BK), "r"(box_rows), "r"(cols), "r"(rows), "l"(stride), "r"(1)
        : "memory");
  }
  __syncwarp();
  asm volatile(
      "tensormap.cp_fenceproxy.global.shared::cta.tensormap::generic.release.gpu.sync.aligned"
      " [%0], [%1], 128;\n" ::"l"(out),
      "r"(smem_u32(tm))
      : "memory");
#else
  asm volatile("trap;");
#endif
}

// The two descriptors gemm_wgmma reads (x's, then w's, 2 x 128 bytes at maps), made by one warp
// in a launch of its own before the GEMM's.
template <int K>
__device__ __forceinline__ void gemm_wgmma_maps(const half* x, const half* w, int m, int w_rows,
                                                void* maps) {
  tma_make_map(maps, x, m, K);
  tma_make_map(static_cast<uint64_t*>(maps) + TMA_MAP_WORDS, w, w_rows, K);
}

// Epilogues of gemm_wgmma (the prefill twins of the decode GEMV fusions).
constexpr int GEMM_PLAIN = 0;     // y = x w^T
constexpr int GEMM_RESIDUAL = 1;  // y = aux + x w^T (aux [m, n], the residual)
constexpr int GEMM_SILU = 2;      // w = [gate; up] (2n rows): y = silu(x gate^T) * (x up^T); a
                                  // CTA's 256 B rows are 128 gate rows and the same 128 up rows
constexpr int GEMM_PARTIAL = 3;   // split K: the CTA's float32 sums over its K tiles (split z =
                                  // blockIdx.z of gridDim.z) to y + z m n, n the weight's rows;
                                  // skinny_epilogue adds the splits and applies the epilogue

// Grouped tile order: consecutive CTAs walk WG_GROUP M tiles fastest, then N, so the CTAs
// resident together share a few weight tiles and WG_GROUP tiles of x rows, which stay in L2
// between waves (all M tiles of a few weight tiles, the launch order, is 3-5% slower).
__device__ __forceinline__ int2 grouped_tile() {
  const int mt = gridDim.x, nt = gridDim.y;
  const int id = blockIdx.x + blockIdx.y * mt, per_group = WG_GROUP * nt;
  const int first = id / per_group * WG_GROUP, size = min(mt - first, WG_GROUP);
  const int in = id % per_group;
  return make_int2(first + in % size, in / size);
}

// Writes a CTA's 128 x 256 accumulators (two warpgroups, tid 0..255) with the epilogue.
// Layout: warp (tid / 32) % 4 owns rows 16 w .. 16 w + 15 of its warpgroup's 64; d[4 j + e] is
// (row gid + 8 (e / 2), column 8 j + 2 tig + e % 2).
template <typename OutT, int EPI>
__device__ __forceinline__ void wg_store(const float* d, OutT* __restrict__ y,
                                         const OutT* __restrict__ aux, int m, int n, int row0,
                                         int col0, int tid) {
  const int wg = tid >> 7, lane = tid & 31, wq = (tid >> 5) & 3, gid = lane >> 2, tig = lane & 3;
  constexpr int JS = EPI == GEMM_SILU ? 16 : 32;  // gate column j pairs with up column j + 16
#pragma unroll
  for (int j = 0; j < JS; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = row0 + wg * 64 + wq * 16 + gid + 8 * h, c = col0 + 8 * j + 2 * tig;
      if (r >= m) continue;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (c + e >= n) continue;
        float v = d[4 * j + 2 * h + e];
        const int64_t at = static_cast<int64_t>(r) * n + c + e;
        if (EPI == GEMM_RESIDUAL) v += to_float(aux[at]);
        if (EPI == GEMM_SILU) {
          const float up = d[4 * (j + 16) + 2 * h + e];
          v = v / (1.f + __expf(-v)) * up;
        }
        store(y + at, v);
      }
    }
  }
}

// Launch: grid (M tiles, N tiles of 256 outputs, 128 for silu, K splits for GEMM_PARTIAL, else
// 1), WG_THREADS threads, WG_SMEM_BYTES of dynamic shared memory at smem_raw; maps from
// gemm_wgmma_maps on x and w. Edges: TMA fills rows past m (x) or past the weight's rows with
// zeros; stores are guarded. A consumer warpgroup whose 64 rows all lie past m (a decode step of
// <= 64 rows) only passes the stages on, so its MMAs are not paid for.
// Grouped (a mixture of experts' chunk, moe_align's layout): tile_expert[M tile] is the expert
// whose weight rows [e expert_rows, (e + 1) expert_rows) of the stacked W the tile multiplies
// (-1: the CTA has nothing to do); maps were made with W's E * expert_rows rows.
template <typename OutT, int K, int EPI = GEMM_PLAIN>
__device__ __forceinline__ void gemm_wgmma(const void* __restrict__ maps, OutT* __restrict__ y,
                                           int m, int n, half* smem_raw,
                                           const OutT* __restrict__ aux = nullptr,
                                           const int* __restrict__ tile_expert = nullptr,
                                           int expert_rows = 0) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const unsigned base = smem_u32(smem_raw);
  half* smem = smem_raw + ((1024 - base % 1024) % 1024) / 2;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + WG_STAGES * WG_STAGE_HALVES);
  uint64_t* empty = full + WG_STAGES;
  static_assert(K % WG_BK == 0, "K must be a multiple of 64");
  constexpr int TILES = K / WG_BK, HALF = WG_BN / 2;
  constexpr int COLS = EPI == GEMM_SILU ? WG_BN / 2 : WG_BN;  // output columns per CTA
  // this CTA's K tiles [kt0, kt0 + count): all of them unless K is split
  const int kt0 = TILES * blockIdx.z / gridDim.z;
  const int count = TILES * (blockIdx.z + 1) / gridDim.z - kt0;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int2 tile = grouped_tile();
  const int row0 = tile.x * WG_BM, col0 = tile.y * COLS;
  int wrow = 0;  // the first weight row of this tile's expert (grouped), else 0
  if (tile_expert != nullptr) {
    const int e = tile_expert[tile.x];
    if (e < 0) return;  // past the last expert's run: the whole CTA leaves
    wrow = e * expert_rows;
  }
  if (tid == 0) {
    for (int s = 0; s < WG_STAGES; ++s) {
      mbar_init(full + s, 1);   // the producer's arrive, plus the copies' bytes
      mbar_init(empty + s, 2);  // one arrive per consumer warpgroup
    }
  }
  __syncthreads();

  if (warp == 8) {  // producer
    if (lane == 0) {
      const char* map_x = static_cast<const char*>(maps);
      const char* map_w = map_x + TMA_MAP_WORDS * 8;
      // the descriptors were written by another launch: stream order does not order the
      // tensormap proxy, so each CTA acquires them before its first copy (CUDA programming
      // guide, "Usage of a Modified Tensor Map"); the empty bulk group after the fences keeps
      // ptxas from moving the first copy above them
      asm volatile(
          "fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n"
          "fence.proxy.tensormap::generic.acquire.gpu [%1], 128;\n"
          "cp.async.bulk.commit_group;\n"
          "cp.async.bulk.wait_group.read 0;\n" ::"l"(map_x),
          "l"(map_w)
          : "memory");
      // the weight tile's two boxes: gate and up rows for silu, else rows col0 and col0 + 128
      const int w0 = wrow + col0, w1 = wrow + (EPI == GEMM_SILU ? col0 + n : col0 + HALF);
      for (int i = 0; i < count; ++i) {
        const int s = i % WG_STAGES, k0 = (kt0 + i) * WG_BK;
        if (i >= WG_STAGES) mbar_wait(empty + s, ((i / WG_STAGES) - 1) & 1);
        half* sa = smem + s * WG_STAGE_HALVES;
        half* sb = sa + WG_BM * WG_BK;
        mbar_expect_tx(full + s, WG_STAGE_HALVES * 2);
        tma_load(sa, map_x, k0, row0, full + s);
        tma_load(sb, map_w, k0, w0, full + s);
        tma_load(sb + HALF * WG_BK, map_w, k0, w1, full + s);
      }
    }
    return;
  }
  const int wg = warp >> 2;  // consumers
  float d[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) d[i] = 0.f;
  const bool idle = row0 + wg * 64 >= m;  // no row of this warpgroup's 64 is in the output
  for (int i = 0; i < count; ++i) {
    const int s = i % WG_STAGES;
    mbar_wait(full + s, (i / WG_STAGES) & 1);
    if (idle) {  // the stage is free as soon as it has landed
      if ((tid & 127) == 0) mbar_arrive(empty + s);
      continue;
    }
    const half* sa = smem + s * WG_STAGE_HALVES + wg * 64 * WG_BK;
    const half* sb = smem + s * WG_STAGE_HALVES + WG_BM * WG_BK;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < WG_BK / 16; ++kk)
      wgmma_64x256x16(d, wg_desc(sa + kk * 16), wg_desc(sb + kk * 16));
    wgmma_commit();
    wgmma_wait<1>();  // the group of step i - 1 is done: its stage is free
    if (i > 0 && (tid & 127) == 0) mbar_arrive(empty + (i - 1) % WG_STAGES);
  }
  wgmma_wait<0>();
  if (idle) return;
  if constexpr (EPI == GEMM_PARTIAL)
    wg_store<OutT, GEMM_PLAIN>(d, y + static_cast<int64_t>(blockIdx.z) * m * n, aux, m, n, row0,
                               col0, tid);
  else
    wg_store<OutT, EPI>(d, y, aux, m, n, row0, col0, tid);
#else
  asm volatile("trap;");
#endif
}


// ---- Mixture of experts: a chunk's tokens grouped by expert for gemm_wgmma (model/moe.py) ----
// Pair p = t TOPK + j is token t's j-th chosen expert, expert[p]. moe_align lays the pairs out
// expert by expert, each expert's run padded to a multiple of WG_BM rows so that a tile has one
// expert: rows[r] is the pair in row r (-1: padding), tile_expert[i] the expert of tile i (-1:
// past the last run), where[p] the row of pair p. One CTA of 1024 threads. A pair's slot within
// its run depends on the order of the atomics, but no row's result depends on its slot, and
// moe_combine reads each token's rows through where[] in slot order j: the output is the same.
template <int E>
__device__ __forceinline__ void moe_align(const int* __restrict__ expert, int pairs,
                                          int* __restrict__ rows, int* __restrict__ tile_expert,
                                          int* __restrict__ where, int m_rows) {
  __shared__ int count[E], start[E + 1], cursor[E];
  const int tid = threadIdx.x;
  for (int e = tid; e < E; e += blockDim.x) count[e] = cursor[e] = 0;
  for (int r = tid; r < m_rows; r += blockDim.x) rows[r] = -1;
  __syncthreads();
  for (int p = tid; p < pairs; p += blockDim.x) atomicAdd(&count[expert[p]], 1);
  __syncthreads();
  if (tid == 0) {
    start[0] = 0;
    for (int e = 0; e < E; ++e) start[e + 1] = start[e] + (count[e] + WG_BM - 1) / WG_BM * WG_BM;
  }
  __syncthreads();
  for (int i = tid; i < m_rows / WG_BM; i += blockDim.x) {
    int e = 0;
    while (e < E && start[e + 1] <= i * WG_BM) ++e;
    tile_expert[i] = e < E ? e : -1;
  }
  for (int p = tid; p < pairs; p += blockDim.x) {
    const int e = expert[p];
    const int r = start[e] + atomicAdd(&cursor[e], 1);
    rows[r] = p;
    where[p] = r;
  }
}

// xs[r] = x[rows[r] / TOPK] (zeros in padding rows): 8 halves per thread, 256 per CTA.
template <int K, int TOPK>
__device__ __forceinline__ void moe_gather(const half* __restrict__ x,
                                           const int* __restrict__ rows, int m_rows,
                                           half* __restrict__ xs) {
  static_assert(K % 8 == 0, "K must be a multiple of 8");
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(m_rows) * (K / 8)) return;
  const int r = static_cast<int>(i / (K / 8)), c = static_cast<int>(i % (K / 8)) * 8;
  const int p = rows[r];
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  if (p >= 0) v = *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(p / TOPK) * K + c);
  *reinterpret_cast<uint4*>(xs + static_cast<int64_t>(r) * K + c) = v;
}

// out[t] = sum over j < TOPK of weight[t TOPK + j] y[where[t TOPK + j]] (float32, slot order),
// stored as OutT: one element per thread, 256 per CTA.
template <typename OutT, int N, int TOPK>
__device__ __forceinline__ void moe_combine(const float* __restrict__ y,
                                            const int* __restrict__ where,
                                            const float* __restrict__ weight, int tokens,
                                            OutT* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<int64_t>(tokens) * N) return;
  const int t = static_cast<int>(i / N), c = static_cast<int>(i % N);
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < TOPK; ++j) {
    acc += weight[t * TOPK + j] * y[static_cast<int64_t>(where[t * TOPK + j]) * N + c];
  }
  store(out + i, acc);
}

// ---- Tensor-core flash attention for prefill (mma.sync m16n8k16, float32 accumulation) ----

__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const half* p) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const half* p) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(s));
}

// c (16 x 8, float) += a (16 x 16, row-major half) * b (16 x 8, column-major half)
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// dequantize_q4 or dequantize_q4_min by a flag (gemm_q4's prefill branch)
template <bool WITH_MIN>
__device__ __forceinline__ void dequantize_q4_any(const uint32_t* __restrict__ qw,
                                                  const half* __restrict__ qs,
                                                  const half* __restrict__ qm,
                                                  half* __restrict__ w, int groups) {
  if (WITH_MIN) dequantize_q4_min(qw, qs, qm, w, groups);
  else dequantize_q4(qw, qs, w, groups);
}

// ---- Skinny GEMM: a batched step's projections (M <= SK_SLAB rows per slab) ----
// y = x[M, K] @ W[N, K]^T with W streamed once per slab of SK_SLAB rows, on mma.sync m16n8k16
// in the transposed form D[n, m] = W[n, :] . x[m, :]: each warp owns 16 weight rows, lanes load
// 16-byte runs of them (32 consecutive k per lane per round of 128), and the MMA's k slots are
// permuted so that a lane's A and B fragments come from the same runs: slot s of step j is
// k = base + 32 t + 4 j + (s < 8 ? s - 2 t : s - 8 - 2 t + 2), t = lane % 4. x is staged in
// shared memory SK_KC columns at a time. K is split over gridDim.y CTAs (partials in a float32
// workspace [splits, M, N]); skinny_epilogue sums them and applies the GEMM epilogue.
constexpr int SK_WARPS = 4, SK_SLAB = 64, SK_KC = 256, SK_LD = SK_KC + 8;

__device__ __forceinline__ void sk_q4_run(uint4 words, float scale, float minimum, bool with_min,
                                          uint32_t* out) {
  // 32 weights of one q4 group as 16 half2 (k order); q4f16_1: (q - 7) s, q4f16_2: q s + min
  const uint32_t wv[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float v[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int shift = (j / 2) * 4 + (j % 2) * 16;
      const float q = static_cast<float>((wv[i] >> shift) & 0xFu);
      v[j] = with_min ? q * scale + minimum : (q - 7.f) * scale;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) out[i * 4 + j] = pack_half2(v[2 * j], v[2 * j + 1]);
  }
}

// One round's weights of a lane (rows n0 + g and n0 + g + 8, 32 k each), as loaded: float16
// runs in raw[0..7], or q4 codes in raw[0..1] with their scales and minimums.
struct SkRun {
  uint4 raw[8];
  float scale[2], minimum[2];
};

template <int K, int Q4>
__device__ __forceinline__ void sk_load(SkRun& run, const void* __restrict__ w,
                                        const half* __restrict__ scales,
                                        const half* __restrict__ mins, int row, bool ok_a,
                                        bool ok_b, int kb) {
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  if (Q4 == 0) {
    const half* wh = static_cast<const half*>(w);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      run.raw[i] = ok_a ? __ldg(reinterpret_cast<const uint4*>(
                              wh + static_cast<int64_t>(row) * K + kb) + i) : zero;
      run.raw[4 + i] = ok_b ? __ldg(reinterpret_cast<const uint4*>(
                                  wh + static_cast<int64_t>(row + 8) * K + kb) + i) : zero;
    }
  } else {
    const uint32_t* wq = static_cast<const uint32_t*>(w);
    const int64_t ga = static_cast<int64_t>(row) * (K / 32) + kb / 32;
    const int64_t gb = ga + 8 * (K / 32);
    run.raw[0] = ok_a ? __ldg(reinterpret_cast<const uint4*>(wq + ga * 4)) : zero;
    run.raw[1] = ok_b ? __ldg(reinterpret_cast<const uint4*>(wq + gb * 4)) : zero;
    run.scale[0] = ok_a ? __half2float(scales[ga]) : 0.f;
    run.scale[1] = ok_b ? __half2float(scales[gb]) : 0.f;
    run.minimum[0] = Q4 == 2 && ok_a ? __half2float(mins[ga]) : 0.f;
    run.minimum[1] = Q4 == 2 && ok_b ? __half2float(mins[gb]) : 0.f;
  }
}

template <int K, int Q4>  // Q4: 0 float16 weights, 1 q4f16_1, 2 q4f16_2
__device__ __forceinline__ void skinny_partial(const half* __restrict__ x, int m,
                                               const void* __restrict__ w,
                                               const half* __restrict__ scales,
                                               const half* __restrict__ mins, int n,
                                               float* __restrict__ ws) {
  static_assert(K % 128 == 0, "K must be a multiple of 128");
  constexpr int CHUNK = SK_KC / 128;  // rounds of 128 k per staged x chunk
  __shared__ __align__(16) half xs[SK_SLAB * SK_LD];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n0 = (blockIdx.x * SK_WARPS + warp) * 16;
  const int splits = gridDim.y, m0 = blockIdx.z * SK_SLAB;
  constexpr int ROUNDS = K / 128;
  const int r_begin = ROUNDS * blockIdx.y / splits, r_end = ROUNDS * (blockIdx.y + 1) / splits;
  const int tiles = min(SK_SLAB, m - m0 + 7) / 8;  // m tiles of 8 rows with work
  float c[SK_SLAB / 8][4];
#pragma unroll
  for (int i = 0; i < SK_SLAB / 8; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
  const bool ok_a = n0 + g < n, ok_b = n0 + g + 8 < n;
  SkRun cur, nxt;
  if (r_begin < r_end) sk_load<K, Q4>(cur, w, scales, mins, n0 + g, ok_a, ok_b, r_begin * 128 + 32 * t);
  for (int r = r_begin; r < r_end; ++r) {
    const int in_chunk = (r - r_begin) % CHUNK;
    if (in_chunk == 0) {  // stage x for rounds [r, r + CHUNK)
      const int k0 = r * 128, cols = min(CHUNK, r_end - r) * 128;
      __syncthreads();  // the previous chunk's reads are done
      for (int i = threadIdx.x; i < SK_SLAB * (SK_KC / 8); i += blockDim.x) {
        const int row = i / (SK_KC / 8), col = (i % (SK_KC / 8)) * 8;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (m0 + row < m && col < cols)
          v = *reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m0 + row) * K + k0 + col);
        *reinterpret_cast<uint4*>(xs + row * SK_LD + col) = v;
      }
      __syncthreads();
    }
    if (r + 1 < r_end)  // the next round's weights are in flight while this one computes
      sk_load<K, Q4>(nxt, w, scales, mins, n0 + g, ok_a, ok_b, (r + 1) * 128 + 32 * t);
    uint32_t wa[16], wb[16];
    if (Q4 == 0) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        wa[4 * i] = cur.raw[i].x; wa[4 * i + 1] = cur.raw[i].y;
        wa[4 * i + 2] = cur.raw[i].z; wa[4 * i + 3] = cur.raw[i].w;
        wb[4 * i] = cur.raw[4 + i].x; wb[4 * i + 1] = cur.raw[4 + i].y;
        wb[4 * i + 2] = cur.raw[4 + i].z; wb[4 * i + 3] = cur.raw[4 + i].w;
      }
    } else {
      sk_q4_run(cur.raw[0], cur.scale[0], cur.minimum[0], Q4 == 2, wa);
      sk_q4_run(cur.raw[1], cur.scale[1], cur.minimum[1], Q4 == 2, wb);
    }
    const half* xrow = xs + g * SK_LD + in_chunk * 128 + 32 * t;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t a[4] = {wa[2 * j], wb[2 * j], wa[2 * j + 1], wb[2 * j + 1]};
#pragma unroll
      for (int mt = 0; mt < SK_SLAB / 8; ++mt) {
        if (mt < tiles) {
          const uint2 bx = *reinterpret_cast<const uint2*>(xrow + mt * 8 * SK_LD + 4 * j);
          const uint32_t b[2] = {bx.x, bx.y};
          mma_16816(c[mt], a, b);
        }
      }
    }
    cur = nxt;
  }
  // c[mt]: (n0 + g, m 2t / 2t + 1) and (n0 + g + 8, same m) of this split
  float* out = ws + static_cast<int64_t>(blockIdx.y) * m * n;
#pragma unroll
  for (int mt = 0; mt < SK_SLAB / 8; ++mt) {
    const int mm = m0 + mt * 8 + 2 * t;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = mm + (e & 1), col = n0 + g + (e >> 1) * 8;
      if (mt < tiles && row < m && col < n) out[static_cast<int64_t>(row) * n + col] = c[mt][e];
    }
  }
}

// The split partials summed, then the epilogue: GEMM_PLAIN y = sum, GEMM_RESIDUAL y = aux + sum,
// GEMM_SILU (W = [gate; up], n = 2 I) y[:, j] = silu(gate_j) * up_j. Grid-stride over y.
template <typename OutT, int EPI>
__device__ __forceinline__ void skinny_epilogue(const float* __restrict__ ws, int splits, int m,
                                                int n, OutT* __restrict__ y,
                                                const OutT* __restrict__ aux) {
  const int cols = EPI == GEMM_SILU ? n / 2 : n;
  const int64_t total = static_cast<int64_t>(m) * cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t row = i / cols, col = i % cols;
    float v = 0.f, u = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float* part = ws + static_cast<int64_t>(s) * m * n + row * n;
      v += part[col];
      if (EPI == GEMM_SILU) u += part[col + cols];
    }
    if (EPI == GEMM_SILU) v = v / (1.f + __expf(-v)) * u;
    if (EPI == GEMM_RESIDUAL) v += to_float(aux[i]);
    store(y + i, v);
  }
}


// query rows and key rows per tile, threads per CTA (16 query rows per warp). 64-row CTAs of 4
// warps run two per SM: 0.71 ms per 7B layer of a 4096-token causal prefill on the H100, where
// 128-row CTAs of 8 warps (one per SM, 207 registers a thread) took 0.83 ms.
constexpr int FA_BR = 64, FA_BC = 64, FA_THREADS = 128;

// Rotate-half RoPE of one head row's elements [c, c + 8) (lo) and [c + D/2, c + D/2 + 8) (hi)
// at position `pos` (already times the scale), TVM's frequencies.
template <int D>
__device__ __forceinline__ void rope_pair(float* lo, float* hi, int c, float pos, float theta) {
  float inv[8];
  rope_frequencies<8, D>(inv, c, theta);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float s, co;
    sincos_reduced(pos * inv[e], &s, &co);
    float a = lo[e], b = hi[e];
    lo[e] = a * co - b * s;
    hi[e] = b * co + a * s;
  }
}

// TVM's split + RoPE of the fused projection (the KV cache's tir_split_rotary, same arguments):
// qkv [S, HQ + 2 HKV, D] into q [S, HQ, D], k and v [S, HKV, D], q and k rotated (rotate-half,
// TVM's frequencies) at position pos[s] * scale when apply_rope. A thread moves 8 elements of
// the low half of one (row, head) and their 8 partners: grid ceil(S (HQ + 2 HKV) D / 16 / 256)
// of 256 threads.
template <typename T, int D, int HQ, int HKV>
__device__ __forceinline__ void split_rope(const T* __restrict__ qkv, const int* __restrict__ pos,
                                           T* __restrict__ q, T* __restrict__ k,
                                           T* __restrict__ v, int rows, int apply_rope,
                                           float scale, float theta) {
  constexpr int H = HQ + 2 * HKV, C = D / 16;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (i >= static_cast<int64_t>(rows) * H * C) return;
  const int c = static_cast<int>(i % C) * 8, h = static_cast<int>(i / C % H);
  const int64_t r = i / C / H;
  const T* src = qkv + (r * H + h) * D;
  T* dst = h < HQ ? q + (r * HQ + h) * D
                  : h < HQ + HKV ? k + (r * HKV + h - HQ) * D : v + (r * HKV + h - HQ - HKV) * D;
  float lo[8], hi[8];
#pragma unroll
  for (int j = 0; j < 8; j += Vec<T>::N) {
    load16(src + c + j, lo + j);
    load16(src + D / 2 + c + j, hi + j);
  }
  if (apply_rope && h < HQ + HKV) rope_pair<D>(lo, hi, c, static_cast<float>(pos[r]) * scale, theta);
#pragma unroll
  for (int j = 0; j < 8; j += Vec<T>::N) {
    store16(dst + c + j, lo + j);
    store16(dst + D / 2 + c + j, hi + j);
  }
}

// Copies `rows` rows of D halves (row stride `stride` elements) into shared memory with row
// pitch D + 8 (conflict-free ldmatrix); rows at or past `valid` are zero-filled. With `pos`,
// row r is rotated (RoPE at position pos[r]) and rounded to half on the way, as TVM's kernels
// do; otherwise cp.async moves it without registers.
template <int D, int THREADS = FA_THREADS>
__device__ __forceinline__ void fa_load_rows(half* dst, const half* src, int64_t stride, int rows,
                                             int valid, const int* pos, float scale,
                                             float theta) {
  constexpr int CH = D / 8, LD = D + 8;
  if (pos == nullptr) {
    for (int i = threadIdx.x; i < rows * CH; i += THREADS) {
      int r = i / CH, c = (i % CH) * 8;
      bool ok = r < valid;
      cp_async16(dst + r * LD + c, src + (ok ? r * stride + c : 0), ok);
    }
    asm volatile("cp.async.commit_group;\n" ::);
    return;
  }
  for (int i = threadIdx.x; i < rows * (CH / 2); i += THREADS) {
    int r = i / (CH / 2), c = (i % (CH / 2)) * 8;  // this chunk and its partner c + D / 2
    float lo[8], hi[8];
    if (r < valid) {
      load16(src + r * stride + c, lo);
      load16(src + r * stride + c + D / 2, hi);
      rope_pair<D>(lo, hi, c, static_cast<float>(pos[r]) * scale, theta);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) lo[e] = hi[e] = 0.f;
    }
    store16(dst + r * LD + c, lo);
    store16(dst + r * LD + c + D / 2, hi);
  }
}

// RoPE of the ragged keys k [rows, heads, D] into k_rot (same layout) before the attention, so
// each key is rotated once rather than once per query tile. Row r of sequence b (rows
// [indptr[b], indptr[b + 1])) sits at position offset[b] + r - indptr[b]. 256 threads per CTA,
// one (row, head, 8-element pair) each. Does nothing unless rotary_mode == 1.
template <int D>
__device__ __forceinline__ void rope_ragged_keys(const half* __restrict__ k,
                                                 const int* __restrict__ indptr,
                                                 const int* __restrict__ offset, int batch,
                                                 int rows, int heads, half* __restrict__ k_rot,
                                                 int rotary_mode, float scale, float theta) {
  constexpr int PAIRS = D / 16;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (rotary_mode != 1 || i >= static_cast<int64_t>(rows) * heads * PAIRS) return;
  const int c = static_cast<int>(i % PAIRS) * 8;
  const int64_t rh = i / PAIRS;
  const int row = static_cast<int>(rh / heads);
  int b = 0;
  while (b + 1 < batch && indptr[b + 1] <= row) ++b;
  float lo[8], hi[8];
  load16(k + rh * D + c, lo);
  load16(k + rh * D + c + D / 2, hi);
  rope_pair<D>(lo, hi, c, static_cast<float>(offset[b] + row - indptr[b]) * scale, theta);
  store16(k_rot + rh * D + c, lo);
  store16(k_rot + rh * D + c + D / 2, hi);
}

// The key-tile walk of the tensor-core flash attention (FlashAttention-2's layout), shared by
// the prefill kernels: a warp holds 16 query rows as mma fragments qf, the CTA walks `tiles`
// tiles of FA_BC keys from position kv_begin, with online softmax on the accumulators and P
// kept in registers for the PV product. load(j0, v) issues the cp.async copy of the K (v false)
// or V tile at key position j0; K and V share one buffer with V's copy overlapping S = QK^T and
// the next K's overlapping PV. On tiles where edge(j0) is true, hidden(j, h) masks key j out of
// this thread's row my_row + 8 h. Scores are in base 2 (qk_scale includes log2 e).
template <int D, typename Load, typename Edge, typename Hidden>
__device__ __forceinline__ void fa_walk_tiles(uint32_t (*qf)[4], const half* ks,
                                              const half* vs, int tiles, int kv_begin,
                                              float qk_scale, Load load, Edge edge, Hidden hidden,
                                              float* m, float* l, float (*o)[4]) {
  constexpr int LD = D + 8, KC = D / 16, NB = FA_BC / 8, DB = D / 8;
  const int lane = threadIdx.x & 31, tig = lane & 3;
  if (tiles > 0) load(kv_begin, false);
  for (int it = 0; it < tiles; ++it) {
    const int j0 = kv_begin + it * FA_BC;
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();  // K(it) landed; every warp is done with V(it - 1)
    load(j0, true);

    float s[NB][4];
#pragma unroll
    for (int i = 0; i < NB; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
      for (int p = 0; p < NB / 2; ++p) {
        uint32_t kb[4];
        ldmatrix_x4(kb, ks + (p * 16 + (lane & 7) + 8 * (lane >> 4)) * LD + kc * 16 +
                            8 * ((lane >> 3) & 1));
        mma_16816(s[2 * p], qf[kc], kb);
        mma_16816(s[2 * p + 1], qf[kc], kb + 2);
      }
    }

    const bool at_edge = edge(j0);
#pragma unroll
    for (int half_ = 0; half_ < 2; ++half_) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = s[nb][2 * half_ + e] * qk_scale;
          if (at_edge && hidden(j0 + nb * 8 + 2 * tig + e, half_)) x = -INFINITY;
          s[nb][2 * half_ + e] = x;
          mx = fmaxf(mx, x);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[half_], mx);
      const float base = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[half_] - base);
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float p = exp2f(s[nb][2 * half_ + e] - base);
          s[nb][2 * half_ + e] = p;
          sum += p;
        }
      }
      l[half_] = l[half_] * alpha + sum;
      m[half_] = m_new;
#pragma unroll
      for (int db = 0; db < DB; ++db) {
        o[db][2 * half_] *= alpha;
        o[db][2 * half_ + 1] *= alpha;
      }
    }

    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();  // V(it) landed; every warp is done with K(it)
    if (it + 1 < tiles) load(j0 + FA_BC, false);

#pragma unroll
    for (int kc = 0; kc < FA_BC / 16; ++kc) {
      uint32_t pa[4] = {pack_half2(s[2 * kc][0], s[2 * kc][1]),
                        pack_half2(s[2 * kc][2], s[2 * kc][3]),
                        pack_half2(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                        pack_half2(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
      for (int dp = 0; dp < DB / 2; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, vs + (kc * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD +
                                  dp * 16 + 8 * (lane >> 4));
        mma_16816(o[2 * dp], pa, vb);
        mma_16816(o[2 * dp + 1], pa, vb + 2);
      }
    }
  }
}

// Causal (or full) attention of ragged queries over ragged keys/values, the contract of TVM's
// batch_prefill_ragged_kv: q [total_q, H_qo, D], k and v [total_kv, H_kv, D], sequence b owns
// rows [indptr[b], indptr[b + 1]); with `causal`, query i sees keys j <= kv_len - q_len + i.
// With rotary_mode == 1 the queries are rotated here and the keys come from k_rot
// (rope_ragged_keys). Writes the normalized output and the base-2 log-sum-exp. Grid (tiles, H_qo), 256 threads:
// a CTA owns BR = FA_BR = 64 query rows of one head (16 per warp, Q kept in registers as mma
// fragments), walks FA_BC = 64 keys at a time with online softmax, and keeps P in registers
// between the two products (FlashAttention-2's layout). K and V tiles share one shared-memory
// buffer with Q's staging; V's copy overlaps the S = QK^T product and the next K's the PV one.
template <int D, int G, int BR = FA_BR>
__device__ __forceinline__ void prefill_attn_ragged(
    const half* __restrict__ q, const int* __restrict__ q_indptr, const half* __restrict__ k,
    const half* __restrict__ k_rot, const half* __restrict__ v,
    const int* __restrict__ kv_indptr, const int* __restrict__ q_rope_pos,
    half* __restrict__ out, float* __restrict__ lse, int batch, int causal, int rotary_mode,
    float rope_scale, float rope_theta, float sm_scale) {
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  constexpr int LD = D + 8, KC = D / 16, DB = D / 8;
  __shared__ __align__(128) half smem[(BR > 2 * FA_BC ? BR : 2 * FA_BC) * LD];  // Q, then K | V
  half* ks = smem;
  half* vs = smem + FA_BC * LD;

  // the tile: numbered over all sequences, the last (longest, causally) first
  int total = 0;
  for (int b = 0; b < batch; ++b) total += (q_indptr[b + 1] - q_indptr[b] + BR - 1) / BR;
  int t = total - 1 - static_cast<int>(blockIdx.x);
  if (t < 0) return;
  int b = 0;
  for (; b < batch; ++b) {
    int n = (q_indptr[b + 1] - q_indptr[b] + BR - 1) / BR;
    if (t < n) break;
    t -= n;
  }
  const int h = blockIdx.y, h_qo = gridDim.y, kvh = h / G, h_kv = h_qo / G;
  const int q0 = q_indptr[b], q_len = q_indptr[b + 1] - q0;
  const int k0 = kv_indptr[b], kv_len = kv_indptr[b + 1] - k0;
  const int row0 = t * BR;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const bool rope = rotary_mode == 1;

  fa_load_rows<D, BR * 2>(smem, q + (static_cast<int64_t>(q0 + row0) * h_qo + h) * D,
                  static_cast<int64_t>(h_qo) * D, BR, q_len - row0,
                  rope ? q_rope_pos + q0 + row0 : nullptr, rope_scale, rope_theta);
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();
  uint32_t qf[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc)
    ldmatrix_x4(qf[kc], smem + (warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + kc * 16 +
                            8 * (lane >> 4));
  __syncthreads();

  // keys this tile can see: causal rows end at kv_len - q_len + (last row) + 1
  const int last_row = min(row0 + BR, q_len) - 1;
  const int kv_end = causal ? min(kv_len, kv_len - q_len + last_row + 1) : kv_len;
  const int tiles = (max(kv_end, 0) + FA_BC - 1) / FA_BC;
  const int64_t kv_stride = static_cast<int64_t>(h_kv) * D;
  const half* kbase = (rope ? k_rot : k) + (static_cast<int64_t>(k0) * h_kv + kvh) * D;
  const half* vbase = v + (static_cast<int64_t>(k0) * h_kv + kvh) * D;

  const float qk_scale = sm_scale * 1.4426950408889634f;  // scores in base 2
  const int my_row = row0 + warp * 16 + gid;  // this thread's rows: my_row and my_row + 8
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[DB][4];
#pragma unroll
  for (int i = 0; i < DB; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  const int diag = kv_len - q_len;  // causal: row r sees keys j <= diag + r
  fa_walk_tiles<D>(
      qf, ks, vs, tiles, 0, qk_scale,
      [&](int j0, bool is_v) {
        fa_load_rows<D, BR * 2>(is_v ? vs : ks, (is_v ? vbase : kbase) + j0 * kv_stride,
                                kv_stride, FA_BC, kv_len - j0, nullptr, 0.f, 0.f);
      },
      [&](int j0) {
        return j0 + FA_BC > kv_len || (causal && j0 + FA_BC - 1 > diag + row0 + warp * 16);
      },
      [&](int j, int hf) {
        return j >= (causal ? min(kv_len, diag + my_row + 8 * hf + 1) : kv_len);
      },
      m, l, o);

#pragma unroll
  for (int half_ = 0; half_ < 2; ++half_) {
    float den = l[half_];
    den += __shfl_xor_sync(0xffffffffu, den, 1);
    den += __shfl_xor_sync(0xffffffffu, den, 2);
    const int row = my_row + 8 * half_;
    if (row >= q_len) continue;
    const float inv = den > 0.f ? 1.f / den : 0.f;
    const int64_t at = (static_cast<int64_t>(q0 + row) * h_qo + h);
    half* orow = out + at * D + 2 * tig;
#pragma unroll
    for (int db = 0; db < DB; ++db)
      *reinterpret_cast<uint32_t*>(orow + db * 8) =
          pack_half2(o[db][2 * half_] * inv, o[db][2 * half_ + 1] * inv);
    if (tig == 0) lse[at] = den > 0.f ? m[half_] + log2f(den) : -5e4f;
  }
}

// ---- The model-owned KV cache (one sequence; mistral_compile/model/kv_owned.py) ----
// Storage [layers, 2 (k, v), H_kv, C, D]: the token at absolute position p sits in slot p % C,
// its key rotated (RoPE at p) when written. len[0] is the number of tokens before this forward.

__device__ __forceinline__ float round_to(half*, float x) { return __half2float(__float2half_rn(x)); }
__device__ __forceinline__ float round_to(float*, float x) { return x; }

template <typename T, int HKV, int D>
__device__ __forceinline__ T* owned_rows(T* state, int layer, int kind, int kvh, int cap) {
  return state + ((static_cast<int64_t>(layer) * 2 + kind) * HKV + kvh) * cap * D;
}

// Prefill: qkv [n, HQ + 2 HKV, D] at positions len[0] + r. q is rotated into q_out [n, HQ, D];
// k (rotated) and v go to their slots of layer `layer`. One thread per 8 low-half elements of a
// (row, head) and their partners: grid ceil(n (HQ + 2 HKV) D / 16 / 256) of 256 threads.
template <typename T, int D, int HQ, int HKV>
__device__ __forceinline__ void owned_append(const T* __restrict__ qkv, const int* __restrict__ len,
                                             int rows, T* __restrict__ state, int layer, int cap,
                                             T* __restrict__ q_out, float scale, float theta) {
  constexpr int H = HQ + 2 * HKV, CH = D / 16;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (i >= static_cast<int64_t>(rows) * H * CH) return;
  const int c = static_cast<int>(i % CH) * 8, h = static_cast<int>(i / CH % H);
  const int r = static_cast<int>(i / CH / H), pos = len[0] + r;
  const T* src = qkv + (static_cast<int64_t>(r) * H + h) * D;
  float lo[8], hi[8];
#pragma unroll
  for (int j = 0; j < 8; j += Vec<T>::N) {
    load16(src + c + j, lo + j);
    load16(src + D / 2 + c + j, hi + j);
  }
  if (h < HQ + HKV) rope_pair<D>(lo, hi, c, static_cast<float>(pos) * scale, theta);
  T* dst;
  if (h < HQ) {
    dst = q_out + (static_cast<int64_t>(r) * HQ + h) * D;
  } else {
    const int kind = h < HQ + HKV ? 0 : 1;
    dst = owned_rows<T, HKV, D>(state, layer, kind, h - HQ - kind * HKV, cap) +
          static_cast<int64_t>(pos % cap) * D;
  }
#pragma unroll
  for (int j = 0; j < 8; j += Vec<T>::N) {
    store16(dst + c + j, lo + j);
    store16(dst + D / 2 + c + j, hi + j);
  }
}

// Split-KV attention of query rows over a KV layout, pass 1 (pass 2 merges). Grid (nsplit, H_kv,
// rows), 128 threads, the row and lane layout of decode_attn_partial. Query row b = blockIdx.z
// sits at position `pos` and sees keys [lo, pos], lo = max(0, pos - window + 1) with a window
// (else 0); the key and value at position p are at kbase / vbase + slot(p) (the layout policy:
// the owned ring, or a page table).
// FUSED (decode, one row): q is the un-rotated fused projection [1, HQ + 2 HKV, D]; the kernel
// rotates q and the new key, reads keys [lo, pos) from the cache and the new one from registers
// (last split), and that split also writes the new k and v to slot(pos). Otherwise q is already
// rotated ([rows, HQ, D]) and every key, pos included, comes from the cache.
// SINKS (the paged cache's StreamingLLM sinks, `sinks`; count 0: none for this row): the row
// also sees keys [0, min(count, pos + 1)) at kbase / vbase + page + j D, scored by split 0 with
// q rotated back by `shift`, and its recent keys are [max(count, pos - (window - count) + 1),
// pos]. Without SINKS `sinks` is unread and the kernel is the plain window's, registers and all.
constexpr int SINK_COLUMNS = 3;  // a row of the step's sinks array: count, page, shift

struct SinkKeys {
  int count;
  int64_t page;  // offset of the sinks' page from kbase / vbase, in elements
  int shift;
};

template <typename T, int D, int G, int HKV, bool FUSED, bool SINKS, typename Slot>
__device__ __forceinline__ void attn_partial(const T* __restrict__ q, int pos, T* kbase,
                                             T* vbase, Slot slot, int window, SinkKeys sinks,
                                             float* __restrict__ ws, int nsplit,
                                             float rope_scale, float rope_theta,
                                             float sm_scale) {
  constexpr int VEC = Vec<T>::N;
  constexpr int L = D / VEC;
  constexpr int RPW = 32 / L;
  constexpr int WARPS = 4;
  constexpr int GROUPS = WARPS * RPW;
  constexpr int UNROLL = 4;
  constexpr int HQ = HKV * G;
  static_assert(L >= 2 && L <= 32 && 32 % L == 0, "unsupported head_dim for this dtype");
  __shared__ float sm_o[WARPS][G][D];  // per warp: G x D floats, so G up to 19 at D = 128
  __shared__ float sm_m[WARPS][G];
  __shared__ float sm_d[WARPS][G];

  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, rows = gridDim.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % L, rg = warp * RPW + lane / L;
  const int d0 = sub * VEC;

  const int sink_count = SINKS ? sinks.count : 0;
  const int recent = sink_count > 0 ? window - sink_count : window;
  const int lo = max(sink_count, recent > 0 ? max(0, pos - recent + 1) : 0);
  const int stored_end = FUSED ? pos : pos + 1;  // keys [lo, stored_end) come from the cache
  const int n_keys = stored_end - lo;
  const int chunk = max((n_keys + nsplit - 1) / nsplit, 16);
  const int row_begin = lo + split * chunk, row_end = min(row_begin + chunk, stored_end);
  // a batch of UNROLL rows per row group, loaded raw: the first batch is in flight while q is
  // rotated, and each next batch while the current one is scored (software pipelining)
  auto load_batch = [&](int base, uint4* kr, uint4* vr) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int r = base + u * GROUPS + rg;
      if (r < row_end) {
        const int64_t at = slot(r) + d0;
        kr[u] = __ldg(reinterpret_cast<const uint4*>(kbase + at));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(vbase + at));
      } else {
        kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };
  uint4 kr[UNROLL], vr[UNROLL];
  load_batch(row_begin, kr, vr);

  const float log2e = 1.4426950408889634f;
  float inv[VEC];
  rope_frequencies<VEC, D>(inv, d0, rope_theta);
  float qv[G][VEC];
  const int q_heads = FUSED ? HQ + 2 * HKV : HQ;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load16(q + (static_cast<int64_t>(b) * q_heads + kvh * G + g) * D + d0, qv[g]);
    if (FUSED) {
      float partner[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) partner[e] = __shfl_xor_sync(0xffffffffu, qv[g][e], L / 2);
      rope<VEC, D>(qv[g], partner, inv, d0, pos, rope_scale);
#pragma unroll
      for (int e = 0; e < VEC; ++e) qv[g][e] = round_to(static_cast<T*>(nullptr), qv[g][e]);
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) qv[g][e] *= sm_scale * log2e;
  }

  float m[G], dsum[G], o[G][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    dsum[g] = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o[g][e] = 0.f;
  }

  auto accumulate_with = [&](const float (&qq)[G][VEC], const float* kf, const float* vf,
                             bool valid) {
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float acc = 0.f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc += qq[g][e] * kf[e];
      s[g] = acc;
    }
#pragma unroll
    for (int step = L / 2; step >= 1; step /= 2) {
#pragma unroll
      for (int g = 0; g < G; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], step);
    }
    if (valid) {
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float m_new = fmaxf(m[g], s[g]);
        float scale = exp2f(m[g] - m_new), p = exp2f(s[g] - m_new);
        dsum[g] = dsum[g] * scale + p;
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[g][e] = o[g][e] * scale + p * vf[e];
        m[g] = m_new;
      }
    }
  };
  auto accumulate = [&](const float* kf, const float* vf, bool valid) {
    accumulate_with(qv, kf, vf, valid);
  };

  if (SINKS && sink_count > 0 && split == 0) {  // the sink keys, q rotated back by the shift
    float qs[G][VEC];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float partner[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        partner[e] = __shfl_xor_sync(0xffffffffu, qv[g][e], L / 2);
        qs[g][e] = qv[g][e];
      }
      rope<VEC, D>(qs[g], partner, inv, d0, -sinks.shift, 1.f);
    }
    const int n_sink = min(sink_count, pos + 1);
    for (int base = 0; base < n_sink; base += GROUPS) {
      const int r = base + rg;
      float kf[VEC], vf[VEC];
#pragma unroll
      for (int e = 0; e < VEC; ++e) kf[e] = vf[e] = 0.f;
      if (r < n_sink) {
        load16(kbase + sinks.page + static_cast<int64_t>(r) * D + d0, kf);
        load16(vbase + sinks.page + static_cast<int64_t>(r) * D + d0, vf);
      }
      accumulate_with(qs, kf, vf, r < n_sink);
    }
  }

  for (int base = row_begin; base < row_end; base += GROUPS * UNROLL) {
    uint4 kn[UNROLL], vn[UNROLL];
    if (base + GROUPS * UNROLL < row_end) load_batch(base + GROUPS * UNROLL, kn, vn);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float kf[VEC], vf[VEC];
      widen(kr[u], static_cast<const T*>(nullptr), kf);
      widen(vr[u], static_cast<const T*>(nullptr), vf);
      accumulate(kf, vf, base + u * GROUPS + rg < row_end);
      kr[u] = kn[u];
      vr[u] = vn[u];
    }
  }

  if (FUSED && split == nsplit - 1) {  // the new token: every row group computes, group 0 counts
    float kf[VEC], vf[VEC], partner[VEC];
    load16(q + (static_cast<int64_t>(HQ) + kvh) * D + d0, kf);
    load16(q + (static_cast<int64_t>(HQ + HKV) + kvh) * D + d0, vf);
#pragma unroll
    for (int e = 0; e < VEC; ++e) partner[e] = __shfl_xor_sync(0xffffffffu, kf[e], L / 2);
    rope<VEC, D>(kf, partner, inv, d0, pos, rope_scale);
#pragma unroll
    for (int e = 0; e < VEC; ++e) kf[e] = round_to(static_cast<T*>(nullptr), kf[e]);
    accumulate(kf, vf, rg == 0);
    if (rg == 0) {
      const int64_t at = slot(pos) + d0;
      store16(kbase + at, kf);
      store16(vbase + at, vf);
    }
  }

  // the RPW row groups of a warp (lanes lane ^ L, ^ 2L, ...) merge by shuffles first
#pragma unroll
  for (int off = L; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
      const float dn = __shfl_xor_sync(0xffffffffu, dsum[g], off);
      const float mn = fmaxf(m[g], mo);
      const float sa = mn == -INFINITY ? 0.f : exp2f(m[g] - mn);
      const float sb = mn == -INFINITY ? 0.f : exp2f(mo - mn);
      dsum[g] = dsum[g] * sa + dn * sb;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const float oo = __shfl_xor_sync(0xffffffffu, o[g][e], off);
        o[g][e] = o[g][e] * sa + oo * sb;
      }
      m[g] = mn;
    }
  }
  if (lane < L) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) sm_o[warp][g][d0 + e] = o[g][e];
      if (sub == 0) {
        sm_m[warp][g] = m[g];
        sm_d[warp][g] = dsum[g];
      }
    }
  }
  __syncthreads();
  split_kv_write<G, D, WARPS>(sm_o, sm_m, sm_d, ws, static_cast<int64_t>(rows) * HQ * nsplit * D,
                              (static_cast<int64_t>(b) * HQ + kvh * G) * nsplit + split, nsplit);
}

// The owned cache's split-KV attention (attn_partial): row b at position len[0] + b, the key at
// position p in slot p % C of layer `layer`.
template <typename T, int D, int G, int HKV, bool FUSED>
__device__ __forceinline__ void owned_attn_partial(const T* __restrict__ q,
                                                   const int* __restrict__ len,
                                                   T* __restrict__ state, int layer, int cap,
                                                   int window, float* __restrict__ ws, int nsplit,
                                                   float rope_scale, float rope_theta,
                                                   float sm_scale) {
  const int kvh = blockIdx.y, b = blockIdx.z;
  attn_partial<T, D, G, HKV, FUSED, false>(
      q, len[0] + b, owned_rows<T, HKV, D>(state, layer, 0, kvh, cap),
      owned_rows<T, HKV, D>(state, layer, 1, kvh, cap),
      [cap](int r) { return static_cast<int64_t>(r % cap) * D; }, window, SinkKeys{0, 0, 0}, ws,
      nsplit, rope_scale, rope_theta, sm_scale);
}

// ---- The paged cache of a batch (mistral_compile/model/kv_paged.py) ----
// Pool [pages, LG, 2 (k, v), H_kv, P, D]: the key at position p of the sequence in table row
// `row` is in page table[row * width + (p / P) % width], slot p % P, rotated when written.

template <typename T, int HKV, int D, int P>
__device__ __forceinline__ T* paged_rows(T* pool, int layer, int layers, int kind, int kvh) {
  return pool + ((static_cast<int64_t>(layer) * 2 + kind) * HKV + kvh) * P * D;
}

// Rows t of a step: qkv [n, HQ + 2 HKV, D] at positions[t] of table row rows[t]. q is rotated
// into q_out [n, HQ, D]; k (rotated) and v go to their pages. Threads as in owned_append.
template <typename T, int D, int HQ, int HKV, int P>
__device__ __forceinline__ void paged_append(const T* __restrict__ qkv,
                                             const int* __restrict__ positions,
                                             const int* __restrict__ rows, int n,
                                             const int* __restrict__ table, int width,
                                             T* __restrict__ pool, int layer, int layers,
                                             T* __restrict__ q_out, float theta) {
  constexpr int H = HQ + 2 * HKV, CH = D / 16;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (i >= static_cast<int64_t>(n) * H * CH) return;
  const int c = static_cast<int>(i % CH) * 8, h = static_cast<int>(i / CH % H);
  const int r = static_cast<int>(i / CH / H), pos = positions[r];
  const T* src = qkv + (static_cast<int64_t>(r) * H + h) * D;
  float lo[8], hi[8];
#pragma unroll
  for (int j = 0; j < 8; j += Vec<T>::N) {
    load16(src + c + j, lo + j);
    load16(src + D / 2 + c + j, hi + j);
  }
  if (h < HQ + HKV) rope_pair<D>(lo, hi, c, static_cast<float>(pos), theta);
  T* dst;
  if (h < HQ) {
    dst = q_out + (static_cast<int64_t>(r) * HQ + h) * D;
  } else {
    const int kind = h < HQ + HKV ? 0 : 1;
    const int page = table[static_cast<int64_t>(rows[r]) * width + (pos / P) % width];
    dst = paged_rows<T, HKV, D, P>(pool, layer, layers, kind, h - HQ - kind * HKV) +
          static_cast<int64_t>(page) * layers * 2 * HKV * P * D +
          static_cast<int64_t>(pos % P) * D;
  }
#pragma unroll
  for (int j = 0; j < 8; j += Vec<T>::N) {
    store16(dst + c + j, lo + j);
    store16(dst + D / 2 + c + j, hi + j);
  }
}

// Split-KV attention of a step's rows (appended, q rotated) through the page tables: grid
// (nsplit, H_kv, n), 128 threads; row b at positions[b] of table row rows[b] (attn_partial).
// SINKS: sinks [table rows, 3] holds each row's sink count, the sinks' page and the shift
// (SinkKeys); without, it is not read.
template <typename T, int D, int G, int HKV, int P, bool SINKS>
__device__ __forceinline__ void paged_attn_partial(const T* __restrict__ q,
                                                   const int* __restrict__ positions,
                                                   const int* __restrict__ rows,
                                                   const int* __restrict__ sinks,
                                                   const int* __restrict__ table, int width,
                                                   T* __restrict__ pool, int layer, int layers,
                                                   int window, float* __restrict__ ws,
                                                   int nsplit, float sm_scale, float theta) {
  const int kvh = blockIdx.y, b = blockIdx.z;
  const int* trow = table + static_cast<int64_t>(rows[b]) * width;
  const int64_t page_stride = static_cast<int64_t>(layers) * 2 * HKV * P * D;
  SinkKeys sink_keys{0, 0, 0};
  if (SINKS) {
    const int* srow = sinks + static_cast<int64_t>(rows[b]) * SINK_COLUMNS;
    sink_keys = SinkKeys{srow[0], srow[1] * page_stride, srow[2]};
  }
  attn_partial<T, D, G, HKV, false, SINKS>(
      q, positions[b], paged_rows<T, HKV, D, P>(pool, layer, layers, 0, kvh),
      paged_rows<T, HKV, D, P>(pool, layer, layers, 1, kvh),
      [=](int r) {
        return trow[(r / P) % width] * page_stride + static_cast<int64_t>(r % P) * D;
      },
      window, sink_keys, ws, nsplit, 1.f, theta, sm_scale);
}

// Pass 2 of paged_attn_partial: decode_attn_merge without the log-sum-exp.
template <typename T, int D>
__device__ __forceinline__ void paged_merge(const float* __restrict__ ws, int n, int nsplit,
                                            T* __restrict__ out) {
  decode_attn_merge<T, D>(ws, n, nsplit, out, nullptr);
}

// Tensor-core prefill attention over the owned cache (the keys of this chunk already appended
// by owned_append): q [n, HQ, D] rotated, row i at position p = len[0] + i sees keys
// j in [max(0, p - window + 1), p] (window 0: [0, p]). Grid (ceil(n / 64), HQ), 128 threads;
// the inner loop is prefill_attn_ragged's. Key tiles start at multiples of 64 positions and C is
// a multiple of 64, so a tile's 64 slots are contiguous.
template <int D, int G, int HKV, int BR = FA_BR>
__device__ __forceinline__ void prefill_attn_owned(const half* __restrict__ q,
                                                   const int* __restrict__ len, int n,
                                                   const half* __restrict__ state, int layer,
                                                   int cap, int window, half* __restrict__ out,
                                                   float sm_scale) {
  static_assert(D % 16 == 0 && D <= 128, "head_dim must be a multiple of 16, at most 128");
  constexpr int LD = D + 8, KC = D / 16, DB = D / 8, HQ = HKV * G;
  __shared__ __align__(128) half smem[(BR > 2 * FA_BC ? BR : 2 * FA_BC) * LD];
  half* ks = smem;
  half* vs = smem + FA_BC * LD;

  const int t = gridDim.x - 1 - static_cast<int>(blockIdx.x);  // the latest rows first
  const int h = blockIdx.y, kvh = h / G;
  const int base = len[0];
  const int row0 = t * BR;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;

  fa_load_rows<D, BR * 2>(smem, q + (static_cast<int64_t>(row0) * HQ + h) * D,
                          static_cast<int64_t>(HQ) * D, BR, n - row0, nullptr, 0.f, 0.f);
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();
  uint32_t qf[KC][4];
#pragma unroll
  for (int kc = 0; kc < KC; ++kc)
    ldmatrix_x4(qf[kc], smem + (warp * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LD + kc * 16 +
                            8 * (lane >> 4));
  __syncthreads();

  const int last_row = min(row0 + BR, n) - 1;
  const int kv_end = base + last_row + 1;  // exclusive, in positions
  int kv_begin = window > 0 ? max(0, base + row0 - window + 1) : 0;
  kv_begin = kv_begin / FA_BC * FA_BC;
  const int tiles = (kv_end - kv_begin + FA_BC - 1) / FA_BC;
  const half* kbase = owned_rows<const half, HKV, D>(state, layer, 0, kvh, cap);
  const half* vbase = owned_rows<const half, HKV, D>(state, layer, 1, kvh, cap);
  auto slot_of = [&](int j) { return static_cast<int64_t>(j % cap) * D; };

  const float qk_scale = sm_scale * 1.4426950408889634f;
  const int my_row = row0 + warp * 16 + gid;  // rows my_row and my_row + 8 of the chunk
  const int warp_first = base + row0 + warp * 16, warp_last = warp_first + 15;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[DB][4];
#pragma unroll
  for (int i = 0; i < DB; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  fa_walk_tiles<D>(
      qf, ks, vs, tiles, kv_begin, qk_scale,
      [&](int j0, bool is_v) {
        fa_load_rows<D, BR * 2>(is_v ? vs : ks, (is_v ? vbase : kbase) + slot_of(j0), D, FA_BC,
                                kv_end - j0, nullptr, 0.f, 0.f);
      },
      [&](int j0) {
        return j0 + FA_BC - 1 > warp_first || (window > 0 && j0 < warp_last - window + 1);
      },
      [&](int j, int hf) {
        const int p = base + my_row + 8 * hf;  // this row's position: sees [p - window + 1, p]
        return j > p || (window > 0 && j <= p - window);
      },
      m, l, o);

#pragma unroll
  for (int half_ = 0; half_ < 2; ++half_) {
    float den = l[half_];
    den += __shfl_xor_sync(0xffffffffu, den, 1);
    den += __shfl_xor_sync(0xffffffffu, den, 2);
    const int row = my_row + 8 * half_;
    if (row >= n) continue;
    const float inv = den > 0.f ? 1.f / den : 0.f;
    half* orow = out + (static_cast<int64_t>(row) * HQ + h) * D + 2 * tig;
#pragma unroll
    for (int db = 0; db < DB; ++db)
      *reinterpret_cast<uint32_t*>(orow + db * 8) =
          pack_half2(o[db][2 * half_] * inv, o[db][2 * half_ + 1] * inv);
  }
}

// 2^x on the SFU (flush-to-zero; 2^-inf = 0)
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- Hopper (sm_90a) prefill attention over the owned cache: TMA, warpgroup MMA ----
// prefill_attn_owned's contract (q [n, HQ, 128] rotated; row i at position p = len[0] + i sees
// the keys j in [max(0, p - window + 1), p], window 0: [0, p]) on Hopper's tensor cores. A CTA
// owns FW_BM = 128 query rows of one head: warp 8 is the producer, whose lane 0 copies each
// tile of FW_BN = 128 keys and its values from the cache with TMA (four 64 x 64 boxes each, so
// a tile may wrap the ring at any multiple of 64 slots) into one of FW_STAGES stages, written
// with the 128-byte swizzle; warps 0-7 are two consumer warpgroups of 64 rows. A consumer holds
// its Q (loaded once, swizzled by hand) in shared memory, computes S = Q K^T with wgmma
// m64n128k16 (both operands in shared memory), the online softmax on the accumulators in
// base 2, and O += P V with P in registers (the accumulator layout is wgmma's A-fragment
// layout) and V read N-major (transposed) by the MMA. Each stage has full/empty mbarriers per
// K and per V, so the copies of the next tiles overlap both products. Keys past a row's
// position read what the ring holds there (zeros or an older token: finite) and are masked;
// tiles that no row of a warpgroup sees are skipped by it.
constexpr int FW_D = 128, FW_BM = 128, FW_BN = 128, FW_STAGES = 2, FW_THREADS = 384;
constexpr int FW_Q_BYTES = FW_BM * FW_D * 2, FW_KV_BYTES = FW_BN * FW_D * 2;
// registers per thread after setmaxnreg: 128 x 24 + 256 x 240 <= 65536 (three warpgroups)
constexpr int FW_PRODUCER_REGS = 24, FW_CONSUMER_REGS = 240;
// Q, the K and V stages, 1024 bytes to align them for the swizzle, and 4 x FW_STAGES mbarriers
constexpr int FW_SMEM_BYTES = FW_Q_BYTES + 2 * FW_STAGES * FW_KV_BYTES + 1024 + 4 * FW_STAGES * 8;

// Matrix descriptor of an N-major (transposed) operand with the 128-byte swizzle: 8-row atoms
// of 1024 bytes along K, blocks of 64 N columns `lbo` bytes apart.
__device__ __forceinline__ uint64_t wg_desc_mn(const half* p, uint32_t lbo) {
  const uint64_t addr = static_cast<uint64_t>(__cvta_generic_to_shared(p));
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{lbo >> 4} << 16) | (uint64_t{1024 >> 4} << 32) |
         (uint64_t{1} << 62);
}

// The TMA descriptor prefill_attn_owned_wgmma reads: the whole cache storage [layers, 2, HKV,
// cap, 128] as rows of 128 halves, in boxes of 64 rows x 64 columns. One warp, its own launch.
__device__ __forceinline__ void prefill_attn_owned_map(const half* state, int rows, void* maps) {
  tma_make_map(maps, state, rows, FW_D, 64);
}

// Launch: grid (ceil(n / FW_BM), HQ), FW_THREADS threads, FW_SMEM_BYTES of dynamic shared
// memory at smem_raw; maps from prefill_attn_owned_map on the same storage.
template <int G, int HKV>
__device__ __forceinline__ void prefill_attn_owned_wgmma(const void* __restrict__ maps,
                                                         const half* __restrict__ q,
                                                         const int* __restrict__ len, int n,
                                                         int layer, int cap, int window,
                                                         half* __restrict__ out, float sm_scale,
                                                         half* smem_raw) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = FW_D, HQ = HKV * G, BOX = 64 * 64;  // halves in one 64 x 64 box
  const unsigned smem_base = smem_u32(smem_raw);
  half* qs = smem_raw + ((1024 - smem_base % 1024) % 1024) / 2;
  half* ks = qs + FW_Q_BYTES / 2;                    // stage s at ks + s * FW_KV_BYTES / 2
  half* vs = ks + FW_STAGES * FW_KV_BYTES / 2;
  uint64_t* kfull = reinterpret_cast<uint64_t*>(vs + FW_STAGES * FW_KV_BYTES / 2);
  uint64_t* kempty = kfull + FW_STAGES;
  uint64_t* vfull = kempty + FW_STAGES;
  uint64_t* vempty = vfull + FW_STAGES;

  const int t = gridDim.x - 1 - static_cast<int>(blockIdx.x);  // the latest rows first
  const int h = blockIdx.y, kvh = h / G;
  const int base = len[0], row0 = t * FW_BM;
  // the warp index broadcast from lane 0: provably uniform, so the compiler sees no divergence
  // between the warpgroups' paths (it would serialize the wgmma pipeline otherwise)
  const int tid = threadIdx.x, warp = __shfl_sync(0xffffffffu, tid >> 5, 0), lane = tid & 31;
  const int last_row = min(row0 + FW_BM, n) - 1;
  const int kv_end = base + last_row + 1;  // exclusive, in positions
  int kv_begin = window > 0 ? max(0, base + row0 - window + 1) : 0;
  kv_begin = kv_begin / 64 * 64;  // 64 slots of a box are contiguous in the ring
  const int tiles = (kv_end - kv_begin + FW_BN - 1) / FW_BN;

  if (tid == 0) {
    for (int s = 0; s < FW_STAGES; ++s) {
      mbar_init(kfull + s, 1);
      mbar_init(vfull + s, 1);
      mbar_init(kempty + s, 2);  // one arrive per consumer warpgroup
      mbar_init(vempty + s, 2);
    }
  }
  __syncthreads();

  if (warp >= 8) {  // producer warpgroup: lane 0 of warp 8 copies; registers to the consumers
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(FW_PRODUCER_REGS));
    if (warp == 8 && lane == 0) {
      asm volatile(
          "fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n"
          "cp.async.bulk.commit_group;\n"
          "cp.async.bulk.wait_group.read 0;\n" ::"l"(maps)
          : "memory");
      const int krow = (layer * 2 * HKV + kvh) * cap, vrow = krow + HKV * cap;
      for (int it = 0; it < tiles; ++it) {
        const int s = it % FW_STAGES, j0 = kv_begin + it * FW_BN;
        const uint32_t wait_parity = ((it / FW_STAGES) - 1) & 1;
        for (int kind = 0; kind < 2; ++kind) {
          uint64_t* full = (kind == 0 ? kfull : vfull) + s;
          if (it >= FW_STAGES) mbar_wait((kind == 0 ? kempty : vempty) + s, wait_parity);
          half* dst = (kind == 0 ? ks : vs) + s * FW_KV_BYTES / 2;
          const int row = kind == 0 ? krow : vrow;
          mbar_expect_tx(full, FW_KV_BYTES);
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {  // keys j0 + 64 hh ..: contiguous slots
            const int slot = (j0 + 64 * hh) % cap;
#pragma unroll
            for (int c = 0; c < 2; ++c)  // columns 64 c ..: box [c][64 hh + r]
              tma_load(dst + c * FW_BN * 64 + hh * BOX, maps, c * 64, row + slot, full);
          }
        }
      }
    }
    return;
  }

  // consumers: warpgroup wg owns rows row0 + 64 wg .. + 63; Q in two 64-column boxes
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(FW_CONSUMER_REGS));
  const int wg = warp >> 2, gid = lane >> 2, tig = lane & 3;
  half* qw = qs + wg * 2 * BOX;
  for (int i = tid & 127; i < 64 * (D / 8); i += 128) {
    const int r = i / (D / 8), ch = i % (D / 8), row = row0 + 64 * wg + r;
    const bool ok = row < n;
    half* dst = qw + (ch / 8) * BOX + r * 64 + (((ch % 8) ^ (r & 7)) * 8);  // 128-byte swizzle
    cp_async16(dst, q + (static_cast<int64_t>(ok ? row : 0) * HQ + h) * D + ch * 8, ok);
  }
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to the MMA
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");

  const float qk_scale = sm_scale * 1.4426950408889634f;  // scores in base 2
  const int my_row = row0 + 64 * wg + 16 * (warp & 3) + gid;  // rows my_row, my_row + 8
  const int wg_first = base + row0 + 64 * wg, wg_last = min(wg_first + 63, kv_end - 1);
  const int warp_first = wg_first + 16 * (warp & 3), warp_last = warp_first + 15;
  const bool idle = row0 + 64 * wg >= n;  // no row of this warpgroup is in the chunk
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float o[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) o[i] = 0.f;

  // the tiles this warpgroup computes, [lo, hi): the others it only passes on
  int lo = tiles, hi = 0;
  if (!idle) {
    lo = window > 0 ? max(0, (wg_first - window + 1 - kv_begin) / FW_BN) : 0;
    hi = min(tiles, (wg_last - kv_begin) / FW_BN + 1);
  }
  auto pass = [&](int it) {
    const int s = it % FW_STAGES;
    const uint32_t parity = (it / FW_STAGES) & 1;
    mbar_wait(kfull + s, parity);
    if ((tid & 127) == 0) mbar_arrive(kempty + s);
    mbar_wait(vfull + s, parity);
    if ((tid & 127) == 0) mbar_arrive(vempty + s);
  };
  // S = Q K^T of tile it into sc (issued, not waited for)
  auto issue_s = [&](int it, float* sc) {
    const half* kt = ks + (it % FW_STAGES) * FW_KV_BYTES / 2;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_64x128x16(sc, wg_desc(qw + (kk / 4) * BOX + (kk % 4) * 16),
                      wg_desc(kt + (kk / 4) * FW_BN * 64 + (kk % 4) * 16), kk);
  };
  // O += P V of tile it (issued, not waited for)
  auto issue_pv = [&](int it, uint32_t (*pa)[4]) {
    const half* vt = vs + (it % FW_STAGES) * FW_KV_BYTES / 2;
#pragma unroll
    for (int kc = 0; kc < FW_BN / 16; ++kc)
      wgmma_64x128x16_rs(o, pa[kc], wg_desc_mn(vt + kc * 16 * 64, FW_BN * 128));
  };
  // masks, the online softmax of tile it's scores in place (probabilities out), alpha per row;
  // the running maximum m is kept in raw score units, the scale folded into each exponent
  auto softmax = [&](int it, float* sc, float* alpha) {
    const int j0 = kv_begin + it * FW_BN;
    const bool edge = j0 + FW_BN - 1 > warp_first || (window > 0 && j0 <= warp_last - window);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int p = base + my_row + 8 * hf;  // this row's position
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < FW_BN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = j0 + 8 * j + 2 * tig + e;
          if (edge && (key > p || (window > 0 && key <= p - window)))
            sc[4 * j + 2 * hf + e] = -INFINITY;
          mx = fmaxf(mx, sc[4 * j + 2 * hf + e]);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[hf], mx);
      const float ref = m_new == -INFINITY ? 0.f : m_new * qk_scale;
      alpha[hf] = ex2_approx(m[hf] * qk_scale - ref);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < FW_BN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = ex2_approx(fmaf(sc[4 * j + 2 * hf + e], qk_scale, -ref));
          sc[4 * j + 2 * hf + e] = pr;
          sum += pr;
        }
      }
      l[hf] = l[hf] * alpha[hf] + sum;
      m[hf] = m_new;
    }
  };
  auto rescale_and_pack = [&](const float* sc, const float* alpha, uint32_t (*pa)[4]) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[4 * j] *= alpha[0];
      o[4 * j + 1] *= alpha[0];
      o[4 * j + 2] *= alpha[1];
      o[4 * j + 3] *= alpha[1];
    }
#pragma unroll
    for (int kc = 0; kc < FW_BN / 16; ++kc) {
      pa[kc][0] = pack_half2(sc[8 * kc + 0], sc[8 * kc + 1]);
      pa[kc][1] = pack_half2(sc[8 * kc + 2], sc[8 * kc + 3]);
      pa[kc][2] = pack_half2(sc[8 * kc + 4], sc[8 * kc + 5]);
      pa[kc][3] = pack_half2(sc[8 * kc + 6], sc[8 * kc + 7]);
    }
  };

  const int ahead = min(lo, tiles);  // tiles before this warpgroup's first
  for (int it = 0; it < ahead; ++it) pass(it);
  if (lo < hi) {
    // the pipeline: the scores of tile it + 1 are computed while P V of tile it runs
    float sc[64], alpha[2];
    uint32_t pa[FW_BN / 16][4];
    mbar_wait(kfull + lo % FW_STAGES, (lo / FW_STAGES) & 1);
    wgmma_fence();
    issue_s(lo, sc);
    wgmma_commit();
    wgmma_wait<0>();
    if ((tid & 127) == 0) mbar_arrive(kempty + lo % FW_STAGES);
    softmax(lo, sc, alpha);
    rescale_and_pack(sc, alpha, pa);
    for (int it = lo + 1; it < hi; ++it) {
      const int s = it % FW_STAGES, sp = (it - 1) % FW_STAGES;
      mbar_wait(kfull + s, (it / FW_STAGES) & 1);
      wgmma_fence();
      issue_s(it, sc);
      wgmma_commit();
      mbar_wait(vfull + sp, ((it - 1) / FW_STAGES) & 1);
      wgmma_fence();  // P and the rescaled O, written since the last MMA
      issue_pv(it - 1, pa);
      wgmma_commit();
      wgmma_wait<1>();  // the scores have landed; P V of the tile before still runs
      softmax(it, sc, alpha);
      wgmma_wait<0>();
      if ((tid & 127) == 0) {  // only once nothing is in flight: no divergence under a wgmma
        mbar_arrive(kempty + s);
        mbar_arrive(vempty + sp);
      }
      rescale_and_pack(sc, alpha, pa);
    }
    mbar_wait(vfull + (hi - 1) % FW_STAGES, ((hi - 1) / FW_STAGES) & 1);
    wgmma_fence();
    issue_pv(hi - 1, pa);
    wgmma_commit();
    wgmma_wait<0>();
    if ((tid & 127) == 0) mbar_arrive(vempty + (hi - 1) % FW_STAGES);
  }
  for (int it = lo < hi ? hi : ahead; it < tiles; ++it) pass(it);

  if (idle) return;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float den = l[hf];
    den += __shfl_xor_sync(0xffffffffu, den, 1);
    den += __shfl_xor_sync(0xffffffffu, den, 2);
    const int row = my_row + 8 * hf;
    if (row >= n) continue;
    const float inv = den > 0.f ? 1.f / den : 0.f;
    half* orow = out + (static_cast<int64_t>(row) * HQ + h) * D + 2 * tig;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<uint32_t*>(orow + 8 * j) =
          pack_half2(o[4 * j + 2 * hf] * inv, o[4 * j + 2 * hf + 1] * inv);
  }
#else
  asm volatile("trap;");
#endif
}

// Pass 2 of owned_attn_partial: merges the NSPLIT partials of each (row, head). Grid (H_qo,
// rows), D threads. The split count is a constant, so a thread's loads of up to 32 splits are
// all in flight at once (decode_attn_merge walks a runtime count in two passes).
template <typename T, int D, int NSPLIT>
__device__ __forceinline__ void owned_merge(const float* __restrict__ ws, T* __restrict__ out) {
  constexpr int CH = NSPLIT < 32 ? NSPLIT : 32;
  static_assert(NSPLIT % CH == 0, "split count: at most 32 or a multiple of 32");
  const int h = blockIdx.x, b = blockIdx.y, h_qo = gridDim.x, rows = gridDim.y, d = threadIdx.x;
  const int64_t n_out = static_cast<int64_t>(rows) * h_qo * NSPLIT * D;
  const int64_t slot0 = (static_cast<int64_t>(b) * h_qo + h) * NSPLIT;
  float mx = -INFINITY, acc = 0.f, den = 0.f;
#pragma unroll
  for (int c = 0; c < NSPLIT; c += CH) {
    float m[CH], dn[CH], o[CH];
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      m[i] = ws[n_out + (slot0 + c + i) * 2];
      dn[i] = ws[n_out + (slot0 + c + i) * 2 + 1];
      o[i] = ws[(slot0 + c + i) * D + d];
    }
    float cm = mx;
#pragma unroll
    for (int i = 0; i < CH; ++i) cm = fmaxf(cm, m[i]);
    if (cm == -INFINITY) continue;  // no key in these splits yet
    const float scale = exp2f(mx - cm);
    acc *= scale;
    den *= scale;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const float w = exp2f(m[i] - cm);
      acc += w * o[i];
      den += w * dn[i];
    }
    mx = cm;
  }
  store(out + (static_cast<int64_t>(b) * h_qo + h) * D + d, den > 0.f ? acc / den : 0.f);
}

// The end of a decode step: greedy token (argmax_rows) and the owned cache's length + 1.
__device__ __forceinline__ void argmax_advance(const float* __restrict__ x, int n,
                                               int32_t* __restrict__ out, int* __restrict__ len) {
  argmax_rows(x, n, out);
  if (blockIdx.x == 0 && threadIdx.x == 0) len[0] += 1;
}


// ---- Sampling on the device (mistral_compile/model/sampler.py; numpy twin in
// runtime/sampling_ref.py). One CTA of SAMPLE_THREADS per row. ----
constexpr int SAMPLE_THREADS = 1024;
constexpr int OPT_TEMPERATURE = 0, OPT_TOP_P = 1, OPT_TOP_K = 2, OPT_MIN_P = 3,
              OPT_REPETITION = 4, OPT_PRESENCE = 5, OPT_FREQUENCY = 6, NUM_OPTIONS = 7;

__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// The noise of token v at output index `step` of a request with `seed`: Exp(1), from a
// counter-based hash, so a request draws the same numbers in any batch.
__device__ __forceinline__ float exp_noise(uint32_t seed, uint32_t step, uint32_t v) {
  const uint32_t h = fmix32(seed ^ fmix32(step ^ fmix32(v * 0x9E3779B1u + 0x7F4A7C15u)));
  const float u = (static_cast<float>(h >> 8) + 0.5f) * (1.f / 16777216.f);
  return -logf(u);
}

template <typename Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float* sm) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) sm[threadIdx.x >> 5] = v;
  __syncthreads();
  v = sm[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) v = op(v, sm[w]);
  return v;
}

// Penalties and biases: logits [B, V] copied to work (sample_copy), then for entry e = (row,
// token, generated count, seen in prompt or output) of adj [E, 4] with bias[e]: + bias, the
// repetition penalty (HF: divide a positive logit, multiply a negative one) where seen, and
// OpenAI's presence and frequency penalties on generated counts. One thread per entry (the
// entries of a row name distinct tokens).
__device__ __forceinline__ void sample_copy(const float* __restrict__ logits, int64_t total,
                                            float* __restrict__ work) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride)
    work[i] = logits[i];
}

__device__ __forceinline__ void sample_adjust_entries(const float* __restrict__ options,
                                                      const int* __restrict__ adj,
                                                      const float* __restrict__ bias,
                                                      int entries, int vocab,
                                                      float* __restrict__ work) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= entries) return;
  const int row = adj[e * 4], token = adj[e * 4 + 1], count = adj[e * 4 + 2],
            seen = adj[e * 4 + 3];
  const float* opt = options + static_cast<int64_t>(row) * NUM_OPTIONS;
  float x = work[static_cast<int64_t>(row) * vocab + token] + bias[e];
  const float rep = opt[OPT_REPETITION];
  if (seen && rep != 1.f) x = x > 0.f ? x / rep : x * rep;
  if (count > 0) x -= opt[OPT_PRESENCE] + opt[OPT_FREQUENCY] * static_cast<float>(count);
  work[static_cast<int64_t>(row) * vocab + token] = x;
}

// One row per CTA: the token (greedy: the first largest adjusted logit; else temperature,
// top-k, top-p, min-p, then the largest e_i / E_i, E_i ~ Exp(1), which draws i with
// probability proportional to e_i among the kept tokens) and its logprob under the raw logits.
// Thresholds are exact: bisection over the bit patterns of e_i = exp((x_i - max) / T) in
// [0, 1] (31 steps each), so top-k keeps every value at least the k-th largest and top-p the
// tokens whose strictly larger mass is under top_p of the kept mass (Hugging Face's rule).
__device__ __forceinline__ void sample_rows(const float* __restrict__ logits,
                                            float* __restrict__ work, int vocab,
                                            const float* __restrict__ options,
                                            const int* __restrict__ rng,
                                            int32_t* __restrict__ token_out,
                                            float* __restrict__ logprob_out) {
  __shared__ float sm[32];
  __shared__ int smi[32];
  const int row = blockIdx.x, tid = threadIdx.x;
  const float* raw = logits + static_cast<int64_t>(row) * vocab;
  float* x = work + static_cast<int64_t>(row) * vocab;
  const float* opt = options + static_cast<int64_t>(row) * NUM_OPTIONS;
  const float temperature = opt[OPT_TEMPERATURE];
  auto fmax_op = [](float a, float b) { return fmaxf(a, b); };
  auto sum_op = [](float a, float b) { return a + b; };
  int token;
  if (temperature <= 0.f) {
    argmax_rows(work, vocab, token_out);  // row blockIdx.x of work
    __syncthreads();
    token = token_out[row];
  } else {
    float m = row_fold(x, vocab, -INFINITY, [](float& a, float v, int) { a = fmaxf(a, v); });
    m = block_reduce(m, fmax_op, sm);
    const float inv_t = 1.f / temperature;
    {
      int i = tid;
      const int step = blockDim.x;
      for (; i + (ROW_UNROLL - 1) * step < vocab; i += ROW_UNROLL * step) {
        float v[ROW_UNROLL];
#pragma unroll
        for (int u = 0; u < ROW_UNROLL; ++u) v[u] = x[i + u * step];
#pragma unroll
        for (int u = 0; u < ROW_UNROLL; ++u) x[i + u * step] = __expf((v[u] - m) * inv_t);
      }
      for (; i < vocab; i += step) x[i] = __expf((x[i] - m) * inv_t);
    }
    __syncthreads();
    float t = 0.f;  // keep e_i >= t
    const int top_k = static_cast<int>(opt[OPT_TOP_K]);
    if (top_k > 0 && top_k < vocab) {
      int lo = 0, hi = 0x3F800001;  // count(e >= lo) >= k, count(e >= hi) < k
      while (hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        const float f = __int_as_float(mid);
        float c = row_fold(x, vocab, 0.f, [f](float& a, float v, int) { a += v >= f ? 1.f : 0.f; });
        c = block_reduce(c, sum_op, sm);
        if (c >= static_cast<float>(top_k)) lo = mid; else hi = mid;
      }
      t = __int_as_float(lo);
    }
    const float top_p = opt[OPT_TOP_P];
    if (top_p < 1.f) {
      float z = row_fold(x, vocab, 0.f, [t](float& a, float v, int) { a += v >= t ? v : 0.f; });
      z = block_reduce(z, sum_op, sm);
      int lo = -1, hi = 0x3F800000;  // mass(e > lo) >= p z, mass(e > hi) < p z
      while (hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        const float f = __int_as_float(mid);
        float mass = row_fold(x, vocab, 0.f, [f, t](float& a, float v, int) {
          a += v > f && v >= t ? v : 0.f;
        });
        mass = block_reduce(mass, sum_op, sm);
        if (mass < top_p * z) hi = mid; else lo = mid;
      }
      t = fmaxf(t, __int_as_float(hi));
    }
    t = fmaxf(t, opt[OPT_MIN_P]);
    const uint32_t seed = static_cast<uint32_t>(rng[row * 2]),
                   step = static_cast<uint32_t>(rng[row * 2 + 1]);
    const ArgBest drawn = row_fold(x, vocab, ArgBest{-1.f, vocab},
                                   [t, seed, step](ArgBest& a, float v, int i) {
      if (v >= t && v > 0.f) argmax_better(a.v, a.i, v / exp_noise(seed, step, i), i);
    });
    float best = drawn.v;
    int bi = drawn.i;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      argmax_better(best, bi, __shfl_xor_sync(0xffffffffu, best, o),
                    __shfl_xor_sync(0xffffffffu, bi, o));
    __syncthreads();
    if ((tid & 31) == 0) {
      sm[tid >> 5] = best;
      smi[tid >> 5] = bi;
    }
    __syncthreads();
    best = sm[0];
    bi = smi[0];
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) argmax_better(best, bi, sm[w], smi[w]);
    token = bi < vocab ? bi : 0;
  }
  // the logprob of the token under the raw logits
  float m = row_fold(raw, vocab, -INFINITY, [](float& a, float v, int) { a = fmaxf(a, v); });
  m = block_reduce(m, fmax_op, sm);
  float z = row_fold(raw, vocab, 0.f, [m](float& a, float v, int) { a += __expf(v - m); });
  z = block_reduce(z, sum_op, sm);
  if (tid == 0) {
    token_out[row] = token;
    logprob_out[row] = raw[token] - m - logf(z);
  }
}

// The k (<= 20) most likely tokens of each row under the raw logits and their logprobs, by k
// passes of a first-index argmax that skips the ones already taken. One CTA per row.
__device__ __forceinline__ void top_logprobs_rows(const float* __restrict__ logits, int vocab,
                                                  int k, int32_t* __restrict__ ids,
                                                  float* __restrict__ values, int width) {
  __shared__ float sm[32];
  __shared__ int smi[32];
  __shared__ int taken[32];
  const int row = blockIdx.x, tid = threadIdx.x;
  const float* raw = logits + static_cast<int64_t>(row) * vocab;
  auto fmax_op = [](float a, float b) { return fmaxf(a, b); };
  auto sum_op = [](float a, float b) { return a + b; };
  float m = row_fold(raw, vocab, -INFINITY, [](float& a, float v, int) { a = fmaxf(a, v); });
  m = block_reduce(m, fmax_op, sm);
  float z = row_fold(raw, vocab, 0.f, [m](float& a, float v, int) { a += __expf(v - m); });
  z = block_reduce(z, sum_op, sm);
  const float lse = m + logf(z);
  for (int j = 0; j < k; ++j) {
    const ArgBest top = row_fold(raw, vocab, ArgBest{-INFINITY, vocab},
                                 [j](ArgBest& a, float val, int i) {
      bool skip = false;
      for (int q = 0; q < j; ++q) skip |= taken[q] == i;
      if (!skip) argmax_better(a.v, a.i, val, i);
    });
    float v = top.v;
    int bi = top.i;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      argmax_better(v, bi, __shfl_xor_sync(0xffffffffu, v, o), __shfl_xor_sync(0xffffffffu, bi, o));
    __syncthreads();
    if ((tid & 31) == 0) {
      sm[tid >> 5] = v;
      smi[tid >> 5] = bi;
    }
    __syncthreads();
    if (tid == 0) {
      float bv = sm[0];
      int bb = smi[0];
      for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) argmax_better(bv, bb, sm[w], smi[w]);
      taken[j] = bb;
      ids[static_cast<int64_t>(row) * width + j] = bb < vocab ? bb : 0;
      values[static_cast<int64_t>(row) * width + j] = bv - lse;
    }
    __syncthreads();
  }
}

}  // namespace mc
