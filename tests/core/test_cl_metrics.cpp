// eval::cl_metrics and eval::spread against a hand-computed 3-task example (docs/report.md): ACC, BWT,
// FWT, per-task forgetting over rows l = j..T-1 only (a base row or an earlier stage that beats the
// post-learning score must not count), NaN entries skipped and written as null, wrong shapes refused.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "sparsecl/common/error.h"
#include "sparsecl/eval/cl_metrics.h"

using namespace sparsecl;
using nlohmann::json;

namespace {

const std::vector<std::string> kTasks = {"code", "math", "medical"};
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Rows: base, after code, after math, after medical. The base already beats "after code" on code (0.95 > 0.8)
// and "after code" beats "after math" on math (0.95 > 0.9): neither may enter the forgetting max.
std::vector<std::vector<double>> example_R() {
  return {{0.95, 0.30, 0.40},
          {0.80, 0.95, 0.38},
          {0.60, 0.90, 0.45},
          {0.50, 0.70, 0.85}};
}

}  // namespace

TEST(ClMetrics, HandComputedThreeTasks) {
  const json m = eval::cl_metrics(example_R(), kTasks);
  // ACC = (0.50 + 0.70 + 0.85) / 3
  EXPECT_NEAR(m["ACC"].get<double>(), 2.05 / 3, 1e-12);
  // BWT = ((0.50 - 0.80) + (0.70 - 0.90)) / 2 = -0.25   (R[j][j]: code after stage 1, math after stage 2)
  EXPECT_NEAR(m["BWT"].get<double>(), -0.25, 1e-12);
  // FWT = ((R[1][math] - R[0][math]) + (R[2][medical] - R[0][medical])) / 2 = (0.65 + 0.05) / 2 = 0.35
  EXPECT_NEAR(m["FWT"].get<double>(), 0.35, 1e-12);
  // f_code = max(R[1][code], R[2][code]) - R[3][code] = 0.80 - 0.50 = 0.30 (not 0.95 - 0.50 from the base row)
  // f_math = R[2][math] - R[3][math] = 0.90 - 0.70 = 0.20 (not 0.95 - 0.70 from the row before math was learned)
  EXPECT_NEAR(m["forgetting"]["code"].get<double>(), 0.30, 1e-12);
  EXPECT_NEAR(m["forgetting"]["math"].get<double>(), 0.20, 1e-12);
  EXPECT_FALSE(m["forgetting"].contains("medical"));  // the last task cannot be forgotten yet
  EXPECT_NEAR(m["F"].get<double>(), 0.25, 1e-12);
  EXPECT_EQ(m["T"].get<int>(), 3);
}

TEST(ClMetrics, NegativeForgettingWhenTheLastStageImproves) {
  auto R = example_R();
  R[3][0] = 0.9;  // code improved again after the last stage
  const json m = eval::cl_metrics(R, kTasks);
  EXPECT_NEAR(m["forgetting"]["code"].get<double>(), 0.80 - 0.90, 1e-12);
  EXPECT_NEAR(m["BWT"].get<double>(), ((0.9 - 0.8) + (0.7 - 0.9)) / 2, 1e-12);
}

TEST(ClMetrics, NaNEntriesAreSkippedAndWrittenAsNull) {
  auto R = example_R();
  R[3][1] = kNaN;  // math not scored after the last stage
  const json m = eval::cl_metrics(R, kTasks);
  EXPECT_NEAR(m["ACC"].get<double>(), (0.50 + 0.85) / 2, 1e-12);
  EXPECT_NEAR(m["BWT"].get<double>(), -0.30, 1e-12);
  EXPECT_TRUE(m["forgetting"]["math"].is_null());
  EXPECT_NEAR(m["F"].get<double>(), 0.30, 1e-12);
  EXPECT_EQ(m.dump().find("NaN"), std::string::npos);

  // A NaN inside the forgetting max is skipped, not propagated.
  R = example_R();
  R[2][0] = kNaN;
  EXPECT_NEAR(eval::cl_metrics(R, kTasks)["forgetting"]["code"].get<double>(), 0.30, 1e-12);

  // Nothing scored at all: every metric is null.
  std::vector<std::vector<double>> empty(4, std::vector<double>(3, kNaN));
  const json e = eval::cl_metrics(empty, kTasks);
  for (const char* k : {"ACC", "BWT", "FWT", "F"}) EXPECT_TRUE(e[k].is_null()) << k;
}

TEST(ClMetrics, SingleTask) {
  const json m = eval::cl_metrics({{0.2}, {0.7}}, {"code"});
  EXPECT_NEAR(m["ACC"].get<double>(), 0.7, 1e-12);
  EXPECT_TRUE(m["BWT"].is_null());
  EXPECT_TRUE(m["FWT"].is_null());
  EXPECT_TRUE(m["F"].is_null());
  EXPECT_TRUE(m["forgetting"].empty());
}

TEST(ClMetrics, WrongShapesAreRefused) {
  auto R = example_R();
  R.pop_back();
  EXPECT_THROW(eval::cl_metrics(R, kTasks), Error);  // T rows instead of T+1
  R = example_R();
  R[2].pop_back();
  try {
    eval::cl_metrics(R, kTasks);
    FAIL() << "a ragged R was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("row 2"), std::string::npos) << e.what();
  }
  EXPECT_THROW(eval::cl_metrics({}, {}), Error);
  EXPECT_THROW(eval::matrix_from_json(json::parse(R"([[1, "x"]])"), "R"), Error);
  const auto parsed = eval::matrix_from_json(json::parse("[[1, null], [0.5, 2]]"), "R");
  EXPECT_TRUE(std::isnan(parsed[0][1]));
  EXPECT_EQ(parsed[1][1], 2.0);
}

TEST(ClMetrics, Spread) {
  const json s = eval::spread({0.5, 0.7, 0.9});
  EXPECT_NEAR(s["mean"].get<double>(), 0.7, 1e-12);
  EXPECT_NEAR(s["std"].get<double>(), 0.2, 1e-12);  // sample std: sqrt((0.04 + 0 + 0.04) / 2)
  EXPECT_EQ(s["n"].get<int>(), 3);
  EXPECT_EQ(s["values"].size(), 3u);

  const json one = eval::spread({0.4});
  EXPECT_NEAR(one["mean"].get<double>(), 0.4, 1e-12);
  EXPECT_EQ(one["std"].get<double>(), 0.0);

  const json with_nan = eval::spread({1.0, kNaN, 3.0});
  EXPECT_NEAR(with_nan["mean"].get<double>(), 2.0, 1e-12);
  EXPECT_NEAR(with_nan["std"].get<double>(), std::sqrt(2.0), 1e-12);
  EXPECT_EQ(with_nan["n"].get<int>(), 2);
  EXPECT_TRUE(with_nan["values"][1].is_null());

  const json none = eval::spread({});
  EXPECT_TRUE(none["mean"].is_null());
  EXPECT_EQ(none["n"].get<int>(), 0);
}
