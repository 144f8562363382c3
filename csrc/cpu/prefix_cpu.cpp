// CPU kernels of the prefix (Matryoshka) op families: ck_native::lse_prefix_fwd / lse_prefix_bwd
// and ck_native::sigmoid_prefix_fwd / sigmoid_prefix_bwd (schema: csrc/ops.cpp; contract:
// contrastive_kernels/backends/_prefix.py, docs/math.md §9).
//
// For prefix dims d_1 < … < d_k the logit at prefix t is S^t_ij = s·r_it·c_jt·P^t_ij with
// P^t = Σ_{u ≤ t} Z^u, Z^u the product of the D-segment [d_{u−1}, d_u). Per prefix the semantics
// are exactly those of lse_fwd / lse_bwd / sigmoid_fwd / sigmoid_bwd on S^t (the exclusion set E,
// groups and guide included, is the same at every prefix).
//
// One sweep (same work split as every CPU kernel, tiling.h). Forward, per tile: the k segment
// products are accumulated into a running buffer (β = 1: the GEMM work of one d_k-wide product),
// and after each segment S^t = ((s·P^t)·r_t)·c_t is formed in a second buffer and fed to the
// existing tile pass (lse_tiles.h, sigmoid_tiles.h) with the k-th set of row / column state.
// Backward, per tile: the k logit tiles are recomputed the same way (same bits as the forward),
// then t walks k..1 turning S^t into G^t (a copy: S^t stays finite for Σ G·S), recording
// row_dot / col_dot, and accumulating U = Σ_{t' ≥ t} s·r_t'·c_t'·G^t' in the (then free) running
// buffer; segment t receives dQ[:, seg t] += U·K[:, seg t] and dK[:, seg t] += Uᵀ·Q[:, seg t]
// — again one d_k-wide GEMM each way. Per task k + 2 tile buffers; per group k·M column state /
// column dots and the private grad_keys copy (merged in group order: bitwise repeatable).

#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "lse_cpu.h"
#include "lse_masks.h"
#include "lse_tiles.h"
#include "problem.h"
#include "sigmoid_tiles.h"
#include "tiling.h"

namespace ck::cpu {
namespace {

// The prefix geometry and the optional factors, in the statistic type T.
template <typename T>
struct Prefix {
  const T* Q;
  const T* K;
  int64_t N, M, D;
  T scale;
  std::vector<int64_t> bounds;  // 0, d_1, …, d_k
  int64_t k;
  const T* rs;  // (k, N) or nullptr (all ones)
  const T* cs;  // (k, M) or nullptr
  int64_t seg_begin(int64_t t) const { return bounds[t]; }
  int64_t seg_width(int64_t t) const { return bounds[t + 1] - bounds[t]; }
};

// Running sum of the segment products up to prefix t: run (β = 1 after the first segment).
template <typename T>
void segment_gemm(const Prefix<T>& p, int64_t t, int64_t i0, int64_t ib, int64_t j0, int64_t jt,
                  T* run, int64_t ld) {
  const int64_t a = p.seg_begin(t);
  gemm<T>(false, true, ib, jt, p.seg_width(t), T(1), p.Q + i0 * p.D + a, p.D, p.K + j0 * p.D + a,
          p.D, t == 0 ? T(0) : T(1), run, ld);
}

// S[r, c] = ((s·P[r, c])·r_t[i0 + r])·c_t[j0 + c]: the reference's rounding order.
template <typename T>
void form_logits(const Prefix<T>& p, int64_t t, const T* P, T* S, int64_t i0, int64_t ib,
                 int64_t j0, int64_t jt, int64_t ld) {
  const T s = p.scale;
  const T* cc = p.cs ? p.cs + t * p.M + j0 : nullptr;
  for (int64_t r = 0; r < ib; ++r) {
    const T* src = P + r * ld;
    T* dst = S + r * ld;
    if (p.rs != nullptr || cc != nullptr) {
      const T rr = p.rs ? p.rs[t * p.N + i0 + r] : T(1);
      if (cc != nullptr) {
        for (int64_t c = 0; c < jt; ++c) dst[c] = s * src[c] * rr * cc[c];
      } else {
        for (int64_t c = 0; c < jt; ++c) dst[c] = s * src[c] * rr;
      }
    } else {
      for (int64_t c = 0; c < jt; ++c) dst[c] = s * src[c];
    }
  }
}

template <typename T>
PairMasks<T> pair_masks(const MaskInputs& mi) {
  PairMasks<T> mk;
  if (mi.groups()) {
    mk.row_groups = mi.row_groups.data_ptr<int64_t>();
    mk.col_groups = mi.col_groups.data_ptr<int64_t>();
  }
  if (mi.guide()) {
    mk.guide_q = mi.guide_query.data_ptr<T>();
    mk.guide_k = mi.guide_keys.data_ptr<T>();
    mk.guide_thr = mi.guide_threshold.data_ptr<T>();
    mk.Dg = mi.Dg;
  }
  return mk;
}

// Per-task byte masks (and guide similarity tiles) of the LSE family: built once per tile, used
// at every prefix (E does not depend on the prefix).
template <typename T>
struct TileMasks {
  const PairMasks<T>& mk;
  Designated des;
  bool exclude_self;
  int64_t stride_mask, stride_gsim;
  at::Tensor mask_work, gsim_work;
  std::vector<int64_t> n_excluded;  // per task, of its current tile

  TileMasks(const PairMasks<T>& m, Designated d, bool excl, const Tiling& tl)
      : mk(m), des(d), exclude_self(excl) {
    stride_mask = aligned_stride<uint8_t>(tl.rows * tl.cols);
    stride_gsim = aligned_stride<T>(tl.rows * tl.cols);
    mask_work = at::empty({mk.active() ? tl.tasks : 0, stride_mask},
                          at::TensorOptions().dtype(at::kByte));
    gsim_work = at::empty({mk.guide() ? tl.tasks : 0, stride_gsim},
                          at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    n_excluded.assign(tl.tasks, 0);
  }
  bool masked() const { return mk.active(); }
  uint8_t* mask(int64_t slot) {
    return masked() ? mask_work.data_ptr<uint8_t>() + slot * stride_mask : nullptr;
  }
  void build(int64_t slot, int64_t i0, int64_t ib, int64_t j0, int64_t jt, int64_t ld) {
    if (!masked()) return;
    T* gsim = mk.guide() ? gsim_work.data_ptr<T>() + slot * stride_gsim : nullptr;
    n_excluded[slot] = build_tile_mask(mk, des, exclude_self, i0, ib, j0, jt, ld, gsim, mask(slot));
  }
  bool any_excluded(int64_t slot) const { return masked() ? n_excluded[slot] > 0 : exclude_self; }
  // Writes v into the excluded elements of the tile.
  void set_excluded(int64_t slot, T* tile, int64_t i0, int64_t ib, int64_t j0, int64_t jt,
                    int64_t ld, T v) {
    if (masked()) {
      if (n_excluded[slot]) fill_masked(tile, ib, jt, ld, mask(slot), v);
      return;
    }
    if (exclude_self) {
      for_each_self_pair(i0, ib, j0, jt, [&](int64_t r, int64_t c) { tile[r * ld + c] = v; });
    }
  }
};

// ---------------------------------------------------------------------------------------------
// LSE forward
// ---------------------------------------------------------------------------------------------

template <typename T>
struct LsePrefixFwd {
  const int64_t* labels;
  const int32_t* row_ids;
  const int32_t* col_ids;
  bool exclude_self;
  T* row_lse;    // (k, N)
  T* col_lse;    // (k, M) or nullptr
  T* pos;        // (k, N), zeroed
  T* pos_count;  // (N,), zeroed, or nullptr (counted in the tiles: classes with masks only)
  PairMasks<T> masks;
};

template <typename T>
void lse_prefix_fwd_impl(const Prefix<T>& p, const LsePrefixFwd<T>& a) {
  const LseTileKernels<T> tk = lse_tile_kernels<T>();
  const int64_t N = p.N, M = p.M, K = p.k;
  const Tiling tl = make_tiling(N, M);
  const bool compute_col = a.col_lse != nullptr;
  const bool classes = a.row_ids != nullptr;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t ld = tl.cols;

  // Per task: running tile, logit tile, k row (max, sum) pairs, column scratch. Per group: k
  // column (max, sum) pairs.
  const int64_t tile_stride = aligned_stride<T>(tl.rows * tl.cols);
  const int64_t per_task = 2 * tile_stride + aligned_stride<T>(2 * K * tl.rows + tl.cols);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor work = at::empty({tl.tasks, per_task}, opts);
  at::Tensor col_work = at::empty({compute_col ? tl.groups : 0, K * 2 * M}, opts);
  T* work_ptr = work.data_ptr<T>();
  T* col_ptr = col_work.data_ptr<T>();
  TileMasks<T> tm(a.masks, Designated{a.labels, a.row_ids, a.col_ids}, a.exclude_self, tl);
  const bool masked = tm.masked();
  const bool count_pos = a.pos_count != nullptr;

  for_each_row_block(
      tl,
      [&](int64_t /*slot*/, int64_t g) {
        if (compute_col) {
          T* base = col_ptr + g * K * 2 * M;
          for (int64_t t = 0; t < K; ++t) {
            std::fill(base + t * 2 * M, base + t * 2 * M + M, ninf);
            std::fill(base + t * 2 * M + M, base + (t + 1) * 2 * M, T(0));
          }
        }
      },
      [&](int64_t slot, int64_t g, int64_t blk) {
        T* run = work_ptr + slot * per_task;
        T* tile = run + tile_stride;
        T* rstat = tile + tile_stride;  // [t][max rows | sum rows]
        T* scratch = rstat + 2 * K * tl.rows;
        const int64_t i0 = blk * tl.rows;
        const int64_t ib = std::min(tl.rows, N - i0);
        uint8_t* mask = tm.mask(slot);
        std::vector<int64_t> counts(count_pos ? ib : 0, 0);
        for (int64_t t = 0; t < K; ++t) {
          std::fill(rstat + 2 * t * tl.rows, rstat + 2 * t * tl.rows + ib, ninf);
          std::fill(rstat + (2 * t + 1) * tl.rows, rstat + (2 * t + 1) * tl.rows + ib, T(0));
        }
        for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
          const int64_t jt = std::min(tl.cols, M - j0);
          tm.build(slot, i0, ib, j0, jt, ld);
          const bool any_excl = tm.any_excluded(slot);
          for (int64_t t = 0; t < K; ++t) {
            segment_gemm(p, t, i0, ib, j0, jt, run, ld);
            form_logits(p, t, run, tile, i0, ib, j0, jt, ld);
            T* pos = a.pos + t * N;
            if (classes) {
              // Excluded elements read as 0 in the class sum (adding 0 is exact), then −inf.
              if (any_excl) tm.set_excluded(slot, tile, i0, ib, j0, jt, ld, T(0));
              tk.pos_sum(tile, ib, jt, ld, a.row_ids + i0, a.col_ids + j0, pos + i0);
              if (count_pos && t == 0) {
                for (int64_t i = 0; i < ib; ++i) {
                  const int32_t ri = a.row_ids[i0 + i];
                  const int32_t* cid = a.col_ids + j0;
                  const uint8_t* m = mask + i * ld;
                  int64_t n = 0;
                  for (int64_t c = 0; c < jt; ++c) n += (cid[c] == ri) & (m[c] == 0);
                  counts[i] += n;
                }
              }
            } else {
              // The labelled logit, read from the tile that holds it (pos stays 0 if excluded).
              for (int64_t i = 0; i < ib; ++i) {
                const int64_t l = a.labels ? a.labels[i0 + i] : i0 + i;
                if (l < j0 || l >= j0 + jt) continue;
                const bool excl = masked ? mask[i * ld + (l - j0)] != 0
                                         : (a.exclude_self && l == i0 + i);
                if (!excl) pos[i0 + i] = tile[i * ld + (l - j0)];
              }
            }
            if (any_excl) tm.set_excluded(slot, tile, i0, ib, j0, jt, ld, ninf);
            T* cbase = compute_col ? col_ptr + g * K * 2 * M + t * 2 * M : nullptr;
            tk.fwd(tile, ib, jt, ld, rstat + 2 * t * tl.rows, rstat + (2 * t + 1) * tl.rows,
                   compute_col ? cbase + j0 : nullptr, compute_col ? cbase + M + j0 : nullptr,
                   scratch);
          }
        }
        // A row with nothing left (max −inf, sum 0) gets −inf + log 0 = −inf.
        for (int64_t t = 0; t < K; ++t) {
          const T* rmax = rstat + 2 * t * tl.rows;
          const T* rsum = rmax + tl.rows;
          for (int64_t i = 0; i < ib; ++i) {
            a.row_lse[t * N + i0 + i] = static_cast<T>(static_cast<double>(rmax[i]) +
                                                       std::log(static_cast<double>(rsum[i])));
          }
        }
        for (int64_t i = 0; i < (count_pos ? ib : 0); ++i) {
          a.pos_count[i0 + i] = static_cast<T>(counts[i]);
        }
      });

  if (compute_col) {
    // Per prefix, the per-group (max, sum) pairs of every column merged in group order.
    at::parallel_for(0, K * M, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        const int64_t t = e / M, j = e % M;
        double m = -std::numeric_limits<double>::infinity();
        for (int64_t g = 0; g < tl.groups; ++g) {
          m = std::max(m, static_cast<double>(col_ptr[g * K * 2 * M + t * 2 * M + j]));
        }
        double s = 0;
        for (int64_t g = 0; g < tl.groups; ++g) {
          const T* cmax = col_ptr + g * K * 2 * M + t * 2 * M;
          const T* csum = cmax + M;
          if (csum[j] != 0) s += static_cast<double>(csum[j]) * std::exp(cmax[j] - m);
        }
        a.col_lse[t * M + j] = static_cast<T>(m + std::log(s));
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Shared backward walk
// ---------------------------------------------------------------------------------------------

// prep(slot, i0, ib, j0, jt): once per tile before the prefixes (masks).
// grad(slot, t, S, G, i0, ib, j0, jt): G^t of the tile from the finite logits S^t (0 on E).
// grad_q (N, D), grad_k (M, D), row_dot (k, N) zeroed by the caller; col_dot (k, M) written.
template <typename T, typename Prep, typename Grad>
void prefix_bwd_walk(const Prefix<T>& p, T* grad_q, T* grad_k, T* row_dot, T* col_dot,
                     const Prep& prep, const Grad& grad) {
  const int64_t N = p.N, M = p.M, D = p.D, K = p.k;
  const Tiling tl = make_tiling(N, M);
  const int64_t ld = tl.cols;
  const T s = p.scale;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // Per task: k logit tiles, U (the running tile first), G. Per group: column dots (k·M), and
  // grad_keys for every group but the first (written with β = 0 by the group's first block;
  // columns past d_k are never written, so they are zeroed when d_k < D).
  const int64_t tile_stride = aligned_stride<T>(tl.rows * tl.cols);
  const int64_t per_task = (K + 2) * tile_stride;
  at::Tensor work = at::empty({tl.tasks, per_task}, opts);
  at::Tensor cd_work = at::empty({tl.groups, K * M}, opts);
  const int64_t dk_copies = tl.groups - 1;
  at::Tensor dk_private = p.bounds.back() < D ? at::zeros({dk_copies, M * D}, opts)
                                              : at::empty({dk_copies, M * D}, opts);
  T* work_ptr = work.data_ptr<T>();
  T* cd_ptr = cd_work.data_ptr<T>();
  T* dk_ptr = dk_private.data_ptr<T>();
  auto group_dk = [&](int64_t g) { return g == 0 ? grad_k : dk_ptr + (g - 1) * M * D; };

  for_each_row_block(
      tl,
      [&](int64_t /*slot*/, int64_t g) {
        std::fill(cd_ptr + g * K * M, cd_ptr + (g + 1) * K * M, T(0));
      },
      [&](int64_t slot, int64_t g, int64_t blk) {
        T* tiles = work_ptr + slot * per_task;
        T* U = tiles + K * tile_stride;
        T* G = U + tile_stride;
        T* dk = group_dk(g);
        T* cd = cd_ptr + g * K * M;
        const T dk_beta = g > 0 && blk == tl.group_begin(g) ? T(0) : T(1);
        const int64_t i0 = blk * tl.rows;
        const int64_t ib = std::min(tl.rows, N - i0);
        for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
          const int64_t jt = std::min(tl.cols, M - j0);
          prep(slot, i0, ib, j0, jt);
          // The k logit tiles, with the forward's bits (same GEMMs, same alignment).
          for (int64_t t = 0; t < K; ++t) {
            segment_gemm(p, t, i0, ib, j0, jt, U, ld);
            form_logits(p, t, U, tiles + t * tile_stride, i0, ib, j0, jt, ld);
          }
          for (int64_t t = K - 1; t >= 0; --t) {
            const T* S = tiles + t * tile_stride;
            grad(slot, t, S, G, i0, ib, j0, jt);
            // Σ G·S per row and column (S finite; G = 0 on E), then U (+)= s·r_t·c_t·G.
            const T* cc = p.cs ? p.cs + t * M + j0 : nullptr;
            T* cdt = cd + t * M + j0;
            for (int64_t r = 0; r < ib; ++r) {
              const T* gr = G + r * ld;
              const T* sr = S + r * ld;
              T* ur = U + r * ld;
              T acc = 0;
              for (int64_t c = 0; c < jt; ++c) {
                const T gs = gr[c] * sr[c];
                acc += gs;
                cdt[c] += gs;
              }
              row_dot[t * N + i0 + r] += acc;
              const T rr = p.rs ? p.rs[t * N + i0 + r] : T(1);
              const bool scaled = p.rs != nullptr || cc != nullptr;
              if (t == K - 1) {
                if (cc) for (int64_t c = 0; c < jt; ++c) ur[c] = gr[c] * s * rr * cc[c];
                else if (scaled) for (int64_t c = 0; c < jt; ++c) ur[c] = gr[c] * s * rr;
                else for (int64_t c = 0; c < jt; ++c) ur[c] = gr[c] * s;
              } else {
                if (cc) for (int64_t c = 0; c < jt; ++c) ur[c] += gr[c] * s * rr * cc[c];
                else if (scaled) for (int64_t c = 0; c < jt; ++c) ur[c] += gr[c] * s * rr;
                else for (int64_t c = 0; c < jt; ++c) ur[c] += gr[c] * s;
              }
            }
            // Segment t: dQ_blk[:, seg] += U·K_tile[:, seg], dK_tile[:, seg] += Uᵀ·Q_blk[:, seg].
            const int64_t a = p.seg_begin(t), w = p.seg_width(t);
            gemm<T>(false, false, ib, w, jt, T(1), U, ld, p.K + j0 * D + a, D, T(1),
                    grad_q + i0 * D + a, D);
            gemm<T>(true, false, jt, w, ib, T(1), U, ld, p.Q + i0 * D + a, D, dk_beta,
                    dk + j0 * D + a, D);
          }
        }
      });
  merge_private_grad_keys(grad_k, dk_ptr, dk_copies, M * D);
  // Column dots: the group partials in group order.
  at::parallel_for(0, K * M, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      T v = cd_ptr[e];
      for (int64_t g = 1; g < tl.groups; ++g) v += cd_ptr[g * K * M + e];
      col_dot[e] = v;
    }
  });
}

// Offsets of the backward tile pass: a statistic of −inf becomes +inf (lse_bwd_cpu.cpp).
template <typename T>
std::vector<T> tile_offsets(const T* lse, int64_t n) {
  std::vector<T> off(lse, lse + n);
  for (T& v : off) {
    if (v == -std::numeric_limits<T>::infinity()) v = std::numeric_limits<T>::infinity();
  }
  return off;
}

template <typename T>
struct LsePrefixBwd {
  const int64_t* labels;
  const int32_t* row_ids;
  const int32_t* col_ids;
  bool exclude_self;
  const T* row_lse;   // (k, N), read only with grad_row
  const T* col_lse;   // (k, M), read only with grad_col
  const T* grad_row;  // (k, N) or nullptr
  const T* grad_col;  // (k, M) or nullptr
  const T* grad_pos;  // (k, N) or nullptr
  PairMasks<T> masks;
};

template <typename T>
void lse_prefix_bwd_impl(const Prefix<T>& p, const LsePrefixBwd<T>& a, T* grad_q, T* grad_k,
                         T* row_dot, T* col_dot) {
  const LseTileKernels<T> tk = lse_tile_kernels<T>();
  const int64_t N = p.N, M = p.M;
  const Tiling tl = make_tiling(N, M);
  const int64_t ld = tl.cols;
  const bool dense_terms = a.grad_row != nullptr || a.grad_col != nullptr;
  const bool class_pos = a.row_ids != nullptr && a.grad_pos != nullptr;
  const std::vector<T> row_off =
      a.grad_row ? tile_offsets(a.row_lse, p.k * N) : std::vector<T>();
  const std::vector<T> col_off =
      a.grad_col ? tile_offsets(a.col_lse, p.k * M) : std::vector<T>();
  const T ninf = -std::numeric_limits<T>::infinity();
  TileMasks<T> tm(a.masks, Designated{a.labels, a.row_ids, a.col_ids}, a.exclude_self, tl);

  auto prep = [&](int64_t slot, int64_t i0, int64_t ib, int64_t j0, int64_t jt) {
    tm.build(slot, i0, ib, j0, jt, ld);
  };
  auto grad = [&](int64_t slot, int64_t t, const T* S, T* G, int64_t i0, int64_t ib, int64_t j0,
                  int64_t jt) {
    const bool any_excl = tm.any_excluded(slot);
    if (dense_terms) {
      for (int64_t r = 0; r < ib; ++r) std::memcpy(G + r * ld, S + r * ld, jt * sizeof(T));
      if (any_excl) tm.set_excluded(slot, G, i0, ib, j0, jt, ld, ninf);
      tk.bwd(G, ib, jt, ld, a.grad_row ? row_off.data() + t * N + i0 : nullptr,
             a.grad_row ? a.grad_row + t * N + i0 : nullptr,
             a.grad_col ? col_off.data() + t * M + j0 : nullptr,
             a.grad_col ? a.grad_col + t * M + j0 : nullptr);
    } else {
      for (int64_t r = 0; r < ib; ++r) std::fill(G + r * ld, G + r * ld + jt, T(0));
    }
    if (class_pos) {
      tk.pos_add(G, ib, jt, ld, a.row_ids + i0, a.col_ids + j0, a.grad_pos + t * N + i0);
    } else if (a.grad_pos) {
      for (int64_t i = 0; i < ib; ++i) {
        const int64_t l = a.labels ? a.labels[i0 + i] : i0 + i;
        if (l >= j0 && l < j0 + jt) G[i * ld + (l - j0)] += a.grad_pos[t * N + i0 + i];
      }
    }
    if (any_excl) tm.set_excluded(slot, G, i0, ib, j0, jt, ld, T(0));
  };
  prefix_bwd_walk(p, grad_q, grad_k, row_dot, col_dot, prep, grad);
}

// ---------------------------------------------------------------------------------------------
// Sigmoid family
// ---------------------------------------------------------------------------------------------

template <typename T>
void sigmoid_prefix_fwd_impl(const Prefix<T>& p, double bias, const int32_t* row_ids,
                             const int32_t* col_ids, T* row_loss /* (k, N), zeroed */) {
  const SigmoidTileKernels<T> tk = sigmoid_tile_kernels<T>();
  const int64_t N = p.N, M = p.M, K = p.k;
  const Tiling tl = make_tiling(N, M);
  const int64_t ld = tl.cols;
  const T b = static_cast<T>(bias);
  const int64_t tile_stride = aligned_stride<T>(tl.rows * tl.cols);
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor work = at::empty({tl.tasks, 2 * tile_stride}, opts);
  T* work_ptr = work.data_ptr<T>();
  for_each_row_block(
      tl, [](int64_t, int64_t) {},
      [&](int64_t slot, int64_t /*g*/, int64_t blk) {
        T* run = work_ptr + slot * 2 * tile_stride;
        T* tile = run + tile_stride;
        const int64_t i0 = blk * tl.rows;
        const int64_t ib = std::min(tl.rows, N - i0);
        for (int64_t j0 = 0; j0 < M; j0 += tl.cols) {
          const int64_t jt = std::min(tl.cols, M - j0);
          for (int64_t t = 0; t < K; ++t) {
            segment_gemm(p, t, i0, ib, j0, jt, run, ld);
            form_logits(p, t, run, tile, i0, ib, j0, jt, ld);
            tk.fwd(tile, ib, jt, ld, b, row_ids ? row_ids + i0 : nullptr,
                   col_ids ? col_ids + j0 : nullptr, row_loss + t * N + i0);
          }
        }
      });
}

template <typename T>
void sigmoid_prefix_bwd_impl(const Prefix<T>& p, double bias, const int32_t* row_ids,
                             const int32_t* col_ids, const T* grad_row, T* grad_q, T* grad_k,
                             T* row_dot, T* col_dot, T* grad_bias) {
  const SigmoidTileKernels<T> tk = sigmoid_tile_kernels<T>();
  const int64_t N = p.N;
  const Tiling tl = make_tiling(N, p.M);
  const int64_t ld = tl.cols;
  const T b = static_cast<T>(bias);
  auto prep = [](int64_t, int64_t, int64_t, int64_t, int64_t) {};
  auto grad = [&](int64_t /*slot*/, int64_t t, const T* S, T* G, int64_t i0, int64_t ib,
                  int64_t j0, int64_t jt) {
    for (int64_t r = 0; r < ib; ++r) std::memcpy(G + r * ld, S + r * ld, jt * sizeof(T));
    tk.bwd(G, ib, jt, ld, b, row_ids ? row_ids + i0 : nullptr, col_ids ? col_ids + j0 : nullptr,
           grad_row + t * N + i0, grad_bias + t * N + i0);
  };
  prefix_bwd_walk(p, grad_q, grad_k, row_dot, col_dot, prep, grad);
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

std::vector<int64_t> check_dims(const char* op, at::IntArrayRef dims, const Problem& p) {
  TORCH_CHECK(!dims.empty(), op, ": dims must name at least one prefix dimension");
  std::vector<int64_t> bounds{0};
  for (const int64_t d : dims) {
    TORCH_CHECK(d > bounds.back() && d <= p.D, op,
                ": dims must be strictly increasing in [1, D = ", p.D, "], got ", dims);
    bounds.push_back(d);
  }
  return bounds;
}

// Optional (len, k) factor of any floating dtype → contiguous (k, len) in the statistic dtype.
at::Tensor check_factor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                        int64_t len, int64_t k, at::ScalarType stat) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->device().is_cpu() && at::isFloatingType(t->scalar_type()) && t->dim() == 2 &&
                  t->size(0) == len && t->size(1) == k,
              op, ": ", name, " must be a floating CPU tensor of shape (", len, ", ", k,
              "), got dtype ", t->scalar_type(), ", shape ", t->sizes(), ", device ", t->device());
  return t->to(stat).t().contiguous();
}

// Optional (k, len) tensor in the statistic dtype (a per-prefix statistic or gradient).
at::Tensor check_stacked(const char* op, const char* name, const std::optional<at::Tensor>& t,
                         int64_t k, int64_t len, at::ScalarType stat) {
  if (!t.has_value()) return at::Tensor();
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == stat && t->dim() == 2 &&
                  t->size(0) == k && t->size(1) == len,
              op, ": ", name, " must be a ", stat, " CPU tensor of shape (", k, ", ", len,
              "), got dtype ", t->scalar_type(), ", shape ", t->sizes(), ", device ", t->device());
  return t->contiguous();
}

template <typename T>
Prefix<T> make_prefix(const Problem& p, const at::Tensor& q, const at::Tensor& k,
                      std::vector<int64_t> bounds, const at::Tensor& rs, const at::Tensor& cs) {
  const int64_t kk = static_cast<int64_t>(bounds.size()) - 1;
  return Prefix<T>{q.data_ptr<T>(), k.data_ptr<T>(), p.N, p.M, p.D, static_cast<T>(p.scale),
                   std::move(bounds), kk, ptr_or_null<T>(rs), ptr_or_null<T>(cs)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_prefix_fwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale, at::IntArrayRef dims,
    const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& col_scale,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_classes,
    const std::optional<at::Tensor>& col_classes, bool exclude_self, bool compute_col,
    const std::optional<at::Tensor>& row_groups, const std::optional<at::Tensor>& col_groups,
    const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
    const std::optional<at::Tensor>& guide_threshold) {
  static const char* op = "ck_native::lse_prefix_fwd";
  const Problem p = check_problem(op, query, keys, scale);
  std::vector<int64_t> bounds = check_dims(op, dims, p);
  const int64_t kk = static_cast<int64_t>(dims.size());
  const at::Tensor rs = check_factor(op, "row_scale", row_scale, p.N, kk, p.stat);
  const at::Tensor cs = check_factor(op, "col_scale", col_scale, p.M, kk, p.stat);
  const ClassIds ids = check_classes(op, row_classes, col_classes, p);
  const at::Tensor lab = check_labels(op, labels, p, ids.defined());
  const MaskInputs mi =
      check_masks(op, row_groups, col_groups, guide_query, guide_keys, guide_threshold, p);
  const bool tile_counts = ids.defined() && mi.active();
  const at::Tensor q = as_stat(query, p.stat), k = as_stat(keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  at::Tensor row_lse = at::empty({kk, p.N}, opts);
  at::Tensor col_lse = at::empty({kk, compute_col ? p.M : 0}, opts);
  at::Tensor pos = at::zeros({kk, p.N}, opts);
  at::Tensor pos_count = tile_counts ? at::zeros({p.N}, opts)
                                     : at::empty({ids.defined() ? p.N : 0}, opts);

  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    const Prefix<T> pf = make_prefix<T>(p, q, k, bounds, rs, cs);
    LsePrefixFwd<T> args{ptr_or_null<int64_t>(lab), ids.row_ptr(), ids.col_ptr(), exclude_self,
                         row_lse.data_ptr<T>(), compute_col ? col_lse.data_ptr<T>() : nullptr,
                         pos.data_ptr<T>(), tile_counts ? pos_count.data_ptr<T>() : nullptr,
                         pair_masks<T>(mi)};
    lse_prefix_fwd_impl<T>(pf, args);
    if (ids.defined() && !tile_counts) {
      // |P(i)| without tiles (as lse_fwd): the columns of row i's class, minus the self pair.
      const int32_t* rid = ids.row_ptr();
      const int32_t* cid = ids.col_ptr();
      std::vector<int64_t> per_class(ids.count, 0);
      for (int64_t j = 0; j < p.M; ++j) ++per_class[cid[j]];
      T* cnt = pos_count.data_ptr<T>();
      for (int64_t i = 0; i < p.N; ++i) {
        const bool self = exclude_self && i < p.M && cid[i] == rid[i];
        cnt[i] = static_cast<T>(per_class[rid[i]] - (self ? 1 : 0));
      }
    }
  });
  return {row_lse, col_lse, pos, pos_count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_prefix_bwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale, at::IntArrayRef dims,
    const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& col_scale,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& row_classes,
    const std::optional<at::Tensor>& col_classes, bool exclude_self, const at::Tensor& row_lse,
    const at::Tensor& col_lse, const std::optional<at::Tensor>& grad_row,
    const std::optional<at::Tensor>& grad_col, const std::optional<at::Tensor>& grad_pos,
    const std::optional<at::Tensor>& row_groups, const std::optional<at::Tensor>& col_groups,
    const std::optional<at::Tensor>& guide_query, const std::optional<at::Tensor>& guide_keys,
    const std::optional<at::Tensor>& guide_threshold) {
  static const char* op = "ck_native::lse_prefix_bwd";
  const Problem p = check_problem(op, query, keys, scale);
  std::vector<int64_t> bounds = check_dims(op, dims, p);
  const int64_t kk = static_cast<int64_t>(dims.size());
  const at::Tensor rs = check_factor(op, "row_scale", row_scale, p.N, kk, p.stat);
  const at::Tensor cs = check_factor(op, "col_scale", col_scale, p.M, kk, p.stat);
  const ClassIds ids = check_classes(op, row_classes, col_classes, p);
  const at::Tensor lab = check_labels(op, labels, p, ids.defined());
  const MaskInputs mi =
      check_masks(op, row_groups, col_groups, guide_query, guide_keys, guide_threshold, p);
  const at::Tensor gr = check_stacked(op, "grad_row", grad_row, kk, p.N, p.stat);
  const at::Tensor gc = check_stacked(op, "grad_col", grad_col, kk, p.M, p.stat);
  const at::Tensor gp = check_stacked(op, "grad_pos", grad_pos, kk, p.N, p.stat);
  const at::Tensor rl = gr.defined() ? check_stacked(op, "row_lse", row_lse, kk, p.N, p.stat)
                                     : at::Tensor();
  const at::Tensor cl = gc.defined() ? check_stacked(op, "col_lse", col_lse, kk, p.M, p.stat)
                                     : at::Tensor();
  const at::Tensor q = as_stat(query, p.stat), k = as_stat(keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  at::Tensor grad_q = at::zeros({p.N, p.D}, opts);
  at::Tensor grad_k = at::zeros({p.M, p.D}, opts);
  at::Tensor row_dot = at::zeros({kk, p.N}, opts);
  at::Tensor col_dot = at::zeros({kk, p.M}, opts);
  if (!gr.defined() && !gc.defined() && !gp.defined()) return {grad_q, grad_k, row_dot, col_dot};

  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    const Prefix<T> pf = make_prefix<T>(p, q, k, bounds, rs, cs);
    LsePrefixBwd<T> args{ptr_or_null<int64_t>(lab), ids.row_ptr(), ids.col_ptr(), exclude_self,
                         ptr_or_null<T>(rl), ptr_or_null<T>(cl), ptr_or_null<T>(gr),
                         ptr_or_null<T>(gc), ptr_or_null<T>(gp), pair_masks<T>(mi)};
    lse_prefix_bwd_impl<T>(pf, args, grad_q.data_ptr<T>(), grad_k.data_ptr<T>(),
                           row_dot.data_ptr<T>(), col_dot.data_ptr<T>());
  });
  return {grad_q, grad_k, row_dot, col_dot};
}

ClassIds positive_ids(const char* op, const std::optional<at::Tensor>& row_classes,
                      const std::optional<at::Tensor>& col_classes, bool diagonal,
                      const Problem& p) {
  ClassIds ids = check_classes(op, row_classes, col_classes, p);
  if (!ids.defined() && diagonal) ids = diagonal_ids(op, p);
  return ids;
}

at::Tensor sigmoid_prefix_fwd_cpu(const at::Tensor& query, const at::Tensor& keys,
                                  const at::Tensor& scale, const at::Tensor& bias,
                                  at::IntArrayRef dims, const std::optional<at::Tensor>& row_scale,
                                  const std::optional<at::Tensor>& col_scale,
                                  const std::optional<at::Tensor>& row_classes,
                                  const std::optional<at::Tensor>& col_classes, bool diagonal) {
  static const char* op = "ck_native::sigmoid_prefix_fwd";
  const Problem p = check_problem(op, query, keys, scale);
  const double b = check_bias(op, bias, p);
  std::vector<int64_t> bounds = check_dims(op, dims, p);
  const int64_t kk = static_cast<int64_t>(dims.size());
  const at::Tensor rs = check_factor(op, "row_scale", row_scale, p.N, kk, p.stat);
  const at::Tensor cs = check_factor(op, "col_scale", col_scale, p.M, kk, p.stat);
  const ClassIds ids = positive_ids(op, row_classes, col_classes, diagonal, p);
  const at::Tensor q = as_stat(query, p.stat), k = as_stat(keys, p.stat);
  at::Tensor row_loss = at::zeros({kk, p.N}, query.options().dtype(p.stat));
  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    const Prefix<T> pf = make_prefix<T>(p, q, k, bounds, rs, cs);
    sigmoid_prefix_fwd_impl<T>(pf, b, ids.row_ptr(), ids.col_ptr(), row_loss.data_ptr<T>());
  });
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_prefix_bwd_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& scale,
    const at::Tensor& bias, at::IntArrayRef dims, const std::optional<at::Tensor>& row_scale,
    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& row_classes,
    const std::optional<at::Tensor>& col_classes, bool diagonal, const at::Tensor& grad_row) {
  static const char* op = "ck_native::sigmoid_prefix_bwd";
  const Problem p = check_problem(op, query, keys, scale);
  const double b = check_bias(op, bias, p);
  std::vector<int64_t> bounds = check_dims(op, dims, p);
  const int64_t kk = static_cast<int64_t>(dims.size());
  const at::Tensor rs = check_factor(op, "row_scale", row_scale, p.N, kk, p.stat);
  const at::Tensor cs = check_factor(op, "col_scale", col_scale, p.M, kk, p.stat);
  const ClassIds ids = positive_ids(op, row_classes, col_classes, diagonal, p);
  const at::Tensor gr = check_stacked(op, "grad_row", grad_row, kk, p.N, p.stat);
  const at::Tensor q = as_stat(query, p.stat), k = as_stat(keys, p.stat);
  const auto opts = query.options().dtype(p.stat);
  at::Tensor grad_q = at::zeros({p.N, p.D}, opts);
  at::Tensor grad_k = at::zeros({p.M, p.D}, opts);
  at::Tensor row_dot = at::zeros({kk, p.N}, opts);
  at::Tensor col_dot = at::zeros({kk, p.M}, opts);
  at::Tensor grad_bias = at::zeros({kk, p.N}, opts);
  dispatch_stat(p.stat, [&](auto tag) {
    using T = decltype(tag);
    const Prefix<T> pf = make_prefix<T>(p, q, k, bounds, rs, cs);
    sigmoid_prefix_bwd_impl<T>(pf, b, ids.row_ptr(), ids.col_ptr(), gr.data_ptr<T>(),
                               grad_q.data_ptr<T>(), grad_k.data_ptr<T>(), row_dot.data_ptr<T>(),
                               col_dot.data_ptr<T>(), grad_bias.data_ptr<T>());
  });
  return {grad_q, grad_k, row_dot, col_dot, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(ck_native, CPU, m) {
  m.impl("lse_prefix_fwd", &lse_prefix_fwd_cpu);
  m.impl("lse_prefix_bwd", &lse_prefix_bwd_cpu);
  m.impl("sigmoid_prefix_fwd", &sigmoid_prefix_fwd_cpu);
  m.impl("sigmoid_prefix_bwd", &sigmoid_prefix_bwd_cpu);
}

}  // namespace ck::cpu
