// tokentrim._C_cuda: the CUDA implementation of torch.ops.tokentrim_native.drift_select (the CUB
// top-k stage of drift_topk, csrc/cuda/drift_select.cu). The op's schema and its CPU kernel live in
// tokentrim._C (csrc/native.cpp), which tokentrim.native loads first. Built by setup.py only when
// torch has CUDA and nvcc is found.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "drift_select.h"

namespace {

std::tuple<at::Tensor, at::Tensor> drift_select_cuda(const at::Tensor& drift_in, int64_t k) {
  TORCH_CHECK_VALUE(drift_in.dim() == 2, "drift must have 2 dimensions [B,N], got shape ", drift_in.sizes());
  TORCH_CHECK_TYPE(drift_in.scalar_type() == at::kFloat, "drift must have dtype float32, got ", drift_in.scalar_type());
  TORCH_CHECK_VALUE(drift_in.is_cuda(), "drift must be a CUDA tensor, got ", drift_in.device());
  const int64_t B = drift_in.size(0), N = drift_in.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "k must be in [1, N=", N, "] (N = tokens per frame), got ", k);
  c10::cuda::CUDAGuard guard(drift_in.device());
  const at::Tensor drift = drift_in.contiguous();
  auto idx = at::empty({B, k}, drift.options().dtype(at::kLong));
  auto sev = at::empty({B}, drift.options());
  if (B == 0) return {idx, sev};
  size_t ws_bytes = 0;
  cudaError_t err = tokentrim_cuda::drift_select_workspace_bytes(B, N, &ws_bytes);
  TORCH_CHECK_VALUE(err == cudaSuccess, "drift_select: B*N = ", B * N, " is too large for the CUB sort (",
                    cudaGetErrorString(err), ")");
  at::Tensor ws;  // rows of up to kBlockSelectMaxN tokens need none
  if (ws_bytes) ws = at::empty({static_cast<int64_t>(ws_bytes)}, drift.options().dtype(at::kByte));
  err = tokentrim_cuda::drift_select(drift.data_ptr<float>(), B, N, k, idx.data_ptr<int64_t>(), sev.data_ptr<float>(),
                                     ws_bytes ? ws.data_ptr() : nullptr, ws_bytes, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "drift_select CUDA launch failed: ", cudaGetErrorString(err));
  return {idx, sev};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokentrim_native, CUDA, m) { m.impl("drift_select", &drift_select_cuda); }

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "tokentrim._C_cuda",
                                   "tokentrim CUDA kernels (torch.ops.tokentrim_native, CUDA dispatch key)", -1,
                                   nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
