"""Library vs application: inference, evaluation and the model import no training code."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_inference_and_evaluation_import_no_training_code():
    probe = ("import sys, ernievil2.inference, ernievil2.evaluators, ernievil2.encode, ernievil2.retrieval, "
             "ernievil2.weights, ernievil2.weights.layouts, ernievil2.weights.configs, ernievil2.weights.find, "
             "ernievil2.weights.load, ernievil2.weights.save, ernievil2.weights.pdparams, ernievil2.search, "
             "ernievil2.models.schema\n"
             "print(sorted(m for m in sys.modules if m.startswith('ernievil2.train') or m == 'wandb'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"
