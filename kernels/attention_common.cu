// Helpers shared by the CUDA kernels; passed to mx.fast.cuda_kernel as `header`.
// MLX's default header comes first (device/utils.cuh with the fp16/bf16 types,
// cooperative_groups, and the `inf` macro used below). MLX's NVRTC include path
// has the CUDA toolkit's include folder, where mma.h (WMMA) lives.
#include <mma.h>

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.69314718055994531f;

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}
