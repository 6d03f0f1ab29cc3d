// CUB-based top-k of drift rows: see drift_select.h. Keys pack the drift bits (sign cleared)
// above the complemented token index, so one descending radix sort of 64-bit keys orders by
// decreasing drift with ties toward the lower index; bit 63 is always 0 and is not sorted.
#include "drift_select.h"

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <climits>

namespace tokentrim_cuda {
namespace {

constexpr int kEndBit = 63;

__device__ __forceinline__ unsigned long long pack_key(float d, int64_t n) {
  const unsigned int bits = __float_as_uint(d) & 0x7fffffffu;
  return (static_cast<unsigned long long>(bits) << 32) | static_cast<unsigned int>(0xffffffffu - static_cast<unsigned int>(n));
}

__device__ __forceinline__ int64_t key_index(unsigned long long key) {
  return static_cast<int64_t>(0xffffffffu - static_cast<unsigned int>(key & 0xffffffffull));
}

__device__ __forceinline__ float key_drift(unsigned long long key) {
  return __uint_as_float(static_cast<unsigned int>(key >> 32));
}

// One block per row: load striped (coalesced; the order keys enter the sort does not matter, they
// carry their index), padding with key 0, which sorts after every real key (whose index bits are
// 0xffffffff - n > 0), sort descending into a striped arrangement (item i of thread
// t holds rank i*THREADS + t, so stores coalesce), write the first k, reduce their drift.
template <int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS) block_select_kernel(const float* __restrict__ drift, int64_t N, int64_t k,
                                                               int64_t* __restrict__ idx, float* __restrict__ sev) {
  using Sort = cub::BlockRadixSort<unsigned long long, THREADS, ITEMS>;
  using Reduce = cub::BlockReduce<float, THREADS>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Reduce::TempStorage reduce;
  } tmp;
  const int64_t b = blockIdx.x;
  const float* row = drift + b * N;
  unsigned long long keys[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t n = static_cast<int64_t>(i) * THREADS + threadIdx.x;
    keys[i] = n < N ? pack_key(row[n], n) : 0ull;
  }
  Sort(tmp.sort).SortDescendingBlockedToStriped(keys, 0, kEndBit);
  float part = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t rank = static_cast<int64_t>(i) * THREADS + threadIdx.x;
    if (rank < k) {
      idx[b * k + rank] = key_index(keys[i]);
      part += key_drift(keys[i]);
    }
  }
  __syncthreads();  // the union's sort storage is reused by the reduction
  const float total = Reduce(tmp.reduce).Sum(part);
  if (threadIdx.x == 0) sev[b] = total / static_cast<float>(k);
}

__global__ void pack_kernel(const float* __restrict__ drift, int64_t B, int64_t N, unsigned long long* __restrict__ keys,
                            int* __restrict__ offsets) {
  const int64_t total = B * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keys[i] = pack_key(drift[i], i % N);
    if (i % N == 0) offsets[i / N] = static_cast<int>(i);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) offsets[B] = static_cast<int>(total);
}

template <int THREADS>
__global__ void __launch_bounds__(THREADS) emit_kernel(const unsigned long long* __restrict__ sorted, int64_t N,
                                                       int64_t k, int64_t* __restrict__ idx, float* __restrict__ sev) {
  using Reduce = cub::BlockReduce<float, THREADS>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t b = blockIdx.x;
  float part = 0.f;
  for (int64_t r = threadIdx.x; r < k; r += THREADS) {
    const unsigned long long key = sorted[b * N + r];
    idx[b * k + r] = key_index(key);
    part += key_drift(key);
  }
  const float total = Reduce(tmp).Sum(part);
  if (threadIdx.x == 0) sev[b] = total / static_cast<float>(k);
}

size_t align_up(size_t x) { return (x + 255) & ~size_t(255); }

struct Layout {
  size_t keys_bytes, offsets_bytes, temp_bytes, total;
};

cudaError_t layout(int64_t B, int64_t N, Layout* out) {
  // B >= 1 and B*N <= INT_MAX also keep N below 2^32, the key's index bits
  if (B < 1 || N < 1 || B * N > INT_MAX) return cudaErrorInvalidValue;
  Layout l{};
  l.keys_bytes = align_up(static_cast<size_t>(B * N) * sizeof(unsigned long long));
  l.offsets_bytes = align_up(static_cast<size_t>(B + 1) * sizeof(int));
  cudaError_t err = cub::DeviceSegmentedRadixSort::SortKeysDescending(
      nullptr, l.temp_bytes, static_cast<const unsigned long long*>(nullptr), static_cast<unsigned long long*>(nullptr),
      static_cast<int>(B * N), static_cast<int>(B), static_cast<const int*>(nullptr), static_cast<const int*>(nullptr), 0,
      kEndBit);
  l.temp_bytes = align_up(l.temp_bytes);
  l.total = 2 * l.keys_bytes + l.offsets_bytes + l.temp_bytes;
  *out = l;
  return err;
}

}  // namespace

cudaError_t drift_select_workspace_bytes(int64_t B, int64_t N, size_t* bytes) {
  *bytes = 0;
  if (N >= 1 && N <= kBlockSelectMaxN) return cudaSuccess;
  Layout l;
  const cudaError_t err = layout(B, N, &l);
  if (err == cudaSuccess) *bytes = l.total;
  return err;
}

cudaError_t drift_select(const float* drift, int64_t B, int64_t N, int64_t k, int64_t* idx, float* severity,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (B < 1 || N < 1 || k < 1 || k > N || B > INT_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(B));
  if (N <= 1024) {
    block_select_kernel<128, 8><<<grid, 128, 0, stream>>>(drift, N, k, idx, severity);
    return cudaGetLastError();
  }
  if (N <= kBlockSelectMaxN) {
    block_select_kernel<256, 16><<<grid, 256, 0, stream>>>(drift, N, k, idx, severity);
    return cudaGetLastError();
  }
  Layout l;
  cudaError_t err = layout(B, N, &l);
  if (err != cudaSuccess) return err;
  if (workspace == nullptr || workspace_bytes < l.total) return cudaErrorInvalidValue;
  char* ws = static_cast<char*>(workspace);
  auto* keys_in = reinterpret_cast<unsigned long long*>(ws);
  auto* keys_out = reinterpret_cast<unsigned long long*>(ws + l.keys_bytes);
  int* offsets = reinterpret_cast<int*>(ws + 2 * l.keys_bytes);
  void* temp = ws + 2 * l.keys_bytes + l.offsets_bytes;
  const int64_t total = B * N;
  const unsigned int blocks = static_cast<unsigned int>((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
  pack_kernel<<<blocks, 256, 0, stream>>>(drift, B, N, keys_in, offsets);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  size_t temp_bytes = l.temp_bytes;
  err = cub::DeviceSegmentedRadixSort::SortKeysDescending(temp, temp_bytes, keys_in, keys_out, static_cast<int>(total),
                                                          static_cast<int>(B), offsets, offsets + 1, 0, kEndBit, stream);
  if (err != cudaSuccess) return err;
  emit_kernel<256><<<grid, 256, 0, stream>>>(keys_out, N, k, idx, severity);
  return cudaGetLastError();
}

}  // namespace tokentrim_cuda
