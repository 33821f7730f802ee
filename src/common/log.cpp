// spdlog behind the sparsecl::log facade (see include/sparsecl/common/log.h for why). Messages go to
// stderr so that stdout stays clean for machine-readable output (JSON lines, ids).
#include "sparsecl/common/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace sparsecl::log {

namespace {
spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto l = spdlog::stderr_color_mt("sparsecl");
    l->set_pattern("[%H:%M:%S] [%^%l%$] %v");
    spdlog::set_default_logger(l);
    return l;
  }();
  return *instance;
}

spdlog::level::level_enum to_spdlog(Level level) {
  switch (level) {
    case Level::debug: return spdlog::level::debug;
    case Level::info: return spdlog::level::info;
    case Level::warn: return spdlog::level::warn;
    default: return spdlog::level::err;
  }
}
}  // namespace

void write(Level level, const std::string& message) { logger().log(to_spdlog(level), "{}", message); }
void set_level(Level level) { logger().set_level(to_spdlog(level)); }
bool enabled(Level level) { return logger().should_log(to_spdlog(level)); }

}  // namespace sparsecl::log
