// Host emulation of the CUDA masked CRF kernels: the block program of
// csrc/cuda/masked_crf_tile.cuh run on 256 std::threads per block with a barrier for
// __syncthreads, blocks one after another (a grid of one block walks every tile, as the
// grid-stride loop does). Built by tests/test_masked_crf_cuda.py with
//   c++ -std=c++20 -O1 -shared -fPIC -pthread -I csrc
// and called through ctypes; floating types only (the device code converts half/bfloat16 with
// the same static_cast, so they add nothing to what is checked here).
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#include "cuda/masked_crf_tile.cuh"

namespace ct = attenscribble_ops::crf_tile;

namespace {

struct HostSync {
  std::barrier<>* barrier;
  void operator()() const { barrier->arrive_and_wait(); }
};

template <typename Body>
void run_threads(Body body) {
  std::barrier<> barrier(ct::kThreads);
  std::vector<std::thread> threads;
  for (int tid = 0; tid < ct::kThreads; ++tid) {
    threads.emplace_back([&, tid] {
      HostSync sync{&barrier};
      body(tid, sync);
    });
  }
  for (auto& t : threads) t.join();
}

template <int CC, typename T>
int emulate(bool with_grad, const int64_t* ints, const double* reals, void* const* ptrs, int64_t shared_budget,
            int64_t* plan_out) {
  ct::Args<T, T> a;
  a.batch = ints[0];
  a.classes = ints[1];
  a.channels = ints[2];
  a.kernels = ints[3];
  a.depth = ints[4];
  a.height = ints[5];
  a.width = ints[6];
  a.rd = ints[7];
  a.rh = ints[8];
  a.rw = ints[9];
  a.has_mask_dst = ints[10] != 0;
  a.has_mask_src = ints[11] != 0;
  a.zero_padding = ints[12] != 0;
  a.sd = T(reals[0]);
  a.sh = T(reals[1]);
  a.sw = T(reals[2]);
  a.probs = static_cast<const T*>(ptrs[0]);
  a.image = static_cast<const T*>(ptrs[1]);
  a.mask_dst = static_cast<const T*>(ptrs[2]);
  a.mask_src = static_cast<const T*>(ptrs[3]);
  a.mu = static_cast<const T*>(ptrs[4]);
  a.table = static_cast<const T*>(ptrs[5]);
  a.grad = static_cast<T*>(ptrs[6]);
  T* loss = static_cast<T*>(ptrs[7]);
  ct::plan<CC>(a, with_grad, shared_budget);
  plan_out[0] = a.band_y;
  plan_out[1] = a.band_x;
  plan_out[2] = a.tiles;
  const int64_t n_shared = ct::shared_bytes<CC>(a) / int64_t(sizeof(T));
  std::vector<T> shared(static_cast<size_t>(n_shared)), red(ct::kThreads), partial(static_cast<size_t>(a.tiles));
  a.partial = partial.data();
  run_threads([&](int tid, HostSync& sync) {
    if (with_grad) {
      ct::run_block<CC, true>(a, 0, 1, tid, shared.data(), red.data(), sync);
    } else {
      ct::run_block<CC, false>(a, 0, 1, tid, shared.data(), red.data(), sync);
    }
  });
  std::vector<double> red64(ct::kThreads);
  run_threads([&](int tid, HostSync& sync) { ct::sum_partials(partial.data(), a.tiles, loss, tid, red64.data(), sync); });
  return 0;
}

template <typename T>
int emulate_chunk(int chunk, bool with_grad, const int64_t* ints, const double* reals, void* const* ptrs,
                  int64_t shared_budget, int64_t* plan_out) {
  switch (chunk) {
    case 2: return emulate<2, T>(with_grad, ints, reals, ptrs, shared_budget, plan_out);
    case 4: return emulate<4, T>(with_grad, ints, reals, ptrs, shared_budget, plan_out);
    case 8: return emulate<8, T>(with_grad, ints, reals, ptrs, shared_budget, plan_out);
    default: return 1;
  }
}

}  // namespace

// ints: batch, classes, channels, kernels, depth, height, width, rd, rh, rw, has_mask_dst,
// has_mask_src, zero_padding. reals: sd, sh, sw. ptrs: probs, image, mask_dst, mask_src, mu,
// table, grad, loss (null where unused). plan_out: band_y, band_x, tiles.
extern "C" int crf_emulate(int with_grad, int is_double, int chunk, const int64_t* ints, const double* reals,
                           void* const* ptrs, int64_t shared_budget, int64_t* plan_out) {
  return is_double ? emulate_chunk<double>(chunk, with_grad != 0, ints, reals, ptrs, shared_budget, plan_out)
                   : emulate_chunk<float>(chunk, with_grad != 0, ints, reals, ptrs, shared_budget, plan_out);
}
