// mistral_compile's own CUDA device code, prepended to TVM's generated CUDA C before nvcc.
//
// TIR stubs (mistral_compile/model/kernels.py) fix each kernel's launch shape and buffers and
// call one of these __device__ functions with T.call_extern, so TVM still owns the launches,
// the arguments and the workspace while the inner loops are written by hand here.
#pragma once
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

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
  const int64_t n_out = static_cast<int64_t>(batch) * h_qo * nsplit * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    int g = i / D, d = i % D;
    float mx = -INFINITY;
#pragma unroll
    for (int r = 0; r < GROUPS; ++r) mx = fmaxf(mx, sm_m[r][g]);
    float acc = 0.f, den = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int r = 0; r < GROUPS; ++r) {
        float w = exp2f(sm_m[r][g] - mx);
        acc += w * sm_o[r][g][d];
        den += w * sm_d[r][g];
      }
    }
    int64_t slot = (static_cast<int64_t>(b) * h_qo + kvh * G + g) * nsplit + split;
    ws[slot * D + d] = acc;
    if (d == 0) {
      ws[n_out + slot * 2] = mx;
      ws[n_out + slot * 2 + 1] = den;
    }
  }
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
  if (d == 0) lse[static_cast<int64_t>(b) * h_qo + h] = den > 0.f ? mx + log2f(den) : -5e4f;
}

// Batch-1 GEMV, y = W x: W is [n, K] row-major, x has K elements. 256 threads, one warp per
// output row: x is staged in shared memory once per CTA, each lane streams 16-byte slices of
// its row (the loop over the compile-time K unrolls so several loads are in flight), products
// accumulate in float32 and are reduced across the warp.
template <typename T, typename OutT, int K>
__device__ __forceinline__ void gemv(const T* __restrict__ x, const T* __restrict__ w,
                                     OutT* __restrict__ y, int n) {
  constexpr int VEC = Vec<T>::N;
  constexpr int STEP = 32 * VEC;
  constexpr int WARPS = 8;
  static_assert(K % VEC == 0, "K must be a multiple of the 16-byte vector");
  __shared__ __align__(16) T xs[K];
  for (int i = threadIdx.x * VEC; i < K; i += WARPS * 32 * VEC) {
    *reinterpret_cast<uint4*>(xs + i) = *reinterpret_cast<const uint4*>(x + i);
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + warp;
  if (row >= n) return;
  const T* wr = w + static_cast<int64_t>(row) * K + lane * VEC;
  const T* xr = xs + lane * VEC;
  float acc = 0.f;
#pragma unroll 8
  for (int it = 0; it < K / STEP; ++it) {
    float wf[VEC], xf[VEC];
    load16(wr + it * STEP, wf);
    load16_shared(xr + it * STEP, xf);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc += wf[e] * xf[e];
  }
  if (K % STEP != 0 && (K / STEP) * STEP + lane * VEC < K) {
    float wf[VEC], xf[VEC];
    load16(wr + (K / STEP) * STEP, wf);
    load16_shared(xr + (K / STEP) * STEP, xf);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc += wf[e] * xf[e];
  }
#pragma unroll
  for (int step = 16; step >= 1; step /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, step);
  if (lane == 0) store(y + row, acc);
}

// Batch-1 GEMV over q4f16_1 weights (weights/quantize.py): qw is [n, K/8] uint32, qs is
// [n, K/32] half. Lanes read consecutive words (8 weights each, coalesced) and the matching 16
// bytes of x from shared memory. A word's nibbles 2i, 2i+1 sit at bits 4i and 16+4i, so OR-ing
// them into the exponent of 1024.0 gives a half2 (1024 + q) pair in two operations; subtracting
// 1031 leaves q - 7 exactly. The 8 products accumulate in half2, each word's sum in float32.
template <typename OutT, int K>
__device__ __forceinline__ void gemv_q4(const half* __restrict__ x,
                                        const uint32_t* __restrict__ qw,
                                        const half* __restrict__ qs, OutT* __restrict__ y,
                                        int n) {
  constexpr int WORDS = K / 8;
  constexpr int WARPS = 8;
  static_assert(K % 32 == 0, "K must be a multiple of the group size 32");
  __shared__ __align__(16) half xs[K];
  for (int i = threadIdx.x * 8; i < K; i += WARPS * 32 * 8) {
    *reinterpret_cast<uint4*>(xs + i) = *reinterpret_cast<const uint4*>(x + i);
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + warp;
  if (row >= n) return;
  const uint32_t* wr = qw + static_cast<int64_t>(row) * WORDS;
  const half* sr = qs + static_cast<int64_t>(row) * (K / 32);
  const half2 bias = __float2half2_rn(1031.f);
  float acc = 0.f;
  auto word = [&](int wi) {
    uint32_t w = __ldg(wr + wi);
    float s = __half2float(__ldg(sr + wi / 4));
    uint4 xr = *reinterpret_cast<const uint4*>(xs + wi * 8);
    const half2* xh = reinterpret_cast<const half2*>(&xr);
    half2 sum = __float2half2_rn(0.f);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t v = ((w >> (4 * i)) & 0x000F000Fu) | 0x64006400u;
      sum = __hfma2(__hsub2(*reinterpret_cast<half2*>(&v), bias), xh[i], sum);
    }
    float2 f = __half22float2(sum);
    acc += s * (f.x + f.y);
  };
#pragma unroll 8
  for (int it = 0; it < WORDS / 32; ++it) word(it * 32 + lane);
  if (WORDS % 32 != 0 && (WORDS / 32) * 32 + lane < WORDS) word((WORDS / 32) * 32 + lane);
#pragma unroll
  for (int step = 16; step >= 1; step /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, step);
  if (lane == 0) store(y + row, acc);
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

}  // namespace mc
