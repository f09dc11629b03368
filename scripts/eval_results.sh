#!/usr/bin/env bash
# The runs behind docs/results.md: JSON and markdown tables into docs/results/<run>/, plots into docs/img/.
# Needs ../shared (CIFAR-10 test and training images, the pretrained ResNet-20) and Debian's dataset-fashion-mnist.
# Usage: scripts/eval_results.sh [run name...]   (all runs by default)
# Corrupted sets and T3 experts are cached in ~/.cache/ttaserve (TTASERVE_CACHE to move it).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
# With run names as arguments (continual protocols sweep t3 cifar10c unmix-exact fashion), only those run.
selected=" $* "
run() {  # run <name> <ttaserve eval arguments...>
  local name=$1
  shift
  if [[ "$selected" != "  " && "$selected" != *" $name "* ]]; then return 0; fi
  echo "== $name: ttaserve eval $*"
  /usr/bin/time -f "$name: %e s wall" ttaserve eval "$@" --out "docs/results/$name" --plot-dir docs/img \
    --plot-prefix "$name-" --no-progress >/dev/null
}
# The field's standard, in full (10,000 images x 15 corruptions), through a local server over gRPC.
run continual --serve --protocol continual --smooth 5
# The other protocols on 2,000 images per corruption (the same class-balanced subset for every corruption).
run protocols --protocol reset --protocol dirichlet --protocol sorted --protocol mixed --images-per-domain 2000 --smooth 3
# Batch-size sweep on 1,000 images per corruption.
run sweep --protocol sweep --images-per-domain 1000
# T3: experts fine-tuned on the noise and the digital family, mixed streams of clean + family images.
run t3 --protocol t3 --t3-families noise,digital --images-per-domain 1000
# CIFAR-10-C's own (milder) constants, for the five corruptions whose constants are documented, in full.
run cifar10c --protocol continual --constants cifar10c --corruptions gaussian_noise,brightness,contrast,pixelate,jpeg_compression --smooth 5
# UnMix-TNS with exact_init (not the paper) beside the paper's initialisation, on the protocols above.
run unmix-exact --protocol reset --protocol dirichlet --protocol sorted --protocol mixed --images-per-domain 2000 \
  --strategies none,unmix_tns,unmix_exact=unmix_tns --set unmix_exact.exact_init=true --smooth 3
# Fashion-MNIST and the embedded default model, 1,000 images per corruption.
run fashion --data fashion-mnist --protocol continual --protocol sorted --images-per-domain 1000
