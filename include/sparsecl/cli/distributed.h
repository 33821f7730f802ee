// How the data-parallel subcommands (probe, finetune-*, eval, run) join a multi-process job
// (dist.h, docs/distributed.md), and how the others refuse one.
#pragma once

#include <string>

namespace sparsecl::cli {

// The subcommands that run data-parallel when started by torchrun / srun.
bool runs_data_parallel(const std::string& subcommand);

// Joins the job described by the launcher's environment (nothing to do in a world of one): on CUDA,
// makes cuda:LOCAL_RANK this process's current device (so "cuda" means this rank's GPU), creates the
// process group (NCCL on CUDA, Gloo on the CPU), and keeps ranks other than 0 to warnings and errors in
// the log. `device_name` is the command's resolved device ("cpu", "cuda", "cuda:N").
void join_job(const std::string& device_name);

// For main(): an Error when the environment describes a multi-process job and `subcommand` does not
// run data-parallel (it would otherwise run N times and write the same files N times).
void refuse_job_unless_data_parallel(const std::string& subcommand);

}  // namespace sparsecl::cli
