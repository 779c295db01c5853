# Source on the GPU machine (see ../shared/gpu/README.md): installs the carried wheels once per warm machine and
# points slmembed at the staged data and a model cache in /tmp.
set -e
if [ -f /tmp/stage/join.sh ] && [ ! -d /tmp/site/gguf ]; then
  bash /tmp/stage/join.sh /tmp/stage /tmp/wheels >/dev/null
  python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/wheels/*.whl
fi
export PYTHONPATH=$PWD/src:/tmp/site SLMEMBED_DATA=/tmp/data SLMEMBED_CACHE=/tmp/cache PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1
set +e
