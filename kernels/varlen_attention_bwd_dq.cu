// Packed varlen attention, backward: dQ in its own kernel (no atomics); the CUDA
// counterpart of the Metal kernel. One thread per query row (64 per block),
// looping over the segment's keys in shared-memory tiles of KB rows:
//   p = exp(q.k * scale - lse), ds = p (dO.v - delta), dq += scale ds k.
// Template: T, H, D, KB.
constexpr int64_t STRIDE = H * D;
const int item = blockIdx.y;
const int head = blockIdx.z;
const int tid = threadIdx.x;
const int segment = items[2 * item];
const int seg_end = cu_seqlens[segment + 1];
const int row = items[2 * item + 1] + tid;
const bool row_in_segment = row < seg_end;
const float score_scale = scale[0] * kLog2e;
const float row_lse = row_in_segment ? lse[row * H + head] * kLog2e : 0.0f;
const float row_delta = row_in_segment ? delta[row * H + head] : 0.0f;

__shared__ float k_tile[KB * D];
__shared__ float v_tile[KB * D];

float q_row[D], do_row[D], dq_acc[D];
for (int d = 0; d < D; ++d) {
  const int64_t at = row * STRIDE + head * D + d;
  q_row[d] = row_in_segment ? to_float(q[at]) * score_scale : 0.0f;
  do_row[d] = row_in_segment ? to_float(d_out[at]) : 0.0f;
  dq_acc[d] = 0.0f;
}

for (int k0 = cu_seqlens[segment]; k0 < seg_end; k0 += KB) {
  __syncthreads();
  load_tile_pair<KB, H, D>(k_tile, v_tile, k, v, k0, seg_end, head);
  __syncthreads();

  const int n_keys = min(KB, seg_end - k0);
  for (int j = 0; j < n_keys; ++j) {
    float s = 0.0f, dp = 0.0f;
    for (int d = 0; d < D; ++d) {
      s += q_row[d] * k_tile[j * D + d];
      dp += do_row[d] * v_tile[j * D + d];
    }
    const float ds = exp2f(s - row_lse) * (dp - row_delta);
    for (int d = 0; d < D; ++d) {
      dq_acc[d] += ds * k_tile[j * D + d];
    }
  }
}

if (row_in_segment) {
  for (int d = 0; d < D; ++d) {
    dq[row * STRIDE + head * D + d] = T(dq_acc[d] * scale[0]);
  }
}
