// Depthwise 2-D convolution for XLA:CPU (an XLA FFI handler): NHWC float32, any stride and
// padding, kernels up to 7x7, with an optional per-channel affine + ReLU6 epilogue, and an
// optional per-channel affine + ReLU6 prologue (the previous layer's inference BatchNorm, applied
// as the input is read, so that the previous layer's output needs no pass of its own).
//
// Why: XLA:CPU's loop for the same sum of shifted multiply-adds loads a weight vector for every
// tap of every output vector and is load-bound (29-51 GMAC/s on 2 AMD EPYC cores); here each
// 16-channel block keeps its kh*kw weight vectors in registers across a whole output row.
// Built on first use by kfor1/layers/native.py; rows are spread over XLA's intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int V = 16;
typedef float vf __attribute__((vector_size(V * sizeof(float))));

// Images are x's leading dimensions flattened (vmap over tasks adds one); each group of
// `per_kernel` consecutive images has its own kernel (and affine) when `kernel_stride` (and
// `affine_stride`) are non-zero, or shares one.
struct Geometry {
  int64_t n, h, w, c, kh, kw, sh, sw, pt, pl, oh, ow;
  bool affine, relu6;
  int64_t per_kernel = 1, kernel_stride = 0, affine_stride = 0;
  bool in_affine = false;
  int64_t in_affine_stride = 0;
  // cin > 0: x is the block's input (..., N, H, W, cin) and the depthwise input is its 1x1
  // expansion by a (cin, c) kernel, computed row by row in the prologue and never stored.
  int64_t cin = 0, expand_stride = 0;
};

// Where input element (ih, iw) of one 16-channel block lives: x itself, or a worker's scratch
// copy of the rows one output row reads, with the prologue applied.
struct Src {
  const float* base;
  int64_t row0, row, px;
  int64_t ring;  // > 0: input row ih is at slot ih % ring.
  const float* at(int64_t ih, int64_t iw) const {
    return base + (ring > 0 ? ih % ring : ih - row0) * row + iw * px;
  }
};

// Leading dimensions of a buffer of rank >= `inner`, multiplied out.
template <typename Dims>
int64_t leading(const Dims& d, size_t inner) {
  int64_t p = 1;
  for (size_t i = 0; i + inner < d.size(); ++i) p *= d[i];
  return p;
}

inline vf load(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof(vf)); return v; }
inline void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(vf)); }

inline vf clamp6(vf v) {
  const vf zero = {}, six = zero + 6.0f;
  v = v < zero ? zero : v;
  return v > six ? six : v;
}

inline vf epilogue(const Geometry& g, vf acc, vf a, vf b) {
  if (g.affine) acc = acc * a + b;
  if (g.relu6) {
    const vf zero = {}, six = zero + 6.0f;
    acc = acc < zero ? zero : acc;
    acc = acc > six ? six : acc;
  }
  return acc;
}

// B outputs of one row at once, away from the borders: with the kernel size and stride known at
// compile time the taps unroll, and input vectors shared by neighbouring outputs load once.
template <int KH, int KW, int SW, int B>
inline void interior(const Geometry& g, const Src& src, int64_t ih0, int64_t ow, int64_t c0,
                     const vf* wv, vf a, vf b, float* yrow) {
  vf acc[B] = {};
  const int64_t px = src.px;
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) {
    const float* xr = src.at(ih0 + i, ow * SW - g.pl);
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j) {
#pragma GCC unroll 8
      for (int q = 0; q < B; ++q) acc[q] += load(xr + (q * SW + j) * px) * wv[i * KW + j];
    }
  }
#pragma GCC unroll 8
  for (int q = 0; q < B; ++q) store(yrow + (ow + q) * g.c + c0, epilogue(g, acc[q], a, b));
}

struct Affines {
  const float *scale, *shift, *in_scale, *in_shift;
  const float* expand = nullptr;
};

// One input row of the expansion for channels [c0, c0 + V): xin (w pixels x cin) times
// expand[:, c0:c0 + V], then the affine and ReLU6, into sr (w vectors). Four pixels at a time
// share each weight vector load.
inline void expand_row(const Geometry& g, const float* xin, const float* we, vf ia, vf ib,
                       float* sr) {
  const int64_t cin = g.cin, c = g.c;
  int64_t iw = 0;
  for (; iw + 4 <= g.w; iw += 4) {
    const float* p = xin + iw * cin;
    vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t k = 0; k < cin; ++k) {
      const vf wk = load(we + k * c);
      a0 += p[k] * wk;
      a1 += p[cin + k] * wk;
      a2 += p[2 * cin + k] * wk;
      a3 += p[3 * cin + k] * wk;
    }
    store(sr + iw * V, clamp6(a0 * ia + ib));
    store(sr + (iw + 1) * V, clamp6(a1 * ia + ib));
    store(sr + (iw + 2) * V, clamp6(a2 * ia + ib));
    store(sr + (iw + 3) * V, clamp6(a3 * ia + ib));
  }
  for (; iw < g.w; ++iw) {
    const float* p = xin + iw * cin;
    vf a0 = {};
    for (int64_t k = 0; k < cin; ++k) a0 += p[k] * load(we + k * c);
    store(sr + iw * V, clamp6(a0 * ia + ib));
  }
}

// Output row r (image n = r / oh), channels [c0, c0 + V), reading the input through src.
template <int KH, int KW, int SW>
inline void row_block(const Geometry& g, const float* k_all, const Affines& af, float* y,
                      int64_t r, int64_t c0, const Src& src) {
  const int kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  const int64_t n = r / g.oh, oh = r % g.oh;
  const int64_t ih0 = oh * g.sh - g.pt;
  float* yrow = y + r * g.ow * g.c;
  const int64_t group = n / g.per_kernel;
  const float* k = k_all + group * g.kernel_stride;
  vf wv[(KH > 0 ? KH : 7) * (KW > 0 ? KW : 7)];
  for (int t = 0; t < kh * kw; ++t) wv[t] = load(k + t * g.c + c0);
  vf a = {}, b = {};
  if (g.affine) {
    a = load(af.scale + group * g.affine_stride + c0);
    b = load(af.shift + group * g.affine_stride + c0);
  }
  // Outputs [lo, hi) of this row read no padding; the row itself must not either.
  int64_t lo = g.ow, hi = g.ow;
  if (KH > 0 && SW > 0 && ih0 >= 0 && ih0 + KH <= g.h && g.w - KW + g.pl >= 0) {
    lo = std::min<int64_t>(g.ow, (g.pl + SW - 1) / SW);
    hi = std::max<int64_t>(lo, std::min<int64_t>(g.ow, (g.w - KW + g.pl) / SW + 1));
  }
  constexpr int B = (KH * KW > 16) ? 2 : 4;
  for (int64_t ow = lo; ow + B <= hi; ow += B)
    interior<(KH > 0 ? KH : 1), (KW > 0 ? KW : 1), (SW > 0 ? SW : 1), B>(
        g, src, ih0, ow, c0, wv, a, b, yrow);
  const int64_t done_hi = lo + (hi - lo) / B * B;
  for (int64_t ow = 0; ow < g.ow; ++ow) {
    if (ow == lo) ow = done_hi;  // Skip what the interior blocks wrote.
    if (ow >= g.ow) break;
    const int64_t iw0 = ow * g.sw - g.pl;
    vf acc = {};
    for (int i = 0; i < kh; ++i) {
      const int64_t ih = ih0 + i;
      if (ih < 0 || ih >= g.h) continue;
      const float* xr = src.at(ih, 0);
      for (int j = 0; j < kw; ++j) {
        const int64_t iw = iw0 + j;
        if (iw < 0 || iw >= g.w) continue;
        acc += load(xr + iw * src.px) * wv[i * kw + j];
      }
    }
    store(yrow + ow * g.c + c0, epilogue(g, acc, a, b));
  }
}

// Channels past the last full vector of output row r, one at a time.
inline void row_tail(const Geometry& g, const float* x, const float* k_all, const Affines& af,
                     float* y, int64_t r) {
  const int64_t n = r / g.oh, oh = r % g.oh;
  const int64_t ih0 = oh * g.sh - g.pt;
  float* yrow = y + r * g.ow * g.c;
  const int64_t xc = g.cin > 0 ? g.cin : g.c;
  const float* ximg = x + n * g.h * g.w * xc;
  const int64_t group = n / g.per_kernel;
  const float* k = k_all + group * g.kernel_stride;
  const float* expand = af.expand + group * g.expand_stride;
  const float* scale = af.scale + group * g.affine_stride;
  const float* shift = af.shift + group * g.affine_stride;
  const float* in_scale = af.in_scale + group * g.in_affine_stride;
  const float* in_shift = af.in_shift + group * g.in_affine_stride;
  for (int64_t c0 = g.c / V * V; c0 < g.c; ++c0) {
    for (int64_t ow = 0; ow < g.ow; ++ow) {
      const int64_t iw0 = ow * g.sw - g.pl;
      float acc = 0.f;
      for (int i = 0; i < g.kh; ++i) {
        const int64_t ih = ih0 + i;
        if (ih < 0 || ih >= g.h) continue;
        for (int j = 0; j < g.kw; ++j) {
          const int64_t iw = iw0 + j;
          if (iw < 0 || iw >= g.w) continue;
          float v = 0.f;
          if (g.cin > 0) {
            for (int64_t q = 0; q < g.cin; ++q)
              v += ximg[(ih * g.w + iw) * g.cin + q] * expand[q * g.c + c0];
          } else {
            v = ximg[(ih * g.w + iw) * g.c + c0];
          }
          if (g.in_affine) v = std::min(std::max(v * in_scale[c0] + in_shift[c0], 0.f), 6.f);
          acc += v * k[(i * g.kw + j) * g.c + c0];
        }
      }
      if (g.affine) acc = acc * scale[c0] + shift[c0];
      if (g.relu6) acc = std::min(std::max(acc, 0.f), 6.f);
      yrow[ow * g.c + c0] = acc;
    }
  }
}

// Output rows [row_begin, row_end). With the prologue, channel blocks are the outer loop, so
// that consecutive output rows share the transformed input rows: a ring of kh rows in scratch
// (kh * w * V floats), each input row transformed once per block and range.
template <int KH, int KW, int SW>
void rows(const Geometry& g, const float* x, const float* k_all, const Affines& af, float* y,
          float* scratch, int64_t row_begin, int64_t row_end) {
  const int64_t full = g.c / V * V;
  if (!g.in_affine) {
    for (int64_t r = row_begin; r < row_end; ++r) {
      const float* ximg = x + (r / g.oh) * g.h * g.w * g.c;
      for (int64_t c0 = 0; c0 < full; c0 += V)
        row_block<KH, KW, SW>(g, k_all, af, y, r, c0, Src{ximg + c0, 0, g.w * g.c, g.c, 0});
      if (full < g.c) row_tail(g, x, k_all, af, y, r);
    }
    return;
  }
  const int64_t slots = g.kh;
  int64_t slot_row[7], slot_img[7];
  for (int64_t c0 = 0; c0 < full; c0 += V) {
    for (int64_t t = 0; t < slots; ++t) slot_row[t] = slot_img[t] = -1;
    for (int64_t r = row_begin; r < row_end; ++r) {
      const int64_t n = r / g.oh, ih0 = (r % g.oh) * g.sh - g.pt;
      const int64_t xc = g.cin > 0 ? g.cin : g.c;
      const float* ximg = x + n * g.h * g.w * xc;
      const int64_t group = n / g.per_kernel;
      const vf ia = load(af.in_scale + group * g.in_affine_stride + c0);
      const vf ib = load(af.in_shift + group * g.in_affine_stride + c0);
      const int64_t ih_lo = std::max<int64_t>(ih0, 0);
      const int64_t ih_hi = std::min<int64_t>(ih0 + g.kh, g.h);
      for (int64_t ih = ih_lo; ih < ih_hi; ++ih) {
        const int64_t t = ih % slots;
        if (slot_row[t] == ih && slot_img[t] == n) continue;
        float* sr = scratch + t * g.w * V;
        if (g.cin > 0) {
          expand_row(g, ximg + ih * g.w * g.cin, af.expand + group * g.expand_stride + c0, ia,
                     ib, sr);
        } else {
          const float* xr = ximg + ih * g.w * g.c + c0;
          for (int64_t iw = 0; iw < g.w; ++iw)
            store(sr + iw * V, clamp6(load(xr + iw * g.c) * ia + ib));
        }
        slot_row[t] = ih;
        slot_img[t] = n;
      }
      row_block<KH, KW, SW>(g, k_all, af, y, r, c0, Src{scratch, 0, g.w * V, V, slots});
    }
  }
  if (full < g.c)
    for (int64_t r = row_begin; r < row_end; ++r) row_tail(g, x, k_all, af, y, r);
}

using RowFn = void (*)(const Geometry&, const float*, const float*, const Affines&, float*,
                       float*, int64_t, int64_t);

RowFn pick(int64_t kh, int64_t kw, int64_t sw) {
  if (kh == 3 && kw == 3 && sw == 1) return rows<3, 3, 1>;
  if (kh == 3 && kw == 3 && sw == 2) return rows<3, 3, 2>;
  if (kh == 5 && kw == 5 && sw == 1) return rows<5, 5, 1>;
  if (kh == 5 && kw == 5 && sw == 2) return rows<5, 5, 2>;
  return rows<0, 0, 0>;
}

struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mu;
  std::condition_variable cv;
};

// Runs fn(worker, begin, end) over [0, total) in chunks on the calling thread and the pool's
// threads; returns when every chunk is done. Unstarted pool tasks find no work and exit, so the
// caller never waits on a thread that did not get to run.
template <typename Fn>
void parallel_rows(ffi::ThreadPool& pool, int64_t total, int64_t workers, Fn fn) {
  const int64_t chunk = std::max<int64_t>(1, total / 64);
  const int64_t chunks = (total + chunk - 1) / chunk;
  auto shared = std::make_shared<Shared>();
  auto work = [=](int64_t worker) {
    Shared& s = *shared;
    for (int64_t i; (i = s.next.fetch_add(1)) < chunks;) {
      fn(worker, i * chunk, std::min(total, (i + 1) * chunk));
      if (s.done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(workers, chunks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work, t] { work(t + 1); });
  work(0);
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == chunks; });
}

// Kernel gradient: dk[i, j, c] = sum over n, oh, ow of x[n, oh*sh - pt + i, ow*sw - pl + j, c] *
// dy[n, oh, ow, c]. Each output row accumulates in registers (one vector per tap), rows add into
// a per-worker double-precision buffer, and the workers' buffers are summed at the end.
template <int KH, int KW>
void kernel_grad_rows(const Geometry& g, const float* x, const float* dy, double* acc_all,
                      int64_t row_begin, int64_t row_end) {
  const int kh = KH > 0 ? KH : g.kh, kw = KW > 0 ? KW : g.kw;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t n = r / g.oh, oh = r % g.oh;
    const int64_t ih0 = oh * g.sh - g.pt;
    const float* dyrow = dy + r * g.ow * g.c;
    const float* ximg = x + n * g.h * g.w * g.c;
    double* acc_out = acc_all + (n / g.per_kernel) * g.kernel_stride;
    int64_t c0 = 0;
    for (; c0 + V <= g.c; c0 += V) {
      vf acc[(KH > 0 ? KH : 7) * (KW > 0 ? KW : 7)];
      for (int t = 0; t < kh * kw; ++t) acc[t] = vf{};
      for (int64_t ow = 0; ow < g.ow; ++ow) {
        const vf d = load(dyrow + ow * g.c + c0);
        const int64_t iw0 = ow * g.sw - g.pl;
        for (int i = 0; i < kh; ++i) {
          const int64_t ih = ih0 + i;
          if (ih < 0 || ih >= g.h) continue;
          const float* xr = ximg + ih * g.w * g.c + c0;
          for (int j = 0; j < kw; ++j) {
            const int64_t iw = iw0 + j;
            if (iw < 0 || iw >= g.w) continue;
            acc[i * kw + j] += load(xr + iw * g.c) * d;
          }
        }
      }
      for (int t = 0; t < kh * kw; ++t)
        for (int v = 0; v < V; ++v) acc_out[t * g.c + c0 + v] += acc[t][v];
    }
    for (; c0 < g.c; ++c0) {
      for (int64_t ow = 0; ow < g.ow; ++ow) {
        const float d = dyrow[ow * g.c + c0];
        const int64_t iw0 = ow * g.sw - g.pl;
        for (int i = 0; i < kh; ++i) {
          const int64_t ih = ih0 + i;
          if (ih < 0 || ih >= g.h) continue;
          for (int j = 0; j < kw; ++j) {
            const int64_t iw = iw0 + j;
            if (iw < 0 || iw >= g.w) continue;
            acc_out[(i * kw + j) * g.c + c0] += ximg[(ih * g.w + iw) * g.c + c0] * d;
          }
        }
      }
    }
  }
}

ffi::Error DepthwiseKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dk,
                               int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  auto xd = x.dimensions(), yd = dy.dimensions(), kd = dk->dimensions();
  const size_t xr = xd.size(), yr = yd.size(), kr = kd.size();
  if (xr < 4 || yr != xr || kr != xr - 1 || kd[kr - 1] != xd[xr - 1] ||
      yd[yr - 1] != xd[xr - 1] || leading(yd, 3) != leading(xd, 3) ||
      leading(kd, 3) != leading(xd, 4))
    return ffi::Error::InvalidArgument(
        "kfor1 depthwise kernel gradient: expected x (...,N,H,W,C), dy (...,N,OH,OW,C), "
        "dk (...,kh,kw,C)");
  Geometry g{leading(xd, 3), xd[xr - 3], xd[xr - 2], xd[xr - 1], kd[kr - 3], kd[kr - 2],
             sh, sw, pt, pl, yd[yr - 3], yd[yr - 2], false, false};
  g.per_kernel = xd[xr - 4];
  g.kernel_stride = g.kh * g.kw * g.c;
  if (g.kh > 7 || g.kw > 7)
    return ffi::Error::InvalidArgument("kfor1 depthwise: kernels up to 7x7");
  const int64_t size = leading(kd, 3) * g.kh * g.kw * g.c;
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  std::vector<double> partial(workers * size, 0.0);
  auto fn = (g.kh == 3 && g.kw == 3)   ? kernel_grad_rows<3, 3>
            : (g.kh == 5 && g.kw == 5) ? kernel_grad_rows<5, 5>
                                       : kernel_grad_rows<0, 0>;
  const float *xp = x.typed_data(), *dp = dy.typed_data();
  double* buffers = partial.data();
  parallel_rows(pool, g.n * g.oh, workers, [=](int64_t worker, int64_t begin, int64_t end) {
    fn(g, xp, dp, buffers + worker * size, begin, end);
  });
  float* out = dk->typed_data();
  for (int64_t e = 0; e < size; ++e) {
    double sum = 0.0;
    for (int64_t w = 0; w < workers; ++w) sum += partial[w * size + e];
    out[e] = static_cast<float>(sum);
  }
  return ffi::Error::Success();
}

ffi::Error Depthwise(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                     ffi::Buffer<ffi::F32> in_scale, ffi::Buffer<ffi::F32> in_shift,
                     ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                     int64_t pl, bool affine, bool relu6, bool in_affine_relu6) {
  auto xd = x.dimensions(), yd = y->dimensions(), kd = k.dimensions();
  const size_t xr = xd.size(), yr = yd.size(), kr = kd.size();
  if (xr < 4 || yr != xr || kr < 3 || kd[kr - 1] != xd[xr - 1] || yd[yr - 1] != xd[xr - 1] ||
      leading(yd, 3) != leading(xd, 3))
    return ffi::Error::InvalidArgument(
        "kfor1 depthwise: expected x (...,N,H,W,C), k (...,kh,kw,C), y (...,N,OH,OW,C)");
  const int64_t groups = leading(xd, 4), c = xd[xr - 1];
  const int64_t kernel_groups = leading(kd, 3);
  const int64_t affine_groups = scale.element_count() / c;
  const int64_t in_groups = in_scale.element_count() / c;
  if ((kernel_groups != 1 && kernel_groups != groups) || scale.element_count() % c != 0 ||
      (affine_groups != 1 && affine_groups != groups) ||
      shift.element_count() != scale.element_count() || in_scale.element_count() % c != 0 ||
      (in_groups != 1 && in_groups != groups) ||
      in_shift.element_count() != in_scale.element_count())
    return ffi::Error::InvalidArgument(
        "kfor1 depthwise: kernel, scales and shifts must have x's leading dimensions or none");
  Geometry g{leading(xd, 3), xd[xr - 3], xd[xr - 2], c, kd[kr - 3], kd[kr - 2],
             sh, sw, pt, pl, yd[yr - 3], yd[yr - 2], affine, relu6};
  g.per_kernel = xd[xr - 4];
  g.kernel_stride = kernel_groups == 1 ? 0 : g.kh * g.kw * c;
  g.affine_stride = affine_groups == 1 ? 0 : c;
  g.in_affine = in_affine_relu6;
  g.in_affine_stride = in_groups == 1 ? 0 : c;
  if (g.kh > 7 || g.kw > 7)
    return ffi::Error::InvalidArgument("kfor1 depthwise: kernels up to 7x7");
  const float *xp = x.typed_data(), *kp = k.typed_data();
  const Affines af{scale.typed_data(), shift.typed_data(), in_scale.typed_data(),
                   in_shift.typed_data()};
  float* yp = y->typed_data();
  RowFn fn = pick(g.kh, g.kw, g.sw);
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  // Each worker's copy of the kh input rows of one 16-channel block, prologue applied.
  const int64_t scratch_size = g.in_affine ? g.kh * g.w * V : 0;
  std::vector<float> scratch(workers * scratch_size);
  float* sp = scratch.data();
  parallel_rows(pool, g.n * g.oh, workers, [=](int64_t worker, int64_t begin, int64_t end) {
    fn(g, xp, kp, af, yp, sp + worker * scratch_size, begin, end);
  });
  return ffi::Error::Success();
}

// An inference block's middle in one pass: the 1x1 expansion of x (..., N, H, W, cin) by
// expand (cin, C), its folded BatchNorm and ReLU6, the depthwise convolution, and the depthwise
// layer's folded BatchNorm and ReLU6. The expanded activation is never stored.
ffi::Error ExpandDepthwise(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> expand, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> shift,
                           ffi::Buffer<ffi::F32> in_scale, ffi::Buffer<ffi::F32> in_shift,
                           ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pl) {
  auto xd = x.dimensions(), yd = y->dimensions(), kd = k.dimensions(), ed = expand.dimensions();
  const size_t xr = xd.size(), yr = yd.size(), kr = kd.size(), er = ed.size();
  if (xr < 4 || yr != xr || kr < 3 || er < 2 || ed[er - 2] != xd[xr - 1] ||
      ed[er - 1] != kd[kr - 1] || yd[yr - 1] != kd[kr - 1] || leading(yd, 3) != leading(xd, 3))
    return ffi::Error::InvalidArgument(
        "kfor1 expand+depthwise: expected x (...,N,H,W,cin), expand (...,cin,C), "
        "k (...,kh,kw,C), y (...,N,OH,OW,C)");
  const int64_t groups = leading(xd, 4), c = kd[kr - 1];
  const int64_t kernel_groups = leading(kd, 3), expand_groups = leading(ed, 2);
  const int64_t affine_groups = scale.element_count() / c;
  const int64_t in_groups = in_scale.element_count() / c;
  auto fits = [&](int64_t g) { return g == 1 || g == groups; };
  if (!fits(kernel_groups) || !fits(expand_groups) || !fits(affine_groups) ||
      !fits(in_groups) || scale.element_count() % c != 0 ||
      shift.element_count() != scale.element_count() || in_scale.element_count() % c != 0 ||
      in_shift.element_count() != in_scale.element_count())
    return ffi::Error::InvalidArgument(
        "kfor1 expand+depthwise: kernels, scales and shifts must have x's leading dimensions "
        "or none");
  Geometry g{leading(xd, 3), xd[xr - 3], xd[xr - 2], c, kd[kr - 3], kd[kr - 2],
             sh, sw, pt, pl, yd[yr - 3], yd[yr - 2], true, true};
  g.per_kernel = xd[xr - 4];
  g.kernel_stride = kernel_groups == 1 ? 0 : g.kh * g.kw * c;
  g.affine_stride = affine_groups == 1 ? 0 : c;
  g.in_affine = true;
  g.in_affine_stride = in_groups == 1 ? 0 : c;
  g.cin = xd[xr - 1];
  g.expand_stride = expand_groups == 1 ? 0 : g.cin * c;
  if (g.kh > 7 || g.kw > 7)
    return ffi::Error::InvalidArgument("kfor1 depthwise: kernels up to 7x7");
  const float *xp = x.typed_data(), *kp = k.typed_data();
  Affines af{scale.typed_data(), shift.typed_data(), in_scale.typed_data(),
             in_shift.typed_data()};
  af.expand = expand.typed_data();
  float* yp = y->typed_data();
  RowFn fn = pick(g.kh, g.kw, g.sw);
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t scratch_size = g.kh * g.w * V;
  std::vector<float> scratch(workers * scratch_size);
  float* sp = scratch.data();
  parallel_rows(pool, g.n * g.oh, workers, [=](int64_t worker, int64_t begin, int64_t end) {
    fn(g, xp, kp, af, yp, sp + worker * scratch_size, begin, end);
  });
  return ffi::Error::Success();
}

// Per-channel sums of a and of a * b over the `inner` rows of each group (for BatchNorm:
// sum(x) and sum(x * x), or sum(dy) and sum(dy * x)), in one pass over both inputs. a and b are
// (groups, inner, C) in memory; the sums (groups, C) are accumulated in double precision.
ffi::Error ChannelSums(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> sum_a, ffi::ResultBuffer<ffi::F32> sum_ab,
                       int64_t inner_rank) {
  auto ad = a.dimensions();
  const size_t rank = ad.size();
  if (rank < 1 || b.element_count() != a.element_count() ||
      static_cast<size_t>(inner_rank) + 1 > rank)
    return ffi::Error::InvalidArgument("kfor1 channel sums: a and b of one shape (..., C)");
  const int64_t c = ad[rank - 1];
  int64_t inner = 1;
  for (size_t i = rank - 1 - inner_rank; i + 1 < rank; ++i) inner *= ad[i];
  const int64_t groups = c == 0 || inner == 0 ? 0 : a.element_count() / (inner * c);
  if (sum_a->element_count() != groups * c || sum_ab->element_count() != groups * c)
    return ffi::Error::InvalidArgument("kfor1 channel sums: outputs must be (..., C)");
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  const int64_t size = groups * c;
  std::vector<double> partial(workers * size * 2, 0.0);
  const float *ap = a.typed_data(), *bp = b.typed_data();
  double* buffers = partial.data();
  const int64_t rows_per_block = 64;
  const int64_t blocks_per_group = (inner + rows_per_block - 1) / rows_per_block;
  parallel_rows(pool, groups * blocks_per_group, workers,
                [=](int64_t worker, int64_t begin, int64_t end) {
    double* out = buffers + worker * size * 2;
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t group = blk / blocks_per_group;
      const int64_t r0 = (blk % blocks_per_group) * rows_per_block;
      const int64_t r1 = std::min(inner, r0 + rows_per_block);
      const float* ag = ap + group * inner * c;
      const float* bg = bp + group * inner * c;
      double* sa = out + group * c;
      double* sab = out + size + group * c;
      int64_t c0 = 0;
      for (; c0 + V <= c; c0 += V) {
        vf s1 = {}, s2 = {};
        for (int64_t r = r0; r < r1; ++r) {
          const vf va = load(ag + r * c + c0);
          s1 += va;
          s2 += va * load(bg + r * c + c0);
        }
        for (int v = 0; v < V; ++v) { sa[c0 + v] += s1[v]; sab[c0 + v] += s2[v]; }
      }
      for (; c0 < c; ++c0) {
        float s1 = 0.f, s2 = 0.f;
        for (int64_t r = r0; r < r1; ++r) {
          s1 += ag[r * c + c0];
          s2 += ag[r * c + c0] * bg[r * c + c0];
        }
        sa[c0] += s1;
        sab[c0] += s2;
      }
    }
  });
  float *oa = sum_a->typed_data(), *oab = sum_ab->typed_data();
  for (int64_t e = 0; e < size; ++e) {
    double t1 = 0.0, t2 = 0.0;
    for (int64_t w = 0; w < workers; ++w) {
      t1 += partial[w * size * 2 + e];
      t2 += partial[w * size * 2 + size + e];
    }
    oa[e] = static_cast<float>(t1);
    oab[e] = static_cast<float>(t2);
  }
  return ffi::Error::Success();
}

// Patches for a kh x kw convolution over few channels (the stem):
// out[n, oh, ow, (i * kw + j) * c + ch] = x[n, oh * sh - pt + i, ow * sw - pl + j, ch], zero
// outside x. XLA built the same array from kh * kw padded slices and a concatenation.
ffi::Error Im2col(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out,
                  int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pl) {
  auto xd = x.dimensions(), od = out->dimensions();
  const size_t xr = xd.size(), orank = od.size();
  if (xr < 4 || orank != xr || leading(od, 3) != leading(xd, 3) ||
      od[orank - 1] != kh * kw * xd[xr - 1])
    return ffi::Error::InvalidArgument(
        "kfor1 im2col: expected x (...,N,H,W,C) and out (...,N,OH,OW,kh*kw*C)");
  const int64_t n = leading(xd, 3), h = xd[xr - 3], w = xd[xr - 2], c = xd[xr - 1];
  const int64_t oh = od[orank - 3], ow = od[orank - 2], k = kh * kw * c;
  const float* xp = x.typed_data();
  float* op = out->typed_data();
  parallel_rows(pool, n * oh, std::max<int64_t>(1, pool.num_threads()),
                [=](int64_t, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t img = r / oh, ih0 = (r % oh) * sh - pt;
      const float* ximg = xp + img * h * w * c;
      float* orow = op + r * ow * k;
      for (int64_t o = 0; o < ow; ++o) {
        const int64_t iw0 = o * sw - pl;
        float* dst = orow + o * k;
        const bool inside_w = iw0 >= 0 && iw0 + kw <= w;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t ih = ih0 + i;
          if (inside_w && ih >= 0 && ih < h) {  // The kernel row's kw pixels are contiguous.
            const float* src = ximg + (ih * w + iw0) * c;
            for (int64_t t = 0; t < kw * c; ++t) dst[t] = src[t];
            dst += kw * c;
            continue;
          }
          for (int64_t j = 0; j < kw; ++j, dst += c) {
            const int64_t iw = iw0 + j;
            if (ih < 0 || ih >= h || iw < 0 || iw >= w) {
              for (int64_t ch = 0; ch < c; ++ch) dst[ch] = 0.f;
            } else {
              const float* src = ximg + (ih * w + iw) * c;
              for (int64_t ch = 0; ch < c; ++ch) dst[ch] = src[ch];
            }
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Kfor1ExpandDepthwise, ExpandDepthwise,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Kfor1Im2col, Im2col,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Kfor1ChannelSums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("inner_rank"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Kfor1DepthwiseKernelGrad, DepthwiseKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Kfor1DepthwiseConv, Depthwise,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sh")
                                  .Attr<int64_t>("sw")
                                  .Attr<int64_t>("pt")
                                  .Attr<int64_t>("pl")
                                  .Attr<bool>("affine")
                                  .Attr<bool>("relu6")
                                  .Attr<bool>("in_affine_relu6"));
