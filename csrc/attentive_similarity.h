// Attentive similarity loss: the per-token window math, shared verbatim by the CPU kernel
// (csrc/cpu/attentive_similarity.cpp, one at::parallel_for task per token range) and the CUDA
// kernel (csrc/cuda/attentive_similarity.cu, one thread per token), so the CPU tests exercise the
// exact arithmetic the GPU runs. Plain C++ plus __host__ __device__: no ATen in here.
//
// Per sample b, head m, tokens t, u on the h x w grid (t = w * row + col), s = logit_scale:
//   a_tu = exp(s q_t.k_u - lse_t)           (row softmax entry A_tu; lse from the attention sweep)
//   S_tu = a_tu + a_ut                      (symmetric attention)
//   W_tu = sigmoid(sum_m alpha_m S^m_tu + beta),   M_tu = exp(-(dy^2 + dx^2) / (2 sigma^2))
//   row_t = g_b sum_{u in win(t), u != t} M_tu W_tu (1 - p_t.p_u)         (forward output)
// Backward for per-row upstream gradients gamma (the loss is sum_t gamma_t row_t):
//   D_tu   = g_b M_tu (1 - p_t.p_u) W_tu (1 - W_tu) (gamma_t + gamma_u)   (dL/dZ of the pair {t,u})
//   dalpha_m += 1/2 sum_u D_tu S^m_tu,   dbeta += 1/2 sum_u D_tu  (each unordered pair seen twice)
//   E^m_tu = alpha_m D_tu = dL/dA^m_tu = dL/dA^m_ut
//   dq^m_t = s sum_u a_tu E k^m_u,  dk^m_t = s sum_u a_ut E q^m_u  (window terms, lse held fixed)
//   dlse^m_t = -sum_u a_tu E  (= -rho_t; the dense part of dq/dk comes from the attention backward)
//   dp_t = -g_b sum_u M_tu W_tu (gamma_t + gamma_u) p_u
// Every token gathers its own window: each pair is evaluated from both ends, no thread writes
// another token's outputs, hence no atomics and a deterministic result.
//
// Layout: lse (B, heads, n) contiguous in acc_t; probs token-major (B, n, C) in acc_t (the caller
// transposes once, so a pair reads C contiguous values). q, k and the dq, dk outputs: token-major
// (B, heads, n, D) contiguous, or with DM ("dim-major", the template flag of the row functions)
// (B, heads, D, n) contiguous. The CPU takes token-major rows (a dot product reads D contiguous
// values: vector code); the GPU dim-major, where the 32 threads of a warp, 32 consecutive tokens,
// read 32 consecutive values of one dimension (coalesced) instead of 32 rows D values apart.
#pragma once

#include <stdint.h>

#include "fast_math.h"

namespace attenscribble_ops {
namespace window {

template <typename acc_t>
struct Args {
  const acc_t* q;
  const acc_t* k;
  const acc_t* lse;
  const acc_t* probs;
  const acc_t* head_weight;       // (heads,)
  const acc_t* head_bias;         // (1,): a pointer, so the GPU never syncs to read it
  const acc_t* sample_weight;     // (B,) or nullptr (every g_b = 1)
  acc_t scale;                    // logit_scale
  acc_t neg_half_inv_sigma2;      // -1 / (2 sigma^2)
  int64_t heads, n, dim, classes, h, w;
  int64_t ry, rx;                 // window half-sizes, clipped to the grid (a larger radius adds nothing)
};

// Independent partial sums: on the host they are what lets the compiler vectorise the loop
// without reassociating floating-point additions; on the GPU a few break the dependency chain.
// (Defined beforehand, e.g. -DASL_DOT_LANES=4: tests/cuda_emulation runs the GPU's count on the host.)
#ifndef ASL_DOT_LANES
#if defined(__CUDA_ARCH__)
#define ASL_DOT_LANES 4
#else
#define ASL_DOT_LANES 16
#endif
#endif

// Sum of `width` lanes in log2(width) dependent steps (not a chain of `width` additions), with
// compile-time bounds so the lanes stay in registers.
template <int width, typename acc_t>
ASL_HOST_DEVICE acc_t tree_sum(acc_t* part) {
  if constexpr (width == 1) {
    return part[0];
  } else {
    for (int j = 0; j < width / 2; ++j) part[j] += part[j + width / 2];
    return tree_sum<width / 2>(part);
  }
}

template <typename acc_t>
ASL_HOST_DEVICE acc_t dot(const acc_t* a, const acc_t* b, int64_t len) {
  if (len < ASL_DOT_LANES) {  // e.g. the class dimension of the probabilities
    acc_t total = 0;
    for (int64_t i = 0; i < len; ++i) total += a[i] * b[i];
    return total;
  }
  acc_t part[ASL_DOT_LANES];
  for (int j = 0; j < ASL_DOT_LANES; ++j) part[j] = a[j] * b[j];
  int64_t i = ASL_DOT_LANES;
  for (; i + ASL_DOT_LANES <= len; i += ASL_DOT_LANES)
    for (int j = 0; j < ASL_DOT_LANES; ++j) part[j] += a[i + j] * b[i + j];
  acc_t tail = 0;  // a scalar: indexing `part` by a run-time lane would force it out of registers
  for (; i < len; ++i) tail += a[i] * b[i];
  return tree_sum<ASL_DOT_LANES>(part) + tail;
}

template <typename acc_t>
ASL_HOST_DEVICE acc_t sigmoid(acc_t z) {
  // exp(-z) overflows to inf for very negative z, giving exactly 0: no NaN path
  return acc_t(1) / (acc_t(1) + exp_acc(-z));
}

// Row offset of token t of head m in (B, heads, n, D) / (B, heads, n).
template <typename acc_t>
ASL_HOST_DEVICE int64_t head_row(const Args<acc_t>& a, int64_t b, int64_t m, int64_t t) {
  return (b * a.heads + m) * a.n + t;
}

// Offset of element 0 of token t of head m in q, k, dq, dk, and the distance between its
// consecutive elements (1 token-major, n dim-major).
template <bool DM, typename acc_t>
ASL_HOST_DEVICE int64_t qk_at(const Args<acc_t>& a, int64_t b, int64_t m, int64_t t) {
  return DM ? (b * a.heads + m) * a.n * a.dim + t : head_row(a, b, m, t) * a.dim;
}

template <bool DM, typename acc_t>
ASL_HOST_DEVICE int64_t qk_step(const Args<acc_t>& a) {
  return DM ? a.n : 1;
}

// dot() over elements `step` apart: the plain dot for token-major rows.
template <bool DM, typename acc_t>
ASL_HOST_DEVICE acc_t qk_dot(const acc_t* x, const acc_t* y, int64_t len, int64_t step) {
  if constexpr (!DM) {
    return dot(x, y, len);
  } else {
    acc_t part[ASL_DOT_LANES];
    for (int j = 0; j < ASL_DOT_LANES; ++j) part[j] = 0;
    int64_t i = 0;
    for (; i + ASL_DOT_LANES <= len; i += ASL_DOT_LANES)
      for (int j = 0; j < ASL_DOT_LANES; ++j) part[j] += x[(i + j) * step] * y[(i + j) * step];
    acc_t tail = 0;
    for (; i < len; ++i) tail += x[i * step] * y[i * step];
    return tree_sum<ASL_DOT_LANES>(part) + tail;
  }
}

// Neighbours are visited in runs of up to ASL_CHUNK horizontally adjacent tokens u = base + j.
// Per-lane work (exp, sigmoid, products) then runs over a fixed number of lanes, which the CPU
// compiler turns into vector code; padding lanes (j >= count) get exponent 0 and are masked by a
// select (never by a product, which would turn an inf into NaN).
#ifndef ASL_CHUNK  // as ASL_DOT_LANES
#if defined(__CUDA_ARCH__)
#define ASL_CHUNK 4
#else
#define ASL_CHUNK 16
#endif
#endif

// Window bounds of token t, clipped at the grid border.
struct Bounds {
  int64_t y0, y1, x0, x1;
};

template <typename acc_t>
ASL_HOST_DEVICE Bounds bounds(const Args<acc_t>& a, int64_t t) {
  const int64_t row = t / a.w, col = t - row * a.w;
  Bounds r;
  r.y0 = row - a.ry < 0 ? -row : -a.ry;
  r.y1 = row + a.ry >= a.h ? a.h - 1 - row : a.ry;
  r.x0 = col - a.rx < 0 ? -col : -a.rx;
  r.x1 = col + a.rx >= a.w ? a.w - 1 - col : a.rx;
  return r;
}

// For the run u = base + j, j < count: the mixed logit z_j = beta + sum_m alpha_m (a_tu + a_ut),
// and for the heads m0 <= m < m0 + group the entries themselves: atu[(m - m0) * ASL_CHUNK + j]
// (likewise aut). group = 0 keeps none.
template <bool DM, typename acc_t>
ASL_HOST_DEVICE void run_logits(const Args<acc_t>& a, int64_t b, int64_t t, int64_t base, int count, int64_t m0,
                                int64_t group, acc_t* z, acc_t* atu, acc_t* aut) {
  const int64_t step = qk_step<DM>(a);
  for (int j = 0; j < ASL_CHUNK; ++j) z[j] = *a.head_bias;
  for (int64_t m = 0; m < a.heads; ++m) {
    const int64_t rt = head_row(a, b, m, t), ru = head_row(a, b, m, base);
    const acc_t* qt = a.q + qk_at<DM>(a, b, m, t);
    const acc_t* kt = a.k + qk_at<DM>(a, b, m, t);
    const acc_t lse_t = a.lse[rt], alpha = a.head_weight[m];
    acc_t x1[ASL_CHUNK], x2[ASL_CHUNK];
    for (int j = 0; j < ASL_CHUNK; ++j) {
      if (j < count) {
        const int64_t u = qk_at<DM>(a, b, m, base + j);
        x1[j] = mul_rn(a.scale, qk_dot<DM>(qt, a.k + u, a.dim, step)) - lse_t;
        x2[j] = mul_rn(a.scale, qk_dot<DM>(a.q + u, kt, a.dim, step)) - a.lse[ru + j];
      } else {
        x1[j] = x2[j] = 0;
      }
    }
    const bool keep = m >= m0 && m < m0 + group;
    acc_t* e1s = keep ? atu + (m - m0) * ASL_CHUNK : nullptr;
    acc_t* e2s = keep ? aut + (m - m0) * ASL_CHUNK : nullptr;
    for (int j = 0; j < ASL_CHUNK; ++j) {
      const acc_t e1 = exp_acc(x1[j]), e2 = exp_acc(x2[j]);
      z[j] += alpha * (e1 + e2);
      if (keep) {
        e1s[j] = e1;
        e2s[j] = e2;
      }
    }
  }
}

// 1 - p_t . p_u for the run (0 on padding lanes).
template <typename acc_t>
ASL_HOST_DEVICE void run_dissimilarity(const Args<acc_t>& a, int64_t b, int64_t t, int64_t base, int count,
                                       acc_t* out) {
  const acc_t* pt = a.probs + (b * a.n + t) * a.classes;
  for (int j = 0; j < ASL_CHUNK; ++j)
    out[j] = j < count ? acc_t(1) - dot(pt, a.probs + (b * a.n + base + j) * a.classes, a.classes) : acc_t(0);
}

// Forward: row_t (already multiplied by g_b).
template <bool DM = false, typename acc_t>
ASL_HOST_DEVICE acc_t row_loss(const Args<acc_t>& a, int64_t b, int64_t t) {
  const acc_t g = a.sample_weight ? a.sample_weight[b] : acc_t(1);
  if (g == acc_t(0)) return acc_t(0);
  const Bounds w = bounds(a, t);
  acc_t lanes[ASL_CHUNK];
  for (int j = 0; j < ASL_CHUNK; ++j) lanes[j] = 0;
  for (int64_t dy = w.y0; dy <= w.y1; ++dy) {
    for (int64_t x = w.x0; x <= w.x1; x += ASL_CHUNK) {
      const int count = static_cast<int>(w.x1 - x + 1 < ASL_CHUNK ? w.x1 - x + 1 : ASL_CHUNK);
      const int64_t base = t + dy * a.w + x;
      acc_t z[ASL_CHUNK], diss[ASL_CHUNK];
      run_logits<DM>(a, b, t, base, count, int64_t(0), int64_t(0), z, (acc_t*)nullptr, (acc_t*)nullptr);
      run_dissimilarity(a, b, t, base, count, diss);
      for (int j = 0; j < ASL_CHUNK; ++j) {
        const int64_t dx = x + j;
        const acc_t decay = exp_acc(a.neg_half_inv_sigma2 * acc_t(dy * dy + dx * dx));
        const acc_t v = decay * sigmoid(z[j]) * diss[j];
        lanes[j] += (j < count && (dy != 0 || dx != 0)) ? v : acc_t(0);
      }
    }
  }
  acc_t total = 0;
  for (int j = 0; j < ASL_CHUNK; ++j) total += lanes[j];
  return g * total;
}

// Outputs of the backward for token t; every pointer addresses rows that only token t writes.
template <typename acc_t>
struct Grads {
  acc_t* dq;          // (B, heads, n, D), or (B, heads, D, n) dim-major as q
  acc_t* dk;          // as k
  acc_t* dlse;        // (B, heads, n)
  acc_t* dprobs;      // (B, n, C) or nullptr
  acc_t* dalpha;      // (B, heads, n) per-token partial sums of dL/dalpha_m
  acc_t* dbeta;       // (B, n) per-token partial sums of dL/dbeta
  const acc_t* grad_rows;  // (B, n) upstream gamma
};

// Scratch values row_backward needs for a group of `group` heads.
ASL_HOST_DEVICE int64_t backward_scratch_size(int64_t group, int64_t dim) {
  return group * (2 * dim + 2 * ASL_CHUNK + 2);
}

// Backward for token t, heads taken `group` at a time: the mixed logit needs every head, so each
// group recomputes the window dot products of all heads (heads^2 / group * window * D work) while
// keeping dq/dk accumulators for its own heads only. The CPU takes all heads in one group (scratch
// is cheap there); the GPU one head at a time (its accumulators stay in thread-local memory).
// scratch: backward_scratch_size(group, dim) values.
template <bool DM = false, typename acc_t>
ASL_HOST_DEVICE void row_backward(const Args<acc_t>& a, const Grads<acc_t>& gr, int64_t b, int64_t t, int64_t group,
                                  acc_t* scratch) {
  const int64_t step = qk_step<DM>(a);
  const acc_t g = a.sample_weight ? a.sample_weight[b] : acc_t(1);
  const Bounds w = bounds(a, t);
  const acc_t gamma_t = gr.grad_rows[b * a.n + t];
  acc_t* dp = gr.dprobs ? gr.dprobs + (b * a.n + t) * a.classes : nullptr;
  if (dp)
    for (int64_t c = 0; c < a.classes; ++c) dp[c] = 0;
  acc_t dbeta[ASL_CHUNK];
  for (int j = 0; j < ASL_CHUNK; ++j) dbeta[j] = 0;
  acc_t* acc_q = scratch;                    // [group][dim]
  acc_t* acc_k = acc_q + group * a.dim;      // [group][dim]
  acc_t* atu = acc_k + group * a.dim;        // [group][ASL_CHUNK]
  acc_t* aut = atu + group * ASL_CHUNK;      // [group][ASL_CHUNK]
  acc_t* rho = aut + group * ASL_CHUNK;      // [group]
  acc_t* dalpha = rho + group;               // [group]
  for (int64_t m0 = 0; m0 < a.heads; m0 += group) {
    const int64_t size = a.heads - m0 < group ? a.heads - m0 : group;
    for (int64_t i = 0; i < size * a.dim; ++i) acc_q[i] = acc_k[i] = 0;
    for (int64_t i = 0; i < size; ++i) rho[i] = dalpha[i] = 0;
    for (int64_t dy = w.y0; g != acc_t(0) && dy <= w.y1; ++dy) {
      for (int64_t x = w.x0; x <= w.x1; x += ASL_CHUNK) {
        const int count = static_cast<int>(w.x1 - x + 1 < ASL_CHUNK ? w.x1 - x + 1 : ASL_CHUNK);
        const int64_t base = t + dy * a.w + x;
        acc_t z[ASL_CHUNK], diss[ASL_CHUNK], dz[ASL_CHUNK], fp[ASL_CHUNK], gam[ASL_CHUNK];
        run_logits<DM>(a, b, t, base, count, m0, size, z, atu, aut);
        run_dissimilarity(a, b, t, base, count, diss);
        for (int j = 0; j < ASL_CHUNK; ++j)
          gam[j] = gamma_t + (j < count ? gr.grad_rows[b * a.n + base + j] : acc_t(0));
        for (int j = 0; j < ASL_CHUNK; ++j) {
          const int64_t dx = x + j;
          const bool valid = j < count && (dy != 0 || dx != 0);
          const acc_t decay = exp_acc(a.neg_half_inv_sigma2 * acc_t(dy * dy + dx * dx));
          const acc_t wgt = sigmoid(z[j]);
          dz[j] = valid ? g * decay * diss[j] * wgt * (acc_t(1) - wgt) * gam[j] : acc_t(0);
          dbeta[j] += m0 == 0 ? acc_t(0.5) * dz[j] : acc_t(0);
          fp[j] = valid ? -g * decay * wgt * gam[j] : acc_t(0);
        }
        for (int64_t i = 0; i < size; ++i) {
          const acc_t alpha = a.head_weight[m0 + i];
          const acc_t* e1 = atu + i * ASL_CHUNK;
          const acc_t* e2 = aut + i * ASL_CHUNK;
          acc_t ct[ASL_CHUNK], cu[ASL_CHUNK];
          for (int j = 0; j < ASL_CHUNK; ++j) {
            const acc_t e = alpha * dz[j];
            ct[j] = a.scale * e1[j] * e;
            cu[j] = a.scale * e2[j] * e;
            rho[i] += e1[j] * e;
            dalpha[i] += acc_t(0.5) * dz[j] * (e1[j] + e2[j]);
          }
          acc_t* aq = acc_q + i * a.dim;
          acc_t* ak = acc_k + i * a.dim;
          for (int j = 0; j < count; ++j) {
            const int64_t u = qk_at<DM>(a, b, m0 + i, base + j);
            const acc_t* ku = a.k + u;
            const acc_t* qu = a.q + u;
            for (int64_t d = 0; d < a.dim; ++d) {
              aq[d] += ct[j] * ku[d * step];
              ak[d] += cu[j] * qu[d * step];
            }
          }
        }
        if (m0 == 0 && dp) {
          for (int j = 0; j < count; ++j) {
            const acc_t* pu = a.probs + (b * a.n + base + j) * a.classes;
            for (int64_t c = 0; c < a.classes; ++c) dp[c] += fp[j] * pu[c];
          }
        }
      }
    }
    for (int64_t i = 0; i < size; ++i) {
      const int64_t rt = head_row(a, b, m0 + i, t), at = qk_at<DM>(a, b, m0 + i, t);
      for (int64_t d = 0; d < a.dim; ++d) {
        gr.dq[at + d * step] = acc_q[i * a.dim + d];
        gr.dk[at + d * step] = acc_k[i * a.dim + d];
      }
      gr.dlse[rt] = -rho[i];
      gr.dalpha[rt] = dalpha[i];
    }
  }
  acc_t dbeta_sum = 0;
  for (int j = 0; j < ASL_CHUNK; ++j) dbeta_sum += dbeta[j];
  gr.dbeta[b * a.n + t] = dbeta_sum;
}

}  // namespace window
}  // namespace attenscribble_ops
