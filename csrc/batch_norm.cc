// BatchNorm's per-channel reductions on CPU, as XLA FFI handlers (see resnet_jax/ops/extension.py).
//
// XLA:CPU computes each per-channel sum of an NHWC activation as its own pass, and first writes
// out x - shift when two sums share it (benchmarks/RESULTS.md: what that costs). Here each
// pair of sums is one pass over the data, split by rows over OpenMP threads, summed in float
// over blocks of rows and in double across blocks (so that one shifted pass is as accurate as
// two).

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace resnet_jax {
std::mutex& OneAtATime();  // shared with the convolutions: one OpenMP team on the cores
}

namespace {

using F32 = ffi::Buffer<ffi::F32>;

// Rows per block summed in float before the block's sums are added in double: short float
// sums keep the rounding error near float's epsilon, and float lanes are twice as wide.
constexpr int64_t kBlock = 64;

#if defined(__x86_64__)
#define WITH_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define WITH_AVX2_CLONE
#endif

// Adds the sums over rows [begin, end) of da = a - shift_a and da * db (db = b - shift_b)
// into p1 and p2. Built for AVX2 too where the CPU has it (the loops vectorise over channels).
WITH_AVX2_CLONE void AddSums(
    const float* __restrict__ a, const float* __restrict__ b, const float* __restrict__ shift_a,
    const float* __restrict__ shift_b, int64_t begin, int64_t end, int64_t c,
    float* __restrict__ f1, float* __restrict__ f2, double* __restrict__ p1,
    double* __restrict__ p2) {
  for (int64_t block = begin; block < end; block += kBlock) {
    std::fill(f1, f1 + c, 0.0f);
    std::fill(f2, f2 + c, 0.0f);
    for (int64_t r = block; r < std::min(block + kBlock, end); ++r) {
      const float* ra = a + r * c;
      const float* rb = b + r * c;
      for (int64_t j = 0; j < c; ++j) {
        const float da = ra[j] - shift_a[j];
        f1[j] += da;
        f2[j] += da * (rb[j] - shift_b[j]);
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      p1[j] += f1[j];
      p2[j] += f2[j];
    }
  }
}

// Sums over the rows of two [rows, c] arrays, one pass: s1 = sum(a - shift_a),
// s2 = sum((a - shift_a) * (b - shift_b)).
void PairedSums(const float* a, const float* b, const float* shift_a, const float* shift_b,
                int64_t rows, int64_t c, double* s1, double* s2) {
  // Maps under 64k values (layer4 at small batch sizes) stay on one thread.
  const int threads = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), rows * c / 65536)));
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * c, 0.0);
  std::vector<float> blocks(static_cast<size_t>(threads) * 2 * c);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    double* p = partial.data() + static_cast<size_t>(t) * 2 * c;
    float* f = blocks.data() + static_cast<size_t>(t) * 2 * c;
    AddSums(a, b, shift_a, shift_b, rows * t / threads, rows * (t + 1) / threads, c, f, f + c,
            p, p + c);
  }
  std::fill(s1, s1 + c, 0.0);
  std::fill(s2, s2 + c, 0.0);
  for (int t = 0; t < threads; ++t) {
    const double* p = partial.data() + static_cast<size_t>(t) * 2 * c;
    for (int64_t j = 0; j < c; ++j) {
      s1[j] += p[j];
      s2[j] += p[c + j];
    }
  }
}

int64_t Rows(const F32& x) {
  int64_t rows = 1;
  auto dims = x.dimensions();
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  return rows;
}

// Mean and biased variance over all axes but the last, shifted by the first row against
// cancellation when |mean| >> std.
ffi::Error Moments(F32 x, ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var) {
  const int64_t c = x.dimensions().back(), rows = Rows(x);
  const float* data = x.typed_data();
  std::vector<float> shift(data, data + c);
  std::vector<double> s1(c), s2(c);
  {
    std::lock_guard<std::mutex> serial(resnet_jax::OneAtATime());
    PairedSums(data, data, shift.data(), shift.data(), rows, c, s1.data(), s2.data());
  }
  for (int64_t j = 0; j < c; ++j) {
    const double m = s1[j] / rows;
    mean->typed_data()[j] = static_cast<float>(shift[j] + m);
    var->typed_data()[j] = static_cast<float>(std::max(s2[j] / rows - m * m, 0.0));
  }
  return ffi::Error::Success();
}

// The two sums BatchNorm's backward needs: sum(g) and sum(g * (x - mean)).
ffi::Error GradSums(F32 g, F32 x, F32 mean, ffi::ResultBuffer<ffi::F32> sum_g,
                    ffi::ResultBuffer<ffi::F32> sum_gx) {
  const int64_t c = x.dimensions().back(), rows = Rows(x);
  std::vector<float> zero(c, 0.0f);
  std::vector<double> s1(c), s2(c);
  {
    std::lock_guard<std::mutex> serial(resnet_jax::OneAtATime());
    PairedSums(g.typed_data(), x.typed_data(), zero.data(), mean.typed_data(), rows, c,
               s1.data(), s2.data());
  }
  for (int64_t j = 0; j < c; ++j) {
    sum_g->typed_data()[j] = static_cast<float>(s1[j]);
    sum_gx->typed_data()[j] = static_cast<float>(s2[j]);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchNormMoments, Moments,
                              ffi::Ffi::Bind().Arg<F32>().Ret<F32>().Ret<F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    BatchNormGradSums, GradSums,
    ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Arg<F32>().Ret<F32>().Ret<F32>());
