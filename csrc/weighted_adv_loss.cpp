// weighted_adv_loss: the fused one-pass pixel-weighted adversarial loss (DESIGN.md §2), CPU kernel,
// the op schema (declared once for CPU and CUDA) and the stub that makes `import pwda_fast._C` work.
//
// Per pixel (n, h, w): p* = max_c softmax(x)_c = 1 / sum_c exp(x_c - max_c x_c);
// d = floor if p* > T else exp(-p*); w = (d + mu) * sigmoid(a); bce = max(z,0) - z*y + log1p(exp(-|z|)).
// Outputs: loss = mean(w * bce) (fp32 scalar) and grad_disc = w * (sigmoid(z) - y) / (N*H*W), i.e.
// dL/dz for an upstream gradient of 1, fp32 (N, 1, H, W) contiguous.
// disc and aux may be (N, 1, h, w) with h <= H, w <= W: z and a are then sampled bilinearly
// (align_corners=True, aten's index and weight rule) at each output pixel, so the full-resolution maps
// are never written, and grad_disc is dL/dz_up w.r.t. the upsampled map (ops.py applies the adjoint).

#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "weighted_adv_loss.h"

extern "C" {
// The module is empty: importing it loads this .so, which runs the TORCH_LIBRARY registrations.
// Written against the limited C API so one wheel serves every Python >= 3.10.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace pwda_fast {

namespace {

// 64 pixels x 19 channels x 4 B = 5 KB per tile: both passes over the tile's logits hit L1.
constexpr int64_t kTile = 64;
// Pixels per parallel task and per partial sum. Fixed (not derived from the thread count) so the
// partition, and hence the rounding of the loss, is the same on every machine and every run.
constexpr int64_t kBlock = 4096;

// exp and log1p written as branch-free polynomials (Cephes expf/logf coefficients, ~1 ulp) so the
// compiler vectorises the per-pixel loops; libm's scalar expf would cost more than the whole
// memory traffic. exp(0) is exactly 1, which keeps p* <= 1.
// Selects use the quiet compares __builtin_isgreater & co: under GCC's default -ftrapping-math a plain
// `<` may raise FE_INVALID on NaN, so GCC will not turn it into a vector blend and the loop stays scalar.
// fast_exp takes x <= 0 only (every caller passes a non-positive argument).
__attribute__((always_inline)) inline float fast_exp(float x) {
  // Round to nearest by adding and removing 1.5 * 2^23 (no roundps before SSE4.1, and no libm call).
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^k built from its exponent bits; k < -126 would wrap, so flush it to 0 (exp(-88) = 6e-39). The
  // clamp is an integer max because GCC would not vectorise the same clamp on the float x.
  const int32_t bits = (std::max(static_cast<int32_t>(k), -127) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log1p(t) for t in [0, 1] (t = exp(-|z|)). log(1 + t) * t / ((1 + t) - 1) cancels the rounding of
// 1 + t, so tiny t (large |z|) keeps full relative accuracy.
__attribute__((always_inline)) inline float fast_log1p_unit(float t) {
  const float u = 1.0f + t;
  const bool high = __builtin_isgreater(u, 1.41421356f);
  const float e = high ? 1.0f : 0.0f;
  const float f = (high ? 0.5f * u : u) - 1.0f;  // in [-0.293, 0.414]
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  const float log_u = (f + y) + e * 0.693359375f;
  const float d = u - 1.0f;
  return d == 0.0f ? t : log_u * (t / d);
}

// A (N, 1, h, w) logit map read at the (H, W) output grid. Without upsampling (h == H, w == W) pixel
// (n, y, x) is at n*sn + y*sh + x*sw; with it, output row y blends rows row0[y] and row1[y] (element
// offsets, already times sh) with weight row_l[y] on row1, and column x likewise with col*.
struct Map {
  int64_t sn, sh, sw;
  bool up;
  const int64_t* row0;
  const int64_t* row1;
  const float* row_l;
  const int64_t* col0;
  const int64_t* col1;
  const float* col_l;
};

struct Params {
  int64_t C, H, W;
  int64_t seg_sn, seg_sc, seg_sh, seg_sw;
  Map disc, aux;
  float label, threshold, floor, mu, inv_count;
};

// aten's bilinear align_corners=True source indices along one axis (compute_source_index_and_lambda):
// src = x * (in - 1) / (out - 1) in float (0 when out == 1); i0 = min(floor(src), in - 1),
// i1 = i0 + (i0 < in - 1), lambda1 = clamp(src - i0, 0, 1); an axis of equal sizes is the identity.
void axis_table(int64_t in, int64_t out, int64_t stride, std::vector<int64_t>& i0, std::vector<int64_t>& i1,
                std::vector<float>& l1) {
  i0.resize(out);
  i1.resize(out);
  l1.resize(out);
  const float ratio = out > 1 ? static_cast<float>(in - 1) / static_cast<float>(out - 1) : 0.0f;
  for (int64_t x = 0; x < out; ++x) {
    int64_t a = x;
    float lam = 0.0f;
    int64_t b = x;
    if (in != out) {
      const float src = ratio * static_cast<float>(x);
      a = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      lam = std::min(std::max(src - static_cast<float>(a), 0.0f), 1.0f);
      b = a + (a < in - 1 ? 1 : 0);
    }
    i0[x] = a * stride;
    i1[x] = b * stride;
    l1[x] = lam;
  }
}

// Owns the index tables a Map points into.
struct MapTables {
  std::vector<int64_t> row0, row1, col0, col1;
  std::vector<float> row_l, col_l;

  Map build(const at::Tensor& t, int64_t H, int64_t W) {
    Map m{t.stride(0), t.stride(2), t.stride(3), t.size(2) != H || t.size(3) != W,
          nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    if (m.up) {
      axis_table(t.size(2), H, t.stride(2), row0, row1, row_l);
      axis_table(t.size(3), W, t.stride(3), col0, col1, col_l);
      m.row0 = row0.data();
      m.row1 = row1.data();
      m.row_l = row_l.data();
      m.col0 = col0.data();
      m.col1 = col1.data();
      m.col_l = col_l.data();
    }
    return m;
  }
};

// out[i] = the map's value at output pixel (n, h, w + i), i < len, as float.
template <typename scalar_t>
__attribute__((always_inline)) inline void load_map(const scalar_t* base, const Map& m, int64_t n, int64_t h,
                                                    int64_t w, int64_t len, float* out) {
  const scalar_t* b = base + n * m.sn;
  if (!m.up) {
    const scalar_t* r = b + h * m.sh + w * m.sw;
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<float>(r[i * m.sw]);
    return;
  }
  const scalar_t* r0 = b + m.row0[h];
  const scalar_t* r1 = b + m.row1[h];
  const float l1 = m.row_l[h], l0 = 1.0f - l1;
  const int64_t* c0 = m.col0 + w;
  const int64_t* c1 = m.col1 + w;
  const float* k = m.col_l + w;
  for (int64_t i = 0; i < len; ++i) {
    const float k1 = k[i], k0 = 1.0f - k1;
    out[i] = l0 * (k0 * static_cast<float>(r0[c0[i]]) + k1 * static_cast<float>(r0[c1[i]])) +
             l1 * (k0 * static_cast<float>(r1[c0[i]]) + k1 * static_cast<float>(r1[c1[i]]));
  }
}

// One tile: `len` pixels of row (n, h) starting at column w; grad points at the tile's first pixel.
// Returns the tile's sum of w * bce. kUnitW lets the compiler see contiguous loads for NCHW input.
template <typename scalar_t, bool kUnitW, bool kAux>
__attribute__((always_inline)) inline double tile(const scalar_t* seg, const scalar_t* disc,
                                                  const scalar_t* aux, float* grad, const Params& p,
                                                  int64_t n, int64_t h, int64_t w, int64_t len) {
  const int64_t sw = kUnitW ? 1 : p.seg_sw;
  const scalar_t* x = seg + n * p.seg_sn + h * p.seg_sh + w * p.seg_sw;
  float m[kTile];
  float s[kTile];
  for (int64_t i = 0; i < len; ++i) m[i] = static_cast<float>(x[i * sw]);
  for (int64_t c = 1; c < p.C; ++c) {
    const scalar_t* xc = x + c * p.seg_sc;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) m[i] = std::max(m[i], static_cast<float>(xc[i * sw]));
  }
  for (int64_t i = 0; i < len; ++i) s[i] = 0.0f;
  for (int64_t c = 0; c < p.C; ++c) {
    const scalar_t* xc = x + c * p.seg_sc;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) s[i] += fast_exp(static_cast<float>(xc[i * sw]) - m[i]);
  }
  float zv[kTile];
  float av[kTile];
  load_map(disc, p.disc, n, h, w, len, zv);
  if (kAux) load_map(aux, p.aux, n, h, w, len, av);
  // A float sum over one tile (64 terms) vectorises; tiles and blocks are then summed in double.
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < len; ++i) {
    const float p_max = 1.0f / s[i];
    float weight = (__builtin_isgreater(p_max, p.threshold) ? p.floor : fast_exp(-p_max)) + p.mu;
    if (kAux) {
      const float a = av[i];
      const float ea = fast_exp(-std::fabs(a));
      weight *= (__builtin_isgreaterequal(a, 0.0f) ? 1.0f : ea) / (1.0f + ea);
    }
    const float z = zv[i];
    const float ez = fast_exp(-std::fabs(z));
    const float bce = (__builtin_isgreater(z, 0.0f) ? z : 0.0f) - z * p.label + fast_log1p_unit(ez);
    const float sig = (__builtin_isgreaterequal(z, 0.0f) ? 1.0f : ez) / (1.0f + ez);
    grad[i] = weight * (sig - p.label) * p.inv_count;
    acc += weight * bce;
  }
  return acc;
}

// Pixels [begin, end) of the flattened (n, h, w) index, cut into tiles that never cross a row.
template <typename scalar_t, bool kUnitW, bool kAux>
__attribute__((always_inline)) inline double block_body(const scalar_t* seg, const scalar_t* disc,
                                                        const scalar_t* aux, float* grad,
                                                        const Params& p, int64_t begin, int64_t end) {
  const int64_t hw = p.H * p.W;
  double acc = 0.0;
  for (int64_t q = begin; q < end;) {
    const int64_t n = q / hw, h = (q % hw) / p.W, w = q % p.W;
    const int64_t len = std::min({end - q, p.W - w, kTile});
    acc += tile<scalar_t, kUnitW, kAux>(seg, disc, aux, grad + q, p, n, h, w, len);
    q += len;
  }
  return acc;
}

// The same body compiled twice: for AVX2+FMA (8 floats per instruction) and for the x86-64 baseline
// (SSE2), picked at run time, because setup.py builds without -march so the wheel runs anywhere.
template <typename scalar_t, bool kUnitW, bool kAux>
__attribute__((target("avx2,fma"))) double block_avx2(const scalar_t* seg, const scalar_t* disc,
                                                      const scalar_t* aux, float* grad, const Params& p,
                                                      int64_t begin, int64_t end) {
  return block_body<scalar_t, kUnitW, kAux>(seg, disc, aux, grad, p, begin, end);
}

template <typename scalar_t, bool kUnitW, bool kAux>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
double block_avx512(const scalar_t* seg, const scalar_t* disc, const scalar_t* aux, float* grad,
                    const Params& p, int64_t begin, int64_t end) {
  return block_body<scalar_t, kUnitW, kAux>(seg, disc, aux, grad, p, begin, end);
}

template <typename scalar_t, bool kUnitW, bool kAux>
double block_default(const scalar_t* seg, const scalar_t* disc, const scalar_t* aux, float* grad,
                     const Params& p, int64_t begin, int64_t end) {
  return block_body<scalar_t, kUnitW, kAux>(seg, disc, aux, grad, p, begin, end);
}

template <typename scalar_t, bool kUnitW, bool kAux>
double run_blocks(const scalar_t* seg, const scalar_t* disc, const scalar_t* aux, float* grad,
                  const Params& p, int64_t pixels) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const int64_t blocks = (pixels + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * kBlock, end = std::min(begin + kBlock, pixels);
      partial[b] = avx512 ? block_avx512<scalar_t, kUnitW, kAux>(seg, disc, aux, grad, p, begin, end)
                   : avx2   ? block_avx2<scalar_t, kUnitW, kAux>(seg, disc, aux, grad, p, begin, end)
                            : block_default<scalar_t, kUnitW, kAux>(seg, disc, aux, grad, p, begin, end);
    }
  });
  double total = 0.0;
  for (const double v : partial) total += v;  // fixed order: deterministic whatever the threads did
  return total;
}

template <typename scalar_t>
double dispatch_layout(const at::Tensor& seg, const at::Tensor& disc, const c10::optional<at::Tensor>& aux,
                       float* grad, const Params& p, int64_t pixels) {
  const scalar_t* s = seg.const_data_ptr<scalar_t>();
  const scalar_t* d = disc.const_data_ptr<scalar_t>();
  const scalar_t* a = aux.has_value() ? aux->const_data_ptr<scalar_t>() : nullptr;
  const bool unit = p.seg_sw == 1;
  if (aux.has_value()) {
    return unit ? run_blocks<scalar_t, true, true>(s, d, a, grad, p, pixels)
                : run_blocks<scalar_t, false, true>(s, d, a, grad, p, pixels);
  }
  return unit ? run_blocks<scalar_t, true, false>(s, d, a, grad, p, pixels)
              : run_blocks<scalar_t, false, false>(s, d, a, grad, p, pixels);
}

}  // namespace

void check_weighted_adv_loss_inputs(const at::Tensor& seg, const at::Tensor& disc,
                                    const c10::optional<at::Tensor>& aux, double label) {
  TORCH_CHECK(seg.dim() == 4 && seg.numel() > 0, "seg_logits must be a non-empty (N, C, H, W) tensor; got ",
              seg.sizes());
  const auto dt = seg.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "seg_logits must be float32, bfloat16 or float16; got ", dt);
  // A D / D_aux map is (N, 1, h, w) with 1 <= h <= H, 1 <= w <= W; smaller ones are upsampled in-kernel.
  const auto map_ok = [&](const at::Tensor& t) {
    return t.dim() == 4 && t.size(0) == seg.size(0) && t.size(1) == 1 && t.size(2) >= 1 &&
           t.size(2) <= seg.size(2) && t.size(3) >= 1 && t.size(3) <= seg.size(3);
  };
  TORCH_CHECK(map_ok(disc), "disc_logits must be (N, 1, h, w) with h <= H, w <= W of seg_logits ",
              seg.sizes(), "; got ", disc.sizes());
  TORCH_CHECK(disc.scalar_type() == dt, "disc_logits must have seg_logits' dtype ", dt, "; got ",
              disc.scalar_type());
  TORCH_CHECK(disc.device() == seg.device(), "disc_logits must be on seg_logits' device ", seg.device(),
              "; got ", disc.device());
  if (aux.has_value()) {
    TORCH_CHECK(map_ok(*aux), "aux_logits must be (N, 1, h, w) with h <= H, w <= W of seg_logits ",
                seg.sizes(), "; got ", aux->sizes());
    TORCH_CHECK(aux->scalar_type() == dt, "aux_logits must have seg_logits' dtype ", dt, "; got ",
                aux->scalar_type());
    TORCH_CHECK(aux->device() == seg.device(), "aux_logits must be on seg_logits' device ", seg.device(),
                "; got ", aux->device());
  }
  TORCH_CHECK(label == 0.0 || label == 1.0, "label must be 0.0 (source) or 1.0 (target); got ", label);
}

std::tuple<at::Tensor, at::Tensor> weighted_adv_loss_fwd_cpu(const at::Tensor& seg, const at::Tensor& disc,
                                                             const c10::optional<at::Tensor>& aux,
                                                             double label, double threshold, double floor,
                                                             double mu) {
  check_weighted_adv_loss_inputs(seg, disc, aux, label);
  TORCH_CHECK(seg.device().is_cpu(), "seg_logits must be a CPU tensor for the CPU kernel; got ", seg.device());
  const int64_t pixels = seg.size(0) * seg.size(2) * seg.size(3);
  auto grad = at::empty({seg.size(0), 1, seg.size(2), seg.size(3)}, seg.options().dtype(at::kFloat));
  MapTables disc_tables, aux_tables;
  const Map disc_map = disc_tables.build(disc, seg.size(2), seg.size(3));
  const Map aux_map = aux.has_value() ? aux_tables.build(*aux, seg.size(2), seg.size(3))
                                      : Map{0, 0, 0, false, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
  Params p{seg.size(1), seg.size(2), seg.size(3),
           seg.stride(0), seg.stride(1), seg.stride(2), seg.stride(3),
           disc_map, aux_map,
           static_cast<float>(label), static_cast<float>(threshold), static_cast<float>(floor),
           static_cast<float>(mu), static_cast<float>(1.0 / static_cast<double>(pixels))};
  float* g = grad.data_ptr<float>();
  double total = 0.0;
  switch (seg.scalar_type()) {
    case at::kFloat: total = dispatch_layout<float>(seg, disc, aux, g, p, pixels); break;
    case at::kBFloat16: total = dispatch_layout<c10::BFloat16>(seg, disc, aux, g, p, pixels); break;
    default: total = dispatch_layout<c10::Half>(seg, disc, aux, g, p, pixels); break;  // dtype checked above
  }
  auto loss = at::scalar_tensor(total / static_cast<double>(pixels), seg.options().dtype(at::kFloat));
  return {loss, grad};
}

TORCH_LIBRARY(pwda_fast, m) {
  m.def("weighted_adv_loss_fwd(Tensor seg_logits, Tensor disc_logits, Tensor? aux_logits, float label, "
        "float threshold, float floor, float mu) -> (Tensor loss, Tensor grad_disc)");
}

TORCH_LIBRARY_IMPL(pwda_fast, CPU, m) {
  m.impl("weighted_adv_loss_fwd", &weighted_adv_loss_fwd_cpu);
}

}  // namespace pwda_fast
