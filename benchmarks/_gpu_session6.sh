set -u
python3 -m pip install --no-deps -q wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
echo "== cc: $(command -v cc gcc | tr '\n' ' ')"; nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch; from altgrad_lightning.functional import _fused_cpu as f; print('C backend:', f.load() is not None, f.unavailable_reason(), f._openmp_runtime())"
timeout 400 python3 -m pytest tests/test_fused.py tests/test_callback.py tests/test_sampling.py tests/test_alerts.py tests/test_quantize.py -p no:cacheprovider -W ignore -x 2>&1 | tail -4
timeout 150 python3 benchmarks/diagnostic_pass.py --no-reference 2>&1 | tail -14
