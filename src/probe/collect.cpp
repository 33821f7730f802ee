// The probe's streaming pass: one domain's examples through the decoder in batches, statistics taken in
// the ActivationHook at HookPoint::MlpIntermediate on the model's device. Per batch, the host only
// builds index lists it already knows (which flat positions are real tokens, which tokens enter the
// reservoir): nothing is read back from the device until the pass ends.
//
// Data parallel (dist.h): batch j is rank j % world's. Every statistic is a sum or a count, or a row that
// exactly one batch writes (per-sequence sums, reservoir slots), so the all-reduce at the end restores
// the one-process values: counts, per-sequence sums and bitsets bit for bit, the fp64 sums of |h| up to
// the order of their additions.
#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <algorithm>
#include <random>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/common/progress.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/kernels/neuron_stats.h"
#include "sparsecl/kernels/topk.h"
#include "sparsecl/model/decoder.h"
#include "sparsecl/model/loss.h"
#include "sparsecl/probe/probe.h"

namespace sparsecl::probe {

namespace {

// Makes only the down_proj weights require grad for the duration of a gradient pass; restores every
// parameter's flag (and drops the .grad tensors it created) on destruction.
class DownProjGradScope {
 public:
  explicit DownProjGradScope(model::Decoder& decoder) : decoder_(decoder) {
    for (auto& [name, p] : decoder.named_parameters()) {
      saved_.push_back({p, p->requires_grad()});
      if (p->requires_grad()) p->set_requires_grad(false);
    }
    for (auto& layer : decoder.layers()) layer.down_proj.weight.set_requires_grad(true);
  }
  ~DownProjGradScope() {
    for (auto& layer : decoder_.layers()) {
      layer.down_proj.weight.mutable_grad().reset();
      layer.down_proj.weight.set_requires_grad(false);
    }
    for (auto& [p, flag] : saved_) p->set_requires_grad(flag);
  }
  DownProjGradScope(const DownProjGradScope&) = delete;
  DownProjGradScope& operator=(const DownProjGradScope&) = delete;

 private:
  model::Decoder& decoder_;
  std::vector<std::pair<at::Tensor*, bool>> saved_;
};

at::Tensor index_tensor(const std::vector<int64_t>& v, at::Device device) {
  return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(device);
}

}  // namespace

at::Tensor DomainStats::mean_abs(int64_t layer) const {
  return (layers.at(layer).sum_abs / static_cast<double>(std::max<int64_t>(num_tokens, 1))).to(at::kFloat);
}

at::Tensor DomainStats::freq(int64_t layer) const {
  return (layers.at(layer).topk_count.to(at::kDouble) / static_cast<double>(std::max<int64_t>(num_tokens, 1)))
      .to(at::kFloat);
}

at::Tensor DomainStats::score(int64_t layer, Score s) const { return s == Score::MeanAbs ? mean_abs(layer) : freq(layer); }

at::Tensor DomainStats::grad_mass(int64_t layer) const {
  const at::Tensor& g = layers.at(layer).grad;  // [H, I]
  if (!g.defined()) return {};
  return g.norm(2, {0}).to(at::kFloat);  // [I]: norm of column j = neuron j's output weights
}

DomainStats collect_domain_stats(model::Decoder& decoder, const std::vector<data::Example>& examples,
                                 const std::string& name, const Settings& settings, int64_t pad_id,
                                 uint64_t seed) {
  const auto& cfg = decoder.config();
  const int64_t L = cfg.num_hidden_layers, I = cfg.intermediate_size, H = cfg.hidden_size;
  const int64_t n = static_cast<int64_t>(examples.size());
  if (n == 0) throw Error("probe: domain '" + name + "' has no examples");
  const int64_t k = top_count(settings.top_ratio, I);
  const int64_t W = (I + 63) / 64;
  const at::Device dev = decoder.device();
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(dev);

  int64_t total_tokens = 0;
  std::vector<float> seq_tokens(n);
  for (int64_t i = 0; i < n; ++i) {
    seq_tokens[i] = static_cast<float>(examples[i].ids.size());
    total_tokens += static_cast<int64_t>(examples[i].ids.size());
  }
  const int64_t R = std::min(settings.token_pairs > 0 ? settings.token_reservoir : 0, total_tokens);

  DomainStats st;
  st.name = name;
  st.intermediate_size = I;
  st.k = k;
  st.num_sequences = n;
  st.seq_tokens = at::tensor(seq_tokens, at::TensorOptions().dtype(at::kFloat)).to(dev);  // [n]
  st.layers.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    LayerStats& ls = st.layers[l];
    const auto f32 = at::TensorOptions().dtype(at::kFloat).device(decoder.layer_device(l));  // pipeline placement
    ls.sum_abs = at::zeros({I}, f32.dtype(at::kDouble));  // [I]
    ls.topk_count = at::zeros({I}, f32.dtype(at::kLong));  // [I]
    ls.seq_sum = at::zeros({n, I}, f32);                   // [n, I]
    ls.reservoir = at::zeros({R, W}, f32.dtype(at::kLong)); // [R, W]
    if (settings.gradient_overlap) ls.grad = at::zeros({H, I}, f32);  // [H, I]
  }
  st.reservoir_seq.assign(R, -1);

  std::optional<DownProjGradScope> grad_scope;
  if (settings.gradient_overlap) grad_scope.emplace(decoder);
  at::Tensor loss_sum = at::zeros({}, f32.dtype(at::kDouble));  // scalar, on the device

  // The token reservoir (algorithm R over the real tokens in stream order), decided up front on the
  // host: which (sequence, position) holds each slot at the end. Each batch then fills only the slots it
  // holds at the end, so no slot is written twice and the result does not depend on who runs a batch.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> reservoir_of_seq(n);  // per sequence: (slot, position)
  {
    std::mt19937_64 rng(derive_seed(seed, "reservoir"));
    std::vector<std::pair<int64_t, int64_t>> holder(R, {-1, -1});  // per slot: (sequence, position)
    int64_t seen = 0;  // real tokens streamed so far
    for (int64_t i = 0; i < n && R > 0; ++i) {
      for (int64_t t = 0; t < static_cast<int64_t>(examples[i].ids.size()); ++t, ++seen) {
        const int64_t slot =
            seen < R ? seen : static_cast<int64_t>(data::uniform_below(rng, static_cast<uint64_t>(seen) + 1));
        if (slot < R) holder[slot] = {i, t};
      }
    }
    for (int64_t slot = 0; slot < R; ++slot) {
      st.reservoir_seq[slot] = holder[slot].first;
      reservoir_of_seq[holder[slot].first].push_back({slot, holder[slot].second});
    }
  }

  const int64_t bs = std::max<int64_t>(settings.batch_size, 1);
  int64_t own_sequences = 0;  // this rank's share, for the progress bar
  for (int64_t start = 0; start < n; start += bs)
    if (dist::owns(start / bs)) own_sequences += std::min(n, start + bs) - start;
  Progress bar("probe " + name, own_sequences, settings.progress && dist::is_main());

  for (int64_t start = 0; start < n; start += bs) {
    if (!dist::owns(start / bs)) continue;
    const int64_t end = std::min(n, start + bs);
    data::Batch batch = data::make_batch(examples, static_cast<size_t>(start), static_cast<size_t>(end), pad_id);
    const int64_t B = batch.input_ids.size(0), T = batch.input_ids.size(1);

    // Host-side index lists: flat positions (b*T + t) of real tokens and the global sequence of each;
    // the reservoir slots this batch's tokens hold.
    std::vector<int64_t> real, real_seq;
    real.reserve(batch.num_tokens);
    real_seq.reserve(batch.num_tokens);
    std::vector<int64_t> res_pos, res_slot;
    for (int64_t r = 0; r < B; ++r) {
      for (int64_t t = 0; t < batch.lengths[r]; ++t) {
        real.push_back(r * T + t);
        real_seq.push_back(start + r);
      }
      for (const auto& [slot, t] : reservoir_of_seq[start + r]) {
        res_slot.push_back(slot);
        res_pos.push_back(r * T + t);
      }
    }
    const at::Tensor real_idx_input = index_tensor(real, dev);      // [N]
    const at::Tensor real_seq_idx_input = index_tensor(real_seq, dev);  // [N]
    const at::Tensor res_pos_idx = index_tensor(res_pos, dev);    // [S]
    const at::Tensor res_slot_idx = index_tensor(res_slot, dev);  // [S]

    model::ActivationHook hook = [&](model::HookPoint point, int64_t l, const at::Tensor& live) {
      if (point != model::HookPoint::MlpIntermediate) return;
      LayerStats& ls = st.layers[l];
      const at::Device ldev = live.device();                        // the layer's device
      const at::Tensor real_idx = real_idx_input.to(ldev), real_seq_idx = real_seq_idx_input.to(ldev);
      const at::Tensor flat = live.detach().reshape({B * T, I});  // [B*T, I]
      const bool all_real = batch.num_tokens == B * T;            // no padding: no copy
      const at::Tensor h = all_real ? flat : flat.index_select(0, real_idx);  // [N, I] real tokens only
      kernels::accumulate_neuron_stats(h, k, ls.sum_abs, ls.topk_count);
      if (settings.score == Score::MeanAbs) {
        // seq_sum[start + r] += sum over row r's real tokens of |h| (fp32), as reductions that never
        // materialise |h|: one for the batch when no row is padded, else one per row.
        const at::Tensor rows = live.detach().reshape({B, T, I});  // [B, T, I]
        if (all_real) {
          ls.seq_sum.narrow(0, start, B).add_(at::linalg_vector_norm(rows, 1, {1}, false, at::kFloat));  // [B, I]
        } else {
          for (int64_t r = 0; r < B; ++r)
            ls.seq_sum[start + r].add_(
                at::linalg_vector_norm(rows[r].narrow(0, 0, batch.lengths[r]), 1, {0}, false, at::kFloat));  // [I]
        }
      } else {
        const at::Tensor idx = kernels::topk_abs_indices(h, k).to(at::kLong);  // [N, k]
        const at::Tensor flat_idx = (real_seq_idx.unsqueeze(1) * I + idx).reshape({-1});  // [N*k]
        ls.seq_sum.view({-1}).index_add_(0, flat_idx, at::ones({flat_idx.size(0)}, f32.device(ldev)));
      }
      if (!res_pos.empty())
        ls.reservoir.index_copy_(0, res_slot_idx.to(ldev),
                                 kernels::topk_abs_bitset(flat.index_select(0, res_pos_idx.to(ldev)), k));
    };

    model::ForwardInput in;
    in.input_ids = batch.input_ids.to(dev);  // [B, T]
    // Right-padded rows: causal attention alone is exact for the real tokens (the only ones read), and
    // without a mask SDPA takes its fast kernels.
    model::ForwardOptions opt;
    opt.hook = &hook;
    if (!settings.gradient_overlap) {
      at::NoGradGuard no_grad;
      opt.logits = false;
      decoder.forward(in, opt);
    } else {
      opt.logits = false;  // the loss comes from the last hidden states a chunk at a time
      model::ForwardOutput out = decoder.forward(in, opt);
      if (batch.num_label_tokens > 0) {
        // Sum (not mean) over this batch's loss tokens; divided by all loss tokens at the end, so the
        // accumulated gradient is that of the mean loss over the whole domain.
        at::Tensor loss = model::chunked_causal_lm_loss(out.last_hidden, decoder.head_weight(), batch.labels) *
                          static_cast<double>(batch.num_label_tokens);
        out = {};
        loss.backward();
        loss_sum += loss.detach().to(loss_sum.device(), at::kDouble);
        st.loss_tokens += batch.num_label_tokens;
        for (int64_t l = 0; l < L; ++l) {
          at::Tensor& w = decoder.layers()[l].down_proj.weight;
          if (w.grad().defined()) st.layers[l].grad.add_(w.grad().to(at::kFloat));
          w.mutable_grad().reset();
        }
      }
    }
    st.num_tokens += batch.num_tokens;
    bar.update(B, batch.num_tokens);
  }
  bar.finish();
  // Data parallel: put the ranks' shares together (no-ops in one process).
  for (auto& ls : st.layers) {
    dist::all_reduce_sum(ls.sum_abs);
    dist::all_reduce_sum(ls.topk_count);
    dist::all_reduce_sum(ls.seq_sum);
    dist::all_reduce_sum(ls.reservoir);
    if (settings.gradient_overlap) dist::all_reduce_sum(ls.grad);
  }
  dist::all_reduce_sum(loss_sum);
  st.num_tokens = dist::sum(st.num_tokens);
  st.loss_tokens = dist::sum(st.loss_tokens);
  st.seconds = bar.seconds();
  if (settings.gradient_overlap && st.loss_tokens > 0) {
    for (auto& ls : st.layers) ls.grad.div_(static_cast<double>(st.loss_tokens));
    st.loss = loss_sum.item<double>() / static_cast<double>(st.loss_tokens);
  }
  if (settings.gradient_overlap && st.loss_tokens == 0)
    log::warn("probe ", name, ": no loss tokens (every response truncated away?): gradient statistics are zero");
  return st;
}

}  // namespace sparsecl::probe
