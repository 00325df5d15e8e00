// LibTorch test: flash_ext's operators called from C++ against an explicit
// float64 reference, forward and gradients (autograd through the C++ kernel).
#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "common/fast_divmod.h"
#include "common/mask.h"
#include "cuda/bwd_workspace.h"
#include "cuda/tile_schedule.h"
#include "flash_ext.h"

namespace {

int failures = 0;

void expect_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got.to(at::kDouble) - want.to(at::kDouble)).abs().max().item<double>();
  const bool ok = std::isfinite(err) && err <= tol;
  std::printf("%-44s max err %.3e (tol %.1e) %s\n", what.c_str(), err, tol, ok ? "ok" : "FAIL");
  if (!ok) ++failures;
}

// softmax(q kᵀ · scale + mask) v in float64, with GQA by repeating k/v heads.
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     const std::optional<at::Tensor>& bias) {
  const int64_t group = q.size(1) / k.size(1);
  const at::Tensor kr = k.repeat_interleave(group, 1), vr = v.repeat_interleave(group, 1);
  at::Tensor scores = at::matmul(q, kr.transpose(-2, -1)) / std::sqrt(static_cast<double>(q.size(-1)));
  if (bias.has_value()) scores = scores + *bias;
  if (causal) {
    const at::Tensor keep = at::ones({q.size(2), k.size(2)}, at::kBool).tril();
    scores = scores.masked_fill(keep.logical_not(), -INFINITY);
  }
  return at::matmul(at::softmax(scores, -1), vr);
}

void test_forward_backward(bool causal, bool with_bias, int64_t group) {
  const std::string name = std::string("attention causal=") + (causal ? "1" : "0") +
                           " bias=" + (with_bias ? "1" : "0") + " gqa=" + std::to_string(group);
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const int64_t B = 2, Hkv = 2, H = Hkv * group, L = 37, S = 53, D = 24;
  at::Tensor q = at::randn({B, H, L, D}, opts).requires_grad_();
  at::Tensor k = at::randn({B, Hkv, S, D}, opts).requires_grad_();
  at::Tensor v = at::randn({B, Hkv, S, D}, opts).requires_grad_();
  std::optional<at::Tensor> bias;
  if (with_bias) bias = at::randn({1, H, L, S}, opts).requires_grad_();

  const at::Tensor out = std::get<0>(flash_ext::attention(q, k, v, bias, 0.0, std::nullopt, -1,
                                                          causal ? 0 : -1));
  const at::Tensor ref = reference(q, k, v, causal, bias);
  expect_close(name + " out", out, ref, 1e-10);

  const at::Tensor grad = at::randn_like(out);
  std::vector<at::Tensor> inputs = {q, k, v};
  if (bias) inputs.push_back(*bias);
  const auto got = torch::autograd::grad({out}, inputs, {grad});
  const auto want = torch::autograd::grad({ref}, inputs, {grad});
  const char* names[] = {" dq", " dk", " dv", " dbias"};
  for (size_t i = 0; i < inputs.size(); ++i) expect_close(name + names[i], got[i], want[i], 1e-9);
}

// `call` must throw a c10::Error whose message contains `message`.
void expect_error(const std::string& what, const std::function<void()>& call, const std::string& message) {
  bool raised = false;
  try {
    call();
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find(message) != std::string::npos;
  }
  std::printf("%-44s %s\n", what.c_str(), raised ? "ok" : "FAIL");
  if (!raised) ++failures;
}

void test_bad_input_raises() {
  const at::Tensor q = at::randn({1, 2, 4, 8}), k3 = at::randn({1, 4, 8});
  expect_error("3-D key raises a named error", [&] { flash_ext::attention(q, k3, k3); },
               "key must be a 4-D tensor");
}

// The SDPA entry point: at::scaled_dot_product_attention's arguments, GQA
// only with enable_gqa (a single key/value head broadcasts without it).
void test_sdpa() {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor q = at::randn({2, 4, 19, 16}, opts);
  const at::Tensor k = at::randn({2, 2, 23, 16}, opts), v = at::randn({2, 2, 23, 16}, opts);
  const at::Tensor out = flash_ext::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, true, std::nullopt,
                                                                 /*enable_gqa=*/true);
  expect_close("sdpa causal gqa", out, reference(q, k, v, true, std::nullopt), 1e-10);
  const at::Tensor k1 = k.narrow(1, 0, 1), v1 = v.narrow(1, 0, 1);
  expect_close("sdpa one kv head without enable_gqa", flash_ext::scaled_dot_product_attention(q, k1, v1),
               reference(q, k1, v1, false, std::nullopt), 1e-10);
  expect_error("sdpa gqa without enable_gqa raises", [&] { flash_ext::scaled_dot_product_attention(q, k, v); },
               "enable_gqa");
}

void test_kvcache() {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const int64_t B = 2, H = 4, Hkv = 2, D = 16, max_len = 40;
  const at::Tensor q = at::randn({B, 1, H, D}, opts);
  const at::Tensor k_cache = at::randn({B, max_len, Hkv, D}, opts);
  const at::Tensor v_cache = at::randn({B, max_len, Hkv, D}, opts);
  const at::Tensor lens = at::tensor({17, 31}, at::kInt);
  const at::Tensor out = std::get<0>(flash_ext::flash_attn_with_kvcache(q, k_cache, v_cache, lens));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lens[b].item<int64_t>();
    const at::Tensor qb = q[b].transpose(0, 1).unsqueeze(0).to(at::kDouble);  // (1, H, 1, D)
    const at::Tensor kb = k_cache[b].narrow(0, 0, n).transpose(0, 1).unsqueeze(0).to(at::kDouble);
    const at::Tensor vb = v_cache[b].narrow(0, 0, n).transpose(0, 1).unsqueeze(0).to(at::kDouble);
    const at::Tensor ref = reference(qb, kb, vb, false, std::nullopt);
    expect_close("kvcache batch " + std::to_string(b), out[b].transpose(0, 1).unsqueeze(0), ref, 1e-5);
  }
}

// The decode kernel's multiply-high division (common/fast_divmod.h) against
// '/' for small divisors (q_len, page sizes, kv heads) and large ones, every
// dividend below 2^16 and strided ones up to 2^31 - 1.
void test_fast_divmod() {
  int64_t wrong = 0, checked = 0;
  std::vector<uint32_t> divisors;
  for (uint32_t d = 1; d <= 300; ++d) divisors.push_back(d);
  for (uint32_t d : {511u, 4096u, 65535u, 65537u, 1000003u, 0x7fffffffu}) divisors.push_back(d);
  for (uint32_t d : divisors) {
    const flash_ext::FastDivmod fast(d);
    const auto check = [&](uint32_t n) {
      ++checked;
      if (fast.div(n) != n / d) ++wrong;
    };
    for (uint32_t n = 0; n < (1u << 16); ++n) check(n);
    for (uint64_t n = 1u << 16; n < (uint64_t{1} << 31); n += 7919 * 13) check(static_cast<uint32_t>(n));
    check(0x7fffffffu);
    check(0x7fffffffu - 1);
  }
  std::printf("%-44s %lld of %lld wrong %s\n", "fast division by run-time divisors", static_cast<long long>(wrong),
              static_cast<long long>(checked), wrong == 0 ? "ok" : "FAIL");
  if (wrong != 0) ++failures;
}

// The tile ranges the Hopper kernels mask outside of against
// tile_fully_visible tile by tile: key tiles of a query tile (forward) and
// query tiles of a key tile (backward); causal, sliding and one-sided
// windows, offsets of both signs, partial last tiles.
void test_fully_visible_tiles() {
  int64_t wrong = 0, checked = 0;
  const auto check = [&](bool got, bool want) {
    ++checked;
    if (got != want) ++wrong;
  };
  for (int64_t block_n : {64, 80, 176}) {
    for (int64_t block_m : {64, 128}) {
      for (int64_t left : {-1, 0, 5, 100, 300}) {
        for (int64_t right : {-1, 0, 7, 200}) {
          for (int64_t offset : {-500, -130, -1, 0, 1, 64, 333, 1000}) {
            const flash_ext::VisibilityWindow w{left, right, offset};
            for (int64_t kv_len : {0, 1, 80, 700, 1024}) {
              for (int64_t row0 = 0; row0 < 900; row0 += block_m) {
                const flash_ext::TileRange keys =
                    flash_ext::fully_visible_tiles(w, row0, row0 + block_m, kv_len, block_n);
                for (int64_t n = 0; n * block_n < kv_len + block_n; ++n) {
                  const int64_t n0 = n * block_n;
                  const bool want = n0 + block_n <= kv_len &&
                                    flash_ext::tile_fully_visible(w, row0, row0 + block_m, n0, n0 + block_n);
                  check(n >= keys.first && n < keys.end, want);
                  const flash_ext::TileRange queries =
                      flash_ext::fully_visible_query_tiles(w, n0, n0 + block_n, kv_len, block_m);
                  check(row0 / block_m >= queries.first && row0 / block_m < queries.end, want);
                }
              }
            }
          }
        }
      }
    }
  }
  std::printf("%-44s %lld of %lld wrong %s\n", "fully visible key and query tiles", static_cast<long long>(wrong),
              static_cast<long long>(checked), wrong == 0 ? "ok" : "FAIL");
  if (wrong != 0) ++failures;
}

// The Hopper kernels' tile placement (cuda/tile_schedule.h, multiply-high
// divisions) against the same schedule in plain division: sections of
// `section` pairs after a first one of the pairs left over, the step
// slowest inside a section, either way round; every (step, batch entry,
// head) placed exactly once. Sections that do and do not divide the pairs,
// one-pair sections (and 0, clamped to 1), one-section schedules.
void test_tile_schedule() {
  int64_t wrong = 0, checked = 0;
  for (int steps : {1, 3, 4, 32, 129}) {
    for (int heads : {1, 3, 16, 32}) {
      for (int batch : {1, 2, 7}) {
        const int batch_heads = batch * heads;
        for (int section : {0, 1, 2, 5, 9, 16, batch_heads, batch_heads + 3}) {
          for (bool descending : {false, true}) {
            const auto s = flash_ext::cuda::sm90::make_tile_schedule(steps, heads, batch_heads, section, descending);
            const int size = section < 1 ? 1 : section < batch_heads ? section : batch_heads;
            const int first = batch_heads - (batch_heads - 1) / size * size;
            std::vector<int> seen(static_cast<size_t>(steps) * batch_heads, 0);
            for (int tile = 0; tile < s.tiles(); ++tile) {
              int section0 = 0, in_section = tile, section_pairs = first;
              if (tile >= first * steps) {
                const int later = tile - first * steps;
                section0 = first + later / (size * steps) * size;
                in_section = later % (size * steps);
                section_pairs = size;
              }
              const int step = in_section / section_pairs, bh = section0 + in_section % section_pairs;
              const flash_ext::cuda::sm90::TileCoord c = flash_ext::cuda::sm90::tile_coord(s, tile);
              ++checked;
              const bool placed = c.step >= 0 && c.step < steps && c.b >= 0 && c.b < batch && c.h >= 0 &&
                                  c.h < heads;
              if (!placed || c.step != (descending ? steps - 1 - step : step) || c.b != bh / heads ||
                  c.h != bh % heads) {
                ++wrong;
              }
              if (placed) ++seen[(static_cast<size_t>(c.b) * heads + c.h) * steps + c.step];
            }
            for (int count : seen) wrong += count != 1;
          }
        }
      }
    }
  }
  // Sections whose offset tiles would pass 2^31 become one section (and
  // tile_coord's tile + lead stays in the multiply-highs' range).
  const auto huge = flash_ext::cuda::sm90::make_tile_schedule(1 << 20, 3, 1500, 1000, false);
  const auto last = flash_ext::cuda::sm90::tile_coord(huge, huge.tiles() - 1);
  ++checked;
  if (huge.section != 1500 || huge.first_pairs != 1500 || last.step != (1 << 20) - 1 || last.b != 499 ||
      last.h != 2) {
    ++wrong;
  }
  std::printf("%-44s %lld of %lld wrong %s\n", "Hopper tile placement", static_cast<long long>(wrong),
              static_cast<long long>(checked), wrong == 0 ? "ok" : "FAIL");
  if (wrong != 0) ++failures;
}

// The backward's workspace layouts (cuda/bwd_workspace.h): every (sequence,
// head)'s run of padded rows (whole 64-, 80- and 128-row tiles) of dq_accum
// and of the Hopper
// pre-pass's D/lse rows lies inside its buffer, 16-byte aligned where bulk
// copies read it, and apart from every other run; dense and varlen batches
// (ragged, empty sequences, lengths off the tile size), and varlen bounds
// that are wrong (decreasing, past the tensor), where the runs must still
// stay inside the buffers.
void test_bwd_workspace_layout() {
  using flash_ext::cuda::whole_tiles;
  using flash_ext::cuda::sm80::dq_accum_row0;
  using flash_ext::cuda::padded_query_rows;
  using flash_ext::cuda::sm90::softmax_row0;
  int64_t wrong = 0, checked = 0;
  // Runs [begin, end) inside [0, size); when `apart`, no two overlap.
  const auto check_runs = [&](std::vector<std::pair<int64_t, int64_t>> runs, int64_t size, int64_t align,
                              bool apart) {
    std::sort(runs.begin(), runs.end());
    for (size_t i = 0; i < runs.size(); ++i) {
      ++checked;
      const bool inside = runs[i].first >= 0 && runs[i].second <= size && runs[i].first % align == 0;
      const bool overlaps = apart && i > 0 && runs[i].first < runs[i - 1].second && runs[i].first < runs[i].second;
      if (!inside || overlaps) ++wrong;
    }
  };
  const std::vector<std::vector<int32_t>> cases = {
      {0, 512, 1024, 1536}, {0, 100, 100, 357, 360, 1000}, {0, 0, 0}, {0, 1, 130, 258, 259},
      {0, 300, 200, 700},   {0, 5000, 40, 60},             {-7, 64, 64, 128},
      {0, 2048, 18432, 18433}};
  for (const auto& cu : cases) {
    for (bool varlen : {false, true}) {
      for (int64_t heads : {1, 3, 16}) {
        flash_ext::AttentionBwdParams p;
        p.batch = static_cast<int64_t>(cu.size()) - 1;
        p.heads = p.kv_heads = heads;
        int64_t max_len = 0;
        for (size_t b = 0; b + 1 < cu.size(); ++b) max_len = std::max<int64_t>(max_len, cu[b + 1] - cu[b]);
        p.q_len = p.kv_len = max_len;
        const bool valid = std::is_sorted(cu.begin(), cu.end()) && cu.front() == 0;
        if (varlen) {
          p.cu_seqlens_q = p.cu_seqlens_k = cu.data();
          p.total_q = p.total_k = valid ? cu.back() : 1000;
        }
        const flash_ext::cuda::sm80::DqWorkspace ws = flash_ext::cuda::sm80::dq_workspace(p, 128, 64);
        const int64_t head_rows = flash_ext::cuda::sm90::softmax_head_rows(p);
        std::vector<std::pair<int64_t, int64_t>> dq_runs, softmax_runs;
        for (int64_t b = 0; b < p.batch; ++b) {
          const flash_ext::SequenceBounds seq = flash_ext::sequence_bounds(p, b);
          for (int64_t h = 0; h < heads; ++h) {
            const int64_t dq0 = dq_accum_row0(varlen, p, ws, seq, b, h);
            const int64_t padded = padded_query_rows(seq.q_len);
            for (int64_t tile : {64, 128, flash_ext::cuda::kTallQueryTileRows}) {
              wrong += whole_tiles(seq.q_len, tile) > padded;
            }
            wrong += padded - seq.q_len > flash_ext::cuda::kQueryRowSlack;
            dq_runs.emplace_back(dq0, dq0 + padded);
            const int64_t s0 = varlen ? softmax_row0<true>(p, head_rows, seq.q_row0, seq.q_len, b, h)
                                      : softmax_row0<false>(p, head_rows, seq.q_row0, seq.q_len, b, h);
            softmax_runs.emplace_back(s0, s0 + padded);
          }
        }
        check_runs(dq_runs, ws.floats / ws.dims, 1, valid);
        check_runs(softmax_runs, flash_ext::cuda::sm90::bwd_softmax_d_floats(p) / 2, 4, valid);
      }
    }
  }
  std::printf("%-44s %lld of %lld wrong %s\n", "backward workspace runs", static_cast<long long>(wrong),
              static_cast<long long>(checked), wrong == 0 ? "ok" : "FAIL");
  if (wrong != 0) ++failures;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  for (bool causal : {false, true}) {
    for (bool bias : {false, true}) {
      if (causal && bias) continue;
      test_forward_backward(causal, bias, causal ? 2 : 1);
    }
  }
  test_bad_input_raises();
  test_sdpa();
  test_kvcache();
  test_fast_divmod();
  test_fully_visible_tiles();
  test_tile_schedule();
  test_bwd_workspace_layout();
  std::printf("%s\n", failures == 0 ? "all C++ tests passed" : "C++ tests FAILED");
  return failures == 0 ? 0 : 1;
}
