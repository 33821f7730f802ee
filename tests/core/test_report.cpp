// `sparsecl report` (include/sparsecl/report/report.h) on synthetic inputs written here: a sweep of two
// methods x two seeds (hand-computed ACC/BWT/F spreads), run and probe directories, the summary the
// driver writes, the tables in report.md carrying the numbers, missing pieces noted (never invented),
// figures written, bad inputs refused, and the CLI subcommand end to end.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/report/report.h"

namespace fs = std::filesystem;
using namespace sparsecl;
using nlohmann::json;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("sparsecl_report_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::create_directories(path);
  }
  ~TempDir() { [[maybe_unused]] int rc = std::system(("rm -rf '" + path.string() + "'").c_str()); }
};

const std::vector<std::string> kTasks = {"code", "math", "medical"};

// Rows 0..2 shared; the last row differs per (method, seed):
//   lora seed 0: ACC 0.68333, BWT -0.25, F 0.25    lora seed 1: ACC 0.75, BWT -0.15, F 0.15
//   full seed 0: ACC 0.56667, BWT -0.45, F 0.45    full seed 1: ACC 0.6,  BWT -0.40, F 0.40
json metrics(const std::string& method, int seed) {
  std::vector<double> last;
  if (method == "lora") last = seed == 0 ? std::vector<double>{0.5, 0.7, 0.85} : std::vector<double>{0.6, 0.8, 0.85};
  else last = seed == 0 ? std::vector<double>{0.3, 0.5, 0.9} : std::vector<double>{0.4, 0.5, 0.9};
  json R = json::array({json::array({0.2, 0.3, 0.4}), json::array({0.8, 0.35, 0.38}), json::array({0.6, 0.9, 0.45}), last});
  json m = {{"provenance", {{"config_hash", method + "hash" + std::to_string(seed)}, {"model", "models/tiny-model"}, {"seed", seed}}},
            {"method", method},
            {"seed", seed},
            {"model", "models/tiny-model"},
            {"tasks", kTasks},
            {"score_metric", {{"code", "neg_heldout_loss"}, {"math", "exact_match"}, {"medical", "acc"}}},
            {"R", R}};
  if (method == "lora") {
    m["general"] = {{"metric", "acc_norm"}, {"scores", {0.4, 0.38, 0.37, 0.35}}, {"retention", {1.0, 0.95, 0.925, 0.875}}};
    m["drift"] = json::array({{{"row", 1}, {"stage", "code"},
                               {"layers", json::array({{{"layer", 0}, {"cka", 1.0}, {"subspace_similarity", 1.0}, {"inside_share", nullptr}},
                                                       {{"layer", 1}, {"cka", seed == 0 ? 0.93 : 0.91}, {"subspace_similarity", 0.8},
                                                        {"inside_share", 0.6}}})}}});
    m["stages"] = json::array({{{"row", 1}, {"stage", "code"}, {"seconds", 12.5}, {"tokens_per_s", 250.0}, {"train_loss", 1.25}}});
    m["heldout_loss"] = json::array({json::array({2.0, 2.1, 2.2}), json::array({1.5, 2.0, 2.2}), json::array({1.6, 1.4, 2.1}),
                                     json::array({1.7, 1.5, 1.3})});
  }
  return m;
}

void write_json(const fs::path& file, const json& j) {
  fs::create_directories(file.parent_path());
  write_file_atomic(file, j.dump(2));
}

// A sweep directory: sweep.json + <method>-seed<S>/metrics.json for lora, full x seeds 0, 1.
fs::path make_sweep(const fs::path& root) {
  const fs::path sweep = root / "sweep";
  write_json(sweep / "sweep.json", {{"config_hash", "sweephash"}, {"methods", {"lora", "full"}}, {"seeds", {0, 1}}});
  for (const std::string method : {"lora", "full"})
    for (int seed : {0, 1}) write_json(sweep / (method + "-seed" + std::to_string(seed)) / "metrics.json", metrics(method, seed));
  return sweep;
}

json probe_model(const std::string& name, int hidden, double scale) {
  json layers = json::array();
  for (int l = 0; l < 2; ++l)
    layers.push_back({{"layer", l},
                      {"pairs", json::array({{{"a", "code"}, {"b", "math"}, {"iou", 0.2 * scale}, {"iou_random", 0.0257},
                                              {"ratio", 7.5 * scale + l}, {"p_value", 0.004}},
                                             {{"a", "code"}, {"b", "chat"}, {"iou", 0.3 * scale}, {"iou_random", 0.0257},
                                              {"ratio", 11.25 * scale + l}, {"p_value", 0.3}}})},
                      {"mean_ratio", (7.5 + 11.25) * scale / 2 + l}});
  return {{"model", "models/" + name}, {"hidden_size", hidden}, {"intermediate_size", hidden * 3}, {"num_layers", 2},
          {"params", hidden * 1000}, {"K", 10}, {"mean_iou", 0.25 * scale}, {"mean_ratio", 9.375 * scale + 0.5},
          {"min_ratio", 7.5 * scale}, {"max_ratio", 11.25 * scale + 1}, {"pairs_p_le_0.05", 2}, {"pairs_total", 4},
          {"layers", layers}};
}

fs::path make_probe(const fs::path& root) {
  const fs::path dir = root / "probe-scale";
  json small = probe_model("small-model", 576, 1.0), big = probe_model("big-model", 2048, 0.5);
  write_json(dir / "probe.json", {{"layers", small["layers"]},
                                  {"models", json::array({small, big})},
                                  {"provenance", {{"config_hash", "probehash"}, {"model", "models/small-model"}, {"seed", 0}}}});
  return dir;
}

std::string slurp(const fs::path& file) { return read_file(file); }

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST(ReportSummary, SpreadsOverSeedsPerMethod) {
  const json s = report::summarize_runs({metrics("lora", 0), metrics("full", 0), metrics("lora", 1), metrics("full", 1)});
  ASSERT_EQ(s["order"], json::array({"lora", "full"}));
  const json& lora = s["methods"]["lora"];
  EXPECT_EQ(lora["runs"].get<int>(), 2);
  EXPECT_EQ(lora["seeds"], json::array({0, 1}));
  EXPECT_NEAR(lora["ACC"]["mean"].get<double>(), (2.05 / 3 + 0.75) / 2, 1e-12);
  EXPECT_NEAR(lora["ACC"]["std"].get<double>(), std::fabs(0.75 - 2.05 / 3) / std::sqrt(2.0), 1e-12);
  EXPECT_NEAR(lora["BWT"]["mean"].get<double>(), -0.2, 1e-12);
  EXPECT_NEAR(lora["BWT"]["std"].get<double>(), 0.1 / std::sqrt(2.0), 1e-12);
  EXPECT_NEAR(lora["F"]["mean"].get<double>(), 0.2, 1e-12);
  EXPECT_NEAR(lora["FWT"]["mean"].get<double>(), 0.05, 1e-12);
  EXPECT_NEAR(lora["FWT"]["std"].get<double>(), 0.0, 1e-12);
  EXPECT_NEAR(lora["forgetting"]["code"]["mean"].get<double>(), 0.25, 1e-12);
  EXPECT_NEAR(lora["R_mean"][3][0].get<double>(), 0.55, 1e-12);
  EXPECT_NEAR(lora["R_std"][3][0].get<double>(), 0.1 / std::sqrt(2.0), 1e-12);
  EXPECT_NEAR(lora["general_retention"]["mean"][3].get<double>(), 0.875, 1e-12);
  EXPECT_EQ(lora["config_hashes"], json::array({"lorahash0", "lorahash1"}));
  const json& full = s["methods"]["full"];
  EXPECT_NEAR(full["ACC"]["mean"].get<double>(), (1.7 / 3 + 0.6) / 2, 1e-12);
  EXPECT_NEAR(full["F"]["mean"].get<double>(), 0.425, 1e-12);
  EXPECT_FALSE(full.contains("general_retention"));

  // A null R entry: skipped in the means, null in R_mean where no run scored it.
  json a = metrics("lora", 0), b = metrics("lora", 1);
  a["R"][3][1] = nullptr;
  b["R"][3][1] = nullptr;
  const json n = report::summarize_runs({a, b});
  EXPECT_TRUE(n["methods"]["lora"]["R_mean"][3][1].is_null());
  EXPECT_NEAR(n["methods"]["lora"]["ACC"]["mean"].get<double>(), ((0.5 + 0.85) / 2 + (0.6 + 0.85) / 2) / 2, 1e-12);

  // Several models: groups are "method @ model".
  json other = metrics("lora", 0);
  other["model"] = "models/other-model";
  const json two = report::summarize_runs({metrics("lora", 0), other});
  EXPECT_TRUE(two["methods"].contains("lora @ tiny-model"));
  EXPECT_TRUE(two["methods"].contains("lora @ other-model"));
}

TEST(ReportSummary, RefusesIncompleteOrInconsistentRuns) {
  json no_r = metrics("lora", 0);
  no_r.erase("R");
  EXPECT_THROW(report::summarize_runs({no_r}), Error);
  json ragged = metrics("lora", 0);
  ragged["R"][2].erase(1);
  EXPECT_THROW(report::summarize_runs({ragged}), Error);
  json fewer = metrics("lora", 1);
  fewer["tasks"] = {"code", "math"};
  fewer["R"] = {{0.1, 0.2}, {0.3, 0.4}, {0.5, 0.6}};
  EXPECT_THROW(report::summarize_runs({metrics("lora", 0), fewer}), Error);
}

TEST(Report, SweepWithoutProbeWritesTablesFiguresAndNotes) {
  TempDir tmp;
  const fs::path sweep = make_sweep(tmp.path);
  const fs::path out = tmp.path / "report";
  report::write_report({sweep}, out);
  ASSERT_TRUE(fs::is_regular_file(out / "report.md"));
  ASSERT_TRUE(fs::is_regular_file(out / "report.html"));
  const std::string md = slurp(out / "report.md"), html = slurp(out / "report.html");

  // CL metrics table: mean ± sample std over the two seeds.
  EXPECT_NE(md.find("| lora | 2 | 0.717 ± 0.047 (n=2) | -0.200 ± 0.071 (n=2) | 0.050 ± 0.000 (n=2) | 0.200 ± 0.071 (n=2) |"),
            std::string::npos) << md;
  EXPECT_NE(md.find("| full | 2 | 0.583 ± 0.024 (n=2) | -0.425 ± 0.035 (n=2)"), std::string::npos) << md;
  // Forgetting per task (lora: f_code 0.3 / 0.2, f_math 0.2 / 0.1).
  EXPECT_NE(md.find("| method | f(code) | f(math) |"), std::string::npos) << md;
  EXPECT_NE(md.find("| lora | 0.250 ± 0.071 | 0.150 ± 0.071 |"), std::string::npos) << md;
  // R matrix per method: the mean ± std cells and the row labels.
  EXPECT_NE(md.find("| after medical | 0.550 ± 0.071 | 0.750 ± 0.071 | 0.850 ± 0.000 |"), std::string::npos) << md;
  EXPECT_NE(md.find("math (exact_match)"), std::string::npos);
  // Provenance of the sections: seeds and config hashes.
  EXPECT_NE(md.find("lora: seeds 0, 1 (model models/tiny-model; config hashes lorahash0, lorahash1)"), std::string::npos);
  // Drift, general retention and stages only came from lora: tables with its numbers.
  EXPECT_NE(md.find("| 1 | 0.920 |"), std::string::npos) << md;  // CKA of layer 1 after code, mean of 0.93 and 0.91
  EXPECT_NE(md.find("| lora | retention (2 runs) | 1.000 ± 0.000 | 0.950 ± 0.000 | 0.925 ± 0.000 | 0.875 ± 0.000 |"),
            std::string::npos) << md;
  EXPECT_NE(md.find("| lora | code | 2 | 12.5 ± 0.0 | 250.0 ± 0.0 | 1.250 ± 0.000 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| after math | 1.600 ± 0.000 | 1.400 ± 0.000 | 2.100 ± 0.000 |"), std::string::npos) << md;
  // Missing probe: said so, and no IoU figure or scale table invented.
  EXPECT_NE(md.find("No probe.json among the inputs"), std::string::npos);
  EXPECT_EQ(md.find("IoU / random IoU:"), std::string::npos);
  EXPECT_EQ(md.find("Normalised overlap against model size"), std::string::npos);

  // Figures: referenced from report.md as files, inline in report.html.
  for (const char* fig : {"cl_metrics", "R_lora", "R_full", "drift_lora", "general_retention"}) {
    EXPECT_TRUE(fs::is_regular_file(out / "figures" / (std::string(fig) + ".svg"))) << fig;
    EXPECT_NE(md.find(std::string("(figures/") + fig + ".svg)"), std::string::npos) << fig;
    EXPECT_NE(html.find(std::string("id=\"fig-") + fig + "\""), std::string::npos) << fig;
  }
  // Self-contained: the only URL is the SVG namespace name; no link, image or script source.
  EXPECT_EQ(count(html, "http://"), count(html, "http://www.w3.org/2000/svg"));
  EXPECT_GT(count(html, "<svg "), 4u);
  EXPECT_EQ(html.find("https://"), std::string::npos);
  EXPECT_EQ(html.find("<link"), std::string::npos);
  EXPECT_EQ(html.find(" src="), std::string::npos);
  EXPECT_NE(html.find("0.717 ± 0.047"), std::string::npos);
}

TEST(Report, ProbeAndRunDirectoriesTogether) {
  TempDir tmp;
  const fs::path run = tmp.path / "run-lora";
  json m = metrics("lora", 3);  // the last row of seed 1: ACC 0.75, BWT -0.15, FWT 0.05, F 0.15
  m["ACC"] = 0.5;               // disagrees with R: noted, R wins
  write_json(run / "metrics.json", m);
  const fs::path probe = make_probe(tmp.path);
  const fs::path out = tmp.path / "out";
  report::write_report({run, probe}, out);
  const std::string md = slurp(out / "report.md");
  EXPECT_EQ(md.find("No probe.json"), std::string::npos);
  EXPECT_NE(md.find("says ACC = 0.500000, its R gives 0.750000"), std::string::npos) << md;
  // One run: no "±" for its ACC cell.
  EXPECT_NE(md.find("| lora | 1 | 0.750 | -0.150 | 0.050 | 0.150 |"), std::string::npos) << md;
  // IoU tables per model: ratio (IoU, p) per layer and pair; the scale table with both models.
  EXPECT_NE(md.find("| layer 1 | 8.50 (0.200, 0.004) | 12.25 (0.300, 0.300) | 10.38 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| models/big-model | 2048 | 6144 | 2 | 2048000 | 10 | 0.125 | 5.19 |"), std::string::npos) << md;
  EXPECT_NE(md.find("config hash probehash; seed 0"), std::string::npos);
  for (const char* fig : {"iou_small-model", "iou_big-model", "scale"})
    EXPECT_TRUE(fs::is_regular_file(out / "figures" / (std::string(fig) + ".svg"))) << fig;
  EXPECT_EQ(md.find("No run recorded drift"), std::string::npos);  // this run has drift
  EXPECT_EQ(md.find("Methods compared after the last stage"), std::string::npos);  // one method only

  // A probe directory alone: the CL sections are omitted with a note; one model size: no scale plot.
  const fs::path single = tmp.path / "probe-one";
  json p = read_json_file(probe / "probe.json");
  p["models"].erase(1);
  write_json(single / "probe.json", p);
  report::write_report({single}, tmp.path / "out2");
  const std::string md2 = slurp(tmp.path / "out2" / "report.md");
  EXPECT_NE(md2.find("No run directory (metrics.json) among the inputs"), std::string::npos);
  EXPECT_NE(md2.find("the scale plot needs at least two"), std::string::npos);
  EXPECT_FALSE(fs::exists(tmp.path / "out2" / "figures" / "scale.svg"));
}

TEST(Report, BadInputsAreRefused) {
  TempDir tmp;
  EXPECT_THROW(report::write_report({tmp.path / "missing"}, tmp.path / "out"), Error);
  fs::create_directories(tmp.path / "empty");
  try {
    report::write_report({tmp.path / "empty"}, tmp.path / "out");
    FAIL() << "an empty directory was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("neither metrics.json"), std::string::npos) << e.what();
  }
  json m = metrics("lora", 0);
  m.erase("seed");
  write_json(tmp.path / "bad" / "metrics.json", m);
  try {
    report::write_report({tmp.path / "bad"}, tmp.path / "out");
    FAIL() << "metrics.json without seed was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("metrics.json"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("seed"), std::string::npos) << e.what();
  }
}

TEST(Report, CliSubcommand) {
  TempDir tmp;
  const fs::path sweep = make_sweep(tmp.path);
  const fs::path out = tmp.path / "cli-out";
  const std::string cmd = std::string(SPARSECL_BINARY) + " report '" + sweep.string() + "' --output '" + out.string() +
                          "' > '" + (tmp.path / "log.txt").string() + "' 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << read_file(tmp.path / "log.txt");
  EXPECT_TRUE(fs::is_regular_file(out / "report.html"));
  const std::string bad = std::string(SPARSECL_BINARY) + " report '" + (tmp.path / "nope").string() + "' --output '" +
                          out.string() + "' > /dev/null 2>&1";
  EXPECT_NE(std::system(bad.c_str()), 0);
}
