// Fused 2-D rotary embedding for q and k in one launch; the CUDA counterpart of
// rope_2d.metal (same layout and formulas). Block = (D / 2, 1, 1), so the grid
// has no out-of-range threads. Template: T, HQ, HK, D, BACKWARD.
constexpr int HALF = D / 2;
const int i = threadIdx.x;
const int h = blockIdx.y;
const int64_t n = blockIdx.z;
const float c_lo = cosines[n * D + i], c_hi = cosines[n * D + i + HALF];
const float s_lo = sines[n * D + i], s_hi = sines[n * D + i + HALF];
const bool is_q = h < HQ;
const int64_t at = is_q ? (n * HQ + h) * D + i : (n * HK + h - HQ) * D + i;
const float lo = is_q ? static_cast<float>(q[at]) : static_cast<float>(k[at]);
const float hi = is_q ? static_cast<float>(q[at + HALF]) : static_cast<float>(k[at + HALF]);
const float out_lo = BACKWARD ? lo * c_lo + hi * s_hi : lo * c_lo - hi * s_lo;
const float out_hi = BACKWARD ? hi * c_hi - lo * s_lo : hi * c_hi + lo * s_hi;
if (is_q) {
  q_out[at] = T(out_lo);
  q_out[at + HALF] = T(out_hi);
} else {
  k_out[at] = T(out_lo);
  k_out[at + HALF] = T(out_hi);
}
