// Packed varlen attention, forward, on tensor cores (WMMA 16x16x16, fp16/bf16
// inputs, fp32 accumulation; head dims that are multiples of 16). Same inputs,
// outputs and work items as varlen_attention_fwd.cu, with 64 query rows per
// block: 4 warps x 16 rows. Per K/V tile of BK keys, each warp computes its
// 16 x BK scores S = Q K^T with WMMA, runs the online softmax (log2 space) on them
// in shared memory (two lanes per row), rescales its O accumulators and adds P V
// with WMMA. WMMA fragments have no documented element layout, so per-row work
// goes through shared memory. Template: T, H, D, BK.
namespace wmma = nvcuda::wmma;
constexpr int64_t STRIDE = H * D;
constexpr int DT = D / 16;
constexpr int BQ = 64;
const int item = blockIdx.y;
const int head = blockIdx.z;
const int tid = threadIdx.x;
const int warp = tid / 32;
const int lane = tid % 32;
const int segment = items[2 * item];
const int seg_end = cu_seqlens[segment + 1];
const int q0 = items[2 * item + 1];
const float score_scale = scale[0] * kLog2e;

__shared__ __align__(32) T q_tile[BQ * D];
__shared__ __align__(32) T k_tile[BK * D];
__shared__ __align__(32) T v_tile[BK * D];
__shared__ __align__(32) float scratch_all[4][16 * BK];  // scores, then O rows
__shared__ __align__(32) T p_all[4][16 * BK];
__shared__ float row_factor[4][16];
float* scratch = scratch_all[warp];
T* p_tile = p_all[warp];

for (int idx = tid; idx < BQ * D; idx += blockDim.x) {
  const int row = q0 + idx / D;
  q_tile[idx] = row < seg_end ? q[row * STRIDE + head * D + idx % D] : T(0.0f);
}

wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag[DT];
for (int t = 0; t < DT; ++t) {
  wmma::fill_fragment(o_frag[t], 0.0f);
}
const int my_row = lane / 2;               // the row this lane's softmax work is on
const int c_begin = (lane % 2) * (BK / 2);  // and its half of the columns
float m = -inf;
float l = 0.0f;

for (int k0 = cu_seqlens[segment]; k0 < seg_end; k0 += BK) {
  __syncthreads();
  load_tile_pair<BK, H, D>(k_tile, v_tile, k, v, k0, seg_end, head);
  __syncthreads();

  for (int n = 0; n < BK / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_frag;
    wmma::fill_fragment(s_frag, 0.0f);
    for (int kk = 0; kk < DT; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;  // K^T
      wmma::load_matrix_sync(a, q_tile + warp * 16 * D + kk * 16, D);
      wmma::load_matrix_sync(b, k_tile + n * 16 * D + kk * 16, D);
      wmma::mma_sync(s_frag, a, b, s_frag);
    }
    wmma::store_matrix_sync(scratch + n * 16, s_frag, BK, wmma::mem_row_major);
  }
  __syncwarp();

  float m_new = m;
  for (int c = c_begin; c < c_begin + BK / 2; ++c) {
    const float s = k0 + c < seg_end ? scratch[my_row * BK + c] * score_scale : -inf;
    scratch[my_row * BK + c] = s;
    m_new = fmaxf(m_new, s);
  }
  m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffff, m_new, 1));
  const float correction = exp2f(m - m_new);
  float block_sum = 0.0f;
  for (int c = c_begin; c < c_begin + BK / 2; ++c) {
    const float p = exp2f(scratch[my_row * BK + c] - m_new);
    p_tile[my_row * BK + c] = T(p);
    block_sum += p;
  }
  block_sum += __shfl_xor_sync(0xffffffff, block_sum, 1);
  l = l * correction + block_sum;
  m = m_new;
  if (c_begin == 0) {
    row_factor[warp][my_row] = correction;
  }
  __syncwarp();

  for (int t = 0; t < DT; ++t) {
    wmma::store_matrix_sync(scratch, o_frag[t], 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      scratch[e] *= row_factor[warp][e / 16];
    }
    __syncwarp();
    wmma::load_matrix_sync(o_frag[t], scratch, 16, wmma::mem_row_major);
    __syncwarp();
    for (int kk = 0; kk < BK / 16; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
      wmma::load_matrix_sync(pa, p_tile + kk * 16, BK);
      wmma::load_matrix_sync(vb, v_tile + kk * 16 * D + t * 16, D);
      wmma::mma_sync(o_frag[t], pa, vb, o_frag[t]);
    }
  }
}

const int row = q0 + warp * 16 + my_row;
if (c_begin == 0) {
  row_factor[warp][my_row] = 1.0f / l;
  if (row < seg_end) {
    lse[row * H + head] = (m + log2f(l)) * kLn2;
  }
}
__syncwarp();
for (int t = 0; t < DT; ++t) {
  wmma::store_matrix_sync(scratch, o_frag[t], 16, wmma::mem_row_major);
  __syncwarp();
  for (int e = lane; e < 256; e += 32) {
    const int out_row = q0 + warp * 16 + e / 16;
    if (out_row < seg_end) {
      out[out_row * STRIDE + head * D + t * 16 + e % 16] = T(scratch[e] * row_factor[warp][e / 16]);
    }
  }
  __syncwarp();
}
