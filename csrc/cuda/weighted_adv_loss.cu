// weighted_adv_loss: CUDA kernel of the fused one-pass weighted adversarial loss (schema and the CPU
// kernel: ../weighted_adv_loss.cpp; the method: docs/METHOD.md §1).
//
// One thread per pixel: neighbouring threads read neighbouring pixels, so for NCHW input every
// channel load of a warp is one coalesced 128-byte transaction. Each block writes one partial sum;
// a second single-block kernel adds the partials in a fixed order. No atomics on the loss, so the
// result is bitwise reproducible for a given shape.
// disc and aux may be (N, 1, h, w) with h <= H, w <= W: each thread then samples its pixel's z and a
// bilinearly (align_corners=True, aten's index and weight rule) from the low-res map, so the
// full-resolution maps are never written. grad is then dL/dz w.r.t. the low-res map: the main kernel
// writes the per-pixel gradient to a scratch buffer and upsample_adjoint_kernel folds it onto the map,
// columns then rows, each output element summed by one thread in a fixed order (no atomicAdd, unlike
// aten's upsample_bilinear2d_backward): bitwise reproducible, and allowed under
// torch.use_deterministic_algorithms(True).

// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers the bare toolkit may lack.
// Narrow ATen headers, not <torch/all.h>, which was most of this file's compile time (BENCHMARKS.md).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../weighted_adv_loss.h"

namespace pwda_fast {

namespace {

constexpr int kThreads = 256;        // pixels per block of the main kernel
constexpr int kReduceThreads = 1024;  // the one block of the final reduction

// A (N, 1, h, w) logit map read at the (H, W) output grid; ratio_* = (in - 1) / (out - 1), 0 if out == 1.
struct Map {
  int64_t sn, sh, sw, h, w;
  float ratio_h, ratio_w;
};

struct Params {
  int64_t C, H, W;
  int64_t seg_sn, seg_sc, seg_sh, seg_sw;
  Map disc, aux;
  float label, threshold, floor, mu, inv_count;
};

Map make_map(const at::Tensor& t, int64_t H, int64_t W) {
  const auto ratio = [](int64_t in, int64_t out) {
    return out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f;
  };
  return Map{t.stride(0), t.stride(2), t.stride(3), t.size(2), t.size(3),
             ratio(t.size(2), H), ratio(t.size(3), W)};
}

// One axis of aten's compute_source_index_and_lambda for align_corners=True: output index x reads
// input indices i0, i1 with weight l1 on i1; equal sizes are the identity.
struct Tap {
  int64_t i0, i1;
  float l1;
};

__device__ __forceinline__ Tap source_index(int64_t x, int64_t in, int64_t out, float ratio) {
  Tap t{x, x, 0.0f};
  if (in != out) {
    const float src = ratio * static_cast<float>(x);
    const int64_t f = static_cast<int64_t>(floorf(src));
    t.i0 = f < in - 1 ? f : in - 1;
    t.l1 = fminf(fmaxf(src - static_cast<float>(t.i0), 0.0f), 1.0f);
    t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
  }
  return t;
}

// The map's value at output pixel (n, y, x) of the (H, W) grid, as float.
template <typename scalar_t>
__device__ __forceinline__ float sample(const scalar_t* __restrict__ base, const Map m, int64_t H, int64_t W,
                                        int64_t n, int64_t y, int64_t x) {
  const scalar_t* b = base + n * m.sn;
  if (m.h == H && m.w == W) return static_cast<float>(b[y * m.sh + x * m.sw]);
  const Tap ty = source_index(y, m.h, H, m.ratio_h);
  const Tap tx = source_index(x, m.w, W, m.ratio_w);
  const float v00 = static_cast<float>(b[ty.i0 * m.sh + tx.i0 * m.sw]);
  const float v01 = static_cast<float>(b[ty.i0 * m.sh + tx.i1 * m.sw]);
  const float v10 = static_cast<float>(b[ty.i1 * m.sh + tx.i0 * m.sw]);
  const float v11 = static_cast<float>(b[ty.i1 * m.sh + tx.i1 * m.sw]);
  const float kx0 = 1.0f - tx.l1;
  return (1.0f - ty.l1) * (kx0 * v00 + tx.l1 * v01) + ty.l1 * (kx0 * v10 + tx.l1 * v11);
}

// Sum of one double per thread, in a fixed order, returned to thread 0 (every thread must call it):
// a shuffle tree inside each warp, then warp 0 over the n_threads / 32 warp sums. Two barriers instead
// of the log2(n_threads) + 1 of a shared-memory tree, and the same order on every launch.
template <int n_threads>
__device__ __forceinline__ double block_sum(double v) {
  static_assert(n_threads % 32 == 0 && n_threads <= 1024, "whole warps, at most 32 of them");
  __shared__ double warp_sums[n_threads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < n_threads / 32 ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// index_t: int32_t when every element offset of seg, disc, aux and grad fits (the launcher checks),
// else int64_t. The per-pixel (n, h, w) split is three divisions: 32-bit ones are a few instructions,
// 64-bit ones an emulated routine of ~70, which a bandwidth-bound kernel at ~240 instructions per pixel
// of H200 budget (bf16, C = 19) cannot afford.
template <typename scalar_t, bool kAux, typename index_t>
__global__ void __launch_bounds__(kThreads)
    weighted_adv_loss_fwd_kernel(const scalar_t* __restrict__ seg, const scalar_t* __restrict__ disc,
                                 const scalar_t* __restrict__ aux, float* __restrict__ grad,
                                 double* __restrict__ partial, const Params p, const int64_t pixels) {
  const index_t q = static_cast<index_t>(blockIdx.x) * kThreads + static_cast<index_t>(threadIdx.x);
  float contrib = 0.0f;
  if (q < pixels) {
    const index_t H = static_cast<index_t>(p.H), W = static_cast<index_t>(p.W), hw = H * W;
    const index_t n = q / hw, h = (q - n * hw) / W, w = q - n * hw - h * W;
    const index_t sc = static_cast<index_t>(p.seg_sc);
    const scalar_t* x = seg + n * static_cast<index_t>(p.seg_sn) + h * static_cast<index_t>(p.seg_sh) +
                        w * static_cast<index_t>(p.seg_sw);
    // Online max / sum-exp: one read of the C logits. s = sum_c exp(x_c - m) >= 1, so p* = 1/s <= 1.
    // Unrolled so several channel loads are in flight before the first exp needs its value.
    float m = -INFINITY, s = 0.0f;
#pragma unroll 4
    for (index_t c = 0; c < static_cast<index_t>(p.C); ++c) {
      const float v = static_cast<float>(x[c * sc]);
      const float m_new = fmaxf(m, v);
      s = s * __expf(m - m_new) + __expf(v - m_new);
      m = m_new;
    }
    const float p_max = 1.0f / s;
    float weight = (p_max > p.threshold ? p.floor : __expf(-p_max)) + p.mu;
    if (kAux) {
      const float a = sample(aux, p.aux, p.H, p.W, n, h, w);
      const float ea = __expf(-fabsf(a));
      weight *= (a >= 0.0f ? 1.0f : ea) / (1.0f + ea);
    }
    const float z = sample(disc, p.disc, p.H, p.W, n, h, w);
    // exp(-|z|) is in (0, 1]: the BCE and the sigmoid stay finite for |z| up to 1e4 and beyond.
    const float ez = __expf(-fabsf(z));
    const float bce = fmaxf(z, 0.0f) - z * p.label + log1pf(ez);
    // sigmoid(z) - y without cancellation: with s = 1 - 2y (+1 or -1) it is s * sigmoid(s * z), i.e.
    // -sigmoid(-z) for y = 1 (sigmoid(z) - 1 is 0 in float for z > 17, where it is -exp(-z)).
    const float sign = 1.0f - 2.0f * p.label;
    const float sig_sz = (sign * z >= 0.0f ? 1.0f : ez) / (1.0f + ez);
    grad[q] = weight * (sign * sig_sz) * p.inv_count;
    contrib = weight * bce;
  }
  const double block_total = block_sum<kThreads>(static_cast<double>(contrib));
  if (threadIdx.x == 0) partial[blockIdx.x] = block_total;
}

// dst[o, j, k] (outer, l, inner) = sum over x of src[o, x, k] (outer, L, inner) times the weight the
// align_corners=True upsampling l -> L gives input j at output x: (1 - lambda1) where i0(x) == j, lambda1
// where i1(x) == j. One thread per output element scans x upward from just before its first tap, so
// every sum has one fixed order. i0(x) never decreases with x, so the scan stops at the first x past j.
__global__ void __launch_bounds__(kThreads)
    upsample_adjoint_kernel(const float* __restrict__ src, float* __restrict__ dst, int64_t outer, int64_t L,
                            int64_t l, int64_t inner, float ratio) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= outer * l * inner) return;
  const int64_t k = t % inner, j = (t / inner) % l, o = t / (inner * l);
  // The first x with i0(x) >= j - 1 is about (j - 1) / ratio; 2 less absorbs the float rounding.
  int64_t x = 0;
  if (ratio > 0.0f && j > 1) {
    const int64_t guess = static_cast<int64_t>(floorf((j - 1) / ratio)) - 2;
    x = guess > 0 ? guess : 0;
  }
  const float* s = src + o * L * inner + k;
  float acc = 0.0f;
  for (; x < L; ++x) {
    const Tap tap = source_index(x, l, L, ratio);
    if (tap.i0 > j) break;
    const float v = s[x * inner];
    if (tap.i0 == j) acc += (1.0f - tap.l1) * v;
    if (tap.i1 == j) acc += tap.l1 * v;
  }
  dst[t] = acc;
}

// One block: thread t adds partials t, t + 1024, ... in order, then a fixed tree; loss = total / P.
__global__ void __launch_bounds__(kReduceThreads)
    sum_partials_kernel(const double* __restrict__ partial, int64_t blocks, double inv_count,
                        float* __restrict__ loss) {
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += kReduceThreads) acc += partial[b];
  const double total = block_sum<kReduceThreads>(acc);
  if (threadIdx.x == 0) *loss = static_cast<float>(total * inv_count);
}

// The largest element offset of t from its data pointer.
int64_t max_offset(const at::Tensor& t) {
  int64_t off = 0;
  for (int64_t d = 0; d < t.dim(); ++d) off += (t.size(d) - 1) * t.stride(d);
  return off;
}

template <typename scalar_t, typename index_t>
void launch_indexed(const at::Tensor& seg, const at::Tensor& disc, const std::optional<at::Tensor>& aux,
                    at::Tensor& grad, at::Tensor& partial, const Params& p, int64_t pixels, int64_t blocks,
                    cudaStream_t stream) {
  const scalar_t* s = seg.const_data_ptr<scalar_t>();
  const scalar_t* d = disc.const_data_ptr<scalar_t>();
  float* g = grad.data_ptr<float>();
  double* part = partial.data_ptr<double>();
  if (aux.has_value()) {
    weighted_adv_loss_fwd_kernel<scalar_t, true, index_t><<<blocks, kThreads, 0, stream>>>(
        s, d, aux->const_data_ptr<scalar_t>(), g, part, p, pixels);
  } else {
    weighted_adv_loss_fwd_kernel<scalar_t, false, index_t><<<blocks, kThreads, 0, stream>>>(
        s, d, nullptr, g, part, p, pixels);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch(const at::Tensor& seg, const at::Tensor& disc, const std::optional<at::Tensor>& aux,
            at::Tensor& grad, at::Tensor& partial, const Params& p, int64_t pixels, int64_t blocks,
            cudaStream_t stream) {
  // Padding: q runs to blocks * kThreads, and int32 must hold it as well as every offset.
  const int64_t largest = std::max({blocks * kThreads, max_offset(seg), max_offset(disc),
                                    aux.has_value() ? max_offset(*aux) : int64_t{0}});
  if (largest < std::numeric_limits<int32_t>::max()) {
    launch_indexed<scalar_t, int32_t>(seg, disc, aux, grad, partial, p, pixels, blocks, stream);
  } else {
    launch_indexed<scalar_t, int64_t>(seg, disc, aux, grad, partial, p, pixels, blocks, stream);
  }
}

// dst = the adjoint of the align_corners=True upsampling l -> L along the middle axis of
// src (outer, L, inner); src itself when l == L.
at::Tensor upsample_adjoint(const at::Tensor& src, int64_t outer, int64_t L, int64_t l, int64_t inner,
                            cudaStream_t stream) {
  if (l == L) return src;
  auto dst = at::empty({outer, l, inner}, src.options());
  const float ratio = L > 1 ? static_cast<float>(l - 1) / static_cast<float>(L - 1) : 0.0f;
  const int64_t blocks = (outer * l * inner + kThreads - 1) / kThreads;
  upsample_adjoint_kernel<<<blocks, kThreads, 0, stream>>>(src.const_data_ptr<float>(), dst.data_ptr<float>(),
                                                           outer, L, l, inner, ratio);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dst;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> weighted_adv_loss_fwd_cuda(const at::Tensor& seg, const at::Tensor& disc,
                                                              const std::optional<at::Tensor>& aux,
                                                              double label, double threshold,
                                                              double floor, double mu) {
  check_weighted_adv_loss_inputs(seg, disc, aux, label);
  TORCH_CHECK(seg.is_cuda(), "seg_logits must be a CUDA tensor for the CUDA kernel; got ", seg.device());
  const c10::cuda::CUDAGuard guard(seg.device());
  const int64_t N = seg.size(0), H = seg.size(2), W = seg.size(3);
  const int64_t pixels = N * H * W;
  const int64_t blocks = (pixels + kThreads - 1) / kThreads;
  const auto f32 = seg.options().dtype(at::kFloat);
  // Per-pixel dL/dz: the result for a full-size map, scratch for the adjoint of a low-res one.
  auto grad = at::empty({N, 1, H, W}, f32);
  auto partial = at::empty({blocks}, seg.options().dtype(at::kDouble));
  auto loss = at::empty({}, f32);
  const Params p{seg.size(1), H, W,
                 seg.stride(0), seg.stride(1), seg.stride(2), seg.stride(3),
                 make_map(disc, H, W),
                 // Unread without aux. (nvcc 13.0's cicc segfaults on `has ? make_map(..) : Map{..}` here.)
                 make_map(aux.has_value() ? *aux : disc, H, W),
                 static_cast<float>(label), static_cast<float>(threshold), static_cast<float>(floor),
                 static_cast<float>(mu), static_cast<float>(1.0 / static_cast<double>(pixels))};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (seg.scalar_type()) {
    case at::kFloat: launch<float>(seg, disc, aux, grad, partial, p, pixels, blocks, stream); break;
    case at::kBFloat16: launch<c10::BFloat16>(seg, disc, aux, grad, partial, p, pixels, blocks, stream); break;
    default: launch<c10::Half>(seg, disc, aux, grad, partial, p, pixels, blocks, stream); break;  // checked
  }
  sum_partials_kernel<<<1, kReduceThreads, 0, stream>>>(partial.const_data_ptr<double>(), blocks,
                                                        1.0 / static_cast<double>(pixels),
                                                        loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t h = disc.size(2), w = disc.size(3);
  if (h != H || w != W) {
    const auto cols = upsample_adjoint(grad, N * H, W, w, 1, stream);  // (N*H, w)
    grad = upsample_adjoint(cols, N, H, h, w, stream).view({N, 1, h, w});
  }
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(pwda_fast, CUDA, m) {
  m.impl("weighted_adv_loss_fwd", &weighted_adv_loss_fwd_cuda);
}

}  // namespace pwda_fast
