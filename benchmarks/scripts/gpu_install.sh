# install the checkout on the GPU machine (offline); fall back to a wheel if the editable install fails
python3 -c "import setuptools, pip; print('setuptools', setuptools.__version__, 'pip', pip.__version__)"
if ! pip install --no-deps --no-build-isolation -e . > /tmp/pip.log 2>&1; then
  echo "editable install failed:"; tail -30 /tmp/pip.log
  pip wheel --no-deps --no-build-isolation -w /tmp/wh . > /tmp/pipw.log 2>&1 || tail -30 /tmp/pipw.log
  pip install --no-deps /tmp/wh/*.whl 2>&1 | tail -3
fi
(cd /tmp && python3 -c "import embedattn, embedattn.kernels.attention as k; print('embedattn from', embedattn.__file__, k.__file__)")
