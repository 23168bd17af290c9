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

// ---- warp-level primitives and WMMA ---------------------------------------------
#define __align__(n) __attribute__((aligned(n)))
inline void __syncwarp(unsigned = 0xffffffffu) { emu::simd_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int mask) { return metal::simd_shuffle_xor(v, ushort(mask)); }

// WMMA fragments have no documented per-lane layout, so every lane here holds the
// whole tile: loads and mma_sync are exact, and code that (correctly) never relies
// on the layout behaves as on the GPU. A store writes only this lane's share (runs
// of 8 elements), so reading a stored tile without __syncwarp() sees stale data.
// The alignment and leading-dimension rules of the real API are enforced.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[rows * cols];
};

inline void check_pointer(const void* p, unsigned ldm, size_t elem_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 || (ldm * elem_bytes) % 16) {
    std::fprintf(stderr, "emulator: WMMA pointer not 32-byte aligned or ldm not a multiple of 16 bytes\n");
    std::exit(5);
  }
}

template <class Use, int M, int N, int K, class T, class Layout, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* p, unsigned ldm) {
  check_pointer(p, ldm, sizeof(P));
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.x[r * F::cols + c] = std::is_same_v<Layout, col_major> ? p[c * ldm + r] : p[r * ldm + c];
}
template <int M, int N, int K, class T, class P>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const P* p, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, sizeof(P));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.x[r * N + c] = layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c];
}
template <int M, int N, int K, class T, class P>
void store_matrix_sync(P* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, sizeof(P));
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      if (uint((r * N + c) / 8) % 32 == emu::me().lane)
        (layout == mem_col_major ? p[c * ldm + r] : p[r * ldm + c]) = f.x[r * N + c];
}
template <class Use, int M, int N, int K, class T, class Layout, class V>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V v) {
  for (auto& e : f.x) e = T(v);
}
template <int M, int N, int K, class TA, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TA, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += float(a.x[i * K + k]) * float(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda
