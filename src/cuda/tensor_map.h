#pragma once
// Tensor maps (the descriptors of the bulk tensor copies, TMA) of bf16 row-major matrices in 128-byte swizzled boxes:
// the layout the stream GEMM's and the fused training products' wgmma descriptors read (bulk_copy.cuh, sw128_desc).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/cuda_check.h"

namespace mamba3::cuda {

// The driver's cuTensorMapEncodeTiled, looked up once (the runtime does not export it).
inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
    MAMBA3_CUDA_CHECK(
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status));
    MAMBA3_CHECK(status == cudaDriverEntryPointSuccess && p, "the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A (rows × cols) bf16 matrix with rows `ld` elements apart, read in boxes of box_rows × box_cols (box_cols · 2 ≤ 128
// bytes), 128-byte swizzled; reads outside the matrix give zeros. `who` names the caller in the error.
inline CUtensorMap bf16_tensor_map(const void* base, int64_t rows, int64_t cols, int64_t ld, int box_rows, int box_cols,
                                   const char* who) {
  CUtensorMap map{};
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(ld) * 2};
  const cuuint32_t box[2] = {cuuint32_t(box_cols), cuuint32_t(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides,
                                    box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                    CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MAMBA3_CHECK(r == CUDA_SUCCESS, "{}: cuTensorMapEncodeTiled failed ({}) for a {}×{} matrix", who, int(r), rows, cols);
  return map;
}

}  // namespace mamba3::cuda
