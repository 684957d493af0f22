"""Stand-ins for what the documented command lines read, and the machine the docs assume.

:class:`StandIns` builds each stand-in once per test run, on first use, in small sizes: a tiny
demo run trained 1 step, "released weights" (a random tiny model with the preset's word
embedding), a PaddleNLP ErnieModel folder and a timm ViT (one tower each, tiny sizes), shards, COCO / Karpathy / Chinese-CLIP / JSON Lines / upstream-TSV inputs with
detector files, an ImageNet-style folder, clip_benchmark WebDataset folders, a photo folder and
its search index, an upstream embeddings file, filter scores and a kept-keys list, a multirun.

:meth:`StandIns.machine` lays out one test's machine: ``repo/`` is the working directory
(``launch``, ``bench`` and ``conf`` link to this repository) and holds the relative paths the docs
name (``outputs/demo/RUN``, ``CKPT``, ``WEIGHTS``, ``F.tsv``, ``annotations/``, ...); ``shared``
stands for ``../shared``, ``home`` for ``~``; ``data``, ``weights``, ``path`` and ``tmp`` take the
docs' absolute paths (``/data/laion`` → ``MACHINE/data/laion``). Each entry of :data:`ENTRIES` is a
symlink to its stand-in (a copy where a command writes into it), made when the command mentions it
(every entry for training commands, whose configs read them through the environment of
:meth:`StandIns.environment`) unless the command writes that path.
"""
from __future__ import annotations

import base64
import io
import json
import pickle
import re
import shutil
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np
from documented import REPO, REROOTED, STANDIN_CHECKPOINT, run_python, train_shrink

CATEGORIES = {1: "person", 2: "dog", 3: "cat", 5: "car", 7: "book", 9: "tv"}  # COCO-like ids, with gaps
ZH = {"person": "人", "dog": "狗", "cat": "猫", "car": "汽车", "book": "书", "tv": "电视"}
COLOURS = {"red": (40, 40, 220), "green": (40, 200, 40), "blue": (220, 60, 40), "yellow": (40, 220, 230)}


def jpeg(seed: int, size: tuple[int, int] = (48, 64), ext: str = ".jpg") -> bytes:
    """A small noisy colour field, encoded."""
    rng = np.random.default_rng(seed)
    bgr = list(COLOURS.values())[seed % len(COLOURS)]
    img = np.clip(np.asarray(bgr) + rng.integers(-40, 40, (*size, 3)), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def caption(i: int, zh: bool = False) -> str:
    colour = list(COLOURS)[i % len(COLOURS)]
    name = CATEGORIES[sorted(CATEGORIES)[i % len(CATEGORIES)]]
    return f"一只{ZH[name]}在{i}号图里" if zh else f"a {colour} picture of a {name}, number {i}"


def write(path: Path, data: str | bytes | object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as out:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class Entry:
    """One path of the machine: ``path`` in it, ``source`` (a :class:`StandIns` attribute, then a
    path inside it), entries it ``needs``, and whether it is a ``copy`` (else a symlink)."""

    path: str
    source: str
    needs: tuple[str, ...] = ()
    copy: bool = False
    mention: str | None = None  # how the docs refer to it, when not the path as written

    @property
    def written(self) -> str:
        """The path as the docs write it."""
        top, _, rest = self.path.partition("/")
        return {"repo": rest, "shared": "../shared", "home": f"~/{rest}"}.get(top, f"/{self.path}")

    def mentioned(self, text: str) -> bool:
        form = self.mention or self.written
        return re.search(rf"(?<![\w./-]){re.escape(form)}(?![\w.-])", text) is not None


SIDECARS = ("ids.txt", "text.npy", "image.npy")  # launch/infer.py's, beside O.tsv
ENTRIES = [
    Entry("repo/outputs/demo/RUN", "run"),
    Entry("repo/CKPT", "run"),
    Entry("repo/runs/a", "run"),
    Entry("repo/RUN_DIR", "run", copy=True),  # launch/plot.py writes RUN_DIR/plots
    Entry("repo/WEIGHTS", "checkpoint"),
    Entry("repo/W", "checkpoint"),
    Entry("repo/vocab.txt", "vocab"),
    Entry("repo/V", "vocab"),
    Entry("repo/F.tsv", "seed_tsv"),
    Entry("repo/F", "seed_tsv"),
    Entry("repo/O.tsv", "embeddings/O.tsv", needs=tuple(f"repo/O.tsv.{s}" for s in SIDECARS)),
    *[Entry(f"repo/O.tsv.{s}", f"embeddings/O.tsv.{s}") for s in SIDECARS],
    Entry("repo/infer.conf", "infer_conf", needs=("repo/F.tsv", "repo/WEIGHTS", "repo/vocab.txt")),
    Entry("repo/annotations", "coco/annotations"),
    Entry("repo/train2017", "coco/train2017"),
    Entry("repo/instances_val2017.json", "coco/annotations/instances_val2017.json"),
    Entry("repo/ppyoloe_bbox.json", "coco/ppyoloe_bbox.json"),
    Entry("repo/coco-categories.json", "coco/categories.json"),
    Entry("repo/captions.jsonl", "web/captions.jsonl"),
    Entry("repo/bbox.json", "web/bbox.json"),
    Entry("repo/coco-en-zh.tsv", "web/coco-en-zh.tsv"),
    Entry("repo/datasets/MUGE", "chinese_clip"),
    Entry("repo/MUGE", "chinese_clip"),
    Entry("repo/dataset_flickr30k.json", "karpathy/dataset_flickr30k.json"),
    Entry("repo/flickr30k-images", "karpathy/flickr30k-images"),
    Entry("repo/flickr8k-tags.jsonl", "flickr8k_tags/flickr8k-tags.jsonl"),
    Entry("repo/flickr8k-bbox.json", "flickr8k_tags/flickr8k-bbox.json"),
    Entry("repo/imagenet_zh.txt", "imagenet/classnames_zh.txt"),
    Entry("repo/shards/coco", "shards"),
    Entry("repo/shards/laion", "img2dataset"),
    Entry("repo/scores/laion", "scores"),
    Entry("repo/keep.txt", "keep/keep.txt"),
    Entry("repo/shards/laion-top30", "shards"),
    Entry("repo/photos.index", "index"),
    Entry("repo/outputs/multirun/demo/2026-01-01_00-00-00", "sweep", mention="outputs/multirun/demo/"),
    Entry("repo/outputs/sweep/web", "sweep"),
    Entry("repo/outputs/sweep/web_ramp", "sweep"),
    Entry("shared", "shared"),
    Entry("home/Pictures", "pictures"),
    Entry("data/laion", "brace_shards"),
    Entry("data/web", "brace_shards"),
    Entry("data/coco-objects", "shards"),
    Entry("data/my-shards", "shards"),
    Entry("data/coco-train2017", "shards"),
    Entry("data/clip_benchmark", "clip_benchmark"),
    Entry("data/imagenet/val", "imagenet/val"),
    Entry("data/coco-cn-test.tsv", "seed_tsv"),
    Entry("data/dataset_flickr30k.json", "karpathy/dataset_flickr30k.json"),
    Entry("data/flickr30k-images", "karpathy/flickr30k-images"),
    Entry("data/Flickr30k-CN", "chinese_clip"),
    Entry("data/MUGE", "chinese_clip"),
    Entry("weights/ernie_vil-2.0-base-zh", "released"),
    Entry("weights/ernie-3.0-base-zh", "ernie_model"),
    Entry("weights/vit_base_patch16_clip_quickgelu_224.openai", "timm_vit"),
    Entry("path/to/ernie-3.0-base-zh/vocab.txt", "shared/assets/ernie-3.0-base-zh/vocab.txt"),
    Entry("tmp/packed/flickr8k-cn", "packed/flickr8k-cn"),
    Entry("tmp/packed/coco-mini", "packed/coco-mini"),
]
# Where the configs' environment variables point (the headers say to set them), and the home folder.
ENVIRONMENT = {
    "ERNIEVIL2_SHARED": "shared", "REAL_MIX_ROOT": "tmp/packed", "COCO_CN_TSV": "data/coco-cn-test.tsv",
    "FLICKR30K_JSON": "data/dataset_flickr30k.json", "FLICKR30K_IMAGES": "data/flickr30k-images",
    "FLICKR30K_CN_DIR": "data/Flickr30k-CN", "MUGE_DIR": "data/MUGE", "IMAGENET_DIR": "data/imagenet/val",
    "CLIP_BENCHMARK_ROOT": "data/clip_benchmark", "HOME": "home",
}
WANDB_UNSET = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE", "WANDB_RUN_ID",
               "WANDB_RESUME")


class StandIns:
    """The test run's stand-ins under ``root``, each built on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.demo_cache = root / "demo_cache"

    # ------------------------------------------------------------------ the machine
    def machine(self, folder: Path) -> Path:
        """An empty machine in ``folder``: ``repo/`` with this repository's launch/, bench/, conf/."""
        machine = folder / "machine"
        for top in ("repo", "home", *REROOTED):
            (machine / top).mkdir(parents=True)
        for name in ("launch", "bench", "conf"):
            (machine / "repo" / name).symlink_to(REPO / name)
        return machine

    def populate(self, machine: Path, text: str, outputs: set[str], everything: bool = False) -> None:
        """Link the entries ``text`` mentions (all but copies with ``everything``), and what they
        need, into ``machine``; never a path in ``outputs`` (as written), which the command makes."""
        wanted = {e.path for e in ENTRIES
                  if ((everything and not e.copy) or e.mentioned(text)) and e.written not in outputs}
        wanted |= {need for e in ENTRIES if e.path in wanted for need in e.needs}
        for entry in ENTRIES:
            if entry.path not in wanted:
                continue
            name, _, inside = entry.source.partition("/")
            source = getattr(self, name) / inside if inside else getattr(self, name)
            target = machine / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry.copy:
                shutil.copytree(source, target, symlinks=True)
            else:
                target.symlink_to(source)

    @staticmethod
    def environment(machine: Path) -> dict[str, str]:
        """The configs' data variables, ``HOME``, and wandb kept inside the machine and silent."""
        home = machine / "home"
        return {**{k: str(machine / v) for k, v in ENVIRONMENT.items()}, "WANDB_SILENT": "true",
                "WANDB_CONSOLE": "off", "WANDB_CACHE_DIR": str(home / "wandb-cache"),
                "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_DATA_DIR": str(home / "wandb-data"),
                "NETRC": str(home / ".netrc")}

    def _folder(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir(parents=True)
        return folder

    # ------------------------------------------------------------------ a trained run and what comes of it
    @cached_property
    def run(self) -> Path:
        """A tiny demo run trained 1 step, with its checkpoint and evaluation."""
        out = self.root / "run"
        args = [str(REPO / "launch" / "train.py"), "trainer.max_steps=1", f"hydra.run.dir={out}"]
        assert run_python([*args, *train_shrink(args[1:], self.demo_cache)], self.root) == 0
        return out

    @cached_property
    def checkpoint(self) -> Path:
        path = self.run / "checkpoints" / STANDIN_CHECKPOINT
        assert (path / "model.safetensors").is_file()
        return path

    @cached_property
    def vocab(self) -> Path:
        return self.checkpoint / "vocab.txt"

    @cached_property
    def released(self) -> Path:
        """The "released weights": a randomly initialised tiny model with the preset's 8,000-row word
        embedding, saved with the stand-in released vocab (fewer ids than rows, as the real one)."""
        import paddle

        from ernievil2.models import build_model, model_config
        from ernievil2.weights import save_checkpoint

        paddle.seed(0)
        model = build_model(model_config("tiny"))
        vocab = self.shared / "assets" / "ernie-3.0-base-zh" / "vocab.txt"
        return save_checkpoint(model, self.root / "released", files={"vocab.txt": vocab})

    @cached_property
    def ernie_model(self) -> Path:
        """A PaddleNLP ``ErnieModel`` folder (ERNIE 3.0's layout: token and task types) at the tiny
        preset's text sizes, random, with the stand-in vocab: ``model.text.init_from``'s source."""
        from ernievil2.models import model_config

        t = model_config("tiny").text
        rng = np.random.default_rng(0)
        state = {"embeddings.word_embeddings.weight": (t.vocab_size, t.width),
                 "embeddings.position_embeddings.weight": (t.max_positions, t.width),
                 "embeddings.token_type_embeddings.weight": (4, t.width),
                 "embeddings.task_type_embeddings.weight": (3, t.width), "embeddings.layer_norm.weight": (t.width,),
                 "embeddings.layer_norm.bias": (t.width,), "pooler.dense.weight": (t.width, t.width),
                 "pooler.dense.bias": (t.width,)}
        for i in range(t.layers):
            for name, shape in (("q_proj", (t.width, t.width)), ("k_proj", (t.width, t.width)),
                                ("v_proj", (t.width, t.width)), ("out_proj", (t.width, t.width))):
                state[f"encoder.layers.{i}.self_attn.{name}.weight"] = shape
                state[f"encoder.layers.{i}.self_attn.{name}.bias"] = shape[1:]
            for name, shape in (("linear1", (t.width, t.ffn_dim)), ("linear2", (t.ffn_dim, t.width))):
                state[f"encoder.layers.{i}.{name}.weight"], state[f"encoder.layers.{i}.{name}.bias"] = shape, shape[1:]
            for name in ("norm1", "norm2"):
                state[f"encoder.layers.{i}.{name}.weight"] = state[f"encoder.layers.{i}.{name}.bias"] = (t.width,)
        state = {k: (0.02 * rng.standard_normal(shape)).astype(np.float32) for k, shape in state.items()}
        out = self._folder("ernie_model")
        write(out / "config.json", {"architectures": ["ErnieModel"], "model_type": "ernie", "hidden_act": "gelu",
                                    "hidden_size": t.width, "num_hidden_layers": t.layers,
                                    "num_attention_heads": t.heads, "intermediate_size": t.ffn_dim,
                                    "max_position_embeddings": t.max_positions, "vocab_size": t.vocab_size,
                                    "type_vocab_size": 4, "use_task_id": True, "task_type_vocab_size": 3,
                                    "task_id": 0, "pad_token_id": 0})
        with open(out / "model_state.pdparams", "wb") as f:
            pickle.dump(state, f, protocol=2)
        shutil.copy(self.shared / "assets" / "ernie-3.0-base-zh" / "vocab.txt", out / "vocab.txt")
        return out

    @cached_property
    def timm_vit(self) -> Path:
        """A Hugging Face hub folder of a timm CLIP ViT (``model.safetensors`` + ``config.json``) at the
        tiny preset's image sizes: a random tiny image tower in timm's layout."""
        import paddle
        from safetensors.numpy import save_file

        from ernievil2.models import build_model, model_config
        from ernievil2.weights.save import state_to_numpy
        from ernievil2.weights.tower_layouts import ours_to_timm

        paddle.seed(1)
        state = ours_to_timm(state_to_numpy(build_model(model_config("tiny"))))
        state["head.weight"] = np.zeros((32, state["cls_token"].shape[-1]), np.float32)  # CLIP's projection
        out = self._folder("timm_vit")
        save_file(state, str(out / "model.safetensors"))
        write(out / "config.json", {"architecture": "vit_base_patch16_clip_quickgelu_224", "num_classes": 32})
        return out

    @cached_property
    def sweep(self) -> Path:
        """A two-recipe multirun of the tiny demo (what launch/compare.py reads)."""
        out = self.root / "sweep"
        args = [str(REPO / "launch" / "train.py"), "-m", "loss=clip_only,multiview", f"hydra.sweep.dir={out}"]
        assert run_python([*args, *train_shrink(args[1:], self.demo_cache)], self.root) == 0
        return out

    @cached_property
    def embeddings(self) -> Path:
        """``O.tsv`` and its sidecars: launch/infer.py's output for the upstream TSV stand-in."""
        out = self._folder("embeddings")
        args = [str(REPO / "launch" / "infer.py"), f"test_file={self.seed_tsv}", f"output_file={out / 'O.tsv'}",
                f"model.init_from={self.checkpoint}"]
        assert run_python(args, self.root) == 0
        return out

    @cached_property
    def scores(self) -> Path:
        """launch/filter.py score's sidecars for the img2dataset shards, by the trained run."""
        out = self.root / "scores"
        args = [str(REPO / "launch" / "filter.py"), "score", "--ckpt", str(self.run), "--shards", str(self.img2dataset),
                "--out", str(out), "--no-progress"]
        assert run_python(args, self.root) == 0
        return out

    @cached_property
    def keep(self) -> Path:
        """launch/filter.py select's ``keep.txt`` (half of those pairs) and its summary."""
        out = self._folder("keep")
        args = [str(REPO / "launch" / "filter.py"), "select", str(self.scores), "--fraction", "0.5",
                "--out", str(out / "keep.txt")]
        assert run_python(args, self.root) == 0
        return out

    @cached_property
    def index(self) -> Path:
        from ernievil2.search import build_index, load_encoder

        out = self.root / "photos.index"
        build_index(self.pictures, out, load_encoder(self.checkpoint, device="cpu"), progress=False)
        return out

    @cached_property
    def infer_conf(self) -> Path:
        return write(self.root / "infer.conf", "# launch/infer.py overrides, one per line\ntest_file=F.tsv\n"
                     "output_file=upstream.emb   # the embeddings file\n"
                     "model.init_from=WEIGHTS\nvocab_file=vocab.txt\n")

    # ------------------------------------------------------------------ image-text inputs
    @cached_property
    def seed_tsv(self) -> Path:
        """The upstream evaluation file: 8 images, 12 lines (text \\t image_id \\t base64)."""
        lines = [f"{caption(i % 8, zh=True)}{'' if i < 8 else '。'}\t{1000 + i % 8}\t"
                 f"{base64.b64encode(jpeg(i % 8)).decode()}" for i in range(12)]
        return write(self.root / "seed.tsv", "\n".join(lines) + "\n")

    @cached_property
    def coco(self) -> Path:
        """COCO captions / instances json (ids with gaps), 32 images, detector results and a category list."""
        out = self._folder("coco")
        ids = sorted(CATEGORIES)
        images = [{"id": 100 + i, "file_name": f"{100 + i:012d}.jpg", "width": 64, "height": 48} for i in range(32)]
        for i, img in enumerate(images):
            write(out / "train2017" / img["file_name"], jpeg(i))
        captions = {"images": images, "annotations": [
            {"id": 10 * i + j, "image_id": 100 + i, "caption": caption(i + j)} for i in range(32) for j in range(2)]}
        boxes = [{"id": 10 * i + j, "image_id": 100 + i, "category_id": ids[(i + j) % len(ids)], "bbox": [1, 1, 9, 9],
                  "area": 81, "iscrowd": 0} for i in range(32) for j in range(1 + i % 2)]
        categories = [{"id": k, "name": v} for k, v in CATEGORIES.items()]
        instances = {"images": images, "annotations": boxes, "categories": categories}
        write(out / "annotations" / "captions_train2017.json", captions)
        write(out / "annotations" / "instances_train2017.json", instances)
        write(out / "annotations" / "instances_val2017.json", instances)
        write(out / "ppyoloe_bbox.json", [{**{k: b[k] for k in ("image_id", "category_id", "bbox")}, "score": 0.9}
                                          for b in boxes])
        write(out / "categories.json", categories)
        return out

    @cached_property
    def web(self) -> Path:
        """A JSON Lines caption file (absolute image paths, Chinese captions), its detections, a translation table."""
        out = self._folder("web")
        images = sorted((self.coco / "train2017").iterdir())[:8]
        rows = [{"image": str(path), "image_id": f"w{i}", "captions_zh": [caption(i, zh=True)]}
                for i, path in enumerate(images)]
        write(out / "captions.jsonl", jsonl(rows))
        write(out / "bbox.json", [{"image_id": f"w{i}", "category_id": sorted(CATEGORIES)[i % 6], "bbox": [0, 0, 5, 5],
                                   "score": 0.8} for i in range(8)])
        write(out / "coco-en-zh.tsv", "".join(f"{en}\t{zh}\n" for en, zh in ZH.items()))
        return out

    @cached_property
    def shared(self) -> Path:
        """``../shared``: Flickr8k-CN and COCO-mini captions.jsonl with images, the upstream TSV, a vocab."""
        out = self._folder("shared")
        flickr, coco = out / "data" / "flickr8k-cn-train", out / "data" / "coco-mini-train"
        rows_f, rows_c = [], []
        for i in range(16):
            key = f"{1000268201 + i}_693b08cb0e"
            write(flickr / "images" / f"{key}.jpg", jpeg(40 + i))
            rows_f.append({"image": f"images/{key}.jpg", "image_id": key, "captions_en": [caption(i), caption(i + 1)],
                           "captions_zh": [caption(i, zh=True), caption(i + 1, zh=True)]})
            write(coco / "images" / f"{493652 + i:012d}.jpg", jpeg(60 + i))
            name = CATEGORIES[sorted(CATEGORIES)[i % 6]]
            rows_c.append({"image": f"images/{493652 + i:012d}.jpg", "image_id": 493652 + i,
                           "captions_en": [caption(i), caption(i + 2)], "objects": [{"name": name, "count": 1}],
                           "boxes": [{"category": name, "bbox": [1, 1, 9, 9]}]})
        write(flickr / "captions.jsonl", jsonl(rows_f))
        write(coco / "captions.jsonl", jsonl(rows_c))
        shutil.copy(self.seed_tsv, out / "data" / "seed-format-sample.zh.tsv")
        from ernievil2.tokenizer import WordPieceTokenizer

        texts = [c for r in rows_f + rows_c for key in ("captions_en", "captions_zh") for c in r.get(key, [])]
        vocab = out / "assets" / "ernie-3.0-base-zh" / "vocab.txt"
        vocab.parent.mkdir(parents=True)
        WordPieceTokenizer.build_vocab(texts * 3, vocab, vocab_size=400)
        return out

    @cached_property
    def chinese_clip(self) -> Path:
        """Chinese-CLIP's layout: {train,valid,test}_imgs.tsv + _texts.jsonl, 8 images each."""
        out = self._folder("chinese_clip")
        for s, split in enumerate(("train", "valid", "test")):
            ids = [2000 + 10 * s + i for i in range(8)]
            write(out / f"{split}_imgs.tsv", "".join(f"{k}\t{base64.b64encode(jpeg(k)).decode()}\n" for k in ids))
            write(out / f"{split}_texts.jsonl", jsonl([{"text_id": k, "text": caption(k, zh=True), "image_ids": [k]}
                                                       for k in ids]))
        return out

    @cached_property
    def karpathy(self) -> Path:
        """dataset_flickr30k.json (8 train, 8 test images) and flickr30k-images/."""
        out = self._folder("karpathy")
        images = []
        for i in range(16):
            write(out / "flickr30k-images" / f"{3000 + i}.jpg", jpeg(i + 5))
            images.append({"filename": f"{3000 + i}.jpg", "imgid": i, "split": "train" if i < 8 else "test",
                           "sentences": [{"raw": caption(i)}, {"raw": caption(i + 3)}]})
        write(out / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
        return out

    @cached_property
    def flickr8k_tags(self) -> Path:
        """A tagger's JSON Lines and detector results (image ids as file names) for the Flickr8k-CN stand-in."""
        out = self._folder("flickr8k_tags")
        rows = [json.loads(line) for line in (self.shared / "data" / "flickr8k-cn-train" / "captions.jsonl")
                .read_text(encoding="utf-8").splitlines()]
        write(out / "flickr8k-tags.jsonl", jsonl([{"key": r["image_id"], "objects": [{"name": "girl", "score": 0.9},
                                                                                      {"name": "stairs", "score": 0.3}]}
                                                  for r in rows]))
        write(out / "flickr8k-bbox.json", [{"image_id": Path(r["image"]).name, "category_id": sorted(CATEGORIES)[i % 6],
                                            "bbox": [0, 0, 5, 5], "score": 0.7} for i, r in enumerate(rows)])
        return out

    @cached_property
    def imagenet(self) -> Path:
        """An ImageNet-style folder (3 classes × 2 images) and its Chinese class names."""
        out = self._folder("imagenet")
        for k, synset in enumerate(("n01440764", "n01443537", "n01484850")):
            for i in range(2):
                write(out / "val" / synset / f"{i}.JPEG", jpeg(10 * k + i))
        write(out / "classnames_zh.txt", "丁鲷\n金鱼\n大白鲨\n")
        return out

    @cached_property
    def clip_benchmark(self) -> Path:
        """clip_benchmark's WebDataset folders: imagenet1k (classification) and flickr30k (retrieval)."""
        out = self._folder("clip_benchmark")
        names = ["red thing", "green thing", "blue thing"]
        tar(out / "imagenet1k" / "test" / "0.tar",
            [(f"s{i}", {"jpg": jpeg(i), "cls": str(i % 3).encode()}) for i in range(6)])
        write(out / "imagenet1k" / "test" / "nshards.txt", "1\n")
        write(out / "imagenet1k" / "classnames.txt", "\n".join(names) + "\n")
        write(out / "imagenet1k" / "zeroshot_classification_templates.txt", "a photo of a {c}.\nitap of a {c}\n")
        tar(out / "flickr30k" / "test" / "0.tar",
            [(f"r{i}", {"jpg": jpeg(i + 20), "txt": f"{caption(i)}\n{caption(i + 1)}".encode()}) for i in range(5)])
        write(out / "flickr30k" / "test" / "nshards.txt", "1\n")
        write(out / "flickr30k" / "dataset_type.txt", "retrieval\n")
        return out

    @cached_property
    def pictures(self) -> Path:
        """``~/Pictures``: JPEGs and a PNG, one in a sub-folder, and ``cat.jpg``."""
        out = self._folder("Pictures")
        for i in range(4):
            write(out / f"IMG_{i}.jpg", jpeg(i + 30))
        write(out / "trip" / "beach.png", jpeg(35, ext=".png"))
        write(out / "cat.jpg", jpeg(36))
        return out

    # ------------------------------------------------------------------ shards
    @cached_property
    def shards(self) -> Path:
        """The COCO stand-in packed: 2 shards of 16 samples with captions and object tags."""
        from ernievil2.data.formats import SourceSpec
        from ernievil2.data.packers.pipeline import PackOptions, pack

        annotations = self.coco / "annotations"
        spec = SourceSpec("coco", annotations / "captions_train2017.json", images=self.coco / "train2017",
                          instances=annotations / "instances_train2017.json")
        out = self.root / "shards"
        assert pack(spec, out, PackOptions(samples_per_shard=16, progress=False)).written == 32
        return out

    def _renamed_shards(self, name: str, counts: str) -> Path:
        out = self._folder(name)
        for n, shard in enumerate(sorted(self.shards.glob("*.tar"))):
            (out / f"{n:05d}.tar").symlink_to(shard)
            if counts == "stats":
                write(out / f"{n:05d}_stats.json", {"count": 16, "successes": 16, "failed_to_download": 0})
        if counts == "sizes":
            write(out / "sizes.json", {f"{n:05d}.tar": 16 for n in range(2)})
        return out

    @cached_property
    def brace_shards(self) -> Path:
        """The shards as ``00000.tar``, ``00001.tar`` (a brace pattern's names) with sizes.json."""
        return self._renamed_shards("brace_shards", "sizes")

    @cached_property
    def img2dataset(self) -> Path:
        """The shards as img2dataset names them, with its ``NNNNN_stats.json`` and no sizes.json."""
        return self._renamed_shards("img2dataset", "stats")

    @cached_property
    def packed(self) -> Path:
        """The ``../shared`` stand-in's two jsonl sets packed (what experiment=real_mix reads)."""
        from ernievil2.data.formats import SourceSpec
        from ernievil2.data.packers.pipeline import PackOptions, pack

        out = self._folder("packed")
        data = self.shared / "data"
        pack(SourceSpec("jsonl", data / "flickr8k-cn-train" / "captions.jsonl", language="zh"), out / "flickr8k-cn",
             PackOptions(samples_per_shard=8, progress=False))
        pack(SourceSpec("jsonl", data / "coco-mini-train" / "captions.jsonl"), out / "coco-mini",
             PackOptions(samples_per_shard=8, progress=False))
        return out
