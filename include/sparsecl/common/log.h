// Logging for code that includes libtorch. libtorch ships its own {fmt} (12.x), which shadows the
// Debian {fmt} 9 that spdlog is built against, so spdlog's headers cannot be used in libtorch
// translation units. This thin facade takes already-built strings (pieces joined with operator<<)
// and forwards them to spdlog from src/common/log.cpp, which never sees libtorch's headers.
#pragma once

#include <sstream>
#include <string>

namespace sparsecl::log {

enum class Level { debug, info, warn, error };

void write(Level level, const std::string& message);
void set_level(Level level);
bool enabled(Level level);

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream s;
  (s << ... << args);
  return s.str();
}

template <typename... Args> void debug(const Args&... a) { if (enabled(Level::debug)) write(Level::debug, cat(a...)); }
template <typename... Args> void info(const Args&... a) { write(Level::info, cat(a...)); }
template <typename... Args> void warn(const Args&... a) { write(Level::warn, cat(a...)); }
template <typename... Args> void error(const Args&... a) { write(Level::error, cat(a...)); }

}  // namespace sparsecl::log
