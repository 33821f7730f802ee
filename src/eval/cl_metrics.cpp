// ACC / BWT / FWT / forgetting from the (T+1) x T score matrix, and the over-seeds spread
// (definitions and the choice of rows for forgetting: include/sparsecl/eval/cl_metrics.h).
#include "sparsecl/eval/cl_metrics.h"

#include <cmath>
#include <limits>

#include "sparsecl/common/error.h"

namespace sparsecl::eval {

namespace {

using json = nlohmann::json;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

}  // namespace

double finite_mean(const std::vector<double>& values) {
  double sum = 0;
  int64_t n = 0;
  for (double v : values)
    if (std::isfinite(v)) sum += v, ++n;
  return n == 0 ? kNaN : sum / static_cast<double>(n);
}

json number_or_null(double value) { return std::isfinite(value) ? json(value) : json(nullptr); }

json cl_metrics(const std::vector<std::vector<double>>& R, const std::vector<std::string>& tasks) {
  const size_t T = tasks.size();
  if (T == 0) throw Error("cl_metrics: no tasks");
  if (R.size() != T + 1)
    throw Error("cl_metrics: R has " + std::to_string(R.size()) + " rows, expected T+1 = " + std::to_string(T + 1) +
                " (row 0 = base, one row per stage) for " + std::to_string(T) + " tasks");
  for (size_t i = 0; i < R.size(); ++i)
    if (R[i].size() != T)
      throw Error("cl_metrics: R row " + std::to_string(i) + " has " + std::to_string(R[i].size()) +
                  " entries, expected " + std::to_string(T) + " (one per task)");

  // 0-based here: task j (0..T-1) is trained at stage j+1, i.e. R row j+1 is right after learning it.
  std::vector<double> final_scores, backward, forward;
  for (size_t j = 0; j < T; ++j) final_scores.push_back(R[T][j]);
  for (size_t j = 0; j + 1 < T; ++j) backward.push_back(R[T][j] - R[j + 1][j]);
  for (size_t j = 1; j < T; ++j) forward.push_back(R[j][j] - R[0][j]);  // row j = after stage j, before task j

  json forgetting = json::object();
  std::vector<double> f_values;
  for (size_t j = 0; j + 1 < T; ++j) {
    double best = kNaN;
    for (size_t l = j + 1; l < T; ++l)  // rows after task j was learned, before the last stage
      if (std::isfinite(R[l][j]) && (!std::isfinite(best) || R[l][j] > best)) best = R[l][j];
    const double f = best - R[T][j];  // NaN when either side is missing
    forgetting[tasks[j]] = number_or_null(f);
    f_values.push_back(f);
  }

  return {{"ACC", number_or_null(finite_mean(final_scores))},
          {"BWT", number_or_null(finite_mean(backward))},
          {"FWT", number_or_null(finite_mean(forward))},
          {"forgetting", forgetting},
          {"F", number_or_null(finite_mean(f_values))},
          {"tasks", tasks},
          {"T", T}};
}

json spread(const std::vector<double>& values) {
  json listed = json::array();
  std::vector<double> finite;
  for (double v : values) {
    listed.push_back(number_or_null(v));
    if (std::isfinite(v)) finite.push_back(v);
  }
  const auto n = static_cast<int64_t>(finite.size());
  if (n == 0) return {{"mean", nullptr}, {"std", nullptr}, {"n", 0}, {"values", listed}};
  double mean = 0;
  for (double v : finite) mean += v;
  mean /= static_cast<double>(n);
  double ss = 0;
  for (double v : finite) ss += (v - mean) * (v - mean);
  const double sd = n > 1 ? std::sqrt(ss / static_cast<double>(n - 1)) : 0.0;
  return {{"mean", mean}, {"std", sd}, {"n", n}, {"values", listed}};
}

std::vector<std::vector<double>> matrix_from_json(const json& R, const std::string& what) {
  if (!R.is_array()) throw Error(what + ": expected an array of rows");
  std::vector<std::vector<double>> out;
  for (size_t i = 0; i < R.size(); ++i) {
    if (!R[i].is_array()) throw Error(what + ": row " + std::to_string(i) + " is not an array");
    std::vector<double> row;
    for (size_t j = 0; j < R[i].size(); ++j) {
      const json& v = R[i][j];
      if (v.is_null()) row.push_back(kNaN);
      else if (v.is_number()) row.push_back(v.get<double>());
      else throw Error(what + ": entry [" + std::to_string(i) + "][" + std::to_string(j) + "] is not a number or null");
    }
    out.push_back(std::move(row));
  }
  return out;
}

}  // namespace sparsecl::eval
