# The environment every GPU benchmark script starts from; sourced, not run:
#   source "$(dirname "$0")/gpu_env.sh"
# It moves to the repository root, installs diffusers when it is missing, runs conceptseg from src/
# (nothing else is installed), and sets `device` (DEVICE, default cuda) and `out` (OUT, default
# benchmarks/results, created), then prints the device.
#
# The GPU machine has torch but not diffusers: put diffusers' wheel (pure Python) in wheels/ first
# (`pip download diffusers==0.42.1 --no-deps -d wheels`; another folder: WHEELS). It is installed
# with --no-deps, so torch is left as it is.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! python -c "import diffusers" 2>/dev/null; then
    wheel=$(ls "${WHEELS:-wheels}"/diffusers-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
        echo "diffusers is not installed and ${WHEELS:-wheels}/ holds no diffusers wheel:" \
             "pip download diffusers==0.42.1 --no-deps -d ${WHEELS:-wheels}" >&2
        exit 2
    fi
    pip install --no-deps --quiet "$wheel"
fi

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
device="${DEVICE:-cuda}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '',
      f'{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB' if torch.cuda.is_available() else '')"
