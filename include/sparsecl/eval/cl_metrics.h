// Continual-learning metrics of one sequential run (docs/DESIGN.md "Evaluation and continual-learning
// metrics", docs/report.md): from the score matrix R, where R[i][j] is the score on task j after
// training stage i (row 0 = the base model, rows 1..T = after each of the T stages, tasks in stage
// order), so R is (T+1) x T. With 1-based task/stage indices j, l in 1..T (row l = after stage l):
//
//   ACC = mean_{j=1..T} R[T][j]                            final average score
//   BWT = mean_{j=1..T-1} (R[T][j] - R[j][j])              backward transfer (< 0: forgetting)
//   FWT = mean_{j=2..T} (R[j-1][j] - R[0][j])              forward transfer: what the stages before j did
//                                                          to task j before it was trained, vs the base
//   f_j = max_{l=j..T-1} R[l][j] - R[T][j]   (j < T)       forgetting of task j
//   F   = mean_{j=1..T-1} f_j
//
// Rows taken by the forgetting max: l = j..T-1, i.e. only rows after task j was learned. DESIGN.md's
// "max_{l<T}" read literally would also take row 0 (the base) and the rows before stage j; GEM /
// Chaudhry et al. (2018) write l in {1..T-1} but train task-specific heads, so their rows l < j are
// chance level and never win the max. For a pretrained LLM they are not: the base model often scores
// well on every task before any tuning, and a max over rows l < j would count an earlier stage's
// interference (which is FWT's business) as forgetting of knowledge that stage j never added. Taking
// l >= j keeps f_j "how much of the best score reached since learning j has been lost"; f_j can be
// negative when the last stage improved task j further (as in GEM, not clipped at 0).
//
// NaN entries (a task not scored at that stage) are allowed: every term that reads a NaN is skipped
// in its mean (and in the max of f_j); a metric with no finite term, or f_j with no finite term, is
// NaN, which the JSON results write as null.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace sparsecl::eval {

// {"ACC", "BWT", "FWT", "F", "forgetting": {task: f_j for the tasks j < T}, "tasks": [...], "T"}
// (NaN -> null). Throws sparsecl::Error when R is not (T+1) x T with T = tasks.size() >= 1, naming the
// row whose length is wrong. FWT is null for T = 1; BWT, F are null for T = 1.
nlohmann::json cl_metrics(const std::vector<std::vector<double>>& R, const std::vector<std::string>& tasks);

// The spread of one quantity over seeds: {"mean", "std" (sample std, n-1 denominator; 0 for n = 1),
// "n" (finite values used), "values" (as given, NaN -> null)}. NaN values are skipped; with no finite
// value mean and std are null and n = 0.
nlohmann::json spread(const std::vector<double>& values);

// R from JSON as metrics.json stores it (arrays of numbers, null = NaN); throws sparsecl::Error naming
// `what` for anything that is not an array of arrays of numbers/nulls.
std::vector<std::vector<double>> matrix_from_json(const nlohmann::json& R, const std::string& what);

// A double as JSON: NaN / inf -> null.
nlohmann::json number_or_null(double value);
// Mean of the finite values (NaN / inf skipped); NaN when there is none.
double finite_mean(const std::vector<double>& values);

}  // namespace sparsecl::eval
