// Packed varlen attention, backward: dK and dV (no atomics).
// One threadgroup per (segment, block of 32 key rows, head): 4 simdgroups x 8 key
// rows, looping over the segment's queries in tiles of QB rows. With the
// forward's lse and delta = rowsum(dO * O):
//   P^T = exp(K Q^T * scale - lse), dV += P^T dO,
//   dS^T = P^T * (V dO^T - delta), dK += scale * dS^T Q.
// Inputs: q, k, v, d_out (tokens, H, D); lse, delta (tokens, H) fp32;
// cu_seqlens; items (n, 2) = (segment, first key row); scale.
// Outputs: dk, dv (tokens, H, D). Template: T, H, D, QB.
constexpr int DF = D / 8;
constexpr int QF = QB / 8;
constexpr int64_t STRIDE = H * D;
const int item = threadgroup_position_in_grid.y;
const int head = threadgroup_position_in_grid.z;
const int tid = thread_index_in_threadgroup;
const ushort lane = thread_index_in_simdgroup;
const int segment = items[2 * item];
const int seg_end = cu_seqlens[segment + 1];
short fr, fc;
frag_coord(lane, fr, fc);
const int key_row = items[2 * item + 1] + 8 * simdgroup_index_in_threadgroup + fr;
const bool key_in_segment = key_row < seg_end;
const float score_scale = scale * M_LOG2E_F;

threadgroup float q_tile[QB * D];
threadgroup float do_tile[QB * D];
threadgroup float lse_tile[QB];
threadgroup float delta_tile[QB];

frag8 k_frag[DF], v_frag[DF], dk_frag[DF], dv_frag[DF];
for (int i = 0; i < DF; ++i) {
  const int64_t at = key_row * STRIDE + head * D + 8 * i + fc;
  for (int e = 0; e < 2; ++e) {
    k_frag[i].thread_elements()[e] = key_in_segment ? float(k[at + e]) * score_scale : 0.0f;
    v_frag[i].thread_elements()[e] = key_in_segment ? float(v[at + e]) : 0.0f;
  }
  fill_frag(dk_frag[i], 0.0f);
  fill_frag(dv_frag[i], 0.0f);
}

for (int q0 = cu_seqlens[segment]; q0 < seg_end; q0 += QB) {
  threadgroup_barrier(metal::mem_flags::mem_threadgroup);
  load_tile_pair<QB, H, D>(q_tile, do_tile, q, d_out, q0, seg_end, head, tid);
  if (tid < QB) {
    const int query = q0 + tid;
    // +inf makes P exactly 0 for queries past the segment end
    lse_tile[tid] = query < seg_end ? lse[query * H + head] * M_LOG2E_F : INFINITY;
    delta_tile[tid] = query < seg_end ? delta[query * H + head] : 0.0f;
  }
  threadgroup_barrier(metal::mem_flags::mem_threadgroup);

  for (int j = 0; j < QF; ++j) {
    frag8 pt, dpt;  // (key, query)
    fill_frag(pt, 0.0f);
    fill_frag(dpt, 0.0f);
    for (int i = 0; i < DF; ++i) {
      frag8 b;  // Q^T then dO^T block: (d, query)
      load_frag(b, q_tile + 8 * j * D + 8 * i, 1, D, fr, fc);
      metal::simdgroup_multiply_accumulate(pt, k_frag[i], b, pt);
      load_frag(b, do_tile + 8 * j * D + 8 * i, 1, D, fr, fc);
      metal::simdgroup_multiply_accumulate(dpt, v_frag[i], b, dpt);
    }
    frag8 dst;
    for (int e = 0; e < 2; ++e) {
      const int col = 8 * j + fc + e;
      const float p = metal::exp2(pt.thread_elements()[e] - lse_tile[col]);
      pt.thread_elements()[e] = p;
      dst.thread_elements()[e] = p * (dpt.thread_elements()[e] - delta_tile[col]);
    }
    for (int i = 0; i < DF; ++i) {
      frag8 b;  // dO then Q block: (query, d)
      load_frag(b, do_tile + 8 * j * D + 8 * i, D, 1, fr, fc);
      metal::simdgroup_multiply_accumulate(dv_frag[i], pt, b, dv_frag[i]);
      load_frag(b, q_tile + 8 * j * D + 8 * i, D, 1, fr, fc);
      metal::simdgroup_multiply_accumulate(dk_frag[i], dst, b, dk_frag[i]);
    }
  }
}

if (key_in_segment) {
  for (int i = 0; i < DF; ++i) {
    const int64_t at = key_row * STRIDE + head * D + 8 * i + fc;
    for (int e = 0; e < 2; ++e) {
      dk[at + e] = T(dk_frag[i].thread_elements()[e] * scale);
      dv[at + e] = T(dv_frag[i].thread_elements()[e]);
    }
  }
}
