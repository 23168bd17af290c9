// cuda_exec.h: run the CUDA source MLX would build for mx.fast.cuda_kernel on
// the CPU, with exec.h's fibers: a block is a threadgroup, __syncthreads a
// threadgroup barrier, __shared__ arrays static storage.
#pragma once
#include "exec.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define inf std::numeric_limits<float>::infinity()
#define threadIdx (emu::me().tpitg)
#define blockIdx (emu::S.tgpig)
#define blockDim (emu::S.tptg)
#define gridDim (emu::S.tgpg)
typedef _Float16 __half;
typedef bfloat16_t __nv_bfloat16;
namespace cooperative_groups {}
inline void __syncthreads() { emu::threadgroup_wait(); }
using std::min;
using std::max;
