// Fused 2-D rotary embedding (Qwen2-VL vision, rotate-half convention) applied
// to q and k in one dispatch. q: (N, HQ, D), k: (N, HK, D); cosines, sines: (N, D)
// fp32 per-token angles ([row freqs, col freqs] twice). One thread per
// (pair i, head, token); heads [0, HQ) are q's, [HQ, HQ + HK) k's.
//   forward:  out_lo = x_lo cos_lo - x_hi sin_lo,  out_hi = x_hi cos_hi + x_lo sin_hi
//   BACKWARD (the transpose, for the vjp):
//             out_lo = x_lo cos_lo + x_hi sin_hi,  out_hi = x_hi cos_hi - x_lo sin_lo
// Template: T, HQ, HK, D, BACKWARD.
constexpr int HALF = D / 2;
const int i = thread_position_in_grid.x;
const int h = thread_position_in_grid.y;
const int64_t n = thread_position_in_grid.z;
const float c_lo = cosines[n * D + i], c_hi = cosines[n * D + i + HALF];
const float s_lo = sines[n * D + i], s_hi = sines[n * D + i + HALF];
const bool is_q = h < HQ;
const int64_t at = is_q ? (n * HQ + h) * D + i : (n * HK + h - HQ) * D + i;
const float lo = is_q ? float(q[at]) : float(k[at]);
const float hi = is_q ? float(q[at + HALF]) : float(k[at + HALF]);
const float out_lo = BACKWARD ? lo * c_lo + hi * s_hi : lo * c_lo - hi * s_lo;
const float out_hi = BACKWARD ? hi * c_hi - lo * s_lo : hi * c_hi + lo * s_hi;
if (is_q) {
  q_out[at] = T(out_lo);
  q_out[at + HALF] = T(out_hi);
} else {
  k_out[at] = T(out_lo);
  k_out[at + HALF] = T(out_hi);
}
