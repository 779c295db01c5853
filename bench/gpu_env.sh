# Source on the GPU machine (see ../shared/gpu/README.md): installs the carried wheels once per warm machine and
# points slmembed at the staged data and a model cache in /tmp. /tmp/site precedes the machine's own packages, so a
# staged transformers wheel (>= 5.18; the machine's 5.17 converts Gemma's GGUF tokenizer into characters) wins.
set -e
if [ -f /tmp/stage/join.sh ] && [ ! -d /tmp/site/gguf ]; then
  bash /tmp/stage/join.sh /tmp/stage /tmp/wheels >/dev/null
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/wheels/*.whl
fi
export PYTHONPATH=$PWD/src:/tmp/site SLMEMBED_DATA=/tmp/data SLMEMBED_CACHE=/tmp/cache PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1
python3 -c "import transformers as t, sys; v = tuple(map(int, t.__version__.split('.')[:2]))
sys.exit(0 if v >= (5, 18) else f'bench/gpu_env.sh: transformers {t.__version__} here; stage transformers>=5.18 in /tmp/wheels')"
set +e
