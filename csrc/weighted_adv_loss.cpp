// weighted_adv_loss: the fused one-pass pixel-weighted adversarial loss (docs/METHOD.md §1), CPU kernel,
// the op schema (declared once for CPU and CUDA) and the stub that makes `import pwda_fast._C` work.
//
// Per pixel (n, h, w): p* = max_c softmax(x)_c = 1 / sum_c exp(x_c - max_c x_c);
// d = floor if p* > T else exp(-p*); w = (d + mu) * sigmoid(a); bce = max(z,0) - z*y + log1p(exp(-|z|)).
// Outputs: loss = mean(w * bce) (fp32 scalar) and grad_disc = dL/dz for an upstream gradient of 1, fp32,
// contiguous, of disc's shape: w * (sigmoid(z) - y) / (N*H*W) per pixel at full resolution.
// disc and aux may be (N, 1, h, w) with h <= H, w <= W: z and a are then sampled bilinearly
// (align_corners=True, aten's index and weight rule) at each output pixel, so the full-resolution maps
// are never written, and grad_disc is the adjoint of that sampling applied to the per-pixel gradient,
// also computed here in a fixed order (no atomics, the same bits for any thread count): each parallel
// task owns whole rows and sums its rows' pixels into their (row, column-of-disc) bins, then the rows
// are folded into disc's rows one image at a time. The per-pixel gradient is never written to memory.

#include <Python.h>

// Narrow headers, not <torch/all.h>: that one pulls in the whole C++ frontend (autograd, nn, optim),
// 14 s of parsing of this file's 54 s (the rest is optimising the kernel; BENCHMARKS.md "Build time").
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
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

// 128 pixels x 19 channels x 4 B = 10 KB per tile: both passes over the tile's logits hit L1, and each
// channel's row is read in runs of 512 B (8 cache lines) from DRAM. 64 pixels (4 lines per run) left the
// first pass waiting on memory: 128 is ~25% faster at (2, 19, 256, 512) fp32 (BENCHMARKS.md).
constexpr int64_t kTile = 128;
// About this many pixels (whole rows: max(1, kBlock / W) of them) per parallel task and per partial sum.
// Fixed (not derived from the thread count) so the partition, and hence the rounding of the loss and of
// the low-resolution gradient, is the same on every machine and every run.
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
// (n, y, x) is at n*sn + y*sh + x*sw; with it, output row y blends map rows row0[y] and row1[y] with
// weight row_l[y] on row1, and column x likewise with col*. An axis of equal sizes is the identity
// (index x, weight 0), so one formula serves maps that are low-resolution along one axis only.
struct Map {
  int64_t sn, sh, sw, h, w;
  bool up;
  const int64_t* row0;
  const int64_t* row1;
  const float* row_l;
  const int64_t* col0;
  const int64_t* col1;
  const float* col_l;
  const int64_t* col_run_end;  // first column after x whose col0 differs from col0[x] (or W)
};

struct Params {
  int64_t C, H, W;
  int64_t seg_sn, seg_sc, seg_sh, seg_sw;
  Map disc, aux;
  float label, sign, threshold, floor, mu, inv_count;  // sign = 1 - 2 * label
};

// aten's bilinear align_corners=True source indices along one axis (compute_source_index_and_lambda):
// src = x * (in - 1) / (out - 1) in float (0 when out == 1); i0 = min(floor(src), in - 1),
// i1 = i0 + (i0 < in - 1), lambda1 = clamp(src - i0, 0, 1); an axis of equal sizes is the identity.
void axis_table(int64_t in, int64_t out, std::vector<int64_t>& i0, std::vector<int64_t>& i1,
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
    i0[x] = a;
    i1[x] = b;
    l1[x] = lam;
  }
}

// Owns the index tables a Map points into.
struct MapTables {
  std::vector<int64_t> row0, row1, col0, col1, col_run_end;
  std::vector<float> row_l, col_l;

  Map build(const at::Tensor& t, int64_t H, int64_t W) {
    Map m{t.stride(0), t.stride(2), t.stride(3), t.size(2), t.size(3), t.size(2) != H || t.size(3) != W,
          nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
    if (m.up) {
      axis_table(t.size(2), H, row0, row1, row_l);
      axis_table(t.size(3), W, col0, col1, col_l);
      col_run_end.resize(W);
      for (int64_t x = W - 1; x >= 0; --x) {
        col_run_end[x] = (x + 1 < W && col0[x + 1] == col0[x]) ? col_run_end[x + 1] : x + 1;
      }
      m.col_run_end = col_run_end.data();
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

// The row half of the sampling, once per output row (n, h): blended[j] = the map's rows row0[h] and
// row1[h] mixed with weight row_l[h] on row1, for each of its m.w columns.
template <typename scalar_t>
__attribute__((always_inline)) inline void blend_rows(const scalar_t* base, const Map& m, int64_t n, int64_t h,
                                                      float* blended) {
  const scalar_t* r0 = base + n * m.sn + m.row0[h] * m.sh;
  const scalar_t* r1 = base + n * m.sn + m.row1[h] * m.sh;
  const float l1 = m.row_l[h], l0 = 1.0f - l1;
  for (int64_t j = 0; j < m.w; ++j) {
    blended[j] = l0 * static_cast<float>(r0[j * m.sw]) + l1 * static_cast<float>(r1[j * m.sw]);
  }
}

// out[i] = the map's value at output pixel (n, h, w + i), i < len, as float. Upsampled: the column
// half of the sampling over the row's blend_rows values, two reads of a small L1-resident array per
// pixel instead of four gathers from the map (which did not vectorise: 7.5 -> 7.0 ms for the kernel at
// 1x19x512x1024 NCHW with the production 16x32 / 65x129 maps, 1 thread).
template <typename scalar_t>
__attribute__((always_inline)) inline void load_map(const scalar_t* base, const Map& m, int64_t n, int64_t h,
                                                    int64_t w, int64_t len, const float* blended, float* out) {
  if (!m.up) {
    const scalar_t* r = base + n * m.sn + h * m.sh + w * m.sw;
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<float>(r[i * m.sw]);
    return;
  }
  const int64_t* c0 = m.col0 + w;
  const int64_t* c1 = m.col1 + w;
  const float* k = m.col_l + w;
  for (int64_t i = 0; i < len; ++i) out[i] = (1.0f - k[i]) * blended[c0[i]] + k[i] * blended[c1[i]];
}

// The column half of the sampling's adjoint for one tile: bins (w bins of disc's width, for the tile's
// row) += the tile's per-pixel gradient g at columns x..x+len. Columns with the same taps (a run of
// W / w = 32 for the 16x32 D map at 1024 wide) are summed in registers by a vectorised reduction, then
// added to their two bins: adding pixel by pixel into memory made each run one serial chain of
// store-to-load round trips. The order depends on the shape and the ISA only, never on the threads.
__attribute__((always_inline)) inline void add_to_column_bins(const Map& m, int64_t x, int64_t len,
                                                              const float* g, float* bins) {
  for (int64_t i = 0; i < len;) {
    const int64_t end = std::min(m.col_run_end[x + i] - x, len);
    const float* k = m.col_l + x;
    float s0 = 0.0f, s1 = 0.0f;
#pragma omp simd reduction(+ : s0, s1)
    for (int64_t t = i; t < end; ++t) {
      s0 += (1.0f - k[t]) * g[t];
      s1 += k[t] * g[t];
    }
    bins[m.col0[x + i]] += s0;
    bins[m.col1[x + i]] += s1;
    i = end;
  }
}

// One tile: `len` pixels of row (n, h) starting at column w; the tile's dL/dz goes to grad[0..len).
// Returns the tile's sum of w * bce. kUnitW lets the compiler see contiguous loads for NCHW input.
template <typename scalar_t, bool kUnitW, bool kAux>
__attribute__((always_inline)) inline double tile(const scalar_t* seg, const scalar_t* disc,
                                                  const scalar_t* aux, float* grad, const Params& p,
                                                  int64_t n, int64_t h, int64_t w, int64_t len,
                                                  const float* disc_row, const float* aux_row) {
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
  load_map(disc, p.disc, n, h, w, len, disc_row, zv);
  if (kAux) load_map(aux, p.aux, n, h, w, len, aux_row, av);
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
    // sigmoid(z) - y without cancellation: with s = 1 - 2y (+1 or -1) it is s * sigmoid(s * z), i.e.
    // -sigmoid(-z) for y = 1. sigmoid(z) - 1 in float is 0 for z > 17 (sigmoid rounds to 1) where the
    // true value is -exp(-z): at z = 20, -2.1e-9. Same operation count as sigmoid(z) - y.
    const float sz = p.sign * z;
    const float sig_sz = (__builtin_isgreaterequal(sz, 0.0f) ? 1.0f : ez) / (1.0f + ez);
    grad[i] = weight * (p.sign * sig_sz) * p.inv_count;
    acc += weight * bce;
  }
  return acc;
}

// Rows [row_begin, row_end) of the flattened (n, h) index, cut into tiles of one row each. Without
// upsampling the per-pixel dL/dz is written to out[pixel]; with it, out holds disc-width column bins
// per output row (out + row * disc.w) and the tile's gradient only passes through a stack buffer.
template <typename scalar_t, bool kUnitW, bool kAux>
__attribute__((always_inline)) inline double block_body(const scalar_t* seg, const scalar_t* disc,
                                                        const scalar_t* aux, float* out,
                                                        const Params& p, int64_t row_begin,
                                                        int64_t row_end) {
  double acc = 0.0;
  float g[kTile];
  std::vector<float> disc_row(p.disc.up ? p.disc.w : 0), aux_row(kAux && p.aux.up ? p.aux.w : 0);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t n = row / p.H, h = row % p.H;
    if (p.disc.up) blend_rows(disc, p.disc, n, h, disc_row.data());
    if (kAux && p.aux.up) blend_rows(aux, p.aux, n, h, aux_row.data());
    for (int64_t w = 0; w < p.W; w += kTile) {
      const int64_t len = std::min(p.W - w, kTile);
      // One call site, so the tile is inlined once (two copies made the kernel ~10% slower).
      acc += tile<scalar_t, kUnitW, kAux>(seg, disc, aux, p.disc.up ? g : out + row * p.W + w, p, n, h, w,
                                          len, disc_row.data(), aux_row.data());
      if (p.disc.up) add_to_column_bins(p.disc, w, len, g, out + row * p.disc.w);
    }
  }
  return acc;
}

// The same body compiled three times: AVX-512 (16 floats per instruction), AVX2+FMA (8) and the x86-64
// baseline (SSE2), picked at run time, because setup.py builds without -march so the wheel runs anywhere.
template <typename scalar_t, bool kUnitW, bool kAux>
__attribute__((target("avx2,fma"))) double block_avx2(const scalar_t* seg, const scalar_t* disc,
                                                      const scalar_t* aux, float* out, const Params& p,
                                                      int64_t row_begin, int64_t row_end) {
  return block_body<scalar_t, kUnitW, kAux>(seg, disc, aux, out, p, row_begin, row_end);
}

template <typename scalar_t, bool kUnitW, bool kAux>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
double block_avx512(const scalar_t* seg, const scalar_t* disc, const scalar_t* aux, float* out,
                    const Params& p, int64_t row_begin, int64_t row_end) {
  return block_body<scalar_t, kUnitW, kAux>(seg, disc, aux, out, p, row_begin, row_end);
}

template <typename scalar_t, bool kUnitW, bool kAux>
double block_default(const scalar_t* seg, const scalar_t* disc, const scalar_t* aux, float* out,
                     const Params& p, int64_t row_begin, int64_t row_end) {
  return block_body<scalar_t, kUnitW, kAux>(seg, disc, aux, out, p, row_begin, row_end);
}

// Parallel over blocks of whole rows, so every column bin of a row has one writer and is summed in
// column order. The partition depends on the shape only (not on the thread count), so the loss and
// the gradient have the same bits on every run and machine.
template <typename scalar_t, bool kUnitW, bool kAux>
double run_blocks(const scalar_t* seg, const scalar_t* disc, const scalar_t* aux, float* out,
                  const Params& p, int64_t rows) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  const int64_t rows_per_block = std::max<int64_t>(1, kBlock / p.W);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  std::vector<double> partial(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * rows_per_block, end = std::min(begin + rows_per_block, rows);
      partial[b] = avx512 ? block_avx512<scalar_t, kUnitW, kAux>(seg, disc, aux, out, p, begin, end)
                   : avx2   ? block_avx2<scalar_t, kUnitW, kAux>(seg, disc, aux, out, p, begin, end)
                            : block_default<scalar_t, kUnitW, kAux>(seg, disc, aux, out, p, begin, end);
    }
  });
  double total = 0.0;
  for (const double v : partial) total += v;  // fixed order: deterministic whatever the threads did
  return total;
}

template <typename scalar_t>
double dispatch_layout(const at::Tensor& seg, const at::Tensor& disc, const std::optional<at::Tensor>& aux,
                       float* out, const Params& p, int64_t rows) {
  const scalar_t* s = seg.const_data_ptr<scalar_t>();
  const scalar_t* d = disc.const_data_ptr<scalar_t>();
  const scalar_t* a = aux.has_value() ? aux->const_data_ptr<scalar_t>() : nullptr;
  const bool unit = p.seg_sw == 1;
  if (aux.has_value()) {
    return unit ? run_blocks<scalar_t, true, true>(s, d, a, out, p, rows)
                : run_blocks<scalar_t, false, true>(s, d, a, out, p, rows);
  }
  return unit ? run_blocks<scalar_t, true, false>(s, d, a, out, p, rows)
              : run_blocks<scalar_t, false, false>(s, d, a, out, p, rows);
}

// The row half of the sampling's adjoint: grad (N, h, w) = sum over output rows y of
// (1 - row_l[y]) * bins[n, y] into map row row0[y] and row_l[y] * bins[n, y] into row1[y], y in order.
// One task per image, so the order, and the bits, do not depend on the thread count.
void fold_rows(const Map& m, const float* bins, int64_t N, int64_t H, float* grad) {
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* g = grad + n * m.h * m.w;
      for (int64_t y = 0; y < H; ++y) {
        const float* b = bins + (n * H + y) * m.w;
        const float l1 = m.row_l[y], l0 = 1.0f - l1;
        float* g0 = g + m.row0[y] * m.w;
        float* g1 = g + m.row1[y] * m.w;
        for (int64_t j = 0; j < m.w; ++j) g0[j] += l0 * b[j];
        for (int64_t j = 0; j < m.w; ++j) g1[j] += l1 * b[j];
      }
    }
  });
}

}  // namespace

void check_weighted_adv_loss_inputs(const at::Tensor& seg, const at::Tensor& disc,
                                    const std::optional<at::Tensor>& aux, double label) {
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
                                                             const std::optional<at::Tensor>& aux,
                                                             double label, double threshold, double floor,
                                                             double mu) {
  check_weighted_adv_loss_inputs(seg, disc, aux, label);
  TORCH_CHECK(seg.device().is_cpu(), "seg_logits must be a CPU tensor for the CPU kernel; got ", seg.device());
  const int64_t N = seg.size(0), H = seg.size(2), W = seg.size(3);
  const int64_t pixels = N * H * W;
  const auto f32 = seg.options().dtype(at::kFloat);
  MapTables disc_tables, aux_tables;
  const Map disc_map = disc_tables.build(disc, H, W);
  const Map aux_map = aux.has_value() ? aux_tables.build(*aux, H, W)
                                      : Map{0, 0, 0, 0, 0, false, nullptr, nullptr, nullptr, nullptr, nullptr,
                                            nullptr, nullptr};
  const Params p{seg.size(1), H, W,
                 seg.stride(0), seg.stride(1), seg.stride(2), seg.stride(3),
                 disc_map, aux_map,
                 static_cast<float>(label), static_cast<float>(1.0 - 2.0 * label), static_cast<float>(threshold),
                 static_cast<float>(floor), static_cast<float>(mu),
                 static_cast<float>(1.0 / static_cast<double>(pixels))};
  // Upsampled disc: (N*H, w) column bins, zeroed because tiles add into them; (4, 512, 32) floats for
  // the production 16x32 D map, 1/32 of the full-resolution gradient the adjoint used to read.
  at::Tensor out = disc_map.up ? at::zeros({N, H, disc_map.w}, f32) : at::empty({N, 1, H, W}, f32);
  float* o = out.data_ptr<float>();
  double total = 0.0;
  switch (seg.scalar_type()) {
    case at::kFloat: total = dispatch_layout<float>(seg, disc, aux, o, p, N * H); break;
    case at::kBFloat16: total = dispatch_layout<c10::BFloat16>(seg, disc, aux, o, p, N * H); break;
    default: total = dispatch_layout<c10::Half>(seg, disc, aux, o, p, N * H); break;  // dtype checked above
  }
  at::Tensor grad = out;
  if (disc_map.up) {
    grad = at::zeros({N, 1, disc_map.h, disc_map.w}, f32);
    fold_rows(disc_map, o, N, H, grad.data_ptr<float>());
  }
  auto loss = at::scalar_tensor(total / static_cast<double>(pixels), f32);
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
