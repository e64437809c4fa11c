#!/usr/bin/env bash
# Install perfcell's build, test and benchmark dependencies from Debian.
# Idempotent: packages already installed are not fetched again.
set -euo pipefail
PKGS=(
  build-essential pkg-config
  libopenmpi-dev openmpi-bin
  libhdf5-openmpi-dev hdf5-tools
  libopenblas-dev libzstd-dev librandom123-dev libiniparser-dev zlib1g-dev
  clang libclang-rt-14-dev valgrind procps util-linux
  python3 python3-numpy python3-scipy python3-h5py python3-anndata python3-sklearn
  python3-matplotlib python3-torch
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all ${#PKGS[@]} packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
echo "deps: done"
