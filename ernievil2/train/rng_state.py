"""The random generators' states as JSON, for training checkpoints: Python's ``random``, NumPy's
global generator and Paddle's CPU and CUDA generators (nothing pickled)."""
from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import paddle
from paddle.base.core import GeneratorState

log = logging.getLogger("ernievil2")


def _generator_to_json(state: GeneratorState) -> dict[str, Any]:
    # A Paddle GeneratorState pickles as (device id, seed, offset, engine): the engine is the byte
    # list of the std::mt19937_64's text form; latin-1 maps each byte to one character and back.
    device, seed, offset, engine = state.__getstate__()
    return {"device": device, "seed": seed, "offset": offset, "engine": bytes(engine).decode("latin-1")}


def _generator_from_json(saved: dict[str, Any]) -> GeneratorState:
    # GeneratorState has no constructor: build it the way unpickling does (__new__ + __setstate__).
    state = GeneratorState.__new__(GeneratorState)
    state.__setstate__((saved["device"], saved["seed"], saved["offset"], list(saved["engine"].encode("latin-1"))))
    return state


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global generator and Paddle's CPU and CUDA
    generators, as JSON."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "paddle_cpu": [_generator_to_json(s) for s in paddle.get_rng_state("cpu")],
        "paddle_cuda": [_generator_to_json(s) for s in paddle.get_cuda_rng_state()],
    }


def rng_restorer(saved: dict[str, Any], where: str) -> Callable[[], None]:
    """Parse the saved RNG states now (a malformed entry fails before anything is restored); the
    returned function applies them."""
    try:
        version, internal, gauss_next = saved["python"]
        python_state = (version, tuple(internal), gauss_next)
        np_saved = saved["numpy"]
        numpy_state = (np_saved["kind"], np.asarray(np_saved["keys"], dtype=np.uint32), np_saved["pos"],
                       np_saved["has_gauss"], np_saved["gauss"])
        cpu = [_generator_from_json(s) for s in saved["paddle_cpu"]]
        cuda = [_generator_from_json(s) for s in saved["paddle_cuda"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: malformed RNG state ({type(err).__name__}: {err})") from err

    def restore() -> None:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        paddle.set_rng_state(cpu, device="cpu")
        if cuda:
            here = len(paddle.get_cuda_rng_state())
            if here == len(cuda):
                paddle.set_cuda_rng_state(cuda)
            else:
                log.warning("%s: saved %d CUDA generator state(s), this process has %d CUDA device(s): the "
                            "CUDA random streams are not restored", where, len(cuda), here)

    return restore
