// The block program of the CUDA masked CRF kernels (csrc/cuda/masked_crf.cu), written once for
// the device and for a host emulation: plain C++ with __host__ __device__ functions, a `Sync`
// callable for __syncthreads, shared memory passed in as pointers. The test suite compiles it
// with g++ and runs each block on 256 std::threads with a barrier (tests/cuda_emulation), so the
// tiling, halo and reduction logic is checked against the reference without a GPU.
//
// Loss     raw = sum_i m_i (S_i + border_i - sum_c P_ic A_ic)    (Potts)
//          raw = sum_i m_i sum_c P_ic A_ic,  A over U = mu P    (compatibility)
// Gradient dP_kc = -(m_k A_kc + msrc_k B_kc)                     (Potts, U = W = P)
//          dP_kc =   m_k A_kc + msrc_k B_kc,  U = mu P, W = mu^T P  (compatibility)
// with A_kc = sum_j G_kj msrc_j U_jc, B_kc = sum_j G_kj m_j W_jc, S_k = sum_j G_kj msrc_j over
// the in-image window (G: the Gaussian kernel, symmetric). The class mixing is applied to the
// neighbours as they are staged, so classes can be processed in chunks of CC registers.
//
// Layout: probs (B, C, D, H, W) contiguous (2-D: D = 1), image (B, F, ...), masks (B, 1, ...).
// Parallel: a block of 32 x 8 threads owns a 32 x 8 tile of one (b, z) plane, one pixel per
// thread, CC class accumulators per thread. For each class chunk and window plane dz, the tile's
// halo is staged in shared memory in bands of band_y x band_x pixels (the whole halo when it
// fits; bands bound the shared memory for any radius), then every thread sums the part of its
// window inside the band. Each block reduces its tile's loss in a fixed tree and writes one
// partial per tile; sum_partials adds them in a fixed order. The gradient (WithGrad) comes from
// the same sums and is a gather (each thread writes only its own pixel): no atomics anywhere.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define CRF_HD __host__ __device__
#else
#define CRF_HD
#endif

namespace attenscribble_ops {
namespace crf_tile {

constexpr int kTileX = 32;
constexpr int kTileY = 8;
constexpr int kThreads = kTileX * kTileY;
constexpr int64_t kMaxImageInShared = 8;  // image channels staged in shared memory (else read from global)

template <typename scalar_t, typename acc_t>
struct Args {
  const scalar_t* probs = nullptr;
  const acc_t* image = nullptr;
  const acc_t* mask_dst = nullptr;
  const acc_t* mask_src = nullptr;
  const acc_t* mu = nullptr;      // (C, C) or null (Potts)
  const acc_t* table = nullptr;   // (K, 2 + F): weight, 1/sigma_xy, 1/sigma_image_f
  acc_t* partial = nullptr;       // one loss partial per tile
  acc_t* grad = nullptr;          // with the gradient: d raw / d probs, layout of probs
  int64_t batch = 0, classes = 0, channels = 0, kernels = 0, depth = 1, height = 0, width = 0;
  int64_t rd = 0, rh = 0, rw = 0;
  acc_t sd = 1, sh = 1, sw = 1;
  bool zero_padding = true, has_mask_dst = false, has_mask_src = false;
  // set by plan():
  int64_t ez = 0, ey = 0, ex = 0;  // radii clipped to the image
  acc_t window = 0;                // (2rd+1)(2rh+1)(2rw+1), in floating point
  int64_t tiles_x = 0, tiles_y = 0, tiles = 0;
  int64_t band_y = 0, band_x = 0;
  bool image_in_shared = false, second_role = false, mixed_w = false;
};

CRF_HD inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
CRF_HD inline int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
CRF_HD inline float crf_exp(float v) { return expf(v); }
CRF_HD inline double crf_exp(double v) { return exp(v); }
// 2^v. On the device, float: one MUFU.EX2 (2 ulp; results below 2^-126, Gaussian weights far
// below the others', flush to 0), where exp2f adds a rescaling for them.
CRF_HD inline float crf_exp2(float v) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return exp2f(v);
#endif
}
CRF_HD inline double crf_exp2(double v) { return exp2(v); }

// Values per staged pixel: U (and W when it differs) per chunk class, image, masks.
template <int CC, typename scalar_t, typename acc_t>
CRF_HD inline int64_t shared_values_per_pixel(const Args<scalar_t, acc_t>& a) {
  return CC * (a.mixed_w ? 2 : 1) + (a.image_in_shared ? a.channels : 0) + (a.has_mask_src ? 1 : 0) +
         (a.second_role && a.has_mask_dst ? 1 : 0);
}

// Derived sizes and the band shape that keeps the staged halo within `shared_budget` bytes.
template <int CC, typename scalar_t, typename acc_t>
inline void plan(Args<scalar_t, acc_t>& a, bool with_grad, int64_t shared_budget) {
  a.ez = lmin(a.rd, a.depth - 1);
  a.ey = lmin(a.rh, a.height - 1);
  a.ex = lmin(a.rw, a.width - 1);
  a.window = acc_t(double(2 * a.rd + 1) * double(2 * a.rh + 1) * double(2 * a.rw + 1));
  a.tiles_x = (a.width + kTileX - 1) / kTileX;
  a.tiles_y = (a.height + kTileY - 1) / kTileY;
  a.tiles = a.tiles_x * a.tiles_y * a.depth * a.batch;
  a.image_in_shared = a.channels <= kMaxImageInShared;
  // with a compatibility matrix the two roles see different mixes of the neighbour's classes
  a.second_role = with_grad && (a.has_mask_dst || a.has_mask_src || a.mu != nullptr);
  a.mixed_w = a.second_role && a.mu != nullptr;
  const int64_t bytes = shared_values_per_pixel<CC>(a) * int64_t(sizeof(acc_t));
  const int64_t full_y = lmin(kTileY + 2 * a.ey, a.height), full_x = lmin(kTileX + 2 * a.ex, a.width);
  if (full_y * full_x * bytes <= shared_budget) {
    a.band_y = full_y;
    a.band_x = full_x;
  } else {
    a.band_x = lmin(full_x, 64);
    a.band_y = lmax(1, lmin(full_y, shared_budget / (a.band_x * bytes)));
  }
}

template <int CC, typename scalar_t, typename acc_t>
inline int64_t shared_bytes(const Args<scalar_t, acc_t>& a) {
  return a.band_y * a.band_x * shared_values_per_pixel<CC>(a) * int64_t(sizeof(acc_t));
}

// Border term of the centre (b, z, y, x): the original zero-pads, so each out-of-image window
// cell is a neighbour with features 0 and probability 0.
template <typename scalar_t, typename acc_t>
CRF_HD acc_t border_term(const Args<scalar_t, acc_t>& a, int64_t b, int64_t z, int64_t y, int64_t x) {
  const int64_t nz = lmin(z + a.ez, a.depth - 1) - lmax(z - a.ez, 0) + 1;
  const int64_t ny = lmin(y + a.ey, a.height - 1) - lmax(y - a.ey, 0) + 1;
  const int64_t nx = lmin(x + a.ex, a.width - 1) - lmax(x - a.ex, 0) + 1;
  const acc_t outside = a.window - acc_t(nz * ny) * acc_t(nx);
  if (outside == acc_t(0)) return acc_t(0);
  const int64_t volume = a.depth * a.height * a.width;
  const int64_t centre = (z * a.height + y) * a.width + x;
  const acc_t pz = acc_t(z) * a.sd, py = acc_t(y) * a.sh, px = acc_t(x) * a.sw;
  const acc_t pos2 = pz * pz + py * py + px * px;
  acc_t k0 = 0;
  for (int64_t k = 0; k < a.kernels; ++k) {
    const acc_t* row = a.table + k * (2 + a.channels);
    acc_t e = row[1] * row[1] * pos2;
    for (int64_t f = 0; f < a.channels; ++f) {
      const acc_t v = a.image[(b * a.channels + f) * volume + centre];
      e += row[2 + f] * row[2 + f] * v * v;
    }
    k0 += row[0] * crf_exp(acc_t(-0.5) * e);
  }
  return outside * k0;
}

// Stages pixels [by0, by0 + ny) x [bx0, bx0 + nx) of plane (b, zz): the chunk's classes of U
// (and W), the image and the masks, row stride nx, array stride n.
template <int CC, typename scalar_t, typename acc_t>
CRF_HD void stage_band(const Args<scalar_t, acc_t>& a, int64_t b, int64_t zz, int64_t c0, int64_t by0, int64_t bx0,
                       int64_t ny, int64_t nx, int tid, acc_t* s_u, acc_t* s_w, acc_t* s_img, acc_t* s_msrc,
                       acc_t* s_mdst, int64_t n) {
  const int64_t volume = a.depth * a.height * a.width, C = a.classes;
  for (int64_t e = tid; e < ny * nx; e += kThreads) {
    const int64_t j = (zz * a.height + by0 + e / nx) * a.width + bx0 + e % nx;
    const scalar_t* pj = a.probs + b * C * volume + j;
    for (int c = 0; c < CC; ++c) {
      const int64_t cc = c0 + c;
      acc_t u = 0, w = 0;
      if (cc < C) {
        if (a.mu == nullptr) {
          u = static_cast<acc_t>(pj[cc * volume]);
        } else {
          for (int64_t c2 = 0; c2 < C; ++c2) {
            const acc_t p = static_cast<acc_t>(pj[c2 * volume]);
            u += a.mu[cc * C + c2] * p;
            w += a.mu[c2 * C + cc] * p;
          }
        }
      }
      s_u[c * n + e] = u;
      if (a.mixed_w) s_w[c * n + e] = w;
    }
    if (a.image_in_shared) {
      for (int64_t f = 0; f < a.channels; ++f) s_img[f * n + e] = a.image[(b * a.channels + f) * volume + j];
    }
    if (a.has_mask_src) s_msrc[e] = a.mask_src[b * volume + j];
    if (a.second_role && a.has_mask_dst) s_mdst[e] = a.mask_dst[b * volume + j];
  }
}

// Adds the neighbour at band index e, with Gaussian weight g, to the centre's sums (Index: the
// band index type, 32-bit in the specialised loop).
template <int CC, typename Index, typename scalar_t, typename acc_t>
CRF_HD inline void add_neighbour(const Args<scalar_t, acc_t>& a, acc_t g, Index e, Index stride, const acc_t* s_u,
                                 const acc_t* s_w, const acc_t* s_msrc, const acc_t* s_mdst, acc_t* acc_a,
                                 acc_t* acc_b, acc_t& ksum) {
  const acc_t ga = a.has_mask_src ? g * s_msrc[e] : g;
  ksum += ga;
  for (int c = 0; c < CC; ++c) acc_a[c] += ga * s_u[c * stride + e];
  if (a.second_role) {
    const acc_t gb = a.has_mask_dst ? g * s_mdst[e] : g;
    for (int c = 0; c < CC; ++c) acc_b[c] += gb * s_w[c * stride + e];
  }
}

// accumulate_band for one kernel descriptor and NF (0 or 1) image channels, the official loss:
// the exponent's coefficients (scaled to base 2) and the centre's feature stay in registers, the
// Gaussian is one exp2 of a multiply-add, and window offsets and band indices are 32-bit (a
// window spans at most 2 r + 1 pixels per axis, a band at most the shared-memory budget's).
template <int CC, int NF, typename scalar_t, typename acc_t>
CRF_HD void accumulate_band_single(const Args<scalar_t, acc_t>& a, int64_t b, int64_t z, int64_t y, int64_t x,
                                   int64_t zz, int64_t by0, int64_t bx0, int64_t nx, int64_t y_lo, int64_t y_hi,
                                   int64_t x_lo, int64_t x_hi, const acc_t* s_u, const acc_t* s_w,
                                   const acc_t* s_img, const acc_t* s_msrc, const acc_t* s_mdst, int64_t n,
                                   acc_t* acc_a, acc_t* acc_b, acc_t& ksum) {
  constexpr acc_t kLog2e = acc_t(1.4426950408889634);
  const acc_t weight = a.table[0];
  const acc_t c_xy = acc_t(-0.5) * kLog2e * a.table[1] * a.table[1];
  acc_t c_f = 0, centre_f = 0;
  if (NF == 1) {
    c_f = acc_t(-0.5) * kLog2e * a.table[2] * a.table[2];
    const int64_t volume = a.depth * a.height * a.width;
    centre_f = a.image[b * volume + (z * a.height + y) * a.width + x];
  }
  const acc_t dzs = acc_t(zz - z) * a.sd;
  const int stride = int(n);
  const int oy0 = int(y_lo - y), oy1 = int(y_hi - y), ox0 = int(x_lo - x), ox1 = int(x_hi - x);
  const int centre_e = int(y - by0) * int(nx) + int(x - bx0);  // band index of (y, x)
  for (int oy = oy0; oy <= oy1; ++oy) {
    const acc_t dys = acc_t(oy) * a.sh;
    const acc_t dzy2 = dzs * dzs + dys * dys;
    const bool centre_row = zz == z && oy == 0;
    const int row = centre_e + oy * int(nx);
    for (int ox = ox0; ox <= ox1; ++ox) {
      if (centre_row && ox == 0) continue;
      const acc_t dxs = acc_t(ox) * a.sw;
      const int e = row + ox;
      acc_t q = c_xy * (dzy2 + dxs * dxs);
      if (NF == 1) {
        const acc_t diff = centre_f - s_img[e];
        q += c_f * diff * diff;
      }
      add_neighbour<CC>(a, weight * crf_exp2(q), e, stride, s_u, s_w, s_msrc, s_mdst, acc_a, acc_b, ksum);
    }
  }
}

// Sums one band into the thread's accumulators: the part of the window of (z, y, x) that lies
// in the staged pixels of plane zz.
template <int CC, typename scalar_t, typename acc_t>
CRF_HD void accumulate_band(const Args<scalar_t, acc_t>& a, int64_t b, int64_t z, int64_t y, int64_t x, int64_t zz,
                            int64_t by0, int64_t bx0, int64_t ny, int64_t nx, const acc_t* s_u, const acc_t* s_w,
                            const acc_t* s_img, const acc_t* s_msrc, const acc_t* s_mdst, int64_t n, acc_t* acc_a,
                            acc_t* acc_b, acc_t& ksum) {
  const int64_t volume = a.depth * a.height * a.width, F = a.channels, row_len = 2 + F;
  const int64_t centre = (z * a.height + y) * a.width + x;
  const acc_t dzs = acc_t(zz - z) * a.sd;
  const int64_t y_lo = lmax(by0, y - a.ey), y_hi = lmin(by0 + ny - 1, y + a.ey);
  const int64_t x_lo = lmax(bx0, x - a.ex), x_hi = lmin(bx0 + nx - 1, x + a.ex);
  // the official loss (one descriptor, one image channel or none), with every band offset of the
  // window (|y - by0| <= ey + kTileY, |x - bx0| <= ex + kTileX) within 32 bits
  if (a.kernels == 1 && F <= 1 && (F == 0 || a.image_in_shared) &&
      (2 * a.ey + kTileY) * nx + a.ex + kTileX < (int64_t(1) << 31)) {
    if (F == 1) {
      accumulate_band_single<CC, 1>(a, b, z, y, x, zz, by0, bx0, nx, y_lo, y_hi, x_lo, x_hi, s_u, s_w, s_img, s_msrc,
                                    s_mdst, n, acc_a, acc_b, ksum);
    } else {
      accumulate_band_single<CC, 0>(a, b, z, y, x, zz, by0, bx0, nx, y_lo, y_hi, x_lo, x_hi, s_u, s_w, s_img, s_msrc,
                                    s_mdst, n, acc_a, acc_b, ksum);
    }
    return;
  }
  for (int64_t yy = y_lo; yy <= y_hi; ++yy) {
    const acc_t dys = acc_t(yy - y) * a.sh;
    for (int64_t xx = x_lo; xx <= x_hi; ++xx) {
      if (zz == z && yy == y && xx == x) continue;
      const acc_t dxs = acc_t(xx - x) * a.sw;
      const acc_t d2 = dzs * dzs + dys * dys + dxs * dxs;
      const int64_t e = (yy - by0) * nx + (xx - bx0);
      const int64_t j = (zz * a.height + yy) * a.width + xx;
      acc_t g = 0;
      for (int64_t k = 0; k < a.kernels; ++k) {
        const acc_t* row = a.table + k * row_len;
        acc_t q = row[1] * row[1] * d2;
        for (int64_t f = 0; f < F; ++f) {
          const acc_t s = row[2 + f];
          const acc_t* channel = a.image + (b * F + f) * volume;
          const acc_t diff = channel[centre] - (a.image_in_shared ? s_img[f * n + e] : channel[j]);
          q += s * s * diff * diff;
        }
        g += row[0] * crf_exp(acc_t(-0.5) * q);
      }
      add_neighbour<CC>(a, g, e, n, s_u, s_w, s_msrc, s_mdst, acc_a, acc_b, ksum);
    }
  }
}

// The whole program of one block: tiles first_tile, first_tile + tile_stride, ... Control flow
// around every sync() depends only on the tile, so all threads of a block reach each barrier.
template <int CC, bool WithGrad, typename scalar_t, typename acc_t, typename Sync>
CRF_HD void run_block(const Args<scalar_t, acc_t>& a, int64_t first_tile, int64_t tile_stride, int tid, acc_t* shared,
                      acc_t* red, Sync& sync) {
  const int64_t volume = a.depth * a.height * a.width, C = a.classes;
  const int64_t n = a.band_y * a.band_x;
  acc_t* s_u = shared;
  acc_t* s_w = a.mixed_w ? s_u + CC * n : s_u;
  acc_t* s_img = s_u + (a.mixed_w ? 2 : 1) * CC * n;
  acc_t* s_msrc = s_img + (a.image_in_shared ? a.channels : 0) * n;
  acc_t* s_mdst = s_msrc + (a.has_mask_src ? n : 0);
  const acc_t sign = a.mu == nullptr ? acc_t(-1) : acc_t(1);
  for (int64_t t = first_tile; t < a.tiles; t += tile_stride) {
    int64_t rest = t;
    const int64_t tx0 = (rest % a.tiles_x) * kTileX;
    rest /= a.tiles_x;
    const int64_t ty0 = (rest % a.tiles_y) * kTileY;
    rest /= a.tiles_y;
    const int64_t z = rest % a.depth, b = rest / a.depth;
    const int64_t y = ty0 + tid / kTileX, x = tx0 + tid % kTileX;
    const bool valid = y < a.height && x < a.width;
    const int64_t centre = (z * a.height + y) * a.width + x;
    // the halo of the tile, clipped to the image
    const int64_t r0 = lmax(ty0 - a.ey, 0), r1 = lmin(ty0 + kTileY - 1 + a.ey, a.height - 1);
    const int64_t q0 = lmax(tx0 - a.ex, 0), q1 = lmin(tx0 + kTileX - 1 + a.ex, a.width - 1);
    const acc_t m = valid && a.has_mask_dst ? a.mask_dst[b * volume + centre] : acc_t(1);
    const acc_t ms = valid && a.has_mask_src ? a.mask_src[b * volume + centre] : acc_t(1);
    acc_t loss = 0;
    for (int64_t c0 = 0; c0 < C; c0 += CC) {
      acc_t acc_a[CC], acc_b[CC];
      for (int c = 0; c < CC; ++c) acc_a[c] = acc_b[c] = 0;
      acc_t ksum = 0;
      for (int64_t zz = lmax(z - a.ez, 0); zz <= lmin(z + a.ez, a.depth - 1); ++zz) {
        for (int64_t by0 = r0; by0 <= r1; by0 += a.band_y) {
          for (int64_t bx0 = q0; bx0 <= q1; bx0 += a.band_x) {
            const int64_t ny = lmin(a.band_y, r1 - by0 + 1), nx = lmin(a.band_x, q1 - bx0 + 1);
            stage_band<CC>(a, b, zz, c0, by0, bx0, ny, nx, tid, s_u, s_w, s_img, s_msrc, s_mdst, n);
            sync();
            if (valid) {
              accumulate_band<CC>(a, b, z, y, x, zz, by0, bx0, ny, nx, s_u, s_w, s_img, s_msrc, s_mdst, n, acc_a,
                                  acc_b, ksum);
            }
            sync();
          }
        }
      }
      if (!valid) continue;
      const acc_t* acc_second = a.second_role ? acc_b : acc_a;
      for (int c = 0; c < CC && c0 + c < C; ++c) {
        const int64_t at = (b * C + c0 + c) * volume + centre;
        loss += sign * static_cast<acc_t>(a.probs[at]) * acc_a[c];
        if (WithGrad) a.grad[at] = sign * (m * acc_a[c] + ms * acc_second[c]);
      }
      if (c0 == 0 && a.mu == nullptr) {
        loss += ksum + (a.zero_padding && !a.has_mask_src ? border_term(a, b, z, y, x) : acc_t(0));
      }
    }
    red[tid] = valid ? m * loss : acc_t(0);
    sync();
    for (int s = kThreads / 2; s > 0; s /= 2) {
      if (tid < s) red[tid] += red[tid + s];
      sync();
    }
    if (tid == 0) a.partial[t] = red[0];
    sync();  // red is reused by the next tile
  }
}

// One block adds the per-tile partials in a fixed order (double accumulation).
template <typename acc_t, typename Sync>
CRF_HD void sum_partials(const acc_t* partial, int64_t count, acc_t* out, int tid, double* red, Sync& sync) {
  double s = 0;
  for (int64_t i = tid; i < count; i += kThreads) s += double(partial[i]);
  red[tid] = s;
  sync();
  for (int h = kThreads / 2; h > 0; h /= 2) {
    if (tid < h) red[tid] += red[tid + h];
    sync();
  }
  if (tid == 0) *out = acc_t(red[0]);
}

}  // namespace crf_tile
}  // namespace attenscribble_ops
