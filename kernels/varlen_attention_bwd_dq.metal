// Packed varlen attention, backward: dQ (a separate kernel, so no atomics).
// One threadgroup per (segment, block of 32 query rows, head), looping over the
// segment's keys in tiles of KB rows:
//   P = exp(Q K^T * scale - lse), dS = P * (dO V^T - delta), dQ += scale * dS K.
// Inputs as the dK/dV kernel (items hold query blocks); output dq (tokens, H, D).
// Template: T, H, D, KB.
constexpr int DF = D / 8;
constexpr int KF = KB / 8;
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
const float row_lse = row_in_segment ? lse[row * H + head] * M_LOG2E_F : 0.0f;
const float row_delta = row_in_segment ? delta[row * H + head] : 0.0f;

threadgroup float k_tile[KB * D];
threadgroup float v_tile[KB * D];

frag8 q_frag[DF], do_frag[DF], dq_frag[DF];
for (int i = 0; i < DF; ++i) {
  const int64_t at = row * STRIDE + head * D + 8 * i + fc;
  for (int e = 0; e < 2; ++e) {
    q_frag[i].thread_elements()[e] = row_in_segment ? float(q[at + e]) * score_scale : 0.0f;
    do_frag[i].thread_elements()[e] = row_in_segment ? float(d_out[at + e]) : 0.0f;
  }
  fill_frag(dq_frag[i], 0.0f);
}

for (int k0 = cu_seqlens[segment]; k0 < seg_end; k0 += KB) {
  threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  load_tile_pair<KB, H, D>(k_tile, v_tile, k, v, k0, seg_end, head, tid);
  threadgroup_barrier(metal::mem_flags::mem_threadgroup);

  for (int j = 0; j < KF; ++j) {
    frag8 s, dp;  // (query, key)
    fill_frag(s, 0.0f);
    fill_frag(dp, 0.0f);
    for (int i = 0; i < DF; ++i) {
      frag8 b;  // K^T then V^T block: (d, key)
      load_frag(b, k_tile + 8 * j * D + 8 * i, 1, D, fr, fc);
      metal::simdgroup_multiply_accumulate(s, q_frag[i], b, s);
      load_frag(b, v_tile + 8 * j * D + 8 * i, 1, D, fr, fc);
      metal::simdgroup_multiply_accumulate(dp, do_frag[i], b, dp);
    }
    frag8 ds;
    for (int e = 0; e < 2; ++e) {
      const bool key_ok = k0 + 8 * j + fc + e < seg_end;
      const float p = key_ok ? metal::exp2(s.thread_elements()[e] - row_lse) : 0.0f;
      ds.thread_elements()[e] = p * (dp.thread_elements()[e] - row_delta);
    }
    for (int i = 0; i < DF; ++i) {
      frag8 kb;  // K block: (key, d)
      load_frag(kb, k_tile + 8 * j * D + 8 * i, D, 1, fr, fc);
      metal::simdgroup_multiply_accumulate(dq_frag[i], ds, kb, dq_frag[i]);
    }
  }
}

if (row_in_segment) {
  for (int i = 0; i < DF; ++i) {
    const int64_t at = row * STRIDE + head * D + 8 * i + fc;
    dq[at] = T(dq_frag[i].thread_elements()[0] * scale);
    dq[at + 1] = T(dq_frag[i].thread_elements()[1] * scale);
  }
}
