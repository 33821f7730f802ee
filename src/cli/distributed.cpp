// Joining a torchrun / Slurm job from the CLI (include/sparsecl/cli/distributed.h).
#include "sparsecl/cli/distributed.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include "sparsecl/common/error.h"
#include "sparsecl/common/log.h"
#include "sparsecl/dist/dist.h"
#include "sparsecl/model/decoder.h"

namespace sparsecl::cli {

bool runs_data_parallel(const std::string& subcommand) {
  return subcommand == "probe" || subcommand == "eval" || subcommand == "run" || subcommand.rfind("finetune-", 0) == 0;
}

void join_job(const std::string& device_name) {
  const dist::Launch launch = dist::Launch::from_environment();
  if (launch.world_size <= 1) return;
  at::Device device = model::parse_device(device_name);
  if (device.is_cuda()) {
    // A bare "cuda" means this process's GPU (parse_device would name the current one, cuda:0).
    if (device_name == "cuda") device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(launch.local_rank));
    c10::impl::getDeviceGuardImpl(at::kCUDA)->setDevice(device);
  }
  dist::init(launch, device);
  if (launch.rank > 0 && !log::enabled(log::Level::debug)) log::set_level(log::Level::warn);
}

void refuse_job_unless_data_parallel(const std::string& subcommand) {
  const dist::Launch launch = dist::Launch::from_environment();
  if (launch.world_size > 1 && !runs_data_parallel(subcommand))
    throw Error("`sparsecl " + subcommand + "` does not run data-parallel; start it as one process (this environment " +
                "describes a " + std::to_string(launch.world_size) + "-process " + launch.launcher + " job)");
}

}  // namespace sparsecl::cli
