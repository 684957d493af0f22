"""ONNX deployment: both exported towers converted with paddle2onnx, and an ONNX Runtime runner.

* :func:`convert_export_dir`: a Paddle Inference export folder (:func:`export_inference`'s
  ``image/inference.*``, ``text/inference.*``, ``export.json``) plus ``image/model.onnx`` and
  ``text/model.onnx``, written atomically (to the same folder or another);
* :func:`export_onnx`: a model straight to such a folder (``launch/export.py --format onnx``);
* :class:`OnnxTowers`: both ``model.onnx`` files run by ``onnxruntime`` on the CPU,
  embedding pixels and token ids into L2-normalised float32 rows.

The ONNX graphs take the Paddle models' inputs (``pixels`` float32 ``[batch, 3, S, S]``,
``input_ids`` int64 ``[batch, length]``) and give ``embedding`` float32 ``[batch, D]``. The Paddle
Inference files are kept beside them, so one folder serves both runtimes. paddle2onnx, onnx and
onnxruntime are the optional ``onnx`` extra, imported only when used.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

from ernievil2.atomic import atomic_dir
from ernievil2.inference.errors import InferError

__all__ = ["DEFAULT_OPSET", "ONNX_HINT", "OUTPUT_NAME", "OnnxTowers", "convert_export_dir", "export_onnx",
           "import_converter"]

#: The opset asked of paddle2onnx (17: the first with ``LayerNormalization``); it raises it
#: by itself where an operator needs more, and ``export.json`` records the opset written.
DEFAULT_OPSET = 17
OUTPUT_NAME = "embedding"
ONNX_HINT = 'pip install -e ".[onnx]" (paddle2onnx==2.1.0, onnx==1.17.0, onnxruntime==1.30.0)'
TOWERS: dict[str, tuple[str, tuple[str, ...]]] = {  # tower -> (input name, names of its input axes)
    "image": ("pixels", ("batch", "", "", "")),
    "text": ("input_ids", ("batch", "length")),
}


def import_converter() -> tuple[Any, Any]:
    """``(paddle2onnx, onnx)``, or :class:`InferError` naming the extra to install."""
    try:
        import onnx
        import paddle2onnx
    except ImportError as exc:
        raise InferError(f"ONNX export needs paddle2onnx and onnx ({exc.name or exc} is missing): {ONNX_HINT}") from None
    return paddle2onnx, onnx


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise InferError(f"running the ONNX models needs onnxruntime: {ONNX_HINT}") from None
    return onnxruntime


def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / "export.json"
    if not path.is_file():
        raise InferError(f"{folder} is not an export folder (no export.json; launch/export.py writes one)")
    return json.loads(path.read_text(encoding="utf-8"))


def _paddle_files(tower_dir: Path) -> tuple[Path, Path]:
    """The tower's Paddle model (``inference.json``, PIR, or the old ``inference.pdmodel``) and params."""
    params = tower_dir / "inference.pdiparams"
    for name in ("inference.json", "inference.pdmodel"):
        if (tower_dir / name).is_file() and params.is_file():
            return tower_dir / name, params
    raise InferError(f"{tower_dir}: no Paddle Inference model (inference.json or .pdmodel, and inference.pdiparams)")


def _paddle2onnx(p2o: Any, model_file: Path, params_file: Path, opset: int) -> bytes:
    """The serialised ONNX model paddle2onnx makes of one Paddle model. paddle2onnx 2.1.0 logs a
    failed conversion and calls ``sys.exit(-1)``; both that and its exceptions become InferError."""
    try:
        data = p2o.export(str(model_file), str(params_file), save_file=None, opset_version=opset,
                          auto_upgrade_opset=True, enable_onnx_checker=True, enable_optimize=True)
    except (Exception, SystemExit) as exc:  # a failed conversion is the user's error, not an exit
        raise InferError(f"paddle2onnx could not convert {model_file}: {type(exc).__name__}: {exc}") from None
    if not data:
        raise InferError(f"paddle2onnx returned no model for {model_file}")
    return data


def _has_subgraphs(graph: Any) -> bool:
    return any(a.type in (a.GRAPH, a.GRAPHS) for node in graph.node for a in node.attribute)


def _tidy(model: Any, tower: str) -> None:
    """Name the graph's output ``embedding`` and its dynamic axes ``batch`` / ``length``; drop the
    constants no node reads (paddle2onnx leaves some, and onnxruntime warns about each)."""
    graph = model.graph
    input_name, axes = TOWERS[tower]
    if [i.name for i in graph.input] != [input_name] or len(graph.output) != 1:
        raise InferError(f"unexpected {tower} graph: inputs {[i.name for i in graph.input]}, "
                         f"{len(graph.output)} outputs (want {input_name!r} and one output)")
    old = graph.output[0].name
    for node in graph.node:
        node.output[:] = [OUTPUT_NAME if name == old else name for name in node.output]
        node.input[:] = [OUTPUT_NAME if name == old else name for name in node.input]
    graph.output[0].name = OUTPUT_NAME
    for value, names in ((graph.input[0], axes), (graph.output[0], ("batch", ""))):
        for dim, name in zip(value.type.tensor_type.shape.dim, names):
            if name and not dim.HasField("dim_value"):
                dim.dim_param = name
    if not _has_subgraphs(graph):
        used = {name for node in graph.node for name in node.input} | {OUTPUT_NAME}
        keep = [init for init in graph.initializer if init.name in used]
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _opset(model: Any) -> int:
    return max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def _convert_into(folder: Path, opset: int) -> dict[str, Any]:
    """Write ``model.onnx`` beside each tower's Paddle model in ``folder`` (a staging folder) and
    record it in ``export.json``; returns the ``onnx`` entry written there."""
    p2o, onnx = import_converter()
    meta = _read_meta(folder)
    written = []
    for tower in TOWERS:
        model_file, params_file = _paddle_files(folder / tower)
        model = onnx.load_model_from_string(_paddle2onnx(p2o, model_file, params_file, opset))
        _tidy(model, tower)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise InferError(f"paddle2onnx made an invalid ONNX model of {model_file}: {exc}") from None
        onnx.save_model(model, str(folder / tower / "model.onnx"))
        written.append(_opset(model))
    entry = {"image": "image/model.onnx", "text": "text/model.onnx", "opset": max(written),
             "output": OUTPUT_NAME, "paddle2onnx": getattr(p2o, "__version__", "?"), "onnx": onnx.__version__}
    meta["format"] = "onnx"
    meta["onnx"] = entry
    meta["paddle_inference"] = {t: f"{t}/{_paddle_files(folder / t)[0].name}" for t in TOWERS}
    (folder / "export.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return entry


def _listing(out: Path) -> dict[str, Path]:
    """``launch/export.py``'s file listing: ``dir``, ``meta``, each tower's files, ``vocab``."""
    files = {"dir": out, "meta": out / "export.json"}
    for tower in TOWERS:
        for f in sorted((out / tower).iterdir()):
            files[f"{tower}{f.suffix}"] = f
    if (out / "vocab.txt").is_file():
        files["vocab"] = out / "vocab.txt"
    return files


def convert_export_dir(export_dir: str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
                       opset: int = DEFAULT_OPSET) -> dict[str, Path]:
    """Convert a Paddle Inference export folder (:func:`export_inference`) to ONNX: ``out_dir``
    (default: ``export_dir`` itself) gets a copy of it plus ``image/model.onnx`` and
    ``text/model.onnx`` (dynamic ``batch``; text also ``length``), ``export.json`` updated
    (``format: onnx``, the ``onnx`` files and opset). Written atomically: on any error ``out_dir``
    is left as it was. Returns the files written (``dir``, ``meta``, ``image.onnx``, ``image.json``, ...)."""
    src = Path(export_dir)
    out = Path(out_dir) if out_dir is not None else src
    _read_meta(src)
    for tower in TOWERS:
        _paddle_files(src / tower)
    import_converter()
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("model.onnx"))
        _convert_into(tmp, opset)
    return _listing(out)


def export_onnx(model: Any, out_dir: str | os.PathLike, image_size: int, text_max_length: int,
                vocab_file: Optional[str | os.PathLike] = None, opset: int = DEFAULT_OPSET) -> dict[str, Path]:
    """:func:`export_inference` then :func:`convert_export_dir`, in one atomic write of ``out_dir``:
    the Paddle Inference models, their ONNX conversions, ``export.json`` and ``vocab.txt``."""
    from ernievil2.inference.export import export_inference

    import_converter()  # fail before the (slow) Paddle export when the extra is missing
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        stage = tmp / "paddle"
        export_inference(model, stage, image_size, text_max_length, vocab_file)
        for item in list(stage.iterdir()):
            os.replace(item, tmp / item.name)
        stage.rmdir()
        _convert_into(tmp, opset)
    return _listing(out)


class OnnxTowers:
    """Both towers of an ONNX export folder, run by ``onnxruntime`` (CPUExecutionProvider).

    ``intra_op_num_threads``: threads per operator (``None``: onnxruntime's default, one per
    physical core). :meth:`encode_image` / :meth:`encode_text` run one batch as given and return
    L2-normalised float32 ``[n, D]`` rows; the functions of :mod:`ernievil2.encode` batch over them
    (``embed_pixels(towers, pixels)``, the vectors they give with the Paddle model). ``cfg`` holds the sizes
    read from ``export.json`` (``vision.image_size``, ``vision.width``, ``text.pad_id``,
    ``text.width``, ``text.max_positions``), named as in the model's config.
    """

    numpy_io = True  # ernievil2.encode passes arrays, not tensors

    def __init__(self, export_dir: str | os.PathLike, intra_op_num_threads: Optional[int] = None) -> None:
        ort = _import_onnxruntime()
        self.dir = Path(export_dir)
        self.meta = _read_meta(self.dir)
        entry = self.meta.get("onnx")
        if self.meta.get("format") != "onnx" or not entry:
            raise InferError(f"{self.dir} holds no ONNX models: export with launch/export.py OUT_DIR --format onnx")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if intra_op_num_threads is not None:
            if intra_op_num_threads < 1:
                raise InferError(f"intra_op_num_threads must be >= 1, got {intra_op_num_threads}")
            options.intra_op_num_threads = int(intra_op_num_threads)
        self.intra_op_num_threads = intra_op_num_threads
        self.runtimes: dict[str, Any] = {}
        for tower in TOWERS:
            path = self.dir / entry[tower]
            if not path.is_file():
                raise InferError(f"{path} is missing (export.json names it)")
            self.runtimes[tower] = ort.InferenceSession(str(path), sess_options=options,
                                                        providers=["CPUExecutionProvider"])
        dim, text = int(self.meta["embedding_dim"]), self.meta["text"]
        self.cfg = SimpleNamespace(
            vision=SimpleNamespace(image_size=int(self.meta["image"]["shape"][-1]), width=dim),
            text=SimpleNamespace(pad_id=int(text["pad_id"]), width=dim, max_positions=int(text["max_positions"])),
        )

    @property
    def image_size(self) -> int:
        return self.cfg.vision.image_size

    @property
    def embedding_dim(self) -> int:
        return self.cfg.vision.width

    @property
    def pad_id(self) -> int:
        return self.cfg.text.pad_id

    @property
    def max_positions(self) -> int:
        return self.cfg.text.max_positions

    def _run(self, tower: str, batch: np.ndarray) -> np.ndarray:
        if len(batch) == 0:
            return np.empty((0, self.embedding_dim), dtype=np.float32)
        (out,) = self.runtimes[tower].run([OUTPUT_NAME], {TOWERS[tower][0]: np.ascontiguousarray(batch)})
        return out.astype(np.float32, copy=False)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings ``[n, D]`` of one batch of preprocessed pixels (float32 ``[n, 3, S, S]``, as
        :func:`ernievil2.data.preprocess.preprocess` makes them)."""
        pixels = np.asarray(pixels, dtype=np.float32)
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise InferError(f"pixels must be [n, 3, {s}, {s}], got {list(pixels.shape)}")
        return self._run("image", pixels)

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        """Embeddings ``[n, D]`` of one batch of token ids ``[n, L]`` (``[CLS] ... [SEP]``
        right-padded with the pad id; padding is masked, so its width does not matter)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] < 1:
            raise InferError(f"input_ids must be integer [n, L], got {ids.dtype} {list(ids.shape)}")
        if ids.shape[1] > self.max_positions:
            raise InferError(f"input_ids are {ids.shape[1]} long, the model takes at most {self.max_positions}")
        return self._run("text", ids.astype(np.int64, copy=False))
