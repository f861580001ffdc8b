#!/usr/bin/env bash
# Set up Dapple in a virtual environment with the torch build this machine can use.
#
#   scripts/install.sh [--cpu | --cuda] [--dev] [--venv DIR] [--plan]
#
# torch==2.13.0 on PyPI is, for Linux x86_64, the CUDA build: torch plus ~15 nvidia-* packages, several GB of
# wheels and a ~5 GB environment. A machine without an NVIDIA GPU needs none of it. So torch is installed first,
# on its own, from the build chosen here, and Dapple after it, pinned to that torch by constraints.txt:
#   --cpu   the CPU build (~190 MB wheel): a torch 2.13.0 CPU wheel that pip already finds locally (a wheel folder
#           in pip's config, as on our machines), else PyTorch's CPU index, https://download.pytorch.org/whl/cpu
#   --cuda  PyPI's default build (CUDA); the machine needs an NVIDIA driver
#   neither: --cuda when `nvidia-smi` finds a GPU, else --cpu
# --dev adds the test extras; --plan prints the choice and the pip commands without running them.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH="torch==2.13.0"  # keep equal to constraints.txt
CPU_INDEX="https://download.pytorch.org/whl/cpu"
build="" extras="" venv=".venv" plan=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) build=cpu ;;
    --cuda) build=cuda ;;
    --dev) extras="[dev]" ;;
    --venv) venv="$2"; shift ;;
    --plan) plan=1 ;;
    *) echo "error: unknown option '$1'; allowed: --cpu, --cuda, --dev, --venv DIR, --plan" >&2; exit 2 ;;
  esac
  shift
done
asked="$build"
if [[ -z "$build" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then build=cuda; else build=cpu; fi
fi

pip="$venv/bin/pip"
run() { if [[ $plan -eq 1 ]]; then echo "$*"; else "$@"; fi; }
echo "installing Dapple with the $build build of $TORCH into $venv" >&2
[[ -x "$pip" ]] || run python3 -m venv "$venv"
if [[ $build == cpu ]]; then
  # A local CPU wheel first (no network), PyTorch's CPU index otherwise.
  if [[ $plan -eq 1 ]]; then
    echo "$pip install --no-index $TORCH  ||  $pip install --index-url $CPU_INDEX $TORCH"
  elif ! "$pip" install -q --no-index "$TORCH" 2>/dev/null; then
    if ! "$pip" install -q --index-url "$CPU_INDEX" "$TORCH"; then
      if [[ $asked == cpu ]]; then
        echo "error: no CPU build of $TORCH: none in pip's local wheel folders and $CPU_INDEX unreachable;" \
             "put the wheel in a folder pip finds (PIP_FIND_LINKS) or use --cuda" >&2
        exit 2
      fi
      echo "warning: $CPU_INDEX is unreachable; installing PyPI's default torch build instead (CUDA on" \
           "Linux x86_64: several GB more to download; it runs on the CPU too)" >&2
      build=pypi
      "$pip" install -q "$TORCH"
    fi
  fi
else
  run "$pip" install -q "$TORCH"
fi
run "$pip" install -q -c constraints.txt -e ".$extras"
if [[ $plan -eq 0 ]]; then
  # Say what was installed, and refuse a CUDA build where the CPU one was asked for.
  "$venv/bin/python" - "$build" <<'EOF'
import sys
import torch
cuda = torch.version.cuda
print(f"torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU'} build)", file=sys.stderr)
if sys.argv[1] == "cpu" and cuda:
    sys.exit("error: a CUDA build of torch was installed where the CPU build was asked for; "
             "remove the environment and run scripts/install.sh --cpu again")
EOF
  echo "environment size: $(du -sh "$venv" | cut -f1)" >&2
fi
