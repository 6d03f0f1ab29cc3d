// CUB second stage of drift_topk on CUDA: the top-k of each row of drift [B,N] (fp32, >= 0),
// largest first, ties toward the lower index, and its mean (the severity).
//
// A plain CUDA-runtime interface (no torch headers), so the .cu compiles on its own with nvcc
// (CI compiles it for sm_90a as a check) and the torch binding stays in a .cpp file.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace tokentrim_cuda {

// Rows up to this many tokens are sorted by one thread block each, in shared memory (one launch,
// no workspace); longer rows go through cub::DeviceSegmentedRadixSort (three launches).
constexpr int64_t kBlockSelectMaxN = 4096;

// Bytes of device workspace drift_select needs for B rows of N (0 when N <= kBlockSelectMaxN).
// Returns cudaErrorInvalidValue when B*N does not fit CUB's int item count.
cudaError_t drift_select_workspace_bytes(int64_t B, int64_t N, size_t* bytes);

// drift: [B,N] fp32 contiguous device memory. Writes idx [B,k] int64 (decreasing drift, ties
// toward the lower index) and severity [B] fp32 (mean drift of the k selected). A NaN drift sorts
// first (its sign bit is ignored), as in the Triton and CPU kernels. Asynchronous on stream.
cudaError_t drift_select(const float* drift, int64_t B, int64_t N, int64_t k, int64_t* idx, float* severity,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace tokentrim_cuda
