// A small progress bar on stderr for long loops (probe, trainer, eval): done/total, items/s or
// tokens/s, ETA, and a free-text postfix (the trainer's loss and lr). Header-only and libtorch-free
// so that any translation unit can use it.
//
// On a terminal the bar redraws in place (at most ~5 times a second); when stderr is not a terminal
// (CI logs, files) it prints a plain line every 10% instead, so logs stay short. Disabled bars print
// nothing. Not thread-safe: one bar per loop, updated from the loop's thread.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>

namespace sparsecl {

class Progress {
 public:
  // `label` prefixes the line; `total` is the number of items (samples, steps); `unit` names them.
  Progress(std::string label, int64_t total, bool enabled = true, std::string unit = "samples")
      : label_(std::move(label)), unit_(std::move(unit)), total_(std::max<int64_t>(total, 0)), enabled_(enabled),
        tty_(isatty(fileno(stderr)) != 0), start_(Clock::now()), last_draw_(start_) {}
  ~Progress() { finish(); }
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // Adds `items` done and `tokens` processed (0 when tokens are not counted).
  void update(int64_t items, int64_t tokens = 0) {
    done_ += items;
    tokens_ += tokens;
    if (!enabled_) return;
    const auto now = Clock::now();
    if (tty_) {
      if (now - last_draw_ >= std::chrono::milliseconds(200) || done_ >= total_) draw(now, false);
    } else if (total_ > 0) {
      const int64_t decile = done_ * 10 / total_;
      if (decile > last_decile_) {
        last_decile_ = decile;
        draw(now, false);
      }
    }
  }

  // Free text shown after the ETA from the next draw on (e.g. "loss 2.3141 lr 1.85e-04"); "" = none.
  void set_postfix(std::string text) { postfix_ = std::move(text); }
  const std::string& postfix() const { return postfix_; }

  // Draws the final state once (called by the destructor too).
  void finish() {
    if (!enabled_ || finished_) return;
    finished_ = true;
    draw(Clock::now(), true);
  }

  double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  int64_t tokens() const { return tokens_; }

 private:
  using Clock = std::chrono::steady_clock;

  static std::string hms(double s) {
    if (!(s >= 0) || s > 1e7) return "--:--";
    const int64_t t = static_cast<int64_t>(s + 0.5);
    char buf[32];
    if (t >= 3600)
      std::snprintf(buf, sizeof buf, "%lld:%02lld:%02lld", static_cast<long long>(t / 3600),
                    static_cast<long long>(t / 60 % 60), static_cast<long long>(t % 60));
    else
      std::snprintf(buf, sizeof buf, "%02lld:%02lld", static_cast<long long>(t / 60), static_cast<long long>(t % 60));
    return buf;
  }

  void draw(Clock::time_point now, bool final) {
    last_draw_ = now;
    const double el = std::chrono::duration<double>(now - start_).count();
    const double frac = total_ > 0 ? std::min(1.0, static_cast<double>(done_) / static_cast<double>(total_)) : 0.0;
    constexpr int kWidth = 24;
    std::string bar(kWidth, ' ');
    for (int i = 0; i < static_cast<int>(frac * kWidth); ++i) bar[i] = '#';
    char rate[64];
    if (tokens_ > 0)
      std::snprintf(rate, sizeof rate, "%.0f tok/s", el > 0 ? static_cast<double>(tokens_) / el : 0.0);
    else
      std::snprintf(rate, sizeof rate, "%.1f %s/s", el > 0 ? static_cast<double>(done_) / el : 0.0, unit_.c_str());
    const double eta = frac > 0 ? el * (1.0 - frac) / frac : -1.0;
    // On a terminal the postfix may shrink between redraws: clear to the end of the line.
    std::fprintf(stderr, "%s%s [%s] %lld/%lld %s  %s  %s %s%s%s%s%s", tty_ ? "\r" : "", label_.c_str(), bar.c_str(),
                 static_cast<long long>(done_), static_cast<long long>(total_), unit_.c_str(), rate,
                 final ? "elapsed" : "ETA", final ? hms(el).c_str() : hms(eta).c_str(), postfix_.empty() ? "" : "  ",
                 postfix_.c_str(), tty_ ? "\033[K" : "", tty_ && !final ? "" : "\n");
    std::fflush(stderr);
  }

  std::string label_, unit_, postfix_;
  int64_t total_ = 0, done_ = 0, tokens_ = 0, last_decile_ = 0;
  bool enabled_ = true, tty_ = false, finished_ = false;
  Clock::time_point start_, last_draw_;
};

}  // namespace sparsecl
