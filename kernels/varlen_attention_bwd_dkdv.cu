// Packed varlen attention, backward: dK and dV, no atomics; the CUDA counterpart
// of the Metal kernel. One thread per key row (64 per block), looping over the
// segment's queries in shared-memory tiles of QB rows:
//   p = exp(k.q * scale - lse_q), dv += p dO_q, ds = p (v.dO_q - delta_q), dk += scale ds q.
// Template: T, H, D, QB.
constexpr int64_t STRIDE = H * D;
const int item = blockIdx.y;
const int head = blockIdx.z;
const int tid = threadIdx.x;
const int segment = items[2 * item];
const int seg_end = cu_seqlens[segment + 1];
const int key_row = items[2 * item + 1] + tid;
const bool key_in_segment = key_row < seg_end;
const float score_scale = scale[0] * kLog2e;

__shared__ float q_tile[QB * D];
__shared__ float do_tile[QB * D];
__shared__ float lse_tile[QB];
__shared__ float delta_tile[QB];

float k_row[D], v_row[D], dk_acc[D], dv_acc[D];
for (int d = 0; d < D; ++d) {
  const int64_t at = key_row * STRIDE + head * D + d;
  k_row[d] = key_in_segment ? to_float(k[at]) * score_scale : 0.0f;
  v_row[d] = key_in_segment ? to_float(v[at]) : 0.0f;
  dk_acc[d] = 0.0f;
  dv_acc[d] = 0.0f;
}

for (int q0 = cu_seqlens[segment]; q0 < seg_end; q0 += QB) {
  __syncthreads();
  load_tile_pair<QB, H, D>(q_tile, do_tile, q, d_out, q0, seg_end, head);
  for (int j = tid; j < QB; j += blockDim.x) {
    const int query = q0 + j;
    // +inf makes p exactly 0 for queries past the segment end
    lse_tile[j] = query < seg_end ? lse[query * H + head] * kLog2e : inf;
    delta_tile[j] = query < seg_end ? delta[query * H + head] : 0.0f;
  }
  __syncthreads();

  for (int j = 0; j < QB; ++j) {
    float s = 0.0f, dp = 0.0f;
    for (int d = 0; d < D; ++d) {
      s += k_row[d] * q_tile[j * D + d];
      dp += v_row[d] * do_tile[j * D + d];
    }
    const float p = exp2f(s - lse_tile[j]);
    const float ds = p * (dp - delta_tile[j]);
    for (int d = 0; d < D; ++d) {
      dv_acc[d] += p * do_tile[j * D + d];
      dk_acc[d] += ds * q_tile[j * D + d];
    }
  }
}

if (key_in_segment) {
  for (int d = 0; d < D; ++d) {
    const int64_t at = key_row * STRIDE + head * D + d;
    dk[at] = T(dk_acc[d] * scale[0]);
    dv[at] = T(dv_acc[d]);
  }
}
