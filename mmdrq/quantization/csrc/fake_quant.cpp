// Double Rounding fake quantization on the CPU: functional._forward and
// functional._fused_backward, one pass over memory each, called straight
// from Python (cpu_kernels.py builds it). x has any shape; scale has one
// value, or one per row (x's dim 0), in any layout and a float type no
// wider than x's compute type (float, or double for double): the entry
// points make both contiguous and cast the scale, so a call costs Python
// no more than the call; outputs are fresh tensors of x's shape. A
// target is (down, lo, hi, up, grad_scale) with down = 2**-shift, up =
// 2**shift (grad_scale: the LSQ factor, backward only). Each thread takes
// blocks of one row: the first rounding (or the quotient x / s) into a
// local buffer, then every target from it.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// elements per work item (its buffers stay in the L1 cache)
constexpr int64_t BLOCK = 1024;

template <typename T>
inline T clip(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);  // NaN stays NaN, as torch.clamp
}

// the second rounding: 0 half-even (torch.round), 1 half-up, 2 floor
template <int MODE, typename T>
inline T round_mode(T v) {
  if constexpr (MODE == 0) {
    return std::nearbyint(v);
  } else if constexpr (MODE == 1) {
    return std::floor(v + T(0.5));
  } else {
    return std::floor(v);
  }
}

// the sum of v[0..n) in double, in LANES independent partial sums: a loop
// the compiler vectorizes without reordering any one sum
template <typename T>
inline double lane_sum(const T* v, int64_t n) {
  constexpr int64_t LANES = 16;
  double lanes[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    for (int64_t j = 0; j < LANES; ++j) {
      lanes[j] += double(v[i + j]);
    }
  }
  double total = 0.0;
  for (; i < n; ++i) {
    total += double(v[i]);
  }
  for (int64_t j = 0; j < LANES; ++j) {
    total += lanes[j];
  }
  return total;
}

struct Grid {
  std::vector<double> down, lo, hi, up, grad_scale;
};

Grid grid_of(const std::vector<std::vector<double>>& targets) {
  Grid g;
  for (const auto& t : targets) {
    TORCH_CHECK(t.size() == 5, "a target is (down, lo, hi, up, grad_scale)");
    g.down.push_back(t[0]);
    g.lo.push_back(t[1]);
    g.hi.push_back(t[2]);
    g.up.push_back(t[3]);
    g.grad_scale.push_back(t[4]);
  }
  return g;
}

// x as a contiguous (rows, cols) matrix, rows = the scale's values, and the
// scale as a contiguous (rows, 1) column in x's compute type
std::pair<at::Tensor, at::Tensor> as_rows(const at::Tensor& x,
                                          const at::Tensor& scale) {
  TORCH_CHECK(x.device().is_cpu() && scale.device().is_cpu(),
              "x and scale must be CPU tensors");
  const int64_t rows = scale.numel();
  TORCH_CHECK(rows == 1 || (x.dim() >= 1 && x.size(0) == rows),
              "scale has ", rows, " values: it must have one, or one per "
              "row of x, whose shape is ", x.sizes());
  const auto compute =
      c10::toRealValueType(at::toOpMathType(x.scalar_type()));
  TORCH_CHECK(c10::promoteTypes(scale.scalar_type(), compute) == compute,
              "a ", scale.scalar_type(), " scale is wider than x's compute "
              "type ", compute, ": the torch path computes in it");
  return {x.contiguous().view({rows, rows ? x.numel() / rows : 0}),
          scale.reshape({rows, 1}).to(compute).contiguous()};
}

template <typename scalar_t, int MODE>
std::vector<at::Tensor> forward_impl(const at::Tensor& x,
                                     const at::Tensor& scale, double h_lo_,
                                     double h_hi_, const Grid& g,
                                     at::IntArrayRef shape) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t nblk = std::max<int64_t>((cols + BLOCK - 1) / BLOCK, 1);
  const size_t n_t = g.down.size();
  std::vector<at::Tensor> outs;
  std::vector<scalar_t*> out_ptrs;
  for (size_t t = 0; t < n_t; ++t) {
    outs.push_back(at::empty(shape, x.options()));  // not a view of x
    out_ptrs.push_back(outs.back().data_ptr<scalar_t>());
  }
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const acc_t* sp = scale.data_ptr<acc_t>();
  const acc_t h_lo = h_lo_, h_hi = h_hi_;
  at::parallel_for(0, rows * nblk, 1, [&](int64_t b0, int64_t b1) {
    acc_t qh[BLOCK];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / nblk, c0 = (b % nblk) * BLOCK;
      const int64_t n = std::min(BLOCK, cols - c0);
      const scalar_t* xr = xp + r * cols + c0;
      const acc_t s = sp[r];
      for (int64_t i = 0; i < n; ++i) {
        qh[i] = clip<acc_t>(std::nearbyint(acc_t(xr[i]) / s), h_lo, h_hi);
      }
      for (size_t t = 0; t < n_t; ++t) {
        const acc_t down = g.down[t], lo = g.lo[t], hi = g.hi[t];
        const acc_t su = s * acc_t(g.up[t]);
        scalar_t* o = out_ptrs[t] + r * cols + c0;
        for (int64_t i = 0; i < n; ++i) {
          o[i] = scalar_t(clip<acc_t>(round_mode<MODE>(qh[i] * down), lo, hi) *
                          su);
        }
      }
    }
  });
  return outs;
}

// grads: one per target, x's shape and dtype. Returns grad_x (x's dtype,
// the straight-through gradients summed over the targets) and the scale's
// LSQ gradient (rows, 1), or (1, 1) summed over the rows if `whole`: per
// target grad_scale * sum(grad * (r - v)) inside the range, grad * q
// outside, with r = q or, for FIRST_ROUNDING, v rounded once.
template <typename scalar_t, int MODE, bool FIRST_ROUNDING>
std::vector<at::Tensor> backward_impl(const std::vector<at::Tensor>& grads,
                                      const at::Tensor& x,
                                      const at::Tensor& scale, double h_lo_,
                                      double h_hi_, const Grid& g,
                                      bool whole, at::IntArrayRef shape) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = x.size(0), cols = x.size(1);
  const int64_t nblk = std::max<int64_t>((cols + BLOCK - 1) / BLOCK, 1);
  const size_t n_t = g.down.size();
  TORCH_CHECK(grads.size() == n_t, "one gradient per target");
  std::vector<const scalar_t*> grad_ptrs;
  for (const auto& grad : grads) {
    TORCH_CHECK(grad.sizes() == x.sizes() && grad.is_contiguous() &&
                    grad.scalar_type() == x.scalar_type(),
                "each gradient must be a contiguous matrix like x's");
    grad_ptrs.push_back(grad.data_ptr<scalar_t>());
  }
  at::Tensor grad_x = at::empty(shape, x.options());
  std::vector<double> partial(rows * nblk * n_t, 0.0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* gxp = grad_x.data_ptr<scalar_t>();
  const acc_t* sp = scale.data_ptr<acc_t>();
  const acc_t h_lo = h_lo_, h_hi = h_hi_;
  at::parallel_for(0, rows * nblk, 1, [&](int64_t b0, int64_t b1) {
    acc_t d[BLOCK], gx[BLOCK], cb[BLOCK];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r = b / nblk, c0 = (b % nblk) * BLOCK;
      const int64_t n = std::min(BLOCK, cols - c0);
      const int64_t off = r * cols + c0;
      const scalar_t* xr = xp + off;
      const acc_t s = sp[r];
      for (int64_t i = 0; i < n; ++i) {
        d[i] = acc_t(xr[i]) / s;
        gx[i] = acc_t(0);
      }
      for (size_t t = 0; t < n_t; ++t) {
        const acc_t down = g.down[t], lo = g.lo[t], hi = g.hi[t];
        const scalar_t* gr = grad_ptrs[t] + off;
        for (int64_t i = 0; i < n; ++i) {
          // v = x / (s * 2**shift), exactly: a power of two scales the
          // rounded quotient without another rounding
          const acc_t v = d[i] * down;
          const bool inside = (v >= lo) & (v <= hi);
          const acc_t qh = clip<acc_t>(std::nearbyint(d[i]), h_lo, h_hi);
          acc_t q = clip<acc_t>(round_mode<MODE>(qh * down), lo, hi);
          if constexpr (FIRST_ROUNDING) {
            const acc_t once = clip<acc_t>(round_mode<MODE>(v), lo, hi);
            q = inside ? once : q;
          }
          const acc_t grad = acc_t(gr[i]);
          gx[i] += inside ? grad : acc_t(0);
          cb[i] = (inside ? q - v : q) * grad;
        }
        partial[b * n_t + t] = lane_sum(cb, n);
      }
      scalar_t* gxr = gxp + off;
      for (int64_t i = 0; i < n; ++i) {
        gxr[i] = scalar_t(gx[i]);
      }
    }
  });
  at::Tensor grad_s = at::empty({whole ? 1 : rows, 1}, scale.options());
  acc_t* gsp = grad_s.data_ptr<acc_t>();
  double all = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double row = 0.0;
    for (size_t t = 0; t < n_t; ++t) {
      double total = 0.0;
      for (int64_t k = 0; k < nblk; ++k) {
        total += partial[(r * nblk + k) * n_t + t];
      }
      row += total * g.grad_scale[t];
    }
    all += row;
    if (!whole) {
      gsp[r] = acc_t(row);
    }
  }
  if (whole) {
    gsp[0] = acc_t(all);
  }
  return {grad_x, grad_s};
}

#define DISPATCH_MODE(MODE_VALUE, ...)                 \
  [&] {                                                \
    switch (MODE_VALUE) {                              \
      case 0: { constexpr int MODE = 0; return __VA_ARGS__(); } \
      case 1: { constexpr int MODE = 1; return __VA_ARGS__(); } \
      case 2: { constexpr int MODE = 2; return __VA_ARGS__(); } \
      default: TORCH_CHECK(false, "rounding mode must be 0, 1 or 2"); \
    }                                                  \
  }()

std::vector<at::Tensor> forward(const at::Tensor& x, const at::Tensor& scale,
                                double h_lo, double h_hi,
                                const std::vector<std::vector<double>>& targets,
                                int64_t mode) {
  const auto [x2, s2] = as_rows(x, scale);
  const Grid g = grid_of(targets);
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "mmdrq_fake_quant_forward",
      [&] {
        return DISPATCH_MODE(mode, [&] {
          return forward_impl<scalar_t, MODE>(x2, s2, h_lo, h_hi, g,
                                              x.sizes());
        });
      });
}

// grads: one per target, x's shape (any layout and float type). Returns
// grad_x in x's shape and the scale's gradient as (rows, 1), or (1, 1).
std::vector<at::Tensor> backward(const std::vector<at::Tensor>& grads,
                                 const at::Tensor& x, const at::Tensor& scale,
                                 double h_lo, double h_hi,
                                 const std::vector<std::vector<double>>& targets,
                                 int64_t mode, bool first_rounding,
                                 bool whole) {
  const auto [x2, s2] = as_rows(x, scale);
  std::vector<at::Tensor> grads2;
  for (const auto& grad : grads) {
    TORCH_CHECK(grad.sizes() == x.sizes(), "a gradient of shape ",
                grad.sizes(), " for x of shape ", x.sizes());
    grads2.push_back(
        grad.to(x.scalar_type()).contiguous().view(x2.sizes()));
  }
  const Grid g = grid_of(targets);
  return AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, x.scalar_type(), "mmdrq_fake_quant_backward",
      [&] {
        return DISPATCH_MODE(mode, [&] {
          return first_rounding
                     ? backward_impl<scalar_t, MODE, true>(
                           grads2, x2, s2, h_lo, h_hi, g, whole, x.sizes())
                     : backward_impl<scalar_t, MODE, false>(
                           grads2, x2, s2, h_lo, h_hi, g, whole, x.sizes());
        });
      });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Double Rounding fake quantization, forward");
  m.def("backward", &backward, "its straight-through / LSQ backward");
}
