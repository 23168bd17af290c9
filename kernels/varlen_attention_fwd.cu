// Packed varlen attention, forward; the CUDA counterpart of the Metal kernel.
// q, k, v: (tokens, H, D); cu_seqlens: (S + 1,); items: (n, 2) = (segment, first
// query row) per block, so the work follows sum(L_i^2). Outputs: out (tokens, H, D),
// lse (tokens, H). One thread per query row (64 per block); K/V tiles of BK rows
// in shared memory; online softmax per tile in log2 space, fp32 accumulation.
// Scalars arrive as pointers (scale[0]). Template: T, H, D, BK.
constexpr int64_t STRIDE = H * D;
const int item = blockIdx.y;
const int head = blockIdx.z;
const int tid = threadIdx.x;
const int segment = items[2 * item];
const int seg_end = cu_seqlens[segment + 1];
const int row = items[2 * item + 1] + tid;
const bool row_in_segment = row < seg_end;
const float score_scale = scale[0] * kLog2e;

__shared__ float k_tile[BK * D];
__shared__ float v_tile[BK * D];

float q_row[D];
float acc[D];
for (int d = 0; d < D; ++d) {
  q_row[d] = row_in_segment ? to_float(q[row * STRIDE + head * D + d]) * score_scale : 0.0f;
  acc[d] = 0.0f;
}

float m = -inf;
float l = 0.0f;
for (int k0 = cu_seqlens[segment]; k0 < seg_end; k0 += BK) {
  __syncthreads();
  load_tile_pair<BK, H, D>(k_tile, v_tile, k, v, k0, seg_end, head);
  __syncthreads();

  float s[BK];
  float m_new = m;
  for (int j = 0; j < BK; ++j) {
    float dot = 0.0f;
    for (int d = 0; d < D; ++d) {
      dot += q_row[d] * k_tile[j * D + d];
    }
    s[j] = k0 + j < seg_end ? dot : -inf;
    m_new = fmaxf(m_new, s[j]);
  }
  const float correction = exp2f(m - m_new);
  l *= correction;
  for (int d = 0; d < D; ++d) {
    acc[d] *= correction;
  }
  for (int j = 0; j < BK; ++j) {
    const float p = exp2f(s[j] - m_new);
    l += p;
    for (int d = 0; d < D; ++d) {
      acc[d] += p * v_tile[j * D + d];
    }
  }
  m = m_new;
}

if (row_in_segment) {
  const float inv_l = 1.0f / l;
  for (int d = 0; d < D; ++d) {
    out[row * STRIDE + head * D + d] = T(acc[d] * inv_l);
  }
  lse[row * H + head] = (m + log2f(l)) * kLn2;
}
