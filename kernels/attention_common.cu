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

// Rows [first, first + ROWS) of one head of two (tokens, H, D) arrays into
// shared-memory tiles (ROWS, D) of type Out, zeros from row `end` on. Every
// thread of the block takes part; the caller synchronises around it.
template <int ROWS, int H, int D, typename Out, typename In>
__device__ __forceinline__ void load_tile_pair(Out* a_tile, Out* b_tile, const In* a, const In* b,
                                               int first, int end, int head) {
  for (int idx = threadIdx.x; idx < ROWS * D; idx += blockDim.x) {
    const int r = first + idx / D;
    const int64_t at = static_cast<int64_t>(r) * (H * D) + head * D + idx % D;
    a_tile[idx] = r < end ? Out(to_float(a[at])) : Out(0.0f);
    b_tile[idx] = r < end ? Out(to_float(b[at])) : Out(0.0f);
  }
}
