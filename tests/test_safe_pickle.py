"""The restricted ``.pdparams`` reader: legitimate Paddle state dicts load bit for bit; a pickle
that would run code is refused before anything runs."""
from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys

import numpy as np
import paddle
import pytest

from ernievil2.models import model_config
from ernievil2.models.dual_encoder import build_model
from ernievil2.weights.pdparams import NAME_TABLE_KEY, UNPACK_INFO_KEY, UnsafeCheckpointError, load_pdparams


@pytest.fixture(scope="module")
def tiny_state():
    paddle.seed(0)
    return build_model(model_config("tiny")).state_dict()


@pytest.mark.parametrize("protocol", [4, 2])
def test_paddle_save_loads_identically(tiny_state, tmp_path, protocol):
    path = tmp_path / "model.pdparams"
    paddle.save(tiny_state, str(path), protocol=protocol)
    got = load_pdparams(path)
    ref = paddle.load(str(path), return_numpy=True)
    assert NAME_TABLE_KEY not in got
    assert set(got) == set(ref) == set(tiny_state)
    for k, v in tiny_state.items():
        assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
        assert np.array_equal(got[k], v.numpy()), k


def test_paddle_save_dtypes(tmp_path):
    state = {
        "f16": paddle.to_tensor([1.5, -2.0], dtype="float16"),
        "bf16": paddle.to_tensor([1.5, -2.0], dtype="bfloat16"),
        "i64": paddle.arange(4),
        "scalar": paddle.to_tensor(3.25),
    }
    path = tmp_path / "mixed.pdparams"
    paddle.save(state, str(path))
    got = load_pdparams(path)
    ref = paddle.load(str(path), return_numpy=True)
    for k in state:
        assert got[k].dtype == ref[k].dtype and np.array_equal(got[k], ref[k]), k
    assert got["bf16"].dtype == np.uint16  # Paddle's bfloat16 storage


def test_official_style_pickles(tmp_path):
    """A plain (Ordered)dict of NumPy arrays, any protocol, as the official release ships."""
    arrays = collections.OrderedDict(
        [("visual.class_embedding", np.arange(6, dtype=np.float32).reshape(1, 1, 6)),
         ("contrastive_loss_mm.temperature_b", np.array([2.65926], dtype=np.float32))]
    )
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"p{protocol}.pdparams"
        path.write_bytes(pickle.dumps(arrays, protocol=protocol))
        got = load_pdparams(path)
        assert list(got) == list(arrays)
        assert all(np.array_equal(got[k], arrays[k]) for k in arrays)


def test_split_big_arrays_are_joined(tmp_path):
    """Protocol 2/3 ``paddle.save`` splits arrays over 1 GiB into slices; they are joined back."""
    big = np.arange(12, dtype=np.float32).reshape(3, 4)
    flat = big.reshape(-1)
    obj = {
        "small": np.ones(2, np.float32),
        "big@@.0": flat[:5], "big@@.1": flat[5:],
        UNPACK_INFO_KEY: {"big": {"OriginShape": (3, 4), "slices": ["big@@.0", "big@@.1"]}},
    }
    path = tmp_path / "split.pdparams"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    got = load_pdparams(path)
    assert set(got) == {"small", "big"} and np.array_equal(got["big"], big)


class _Payload:
    """Pickles as ``func(*args)``: what an attacker's checkpoint does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_state(payload) -> dict:
    # Looks like a state dict; the payload sits between real arrays.
    return {"vision.class_embedding": np.zeros(4, np.float32), "text.pooler.bias": payload,
            "temperature": np.ones(1, np.float32)}


def _payloads(marker):
    touch = f"open({str(marker)!r}, 'w').close()"
    return [
        _Payload(os.system, f"touch '{marker}'"),
        _Payload(exec, touch),
        _Payload(eval, touch),
        _Payload(subprocess.call, [sys.executable, "-c", touch]),
        _Payload(subprocess.Popen, [sys.executable, "-c", touch]),
        _Payload(__import__, "os"),
    ]


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("protocol", [2, 4])
def test_code_execution_is_refused(tmp_path, index, protocol):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[index]
    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps(_malicious_state(payload), protocol=protocol))
    func = payload.func
    with pytest.raises(UnsafeCheckpointError) as e:
        load_pdparams(path)
    msg = str(e.value)
    assert str(path) in msg
    assert f"refusing to load {func.__module__}.{func.__qualname__}" in msg
    assert not marker.exists(), "the payload ran"


def test_payload_is_live_with_plain_pickle(tmp_path):
    """Control: the same file really runs code under an unrestricted unpickler."""
    marker = tmp_path / "pwned"
    data = pickle.dumps(_malicious_state(_payloads(marker)[1]), protocol=4)
    path = tmp_path / "evil.pdparams"
    path.write_bytes(data)
    with pytest.raises(UnsafeCheckpointError):
        load_pdparams(path)
    assert not marker.exists()
    pickle.loads(data)  # noqa: S301 - deliberate, in a temporary folder
    assert marker.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pdparams"
    path.write_bytes(pickle.dumps([np.zeros(2)]))
    with pytest.raises(ValueError, match="expected a pickled dict"):
        load_pdparams(path)
    path.write_bytes(pickle.dumps({"x": np.array([1, "a"], dtype=object)}))
    with pytest.raises(ValueError, match="object array"):
        load_pdparams(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="not a readable .pdparams"):
        load_pdparams(path)
