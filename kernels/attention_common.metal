// Helpers shared by the packed varlen attention kernels; passed to
// mx.fast.metal_kernel as `header`. MLX prepends its kernels/utils.h.
#include <metal_stdlib>
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>

typedef metal::simdgroup_matrix<float, 8, 8> frag8;

// The (row, column) of this lane's two elements (column, column + 1) in an
// 8x8 simdgroup matrix: the layout MLX's steel kernels rely on (mma.h get_coord).
// The four lanes holding one row differ in lane bits 0 and 3, hence the
// shuffle_xor(1) / shuffle_xor(8) row reductions below.
METAL_FUNC void frag_coord(ushort lane, thread short& row, thread short& col) {
  const short qid = lane / 4;
  row = (qid & 4) + (lane / 2) % 4;
  col = (qid & 2) * 2 + (lane % 2) * 2;
}

// Fragment (r, c) = src[r * row_stride + c * col_stride]: a transposed read is
// a matter of swapping the strides.
METAL_FUNC void load_frag(thread frag8& f, const threadgroup float* src, int row_stride,
                          int col_stride, short row, short col) {
  f.thread_elements()[0] = src[row * row_stride + col * col_stride];
  f.thread_elements()[1] = src[row * row_stride + (col + 1) * col_stride];
}

METAL_FUNC void fill_frag(thread frag8& f, float value) {
  f.thread_elements()[0] = value;
  f.thread_elements()[1] = value;
}

METAL_FUNC float row_max(float x) {
  x = metal::max(x, metal::simd_shuffle_xor(x, ushort(1)));
  return metal::max(x, metal::simd_shuffle_xor(x, ushort(8)));
}

METAL_FUNC float row_sum(float x) {
  x += metal::simd_shuffle_xor(x, ushort(1));
  return x + metal::simd_shuffle_xor(x, ushort(8));
}

// Rows [first, first + ROWS) of one head of two (tokens, H, D) arrays into fp32
// threadgroup tiles (ROWS, D), zeros from row `end` on. The threadgroup's 128
// threads share the work; the caller synchronises around it.
template <int ROWS, int H, int D, typename In>
METAL_FUNC void load_tile_pair(threadgroup float* a_tile, threadgroup float* b_tile, const device In* a,
                               const device In* b, int first, int end, int head, int tid) {
  for (int idx = tid; idx < ROWS * D; idx += 128) {
    const int r = first + idx / D;
    const int64_t at = int64_t(r) * (H * D) + head * D + idx % D;
    a_tile[idx] = r < end ? float(a[at]) : 0.0f;
    b_tile[idx] = r < end ? float(b[at]) : 0.0f;
  }
}
