// kvcache_attention: checks (values too, on the host, where that is cheap),
// outputs and params, then the device's split-KV kernels.
#include <ATen/DeviceGuard.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include "backend.h"
#include "checks.h"
#include "ops.h"

namespace flash_ext {
namespace {

constexpr const char* kOp = "flash_ext.flash_attn_with_kvcache";

void check_same(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " must have q's dtype (",
                   q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), kOp, ": ", name, " must be on q's device (",
                    q.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 4, kOp, ": ", name, " must be 4-D, got ", t.dim(), "-D");
  check_last_dim_contiguous(kOp, name, t);
}

void check_int32_on(const char* name, const at::Tensor& t, const at::Tensor& q, int64_t dims) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, kOp, ": ", name, " must be int32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), kOp, ": ", name, " must be on q's device (",
                    q.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == dims, kOp, ": ", name, " must be ", dims, "-D, got ", t.dim(), "-D");
}

// Lengths and page ids, checked where reading them costs no device sync.
void check_cache_values(const at::Tensor& lens, const std::optional<at::Tensor>& block_table,
                        int64_t new_len, int64_t capacity, int64_t page_size, int64_t num_pages) {
  const int32_t* len = lens.data_ptr<int32_t>();
  const int32_t* table = block_table.has_value() ? block_table->data_ptr<int32_t>() : nullptr;
  for (int64_t b = 0; b < lens.numel(); ++b) {
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] + new_len <= capacity, kOp, ": cache_seqlens[", b,
                      "] = ", len[b], " must be in [0, ", capacity - new_len, "] so that ", new_len,
                      " new token(s) fit in a cache of ", capacity, " rows");
    if (table == nullptr) continue;
    const int64_t pages_used = (len[b] + new_len + page_size - 1) / page_size;
    for (int64_t i = 0; i < pages_used; ++i) {
      const int32_t page = table[b * block_table->stride(0) + i];
      TORCH_CHECK_VALUE(page >= 0 && page < num_pages, kOp, ": block_table[", b, ", ", i, "] = ",
                        page, " is not a page id in [0, ", num_pages, ")");
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kvcache_attention(
    const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_new_in, const std::optional<at::Tensor>& v_new_in,
    const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table, double scale,
    bool causal, int64_t num_splits, double softcap, const std::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right) {
  // q and the new keys are only read: a layout the device's kernels cannot
  // read in place is copied. The caches are written in place, so the kernels
  // must take them as they are (the CUDA glue names what they need).
  const at::Tensor q = backend::readable_layout(q_in);
  const auto readable = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    return t.has_value() ? std::optional<at::Tensor>(backend::readable_layout(*t)) : std::nullopt;
  };
  const std::optional<at::Tensor> k_new = readable(k_new_in), v_new = readable(v_new_in);
  TORCH_CHECK_VALUE(q.dim() == 4, kOp, ": q must be 4-D (batch, q_len, heads, dim), got ", q.dim(), "-D");
  check_floating(kOp, "q", q);
  check_same("q", q, q);
  check_same("k_cache", k_cache, q);
  check_same("v_cache", v_cache, q);
  const int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k_cache.size(2), v_dim = v_cache.size(3);
  TORCH_CHECK_VALUE(k_cache.sizes().slice(0, 3) == v_cache.sizes().slice(0, 3), kOp,
                    ": k_cache and v_cache must agree in their first three sizes, got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(3) == dim, kOp, ": k_cache head dim must be q's (", dim, "), got ",
                    k_cache.size(3));
  TORCH_CHECK_VALUE(kv_heads > 0 && heads % kv_heads == 0, kOp, ": q heads (", heads,
                    ") must be a multiple of the cache's kv heads (", kv_heads, ")");
  TORCH_CHECK_VALUE(std::isfinite(scale), kOp, ": softmax_scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(num_splits >= 0, kOp, ": num_splits must be >= 0 (0 = automatic), got ", num_splits);
  check_window(kOp, window_left, window_right);
  check_softcap_alibi(kOp, softcap, alibi_slopes, batch, heads, q.device());

  check_int32_on("cache_seqlens", cache_seqlens, q, 1);
  TORCH_CHECK_VALUE(cache_seqlens.size(0) == batch, kOp, ": cache_seqlens must have one length per batch entry (",
                    batch, "), got ", cache_seqlens.size(0));
  int64_t page_size = k_cache.size(1), capacity = k_cache.size(1);
  if (block_table.has_value()) {
    check_int32_on("block_table", *block_table, q, 2);
    TORCH_CHECK_VALUE(block_table->size(0) == batch, kOp, ": block_table must have one row per batch entry (",
                      batch, "), got ", block_table->size(0));
    TORCH_CHECK_VALUE(block_table->stride(1) == 1, kOp, ": block_table rows must be contiguous");
    capacity = block_table->size(1) * page_size;
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == batch, kOp, ": k_cache batch (", k_cache.size(0),
                      ") must match q's (", batch, ") unless block_table is given");
  }

  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), kOp, ": k and v must be given together");
  int64_t new_len = 0;
  if (k_new.has_value()) {
    check_same("k", *k_new, q);
    check_same("v", *v_new, q);
    new_len = k_new->size(1);
    const std::vector<int64_t> k_shape = {batch, new_len, kv_heads, dim};
    const std::vector<int64_t> v_shape = {batch, new_len, kv_heads, v_dim};
    TORCH_CHECK_VALUE(k_new->sizes() == k_shape, kOp, ": k must have shape ", at::IntArrayRef(k_shape),
                      ", got ", k_new->sizes());
    TORCH_CHECK_VALUE(v_new->sizes() == v_shape, kOp, ": v must have shape ", at::IntArrayRef(v_shape),
                      ", got ", v_new->sizes());
    for (const auto& [name, cache] : {std::pair<const char*, const at::Tensor*>{"k_cache", &k_cache},
                                      {"v_cache", &v_cache}}) {
      TORCH_CHECK_VALUE(at::has_internal_overlap(*cache) != at::MemOverlap::Yes, kOp, ": ", name,
                        " must be writable to append k/v (it has overlapping memory, e.g. an expanded view)");
    }
  }
  const at::Tensor lens = cache_seqlens.contiguous();
  if (!q.is_cuda()) check_cache_values(lens, block_table, new_len, capacity, page_size, k_cache.size(0));

  const at::OptionalDeviceGuard guard(q.device());
  at::Tensor out = at::empty({batch, q_len, heads, v_dim}, q.options());
  at::Tensor lse = at::empty({batch, heads, q_len}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  KVCacheParams p;
  p.dtype = scalar_kind(q.scalar_type());
  p.batch = batch;
  p.heads = heads;
  p.kv_heads = kv_heads;
  p.q_len = q_len;
  p.new_len = new_len;
  p.head_dim = dim;
  p.v_head_dim = v_dim;
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  // (batch, head, seq) strides of (batch, seq, head, dim) tensors.
  const auto bhs = [](int64_t (&dst)[3], const at::Tensor& t) {
    dst[0] = t.stride(0);
    dst[1] = t.stride(2);
    dst[2] = t.stride(1);
  };
  bhs(p.q_stride, q);
  bhs(p.o_stride, out);
  bhs(p.k_cache_stride, k_cache);
  bhs(p.v_cache_stride, v_cache);
  if (k_new.has_value()) {
    p.k_new = k_new->data_ptr();
    p.v_new = v_new->data_ptr();
    bhs(p.k_new_stride, *k_new);
    bhs(p.v_new_stride, *v_new);
  }
  p.cache_seqlens = lens.data_ptr<int32_t>();
  if (block_table.has_value()) {
    p.block_table = block_table->data_ptr<int32_t>();
    p.block_table_stride = block_table->stride(0);
  }
  p.page_size = page_size;
  p.scale = scale;
  // Windows wider than any sequence can be are unbounded (and then fit the
  // kernels' 32-bit key positions): left past every key of the cache, right
  // past the last new token.
  p.window_left = window_left >= capacity ? -1 : window_left;
  p.window_right = causal ? 0 : window_right >= q_len ? -1 : window_right;
  p.num_splits = num_splits;
  p.softcap = static_cast<float>(softcap);
  std::tie(p.alibi_slopes, p.alibi_batch_stride) = alibi_pointer(alibi_slopes);
  backend::run_kvcache(q, p, capacity);
  return {out, lse};
}

TORCH_LIBRARY_IMPL(flash_ext, CPU, m) { m.impl("kvcache_attention", &kvcache_attention); }

TORCH_LIBRARY_IMPL(flash_ext, CUDA, m) { m.impl("kvcache_attention", &kvcache_attention); }

}  // namespace flash_ext
