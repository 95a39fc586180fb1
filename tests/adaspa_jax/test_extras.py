"""Optional imports fail with an error naming the extra to install."""

import pytest

from adaspa_jax import checkpoints, extras


def test_require_returns_the_module():
  assert extras.require("json").dumps([1]) == "[1]"


def test_require_names_the_extra():
  with pytest.raises(ImportError, match=r"pip install 'adaspa-jax\[video\]'"):
    extras.require("imageio.not_a_module_anywhere")
  with pytest.raises(ImportError, match=r"adaspa-jax\[train\]"):
    extras.require("no_such_package_xyz", "train")
  with pytest.raises(ImportError, match=r"adaspa-jax\[all\]"):
    extras.require("no_such_package_xyz")


def test_checkpoints_locate():
  assert checkpoints.locate().endswith("tiny_t2v")
  with pytest.raises(ValueError, match="name='nope': expected one of"):
    checkpoints.locate("nope")
