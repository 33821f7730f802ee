// c10d process groups for data parallelism (dist.h): the launcher's environment, the TCPStore
// rendezvous, a Gloo or NCCL backend, the few collectives sparsecl needs, and the bucketed gradient
// reducer that overlaps all-reduces with the backward pass.
//
// This is the only translation unit that sees c10d's headers (they pull in Gloo's and NCCL's), so it is
// compiled in its own library with USE_C10D_GLOO / USE_C10D_NCCL defined as libtorch was built.
#include "sparsecl/dist/dist.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdlib>
#include <mutex>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"

namespace sparsecl::dist {

namespace {

struct World {
  Launch launch;
  c10::intrusive_ptr<c10d::Backend> backend;  // null in a world of one
  at::Device device = at::kCPU;               // where the backend's tensors must live
};

World& world() {
  static World w;
  return w;
}

c10d::Backend& backend() {
  if (!world().backend) throw Error("dist: no process group (internal: collective outside a multi-process job)");
  return *world().backend;
}

// The integer value of environment variable `name`, or `fallback` when unset. Set but not an integer
// in [min, max]: an Error naming it.
int env_int(const char* name, int fallback, int min_value, int max_value) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x < min_value || x > max_value)
    throw Error(std::string("environment variable ") + name + "='" + v + "' is not an integer in [" +
                std::to_string(min_value) + ", " + std::to_string(max_value) + "]");
  return static_cast<int>(x);
}

std::string env_str(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// Moves `t` to the backend's device as a contiguous tensor (a no-op when it already is one).
at::Tensor on_backend(const at::Tensor& t) { return t.to(world().device).contiguous(); }

// Runs the collective `launch(tensors)` on `t` in place, through a contiguous copy on the backend's
// device when `t` is not one already, and waits for it.
template <typename Launch>
void in_place(at::Tensor& t, Launch launch) {
  if (!active()) return;
  at::Tensor work = on_backend(t);
  std::vector<at::Tensor> v{work};
  launch(v)->wait();
  if (!work.is_same(t)) t.copy_(work);
}

void all_reduce(at::Tensor& t, c10d::ReduceOp op) {
  in_place(t, [&](std::vector<at::Tensor>& v) {
    c10d::AllreduceOptions opts;
    opts.reduceOp = op;
    return backend().allreduce(v, opts);
  });
}

}  // namespace

// ---------------------------------------------------------------------------------------------------

Launch Launch::from_environment() {
  Launch l;
  if (!env_str("WORLD_SIZE").empty()) {  // torchrun (or any launcher using PyTorch's env:// convention)
    l.launcher = "torchrun";
    l.world_size = env_int("WORLD_SIZE", 1, 1, 1 << 20);
    l.rank = env_int("RANK", -1, 0, l.world_size - 1);
    if (l.rank < 0) throw Error("environment variable WORLD_SIZE is set but RANK is not");
    l.local_rank = env_int("LOCAL_RANK", 0, 0, 1 << 16);
    l.local_world_size = env_int("LOCAL_WORLD_SIZE", 1, 1, 1 << 16);
    l.agent_store = env_str("TORCHELASTIC_USE_AGENT_STORE") == "True";
    l.restart_count = env_int("TORCHELASTIC_RESTART_COUNT", 0, 0, 1 << 20);
  } else if (!env_str("SLURM_NTASKS").empty() && !env_str("SLURM_PROCID").empty()) {
    l.launcher = "slurm";
    l.world_size = env_int("SLURM_NTASKS", 1, 1, 1 << 20);
    l.rank = env_int("SLURM_PROCID", 0, 0, l.world_size - 1);
    l.local_rank = env_int("SLURM_LOCALID", 0, 0, 1 << 16);
    l.local_world_size = env_int("SLURM_NTASKS_PER_NODE", 1, 1, 1 << 16);
  }
  if (l.world_size > 1) {
    l.master_addr = env_str("MASTER_ADDR");
    // Slurm: the node srun was started from hosts rank 0 in the usual one-task-first layout.
    if (l.master_addr.empty() && l.launcher == "slurm") l.master_addr = env_str("SLURM_LAUNCH_NODE_IPADDR");
    if (l.master_addr.empty())
      throw Error("a " + std::to_string(l.world_size) + "-process " + l.launcher +
                  " job needs MASTER_ADDR (the host of rank 0) in the environment");
    l.master_port = env_int("MASTER_PORT", 29500, 1, 65535);
  }
  return l;
}

void init(const Launch& launch, at::Device device, double timeout_s) {
  World& w = world();
  if (w.backend) return;
  w.launch = launch;
  if (launch.world_size <= 1) return;
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));

  c10d::TCPStoreOptions store_opts;
  store_opts.port = static_cast<uint16_t>(launch.master_port);
  store_opts.isServer = !launch.agent_store && launch.rank == 0;
  store_opts.numWorkers = static_cast<size_t>(launch.world_size);
  store_opts.waitWorkers = false;
  store_opts.timeout = timeout;
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(launch.master_addr, store_opts);
  // torchrun's agent store is shared by every restart attempt; PyTorch prefixes its keys per attempt.
  if (launch.agent_store)
    store = c10::make_intrusive<c10d::PrefixStore>("/worker/attempt_" + std::to_string(launch.restart_count), store);
  store = c10::make_intrusive<c10d::PrefixStore>("sparsecl", store);

  if (device.is_cuda()) {
#ifdef USE_C10D_NCCL
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    w.backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, launch.rank, launch.world_size, opts);
    w.device = device;
#else
    throw Error("this sparsecl was built without NCCL: multi-process CUDA jobs are not available");
#endif
  } else {
#ifdef USE_C10D_GLOO
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    const std::string iface = env_str("GLOO_SOCKET_IFNAME");
    opts->devices.push_back(iface.empty() ? c10d::ProcessGroupGloo::createDefaultDevice()
                                          : c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    w.backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, launch.rank, launch.world_size, opts);
    w.device = at::kCPU;
#else
    throw Error("this sparsecl was built without Gloo (no gloo headers at configure time): multi-process CPU jobs "
                "are not available");
#endif
  }
  log::info("dist: rank ", launch.rank, " of ", launch.world_size, " (", launch.launcher, ", local rank ",
            launch.local_rank, ", ", device.is_cuda() ? "NCCL" : "Gloo", " via ", launch.master_addr, ":",
            launch.master_port, ")");
}

bool active() { return static_cast<bool>(world().backend); }
int rank() { return world().launch.rank; }
int world_size() { return world().backend ? world().launch.world_size : 1; }
int local_rank() { return world().launch.local_rank; }
int local_world_size() { return world().launch.local_world_size; }
bool is_main() { return rank() == 0; }

at::Device local_device(at::Device requested) {
  if (requested.is_cuda() && !requested.has_index() && world().launch.world_size > 1)
    return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(world().launch.local_rank));
  return requested;
}

void all_reduce_sum(at::Tensor& t) { all_reduce(t, c10d::ReduceOp::SUM); }
void all_reduce_max(at::Tensor& t) { all_reduce(t, c10d::ReduceOp::MAX); }

void all_reduce_sum(std::vector<at::Tensor>& ts) {
  for (auto& t : ts) all_reduce_sum(t);
}

void broadcast(at::Tensor& t, int root) {
  in_place(t, [&](std::vector<at::Tensor>& v) {
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    return backend().broadcast(v, opts);
  });
}

void barrier() {
  // A one-element all-reduce rather than Backend::barrier, which NCCL implements by guessing a device.
  at::Tensor t = at::zeros({1}, at::kLong);
  all_reduce_sum(t);
}

double sum(double value) {
  if (!active()) return value;
  at::Tensor t = at::full({1}, value, at::kDouble);
  all_reduce_sum(t);
  return t.item<double>();
}

int64_t sum(int64_t value) {
  if (!active()) return value;
  at::Tensor t = at::full({1}, value, at::kLong);
  all_reduce_sum(t);
  return t.item<int64_t>();
}

bool main_says(bool value) {
  if (!active()) return value;
  at::Tensor t = at::full({1}, value ? 1 : 0, at::kLong);
  broadcast(t, 0);
  return t.item<int64_t>() != 0;
}

at::Tensor all_gather(const at::Tensor& t) {
  if (!active()) return t.unsqueeze(0);
  const at::Tensor input = on_backend(t);
  std::vector<at::Tensor> slots;
  for (int r = 0; r < world_size(); ++r) slots.push_back(at::empty_like(input));
  std::vector<std::vector<at::Tensor>> outputs{slots};
  std::vector<at::Tensor> inputs{input};
  backend().allgather(outputs, inputs)->wait();
  return at::stack(outputs[0]).to(t.device());  // [world, *t.shape]
}

void check_all(bool ok, const std::string& message) {
  if (!active()) {
    if (!ok) throw Error(message);
    return;
  }
  const int64_t failed = sum(static_cast<int64_t>(ok ? 0 : 1));
  if (!ok) throw Error(message);
  if (failed > 0) throw Error("dist: " + std::to_string(failed) + " other rank(s) failed (see their messages)");
}

// ---- GradientReducer ------------------------------------------------------------------------------

struct GradientReducer::State {
  struct Bucket {
    std::vector<size_t> members;  // indices into params, in the order of the flat buffer
    int64_t pending = 0;          // members whose gradient the armed backward has not produced yet
    at::Tensor flat;              // [sum numel] fp32: the gradients being reduced
    c10::intrusive_ptr<c10d::Work> work;
  };
  std::vector<at::Tensor*> params;
  std::vector<Bucket> buckets;
  std::vector<size_t> bucket_of;  // per param
  std::vector<bool> ready;        // per param, in the armed backward
  size_t next_launch = 0;         // buckets launch strictly in order
  bool armed = false;
  std::mutex mutex;               // hooks may run on autograd's device threads

  void launch(size_t b) {
    Bucket& bucket = buckets[b];
    std::vector<at::Tensor> flats;
    for (size_t i : bucket.members) {
      const at::Tensor& p = *params[i];
      // On the backend's device: under pipeline placement the gradients sit on several GPUs.
      flats.push_back((p.grad().defined() ? p.grad().reshape({-1}) : at::zeros({p.numel()}, p.options())).to(world().device));
    }
    bucket.flat = on_backend(at::cat(flats));
    std::vector<at::Tensor> v{bucket.flat};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    bucket.work = backend().allreduce(v, opts);
  }

  void on_ready(size_t i) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!armed) return;
    if (ready[i])
      throw Error("dist: the gradient of trainable tensor " + std::to_string(i) +
                  " was accumulated twice in one backward pass after its bucket was sent");
    ready[i] = true;
    --buckets[bucket_of[i]].pending;
    while (next_launch < buckets.size() && buckets[next_launch].pending == 0) launch(next_launch++);
  }
};

namespace {
class ReadyHook : public torch::autograd::PostAccumulateGradHook {
 public:
  ReadyHook(GradientReducer::State* state, size_t index) : state_(state), index_(index) {}
  void operator()(const torch::autograd::Variable& /*param*/) override { state_->on_ready(index_); }

 private:
  GradientReducer::State* state_;
  size_t index_;
};
}  // namespace

GradientReducer::GradientReducer(std::vector<at::Tensor*> params, int64_t bucket_bytes)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.params = std::move(params);
  s.bucket_of.assign(s.params.size(), 0);
  s.ready.assign(s.params.size(), false);
  if (!active()) return;
  // Reverse order: backward produces the last layers' gradients first.
  int64_t bytes = 0;
  for (size_t k = s.params.size(); k-- > 0;) {
    const at::Tensor& p = *s.params[k];
    const int64_t nbytes = p.numel() * static_cast<int64_t>(p.element_size());
    if (s.buckets.empty() || (bytes + nbytes > bucket_bytes && !s.buckets.back().members.empty())) {
      s.buckets.emplace_back();
      bytes = 0;
    }
    s.buckets.back().members.push_back(k);
    s.bucket_of[k] = s.buckets.size() - 1;
    bytes += nbytes;
  }
  for (size_t k = 0; k < s.params.size(); ++k)
    torch::autograd::impl::set_post_acc_grad_hooks(*s.params[k], std::make_unique<ReadyHook>(&s, k));
}

GradientReducer::~GradientReducer() {
  if (!active()) return;
  for (at::Tensor* p : state_->params) torch::autograd::impl::set_post_acc_grad_hooks(*p, nullptr);
}

int64_t GradientReducer::num_buckets() const { return static_cast<int64_t>(state_->buckets.size()); }

void GradientReducer::arm() {
  if (!active()) return;
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  s.armed = true;
  s.next_launch = 0;
  std::fill(s.ready.begin(), s.ready.end(), false);
  for (auto& b : s.buckets) {
    b.pending = static_cast<int64_t>(b.members.size());
    b.work.reset();
    b.flat = at::Tensor();
  }
}

int64_t GradientReducer::finish() {
  if (!active()) return 0;
  State& s = *state_;
  std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.armed) throw Error("dist: GradientReducer::finish() without arm()");
  const int64_t sent_during_backward = static_cast<int64_t>(s.next_launch);
  // Buckets the backward did not complete (no gradient on this rank): their zeros still take part.
  while (s.next_launch < s.buckets.size()) s.launch(s.next_launch++);
  at::NoGradGuard no_grad;
  for (auto& bucket : s.buckets) {
    bucket.work->wait();
    int64_t offset = 0;
    for (size_t i : bucket.members) {
      at::Tensor& p = *s.params[i];
      const at::Tensor summed = bucket.flat.narrow(0, offset, p.numel()).view(p.sizes()).to(p.device());
      if (p.grad().defined()) p.mutable_grad().copy_(summed);
      else p.mutable_grad() = summed.clone();
      offset += p.numel();
    }
    bucket.work.reset();
    bucket.flat = at::Tensor();
  }
  s.armed = false;
  return sent_during_backward;
}

}  // namespace sparsecl::dist
