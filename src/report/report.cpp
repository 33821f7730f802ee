// `sparsecl report` (include/sparsecl/report/report.h, docs/report.md): reads run / sweep / probe
// directories, groups runs by method, and writes the same document twice: report.md (figures as
// figures/*.svg files) and a self-contained report.html (figures inline). The document is built once
// as a list of blocks (heading, text, note, table, figure) and rendered to both formats, so the two
// never disagree. Figures are plain SVG drawn here (heatmap, grouped bars with error bars, line chart).
#include "sparsecl/report/report.h"

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <tuple>

#include "sparsecl/common/error.h"
#include "sparsecl/common/files.h"
#include "sparsecl/common/log.h"
#include "sparsecl/eval/cl_metrics.h"

namespace sparsecl::report {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- small helpers ------------------------------------------------------------------------------------

// A JSON number as double; NaN for null, a missing key or anything that is not a number.
double number(const json& j) { return j.is_number() ? j.get<double>() : kNaN; }
double number_at(const json& obj, const char* key) {
  return obj.is_object() && obj.contains(key) ? number(obj.at(key)) : kNaN;
}
std::string string_at(const json& obj, const char* key, const std::string& fallback = "") {
  if (!obj.is_object() || !obj.contains(key)) return fallback;
  const json& v = obj.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  return fallback;
}

std::string format(double v, int decimals = 3) {
  if (!std::isfinite(v)) return "n/a";
  char buf[64];
  const double a = std::fabs(v);
  if (decimals > 0 && a != 0 && (a >= 1e6 || a < std::pow(10.0, -decimals)))
    std::snprintf(buf, sizeof buf, "%.*g", decimals, v);
  else
    std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
  return buf;
}
// "mean ± std" when more than one value went in, else the mean alone.
std::string format_spread(const json& s, int decimals = 3) {
  const double mean = number_at(s, "mean");
  if (!std::isfinite(mean)) return "n/a";
  const int64_t n = s.value("n", int64_t{0});
  return n > 1 ? format(mean, decimals) + " ± " + format(number_at(s, "std"), decimals) : format(mean, decimals);
}

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string escape_html(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}
std::string escape_md_cell(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '|') out += "\\|";
    else if (c == '\n') out += ' ';
    else out += c;
  }
  return out;
}
// A file-name-safe slug: [A-Za-z0-9_-], everything else '_'.
std::string slug(const std::string& s) {
  std::string out;
  for (char c : s) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') ? c : '_';
  return out;
}
// The last path component of a model path ("models/smollm2-135m-instruct" -> "smollm2-135m-instruct").
std::string model_name(const std::string& model) {
  if (model.empty()) return "?";
  fs::path p(model);
  while (!p.empty() && p.filename().empty()) p = p.parent_path();
  return p.empty() ? model : p.filename().string();
}

// ---- document model -------------------------------------------------------------------------------------

struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
};
struct Figure {
  std::string name;  // file stem under figures/
  std::string svg;
  std::string caption;
};
struct Block {
  enum class Kind { Heading, Text, Note, Table, Figure } kind;
  int level = 0;
  std::string text;
  Table table;
  Figure figure;
};

// Columns whose cells all read as numbers ("0.5", "-0.2 ± 0.1", "n/a") are right-aligned, others left.
std::vector<bool> numeric_columns(const Table& t) {
  std::vector<bool> numeric(t.header.size(), true);
  for (const auto& r : t.rows)
    for (size_t j = 0; j < r.size() && j < numeric.size(); ++j) {
      const std::string& c = r[j];
      const bool looks_numeric = c.empty() || c == "n/a" || std::isdigit(static_cast<unsigned char>(c[0])) ||
                                 (c.size() > 1 && c[0] == '-' && std::isdigit(static_cast<unsigned char>(c[1])));
      if (!looks_numeric) numeric[j] = false;
    }
  return numeric;
}

class Document {
 public:
  void heading(int level, const std::string& text) { blocks_.push_back({Block::Kind::Heading, level, text, {}, {}}); }
  void text(const std::string& text) { blocks_.push_back({Block::Kind::Text, 0, text, {}, {}}); }
  void note(const std::string& text) { blocks_.push_back({Block::Kind::Note, 0, text, {}, {}}); }
  void table(Table t) { blocks_.push_back({Block::Kind::Table, 0, "", std::move(t), {}}); }
  void figure(Figure f) {
    std::string name = slug(f.name);
    for (int i = 2; used_.count(name); ++i) name = slug(f.name) + "_" + std::to_string(i);
    used_.insert(name);
    f.name = name;
    blocks_.push_back({Block::Kind::Figure, 0, "", {}, std::move(f)});
  }
  const std::vector<Block>& blocks() const { return blocks_; }

  std::string markdown() const {
    std::ostringstream md;
    for (const auto& b : blocks_) {
      switch (b.kind) {
        case Block::Kind::Heading: md << std::string(b.level, '#') << ' ' << b.text << "\n\n"; break;
        case Block::Kind::Text: md << b.text << "\n\n"; break;
        case Block::Kind::Note: md << "> **Note.** " << b.text << "\n\n"; break;
        case Block::Kind::Table: {
          const auto& t = b.table;
          md << '|';
          for (const auto& h : t.header) md << ' ' << escape_md_cell(h) << " |";
          md << "\n|";
          const auto numeric = numeric_columns(t);
          for (size_t i = 0; i < t.header.size(); ++i) md << (numeric[i] ? " ---: |" : " --- |");
          md << '\n';
          for (const auto& r : t.rows) {
            md << '|';
            for (const auto& c : r) md << ' ' << escape_md_cell(c) << " |";
            md << '\n';
          }
          md << '\n';
          break;
        }
        case Block::Kind::Figure:
          md << "![" << b.figure.caption << "](figures/" << b.figure.name << ".svg)\n\n*" << b.figure.caption << "*\n\n";
          break;
      }
    }
    return md.str();
  }

  std::string html() const {
    std::ostringstream h;
    h << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
         "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
         "<title>sparsecl report</title>\n<style>\n"
         "body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;"
         "padding:0 1em;color:#222;line-height:1.45}\n"
         "h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #bbb;margin-top:2em}\n"
         "table{border-collapse:collapse;margin:0.8em 0;font-size:0.88em}\n"
         "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}\n"
         "td.text,th.text{text-align:left}\n"
         ".note{background:#fff8e1;border-left:4px solid #f0b400;padding:0.4em 0.8em;margin:0.8em 0}\n"
         "figure{margin:1em 0}figcaption{font-size:0.88em;color:#555}\n"
         ".scroll{overflow-x:auto}\n"
         "</style>\n</head>\n<body>\n";
    for (const auto& b : blocks_) {
      switch (b.kind) {
        case Block::Kind::Heading: h << "<h" << b.level << '>' << escape_html(b.text) << "</h" << b.level << ">\n"; break;
        case Block::Kind::Text: h << "<p>" << escape_html(b.text) << "</p>\n"; break;
        case Block::Kind::Note: h << "<p class=\"note\"><b>Note.</b> " << escape_html(b.text) << "</p>\n"; break;
        case Block::Kind::Table: {
          const auto numeric = numeric_columns(b.table);
          const auto open = [&](const char* tag, size_t j) {
            return std::string("<") + tag + (j < numeric.size() && !numeric[j] ? " class=\"text\">" : ">");
          };
          h << "<div class=\"scroll\"><table>\n<tr>";
          for (size_t j = 0; j < b.table.header.size(); ++j) h << open("th", j) << escape_html(b.table.header[j]) << "</th>";
          h << "</tr>\n";
          for (const auto& r : b.table.rows) {
            h << "<tr>";
            for (size_t j = 0; j < r.size(); ++j) h << open("td", j) << escape_html(r[j]) << "</td>";
            h << "</tr>\n";
          }
          h << "</table></div>\n";
          break;
        }
        case Block::Kind::Figure:
          h << "<figure id=\"fig-" << b.figure.name << "\">\n" << b.figure.svg << "\n<figcaption>"
            << escape_html(b.figure.caption) << "</figcaption>\n</figure>\n";
          break;
      }
    }
    // The one script: marks the page as rendered (figure count, and how many have a non-empty box), so a
    // headless browser check can tell that the page loaded and laid out every figure.
    h << "<script>(function(){var f=document.querySelectorAll('svg.figure'),r=0;"
         "for(var i=0;i<f.length;i++){var b=f[i].getBoundingClientRect();if(b.width>0&&b.height>0)r++;}"
         "document.body.setAttribute('data-figures',String(f.length));"
         "document.body.setAttribute('data-figures-rendered',String(r));})();</script>\n</body>\n</html>\n";
    return h.str();
  }

 private:
  std::vector<Block> blocks_;
  std::set<std::string> used_;
};

// ---- SVG drawing --------------------------------------------------------------------------------------

const std::vector<std::string> kPalette = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};

struct Rgb {
  double r, g, b;
};
// Viridis (matplotlib) through 6 anchors, linear in between; t in [0, 1].
Rgb viridis(double t) {
  static const Rgb anchors[] = {{68, 1, 84}, {65, 68, 135}, {42, 120, 142}, {34, 168, 132}, {122, 209, 81}, {253, 231, 37}};
  t = std::clamp(t, 0.0, 1.0) * 5;
  const int i = std::min(4, static_cast<int>(t));
  const double f = t - i;
  const Rgb& a = anchors[i];
  const Rgb& b = anchors[i + 1];
  return {a.r + f * (b.r - a.r), a.g + f * (b.g - a.g), a.b + f * (b.b - a.b)};
}
std::string hex(const Rgb& c) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", static_cast<int>(std::lround(c.r)), static_cast<int>(std::lround(c.g)),
                static_cast<int>(std::lround(c.b)));
  return buf;
}
bool dark(const Rgb& c) { return 0.299 * c.r + 0.587 * c.g + 0.114 * c.b < 128; }

std::string f1(double v) {  // coordinates with one decimal
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

class Svg {
 public:
  Svg(double width, double height) : width_(width), height_(height) {}
  void rect(double x, double y, double w, double h, const std::string& fill, const std::string& extra = "") {
    body_ << "<rect x=\"" << f1(x) << "\" y=\"" << f1(y) << "\" width=\"" << f1(w) << "\" height=\"" << f1(h)
          << "\" fill=\"" << fill << "\"" << (extra.empty() ? "" : " " + extra) << "/>\n";
  }
  void line(double x1, double y1, double x2, double y2, const std::string& stroke, double width = 1,
            const std::string& extra = "") {
    body_ << "<line x1=\"" << f1(x1) << "\" y1=\"" << f1(y1) << "\" x2=\"" << f1(x2) << "\" y2=\"" << f1(y2)
          << "\" stroke=\"" << stroke << "\" stroke-width=\"" << width << "\"" << (extra.empty() ? "" : " " + extra)
          << "/>\n";
  }
  void text(double x, double y, const std::string& s, const std::string& anchor = "start", double size = 11,
            const std::string& fill = "#222", const std::string& extra = "") {
    body_ << "<text x=\"" << f1(x) << "\" y=\"" << f1(y) << "\" font-size=\"" << size << "\" text-anchor=\"" << anchor
          << "\" fill=\"" << fill << "\"" << (extra.empty() ? "" : " " + extra) << ">" << escape_html(s) << "</text>\n";
  }
  void polyline(const std::vector<std::pair<double, double>>& pts, const std::string& stroke, double width = 1.8) {
    if (pts.size() < 2) return;
    body_ << "<polyline fill=\"none\" stroke=\"" << stroke << "\" stroke-width=\"" << width << "\" points=\"";
    for (const auto& [x, y] : pts) body_ << f1(x) << ',' << f1(y) << ' ';
    body_ << "\"/>\n";
  }
  void circle(double x, double y, double r, const std::string& fill, const std::string& title = "") {
    body_ << "<circle cx=\"" << f1(x) << "\" cy=\"" << f1(y) << "\" r=\"" << r << "\" fill=\"" << fill << "\">";
    if (!title.empty()) body_ << "<title>" << escape_html(title) << "</title>";
    body_ << "</circle>\n";
  }
  std::string str(const std::string& title) const {
    std::ostringstream s;
    s << "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"figure\" role=\"img\" width=\"" << f1(width_)
      << "\" height=\"" << f1(height_) << "\" viewBox=\"0 0 " << f1(width_) << ' ' << f1(height_)
      << "\" font-family=\"Helvetica,Arial,sans-serif\">\n<title>" << escape_html(title) << "</title>\n"
      << "<rect x=\"0\" y=\"0\" width=\"" << f1(width_) << "\" height=\"" << f1(height_) << "\" fill=\"#ffffff\"/>\n"
      << body_.str() << "</svg>";
    return s.str();
  }

 private:
  double width_, height_;
  std::ostringstream body_;
};

double text_width(const std::string& s, double size = 11) { return 0.6 * size * static_cast<double>(s.size()); }

// About `count` round tick values covering [lo, hi].
std::vector<double> nice_ticks(double lo, double hi, int count = 5) {
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / count;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> ticks;
  for (double t = std::ceil(lo / step - 1e-9) * step; t <= hi + 1e-9 * step; t += step)
    ticks.push_back(std::fabs(t) < 1e-12 * step ? 0.0 : t);
  return ticks;
}
std::string tick_label(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// A matrix of numbers as coloured cells with the value written in each. NaN cells are grey and say
// "n/a". per_column: each column has its own colour range (columns in different units, as R's tasks).
std::string heatmap_svg(const std::string& title, const std::vector<std::string>& row_labels,
                        const std::vector<std::string>& col_labels, const std::vector<std::vector<double>>& values,
                        bool per_column, int decimals = 3) {
  double label_w = 0, col_w = 58;
  for (const auto& r : row_labels) label_w = std::max(label_w, text_width(r));
  for (const auto& c : col_labels) col_w = std::max(col_w, text_width(c) + 10);
  const double cell_h = row_labels.size() > 24 ? 17 : 24, left = label_w + 14, top = 44;
  const double legend_w = per_column ? 0 : 70;
  const double width = left + col_w * col_labels.size() + legend_w + 12;
  const double height = top + cell_h * row_labels.size() + 14;
  Svg svg(width, height);
  svg.text(8, 16, title, "start", 13, "#222", "font-weight=\"bold\"");
  // Colour ranges: per column or global, over the finite values.
  const size_t cols = col_labels.size();
  std::vector<double> lo(cols, kNaN), hi(cols, kNaN);
  double glo = kNaN, ghi = kNaN;
  for (const auto& row : values)
    for (size_t j = 0; j < cols && j < row.size(); ++j)
      if (std::isfinite(row[j])) {
        lo[j] = std::isfinite(lo[j]) ? std::min(lo[j], row[j]) : row[j];
        hi[j] = std::isfinite(hi[j]) ? std::max(hi[j], row[j]) : row[j];
        glo = std::isfinite(glo) ? std::min(glo, row[j]) : row[j];
        ghi = std::isfinite(ghi) ? std::max(ghi, row[j]) : row[j];
      }
  for (size_t j = 0; j < cols; ++j) svg.text(left + col_w * (j + 0.5), top - 8, col_labels[j], "middle", 11);
  for (size_t i = 0; i < row_labels.size(); ++i) {
    const double y = top + cell_h * i;
    svg.text(left - 6, y + cell_h / 2 + 4, row_labels[i], "end", 11);
    for (size_t j = 0; j < cols; ++j) {
      const double v = j < values[i].size() ? values[i][j] : kNaN;
      const double x = left + col_w * j;
      if (!std::isfinite(v)) {
        svg.rect(x, y, col_w - 1, cell_h - 1, "#dddddd");
        svg.text(x + col_w / 2, y + cell_h / 2 + 4, "n/a", "middle", 10, "#666");
        continue;
      }
      const double a = per_column ? lo[j] : glo, b = per_column ? hi[j] : ghi;
      const Rgb c = viridis(b > a ? (v - a) / (b - a) : 0.5);
      svg.rect(x, y, col_w - 1, cell_h - 1, hex(c));
      svg.text(x + col_w / 2, y + cell_h / 2 + 4, format(v, decimals), "middle", 10, dark(c) ? "#ffffff" : "#111111");
    }
  }
  if (!per_column && std::isfinite(glo)) {  // colour bar
    const double x = left + col_w * cols + 14, h = std::max(60.0, cell_h * row_labels.size());
    const int steps = 20;
    for (int s = 0; s < steps; ++s)
      svg.rect(x, top + h * s / steps, 14, h / steps + 0.5, hex(viridis(1.0 - (s + 0.5) / steps)));
    svg.text(x + 18, top + 9, format(ghi, decimals), "start", 10);
    svg.text(x + 18, top + h, format(glo, decimals), "start", 10);
  }
  return svg.str(title);
}

// Grouped vertical bars (one group per label, one bar per series) with +-1 std error bars.
std::string bar_chart_svg(const std::string& title, const std::vector<std::string>& groups,
                          const std::vector<std::string>& series, const std::vector<std::vector<double>>& mean,
                          const std::vector<std::vector<double>>& err) {
  const double bar_w = 22, gap = 26, left = 58, top = 34, plot_h = 220;
  double legend_w = 0;
  for (const auto& s : series) legend_w = std::max(legend_w, text_width(s) + 30);
  const double group_w = bar_w * series.size() + gap;
  const double width = left + group_w * groups.size() + legend_w + 20, height = top + plot_h + 40;
  double lo = 0, hi = 0;
  for (size_t g = 0; g < groups.size(); ++g)
    for (size_t s = 0; s < series.size(); ++s) {
      const double m = mean[g][s], e = std::isfinite(err[g][s]) ? err[g][s] : 0;
      if (!std::isfinite(m)) continue;
      lo = std::min(lo, m - e);
      hi = std::max(hi, m + e);
    }
  if (hi == lo) hi = lo + 1;
  const double pad = 0.06 * (hi - lo);
  lo -= lo < 0 ? pad : 0;
  hi += pad;
  const auto Y = [&](double v) { return top + plot_h * (hi - v) / (hi - lo); };
  Svg svg(width, height);
  svg.text(8, 16, title, "start", 13, "#222", "font-weight=\"bold\"");
  for (double t : nice_ticks(lo, hi)) {
    svg.line(left, Y(t), left + group_w * groups.size(), Y(t), "#e4e4e4");
    svg.text(left - 5, Y(t) + 4, tick_label(t), "end", 10);
  }
  svg.line(left, Y(0), left + group_w * groups.size(), Y(0), "#555", 1);
  svg.line(left, top, left, top + plot_h, "#555", 1);
  for (size_t g = 0; g < groups.size(); ++g) {
    const double gx = left + gap / 2 + group_w * g;
    svg.text(gx + bar_w * series.size() / 2, top + plot_h + 18, groups[g], "middle", 11);
    for (size_t s = 0; s < series.size(); ++s) {
      const double m = mean[g][s];
      const double x = gx + bar_w * s;
      if (!std::isfinite(m)) {
        svg.text(x + bar_w / 2, Y(0) - 3, "n/a", "middle", 8, "#666");
        continue;
      }
      svg.rect(x + 1, std::min(Y(m), Y(0)), bar_w - 2, std::fabs(Y(m) - Y(0)), kPalette[s % kPalette.size()]);
      const double e = err[g][s];
      if (std::isfinite(e) && e > 0) {
        const double cx = x + bar_w / 2;
        svg.line(cx, Y(m - e), cx, Y(m + e), "#111", 1.2);
        svg.line(cx - 4, Y(m - e), cx + 4, Y(m - e), "#111", 1.2);
        svg.line(cx - 4, Y(m + e), cx + 4, Y(m + e), "#111", 1.2);
      }
    }
  }
  const double lx = left + group_w * groups.size() + 12;
  for (size_t s = 0; s < series.size(); ++s) {
    svg.rect(lx, top + 4 + 18 * s, 12, 12, kPalette[s % kPalette.size()]);
    svg.text(lx + 17, top + 14 + 18 * s, series[s], "start", 11);
  }
  return svg.str(title);
}

struct Series {
  std::string name;
  std::vector<double> x, y;           // NaN y breaks the line
  std::vector<double> y_lo, y_hi;     // optional whiskers (same length as y)
  std::vector<std::string> labels;    // optional text beside each point
};

// Lines over a numeric x (log scale with x_log) or, when x_ticks is given, over categories 0..n-1.
std::string line_chart_svg(const std::string& title, const std::string& x_label, const std::string& y_label,
                           const std::vector<Series>& series, const std::vector<std::string>& x_ticks = {},
                           bool x_log = false) {
  const double left = 58, top = 34, plot_w = 520, plot_h = 240;
  double legend_w = 0;
  for (const auto& s : series) legend_w = std::max(legend_w, text_width(s.name) + 34);
  const double width = left + plot_w + legend_w + 24, height = top + plot_h + 52;
  double xlo = kNaN, xhi = kNaN, ylo = kNaN, yhi = kNaN;
  const auto tx = [&](double x) { return x_log ? std::log(x) : x; };
  for (const auto& s : series)
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i]) || !std::isfinite(s.x[i]) || (x_log && s.x[i] <= 0)) continue;
      const double x = tx(s.x[i]);
      xlo = std::isfinite(xlo) ? std::min(xlo, x) : x;
      xhi = std::isfinite(xhi) ? std::max(xhi, x) : x;
      double a = s.y[i], b = s.y[i];
      if (i < s.y_lo.size() && std::isfinite(s.y_lo[i])) a = std::min(a, s.y_lo[i]);
      if (i < s.y_hi.size() && std::isfinite(s.y_hi[i])) b = std::max(b, s.y_hi[i]);
      ylo = std::isfinite(ylo) ? std::min(ylo, a) : a;
      yhi = std::isfinite(yhi) ? std::max(yhi, b) : b;
    }
  if (!x_ticks.empty()) xlo = 0, xhi = static_cast<double>(x_ticks.size() - 1);
  if (!std::isfinite(xlo)) xlo = 0, xhi = 1;
  if (!std::isfinite(ylo)) ylo = 0, yhi = 1;
  if (xhi == xlo) xlo -= 0.5, xhi += 0.5;
  if (yhi == ylo) ylo -= 0.05 * std::max(1.0, std::fabs(ylo)), yhi += 0.05 * std::max(1.0, std::fabs(yhi));
  const double ypad = 0.06 * (yhi - ylo);
  ylo -= ypad;
  yhi += ypad;
  const double xpad = x_log ? 0.08 * (xhi - xlo) : 0;
  xlo -= xpad;
  xhi += xpad;
  const auto X = [&](double x) { return left + plot_w * (tx(x) - xlo) / (xhi - xlo); };
  const auto Xc = [&](double x) { return left + plot_w * (x - xlo) / (xhi - xlo); };  // already transformed
  const auto Y = [&](double y) { return top + plot_h * (yhi - y) / (yhi - ylo); };
  Svg svg(width, height);
  svg.text(8, 16, title, "start", 13, "#222", "font-weight=\"bold\"");
  for (double t : nice_ticks(ylo, yhi)) {
    svg.line(left, Y(t), left + plot_w, Y(t), "#e4e4e4");
    svg.text(left - 5, Y(t) + 4, tick_label(t), "end", 10);
  }
  if (!x_ticks.empty()) {
    const size_t every = std::max<size_t>(1, x_ticks.size() / 12 + (x_ticks.size() % 12 ? 1 : 0));
    for (size_t i = 0; i < x_ticks.size(); i += every) {
      svg.line(Xc(static_cast<double>(i)), top + plot_h, Xc(static_cast<double>(i)), top + plot_h + 4, "#555");
      svg.text(Xc(static_cast<double>(i)), top + plot_h + 16, x_ticks[i], "middle", 10);
    }
  } else if (x_log) {
    std::set<double> xs;
    for (const auto& s : series)
      for (double x : s.x)
        if (std::isfinite(x) && x > 0) xs.insert(x);
    for (double x : xs) {
      svg.line(X(x), top + plot_h, X(x), top + plot_h + 4, "#555");
      svg.text(X(x), top + plot_h + 16, tick_label(x), "middle", 10);
    }
  } else {
    for (double t : nice_ticks(xlo, xhi)) {
      svg.line(Xc(t), top + plot_h, Xc(t), top + plot_h + 4, "#555");
      svg.text(Xc(t), top + plot_h + 16, tick_label(t), "middle", 10);
    }
  }
  svg.line(left, top + plot_h, left + plot_w, top + plot_h, "#555");
  svg.line(left, top, left, top + plot_h, "#555");
  svg.text(left + plot_w / 2, top + plot_h + 38, x_label, "middle", 11);
  svg.text(14, top + plot_h / 2, y_label, "middle", 11, "#222",
           "transform=\"rotate(-90 14 " + f1(top + plot_h / 2) + ")\"");
  for (size_t k = 0; k < series.size(); ++k) {
    const auto& s = series[k];
    const std::string colour = kPalette[k % kPalette.size()];
    std::vector<std::pair<double, double>> run;
    const auto flush = [&] {
      svg.polyline(run, colour);
      run.clear();
    };
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i]) || !std::isfinite(s.x[i]) || (x_log && s.x[i] <= 0)) {
        flush();
        continue;
      }
      const double px = x_ticks.empty() ? X(s.x[i]) : Xc(s.x[i]), py = Y(s.y[i]);
      run.emplace_back(px, py);
      if (i < s.y_lo.size() && std::isfinite(s.y_lo[i]) && i < s.y_hi.size() && std::isfinite(s.y_hi[i]))
        svg.line(px, Y(s.y_lo[i]), px, Y(s.y_hi[i]), colour, 1.2);
      svg.circle(px, py, 2.8, colour, s.name + ": " + format(s.y[i]));
      if (i < s.labels.size() && !s.labels[i].empty()) svg.text(px + 6, py - 6, s.labels[i], "start", 10, "#333");
    }
    flush();
    svg.line(left + plot_w + 14, top + 10 + 18 * k, left + plot_w + 34, top + 10 + 18 * k, colour, 2.5);
    svg.text(left + plot_w + 39, top + 14 + 18 * k, s.name, "start", 11);
  }
  return svg.str(title);
}

// ---- inputs -------------------------------------------------------------------------------------------

struct RunInput {
  fs::path dir;
  json metrics;
};
struct ProbeInput {
  fs::path file;
  json probe;
};
struct SweepInput {
  fs::path dir;
  json sweep;
};
struct Inputs {
  std::vector<RunInput> runs;
  std::vector<ProbeInput> probes;
  std::vector<SweepInput> sweeps;
  std::vector<std::string> notes;
};

void require_run_fields(const json& m, const std::string& where) {
  if (!m.is_object()) throw Error("report: " + where + " is not a JSON object");
  for (const char* key : {"R", "tasks", "method", "seed"})
    if (!m.contains(key)) throw Error("report: " + where + " lacks \"" + key + "\"");
  if (!m.at("tasks").is_array() || m.at("tasks").empty())
    throw Error("report: " + where + ": \"tasks\" must be a non-empty array of names");
  for (const auto& t : m.at("tasks"))
    if (!t.is_string()) throw Error("report: " + where + ": \"tasks\" must be an array of strings");
  if (!m.at("method").is_string()) throw Error("report: " + where + ": \"method\" must be a string");
  if (!m.at("seed").is_number_integer()) throw Error("report: " + where + ": \"seed\" must be an integer");
  const auto R = eval::matrix_from_json(m.at("R"), where + ": \"R\"");
  eval::cl_metrics(R, m.at("tasks").get<std::vector<std::string>>());  // throws on a wrong shape
}

Inputs collect_inputs(const std::vector<fs::path>& paths) {
  Inputs in;
  std::set<fs::path> seen_runs, seen_probes;
  const auto add_probe = [&](const fs::path& file) {
    if (!fs::is_regular_file(file)) return false;
    const auto key = fs::weakly_canonical(file);
    if (seen_probes.insert(key).second) in.probes.push_back({file, read_json_file(file, "probe.json")});
    return true;
  };
  const auto add_run = [&](const fs::path& dir) {
    const auto key = fs::weakly_canonical(dir);
    if (!seen_runs.insert(key).second) return;
    const fs::path file = dir / "metrics.json";
    json m = read_json_file(file, "metrics.json");
    require_run_fields(m, file.string());
    in.runs.push_back({dir, std::move(m)});
    add_probe(dir / "probe.json");
    add_probe(dir / "probe" / "probe.json");
  };
  for (const auto& p : paths) {
    if (!fs::is_directory(p)) throw Error("report: input " + p.string() + " is not a directory");
    bool known = false;
    if (fs::is_regular_file(p / "metrics.json")) {
      add_run(p);
      known = true;
    } else {
      // A sweep directory: sweep.json when it finished; an interrupted sweep still shows its finished runs.
      std::vector<fs::path> subdirs;
      for (const auto& e : fs::directory_iterator(p))
        if (e.is_directory() && fs::is_regular_file(e.path() / "metrics.json")) subdirs.push_back(e.path());
      std::sort(subdirs.begin(), subdirs.end());
      if (fs::is_regular_file(p / "sweep.json")) {
        known = true;
        in.sweeps.push_back({p, read_json_file(p / "sweep.json", "sweep.json")});
        if (subdirs.empty()) in.notes.push_back("Sweep " + p.string() + " holds no run subdirectory with a metrics.json yet.");
      } else if (!subdirs.empty()) {
        known = true;
        in.notes.push_back("Sweep " + p.string() + " has no sweep.json (not finished): showing the " +
                           std::to_string(subdirs.size()) + " run(s) that have a metrics.json.");
      }
      for (const auto& d : subdirs) add_run(d);
    }
    if (add_probe(p / "probe.json")) known = true;
    if (add_probe(p / "probe" / "probe.json")) known = true;
    if (!known)
      throw Error("report: " + p.string() + " holds neither metrics.json (a run), sweep.json (a sweep) nor probe.json");
  }
  return in;
}

// ---- grouping and summaries ---------------------------------------------------------------------------

std::string run_model(const json& m) {
  std::string model = string_at(m, "model");
  if (model.empty() && m.contains("provenance")) model = string_at(m.at("provenance"), "model");
  return model;
}
std::string run_config_hash(const json& m) {
  std::string h = string_at(m, "config_hash");
  if (h.empty() && m.contains("provenance")) h = string_at(m.at("provenance"), "config_hash");
  return h;
}
std::string row_label(size_t row, const std::vector<std::string>& tasks) {
  return row == 0 ? "base" : "after " + (row - 1 < tasks.size() ? tasks[row - 1] : std::to_string(row));
}

// Group key of every run: its method, with the model's name when the runs span several models.
std::vector<std::string> group_keys(const std::vector<json>& metrics) {
  std::set<std::string> models;
  for (const auto& m : metrics) models.insert(run_model(m));
  std::vector<std::string> keys;
  for (const auto& m : metrics)
    keys.push_back(m.at("method").get<std::string>() + (models.size() > 1 ? " @ " + model_name(run_model(m)) : ""));
  return keys;
}

// Element-wise spread of equally shaped matrices (rows of possibly different lengths are padded NaN).
std::pair<json, json> matrix_spread(const std::vector<std::vector<std::vector<double>>>& mats) {
  json mean = json::array(), sd = json::array();
  if (mats.empty()) return {mean, sd};
  size_t rows = 0;
  for (const auto& m : mats) rows = std::max(rows, m.size());
  for (size_t i = 0; i < rows; ++i) {
    size_t cols = 0;
    for (const auto& m : mats)
      if (i < m.size()) cols = std::max(cols, m[i].size());
    json mr = json::array(), sr = json::array();
    for (size_t j = 0; j < cols; ++j) {
      std::vector<double> v;
      for (const auto& m : mats) v.push_back(i < m.size() && j < m[i].size() ? m[i][j] : kNaN);
      const json s = eval::spread(v);
      mr.push_back(s["mean"]);
      sr.push_back(s["std"]);
    }
    mean.push_back(mr);
    sd.push_back(sr);
  }
  return {mean, sd};
}

std::vector<double> number_list(const json& arr) {
  std::vector<double> out;
  if (arr.is_array())
    for (const auto& v : arr) out.push_back(number(v));
  return out;
}

}  // namespace

json summarize_runs(const std::vector<json>& metrics) {
  for (size_t i = 0; i < metrics.size(); ++i) require_run_fields(metrics[i], "metrics #" + std::to_string(i));
  const auto keys = group_keys(metrics);
  std::vector<std::string> order;
  std::map<std::string, std::vector<size_t>> members;
  for (size_t i = 0; i < metrics.size(); ++i) {
    if (!members.count(keys[i])) order.push_back(keys[i]);
    members[keys[i]].push_back(i);
  }
  json methods = json::object();
  for (const auto& key : order) {
    const auto& idx = members[key];
    const json& first = metrics[idx.front()];
    const auto tasks = first.at("tasks").get<std::vector<std::string>>();
    std::vector<int64_t> seeds;
    std::vector<std::string> hashes, models;
    std::map<std::string, std::vector<double>> headline;
    std::map<std::string, std::vector<double>> forgetting;
    std::vector<std::vector<std::vector<double>>> Rs, retention;
    for (size_t i : idx) {
      const json& m = metrics[i];
      const auto t = m.at("tasks").get<std::vector<std::string>>();
      if (t != tasks)
        throw Error("report: runs of '" + key + "' have different task lists ([" + join(tasks, ", ") + "] vs [" +
                    join(t, ", ") + "], seed " + std::to_string(m.at("seed").get<int64_t>()) + ")");
      seeds.push_back(m.at("seed").get<int64_t>());
      const std::string h = run_config_hash(m), mo = run_model(m);
      if (!h.empty() && std::find(hashes.begin(), hashes.end(), h) == hashes.end()) hashes.push_back(h);
      if (!mo.empty() && std::find(models.begin(), models.end(), mo) == models.end()) models.push_back(mo);
      const auto R = eval::matrix_from_json(m.at("R"), "R");
      const json cl = eval::cl_metrics(R, tasks);
      for (const char* k : {"ACC", "BWT", "FWT", "F"}) headline[k].push_back(number(cl[k]));
      for (size_t j = 0; j + 1 < tasks.size(); ++j) forgetting[tasks[j]].push_back(number(cl["forgetting"][tasks[j]]));
      Rs.push_back(R);
      if (m.contains("general") && m["general"].is_object() && m["general"].contains("retention"))
        retention.push_back({number_list(m["general"]["retention"])});
    }
    json g = {{"method", first.at("method")},
              {"model", models.empty() ? json(nullptr) : json(models.front())},
              {"models", models},
              {"tasks", tasks},
              {"score_metric", first.value("score_metric", json::object())},
              {"seeds", seeds},
              {"runs", idx.size()},
              {"config_hashes", hashes}};
    for (const char* k : {"ACC", "BWT", "FWT", "F"}) g[k] = eval::spread(headline[k]);
    json f = json::object();
    for (size_t j = 0; j + 1 < tasks.size(); ++j) f[tasks[j]] = eval::spread(forgetting[tasks[j]]);
    g["forgetting"] = f;
    auto [mean, sd] = matrix_spread(Rs);
    g["R_mean"] = mean;
    g["R_std"] = sd;
    if (!retention.empty()) {
      auto [rm, rs] = matrix_spread(retention);
      g["general_retention"] = {{"mean", rm[0]}, {"std", rs[0]}, {"runs", retention.size()}};
    }
    methods[key] = g;
  }
  return {{"methods", methods}, {"order", order}};
}

namespace {

// ---- report sections ----------------------------------------------------------------------------------

struct Group {
  std::string key;
  std::vector<const RunInput*> runs;  // sorted by seed
  json summary;                       // summarize_runs' entry
};

// "lora: seeds 0, 1 (model smollm2-135m-instruct; config hashes ab12.., cd34..)"
std::string group_source(const Group& g) {
  std::vector<std::string> seeds;
  for (const auto& s : g.summary["seeds"]) seeds.push_back(std::to_string(s.get<int64_t>()));
  std::vector<std::string> models, hashes;
  for (const auto& m : g.summary["models"]) models.push_back(m.get<std::string>());
  for (const auto& h : g.summary["config_hashes"]) hashes.push_back(h.get<std::string>());
  return g.key + ": seed" + (seeds.size() > 1 ? "s " : " ") + join(seeds, ", ") + " (model " +
         (models.empty() ? "not recorded" : join(models, ", ")) + "; config hash" + (hashes.size() > 1 ? "es " : " ") +
         (hashes.empty() ? "not recorded" : join(hashes, ", ")) + ")";
}
std::string sources(const std::vector<const Group*>& groups) {
  std::vector<std::string> parts;
  for (const auto* g : groups) parts.push_back(group_source(*g));
  return "From: " + join(parts, "; ") + ".";
}

void section_runs(Document& doc, const Inputs& in) {
  doc.heading(2, "Inputs");
  Table t{{"method", "seed", "model", "config hash", "tasks", "directory"}, {}};
  for (const auto& r : in.runs) {
    std::vector<std::string> tasks = r.metrics["tasks"].get<std::vector<std::string>>();
    t.rows.push_back({r.metrics["method"].get<std::string>(), std::to_string(r.metrics["seed"].get<int64_t>()),
                      run_model(r.metrics).empty() ? "n/a" : run_model(r.metrics),
                      run_config_hash(r.metrics).empty() ? "n/a" : run_config_hash(r.metrics), join(tasks, " -> "),
                      r.dir.string()});
  }
  if (!t.rows.empty()) doc.table(t);
  else doc.note("No run directory (metrics.json) among the inputs: the continual-learning sections are omitted.");
  for (const auto& s : in.sweeps) {
    std::string line = "Sweep " + s.dir.string();
    const std::string h = run_config_hash(s.sweep);
    if (!h.empty()) line += " (config hash " + h + ")";
    doc.text(line + ".");
  }
  for (const auto& p : in.probes) doc.text("Probe output " + p.file.string() + ".");
  for (const auto& n : in.notes) doc.note(n);
}

void section_cl_metrics(Document& doc, const std::vector<Group>& groups) {
  doc.heading(2, "Continual-learning metrics");
  std::vector<const Group*> all;
  for (const auto& g : groups) all.push_back(&g);
  doc.text(sources(all));
  doc.text("ACC = mean final score over the tasks; BWT = mean over tasks j < T of R[T][j] - R[j][j]; FWT = mean over "
           "j > 1 of R[j-1][j] - R[0][j]; F = mean over j < T of f_j = max over rows l = j..T-1 of R[l][j] - R[T][j] "
           "(only rows after task j was learned). All computed from each run's R by eval::cl_metrics; mean ± sample "
           "std over seeds (n = runs with a value). Scores of different tasks are in their own units (score_metric).");
  const std::vector<std::string> names = {"ACC", "BWT", "FWT", "F"};
  Table t{{"method", "runs", "ACC", "BWT", "FWT", "F"}, {}};
  std::vector<std::vector<double>> mean(names.size()), err(names.size());
  std::vector<std::string> series;
  for (const auto& g : groups) {
    std::vector<std::string> row = {g.key, std::to_string(g.summary["runs"].get<int64_t>())};
    for (size_t k = 0; k < names.size(); ++k) {
      const json& s = g.summary[names[k]];
      row.push_back(format_spread(s) + (s["n"].get<int64_t>() > 1 ? " (n=" + std::to_string(s["n"].get<int64_t>()) + ")" : ""));
      mean[k].push_back(number(s["mean"]));
      err[k].push_back(number(s["std"]));
    }
    t.rows.push_back(row);
    series.push_back(g.key);
  }
  doc.figure({"cl_metrics", bar_chart_svg("ACC / BWT / FWT / F per method (mean ± std over seeds)", names, series, mean, err),
              "ACC, BWT, FWT and F per method; bars are means over seeds, error bars one sample std."});
  doc.table(t);

  // Forgetting per task: one table per distinct task sequence (groups with the same tasks share it).
  std::vector<std::vector<std::string>> sequences;
  for (const auto& g : groups) {
    const auto tasks = g.summary["tasks"].get<std::vector<std::string>>();
    if (tasks.size() > 1 && std::find(sequences.begin(), sequences.end(), tasks) == sequences.end()) sequences.push_back(tasks);
  }
  if (!sequences.empty()) doc.heading(3, "Forgetting per task");
  for (const auto& tasks : sequences) {
    Table f{{"method"}, {}};
    for (size_t j = 0; j + 1 < tasks.size(); ++j) f.header.push_back("f(" + tasks[j] + ")");
    for (const auto& g : groups) {
      if (g.summary["tasks"].get<std::vector<std::string>>() != tasks) continue;
      std::vector<std::string> row = {g.key};
      for (size_t j = 0; j + 1 < tasks.size(); ++j) row.push_back(format_spread(g.summary["forgetting"][tasks[j]]));
      f.rows.push_back(row);
    }
    doc.table(f);
  }
}

void section_r_matrix(Document& doc, const std::vector<Group>& groups) {
  doc.heading(2, "Score matrix R per method");
  doc.text("R[i][j] = score on task j after stage i (row 0 = the base model), mean ± std over seeds. Colours are "
           "scaled per column: the tasks' metrics have different units. n/a = not scored in any run.");
  for (const auto& g : groups) {
    doc.heading(3, g.key);
    doc.text(sources({&g}));
    const auto tasks = g.summary["tasks"].get<std::vector<std::string>>();
    const json& metric = g.summary["score_metric"];
    std::vector<std::string> cols, rows;
    for (const auto& t : tasks) cols.push_back(metric.is_object() && metric.contains(t) ? t + " (" + string_at(metric, t.c_str()) + ")" : t);
    std::vector<std::vector<double>> values;
    Table tab{{"after stage"}, {}};
    for (const auto& c : cols) tab.header.push_back(c);
    for (size_t i = 0; i < g.summary["R_mean"].size(); ++i) {
      rows.push_back(row_label(i, tasks));
      values.push_back(number_list(g.summary["R_mean"][i]));
      std::vector<std::string> row = {rows.back()};
      for (size_t j = 0; j < tasks.size(); ++j) {
        const double m = number(g.summary["R_mean"][i][j]), s = number(g.summary["R_std"][i][j]);
        row.push_back(!std::isfinite(m) ? "n/a" : g.runs.size() > 1 ? format(m) + " ± " + format(s) : format(m));
      }
      tab.rows.push_back(row);
    }
    doc.figure({"R_" + g.key, heatmap_svg("R: " + g.key, rows, cols, values, /*per_column=*/true),
                "Score matrix R of " + g.key + " (mean over seeds; colour per column)."});
    doc.table(tab);
  }

  // Held-out loss, when the runs recorded it (same shape as R).
  bool any_loss = false;
  for (const auto& g : groups)
    for (const auto* r : g.runs) any_loss |= r->metrics.contains("heldout_loss") && r->metrics["heldout_loss"].is_array();
  if (!any_loss) {
    doc.note("No run recorded heldout_loss: the held-out loss matrices are omitted.");
    return;
  }
  doc.heading(3, "Held-out loss per stage");
  doc.text("Held-out next-token loss on each domain's held-out file after each stage (lower is better), mean over seeds.");
  for (const auto& g : groups) {
    std::vector<std::vector<std::vector<double>>> mats;
    for (const auto* r : g.runs)
      if (r->metrics.contains("heldout_loss") && r->metrics["heldout_loss"].is_array())
        mats.push_back(eval::matrix_from_json(r->metrics["heldout_loss"], r->dir.string() + ": heldout_loss"));
    if (mats.empty()) {
      doc.note(g.key + ": no heldout_loss recorded.");
      continue;
    }
    const auto tasks = g.summary["tasks"].get<std::vector<std::string>>();
    auto [mean, sd] = matrix_spread(mats);
    Table tab{{g.key + " (" + std::to_string(mats.size()) + " runs)"}, {}};
    for (const auto& t : tasks) tab.header.push_back(t);
    for (size_t i = 0; i < mean.size(); ++i) {
      std::vector<std::string> row = {row_label(i, tasks)};
      for (size_t j = 0; j < mean[i].size(); ++j) {
        const double m = number(mean[i][j]);
        row.push_back(!std::isfinite(m) ? "n/a" : mats.size() > 1 ? format(m) + " ± " + format(number(sd[i][j])) : format(m));
      }
      tab.rows.push_back(row);
    }
    doc.table(tab);
  }
}

void section_general(Document& doc, const std::vector<Group>& groups) {
  doc.heading(2, "General-capability retention");
  std::vector<const Group*> with;
  for (const auto& g : groups)
    for (const auto* r : g.runs)
      if (r->metrics.contains("general") && r->metrics["general"].is_object() && r->metrics["general"].contains("scores")) {
        with.push_back(&g);
        break;
      }
  if (with.empty()) {
    doc.note("No run recorded general (data.general.probe scores): this section is omitted.");
    return;
  }
  doc.text(sources(with));
  std::string metric;
  std::vector<Series> series;
  std::vector<std::string> x_ticks;
  Table tab{{"method", "quantity"}, {}};
  size_t max_rows = 0;
  for (const auto* g : with) {
    const auto tasks = g->summary["tasks"].get<std::vector<std::string>>();
    std::vector<std::vector<std::vector<double>>> scores, retention;
    for (const auto* r : g->runs) {
      const json& gen = r->metrics.value("general", json::object());
      if (!gen.is_object()) continue;
      if (metric.empty()) metric = string_at(gen, "metric");
      if (gen.contains("scores")) scores.push_back({number_list(gen["scores"])});
      if (gen.contains("retention")) retention.push_back({number_list(gen["retention"])});
    }
    auto [sm, ss] = matrix_spread(scores);
    auto [rm, rs] = matrix_spread(retention);
    const json& smean = sm.empty() ? json::array() : sm[0];
    const json& rmean = rm.empty() ? json::array() : rm[0];
    max_rows = std::max({max_rows, smean.size(), rmean.size()});
    if (x_ticks.size() < tasks.size() + 1) {
      x_ticks.clear();
      for (size_t i = 0; i <= tasks.size(); ++i) x_ticks.push_back(row_label(i, tasks));
    }
    Series s{g->key, {}, {}, {}, {}, {}};
    const json& plotted = rmean.empty() ? smean : rmean;
    for (size_t i = 0; i < plotted.size(); ++i) {
      s.x.push_back(static_cast<double>(i));
      s.y.push_back(number(plotted[i]));
    }
    series.push_back(s);
    const auto add_row = [&](const std::string& what, const json& mean, const json& sd, size_t n) {
      if (mean.empty()) return;
      std::vector<std::string> row = {g->key, what + " (" + std::to_string(n) + " runs)"};
      for (size_t i = 0; i < mean.size(); ++i)
        row.push_back(n > 1 ? format(number(mean[i])) + " ± " + format(number(sd[i])) : format(number(mean[i])));
      tab.rows.push_back(row);
    };
    add_row("score", smean, ss.empty() ? json::array() : ss[0], scores.size());
    add_row("retention", rmean, rs.empty() ? json::array() : rs[0], retention.size());
  }
  for (size_t i = 0; i < max_rows; ++i) tab.header.push_back(i < x_ticks.size() ? x_ticks[i] : "row " + std::to_string(i));
  for (auto& row : tab.rows) row.resize(tab.header.size());
  doc.text("Score on the general-knowledge probe set (" + (metric.empty() ? std::string("metric not recorded") : metric) +
           ") after each stage, and retention = score / base score as the runs recorded it.");
  doc.figure({"general_retention",
              line_chart_svg("General retention per stage", "after stage", "retention (or score)", series, x_ticks),
              "General-capability retention per method (mean over seeds; the score where a run recorded no retention)."});
  doc.table(tab);
}

// drift entries of one run: row -> layers array ({"layer","cka",...}); accepts {"layers": [...]} or
// {"layers": {"layers": [...]}} (eval::drift's whole result stored under "layers").
std::map<int64_t, json> run_drift(const json& m, const std::vector<std::string>& tasks) {
  std::map<int64_t, json> out;
  if (!m.contains("drift") || !m["drift"].is_array()) return out;
  for (const auto& e : m["drift"]) {
    if (!e.is_object()) continue;
    int64_t row = e.contains("row") && e["row"].is_number_integer() ? e["row"].get<int64_t>() : -1;
    if (row < 0 && e.contains("stage"))
      for (size_t j = 0; j < tasks.size(); ++j)
        if (tasks[j] == string_at(e, "stage")) row = static_cast<int64_t>(j) + 1;
    if (row < 0 || !e.contains("layers")) continue;
    const json& l = e["layers"];
    if (l.is_array()) out[row] = l;
    else if (l.is_object() && l.contains("layers") && l["layers"].is_array()) out[row] = l["layers"];
  }
  return out;
}

void section_drift(Document& doc, const std::vector<Group>& groups) {
  doc.heading(2, "Representation drift");
  std::vector<const Group*> with;
  for (const auto& g : groups)
    for (const auto* r : g.runs)
      if (!run_drift(r->metrics, g.summary["tasks"].get<std::vector<std::string>>()).empty()) {
        with.push_back(&g);
        break;
      }
  if (with.empty()) {
    doc.note("No run recorded drift: the representation-drift section is omitted.");
    return;
  }
  doc.text(sources(with));
  doc.text("Hidden states of the general-knowledge probe set, base model vs after each stage, per hidden-state index "
           "(0 = embeddings): linear CKA, mean cos^2 of the principal angles between the 90%-energy PCA subspaces, and "
           "the share of the displacement inside the base model's subspace (docs/report.md). Means over seeds.");
  Table summary{{"method", "after stage", "runs", "mean CKA", "mean subspace similarity", "mean inside share"}, {}};
  // Per group: row -> layer -> {cka, sim, share} value lists over runs.
  struct Acc {
    std::vector<double> cka, sim, share;
  };
  std::vector<std::pair<const Group*, std::map<int64_t, std::map<int64_t, Acc>>>> per_group;
  for (const auto* g : with) {
    const auto tasks = g->summary["tasks"].get<std::vector<std::string>>();
    std::map<int64_t, std::map<int64_t, Acc>> acc;
    std::map<int64_t, int64_t> runs_per_row;
    for (const auto* r : g->runs)
      for (const auto& [row, layers] : run_drift(r->metrics, tasks)) {
        ++runs_per_row[row];
        for (size_t i = 0; i < layers.size(); ++i) {
          const json& l = layers[i];
          const int64_t index = l.contains("layer") && l["layer"].is_number_integer() ? l["layer"].get<int64_t>()
                                                                                     : static_cast<int64_t>(i);
          auto& a = acc[row][index];
          a.cka.push_back(number_at(l, "cka"));
          a.sim.push_back(number_at(l, "subspace_similarity"));
          a.share.push_back(number_at(l, "inside_share"));
        }
      }
    // Line chart: CKA per layer, one line per stage.
    std::vector<Series> series;
    Table tab{{"layer"}, {}};
    std::set<int64_t> all_layers;
    for (const auto& [row, layers] : acc) {
      Series s{row_label(static_cast<size_t>(row), tasks), {}, {}, {}, {}, {}};
      tab.header.push_back("CKA " + s.name);
      std::vector<double> c, m, sh;
      for (const auto& [index, a] : layers) {
        s.x.push_back(static_cast<double>(index));
        s.y.push_back(number(eval::spread(a.cka)["mean"]));
        all_layers.insert(index);
        c.push_back(s.y.back());
        m.push_back(number(eval::spread(a.sim)["mean"]));
        sh.push_back(number(eval::spread(a.share)["mean"]));
      }
      series.push_back(s);
      summary.rows.push_back({g->key, row_label(static_cast<size_t>(row), tasks), std::to_string(runs_per_row[row]),
                              format(number(eval::spread(c)["mean"])), format(number(eval::spread(m)["mean"])),
                              format(number(eval::spread(sh)["mean"]))});
    }
    for (int64_t index : all_layers) {
      std::vector<std::string> row = {std::to_string(index)};
      for (const auto& [r, layers] : acc) {
        const auto it = layers.find(index);
        row.push_back(it == layers.end() ? "n/a" : format(number(eval::spread(it->second.cka)["mean"])));
      }
      tab.rows.push_back(row);
    }
    doc.heading(3, g->key);
    doc.figure({"drift_" + g->key, line_chart_svg("CKA to the base model per layer: " + g->key, "hidden-state index",
                                                  "linear CKA", series),
                "Linear CKA between the base model's and the tuned model's probe-set hidden states, per layer, after "
                "each stage (" + g->key + ", mean over seeds)."});
    doc.table(tab);
    per_group.emplace_back(g, std::move(acc));
  }
  // The methods side by side after their last recorded stage.
  if (per_group.size() > 1) {
    std::vector<Series> series;
    for (const auto& [g, acc] : per_group) {
      const auto& [row, layers] = *acc.rbegin();
      Series s{g->key + " (" + row_label(static_cast<size_t>(row), g->summary["tasks"].get<std::vector<std::string>>()) + ")",
               {}, {}, {}, {}, {}};
      for (const auto& [index, a] : layers) {
        s.x.push_back(static_cast<double>(index));
        s.y.push_back(number(eval::spread(a.cka)["mean"]));
      }
      series.push_back(s);
    }
    doc.heading(3, "Methods compared after the last stage");
    doc.figure({"drift_methods", line_chart_svg("CKA to the base model after the last stage", "hidden-state index",
                                                "linear CKA", series),
                "Per-layer CKA to the base model after each method's last recorded stage (mean over seeds)."});
  }
  doc.heading(3, "Drift summary");
  doc.table(summary);
}

void section_stages(Document& doc, const std::vector<Group>& groups) {
  Table tab{{"method", "stage", "runs", "seconds", "tokens/s", "train loss"}, {}};
  for (const auto& g : groups) {
    std::map<int64_t, std::pair<std::string, std::array<std::vector<double>, 3>>> rows;
    for (const auto* r : g.runs) {
      if (!r->metrics.contains("stages") || !r->metrics["stages"].is_array()) continue;
      for (const auto& s : r->metrics["stages"]) {
        if (!s.is_object()) continue;
        const int64_t row = s.contains("row") && s["row"].is_number_integer() ? s["row"].get<int64_t>() : 0;
        auto& e = rows[row];
        e.first = string_at(s, "stage", "row " + std::to_string(row));
        e.second[0].push_back(number_at(s, "seconds"));
        e.second[1].push_back(number_at(s, "tokens_per_s"));
        e.second[2].push_back(number_at(s, "train_loss"));
      }
    }
    for (const auto& [row, e] : rows)
      tab.rows.push_back({g.key, e.first, std::to_string(e.second[0].size()), format_spread(eval::spread(e.second[0]), 1),
                          format_spread(eval::spread(e.second[1]), 1), format_spread(eval::spread(e.second[2]))});
  }
  doc.heading(2, "Training stages");
  if (tab.rows.empty()) {
    doc.note("No run recorded stages (time, throughput, training loss): this table is omitted.");
    return;
  }
  doc.text("Wall time, throughput and final training loss per stage, mean ± std over seeds.");
  doc.table(tab);
}

// ---- probe ----------------------------------------------------------------------------------------------

struct ProbeModel {
  std::string file, model, config_hash;
  json entry;  // one element of probe.json "models" (or a synthesised one from the top-level layers)
};

std::vector<ProbeModel> probe_models(const ProbeInput& p) {
  std::vector<ProbeModel> out;
  const json& prov = p.probe.value("provenance", json::object());
  const std::string hash = string_at(prov, "config_hash");
  if (p.probe.contains("models") && p.probe["models"].is_array() && !p.probe["models"].empty()) {
    for (const auto& m : p.probe["models"])
      if (m.is_object()) out.push_back({p.file.string(), string_at(m, "model", string_at(prov, "model", "?")), hash, m});
  } else if (p.probe.contains("layers") && p.probe["layers"].is_array()) {
    out.push_back({p.file.string(), string_at(prov, "model", "?"), hash, {{"layers", p.probe["layers"]}}});
  }
  return out;
}

void section_probe(Document& doc, const Inputs& in) {
  doc.heading(2, "Domain overlap of MLP neurons (probe)");
  if (in.probes.empty()) {
    doc.note("No probe.json among the inputs (looked for probe.json and probe/probe.json in every input directory): the "
             "IoU heatmaps and the scale plot are omitted.");
    return;
  }
  doc.text("Per layer and domain pair: IoU of the domains' top-K neuron sets and its ratio to the random expectation "
           "K/(2I-K) (1 = chance, < 1 = the domains avoid each other's neurons); p = one-sided permutation p-value for "
           "low overlap (docs/probe.md).");
  std::vector<ProbeModel> scale;
  for (const auto& p : in.probes) {
    for (const auto& pm : probe_models(p)) {
      const json& layers = pm.entry.value("layers", json::array());
      doc.heading(3, model_name(pm.model));
      const json& prov = p.probe.value("provenance", json::object());
      const std::string seed = string_at(prov, "seed", "not recorded");
      doc.text("From: " + pm.file + " (model " + pm.model + "; config hash " +
               (pm.config_hash.empty() ? "not recorded" : pm.config_hash) + "; seed " + seed + ").");
      if (!layers.is_array() || layers.empty()) {
        doc.note("This probe output has no per-layer results.");
        continue;
      }
      std::vector<std::string> pairs;
      for (const auto& l : layers)
        for (const auto& pr : l.value("pairs", json::array())) {
          const std::string name = string_at(pr, "a") + "-" + string_at(pr, "b");
          if (std::find(pairs.begin(), pairs.end(), name) == pairs.end()) pairs.push_back(name);
        }
      std::vector<std::string> rows;
      std::vector<std::vector<double>> ratio;
      Table tab{{"layer"}, {}};
      for (const auto& pn : pairs) tab.header.push_back(pn + ": ratio (IoU, p)");
      tab.header.push_back("mean ratio");
      for (size_t i = 0; i < layers.size(); ++i) {
        const json& l = layers[i];
        const std::string label = "layer " + string_at(l, "layer", std::to_string(i));
        rows.push_back(label);
        std::vector<double> r(pairs.size(), kNaN);
        std::vector<std::string> cells(pairs.size(), "n/a");
        for (const auto& pr : l.value("pairs", json::array())) {
          const auto at = std::find(pairs.begin(), pairs.end(), string_at(pr, "a") + "-" + string_at(pr, "b")) - pairs.begin();
          r[at] = number_at(pr, "ratio");
          cells[at] = format(r[at], 2) + " (" + format(number_at(pr, "iou")) + ", " + format(number_at(pr, "p_value")) + ")";
        }
        ratio.push_back(r);
        std::vector<std::string> row = {label};
        row.insert(row.end(), cells.begin(), cells.end());
        row.push_back(format(number_at(l, "mean_ratio"), 2));
        tab.rows.push_back(row);
      }
      doc.figure({"iou_" + model_name(pm.model),
                  heatmap_svg("IoU / random IoU: " + model_name(pm.model), rows, pairs, ratio, /*per_column=*/false, 2),
                  "Normalised overlap (IoU of the top-K neuron sets divided by its random expectation) per layer and "
                  "domain pair, " + pm.model + "."});
      doc.table(tab);
      scale.push_back(pm);
    }
  }

  doc.heading(3, "Normalised overlap against model size");
  Table tab{{"model", "hidden size", "intermediate size", "layers", "params", "K", "mean IoU", "mean ratio",
             "min ratio", "max ratio", "pairs p <= 0.05", "source"}, {}};
  Series s{"mean ratio (min..max over layers and pairs)", {}, {}, {}, {}, {}};
  std::vector<std::tuple<double, double, double, double, std::string>> points;
  for (const auto& pm : scale) {
    const json& e = pm.entry;
    const double hidden = number_at(e, "hidden_size");
    tab.rows.push_back({pm.model, format(hidden, 0), format(number_at(e, "intermediate_size"), 0),
                        format(number_at(e, "num_layers"), 0), format(number_at(e, "params"), 0),
                        format(number_at(e, "K"), 0), format(number_at(e, "mean_iou")), format(number_at(e, "mean_ratio"), 2),
                        format(number_at(e, "min_ratio"), 2), format(number_at(e, "max_ratio"), 2),
                        e.contains("pairs_p_le_0.05") ? string_at(e, "pairs_p_le_0.05") + " / " + string_at(e, "pairs_total")
                                                      : "n/a",
                        pm.file});
    if (std::isfinite(hidden) && std::isfinite(number_at(e, "mean_ratio")))
      points.emplace_back(hidden, number_at(e, "mean_ratio"), number_at(e, "min_ratio"), number_at(e, "max_ratio"),
                          model_name(pm.model));
  }
  std::sort(points.begin(), points.end());
  for (const auto& [h, m, lo, hi, name] : points) {
    s.x.push_back(h);
    s.y.push_back(m);
    s.y_lo.push_back(lo);
    s.y_hi.push_back(hi);
    s.labels.push_back(name);
  }
  std::set<double> sizes;
  for (const auto& pt : points) sizes.insert(std::get<0>(pt));
  if (sizes.size() >= 2)
    doc.figure({"scale", line_chart_svg("Normalised IoU vs hidden size", "hidden size (log scale)", "IoU / random IoU", {s}, {}, true),
                "Mean normalised overlap (IoU / random IoU) per model against its hidden size; whiskers span the "
                "smallest to the largest layer-pair ratio."});
  else
    doc.note("The probe outputs cover " + std::to_string(sizes.size()) + " model size" + (sizes.size() == 1 ? "" : "s") +
             " with a hidden size recorded: the scale plot needs at least two.");
  doc.table(tab);
}

}  // namespace

void write_report(const std::vector<fs::path>& inputs, const fs::path& out_dir) {
  if (inputs.empty()) throw Error("report: no input directory given");
  const Inputs in = collect_inputs(inputs);

  // Group runs (summarize_runs decides the keys and validates task lists).
  std::vector<json> metrics;
  for (const auto& r : in.runs) metrics.push_back(r.metrics);
  std::vector<Group> groups;
  std::vector<std::string> notes;
  if (!metrics.empty()) {
    const json summary = summarize_runs(metrics);
    const auto keys = group_keys(metrics);
    for (const auto& key : summary["order"]) {
      Group g{key.get<std::string>(), {}, summary["methods"][key.get<std::string>()]};
      for (size_t i = 0; i < in.runs.size(); ++i)
        if (keys[i] == g.key) g.runs.push_back(&in.runs[i]);
      std::stable_sort(g.runs.begin(), g.runs.end(), [](const RunInput* a, const RunInput* b) {
        return a->metrics["seed"].get<int64_t>() < b->metrics["seed"].get<int64_t>();
      });
      std::map<int64_t, std::string> seen;
      for (const auto* r : g.runs) {
        const int64_t seed = r->metrics["seed"].get<int64_t>();
        if (seen.count(seed))
          notes.push_back(g.key + " seed " + std::to_string(seed) + " appears twice (" + seen[seed] + " and " +
                          r->dir.string() + "); both are counted.");
        seen[seed] = r->dir.string();
        // The run's own headline numbers, when present, must agree with R.
        const json cl = eval::cl_metrics(eval::matrix_from_json(r->metrics["R"], "R"),
                                         r->metrics["tasks"].get<std::vector<std::string>>());
        for (const char* k : {"ACC", "BWT", "FWT", "F"})
          if (r->metrics.contains(k)) {
            const double own = number(r->metrics[k]), ours = number(cl[k]);
            if (std::isfinite(own) != std::isfinite(ours) || (std::isfinite(own) && std::fabs(own - ours) > 1e-6))
              notes.push_back(r->dir.string() + ": its metrics.json says " + k + " = " + format(own, 6) +
                              ", its R gives " + format(ours, 6) + "; the report uses the value from R.");
          }
      }
      groups.push_back(std::move(g));
    }
  }

  Document doc;
  doc.heading(1, "sparsecl report");
  doc.text("Generated by sparsecl " SPARSECL_VERSION " from " + std::to_string(inputs.size()) + " input director" +
           (inputs.size() == 1 ? "y" : "ies") + ": " + std::to_string(in.runs.size()) + " run(s), " +
           std::to_string(in.probes.size()) + " probe output(s). Definitions: docs/report.md.");
  section_runs(doc, in);
  for (const auto& n : notes) doc.note(n);
  if (!groups.empty()) {
    section_cl_metrics(doc, groups);
    section_r_matrix(doc, groups);
    section_general(doc, groups);
    section_drift(doc, groups);
    section_stages(doc, groups);
  }
  section_probe(doc, in);

  fs::create_directories(out_dir / "figures");
  for (const auto& b : doc.blocks())
    if (b.kind == Block::Kind::Figure)
      write_file_atomic(out_dir / "figures" / (b.figure.name + ".svg"),
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n" + b.figure.svg + "\n");
  write_file_atomic(out_dir / "report.md", doc.markdown());
  write_file_atomic(out_dir / "report.html", doc.html());
  log::info("report: wrote ", (out_dir / "report.md").string(), " and ", (out_dir / "report.html").string(), " (",
            in.runs.size(), " runs, ", in.probes.size(), " probe outputs)");
}

}  // namespace sparsecl::report
