// Adam's update of every parameter array in one XLA FFI call (see resnet_jax/training/fused_adam.py).
//
// optax's Adam is three elementwise passes per array (first moment, second moment, update),
// which XLA:CPU compiles as loops of their own: with the parameters' update, 294 of the 567
// fusions of a ResNet-34 train step. One call does the same arithmetic for all arrays, one pass
// over each.

#include <omp.h>

#include <algorithm>
#include <cmath>
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

#if defined(__x86_64__)
#define WITH_AVX2_CLONE __attribute__((target_clones("avx2", "default")))
#else
#define WITH_AVX2_CLONE
#endif

// The step's scalars, computed in JAX as optax computes them (float32 constants, the bias
// corrections' reciprocals), in the order of the `scalars` argument.
struct Scalars {
  float one_minus_b1, b1, one_minus_b2, b2, inv_correction1, inv_correction2, eps, eps_root, neg_lr,
      weight_decay;
};

// Where the weight decay goes: optax skips it when it is 0, Adam adds it to the gradient (L2),
// AdamW to the update.
enum Decay : int64_t { kNone = 0, kGradient = 1, kUpdate = 2 };

// Elements [begin, end) of one array. out = the update, or the new parameter with `apply`.
// Each line is one of optax's operations as XLA:CPU runs them: it multiplies by the bias
// corrections' reciprocals rather than dividing. XLA may also contract a multiply-add into an
// FMA, which this code never does (-ffp-contract=off), so results can differ in the last bit.
template <int64_t decay, bool apply>
WITH_AVX2_CLONE void Update(const Scalars& s, const float* __restrict__ g, const float* mu,
                            const float* nu, const float* p, float* out, float* new_mu,
                            float* new_nu, int64_t begin, int64_t end) {
  // The moments and parameters may be their own results (index for index), which is safe.
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    const float param = p[i];
    const float grad = decay == kGradient ? g[i] + s.weight_decay * param : g[i];
    const float m = s.one_minus_b1 * grad + s.b1 * mu[i];
    const float v = s.one_minus_b2 * (grad * grad) + s.b2 * nu[i];
    float u = (m * s.inv_correction1) / (std::sqrt(v * s.inv_correction2 + s.eps_root) + s.eps);
    if constexpr (decay == kUpdate) u = u + s.weight_decay * param;
    u = s.neg_lr * u;
    new_mu[i] = m;
    new_nu[i] = v;
    out[i] = apply ? param + u : u;
  }
}

using UpdateFn = void (*)(const Scalars&, const float*, const float*, const float*, const float*,
                         float*, float*, float*, int64_t, int64_t);

template <int64_t decay>
UpdateFn Pick(bool apply) {
  return apply ? Update<decay, true> : Update<decay, false>;
}

// Arguments: scalars, then n gradients, n first moments, n second moments, n parameters.
// Results: n updates (or new parameters), n first moments, n second moments. The moments and
// parameters may alias their results: each element is read before it is written.
ffi::Error Adam(F32 scalars, ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t decay,
                int64_t apply) {
  const size_t n = args.size() / 4;
  if (args.size() != 4 * n || rets.size() != 3 * n || scalars.element_count() != 10) {
    return ffi::Error::InvalidArgument("fused Adam: expected 4n arrays in, 3n out");
  }
  const UpdateFn update = decay == kGradient ? Pick<kGradient>(apply != 0)
                          : decay == kUpdate ? Pick<kUpdate>(apply != 0)
                                             : Pick<kNone>(apply != 0);
  Scalars s;
  std::copy_n(scalars.typed_data(), 10, &s.one_minus_b1);
  struct Array {
    const float *g, *mu, *nu, *p;
    float *out, *new_mu, *new_nu;
    int64_t size;
  };
  std::vector<Array> arrays(n);
  auto in = [&](size_t i) { return args.get<F32>(i).value(); };
  auto out = [&](size_t i) { return rets.get<F32>(i).value()->typed_data(); };
  for (size_t k = 0; k < n; ++k) {
    const F32 grad = in(k);
    arrays[k] = {grad.typed_data(), in(n + k).typed_data(), in(2 * n + k).typed_data(),
                 in(3 * n + k).typed_data(), out(k), out(n + k), out(2 * n + k),
                 static_cast<int64_t>(grad.element_count())};
  }
  // Work in chunks of 64k elements over all arrays, so that the many small arrays (BatchNorm)
  // and the few large ones (layer4's kernels) spread evenly over the threads.
  constexpr int64_t kChunk = 1 << 16;
  std::vector<std::pair<size_t, int64_t>> chunks;
  for (size_t k = 0; k < n; ++k) {
    for (int64_t b = 0; b < arrays[k].size; b += kChunk) chunks.emplace_back(k, b);
  }
  std::lock_guard<std::mutex> serial(resnet_jax::OneAtATime());
#pragma omp parallel for schedule(dynamic)
  for (int64_t c = 0; c < static_cast<int64_t>(chunks.size()); ++c) {
    const Array& a = arrays[chunks[c].first];
    const int64_t begin = chunks[c].second, end = std::min(begin + kChunk, a.size);
    update(s, a.g, a.mu, a.nu, a.p, a.out, a.new_mu, a.new_nu, begin, end);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdamUpdate, Adam,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("decay")
                                  .Attr<int64_t>("apply"));
