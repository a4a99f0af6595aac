// weighted_adv_loss_v2: a second CUDA implementation of the fused weighted adversarial loss, next to
// weighted_adv_loss.cu (which stays the reference GPU kernel). Same contract (../weighted_adv_loss.cpp:
// the CPU kernel and the rules; docs/METHOD.md §1): loss = mean(w * bce) as a () fp32 tensor and dL/dz
// for an upstream gradient of 1, fp32, shaped like disc_logits. The rewrite follows
// shared/perf/gpu-path-review-2026-12-07.md §3, whose ncu excerpt showed the first kernel latency-bound
// (DRAM 36.6%, SM 63%): one scalar load in flight per channel and thread, 41 MUFU ops per pixel.
//
// What changed, and why:
// - One forward launch, after a memset of its counters on the stream (4 bytes; 4 * (1 + N*h) with a
//   low-res D map of height h). The last block to finish (an atomic ticket after __threadfence) sums
//   the per-block partials in block order, so the loss has the same bits on every run of a shape,
//   without the second single-block launch of the first kernel.
// - Several pixels per thread with 16-byte loads, decided at launch from the strides and the data
//   pointers (weighted_adv_loss_v2_fwd_cuda): NCHW, 8 bf16/fp16 or 4 fp32 consecutive pixels of one
//   channel per load; channels_last, the same pixels' C channels are 16*C contiguous bytes, C aligned
//   16-byte loads. At C = 19 that is 19 x 16 B in flight per thread instead of ~8 B. Anything else (odd
//   H*W, sliced planes, a misaligned view) takes the scalar path, 4 pixels per thread.
// - C is a template parameter for C = 19 (Cityscapes): the logits sit in registers, every load is
//   issued before the first use, and the softmax takes the max first, then one __expf per channel:
//   19 + 3 MUFU exps per pixel instead of 38 + 3. Other C: a loop with one __expf per channel
//   (online rescaling only when a new maximum appears).
// - A low-resolution D map's gradient is folded without a full-resolution scratch buffer and without
//   atomics on floats: per-block column bins (as the CPU kernel does per row), then each low-res row
//   is folded by whichever block completes its last contributing bin (a per-row counter). See
//   column_bins and fold_finished_rows.
// - The backward is its own op (weighted_adv_loss_v2_bwd): fp32 dL/dz times the device scalar upstream
//   gradient, rounded once to D's dtype, 8 elements per thread with 16-byte loads and stores.
//
// Nothing here syncs the host or copies host memory: buffers come from the caching allocator on the
// current stream and the counters are zeroed by cudaMemsetAsync on that stream, so the op can be
// captured in a CUDA graph.

// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers the bare toolkit may lack.
// Narrow ATen headers, not <torch/all.h>, which was most of the first kernel's compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>

#include "../weighted_adv_loss.h"

namespace pwda_fast {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// The scalar path's pixels per thread: 4 x 19 independent loads in flight at C = 19.
constexpr int kScalarPixels = 4;
constexpr int kBwdPerThread = 8;  // fp32 in: two 16-byte loads; bf16/fp16 out: one 16-byte store

enum class Layout { kNchwVec, kClVec, kScalar };

// How a D / D_aux map is read at an output pixel: strided element, one 16-byte load per group of
// pixels (a full-size map whose (H, W) plane is contiguous and aligned like seg's), or bilinear.
enum MapMode : int { kMapStrided = 0, kMapVec = 1, kMapUp = 2 };

// One axis of an align_corners=True upsampling from `in` to `out` samples; in == out is the identity.
// ratio = (in - 1) / (out - 1) in float, 0 when out == 1 (aten's area_pixel_compute_scale).
struct Axis {
  int in, out;
  float ratio;
};

struct MapDesc {
  int64_t sn, sh, sw;
  Axis y, x;
  int mode;
};

struct Params {
  int64_t pixels, HW;
  int H, W, C;
  int64_t seg_sn, seg_sc, seg_sh, seg_sw;
  MapDesc disc, aux;
  float label, sign, threshold, floor, mu, inv_count;  // sign = 1 - 2 * label
  double inv_count_d;
  bool narrow;   // pixels < 2^31: (n, h, w) from 32-bit divisions (64-bit ones are ~70 instructions)
  bool disc_up;  // disc is low-resolution: dL/dz goes through bins and the row fold
  int64_t pieces;  // most blocks one output row is split over: the bins' middle dimension
  int bin_lanes, fold_lanes;
};

struct Buffers {
  float* grad;              // (N, 1, h, w) fp32: the op's dL/dz
  float* bins;              // (N * H, pieces, w) fp32 when disc_up, else unused
  double* partial;          // (blocks,) per-block sums of w * bce
  unsigned int* counters;   // [0]: the ticket; [1 + n * h + j]: blocks done with low-res row (n, j)
  float* loss;              // ()
};

// aten's compute_source_index_and_lambda for align_corners=True, as in weighted_adv_loss.cu and the
// CPU kernel: output index x reads inputs i0, i1 with weight l1 on i1. __fmul_rn keeps the product
// rounded before floor and subtraction (no FMA contraction), so i0 and l1 come from the same float
// src as aten's and the CPU kernel's; the forward sample and the gradient fold share this function.
struct Tap {
  int i0, i1;
  float l1;
};

__device__ __forceinline__ Tap tap(const Axis a, int x) {
  if (a.in == a.out) return Tap{x, x, 0.0f};
  const float src = __fmul_rn(a.ratio, static_cast<float>(x));
  const int i0 = min(__float2int_rd(src), a.in - 1);
  const float l1 = fminf(fmaxf(src - static_cast<float>(i0), 0.0f), 1.0f);
  return Tap{i0, i0 + (i0 < a.in - 1 ? 1 : 0), l1};
}

// The first output index x in [0, out) with i0(x) >= t, else out. i0 never decreases with x (ratio
// <= 1 and rounding is monotone), so a binary search: log2(out) taps, ~10 at 1024.
__device__ __forceinline__ int first_tap_at_least(const Axis a, int t) {
  int lo = 0, hi = a.out;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (tap(a, mid).i0 >= t) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// The output indices [lo, hi] whose taps include input j. Upsampling: x feeds i0(x) and, when
// i0(x) < in - 1, i0(x) + 1, so j is fed by exactly the x with i0(x) in {j - 1, j}, a contiguous run
// (i0 is monotone). Never empty: i0 starts at 0 and ends at in - 2 or in - 1, and a step of i0 skips
// at most one value j (a step of 2: the float product's rounding beats 1 - ratio, seen only past
// ~26000 samples with in close to out), whose x are then those with i0 = j - 1. Identity: [j, j].
// The block counts and the fold both use this function, so they agree whatever the rounding.
__device__ __forceinline__ void tap_range(const Axis a, int j, int& lo, int& hi) {
  if (a.in == a.out) {
    lo = hi = j;
    return;
  }
  lo = j == 0 ? 0 : first_tap_at_least(a, j - 1);
  hi = first_tap_at_least(a, j + 1) - 1;
}

// Element loads through the read-only path, as fp32 (bf16 and fp16 widen exactly).
template <typename scalar_t>
__device__ __forceinline__ float load_one(const scalar_t* p);

template <>
__device__ __forceinline__ float load_one<float>(const float* p) {
  return __ldg(p);
}

template <>
__device__ __forceinline__ float load_one<c10::BFloat16>(const c10::BFloat16* p) {
  return __uint_as_float(static_cast<unsigned int>(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}

template <>
__device__ __forceinline__ float load_one<c10::Half>(const c10::Half* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

// 16 bytes into four 32-bit registers; weighted_adv_loss_v2_fwd_cuda's path choice guarantees the
// 16-byte alignment.
__device__ __forceinline__ void load16(const void* p, uint32_t* dst) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  dst[0] = v.x;
  dst[1] = v.y;
  dst[2] = v.z;
  dst[3] = v.w;
}

// Element e of a run of raw 16-byte loads, as fp32. Called with compile-time e only (unrolled loops),
// so `raw` stays in registers.
template <typename scalar_t>
__device__ __forceinline__ float unpack(const uint32_t* raw, int e);

template <>
__device__ __forceinline__ float unpack<float>(const uint32_t* raw, int e) {
  return __uint_as_float(raw[e]);
}

template <>
__device__ __forceinline__ float unpack<c10::BFloat16>(const uint32_t* raw, int e) {
  const uint32_t w = raw[e >> 1];
  return __uint_as_float((e & 1) ? (w & 0xffff0000u) : (w << 16));
}

template <>
__device__ __forceinline__ float unpack<c10::Half>(const uint32_t* raw, int e) {
  const uint32_t w = raw[e >> 1];
  return __half2float(__ushort_as_half(static_cast<unsigned short>((e & 1) ? (w >> 16) : (w & 0xffffu))));
}

// The map's value at output pixel (n, h, w) as fp32, for kMapStrided and kMapUp. The blend is
// aten's CUDA upsample_bilinear2d order (columns inside, rows outside), as in weighted_adv_loss.cu.
template <typename scalar_t>
__device__ __forceinline__ float map_at(const scalar_t* __restrict__ base, const MapDesc& m, int64_t n, int h,
                                        int w) {
  const scalar_t* b = base + n * m.sn;
  if (m.mode != kMapUp) return load_one(b + h * m.sh + w * m.sw);
  const Tap ty = tap(m.y, h), tx = tap(m.x, w);
  const float v00 = load_one(b + ty.i0 * m.sh + tx.i0 * m.sw);
  const float v01 = load_one(b + ty.i0 * m.sh + tx.i1 * m.sw);
  const float v10 = load_one(b + ty.i1 * m.sh + tx.i0 * m.sw);
  const float v11 = load_one(b + ty.i1 * m.sh + tx.i1 * m.sw);
  const float kx0 = 1.0f - tx.l1;
  return (1.0f - ty.l1) * (kx0 * v00 + tx.l1 * v01) + ty.l1 * (kx0 * v10 + tx.l1 * v11);
}

// One pixel after one step along the flattened (n, h, w) order.
__device__ __forceinline__ void advance(const Params& p, int64_t& n, int& h, int& w) {
  if (++w == p.W) {
    w = 0;
    if (++h == p.H) {
      h = 0;
      ++n;
    }
  }
}

__device__ __forceinline__ void split(const Params& p, int64_t q, int64_t& n, int& h, int& w) {
  if (p.narrow) {
    const uint32_t qq = static_cast<uint32_t>(q), hw = static_cast<uint32_t>(p.HW), W = static_cast<uint32_t>(p.W);
    const uint32_t nn = qq / hw, rem = qq - nn * hw, hh = rem / W;
    n = nn;
    h = static_cast<int>(hh);
    w = static_cast<int>(rem - hh * W);
  } else {
    n = q / p.HW;
    const int64_t rem = q - n * p.HW;
    const int64_t hh = rem / p.W;
    h = static_cast<int>(hh);
    w = static_cast<int>(rem - hh * p.W);
  }
}

// p* = max_c softmax(x)_c = 1 / sum_c exp(x_c - max x) from registers: the max first, then one __expf
// per channel. x_c - m is exact when x_c is near m (Sterbenz), so |logits| ~ 1e4 lose nothing there;
// far below m, exp underflows to 0 as it should. The max's own term is exp(0) = 1, so s >= 1, p* <= 1.
template <int kC>
__device__ __forceinline__ float p_max_of(const float (&x)[kC]) {
  float m = x[0];
#pragma unroll
  for (int c = 1; c < kC; ++c) m = fmaxf(m, x[c]);
  float s = 0.0f;
#pragma unroll
  for (int c = 0; c < kC; ++c) s += __expf(x[c] - m);
  return 1.0f / s;
}

// The same for a run-time C, streaming the channels: one __expf per channel, exp(-|x_c - m|) serving
// both cases (a new maximum rescales s by it, any other channel adds it).
template <typename scalar_t>
__device__ __forceinline__ float p_max_streamed(const scalar_t* __restrict__ x, int64_t sc, int C) {
  float m = load_one(x), s = 1.0f;
#pragma unroll 4
  for (int c = 1; c < C; ++c) {
    const float v = load_one(x + c * sc);
    const float d = v - m;
    const float e = __expf(-fabsf(d));
    if (d > 0.0f) {
      s = fmaf(s, e, 1.0f);
      m = v;
    } else {
      s += e;
    }
  }
  return 1.0f / s;
}

// w * bce at one pixel; g = dL/dz there for an upstream gradient of 1. Term for term the formulas of
// weighted_adv_loss.cu (and of the CPU kernel), which say why each is written so.
template <bool kAux>
__device__ __forceinline__ float pixel_term(const Params& p, float p_max, float a, float z, float& g) {
  float weight = (p_max > p.threshold ? p.floor : __expf(-p_max)) + p.mu;
  if (kAux) {
    const float ea = __expf(-fabsf(a));
    weight *= (a >= 0.0f ? 1.0f : ea) / (1.0f + ea);
  }
  const float ez = __expf(-fabsf(z));
  const float bce = fmaxf(z, 0.0f) - z * p.label + log1pf(ez);
  const float sig_sz = (p.sign * z >= 0.0f ? 1.0f : ez) / (1.0f + ez);
  g = weight * (p.sign * sig_sz) * p.inv_count;
  return weight * bce;
}

// V consecutive pixels of one image starting at plane offset r = h * W + w, for a map: one 16-byte
// load (kMapVec), else per pixel. H*W % V == 0 (a vector-path condition), so a group never leaves
// its image, but it may wrap to the next row when W % V != 0.
template <typename scalar_t, int V>
__device__ __forceinline__ void map_group(const scalar_t* __restrict__ base, const MapDesc& m, const Params& p,
                                          int64_t n, int64_t r, int h, int w, float (&out)[V]) {
  if (m.mode == kMapVec) {
    static_assert(V * sizeof(scalar_t) == 16, "one 16-byte load per group");
    uint32_t raw[4];
    load16(base + n * m.sn + r, raw);
#pragma unroll
    for (int i = 0; i < V; ++i) out[i] = unpack<scalar_t>(raw, i);
    return;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    out[i] = map_at(base, m, n, h, w);
    if (++w == p.W) {
      w = 0;
      ++h;
    }
  }
}

// The vector paths: V = 16 / sizeof(scalar_t) pixels starting at q0 (a multiple of V, all < pixels).
// NCHW: channel c of the V pixels is one aligned 16-byte load at n*sn + c*sc + r (the launcher
// checked sn, sc, H*W multiples of V and the plane contiguous). channels_last: the V pixels' V*C
// logits are contiguous from n*sn + r*C, 16*C bytes = C aligned loads; element (pixel i, channel c)
// is e = i*C + c. raw holds 4*kC words either way (76 registers at C = 19).
template <typename scalar_t, int kC, Layout kLayout, bool kAux, int V>
__device__ __forceinline__ float vector_pixels(const scalar_t* __restrict__ seg, const scalar_t* __restrict__ disc,
                                               const scalar_t* __restrict__ aux, const Params& p, int64_t q0,
                                               float (&g)[V]) {
  static_assert(V * sizeof(scalar_t) == 16, "16-byte groups");
  int64_t n;
  int h, w;
  split(p, q0, n, h, w);
  const int64_t r = q0 - n * p.HW;
  uint32_t raw[4 * kC];
  if constexpr (kLayout == Layout::kNchwVec) {
    const scalar_t* base = seg + n * p.seg_sn + r;
#pragma unroll
    for (int c = 0; c < kC; ++c) load16(base + c * p.seg_sc, raw + 4 * c);
  } else {
    const scalar_t* base = seg + n * p.seg_sn + r * kC;
#pragma unroll
    for (int k = 0; k < kC; ++k) load16(base + k * V, raw + 4 * k);
  }
  float z[V], a[V];
  map_group<scalar_t, V>(disc, p.disc, p, n, r, h, w, z);
  if constexpr (kAux) {
    map_group<scalar_t, V>(aux, p.aux, p, n, r, h, w, a);
  }
  float acc = 0.0f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    float x[kC];
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      x[c] = unpack<scalar_t>(raw, kLayout == Layout::kNchwVec ? c * V + i : i * kC + c);
    }
    acc += pixel_term<kAux>(p, p_max_of(x), kAux ? a[i] : 0.0f, z[i], g[i]);
  }
  return acc;
}

// The scalar path: kScalarPixels pixels from q0 (some may be past the end), any strides. kC > 0: all
// loads of the 4 pixels issued first into registers; kC == 0: run-time C, streamed per pixel.
template <typename scalar_t, int kC, bool kAux>
__device__ __forceinline__ float scalar_pixels(const scalar_t* __restrict__ seg, const scalar_t* __restrict__ disc,
                                               const scalar_t* __restrict__ aux, const Params& p, int64_t q0,
                                               float (&g)[kScalarPixels]) {
  int64_t n;
  int h, w;
  split(p, q0, n, h, w);
  float acc = 0.0f;
  if constexpr (kC > 0) {
    float x[kScalarPixels][kC];
    float z[kScalarPixels], a[kScalarPixels];
#pragma unroll
    for (int i = 0; i < kScalarPixels; ++i) {
      if (q0 + i < p.pixels) {
        const scalar_t* px = seg + n * p.seg_sn + h * p.seg_sh + w * p.seg_sw;
#pragma unroll
        for (int c = 0; c < kC; ++c) x[i][c] = load_one(px + c * p.seg_sc);
        z[i] = map_at(disc, p.disc, n, h, w);
        a[i] = kAux ? map_at(aux, p.aux, n, h, w) : 0.0f;
      } else {
#pragma unroll
        for (int c = 0; c < kC; ++c) x[i][c] = 0.0f;
        z[i] = 0.0f;
        a[i] = 0.0f;
      }
      advance(p, n, h, w);
    }
#pragma unroll
    for (int i = 0; i < kScalarPixels; ++i) {
      if (q0 + i < p.pixels) acc += pixel_term<kAux>(p, p_max_of(x[i]), a[i], z[i], g[i]);
    }
  } else {
    // Unrolled so that g stays in registers; each pixel's channel loop stays a loop.
#pragma unroll
    for (int i = 0; i < kScalarPixels; ++i) {
      if (q0 + i < p.pixels) {
        const scalar_t* px = seg + n * p.seg_sn + h * p.seg_sh + w * p.seg_sw;
        const float p_max = p_max_streamed(px, p.seg_sc, p.C);
        const float z = map_at(disc, p.disc, n, h, w);
        const float a = kAux ? map_at(aux, p.aux, n, h, w) : 0.0f;
        acc += pixel_term<kAux>(p, p_max, a, z, g[i]);
      }
      advance(p, n, h, w);
    }
  }
  return acc;
}

// Sum of one double per thread in a fixed order (shuffle tree per warp, then warp 0 over the 8 warp
// sums), valid in thread 0; every thread must call it. The leading barrier lets it be called twice.
__device__ __forceinline__ double block_sum(double v, double* s_warp) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < kWarps ? s_warp[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Sum over aligned groups of `lanes` (a power of two <= 32) threads, valid in each group's first lane.
// Every lane of the warp must call it (the loops around it are block-uniform).
__device__ __forceinline__ float group_sum(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset, lanes);
  return v;
}

// Low-res disc, step 1 (every block): the column half of the adjoint for this block's pixels
// [q_block, q_end), whose dL/dz is in s_grad. The block overlaps output rows r_a..r_b (r = n*H + y);
// for each of them and each low-res column k it writes bins[r][piece][k] = sum over its columns x of
// the row of (weight x gives k) * dL/dz, with piece = this block's rank among the blocks that row
// spans (zeros for the k its columns do not feed, so the fold can add every piece it reads).
// Production D 16x32 at 512x1024, bf16 NCHW (2048 pixels a block): 2 rows x 32 bins a block, each a
// sum over ~66 pixels by a group of 16 lanes; (N*H, 1, 32) floats in all, 1/32 of a full-size
// scratch. Fixed order: lanes take x = lo + lane, lo + lane + lanes, ..., then a fixed shuffle tree.
template <int S>
__device__ void column_bins(const Params& p, const Buffers& out, const float* s_grad, int64_t q_block) {
  const int64_t W = p.W;
  const int64_t q_end = min(q_block + S, p.pixels);
  const int64_t r_a = q_block / W, r_b = (q_end - 1) / W;
  const int wd = p.disc.x.in;
  const int lanes = p.bin_lanes, groups = kThreads / lanes;
  const int group = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  const int64_t items = (r_b - r_a + 1) * wd;
  for (int64_t base = 0; base < items; base += groups) {
    const int64_t item = base + group;
    float acc = 0.0f;
    int64_t r = 0;
    int k = 0;
    if (item < items) {
      r = r_a + item / wd;
      k = static_cast<int>(item - (item / wd) * wd);
      const int64_t row_start = r * W;  // flattened index of pixel (r, 0)
      const int x_begin = static_cast<int>(max(q_block - row_start, int64_t{0}));
      const int x_end = static_cast<int>(min(q_end - row_start, W));
      int lo, hi;
      tap_range(p.disc.x, k, lo, hi);
      lo = max(lo, x_begin);
      hi = min(hi + 1, x_end);
      for (int x = lo + lane; x < hi; x += lanes) {
        const Tap t = tap(p.disc.x, x);
        const float v = s_grad[row_start + x - q_block];
        if (t.i0 == k) acc += (1.0f - t.l1) * v;
        if (t.i1 == k) acc += t.l1 * v;
      }
    }
    acc = group_sum(acc, lanes);
    if (item < items && lane == 0) {
      const int64_t piece = static_cast<int64_t>(blockIdx.x) - r * W / S;
      out.bins[(r * p.pieces + piece) * wd + k] = acc;
    }
  }
}

// Low-res disc, step 2: grad[n, j, :] = sum over the output rows y feeding low-res row j (tap_range)
// of that row's weight times its bins (pieces added in order), by one block, in one fixed order
// whichever block it is. Reads go through L2 (__ldcg): the bins were written by other blocks.
template <int S>
__device__ void fold_row(const Params& p, const Buffers& out, int64_t n, int j) {
  const int64_t W = p.W, H = p.H;
  const int hd = p.disc.y.in, wd = p.disc.x.in;
  int lo, hi;
  tap_range(p.disc.y, j, lo, hi);
  const int lanes = p.fold_lanes, groups = kThreads / lanes;
  const int group = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  for (int base = 0; base < wd; base += groups) {
    const int k = base + group;
    float acc = 0.0f;
    if (k < wd) {
      for (int y = lo + lane; y <= hi; y += lanes) {
        const int64_t r = n * H + y;
        const int64_t spanned = (r * W + W - 1) / S - r * W / S + 1;  // blocks row r lies in
        const float* bin = out.bins + r * p.pieces * wd + k;
        float b = 0.0f;
        for (int64_t piece = 0; piece < spanned; ++piece) b += __ldcg(bin + piece * wd);
        const Tap t = tap(p.disc.y, y);
        if (t.i0 == j) acc += (1.0f - t.l1) * b;
        if (t.i1 == j) acc += t.l1 * b;
      }
    }
    acc = group_sum(acc, lanes);
    if (k < wd && lane == 0) out.grad[(n * hd + j) * wd + k] = acc;
  }
}

// Low-res disc, the hand-over: for each low-res row (n, j) this block's output rows feed, count this
// block done; the block that completes the count folds the row. Expected count = the blocks that hold
// any pixel of the rows feeding j (a contiguous block range, the same arithmetic as here). Every block
// fenced its bins before this, so the folding block sees them all. One row per thread per round, and
// at most kThreads rows finish per round; rounds are block-uniform (barriers inside).
template <int S>
__device__ void fold_finished_rows(const Params& p, const Buffers& out, int64_t q_block, int64_t* s_fold,
                                   int* s_nfold) {
  const int64_t W = p.W, H = p.H;
  const int64_t q_end = min(q_block + S, p.pixels);
  const int64_t r_a = q_block / W, r_b = (q_end - 1) / W;
  const int64_t n_a = r_a / H, n_b = r_b / H;
  const int hd = p.disc.y.in;
  const int64_t items = (n_b - n_a + 1) * hd;
  for (int64_t base = 0; base < items; base += kThreads) {
    if (threadIdx.x == 0) *s_nfold = 0;
    __syncthreads();
    const int64_t item = base + threadIdx.x;
    if (item < items) {
      const int64_t n = n_a + item / hd;
      const int j = static_cast<int>(item - (item / hd) * hd);
      const int64_t ya = n == n_a ? r_a - n * H : 0, yb = n == n_b ? r_b - n * H : H - 1;
      int lo, hi;
      tap_range(p.disc.y, j, lo, hi);
      if (lo <= yb && hi >= ya) {
        const int64_t b_lo = ((n * H + lo) * W) / S, b_hi = ((n * H + hi) * W + W - 1) / S;
        const unsigned int expected = static_cast<unsigned int>(b_hi - b_lo + 1);
        if (atomicAdd(out.counters + 1 + n * hd + j, 1u) + 1u == expected) {
          s_fold[atomicAdd(s_nfold, 1)] = n * hd + j;
        }
      }
    }
    __syncthreads();
    const int nfold = *s_nfold;
    if (nfold > 0) __threadfence();  // acquire: order the bin reads after the counts
    for (int f = 0; f < nfold; ++f) fold_row<S>(p, out, s_fold[f] / hd, static_cast<int>(s_fold[f] % hd));
    __syncthreads();  // s_fold and s_nfold are reused by the next round
  }
}

// The forward. Block b owns the S = kThreads * V flattened pixels [b*S, (b+1)*S); thread t the V from
// b*S + t*V. Loss precision: each thread adds its V (<= 8) terms in fp32, the block and the grid add
// in fp64 (a few shuffles per 2048 pixels): the rounding then does not grow with the grid (1024
// blocks at 4x512x1024 bf16) and stays that of the first kernel, whose partials are fp64 too.
template <typename scalar_t, int kC, Layout kLayout, bool kAux>
__global__ void __launch_bounds__(kThreads)
    weighted_adv_loss_v2_fwd_kernel(const scalar_t* __restrict__ seg, const scalar_t* __restrict__ disc,
                                    const scalar_t* __restrict__ aux, const Params p, const Buffers out) {
  constexpr int V = kLayout == Layout::kScalar ? kScalarPixels : static_cast<int>(16 / sizeof(scalar_t));
  constexpr int S = kThreads * V;
  __shared__ __align__(16) float s_grad[S];  // the block's dL/dz when disc is low-res (8 KB at V = 8)
  __shared__ double s_warp[kWarps];
  __shared__ int64_t s_fold[kThreads];
  __shared__ int s_nfold;
  __shared__ bool s_last;

  const int64_t q_block = static_cast<int64_t>(blockIdx.x) * S;
  const int64_t q0 = q_block + static_cast<int64_t>(threadIdx.x) * V;
  float g[V];
#pragma unroll
  for (int i = 0; i < V; ++i) g[i] = 0.0f;
  float acc = 0.0f;
  if (q0 < p.pixels) {
    if constexpr (kLayout == Layout::kScalar) {
      acc = scalar_pixels<scalar_t, kC, kAux>(seg, disc, aux, p, q0, g);
    } else {
      acc = vector_pixels<scalar_t, kC, kLayout, kAux, V>(seg, disc, aux, p, q0, g);
    }
  }
  if (p.disc_up) {
    // 16-byte stores: scalar ones V = 8 words apart put a warp's 32 lanes on 4 banks (8-way conflict);
    // these are 2-way at worst (V = 8) and conflict-free at V = 4.
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      *reinterpret_cast<float4*>(s_grad + threadIdx.x * V + i) = make_float4(g[i], g[i + 1], g[i + 2], g[i + 3]);
    }
  } else if (q0 + V <= p.pixels) {
    // q0 is a multiple of V >= 4 and grad comes from the caching allocator (512-byte aligned), so
    // these float4 stores are aligned: 1 (V = 4) or 2 (V = 8) per thread.
#pragma unroll
    for (int i = 0; i < V; i += 4) {
      *reinterpret_cast<float4*>(out.grad + q0 + i) = make_float4(g[i], g[i + 1], g[i + 2], g[i + 3]);
    }
  } else {
    // The scalar path's last group. Unrolled with a guard: a run-time index into g would move it to
    // local memory for every thread.
#pragma unroll
    for (int i = 0; i < V; ++i) {
      if (q0 + i < p.pixels) out.grad[q0 + i] = g[i];
    }
  }
  const double block_total = block_sum(static_cast<double>(acc), s_warp);
  if (p.disc_up) {
    __syncthreads();  // s_grad complete
    column_bins<S>(p, out, s_grad, q_block);
  }
  if (threadIdx.x == 0) out.partial[blockIdx.x] = block_total;
  __threadfence();  // release: bins and partial visible device-wide before any count below
  __syncthreads();
  if (p.disc_up) fold_finished_rows<S>(p, out, q_block, s_fold, &s_nfold);
  if (threadIdx.x == 0) s_last = atomicAdd(out.counters, 1u) == gridDim.x - 1;
  __syncthreads();
  if (s_last) {
    __threadfence();  // acquire: every block's partial
    double v = 0.0;
    for (int64_t b = threadIdx.x; b < gridDim.x; b += kThreads) v += __ldcg(out.partial + b);
    v = block_sum(v, s_warp);
    if (threadIdx.x == 0) *out.loss = static_cast<float>(v * p.inv_count_d);
  }
}

template <typename out_t>
__device__ __forceinline__ uint16_t half_bits(float v);

template <>
__device__ __forceinline__ uint16_t half_bits<c10::BFloat16>(float v) {
  return c10::BFloat16(v).x;  // round to nearest even, as at::mul_out into a bf16 tensor
}

template <>
__device__ __forceinline__ uint16_t half_bits<c10::Half>(float v) {
  return c10::Half(v).x;
}

// grad = dL/dz (fp32) * upstream gradient (a device scalar: no host read), rounded once to out_t.
// 8 elements per thread: two 16-byte loads, and one 16-byte (bf16/fp16) or two (fp32) stores when
// `vec` (both pointers 16-byte aligned); the tail and misaligned views go element by element.
template <typename out_t>
__global__ void __launch_bounds__(kThreads)
    weighted_adv_loss_v2_bwd_kernel(const float* __restrict__ grad_disc, const float* __restrict__ grad_loss,
                                    out_t* __restrict__ out, int64_t numel, bool vec) {
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kBwdPerThread;
  if (i0 >= numel) return;
  const float s = __ldg(grad_loss);
  if (vec && i0 + kBwdPerThread <= numel) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(grad_disc + i0));
    const float4 b = __ldg(reinterpret_cast<const float4*>(grad_disc + i0 + 4));
    const float v[kBwdPerThread] = {a.x * s, a.y * s, a.z * s, a.w * s, b.x * s, b.y * s, b.z * s, b.w * s};
    if constexpr (std::is_same_v<out_t, float>) {
      *reinterpret_cast<float4*>(out + i0) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(out + i0 + 4) = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint4 packed;
      packed.x = half_bits<out_t>(v[0]) | (static_cast<uint32_t>(half_bits<out_t>(v[1])) << 16);
      packed.y = half_bits<out_t>(v[2]) | (static_cast<uint32_t>(half_bits<out_t>(v[3])) << 16);
      packed.z = half_bits<out_t>(v[4]) | (static_cast<uint32_t>(half_bits<out_t>(v[5])) << 16);
      packed.w = half_bits<out_t>(v[6]) | (static_cast<uint32_t>(half_bits<out_t>(v[7])) << 16);
      *reinterpret_cast<uint4*>(out + i0) = packed;
    }
    return;
  }
  const int64_t end = min(i0 + kBwdPerThread, numel);
  for (int64_t i = i0; i < end; ++i) out[i] = static_cast<out_t>(grad_disc[i] * s);
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// The element offset of pixel (h, w) is (h * W + w) * unit for every h, w: the (H, W) plane is one
// contiguous run of pixels `unit` elements apart (sizes of 1 put no condition on their stride).
bool plane_contiguous(int64_t sh, int64_t sw, int64_t H, int64_t W, int64_t unit) {
  return (W == 1 || sw == unit) && (H == 1 || sh == W * unit);
}

Axis make_axis(int64_t in, int64_t out) {
  return Axis{static_cast<int>(in), static_cast<int>(out),
              out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f};
}

MapDesc make_map(const at::Tensor& t, int64_t H, int64_t W) {
  MapDesc m;
  m.sn = t.stride(0);
  m.sh = t.stride(2);
  m.sw = t.stride(3);
  m.y = make_axis(t.size(2), H);
  m.x = make_axis(t.size(3), W);
  m.mode = (t.size(2) != H || t.size(3) != W) ? kMapUp : kMapStrided;
  return m;
}

// A full-size map the vector paths read with one 16-byte load per group: same conditions as NCHW seg.
bool map_vectorizable(const at::Tensor& t, int64_t H, int64_t W, int64_t vec) {
  return t.size(2) == H && t.size(3) == W && aligned16(t) && plane_contiguous(t.stride(2), t.stride(3), H, W, 1) &&
         (t.size(0) == 1 || t.stride(0) % vec == 0);
}

// About `per_item / 4` lanes per sum (each lane then adds ~4 terms), a power of two in [1, 32].
int lanes_for(int64_t per_item) {
  const int64_t want = (per_item + 3) / 4;
  int lanes = 1;
  while (lanes < 32 && 2 * lanes <= want) lanes *= 2;
  return lanes;
}

// About the output samples feeding one input sample of an upsampling axis (sets lane counts only).
int64_t taps_per_input(int64_t in, int64_t out) {
  if (in == out) return 1;
  return in > 1 ? 2 * (out - 1) / (in - 1) + 2 : out;
}

template <typename scalar_t, int kC, Layout kLayout>
void launch_layout(const scalar_t* seg, const scalar_t* disc, const scalar_t* aux, const Params& p,
                   const Buffers& b, int64_t blocks, cudaStream_t stream) {
  if (aux != nullptr) {
    weighted_adv_loss_v2_fwd_kernel<scalar_t, kC, kLayout, true>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(seg, disc, aux, p, b);
  } else {
    weighted_adv_loss_v2_fwd_kernel<scalar_t, kC, kLayout, false>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(seg, disc, aux, p, b);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_dtype(Layout layout, bool c19, const at::Tensor& seg, const at::Tensor& disc,
                  const std::optional<at::Tensor>& aux, const Params& p, const Buffers& b, int64_t blocks,
                  cudaStream_t stream) {
  const scalar_t* s = seg.const_data_ptr<scalar_t>();
  const scalar_t* d = disc.const_data_ptr<scalar_t>();
  const scalar_t* a = aux.has_value() ? aux->const_data_ptr<scalar_t>() : nullptr;
  switch (layout) {
    case Layout::kNchwVec: launch_layout<scalar_t, 19, Layout::kNchwVec>(s, d, a, p, b, blocks, stream); break;
    case Layout::kClVec: launch_layout<scalar_t, 19, Layout::kClVec>(s, d, a, p, b, blocks, stream); break;
    default:
      if (c19) {
        launch_layout<scalar_t, 19, Layout::kScalar>(s, d, a, p, b, blocks, stream);
      } else {
        launch_layout<scalar_t, 0, Layout::kScalar>(s, d, a, p, b, blocks, stream);
      }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> weighted_adv_loss_v2_fwd_cuda(const at::Tensor& seg, const at::Tensor& disc,
                                                                 const std::optional<at::Tensor>& aux,
                                                                 double label, double threshold, double floor,
                                                                 double mu) {
  check_weighted_adv_loss_inputs(seg, disc, aux, label);
  TORCH_CHECK(seg.is_cuda(), "seg_logits must be a CUDA tensor for the CUDA kernel; got ", seg.device());
  const c10::cuda::CUDAGuard guard(seg.device());
  const int64_t N = seg.size(0), C = seg.size(1), H = seg.size(2), W = seg.size(3);
  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(H <= kIntMax && W <= kIntMax && C <= kIntMax, "seg_logits' C, H and W must each be below 2^31; got ",
              seg.sizes());
  const int64_t HW = H * W, pixels = N * HW;

  // Path: 16-byte loads need C = 19 (the register-resident instance), H*W a multiple of the V pixels
  // a load holds (so no group leaves its image or the tensor), a 16-byte aligned data pointer, and
  // strides that keep every group's first element 16-byte aligned. Checked on the actual strides and
  // pointer: a channels_last tensor is vectorised without a copy, a misaligned view falls back.
  const int64_t vec = 16 / static_cast<int64_t>(seg.element_size());  // 4 fp32, 8 bf16/fp16
  const bool c19 = C == 19;
  const bool vec_ok = c19 && HW % vec == 0 && aligned16(seg) && (N == 1 || seg.stride(0) % vec == 0);
  Layout layout = Layout::kScalar;
  if (vec_ok && plane_contiguous(seg.stride(2), seg.stride(3), H, W, 1) && seg.stride(1) % vec == 0) {
    layout = Layout::kNchwVec;
  } else if (vec_ok && seg.stride(1) == 1 && plane_contiguous(seg.stride(2), seg.stride(3), H, W, C)) {
    layout = Layout::kClVec;
  }
  const int64_t per_thread = layout == Layout::kScalar ? kScalarPixels : vec;
  const int64_t S = kThreads * per_thread;
  const int64_t blocks = (pixels + S - 1) / S;
  TORCH_CHECK(blocks <= kIntMax, "seg_logits has too many pixels for one launch: ", pixels);

  const int64_t hd = disc.size(2), wd = disc.size(3);
  const bool disc_up = hd != H || wd != W;
  // The bins' middle dimension: row r starts at r*W mod S, a multiple of g = gcd(W, S) up to S - g,
  // so it spans at most (S - g + W - 1) / S + 1 blocks (1 when W divides S: 1024 wide, S = 1024/2048).
  const int64_t pieces = (S - std::gcd(W, S) + W - 1) / S + 1;

  const auto f32 = seg.options().dtype(at::kFloat);
  auto grad = at::empty({N, 1, hd, wd}, f32);
  auto bins = disc_up ? at::empty({N * H * pieces * wd}, f32) : at::Tensor();
  auto partial = at::empty({blocks}, seg.options().dtype(at::kDouble));
  auto counters = at::empty({1 + (disc_up ? N * hd : 0)}, seg.options().dtype(at::kInt));
  auto loss = at::empty({}, f32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(counters.data_ptr<int>(), 0, counters.numel() * sizeof(int), stream));

  Params p;
  p.pixels = pixels;
  p.HW = HW;
  p.H = static_cast<int>(H);
  p.W = static_cast<int>(W);
  p.C = static_cast<int>(C);
  p.seg_sn = seg.stride(0);
  p.seg_sc = seg.stride(1);
  p.seg_sh = seg.stride(2);
  p.seg_sw = seg.stride(3);
  p.disc = make_map(disc, H, W);
  // Unread without aux; a copy of disc's keeps the struct defined (and avoids a `?:` of structs, on
  // which nvcc 13.0's cicc segfaulted in weighted_adv_loss.cu).
  p.aux = make_map(aux.has_value() ? *aux : disc, H, W);
  if (layout != Layout::kScalar) {
    if (p.disc.mode == kMapStrided && map_vectorizable(disc, H, W, vec)) p.disc.mode = kMapVec;
    if (aux.has_value() && p.aux.mode == kMapStrided && map_vectorizable(*aux, H, W, vec)) p.aux.mode = kMapVec;
  }
  p.label = static_cast<float>(label);
  p.sign = static_cast<float>(1.0 - 2.0 * label);
  p.threshold = static_cast<float>(threshold);
  p.floor = static_cast<float>(floor);
  p.mu = static_cast<float>(mu);
  p.inv_count = static_cast<float>(1.0 / static_cast<double>(pixels));
  p.inv_count_d = 1.0 / static_cast<double>(pixels);
  p.narrow = pixels <= kIntMax;
  p.disc_up = disc_up;
  p.pieces = pieces;
  p.bin_lanes = lanes_for(taps_per_input(wd, W));
  p.fold_lanes = lanes_for(taps_per_input(hd, H));

  Buffers b;
  b.grad = grad.data_ptr<float>();
  b.bins = disc_up ? bins.data_ptr<float>() : nullptr;
  b.partial = partial.data_ptr<double>();
  b.counters = reinterpret_cast<unsigned int*>(counters.data_ptr<int>());
  b.loss = loss.data_ptr<float>();

  switch (seg.scalar_type()) {
    case at::kFloat: launch_dtype<float>(layout, c19, seg, disc, aux, p, b, blocks, stream); break;
    case at::kBFloat16: launch_dtype<c10::BFloat16>(layout, c19, seg, disc, aux, p, b, blocks, stream); break;
    default: launch_dtype<c10::Half>(layout, c19, seg, disc, aux, p, b, blocks, stream); break;  // checked above
  }
  return {loss, grad};
}

at::Tensor weighted_adv_loss_v2_bwd_cuda(const at::Tensor& grad_disc, const at::Tensor& grad_loss,
                                         at::ScalarType dtype) {
  TORCH_CHECK(grad_disc.is_cuda() && grad_disc.scalar_type() == at::kFloat,
              "grad_disc must be a float32 CUDA tensor; got ", grad_disc.scalar_type(), " on ", grad_disc.device());
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.device() == grad_disc.device(),
              "grad_loss must be one element on grad_disc's device ", grad_disc.device(), "; got ", grad_loss.sizes(),
              " on ", grad_loss.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "dtype must be float32, bfloat16 or float16; got ", dtype);
  const c10::cuda::CUDAGuard guard(grad_disc.device());
  const at::Tensor g = grad_disc.contiguous();
  const at::Tensor scale = grad_loss.scalar_type() == at::kFloat ? grad_loss : grad_loss.to(at::kFloat);
  auto out = at::empty(g.sizes(), g.options().dtype(dtype));
  const int64_t numel = g.numel();
  if (numel == 0) return out;
  const int64_t per_block = int64_t{kThreads} * kBwdPerThread;
  const int64_t blocks = (numel + per_block - 1) / per_block;
  const bool vec = aligned16(g) && aligned16(out);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float* gp = g.const_data_ptr<float>();
  const float* sp = scale.const_data_ptr<float>();
  const auto grid = static_cast<unsigned int>(blocks);
  switch (dtype) {
    case at::kFloat:
      weighted_adv_loss_v2_bwd_kernel<float><<<grid, kThreads, 0, stream>>>(gp, sp, out.data_ptr<float>(), numel, vec);
      break;
    case at::kBFloat16:
      weighted_adv_loss_v2_bwd_kernel<c10::BFloat16>
          <<<grid, kThreads, 0, stream>>>(gp, sp, out.data_ptr<c10::BFloat16>(), numel, vec);
      break;
    default:
      weighted_adv_loss_v2_bwd_kernel<c10::Half>
          <<<grid, kThreads, 0, stream>>>(gp, sp, out.data_ptr<c10::Half>(), numel, vec);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(pwda_fast, CUDA, m) {
  m.impl("weighted_adv_loss_v2_fwd", &weighted_adv_loss_v2_fwd_cuda);
  m.impl("weighted_adv_loss_v2_bwd", &weighted_adv_loss_v2_bwd_cuda);
}

}  // namespace pwda_fast
