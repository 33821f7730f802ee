#!/usr/bin/env bash
# Download the public raw datasets sparsecl uses, then build data/ from them.
#
# For users on a networked machine (this project's own machines have no network; there the raw files
# come from ../shared/data/raw). Files land in RAW_DIR, outside the repo, in the layout of
# ../shared/data/raw (MBPP, AlpacaEval, ARC and MMLU in their publishers' forms, which
# scripts/prepare_data.py reads as well), and prepare_data.py then writes the full data/. Sources are the datasets' own GitHub releases where they have
# one and the Hugging Face hub otherwise; see data/README.md for licences.
#
# Usage: scripts/fetch_data.sh [RAW_DIR] [-- extra prepare_data.py options, e.g. --output data-full]
#   RAW_DIR defaults to ../shared/data/raw-fetched beside the repo.
# Needs: curl (or wget), tar, python3; pyarrow (pip install pyarrow) for the ARC parquet file.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
raw="${1:-$repo/../shared/data/raw-fetched}"
[[ $# -gt 0 ]] && shift
[[ "${1:-}" == "--" ]] && shift

get() {  # get URL DEST: download unless DEST exists
  local url="$1" dest="$raw/$2"
  if [[ -s "$dest" ]]; then echo "have $2"; return; fi
  mkdir -p "$(dirname "$dest")"
  echo "fetch $2 <- $url"
  if command -v curl >/dev/null; then
    curl -fsSL --retry 3 -o "$dest.part" "$url"
  else
    wget -q -O "$dest.part" "$url"
  fi
  mv "$dest.part" "$dest"
}

GH=https://raw.githubusercontent.com
HF=https://huggingface.co/datasets

# code
get "$GH/sahil280114/codealpaca/master/data/code_alpaca_2k.json"             code/code_alpaca_2k.json
get "$GH/openai/human-eval/master/data/HumanEval.jsonl.gz"                   code/HumanEval.jsonl.gz
get "$GH/google-research/google-research/master/mbpp/sanitized-mbpp.json"    code/sanitized-mbpp.json
# math
get "$GH/openai/grade-school-math/master/grade_school_math/data/train.jsonl" math/gsm8k_train.jsonl
get "$GH/openai/grade-school-math/master/grade_school_math/data/test.jsonl"  math/gsm8k_test.jsonl
# medical
get "$GH/pubmedqa/pubmedqa/master/data/ori_pqal.json"                        medical/pubmedqa_pqal.json
get "$GH/Kent0n-Li/ChatDoctor/main/chatdoctor5k.json"                        medical/chatdoctor5k.json
# chat
get "$HF/tatsu-lab/alpaca_eval/resolve/main/alpaca_eval.json"                chat/alpaca_eval.json
get "$GH/lm-sys/FastChat/main/fastchat/llm_judge/data/mt_bench/question.jsonl" chat/mt_bench_questions.jsonl
# general
get "$HF/allenai/ai2_arc/resolve/main/ARC-Challenge/test-00000-of-00001.parquet" \
    general/ARC-Challenge/test-00000-of-00001.parquet
if [[ ! -d "$raw/general/mmlu/test" ]]; then
  get "https://people.eecs.berkeley.edu/~hendrycks/data.tar" general/mmlu_data.tar
  mkdir -p "$raw/general/mmlu"
  tar -xf "$raw/general/mmlu_data.tar" -C "$raw/general/mmlu" --strip-components=1 data/dev data/val data/test
  rm -f "$raw/general/mmlu_data.tar"
fi

python3 "$repo/scripts/prepare_data.py" --raw "$raw" "$@"
