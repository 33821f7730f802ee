// Data parallelism over libtorch's own distributed engine (c10d): NCCL between GPUs, Gloo between CPU
// processes (docs/distributed.md).
//
// A job is launched the way clusters launch PyTorch, one process per GPU (or per CPU worker):
//   torchrun --nproc-per-node 8 --no-python sparsecl finetune-lora ...   (RANK, WORLD_SIZE, LOCAL_RANK,
//                                                                        MASTER_ADDR, MASTER_PORT)
//   srun --ntasks-per-node 8 sparsecl finetune-lora ...                  (SLURM_PROCID, SLURM_NTASKS,
//                                                                        SLURM_LOCALID; MASTER_ADDR)
// Without those variables the process is a world of one and every call here is a no-op, so the code
// paths are the same with and without a launcher.
//
// What is split and how it is put back together (one rule everywhere):
//   - work is dealt out round-robin by index (`owns(i)`: item i belongs to rank i % world): batches of
//     the probe and the evaluation, micro-batches of a training step;
//   - what comes back is reduced EXACTLY: sums and counts (never averages of averages), and per-item
//     results are summed into tensors where every other rank holds zeros (x + 0 = x, bit for bit);
//   - rank 0 alone writes files; every rank reads the same inputs.
// The process group is created once (init_from_environment, called by main) and lives until exit.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sparsecl::dist {

// Where this process sits in the job, from the launcher's environment variables.
struct Launch {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;            // index among this node's processes: the GPU it drives
  int local_world_size = 1;      // processes on this node (torchrun LOCAL_WORLD_SIZE, Slurm
                                 // SLURM_NTASKS_PER_NODE); 1 when the launcher does not say
  std::string master_addr;       // rendezvous host (the TCPStore server)
  int master_port = 29500;
  bool agent_store = false;      // torchrun's agent already serves the store: every rank is a client
  int restart_count = 0;         // torchrun restarts (store keys are prefixed per attempt, as PyTorch does)
  std::string launcher = "none"; // "torchrun" | "slurm" | "none"

  // torchrun variables take precedence over Slurm's. A variable that is set but malformed, a rank out
  // of range or a multi-process job without MASTER_ADDR is a sparsecl::Error naming the variable.
  static Launch from_environment();
};

// Creates the process group when the environment describes a job of more than one process: NCCL when
// `device` is CUDA (and the build has NCCL), Gloo otherwise. Idempotent; world of one: nothing to do.
// `timeout_s` bounds every collective (a dead peer fails the job instead of hanging it).
void init(const Launch& launch, at::Device device, double timeout_s = 1800);
bool active();         // a process group of world > 1 exists
int rank();            // 0 without a group
int world_size();      // 1 without a group
int local_rank();
int local_world_size();
bool is_main();        // rank 0: the one that writes files and logs progress
// The device this rank computes on: `requested` unchanged, except a bare "cuda" becomes
// cuda:<local_rank> in a multi-process job (one process per GPU).
at::Device local_device(at::Device requested);
// Whether item `index` of a round-robin split belongs to this rank.
inline bool owns(int64_t index) { return index % world_size() == rank(); }

// ---- collectives (no-ops in a world of one; tensors may live on any device) ----------------------
void all_reduce_sum(at::Tensor& t);               // in place
void all_reduce_sum(std::vector<at::Tensor>& ts); // in place, one collective per tensor, in order
void all_reduce_max(at::Tensor& t);               // in place
void broadcast(at::Tensor& t, int root = 0);      // in place
void barrier();
double sum(double value);
int64_t sum(int64_t value);
// Rank 0's `value` on every rank: decisions taken from the files on disk (what is done already) are
// rank 0's, so that all ranks take the same branch even if a file appears in between.
bool main_says(bool value);
// Every rank's `t` (same shape and dtype on all ranks), stacked: [world, *t.shape].
at::Tensor all_gather(const at::Tensor& t);
// Makes every rank fail together: if `ok` is false on any rank, all ranks throw (with this rank's
// message where it is the one that failed), so that no rank blocks forever in a later collective.
void check_all(bool ok, const std::string& message);

// ---- gradient synchronisation for data-parallel training ----------------------------------------
// Sums the gradients of `params` over the ranks in buckets of about `bucket_bytes`, each launched
// asynchronously as soon as the backward pass has accumulated every gradient in it (post-accumulate-
// grad hooks), so communication overlaps the rest of the backward pass. Buckets follow the reverse
// order of `params` (the order backward produces them) and are launched strictly in that order on
// every rank, as collectives must be.
//
// Usage per optimizer step: arm() before the backward of the step's LAST micro-batch (earlier
// micro-batches only accumulate locally, like DDP's no_sync), then finish() after it: it waits for
// every bucket, reduces the ones no gradient reached (a rank whose micro-batches had no loss tokens
// contributes zeros), and writes the sums back into .grad(). In a world of one, arm() and finish()
// do nothing.
class GradientReducer {
 public:
  GradientReducer(std::vector<at::Tensor*> params, int64_t bucket_bytes = 25 << 20);
  ~GradientReducer();
  GradientReducer(const GradientReducer&) = delete;
  GradientReducer& operator=(const GradientReducer&) = delete;

  void arm();
  // Returns how many buckets the backward pass itself had sent (the rest are sent here): the overlap.
  int64_t finish();
  int64_t num_buckets() const;

  struct State;  // the hooks point into it

 private:
  std::unique_ptr<State> state_;
};

}  // namespace sparsecl::dist
