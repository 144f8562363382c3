// Host helpers shared by the two launchers (lse_fwd.cu, lse_bwd.cu): the argument checks both
// entry points apply before anything is launched, the dtype → Path mapping, the alignment test that
// selects cp.async over the element-wise fallback, and the device queries.
//
// Functions here are `inline` in an anonymous namespace: each launcher's translation unit keeps its
// own internal copy, so the objects link into one extension without duplicate symbols, and a unit
// that does not use one of them gets no unused-function warning.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "lse_device.cuh"
#include "lse_kernels.h"

namespace ck_cuda {
namespace {

constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;

inline int pick_path(DType dt, bool allow_tf32) {
  switch (dt) {
    case DType::kFloat16:
      return kPathF16;
    case DType::kBFloat16:
      return kPathBF16;
    case DType::kFloat32:
    default:
      return allow_tf32 ? kPathTF32 : kPathF32;
  }
}

inline int64_t elem_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

inline bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// 16-byte vectors never straddle the end of a row nor an unaligned address.
inline bool vec_ok_for(const void* ptr, int64_t ld, int64_t D, DType dt) {
  const int64_t vec = 16 / elem_size(dt);
  return aligned(ptr, 16) && D % vec == 0 && ld % vec == 0;
}

inline int blocks_for(int64_t n) { return static_cast<int>((n + kTile - 1) / kTile); }

// The current device must be sm_80+ (see CK_ARCH_OK).
inline cudaError_t check_device_arch() {
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  return major >= 8 ? cudaSuccess : cudaErrorInvalidDeviceFunction;
}

inline bool sizes_ok(int64_t N, int64_t M, int64_t D, int64_t ldq, int64_t ldk) {
  return N >= 1 && M >= 1 && D >= 1 && N <= kMaxDim && M <= kMaxDim && D <= kMaxDim && ldq >= D && ldk >= D;
}

// SMs of the current device (the forward sizes its row groups by it). A failed query falls back to
// an H100's count rather than failing here.
inline int sm_count() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();  // not sticky; the launch that follows reports a real device problem
    return 132;                // H100 SXM
  }
  return sms;
}

}  // namespace
}  // namespace ck_cuda
