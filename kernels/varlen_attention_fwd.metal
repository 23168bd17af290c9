// Packed varlen attention, forward (FlashAttention-2 style).
// q, k, v: (tokens, H, D); cu_seqlens: (S + 1,); items: (n, 2) = (segment, first
// query row) per threadgroup, so the work follows sum(L_i^2) and not tokens^2.
// Outputs: out (tokens, H, D) and lse (tokens, H), the natural-log logsumexp.
// Threadgroup: 4 simdgroups x 8 query rows; K/V tiles of BK rows in threadgroup
// memory; 8x8 simdgroup matrices; online softmax in log2 space, fp32 throughout.
// Template: T (input dtype), H, D, BK.
constexpr int DF = D / 8;
constexpr int KF = BK / 8;
constexpr int64_t STRIDE = H * D;
const int item = threadgroup_position_in_grid.y;
const int head = threadgroup_position_in_grid.z;
const int tid = thread_index_in_threadgroup;
const ushort lane = thread_index_in_simdgroup;
const int segment = items[2 * item];
const int seg_end = cu_seqlens[segment + 1];
short fr, fc;
frag_coord(lane, fr, fc);
const int row = items[2 * item + 1] + 8 * simdgroup_index_in_threadgroup + fr;
const bool row_in_segment = row < seg_end;
const float score_scale = scale * M_LOG2E_F;

threadgroup float k_tile[BK * D];
threadgroup float v_tile[BK * D];

frag8 q_frag[DF];
frag8 o_frag[DF];
for (int i = 0; i < DF; ++i) {
  const int64_t at = row * STRIDE + head * D + 8 * i + fc;
  q_frag[i].thread_elements()[0] = row_in_segment ? float(q[at]) * score_scale : 0.0f;
  q_frag[i].thread_elements()[1] = row_in_segment ? float(q[at + 1]) * score_scale : 0.0f;
  fill_frag(o_frag[i], 0.0f);
}

float m = -INFINITY;  // running row max of the log2-scaled scores
float l = 0.0f;       // running row sum of exp2(score - m)
for (int k0 = cu_seqlens[segment]; k0 < seg_end; k0 += BK) {
  threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  load_tile_pair<BK, H, D>(k_tile, v_tile, k, v, k0, seg_end, head, tid);
  threadgroup_barrier(metal::mem_flags::mem_threadgroup);

  frag8 s[KF];
  float block_max = m;
  for (int j = 0; j < KF; ++j) {
    fill_frag(s[j], 0.0f);
    for (int i = 0; i < DF; ++i) {
      frag8 kt;  // K^T block: (d, key)
      load_frag(kt, k_tile + 8 * j * D + 8 * i, 1, D, fr, fc);
      metal::simdgroup_multiply_accumulate(s[j], q_frag[i], kt, s[j]);
    }
    for (int e = 0; e < 2; ++e) {
      if (k0 + 8 * j + fc + e >= seg_end) {
        s[j].thread_elements()[e] = -INFINITY;
      }
      block_max = metal::max(block_max, float(s[j].thread_elements()[e]));
    }
  }
  const float m_new = row_max(block_max);
  const float correction = metal::exp2(m - m_new);
  float block_sum = 0.0f;
  for (int j = 0; j < KF; ++j) {
    for (int e = 0; e < 2; ++e) {
      const float p = metal::exp2(s[j].thread_elements()[e] - m_new);
      s[j].thread_elements()[e] = p;
      block_sum += p;
    }
  }
  l = l * correction + row_sum(block_sum);
  m = m_new;
  for (int i = 0; i < DF; ++i) {
    o_frag[i].thread_elements() *= correction;
    for (int j = 0; j < KF; ++j) {
      frag8 vf;  // V block: (key, d)
      load_frag(vf, v_tile + 8 * j * D + 8 * i, D, 1, fr, fc);
      metal::simdgroup_multiply_accumulate(o_frag[i], s[j], vf, o_frag[i]);
    }
  }
}

if (row_in_segment) {
  const float inv_l = 1.0f / l;
  for (int i = 0; i < DF; ++i) {
    const int64_t at = row * STRIDE + head * D + 8 * i + fc;
    out[at] = T(o_frag[i].thread_elements()[0] * inv_l);
    out[at + 1] = T(o_frag[i].thread_elements()[1] * inv_l);
  }
  if (fc == 0) {
    lse[row * H + head] = (m + metal::log2(l)) * M_LN2_F;
  }
}
