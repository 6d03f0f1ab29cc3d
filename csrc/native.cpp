// tokentrim._C: native CPU kernels of tokentrim's ops, registered as torch.ops.tokentrim_native.*
//
//   drift_topk(cand, prev, k, ph, pw) -> (drift [B,N] f32, topk_idx [B,k] i64, severity [B] f32)
//   drift_select(drift, k)            -> (topk_idx [B,k] i64, severity [B] f32)   (second stage only)
//   compact_kv(kv!, keep, kv_len)     -> new_len [B] i32                         (in place)
//
// Semantics are those of tokentrim/reference.py; tokentrim.ops validates arguments in Python
// first (same error classes and messages as every backend). The TORCH_CHECKs below are a second
// guard for direct callers: TORCH_CHECK_VALUE raises ValueError, TORCH_CHECK_TYPE TypeError.
//
// Built by setup.py (torch.utils.cpp_extension) without pybind11: the Python module is an empty
// shell whose import runs the static registrations below. Meta kernels give shapes to tracing.

#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

#ifndef TOKENTRIM_TORCH_VERSION
#define TOKENTRIM_TORCH_VERSION "unknown"
#endif

namespace tokentrim_native {
namespace {

bool is_float(const at::Tensor& t) {
  auto s = t.scalar_type();
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
}

// ------------------------------------------------------------------------------------- drift
void check_drift(const at::Tensor& cand, const at::Tensor& prev, int64_t k, int64_t ph, int64_t pw) {
  TORCH_CHECK_VALUE(cand.dim() == 5, "cand must have 5 dimensions, got shape ", cand.sizes());
  TORCH_CHECK_VALUE(prev.dim() == 5, "prev must have 5 dimensions, got shape ", prev.sizes());
  TORCH_CHECK_TYPE(is_float(cand), "cand must have dtype in (float32, float16, bfloat16), got ", cand.scalar_type());
  TORCH_CHECK_TYPE(is_float(prev), "prev must have dtype in (float32, float16, bfloat16), got ", prev.scalar_type());
  TORCH_CHECK_VALUE(cand.device() == prev.device(), "prev is on ", prev.device(), " but cand is on ", cand.device(),
                    "; all inputs must share a device");
  TORCH_CHECK_VALUE(ph >= 1 && pw >= 1, "patch must be a pair of positive ints (ph, pw), got (", ph, ", ", pw, ")");
  const int64_t B = cand.size(0), C = cand.size(2), H = cand.size(3), W = cand.size(4);
  TORCH_CHECK_VALUE(prev.size(0) == B && prev.size(2) == C && prev.size(3) == H && prev.size(4) == W,
                    "prev must be [B,F',C,H,W] with B, C, H, W equal to cand's, got cand ", cand.sizes(),
                    ", prev ", prev.sizes());
  TORCH_CHECK_VALUE(B >= 1 && cand.size(1) >= 1 && prev.size(1) >= 1 && C >= 1,
                    "cand and prev need B, F, C >= 1, got cand ", cand.sizes(), ", prev ", prev.sizes());
  TORCH_CHECK_VALUE(H > 0 && W > 0 && H % ph == 0 && W % pw == 0, "cand H, W = (", H, ", ", W,
                    ") must be positive multiples of patch (", ph, ", ", pw, ")");
  const int64_t N = (H / ph) * (W / pw);
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "k must be in [1, N=", N, "] (N = tokens per frame), got ", k);
  TORCH_CHECK_VALUE(N < (int64_t(1) << 32), "N=", N, " tokens per frame exceeds the 32-bit index packing");
}

// Sum over frames of one latent row: acc[w] = sum_f x[f, w] (x at base, frame stride sf, w stride sw).
template <typename T>
inline void frame_sum(const T* __restrict__ base, int64_t F, int64_t sf, int64_t W, int64_t sw,
                      float* __restrict__ acc) {
  std::fill(acc, acc + W, 0.f);
  for (int64_t f = 0; f < F; ++f) {
    const T* row = base + f * sf;
    if (sw == 1) {
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) acc[w] += static_cast<float>(row[w]);
    } else {
      for (int64_t w = 0; w < W; ++w) acc[w] += static_cast<float>(row[w * sw]);
    }
  }
}

inline void square_diff(float* __restrict__ sc, const float* __restrict__ sp, float inv_f, float inv_fp, int64_t W) {
#pragma omp simd
  for (int64_t w = 0; w < W; ++w) {
    const float d = sc[w] * inv_f - sp[w] * inv_fp;
    sc[w] = d * d;
  }
}

// drift[b, th*WT + wt] for every token row (b, th): the frame means of cand and prev are formed one
// latent row (c, h) at a time and their squared difference added to the token's sum; nothing but
// the drift is written.
template <typename T>
void drift_rows(const at::Tensor& cand, const at::Tensor& prev, int64_t ph, int64_t pw, float* drift) {
  const int64_t B = cand.size(0), F = cand.size(1), C = cand.size(2), H = cand.size(3), W = cand.size(4);
  const int64_t FP = prev.size(1);
  const int64_t HT = H / ph, WT = W / pw, N = HT * WT;
  const T* cp = cand.data_ptr<T>();
  const T* pp = prev.data_ptr<T>();
  const auto cs = cand.strides();
  const auto ps = prev.strides();
  const float inv_f = 1.f / static_cast<float>(F), inv_fp = 1.f / static_cast<float>(FP);
  // Grain: about 1M latent reads (a few hundred us) per task, so one 832x480 video (0.6M reads)
  // stays on one thread: waking a thread team costs more than it saves there, a lot more when the
  // machine is oversubscribed.
  const int64_t row_cost = C * ph * (F + FP) * W;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, row_cost));
  at::parallel_for(0, B * HT, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sc(W), sp(W), sq(WT);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / HT, th = r % HT;
      std::fill(sq.begin(), sq.end(), 0.f);
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < ph; ++i) {
          const int64_t h = th * ph + i;
          frame_sum(cp + b * cs[0] + c * cs[2] + h * cs[3], F, cs[1], W, cs[4], sc.data());
          frame_sum(pp + b * ps[0] + c * ps[2] + h * ps[3], FP, ps[1], W, ps[4], sp.data());
          square_diff(sc.data(), sp.data(), inv_f, inv_fp, W);  // sc[w] = (mean_c - mean_p)^2
          for (int64_t wt = 0; wt < WT; ++wt) {
            float acc = sq[wt];
            for (int64_t j = 0; j < pw; ++j) acc += sc[wt * pw + j];
            sq[wt] = acc;
          }
        }
      }
      float* out = drift + b * N + th * WT;
      for (int64_t wt = 0; wt < WT; ++wt) out[wt] = std::sqrt(sq[wt]);
    }
  });
}

// Top-k of each row of drift [B,N] (contiguous f32): keys pack the drift bits (sign cleared, so
// a NaN sorts first, as in the Triton kernel) above the complemented index, so one descending
// order is "larger drift first, ties toward the lower index". Partial selection, then a sort of
// the k winners only. severity = mean of the k selected drifts (accumulated in double).
void select_rows(const float* drift, int64_t B, int64_t N, int64_t k, int64_t* idx, float* sev) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, N));  // ~64k keys per task
  at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(N);
    for (int64_t b = begin; b < end; ++b) {
      const float* row = drift + b * N;
      for (int64_t n = 0; n < N; ++n) {
        uint32_t bits;
        std::memcpy(&bits, row + n, sizeof(bits));
        keys[n] = (uint64_t(bits & 0x7fffffffu) << 32) | uint64_t(0xffffffffu - uint32_t(n));
      }
      auto first = keys.begin(), kth = keys.begin() + k;
      if (k < N) std::nth_element(first, kth - 1, keys.end(), std::greater<uint64_t>());
      std::sort(first, kth, std::greater<uint64_t>());
      double total = 0.0;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t n = int64_t(0xffffffffu - uint32_t(keys[i] & 0xffffffffu));
        idx[b * k + i] = n;
        total += static_cast<double>(row[n]);
      }
      sev[b] = static_cast<float>(total / static_cast<double>(k));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drift_topk_cpu(const at::Tensor& cand_in, const at::Tensor& prev_in,
                                                              int64_t k, int64_t ph, int64_t pw) {
  check_drift(cand_in, prev_in, k, ph, pw);
  TORCH_CHECK_VALUE(cand_in.device().is_cpu(), "cand must be on cpu for the native kernel, got ", cand_in.device());
  at::Tensor cand = cand_in, prev = prev_in;
  if (cand.scalar_type() != prev.scalar_type()) {  // rare: mixed dtypes meet in fp32 (exact upcast)
    cand = cand.to(at::kFloat);
    prev = prev.to(at::kFloat);
  }
  const int64_t B = cand.size(0), N = (cand.size(3) / ph) * (cand.size(4) / pw);
  auto drift = at::empty({B, N}, cand.options().dtype(at::kFloat));
  auto idx = at::empty({B, k}, cand.options().dtype(at::kLong));
  auto sev = at::empty({B}, cand.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cand.scalar_type(), "tokentrim_native::drift_topk",
                                  [&] { drift_rows<scalar_t>(cand, prev, ph, pw, drift.data_ptr<float>()); });
  select_rows(drift.data_ptr<float>(), B, N, k, idx.data_ptr<int64_t>(), sev.data_ptr<float>());
  return {drift, idx, sev};
}

void check_select(const at::Tensor& drift, int64_t k) {
  TORCH_CHECK_VALUE(drift.dim() == 2, "drift must have 2 dimensions [B,N], got shape ", drift.sizes());
  TORCH_CHECK_TYPE(drift.scalar_type() == at::kFloat, "drift must have dtype float32, got ", drift.scalar_type());
  const int64_t N = drift.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "k must be in [1, N=", N, "] (N = tokens per frame), got ", k);
  TORCH_CHECK_VALUE(N < (int64_t(1) << 32), "N=", N, " exceeds the 32-bit index packing");
}

std::tuple<at::Tensor, at::Tensor> drift_select_cpu(const at::Tensor& drift_in, int64_t k) {
  check_select(drift_in, k);
  const at::Tensor drift = drift_in.contiguous();
  const int64_t B = drift.size(0), N = drift.size(1);
  auto idx = at::empty({B, k}, drift.options().dtype(at::kLong));
  auto sev = at::empty({B}, drift.options());
  select_rows(drift.data_ptr<float>(), B, N, k, idx.data_ptr<int64_t>(), sev.data_ptr<float>());
  return {idx, sev};
}

// ---------------------------------------------------------------------------------- compact
void check_compact(const at::Tensor& kv, const at::Tensor& keep, const at::Tensor& kv_len) {
  TORCH_CHECK_TYPE(is_float(kv), "kv must have dtype in (float32, float16, bfloat16), got ", kv.scalar_type());
  TORCH_CHECK_VALUE(kv.dim() >= 4, "kv must be [..., B, L, H, D] (at least 4 dims), got shape ", kv.sizes());
  const int64_t B = kv.size(-4), L = kv.size(-3);
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, "keep must have dtype in (bool), got ", keep.scalar_type());
  TORCH_CHECK_VALUE(keep.dim() == 2 && keep.size(0) == B && keep.size(1) == L, "keep must be [B=", B, ", L=", L,
                    "] to match kv ", kv.sizes(), ", got shape ", keep.sizes());
  TORCH_CHECK_TYPE(kv_len.scalar_type() == at::kInt || kv_len.scalar_type() == at::kLong,
                   "kv_len must have dtype in (int32, int64), got ", kv_len.scalar_type());
  TORCH_CHECK_VALUE(kv_len.dim() == 1 && kv_len.size(0) == B, "kv_len must be [B=", B, "], got shape ",
                    kv_len.sizes());
  TORCH_CHECK_VALUE(keep.device() == kv.device() && kv_len.device() == kv.device(), "kv, keep and kv_len must share a "
                    "device, got kv on ", kv.device(), ", keep on ", keep.device(), ", kv_len on ", kv_len.device());
}

// Stable in-place compaction. kv_len outside [0, L] is rejected (the check is free on CPU, as in
// tokentrim.ops). For each video the kept source rows (keep[b, j] and j < kv_len[b]) are listed once; then one pass per (leading index, video, head) copies
// row src[n] to row n. Rows only move down (src[n] >= n) and in increasing order, so a row is read
// before anything is written over it. Heads are merged into one row when [H, D] is contiguous.
at::Tensor compact_kv_cpu(at::Tensor kv, const at::Tensor& keep_in, const at::Tensor& kv_len_in) {
  check_compact(kv, keep_in, kv_len_in);
  TORCH_CHECK_VALUE(kv.device().is_cpu(), "kv must be on cpu for the native kernel, got ", kv.device());
  TORCH_CHECK_VALUE(at::has_internal_overlap(kv) != at::MemOverlap::Yes,
                    "kv must not have overlapping memory (e.g. an expanded tensor), got strides ", kv.strides());
  const int64_t nd = kv.dim();
  const int64_t B = kv.size(nd - 4), L = kv.size(nd - 3);
  int64_t H = kv.size(nd - 2), D = kv.size(nd - 1);
  const int64_t s_b = kv.stride(nd - 4), s_l = kv.stride(nd - 3);
  int64_t s_h = kv.stride(nd - 2), s_d = kv.stride(nd - 1);
  if (D == 1) s_d = 1;  // a single element per row: its stride never matters
  if (H > 1 && s_d == 1 && s_h == D) {
    D *= H;  // [H, D] contiguous: one row of H*D elements per token
    H = 1;
    s_h = 0;
  }
  const at::Tensor keep = keep_in.contiguous();
  const at::Tensor kv_len = kv_len_in.to(at::kLong).contiguous();
  auto new_len = at::empty({B}, kv_len_in.options().dtype(at::kInt));
  std::vector<std::vector<int64_t>> src(B);
  const bool* kp = keep.data_ptr<bool>();
  const int64_t* lp = kv_len.data_ptr<int64_t>();
  int32_t* np = new_len.data_ptr<int32_t>();
  if (B > 0) {
    const auto [lo, hi] = std::minmax_element(lp, lp + B);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi <= L, "kv_len values must be in [0, Lk_max=", L, "], got min ", *lo, ", max ",
                      *hi);
  }
  bool any_move = false;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lp[b];
    for (int64_t j = 0; j < n; ++j)
      if (kp[b * L + j]) src[b].push_back(j);
    np[b] = static_cast<int32_t>(src[b].size());
    for (int64_t i = 0; i < np[b] && !any_move; ++i) any_move = src[b][i] != i;
  }
  if (!any_move || kv.numel() == 0) return new_len;

  // Element offset of every leading index (e.g. each (layer, K/V)), so any leading strides work.
  std::vector<int64_t> lead{0};
  for (int64_t d = 0; d < nd - 4; ++d) {
    std::vector<int64_t> next;
    next.reserve(lead.size() * kv.size(d));
    for (int64_t o : lead)
      for (int64_t i = 0; i < kv.size(d); ++i) next.push_back(o + i * kv.stride(d));
    lead.swap(next);
  }
  const int64_t G = static_cast<int64_t>(lead.size());
  char* base = static_cast<char*>(kv.data_ptr());
  const int64_t isz = kv.element_size();
  const int64_t row_bytes = D * isz;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, L * row_bytes));
  at::parallel_for(0, G * B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t h = u % H, b = (u / H) % B, g = u / (H * B);
      char* p = base + (lead[g] + b * s_b + h * s_h) * isz;
      const std::vector<int64_t>& s = src[b];
      const int64_t n = static_cast<int64_t>(s.size());
      for (int64_t i = 0; i < n; ++i) {
        if (s[i] == i) continue;
        char* dst = p + i * s_l * isz;
        const char* from = p + s[i] * s_l * isz;
        if (s_d == 1) {
          std::memcpy(dst, from, row_bytes);
        } else {
          for (int64_t e = 0; e < D; ++e) std::memcpy(dst + e * s_d * isz, from + e * s_d * isz, isz);
        }
      }
    }
  });
  return new_len;
}

// ------------------------------------------------------------------------------------- meta
std::tuple<at::Tensor, at::Tensor, at::Tensor> drift_topk_meta(const at::Tensor& cand, const at::Tensor& prev,
                                                               int64_t k, int64_t ph, int64_t pw) {
  check_drift(cand, prev, k, ph, pw);
  const int64_t B = cand.size(0), N = (cand.size(3) / ph) * (cand.size(4) / pw);
  return {at::empty({B, N}, cand.options().dtype(at::kFloat)), at::empty({B, k}, cand.options().dtype(at::kLong)),
          at::empty({B}, cand.options().dtype(at::kFloat))};
}

std::tuple<at::Tensor, at::Tensor> drift_select_meta(const at::Tensor& drift, int64_t k) {
  check_select(drift, k);
  return {at::empty({drift.size(0), k}, drift.options().dtype(at::kLong)), at::empty({drift.size(0)}, drift.options())};
}

at::Tensor compact_kv_meta(at::Tensor kv, const at::Tensor& keep, const at::Tensor& kv_len) {
  check_compact(kv, keep, kv_len);
  return at::empty({kv.size(-4)}, kv_len.options().dtype(at::kInt));
}

}  // namespace

TORCH_LIBRARY(tokentrim_native, m) {
  m.def("drift_topk(Tensor cand, Tensor prev, int k, int ph, int pw) -> (Tensor drift, Tensor topk_idx, "
        "Tensor severity)");
  m.def("drift_select(Tensor drift, int k) -> (Tensor topk_idx, Tensor severity)");
  m.def("compact_kv(Tensor(a!) kv, Tensor keep, Tensor kv_len) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokentrim_native, CPU, m) {
  m.impl("drift_topk", &drift_topk_cpu);
  m.impl("drift_select", &drift_select_cpu);
  m.impl("compact_kv", &compact_kv_cpu);
}

TORCH_LIBRARY_IMPL(tokentrim_native, Meta, m) {
  m.impl("drift_topk", &drift_topk_meta);
  m.impl("drift_select", &drift_select_meta);
  m.impl("compact_kv", &compact_kv_meta);
}

}  // namespace tokentrim_native

// The Python module: empty apart from what it was built against; importing it runs the
// registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "tokentrim._C", "tokentrim native CPU kernels "
                                   "(torch.ops.tokentrim_native)", -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod != nullptr && PyModule_AddStringConstant(mod, "torch_version", TOKENTRIM_TORCH_VERSION) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
