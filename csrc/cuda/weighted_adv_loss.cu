// weighted_adv_loss: CUDA kernel of the fused one-pass weighted adversarial loss (schema and the CPU
// kernel: ../weighted_adv_loss.cpp; the method: DESIGN.md §2).
//
// One thread per pixel: neighbouring threads read neighbouring pixels, so for NCHW input every
// channel load of a warp is one coalesced 128-byte transaction. Each block writes one partial sum;
// a second single-block kernel adds the partials in a fixed order. No atomics on the loss, so the
// result is bitwise reproducible for a given shape.

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

struct Params {
  int64_t C, H, W;
  int64_t seg_sn, seg_sc, seg_sh, seg_sw;
  int64_t disc_sn, disc_sh, disc_sw;
  int64_t aux_sn, aux_sh, aux_sw;
  float label, threshold, floor, mu, inv_count;
};

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
      const float a = static_cast<float>(aux[n * p.aux_sn + h * p.aux_sh + w * p.aux_sw]);
      const float ea = __expf(-fabsf(a));
      weight *= (a >= 0.0f ? 1.0f : ea) / (1.0f + ea);
    }
    const float z = static_cast<float>(disc[n * p.disc_sn + h * p.disc_sh + w * p.disc_sw]);
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
  const bool has_aux = aux.has_value();
  const Params p{seg.size(1), seg.size(2), seg.size(3),
                 seg.stride(0), seg.stride(1), seg.stride(2), seg.stride(3),
                 disc.stride(0), disc.stride(2), disc.stride(3),
                 has_aux ? aux->stride(0) : 0, has_aux ? aux->stride(2) : 0, has_aux ? aux->stride(3) : 0,
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
