// weighted_adv_loss: CUDA kernel of the fused one-pass weighted adversarial loss (schema and the CPU
// kernel: ../weighted_adv_loss.cpp; the method: DESIGN.md §2).
//
// One thread per pixel: neighbouring threads read neighbouring pixels, so for NCHW input every
// channel load of a warp is one coalesced 128-byte transaction. Each block writes one partial sum;
// a second single-block kernel adds the partials in a fixed order. No atomics on the loss, so the
// result is bitwise reproducible for a given shape.
// disc and aux may be (N, 1, h, w) with h <= H, w <= W: each thread then samples its pixel's z and a
// bilinearly (align_corners=True, aten's index and weight rule) from the low-res map, so the
// full-resolution maps are never written; grad is dL/dz_up w.r.t. the upsampled map.

// c10/cuda only: ATen/cuda/CUDAContext.h pulls in cuSPARSE/cuBLAS headers the bare toolkit may lack.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/all.h>
#include <torch/library.h>

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

// Fixed-order tree sum of buf[0..n) (n a power of two) into buf[0]; every thread must call it.
template <int n>
__device__ __forceinline__ void block_tree_sum(double* buf) {
#pragma unroll
  for (int stride = n / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (threadIdx.x < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
  }
  __syncthreads();
}

template <typename scalar_t, bool kAux>
__global__ void __launch_bounds__(kThreads)
    weighted_adv_loss_fwd_kernel(const scalar_t* __restrict__ seg, const scalar_t* __restrict__ disc,
                                 const scalar_t* __restrict__ aux, float* __restrict__ grad,
                                 double* __restrict__ partial, const Params p, const int64_t pixels) {
  __shared__ double buf[kThreads];
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  float contrib = 0.0f;
  if (q < pixels) {
    const int64_t hw = p.H * p.W;
    const int64_t n = q / hw, h = (q - n * hw) / p.W, w = q - n * hw - h * p.W;
    const scalar_t* x = seg + n * p.seg_sn + h * p.seg_sh + w * p.seg_sw;
    // Online max / sum-exp: one read of the C logits. s = sum_c exp(x_c - m) >= 1, so p* = 1/s <= 1.
    float m = -INFINITY, s = 0.0f;
    for (int64_t c = 0; c < p.C; ++c) {
      const float v = static_cast<float>(x[c * p.seg_sc]);
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
    const float sig = (z >= 0.0f ? 1.0f : ez) / (1.0f + ez);
    grad[q] = weight * (sig - p.label) * p.inv_count;
    contrib = weight * bce;
  }
  buf[threadIdx.x] = static_cast<double>(contrib);
  block_tree_sum<kThreads>(buf);
  if (threadIdx.x == 0) partial[blockIdx.x] = buf[0];
}

// One block: thread t adds partials t, t + 1024, ... in order, then a fixed tree; loss = total / P.
__global__ void __launch_bounds__(kReduceThreads)
    sum_partials_kernel(const double* __restrict__ partial, int64_t blocks, double inv_count,
                        float* __restrict__ loss) {
  __shared__ double buf[kReduceThreads];
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < blocks; b += kReduceThreads) acc += partial[b];
  buf[threadIdx.x] = acc;
  block_tree_sum<kReduceThreads>(buf);
  if (threadIdx.x == 0) *loss = static_cast<float>(buf[0] * inv_count);
}

template <typename scalar_t>
void launch(const at::Tensor& seg, const at::Tensor& disc, const c10::optional<at::Tensor>& aux,
            at::Tensor& grad, at::Tensor& partial, const Params& p, int64_t pixels, int64_t blocks,
            cudaStream_t stream) {
  const scalar_t* s = seg.const_data_ptr<scalar_t>();
  const scalar_t* d = disc.const_data_ptr<scalar_t>();
  float* g = grad.data_ptr<float>();
  double* part = partial.data_ptr<double>();
  if (aux.has_value()) {
    weighted_adv_loss_fwd_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
        s, d, aux->const_data_ptr<scalar_t>(), g, part, p, pixels);
  } else {
    weighted_adv_loss_fwd_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
        s, d, nullptr, g, part, p, pixels);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> weighted_adv_loss_fwd_cuda(const at::Tensor& seg, const at::Tensor& disc,
                                                              const c10::optional<at::Tensor>& aux,
                                                              double label, double threshold,
                                                              double floor, double mu) {
  check_weighted_adv_loss_inputs(seg, disc, aux, label);
  TORCH_CHECK(seg.is_cuda(), "seg_logits must be a CUDA tensor for the CUDA kernel; got ", seg.device());
  const c10::cuda::CUDAGuard guard(seg.device());
  const int64_t pixels = seg.size(0) * seg.size(2) * seg.size(3);
  const int64_t blocks = (pixels + kThreads - 1) / kThreads;
  auto grad = at::empty({seg.size(0), 1, seg.size(2), seg.size(3)}, seg.options().dtype(at::kFloat));
  auto partial = at::empty({blocks}, seg.options().dtype(at::kDouble));
  auto loss = at::empty({}, seg.options().dtype(at::kFloat));
  const int64_t H = seg.size(2), W = seg.size(3);
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
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(pwda_fast, CUDA, m) {
  m.impl("weighted_adv_loss_fwd", &weighted_adv_loss_fwd_cuda);
}

}  // namespace pwda_fast
